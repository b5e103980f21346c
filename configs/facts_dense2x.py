# Dense with 2x the FLOPs per token of configs/facts_dense.py (with configs/facts_common.py): only the FFNs
# grow, so attention, embeddings and depth stay those of every other model and the extra compute (and
# parameters) all go where a dense model stores facts.
ffn_hidden = 544
