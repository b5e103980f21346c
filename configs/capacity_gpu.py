# The capacity preset at one GPU's scale (`python tools/bench.py facts --preset capacity-gpu`), applied after each
# model's own config: the same suite on 4 layers of width 128 and a knowledge base of 8000 people, with
# Memory+ from 16k to 1M values. Not run yet: sized so that every model sees each fact about 50 times.
dataset = "facts_8000"  # made by tools/bench.py facts --preset capacity-gpu
n_layer = 4
n_head = 4
n_embd = 128
ffn_hidden = 384
block_size = 64
batch_size = 256  # 16,384 tokens per iteration
max_iters = 8000  # 131M tokens, about 50 passes over the knowledge base
warmup_iters = 200
eval_interval = 500
log_interval = 100
facts_eval_size = 1000
# memory and PEER layers: 2 heads reading 32 values each through 32-wide keys, so that the sub-key scores
# at 1024**2 values (131k FLOPs per token) stay under half the FFN they replace
mem_heads = 2
mem_knn = 32
mem_k_dim = 32
peer_n_keys = 724  # 524k experts of width 128: about the largest memory's 134M parameters
peer_heads = 2
peer_knn = 16
peer_k_dim = 32
# Engram (configs/capacity_engram.py): 8 rows of width 56 read per token and 2,396,601 rows, about the largest
# memory's parameters (135.1M) and FLOPs per token (1.905M against 1.904M)
engram_dim = 56
engram_rows = 2396601
