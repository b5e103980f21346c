# GPT-2 small (124M dense) with Memory+ at the paper's settings, for one GPU: 3 memory layers centred with a
# wide stride (2, 6, 10 of 12, as 4, 12, 20 of 24 in the paper) sharing one table of 1024**2 = 1M values.
# Data: fineweb-edu in GPT-2 ids, `python prepare_data.py fineweb_edu --num_tokens 1e10` (pip install datasets);
# 5000 iterations of 16 x 4 x 1024 tokens read 0.33B of them. The vocabulary is padded from 50257 to 50304.
dataset = "fineweb_edu"
vocab_multiple = 64
out_dir = "out/gpt2_small_memplus"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 4
max_iters = 5000
eval_interval = 500
eval_iters = 50
log_interval = 10
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 200
memory_layers = (2, 6, 10)
mem_n_keys = 1024
mem_heads = 4
mem_knn = 32
mem_k_dim = 384
mem_v_dim = 768
mem_share_values = True
mem_swilu = True
mem_value_lr = 6e-3
device = "auto"
dtype = "auto"
compile = True
