# PEER on tinyshakespeare, character level: the dense baseline with layers 1, 3 and 5 (the Memory+ layers)
# made PEER layers of 128**2 = 16,384 single-neuron experts each, 8 heads of 16 experts per token (the
# PEER paper's heads and top-k). peer_k_dim = 56 brings the FLOPs per token to those of Memory+ (2.97M);
# 13.8M parameters against Memory+'s 9.6M (the experts are not shared between layers).
#   python prepare_data.py shakespeare --tokenizer char && python train.py configs/shakespeare_char_peer.py
dataset = "shakespeare_char"
out_dir = "out/shakespeare_char_peer"
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
peer_layers = (1, 3, 5)
peer_n_keys = 128
peer_heads = 8
peer_knn = 16
peer_k_dim = 56
