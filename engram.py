"""Engram (DeepSeek 2026, "Conditional Memory via Scalable Lookup"): an n-gram memory addressed by the token ids.

At position t the suffix n-grams of each order n in `orders` (tokens idx[t-n+1..t]) are hashed by `heads`
independent hashes into rows of one large embedding table; the len(orders)*heads rows read are
concatenated into e_t, and a gate decides from the hidden state h_t how much of them the position takes:

    k_t = W_k e_t,   v_t = W_v e_t,   alpha_t = sigmoid(<RMSNorm(h_t), RMSNorm(k_t)> / sqrt(dim)),
    output alpha_t * v_t, added to the residual stream.

The rows depend on the tokens alone: no query, no search, and they are known before the layer runs.

Where this differs from the paper, and why:
- no short depthwise causal convolution after the gate: it would need its own decoding cache (each layer's
  last gated values), and the gated read alone is the lookup the method is about;
- no tokenizer compression (the paper first maps ids to canonical ids, merging case and spacing variants):
  the hash reads raw token ids, so variants of a word take different rows;
- one table shared by every (order, head), each hashing into all of it, rather than one prime-sized table
  per (order, head): the model owns its tables as memory.ValueTable (row-sparse gradients, column sharding,
  checkpoints, read-usage stats), and one table is one of those.

As with memory.ProductKeyMemory the layer does not own its table: the model makes a ValueTable of
`table_shape()` and passes it in at call time.
"""
import functools
import math

import torch
import torch.nn as nn

from errors import need

PRIME = 2**31 - 1  # the hash works modulo this Mersenne prime; rows are its residues mod table_rows
PAD = -1  # the token id of positions before the sequence start (hashed as 0; real tokens hash as id + 1)
_MASK64 = 2**64 - 1


def splitmix64(x):
    """SplitMix64's output for state x (Steele et al. 2014): a fixed, well-mixed 64-bit integer, plain Python."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def hash_constants(order, head):
    """The multiplier a in [2, PRIME) and seed s in [0, PRIME) of the hash of (order, head), from
    key = order * 2**32 + head: a = 2 + splitmix64(2 * key) mod (PRIME - 2), s = splitmix64(2 * key + 1) mod PRIME.
    A formula rather than a random draw: every run, process, rank and device gets the same ones."""
    key = (order << 32) + head
    return 2 + splitmix64(2 * key) % (PRIME - 2), splitmix64(2 * key + 1) % PRIME


@functools.lru_cache(maxsize=None)
def _constant_tensors(orders, heads, device):
    """hash_constants as two (len(orders), heads) int64 tensors on device."""
    a, s = zip(*(zip(*(hash_constants(n, j) for j in range(heads))) for n in orders))
    return torch.tensor(a, device=device), torch.tensor(s, device=device)


def check_sizes(orders, heads, table_rows):
    """A clear error for sizes the hash cannot serve."""
    if not 0 < table_rows <= PRIME:
        raise ValueError(f"ngram_hash: table_rows={table_rows} must lie in [1, {PRIME}]")
    if not orders or min(orders) < 1 or len(set(orders)) < len(orders) or heads < 1:
        raise ValueError(f"ngram_hash: orders {tuple(orders)} must be distinct and positive, heads={heads} at least 1")


def ngram_hash(idx, orders, heads, table_rows, prefix=None):
    """The table rows of every position's suffix n-grams: idx (B, T) token ids -> (B, T, len(orders) * heads)
    int64 in [0, table_rows), order-major (the heads of orders[0] first).

    For the n-gram u_1..u_n (u = token id + 1, oldest first; PAD is 0) the hash of (order n, head j) is

        h = s;  for each u_i: h = ((h XOR u_i) * a) mod PRIME;   row = h mod table_rows

    with (a, s) = hash_constants(n, j). Token ids must be below PRIME - 1, so that h XOR u < 2**31 and the
    product stays below 2**62: int64 never overflows, and CPU and CUDA give the same rows. Each token is
    multiplied in after it is mixed, so n-grams one id apart land far apart, not on neighbouring rows; the
    XOR makes the hash non-linear, so two n-grams that collide do not take their shifted copies with them as
    a polynomial hash would. The bias of the final reduction is at most table_rows / PRIME.

    prefix: (B, P) the tokens before idx[:, 0] in the sequence, the last one nearest (incremental decoding);
    its last max(orders) - 1 are used, and positions before it are PAD. None: every position before the start
    is PAD.
    """
    check_sizes(orders, heads, table_rows)
    B, T = idx.shape
    context = max(orders) - 1
    before = idx.new_full((B, context), PAD)
    if prefix is not None:
        if prefix.dim() != 2 or prefix.shape[0] != B:
            raise ValueError(f"ngram_hash: prefix {tuple(prefix.shape)} must be (batch={B}, tokens)")
        before = torch.cat([before, prefix.to(idx.dtype)], dim=1)[:, before.shape[1] + prefix.shape[1] - context:]
    u = torch.cat([before.long(), idx.long()], dim=1) + 1  # (B, context + T): position t is u[:, context + t]
    multipliers, seeds = _constant_tensors(tuple(orders), heads, idx.device)
    rows = []
    for o, n in enumerate(orders):
        h = seeds[o].expand(B, T, heads)
        for i in range(n):  # the n-gram's tokens, oldest first
            start = context - n + 1 + i
            h = ((h ^ u[:, start:start + T, None]) * multipliers[o]) % PRIME
        rows.append(h)
    return torch.cat(rows, dim=-1) % table_rows


class Engram(nn.Module):
    """One Engram block: hash the suffix n-grams, read their rows, gate the projected read by the hidden state.

    out_std: init std of W_v, which writes into the residual stream (the model scales it with depth).
    """
    reads = ("values", "idx", "prefix")  # its own table, the token ids, those before them (model.py's FFN_KINDS)
    share_table = False  # a table per Engram layer, as in the paper

    def __init__(self, dim, table_rows, emb_dim, orders=(2, 3), heads=4, out_std=0.02):
        super().__init__()
        self.dim, self.table_rows, self.emb_dim = dim, table_rows, emb_dim
        self.orders, self.heads, self.out_std = tuple(orders), heads, out_std
        self.rows_per_token = len(self.orders) * heads  # rows a token reads
        check_sizes(self.orders, heads, table_rows)
        self.w_k = nn.Linear(self.rows_per_token * emb_dim, dim, bias=False)
        self.w_v = nn.Linear(self.rows_per_token * emb_dim, dim, bias=False)
        self.norm_h = nn.RMSNorm(dim, eps=1e-5)
        self.norm_k = nn.RMSNorm(dim, eps=1e-5)
        self.reset_parameters()

    @classmethod
    def from_config(cls, c):
        """The Engram block of a GPTConfig (its engram_* settings), W_v scaled with depth."""
        return cls(c.n_embd, c.engram_rows, c.engram_dim, c.engram_orders, c.engram_heads, out_std=c.residual_std)

    @staticmethod
    def check_config(c):
        for name in ("engram_rows", "engram_dim", "engram_heads"):
            need(getattr(c, name) > 0, f"{name} must be positive, got {getattr(c, name)}")
        need(c.engram_rows <= PRIME, f"engram_rows={c.engram_rows} must be at most {PRIME} (the hash's modulus)")
        orders = c.engram_orders
        need(len(orders) > 0 and all(isinstance(n, int) and n >= 1 for n in orders) and len(set(orders)) == len(orders),
             f"engram_orders={orders} must be distinct positive n-gram lengths, e.g. (2, 3)")

    def reset_parameters(self):
        """W_k N(0, 0.02) like the model's dense weights (its output is RMS-normalised, so its scale only sets
        the gradient's); W_v N(0, out_std): at init the rows are noise, and a small W_v keeps that noise from
        swamping the residual stream until the table has learned something, as the model's residual
        projections start small. Norm gains 1."""
        nn.init.normal_(self.w_k.weight, std=0.02)
        nn.init.normal_(self.w_v.weight, std=self.out_std)
        self.norm_h.reset_parameters()
        self.norm_k.reset_parameters()

    def table_shape(self):
        """(table_rows, emb_dim): the ValueTable the model must make for this block."""
        return self.table_rows, self.emb_dim

    def active_params(self):
        """Own parameters plus the table rows a token reads."""
        return sum(p.numel() for p in self.parameters()) + self.rows_per_token * self.emb_dim

    def flops_per_token(self):
        """2 per multiply-add, as ProductKeyMemory counts: the row reads, the two projections, the gate's dot
        product (the hash is integer work, the norms are left out as the memory layer's are)."""
        flops = 2 * self.rows_per_token * self.emb_dim  # the row reads (one weighted bag of 1 each)
        flops += 2 * 2 * self.rows_per_token * self.emb_dim * self.dim  # W_k and W_v
        return flops + 2 * self.dim  # the gate's dot product

    def forward(self, x, values, idx, prefix=None):
        """x (B, T, dim) the normalised hidden state, values the ValueTable, idx (B, T) the token ids at the
        same positions, prefix as in ngram_hash (the tokens before idx[:, 0] when decoding) -> (B, T, dim)."""
        B, T, _ = x.shape
        if idx.shape != (B, T):
            raise ValueError(f"Engram: idx {tuple(idx.shape)} must be the (batch, time) of x {tuple(x.shape)}")
        # int32: half the bytes, and the backward's sort is faster (every row < PRIME < 2**31)
        indices = ngram_hash(idx, self.orders, self.heads, self.table_rows, prefix).view(-1, 1).int()
        weights = torch.ones(indices.shape, device=x.device)
        values.record_usage(indices, weights)
        e = values(indices, weights).view(B, T, self.rows_per_token * self.emb_dim).to(x.dtype)  # each row read alone
        k, v = self.w_k(e), self.w_v(e)
        dtype = torch.promote_types(x.dtype, torch.float32)  # the gate in fp32 (or fp64 for checks)
        score = (self.norm_h(x.to(dtype)) * self.norm_k(k.to(dtype))).sum(-1, keepdim=True)
        return (torch.sigmoid(score / math.sqrt(self.dim)) * v).to(x.dtype)
