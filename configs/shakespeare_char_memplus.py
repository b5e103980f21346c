# Memory+ on tinyshakespeare, character level: the dense baseline with layers 1, 3 and 5 made memory
# layers that share one value table (65,536 values), each with a swilu output. About the same FLOPs per
# token as the dense model, 7x its parameters.
#   python prepare_data.py shakespeare --tokenizer char && python train.py configs/shakespeare_char_memplus.py
include("shakespeare_char_common.py")  # the data, the dense model and the budget
out_dir = "out/shakespeare_char_memplus"
memory_layers = (1, 3, 5)
mem_n_keys = 256
mem_heads = 4
mem_knn = 32
mem_share_values = True
mem_swilu = True
mem_value_lr = 2e-2
