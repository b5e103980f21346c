# Dense with 4x the FLOPs per token of configs/facts_dense.py (with configs/facts_common.py), by wider FFNs
# only, as configs/facts_dense2x.py.
ffn_hidden = 1240
