# The capacity preset of the facts benchmark (`python tools/bench.py facts --preset capacity`), on top of
# configs/facts_common.py: a dense model small enough that a knowledge base it cannot hold fits a CPU
# budget, trained long enough that its fact accuracy stops rising. Memory+ (configs/capacity_memplus.py)
# replaces one of its two FFNs; tools/bench.py derives the 2x and 4x dense models and the MoE with tools/sizing.py.
# One run: python tools/bench.py facts --preset capacity --models dense --seeds 1
dataset = "facts_1000"  # made by tools/bench.py facts --preset capacity (or prepare_data.py facts --n_entities 1000 --name facts_1000)
n_layer = 2
n_head = 2
n_embd = 32
ffn_hidden = 96  # 3 * n_embd: SwiGLU, about 18k FLOPs per token per layer
block_size = 32  # two or three facts of about 13 tokens
batch_size = 128
max_iters = 3000  # 12.3M tokens
eval_interval = 250
log_interval = 250
eval_iters = 5
facts_eval_size = 500
# memory layers: one head reading 16 values through 16-wide keys, so a memory layer's FLOPs stay at or
# below the FFN it replaces at every size of the sweep (the sub-key scores grow with mem_n_keys)
mem_heads = 1
mem_knn = 16
mem_k_dim = 16
