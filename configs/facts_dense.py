# Dense baseline of the facts benchmark (with configs/facts_common.py): SwiGLU FFNs of hidden size 192,
# the default 8/3 * n_embd rounded up to a multiple of 64. About 0.8M forward FLOPs per token.
ffn_hidden = 192
