"""The embedding bag behind every memory read: out[t] = sum_j w[t, j] * weight[idx[t, j]].

`embedding_bag` is the differentiable op; `embedding_bag_row_grad` gives the table gradient of only the
rows a batch read, for sparse updates. Two backends sit behind one call:

- "triton": our kernels (CUDA; on CPU only under Triton's interpreter, TRITON_INTERPRET=1 set before
  this module is imported). Masked tiles over dim (any dim), int64 addresses, fp32 accumulation.
- "torch": PyTorch ops on any device. Its backward inverts token -> row once (a sort) and reuses
  F.embedding_bag, whose CPU backward is otherwise about 10x its forward.

Table gradient strategies (`weight_grad`), both touching only the rows read:
- "deterministic" (default): sort the (row, token-slot) pairs, then each row sums its contributors in
  a fixed order ("reverse indices"): bitwise reproducible, no atomics on data.
- "atomic": each (token, slot) pair adds into its row with fp32 atomics: no sort, run-to-run order
  varies. Triton only; the torch backend always reduces in sorted order.
"""
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch backend serves everything
    triton = None

BACKENDS = ("auto", "triton", "torch")
WEIGHT_GRADS = ("deterministic", "atomic")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def embedding_bag(weight, indices, per_sample_weights, backend="auto", weight_grad="deterministic",
                  sparse_grad=False):
    """Weighted sum of rows. weight (N, dim); indices (tokens, bag) int32/int64; per_sample_weights
    (tokens, bag) any float dtype.

    Returns (tokens, dim) in weight's dtype, differentiable in weight and per_sample_weights. The table
    gradient is dense (N, dim), or with sparse_grad a sparse COO tensor holding only the rows read
    (coalesced, for optim.RowAdamW). backend: "auto" (Triton for CUDA tensors when Triton is installed,
    PyTorch otherwise), "triton" or "torch". weight_grad: "deterministic" or "atomic" (see the module
    docstring). The op is registered with torch.library, so torch.compile keeps it in its graph (with
    sparse_grad the backward, whose output is sparse, falls back to eager).
    """
    use_triton = _use_triton(backend, weight_grad, weight, indices, per_sample_weights)
    in_range = f"embedding_bag: indices must lie in [0, {weight.shape[0]})"
    if indices.is_cuda or torch.compiler.is_compiling():  # checked on the device: no host sync, no graph break
        torch._assert_async(((indices >= 0) & (indices < weight.shape[0])).all(), in_range)
    elif indices.numel() and not 0 <= indices.min() <= indices.max() < weight.shape[0]:
        raise ValueError(in_range)
    return _bag_op(weight, indices, per_sample_weights, use_triton, weight_grad, sparse_grad)


def embedding_bag_row_grad(indices, per_sample_weights, grad_out, backend="auto", weight_grad="deterministic"):
    """Table gradient restricted to the rows the bag read, without any (N, dim) tensor.

    Returns (rows (U,) int64 sorted ascending, grads (U, dim) in grad_out's dtype): the touched rows of
    embedding_bag's dense weight gradient (its other rows are zero) for the same inputs and grad_out.
    """
    use_triton = _use_triton(backend, weight_grad, grad_out, indices, per_sample_weights)
    if grad_out.shape[0] != indices.shape[0]:
        raise ValueError(f"embedding_bag_row_grad: grad_out {tuple(grad_out.shape)} must be (tokens, dim) "
                         f"for indices {tuple(indices.shape)}")
    if use_triton and weight_grad == "atomic":
        rows, slots = torch.unique(indices.long(), return_inverse=True)
        return rows, _scatter_add(slots, per_sample_weights, grad_out, len(rows)).to(grad_out.dtype)
    pairs = _pairs_by_row(indices, per_sample_weights)
    return pairs.rows, _bag(grad_out, pairs.tokens, pairs.weights, pairs.offsets, use_triton)


def _use_triton(backend, weight_grad, table, indices, per_sample_weights):
    """Validate the call and pick the backend: a clear error rather than a wrong answer."""
    if backend not in BACKENDS:
        raise ValueError(f"embedding_bag: unknown backend {backend!r}, expected one of {BACKENDS}")
    if weight_grad not in WEIGHT_GRADS:
        raise ValueError(f"embedding_bag: unknown weight_grad {weight_grad!r}, expected one of {WEIGHT_GRADS}")
    if indices.dim() != 2 or indices.shape != per_sample_weights.shape or table.dim() != 2 or not indices.shape[1]:
        raise ValueError(f"embedding_bag: indices {tuple(indices.shape)} and per_sample_weights "
                         f"{tuple(per_sample_weights.shape)} must both be (tokens, bag >= 1), the table 2-D")
    if indices.dtype not in (torch.int32, torch.int64) or not per_sample_weights.is_floating_point():
        raise ValueError(f"embedding_bag: indices must be int32/int64 and weights float, got "
                         f"{indices.dtype} and {per_sample_weights.dtype}")
    if not table.device == indices.device == per_sample_weights.device:
        raise ValueError(f"embedding_bag: tensors on different devices: {table.device}, {indices.device}, "
                         f"{per_sample_weights.device}")
    if backend == "auto":
        return triton is not None and table.is_cuda and table.dtype in TRITON_DTYPES
    if backend == "torch":
        return False
    if triton is None:
        raise ValueError("embedding_bag: backend='triton' but Triton is not installed")
    if table.dtype not in TRITON_DTYPES:
        raise ValueError(f"embedding_bag: the Triton backend takes tables in {TRITON_DTYPES}, got {table.dtype}")
    if not (table.is_cuda or (table.device.type == "cpu" and _INTERPRETED)):
        raise ValueError(f"embedding_bag: backend='triton' runs on CUDA, or on CPU with TRITON_INTERPRET=1 set "
                         f"before kernels is imported; got {table.device}")
    return True


@torch.library.custom_op("memory_layers::embedding_bag", mutates_args=())
def _bag_op(weight: torch.Tensor, indices: torch.Tensor, per_sample_weights: torch.Tensor, use_triton: bool,
            weight_grad: str, sparse_grad: bool) -> torch.Tensor:
    if not use_triton:
        return F.embedding_bag(indices, weight, per_sample_weights=per_sample_weights.to(weight.dtype), mode="sum")
    tokens, bag = indices.shape
    offsets = torch.arange(0, tokens * bag + 1, bag, device=indices.device)
    return _bag(weight, indices, per_sample_weights, offsets, True)


@_bag_op.register_fake
def _(weight, indices, per_sample_weights, use_triton, weight_grad, sparse_grad):
    return weight.new_empty(indices.shape[0], weight.shape[1])


@torch.library.custom_op("memory_layers::embedding_bag_backward", mutates_args=())
def _bag_backward_op(weight: torch.Tensor, indices: torch.Tensor, per_sample_weights: torch.Tensor,
                     grad_out: torch.Tensor, use_triton: bool, weight_grad: str, need_weight: bool,
                     need_psw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense table gradient, per-sample weight gradient), each empty when not needed."""
    grad_weight, grad_psw = weight.new_empty(0), per_sample_weights.new_empty(0)
    pairs = None
    if need_weight and use_triton and weight_grad == "atomic":
        grad_weight = _dense_atomic_grad(weight, indices, per_sample_weights, grad_out)
    elif need_weight or (need_psw and not use_triton):
        pairs = _pairs_by_row(indices, per_sample_weights, weight.shape[0])
        if need_weight:
            grad_weight = _bag(grad_out, pairs.tokens, pairs.weights, pairs.offsets, use_triton)
    if need_psw:
        grad_psw = _psw_grad(weight, indices, grad_out, use_triton, pairs).to(per_sample_weights.dtype)
    return grad_weight, grad_psw


@_bag_backward_op.register_fake
def _(weight, indices, per_sample_weights, grad_out, use_triton, weight_grad, need_weight, need_psw):
    return (weight.new_empty(weight.shape if need_weight else 0),
            per_sample_weights.new_empty(per_sample_weights.shape if need_psw else 0))


def _sparse_backward(weight, indices, per_sample_weights, grad_out, use_triton, weight_grad, need_psw):
    """(table gradient as a coalesced sparse COO tensor of the rows read, per-sample weight gradient)."""
    if use_triton:
        rows, grads = embedding_bag_row_grad(indices, per_sample_weights, grad_out, "triton", weight_grad)
        pairs = None
    else:  # one sort serves both gradients
        pairs = _pairs_by_row(indices, per_sample_weights, weight.shape[0])
        rows = pairs.offsets.diff().nonzero().squeeze(1)
        offsets = torch.cat([pairs.offsets[rows], pairs.offsets[-1:]])
        grads = _bag(grad_out, pairs.tokens, pairs.weights, offsets, False)
    grad_weight = torch.sparse_coo_tensor(rows.unsqueeze(0), grads.to(weight.dtype), weight.shape,
                                          is_coalesced=True, check_invariants=False)
    grad_psw = _psw_grad(weight, indices, grad_out, use_triton, pairs) if need_psw else None
    return grad_weight, grad_psw


def _psw_grad(weight, indices, grad_out, use_triton, pairs):
    if use_triton:
        return _pair_dots(weight, indices, grad_out)
    return _torch_pair_dots(weight, indices, grad_out, pairs)


def _setup_context(ctx, inputs, output):
    weight, indices, per_sample_weights, ctx.use_triton, ctx.weight_grad, ctx.sparse_grad = inputs
    ctx.save_for_backward(weight, indices, per_sample_weights)


def _backward(ctx, grad_out):
    weight, indices, per_sample_weights = ctx.saved_tensors
    need_weight, _, need_psw = ctx.needs_input_grad[:3]
    if need_weight and ctx.sparse_grad:
        grad_weight, grad_psw = _sparse_backward(weight, indices, per_sample_weights, grad_out, ctx.use_triton,
                                                 ctx.weight_grad, need_psw)
    else:
        grad_weight, grad_psw = _bag_backward_op(weight, indices, per_sample_weights, grad_out, ctx.use_triton,
                                                 ctx.weight_grad, need_weight, need_psw)
    return (grad_weight if need_weight else None), None, (grad_psw if need_psw else None), None, None, None


_bag_op.register_autograd(_backward, setup_context=_setup_context)


class _PairsByRow(NamedTuple):
    """The (token, slot) pairs sorted by (row, token-slot): bag b holds pairs offsets[b]:offsets[b+1]."""
    rows: Optional[torch.Tensor]  # the row of each bag; None when bag b is row b
    order: torch.Tensor  # flat (token * bag + slot) position of each sorted pair
    tokens: torch.Tensor
    weights: torch.Tensor
    offsets: torch.Tensor


def _pairs_by_row(indices, per_sample_weights, num_rows=None):
    """Invert token -> row with one stable sort ("reverse indices").

    num_rows=None: one bag per touched row; else one bag per table row, empty for rows no token read,
    so a bag over them is the dense gradient, zero rows included, in one pass.
    """
    rows_sorted, order = torch.sort(indices.reshape(-1), stable=True)  # int32 sorts ~1.6x faster than int64
    if num_rows is None:
        rows, counts = torch.unique_consecutive(rows_sorted, return_counts=True)
        rows = rows.long()
    else:
        rows, counts = None, torch.bincount(rows_sorted, minlength=num_rows)
    return _PairsByRow(rows, order, order // indices.shape[1], per_sample_weights.reshape(-1)[order],
                       F.pad(counts.cumsum(0), (1, 0)))


def _bag(table, indices, weights, offsets, use_triton):
    """Bag b sums weights[p] * table[indices[p]] over p in [offsets[b], offsets[b+1]); table's dtype."""
    indices, weights = indices.reshape(-1), weights.reshape(-1)
    if not use_triton:
        return F.embedding_bag(indices, table, offsets, mode="sum", include_last_offset=True,
                               per_sample_weights=weights.to(table.dtype))
    out = torch.empty(len(offsets) - 1, table.shape[1], dtype=table.dtype, device=table.device)
    block_k, block_d = _blocks(table)
    grid = (out.shape[0], triton.cdiv(table.shape[1], block_d))
    _bag_kernel[grid](table, *table.stride(), indices, weights, offsets, out, table.shape[1],
                      BLOCK_K=block_k, BLOCK_D=block_d)
    return out


def _pair_dots(weight, indices, grad_out):
    """Per-sample weight gradient (tokens, bag) in fp32: dot(grad_out[t], weight[indices[t, j]])."""
    out = torch.empty(indices.shape, dtype=torch.float32, device=weight.device)
    block_k, block_d = _blocks(weight)
    grid = (indices.shape[0], triton.cdiv(indices.shape[1], block_k))
    _pair_dot_kernel[grid](weight, *weight.stride(), indices.contiguous(), grad_out, *grad_out.stride(), out,
                           indices.shape[1], weight.shape[1], BLOCK_K=block_k, BLOCK_D=block_d)
    return out


def _scatter_add(slots, per_sample_weights, grad_out, num_slots):
    """(num_slots, dim) fp32: out[slots[t, j]] += w[t, j] * grad_out[t], with fp32 atomics."""
    out = torch.zeros(num_slots, grad_out.shape[1], dtype=torch.float32, device=grad_out.device)
    block_k, block_d = _blocks(grad_out)
    grid = (slots.shape[0], triton.cdiv(grad_out.shape[1], block_d))
    _scatter_add_kernel[grid](slots.contiguous(), per_sample_weights.contiguous(), grad_out, *grad_out.stride(),
                              out, slots.shape[1], grad_out.shape[1], BLOCK_K=block_k, BLOCK_D=block_d)
    return out


def _dense_atomic_grad(weight, indices, per_sample_weights, grad_out):
    """Dense table gradient by atomics: straight into (N, dim) for fp32 tables; half-precision tables
    accumulate their touched rows in fp32, then scatter (no (N, dim) fp32 buffer)."""
    if weight.dtype == torch.float32:
        return _scatter_add(indices, per_sample_weights, grad_out, weight.shape[0])
    rows, grads = embedding_bag_row_grad(indices, per_sample_weights, grad_out, "triton", "atomic")
    return grads.new_zeros(weight.shape).index_copy_(0, rows, grads)


def _torch_pair_dots(weight, indices, grad_out, pairs):
    """Per-sample weight gradient with PyTorch ops: dot(grad_out[t], weight[indices[t, j]]).

    On CPU (fp32/fp64) a sampled matmul over the row-sorted pairs streams each touched row once and
    never builds the (tokens, bag, dim) gather (measured 18 ms against 300 ms for gather + bmm at
    4096 x 128 pairs, dim 256); other devices and dtypes gather.
    """
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.float64):
        return torch.bmm(weight[indices], grad_out.unsqueeze(2)).squeeze(2)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the one op used here is tested
        warnings.simplefilter("ignore", UserWarning)
        values = torch.zeros_like(pairs.weights, dtype=weight.dtype)  # beta=0 still adds 0 * values: NaN stays
        pattern = torch.sparse_csr_tensor(pairs.offsets, pairs.tokens, values, (weight.shape[0], len(indices)),
                                          check_invariants=False)
    dots = torch.sparse.sampled_addmm(pattern, weight, grad_out.t().to(weight.dtype), beta=0.0).values()
    return torch.empty_like(dots).index_copy_(0, pairs.order, dots).view(indices.shape)


def _blocks(table):
    """Tiles of BLOCK_K rows x BLOCK_D columns: up to 1 KiB of each row per load, 16 rows in flight
    (a guess made without a GPU to tune on)."""
    return 16, min(triton.next_power_of_2(table.shape[1]), 1024 // table.element_size())


_INTERPRETED = False
if triton is not None:
    @triton.jit
    def _bag_kernel(table, stride_row, stride_col, indices, weights, offsets, out, dim,
                    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[b, cols] = sum of weights[p] * table[indices[p], cols] over p in [offsets[b], offsets[b+1])."""
        b = tl.program_id(0).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        col_mask = cols < dim
        start = tl.load(offsets + b)
        end = tl.load(offsets + b + 1)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for p in range(start, end, BLOCK_K):
            pairs = p + tl.arange(0, BLOCK_K)
            pair_mask = pairs < end
            rows = tl.load(indices + pairs, mask=pair_mask, other=0).to(tl.int64)
            w = tl.load(weights + pairs, mask=pair_mask, other=0).to(tl.float32)
            vals = tl.load(table + rows[:, None] * stride_row + cols[None, :] * stride_col,
                           mask=pair_mask[:, None] & col_mask[None, :], other=0).to(tl.float32)
            acc += tl.sum(vals * w[:, None], axis=0)
        tl.store(out + b * dim + cols, acc.to(out.dtype.element_ty), mask=col_mask)

    @triton.jit
    def _pair_dot_kernel(table, stride_row, stride_col, indices, grad_out, stride_gt, stride_gc, out, bag, dim,
                         BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[t, j] = dot(grad_out[t], table[indices[t, j]]) for BLOCK_K slots j of token t."""
        t = tl.program_id(0).to(tl.int64)
        slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        slot_mask = slots < bag
        rows = tl.load(indices + t * bag + slots, mask=slot_mask, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d in range(0, dim, BLOCK_D):
            cols = (d + tl.arange(0, BLOCK_D)).to(tl.int64)
            col_mask = cols < dim
            g = tl.load(grad_out + t * stride_gt + cols * stride_gc, mask=col_mask, other=0).to(tl.float32)
            vals = tl.load(table + rows[:, None] * stride_row + cols[None, :] * stride_col,
                           mask=slot_mask[:, None] & col_mask[None, :], other=0).to(tl.float32)
            acc += tl.sum(vals * g[None, :], axis=1)
        tl.store(out + t * bag + slots, acc, mask=slot_mask)

    @triton.jit
    def _scatter_add_kernel(slots, weights, grad_out, stride_gt, stride_gc, out, bag, dim,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[slots[t, j], cols] += weights[t, j] * grad_out[t, cols], fp32 atomics, for every slot j."""
        t = tl.program_id(0).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        col_mask = cols < dim
        g = tl.load(grad_out + t * stride_gt + cols * stride_gc, mask=col_mask, other=0).to(tl.float32)
        for k in range(0, bag, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            k_mask = ks < bag
            s = tl.load(slots + t * bag + ks, mask=k_mask, other=0).to(tl.int64)
            w = tl.load(weights + t * bag + ks, mask=k_mask, other=0).to(tl.float32)
            tl.atomic_add(out + s[:, None] * dim + cols[None, :], w[:, None] * g[None, :],
                          mask=k_mask[:, None] & col_mask[None, :], sem="relaxed")

    from triton.runtime.interpreter import InterpretedFunction
    _INTERPRETED = isinstance(_bag_kernel, InterpretedFunction)
