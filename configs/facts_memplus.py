# Memory+ (with configs/facts_common.py): layers 1, 3 and 5 of 6 are memory layers with the swilu output,
# sharing one value table (centred with a wide stride, as 4, 12 and 20 of 24 in the paper). About the
# FLOPs of configs/facts_dense.py, 4x its parameters.
memory_layers = (1, 3, 5)
mem_swilu = True
mem_share_values = True
