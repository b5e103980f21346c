# tinyshakespeare at the character level, the base of every shakespeare_char_<model>.py: the data, a dense
# GPT of 6 layers of width 128 and one training budget (2 CPU cores: minutes). A <model> file includes it and
# sets only what its model changes.
# Characters, not BPE: with 65 ids the output layer is negligible, so the feed-forward blocks (what we
# compare) carry the compute, and the corpus is 1M tokens instead of 300k, so small models overfit less.
dataset = "shakespeare_char"
out_dir = "out/shakespeare_char"
n_layer = 6
n_head = 4
n_embd = 128
block_size = 128
batch_size = 16
max_iters = 1500
eval_interval = 250
eval_iters = 20
log_interval = 50
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
