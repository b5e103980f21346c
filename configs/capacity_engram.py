# Engram of the capacity preset (with configs/facts_common.py and configs/capacity_common.py): the second
# layer's FFN becomes an Engram block (engram.py) with about the parameters and FLOPs per token of the largest
# Memory+ (64k values of width 32): 2-grams and 3-grams, 4 hashes each, 8 rows of width 14 read per token
# (91,232 FLOPs per token against Memory+'s 90,994), 149,762 rows (2,138,268 parameters against 2,138,272).
engram_layers = (1,)
engram_orders = (2, 3)
engram_heads = 4
engram_dim = 14
engram_rows = 149762
