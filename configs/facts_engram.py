# Engram (with configs/facts_common.py): layers 1, 3 and 5 as in Memory+, each an Engram block (engram.py)
# with a table of its own: 2-grams and 3-grams, 4 hashes each, 8 rows of width 34 read per token, so about
# Memory+'s FLOPs per token (794,208 against 792,492) and parameters (3 tables of 10,225 rows: 1,391,110
# against 1,391,168). Its rows are chosen by the last 2 or 3 tokens alone, not by the hidden state.
engram_layers = (1, 3, 5)
engram_orders = (2, 3)
engram_heads = 4
engram_dim = 34
engram_rows = 10225
