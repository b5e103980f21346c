# PEER (with configs/facts_common.py): layers 1, 3 and 5 as in Memory+, each a product-key retrieval of
# 91**2 = 8,281 single-neuron experts (about the parameters of Memory+'s value table), 2 heads x knn 16.
peer_layers = (1, 3, 5)
peer_n_keys = 91
peer_heads = 2
peer_knn = 16
peer_k_dim = 64
