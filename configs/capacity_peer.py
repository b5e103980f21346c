# PEER of the capacity preset (with configs/facts_common.py and configs/capacity_common.py): the second
# layer's FFN becomes 181**2 = 32,761 one-neuron experts of width 32, about the parameters of the largest
# Memory+ (64k values of width 32), found as a memory layer finds its values.
peer_layers = (1,)
peer_n_keys = 181
peer_heads = 1
peer_knn = 16
peer_k_dim = 16
