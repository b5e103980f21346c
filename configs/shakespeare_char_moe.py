# Mixture of experts on tinyshakespeare, character level: the Memory+ config's baseline by the paper's rule
# (`python tools/sizing.py configs/shakespeare_char_memplus.py` prints it). Every feed-forward block is an MoE of
# top-1 SwiGLU experts shaped like the dense FFN, so about the dense (and Memory+) FLOPs per token; 11
# experts is the smallest count whose total parameters (10.1M) exceed Memory+'s (9.6M).
#   python prepare_data.py shakespeare --tokenizer char && python train.py configs/shakespeare_char_moe.py
include("shakespeare_char_common.py")  # the data, the dense model and the budget
out_dir = "out/shakespeare_char_moe"
moe_layers = (0, 1, 2, 3, 4, 5)
moe_num_experts = 11
moe_top_k = 1
moe_aux_loss_weight = 0.01
moe_z_loss_weight = 0.001
