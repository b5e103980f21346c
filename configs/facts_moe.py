# Mixture-of-experts matched to Memory+ (with configs/facts_common.py): every FFN a top-1 MoE of SwiGLU
# experts of the dense size (hidden 192), with the fewest experts whose total parameters exceed
# configs/facts_memplus.py's (the paper's rule; `python tools/sizing.py configs/facts_common.py
# configs/facts_memplus.py` prints it). About the FLOPs of configs/facts_dense.py.
moe_layers = (0, 1, 2, 3, 4, 5)
moe_num_experts = 6
moe_top_k = 1
moe_hidden = 192
