# Dense baseline on tinyshakespeare, character level: trains on 2 CPU cores in a few minutes.
#   python prepare_data.py shakespeare --tokenizer char && python train.py configs/shakespeare_char_dense.py
include("shakespeare_char_common.py")  # the data, the dense model and the budget
out_dir = "out/shakespeare_char_dense"
