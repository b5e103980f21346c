# Memory+ of the capacity preset (with configs/facts_common.py and configs/capacity_common.py): the second
# of the two layers is a memory layer with the swilu output and query/key normalisation; tools/bench.py sweeps
# mem_n_keys over 32, 64, 128 and 256 (1k to 64k values of width 32).
memory_layers = (1,)
mem_swilu = True
mem_qk_norm = True
mem_n_keys = 256
