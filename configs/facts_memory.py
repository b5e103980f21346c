# Memory (with configs/facts_common.py): the middle layer's FFN replaced by a plain product-key memory
# layer (no swilu) of its own; the other five FFNs stay. About the FLOPs of configs/facts_dense.py.
memory_layers = (3,)
mem_swilu = False
