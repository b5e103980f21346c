# Memory+ on tinyshakespeare, character level: the dense baseline with layers 1, 3 and 5 made memory
# layers that share one value table (65,536 values), each with a swilu output. About the same FLOPs per
# token as the dense model, 7x its parameters.
#   python prepare_data.py shakespeare --tokenizer char && python train.py configs/shakespeare_char_memplus.py
dataset = "shakespeare_char"
out_dir = "out/shakespeare_char_memplus"
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
memory_layers = (1, 3, 5)
mem_n_keys = 256
mem_heads = 4
mem_knn = 32
mem_share_values = True
mem_swilu = True
mem_value_lr = 2e-2
