# Memory+ (with configs/facts_common.py): layers 1, 3 and 5 of 6 are memory layers with the swilu output,
# sharing one value table (centred with a wide stride, as 4, 12 and 20 of 24 in the paper), with query/key
# normalisation, which the paper uses for small base models: without it this 64-wide model reads only
# about 60% of its values by the end of training, with it about 95%, and its answer NLL is lower. About
# the FLOPs of configs/facts_dense.py, 4x its parameters.
memory_layers = (1, 3, 5)
mem_swilu = True
mem_share_values = True
mem_qk_norm = True
