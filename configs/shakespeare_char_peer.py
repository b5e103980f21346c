# PEER on tinyshakespeare, character level: the dense baseline with layers 1, 3 and 5 (the Memory+ layers)
# made PEER layers of 128**2 = 16,384 single-neuron experts each, 8 heads of 16 experts per token (the
# PEER paper's heads and top-k). peer_k_dim = 56 brings the FLOPs per token to those of Memory+ (2.97M);
# 13.8M parameters against Memory+'s 9.6M (the experts are not shared between layers).
#   python prepare_data.py shakespeare --tokenizer char && python train.py configs/shakespeare_char_peer.py
include("shakespeare_char_common.py")  # the data, the dense model and the budget
out_dir = "out/shakespeare_char_peer"
peer_layers = (1, 3, 5)
peer_n_keys = 128
peer_heads = 8
peer_knn = 16
peer_k_dim = 56
