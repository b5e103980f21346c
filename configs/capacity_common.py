# The capacity preset of the facts benchmark (`python tools/bench.py facts --preset capacity`), on top of
# configs/facts_common.py: a dense model small enough that a knowledge base it does not learn in the budget
# fits a CPU. Trained for 12,000 iterations: when a run starts to climb varies with the seed, and at 6000 some
# seeds had not yet (Memory+ 4k: 97.0 / 37.5 / 99.2%); at 12,000 every model's seeds end within 2.3 points of
# their mid-range (Memory+ 4k: 99.2 / 98.2 / 99.7%). Memory+
# (configs/capacity_memplus.py) replaces one of its two FFNs; tools/bench.py derives the 2x and 4x dense
# models and the MoE with tools/sizing.py.
# One run: python tools/bench.py facts --preset capacity --models dense --seeds 1
dataset = "facts_1000"  # made by tools/bench.py facts --preset capacity (or prepare_data.py facts --n_entities 1000 --name facts_1000)
n_layer = 2
n_head = 2
n_embd = 32
ffn_hidden = 96  # 3 * n_embd: SwiGLU, about 18k FLOPs per token per layer
block_size = 32  # two or three facts of about 13 tokens
batch_size = 128
max_iters = 12000  # 49M tokens, about 150 passes over the knowledge base
eval_interval = 1000
log_interval = 250
eval_iters = 5
facts_eval_size = 2000  # 2000 questions of trained and 2000 of held-out templates: a seed spread of a
# few points stands above the sampling error (about 1 point at 2000)
# memory layers: one head reading 16 values through 16-wide keys, so a memory layer's FLOPs stay at or
# below the FFN it replaces at every size of the sweep (the sub-key scores grow with mem_n_keys)
mem_heads = 1
mem_knn = 16
mem_k_dim = 16
