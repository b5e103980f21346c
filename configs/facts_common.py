# The factual-recall benchmark (facts.py): data, training budget and base model shared by every
# configs/facts_<model>.py, which sets only what its model changes. One run:
#   python prepare_data.py facts && python train.py configs/facts_common.py configs/facts_memplus.py
# All of them, with the results table: python tools/bench.py facts
dataset = "facts"
out_dir = "out/facts"
# base model: 6 layers of width 64; the compact BPE vocabulary of the knowledge base has about 525 ids
n_layer = 6
n_head = 4
n_embd = 64
block_size = 64  # a fact is one line of about 13 tokens
# one budget for every model: 1000 iterations of 4096 tokens, about 6 passes over the default knowledge base
# (2000 people, 656k tokens), so each fact is read about 30 times in its five training phrasings
batch_size = 64
max_iters = 1000
learning_rate = 1e-2
min_lr = 1e-3
warmup_iters = 50
eval_interval = 250
eval_iters = 10
log_interval = 50
facts_eval_size = 1000
# memory layers (memory and memplus): 128**2 = 16,384 values; 2 heads reading 16 rows each keep a memory
# layer's FLOPs at a dense FFN's; values learn at 10x the rest's learning rate
mem_n_keys = 128
mem_heads = 2
mem_knn = 16
mem_k_dim = 64
mem_value_lr = 1e-1
