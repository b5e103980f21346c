# Dense baseline on tinyshakespeare, character level: trains on 2 CPU cores in a few minutes.
#   python prepare_data.py shakespeare --tokenizer char && python train.py configs/shakespeare_char_dense.py
# Characters, not BPE: with 65 ids the output layer is negligible, so the feed-forward blocks (what we
# compare) carry the compute, and the corpus is 1M tokens instead of 300k, so small models overfit less.
dataset = "shakespeare_char"
out_dir = "out/shakespeare_char_dense"
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
