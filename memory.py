"""Product-key memory layers (Lample et al. 2019; Berges et al. 2024, "Memory Layers at Scale").

A memory layer replaces a feed-forward block. Each token makes `heads` queries; each query is split in
two halves that are scored against two small sub-key tables; the Cartesian product of the two tables
is the full key set (n_keys**2 keys, never materialised). The top-knn keys of every head index rows of
one value table; the token's output is the softmax-weighted sum of those heads*knn rows (one bag).
Memory+ gates that read with a SiLU branch of the input and projects it back ("swilu").

The value table is not owned by the layer: the model owns it and passes it in at call time, so several
layers can share one table without global state.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import need
from kernels import embedding_bag

SEARCH_DTYPES = {"cuda": torch.bfloat16}  # operands of the fp32 search's score products, by device type


class ValueTable(nn.Module):
    """The memory's values: (n_keys**2, v_dim) rows, read a few at a time by the memory layers.

    `columns` (a slice of range(v_dim)) is the part of the table this module holds: all of it here, one
    shard per rank in distributed.ShardedValueTable.

    Gradients: the optimizer picks their layout (optim.mark_row_grads, which optim.RowAdamW applies to the
    weights it updates). After a backward a marked weight's .grad is a coalesced sparse COO tensor of
    exactly the rows read (summed over layers and micro-steps; coalescing costs one host sync per backward
    on CUDA). Any other weight's .grad is dense: one (N, v_dim) buffer in weight's dtype, which every
    training read's backward adds its rows into in place, so no read makes an (N, v_dim) tensor of its own.
    The table keeps the buffer for the run (made by zero_grad, or the first backward's gradient); the first
    training read after .grad was set to None zeroes it and makes it .grad again. A compiled step wants the
    table's zero_grad() before it (train.py calls it before each step): zeroed inside the graph, Inductor
    would zero and save a second (N, v_dim) tensor, and the step would compile twice. torch.autograd.grad
    finds no table gradient through a dense read (it is in the buffer): use kernels.embedding_bag for that.

    Under autocast (bf16/fp16 on the weight's device) an fp32 table is read through a copy in the
    autocast dtype, so a read moves 2 bytes per value element (the forward, and the score gradient's
    re-read); `weight` stays the fp32 master that gets the gradient and the update. The copy costs
    N * v_dim * 2 bytes (1.5 GiB at 1M x 768) and one pass over the table (4 bytes read, 2 written per
    element) each time it is made: on the first read after a backward (the optimizer is about to change
    the weight: so once per micro-step), a load_state_dict or reset_parameters, a move, or (eager only:
    torch.compile cannot read tensor versions) an in-place edit.
    """

    INIT_ROWS = 8192  # rows drawn at a time by reset_parameters

    def __init__(self, num_values, v_dim, columns=None):
        super().__init__()
        self.v_dim = v_dim
        self.columns = columns or slice(0, v_dim)
        self.weight = nn.Parameter(torch.empty(num_values, self.columns.stop - self.columns.start))
        self.usage = None  # while measuring: (num_values,) fp32, the summed weight each row was read with
        self._copy = self._copy_version = None  # the autocast read copy and weight._version when made
        self._grad = None  # the dense gradient buffer reads add into (see the class docstring)
        self._hook_weight()
        self.register_load_state_dict_post_hook(ValueTable._after_load)
        self.reset_parameters()

    def __setstate__(self, state):  # deepcopy and unpickling drop tensor hooks
        super().__setstate__(state)
        self._hook_weight()

    def _hook_weight(self):
        self.weight.register_post_accumulate_grad_hook(self._after_backward)

    @property
    def row_grads(self):
        """Whether the optimizer marked the weight for sparse row gradients (optim.mark_row_grads)."""
        return getattr(self.weight, "row_grads", False)

    def _after_backward(self, weight):
        """The accumulated gradient as the optimizer takes it (see the class docstring)."""
        self._copy = None
        grad = weight.grad
        if grad is None or not grad.is_sparse:
            if self._grad is None and grad is not None and grad.is_contiguous():
                self._grad = grad  # the first backward's dense gradient becomes the buffer
        elif grad.device.type == "cpu" and bool((grad._indices()[0].diff() > 0).all()):
            # CPU rows come sorted, each once, but autograd dropped the coalesced flag (coalesce() would copy)
            weight.grad = torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape, is_coalesced=True,
                                                  check_invariants=False)
        else:
            weight.grad = grad.coalesce()

    def _grad_buffer(self, make=False):
        """The dense gradient a training read adds into, made `weight.grad` (zeroed, or holding what was set
        there) when it is not; None when reads do not take it. make: made here when there is none."""
        grad, weight = self._grad, self.weight
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return None  # first, so that a compiled eval does not depend on the buffer (one graph before and after)
        if grad is not None and (self.row_grads or (grad.shape, grad.dtype, grad.device)
                                 != (weight.shape, weight.dtype, weight.device)):
            self._grad = grad = None  # row gradients now, or the weight moved: the next backward makes a new one
        if grad is None and make and not self.row_grads:
            self._grad = grad = torch.empty_like(weight, memory_format=torch.contiguous_format)
        if grad is None:
            return None
        if weight.grad is not grad:
            if weight.grad is None:
                grad.zero_()
            else:
                grad.copy_(weight.grad)
            weight.grad = grad
        return grad

    def zero_grad(self, set_to_none=True):
        """Ready the gradient for the next step: the dense buffer (made here the first time) zeroed in place
        and made weight.grad, so that every compiled step finds it so and compiles once (see the class
        docstring). A weight marked for row gradients has no buffer: its gradient is set to None."""
        super().zero_grad(set_to_none)
        self._grad_buffer(make=True)

    @torch.no_grad()
    def keep_grad_rows(self, rows):
        """Restrict the gradient to `rows` (1-D indices): every other row's is zeroed, or dropped from row
        gradients. Returns the share of the gradient's norm kept, or None when there is no gradient."""
        grad = self.weight.grad
        if grad is None:
            return None
        keep = torch.zeros(len(grad), dtype=torch.bool, device=grad.device)
        keep[rows] = True
        if grad.is_sparse:
            grad = grad.coalesce()
            mine = keep[grad.indices()[0]]
            total, kept = grad.values().norm(), grad.values()[mine].norm()
            self.weight.grad = torch.sparse_coo_tensor(grad.indices()[:, mine], grad.values()[mine], grad.shape,
                                                       is_coalesced=True, check_invariants=False)
        else:
            total = grad.norm()
            grad.masked_fill_(~keep.unsqueeze(1), 0)
            kept = grad.norm()
        return kept / total.clamp(min=1e-30)

    def _after_load(self, incompatible_keys):  # a load_state_dict post-hook: the copy is of the old weight
        self._copy = None

    @torch.no_grad()
    def reset_parameters(self):
        """N(0, v_dim**-0.5), drawn in blocks of full-width rows and cut to the held columns: every column
        layout gets the same table from the same seed, and none builds the whole table at once."""
        self._copy = None
        for start in range(0, len(self.weight), self.INIT_ROWS):
            rows = torch.randn(min(self.INIT_ROWS, len(self.weight) - start), self.v_dim, device=self.weight.device)
            self.weight[start:start + len(rows)] = rows[:, self.columns] * self.v_dim ** -0.5

    def read_copy(self):
        """What a read reads instead of the fp32 weight under autocast: the table in the autocast dtype,
        made when stale (see the class docstring); None when reads take the weight itself."""
        device = self.weight.device.type
        dtype = torch.get_autocast_dtype(device)
        if (not torch.is_autocast_enabled(device) or self.weight.dtype != torch.float32
                or dtype not in (torch.bfloat16, torch.float16)):
            return None
        eager = not torch.compiler.is_compiling()
        copy = self._copy
        if (copy is None or copy.dtype != dtype or copy.device != self.weight.device
                or (eager and self._copy_version != self.weight._version)):
            with torch.no_grad():
                copy = self._copy = self.weight.to(dtype)
            self._copy_version = self.weight._version if eager else None
        return copy

    def forward(self, indices, weights):
        """Each token's weighted sum of its rows: indices, weights (tokens, bag) -> (tokens, v_dim)."""
        return embedding_bag(self.weight, indices, weights, sparse_grad=self.row_grads, read=self.read_copy(),
                             grad_into=self._grad_buffer())

    def record_usage(self, indices, weights):
        """Add a read's weights to `usage` when measuring (ProductKeyMemory calls it with its own tokens)."""
        if self.usage is not None:
            self.usage.index_add_(0, indices.flatten(), weights.detach().flatten().float())


def usage_stats(usage):
    """The PKM paper's memory usage of a (num_values,) read-weight tally: the fraction of rows read at all,
    and the KL divergence of the normalised read weights from uniform (0 when every row is read equally,
    log(num_values) when one row takes everything)."""
    p = usage / usage.sum()
    kl = (p * (p * len(p)).log()).nan_to_num().sum()  # 0 * log 0 counts as 0
    return {"read_fraction": (usage > 0).float().mean().item(), "kl_uniform": kl.item()}


@functools.lru_cache(maxsize=None)
def candidate_ranks(knn, device):
    """Rank pairs (a, b) with (a+1)*(b+1) <= knn: the only candidates that can make the top-knn.

    With both halves sorted, the pair of ranks (a, b) is beaten or tied by every (a', b') with a' <= a
    and b' <= b, (a+1)*(b+1) pairs in all, itself included; so when that exceeds knn the pair is never
    needed. This keeps about knn*ln(knn) of the knn*knn candidates (119 of 1024 at knn=32).
    """
    pairs = [(a, b) for a in range(knn) for b in range(knn // (a + 1))]
    return tuple(torch.tensor(r, device=device) for r in zip(*pairs))


@torch.no_grad()
def product_key_topk(s1, s2, knn):
    """Exact top-knn over all n_keys**2 sums s1[i] + s2[j], without scoring them all.

    s1, s2: (..., n_keys) half scores. Any key of the global top-knn has both halves in their own
    half's top-knn, and only the rank pairs of `candidate_ranks` can win. The winners' (i, j) are
    recovered from their position among the candidates, so no candidate index tensor is built.
    Returns (i, j), each (..., knn) int64, best first; the full key index is i * n_keys + j.
    """
    v1, i1 = s1.topk(knn, dim=-1)  # sorted, best first
    v2, i2 = s2.topk(knn, dim=-1)
    a, b = candidate_ranks(knn, s1.device)
    pos = (v1[..., a] + v2[..., b]).topk(knn, dim=-1).indices  # (..., knn) positions among candidates
    return i1.gather(-1, a[pos]), i2.gather(-1, b[pos])


class ProductKeyMemory(nn.Module):
    """One memory layer: query projection, per-head sub-keys, product top-k, one summed bag, optional swilu.

    Scores are plain dot products (no 1/sqrt(d)) as in the paper, unless qk_norm is on: then each query
    half (with a learned gain) and each sub-key row are RMS-normalised and the scores scaled by
    1/sqrt(k_dim/2), which bounds them and is what the paper suggests for unstable small models.
    """

    reads = ("values",)  # forward takes the layer's ValueTable (model.py's FFN_KINDS)

    def __init__(self, dim, n_keys, heads, knn, k_dim, v_dim, swilu=True, qk_norm=False, share_table=True):
        super().__init__()
        self.share_table = share_table  # one table for every memory layer of the model (mem_share_values)
        self.dim, self.n_keys, self.heads, self.knn = dim, n_keys, heads, knn
        self.k_dim, self.v_dim, self.swilu, self.qk_norm = k_dim, v_dim, swilu, qk_norm
        self.query = nn.Linear(dim, heads * k_dim, bias=True)
        # sub_keys[h, 0] scores the first half of head h's query, sub_keys[h, 1] the second.
        self.sub_keys = nn.Parameter(torch.empty(heads, 2, n_keys, k_dim // 2))
        if qk_norm:
            self.query_gain = nn.Parameter(torch.ones(2, k_dim // 2))
        if swilu:
            self.w1 = nn.Linear(dim, v_dim, bias=True)
            self.w2 = nn.Linear(v_dim, dim, bias=True)
        self.reset_parameters()

    @classmethod
    def from_config(cls, c):
        """The memory layer of a GPTConfig (its mem_* settings)."""
        return cls(c.n_embd, c.mem_n_keys, c.mem_heads, c.mem_knn, c.mem_k_dim, c.mem_v_dim, c.mem_swilu,
                   c.mem_qk_norm, c.mem_share_values)

    @staticmethod
    def check_config(c):
        for name in ("mem_n_keys", "mem_heads", "mem_knn", "mem_k_dim", "mem_v_dim"):
            need(getattr(c, name) > 0, f"{name} must be positive, got {getattr(c, name)}")
        need(c.mem_knn <= c.mem_n_keys, f"mem_knn={c.mem_knn} must be at most mem_n_keys={c.mem_n_keys}")
        need(c.mem_k_dim % 2 == 0, f"mem_k_dim={c.mem_k_dim} must be even (it is split in two halves)")
        need(c.mem_swilu or c.mem_v_dim == c.n_embd,
             f"mem_v_dim={c.mem_v_dim} must equal n_embd={c.n_embd} without mem_swilu "
             "(the plain memory layer returns its read directly)")

    def table_shape(self):
        """The ValueTable the model makes for this layer: n_keys**2 rows of v_dim."""
        return self.n_keys ** 2, self.v_dim

    def reset_parameters(self):
        """The official initialisation, with every bias zero."""
        bound = 1 / math.sqrt(self.k_dim)
        nn.init.uniform_(self.sub_keys, -bound, bound)
        nn.init.xavier_uniform_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        if self.qk_norm:
            nn.init.ones_(self.query_gain)
        if self.swilu:
            for lin in (self.w1, self.w2):
                nn.init.normal_(lin.weight, std=self.dim ** -0.5)
                nn.init.zeros_(lin.bias)

    def queries_and_keys(self, x):
        """Query halves (tokens, heads, 2, k_dim/2) and sub-keys (heads, 2, n_keys, k_dim/2), fp32."""
        dtype = torch.promote_types(self.sub_keys.dtype, torch.float32)  # fp32, or fp64 for checks
        q = self.query(x).to(dtype).view(-1, self.heads, 2, self.k_dim // 2)
        keys = self.sub_keys.to(dtype)
        if self.qk_norm:
            q = F.rms_norm(q, (self.k_dim // 2,)) * self.query_gain.to(dtype)
            keys = F.rms_norm(keys, (self.k_dim // 2,)) / math.sqrt(self.k_dim // 2)
        return q, keys

    @staticmethod
    def half_scores(q, keys):
        """Every query half against every sub-key of its half: two (tokens, heads, n_keys), in q's dtype.

        fp32 scores come from SEARCH_DTYPES[device] operands (CUDA: bf16, on tensor cores, accumulated
        in fp32, the scores rounded to bf16; the top-k is exact for those scores), exactly fp32 elsewhere,
        whatever autocast says. Two products rather than one over both halves: slicing that one's output
        costs its backward a zero-filled (tokens, heads, 2, n_keys) gradient."""
        dtype = SEARCH_DTYPES.get(q.device.type, q.dtype) if q.dtype == torch.float32 else q.dtype
        with torch.autocast(q.device.type, enabled=False):
            return tuple(torch.einsum("thk,hnk->thn", q[:, :, half].to(dtype), keys[:, half].to(dtype)).to(q.dtype)
                         for half in (0, 1))

    def lookup(self, x):
        """The rows each token reads and their weights: two (tokens, heads*knn), indices int64, weights fp32.

        Each head's weights are a softmax over its knn scores (fp32), so a token's weights sum to heads.
        (Differentiating only the winners' gathered sub-keys does less arithmetic, but is slower on CPU
        than the dense score gradient: embedding backward is slow there.)
        """
        s1, s2 = self.half_scores(*self.queries_and_keys(x))
        i, j = product_key_topk(s1, s2, self.knn)
        scores = s1.gather(-1, i) + s2.gather(-1, j)  # differentiable in the query and the sub-keys
        weights = F.softmax(scores, dim=-1)
        indices = i * self.n_keys + j
        if self.n_keys ** 2 <= 2**31:  # int32 indices: half the bytes, and the backward's sort is faster
            indices = indices.int()
        return indices.flatten(1), weights.flatten(1)

    def active_params(self):
        """Own parameters (every sub-key is scored) plus the value rows a token reads."""
        return sum(p.numel() for p in self.parameters()) + self.heads * self.knn * self.v_dim

    def flops_per_token(self):
        flops = 2 * self.dim * self.heads * self.k_dim  # query
        flops += 2 * self.heads * self.n_keys * self.k_dim  # both halves against their sub-keys
        flops += self.heads * len(candidate_ranks(self.knn, "cpu")[0])  # candidate sums
        flops += 2 * self.heads * self.knn * self.v_dim  # weighted read
        return flops + (2 * 2 * self.dim * self.v_dim if self.swilu else 0)

    def forward(self, x, values):
        """x (..., dim) -> (..., dim); values: the ValueTable this layer reads."""
        shape = x.shape
        x = x.reshape(-1, self.dim)
        indices, weights = self.lookup(x)
        values.record_usage(indices, weights)
        y = values(indices, weights)
        if self.swilu:
            y = self.w2(y.to(x.dtype) * F.silu(self.w1(x)))
        return y.reshape(shape[:-1] + (y.shape[-1],)).to(x.dtype)
