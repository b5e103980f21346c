"""The embedding bag behind every memory read: out[t] = sum_j w[t, j] * weight[idx[t, j]].

`embedding_bag` is the differentiable op; `embedding_bag_row_grad` gives the table gradient of only the
rows a batch read. Two backends sit behind one call:

- "triton": our kernels (CUDA; on CPU only under Triton's interpreter, TRITON_INTERPRET=1 set before
  this module is imported). Masked tiles over dim (any dim), int64 addresses, fp32 accumulation.
- "torch": PyTorch ops on any device. Its backward inverts token -> row once (a sort) and reuses
  F.embedding_bag, whose CPU backward is otherwise many times slower than its forward.

Table gradient strategies (`weight_grad`), both touching only the rows read:
- "deterministic" (default): sort the (row, token-slot) pairs, then each row sums its contributors in
  a fixed order ("reverse indices"): bitwise reproducible, no atomics on data.
- "atomic": for a dense fp32 gradient, each (token, slot) pair adds into its row with fp32 atomics: no
  sort, run-to-run order varies. Triton only; every other case reduces in sorted order.

No host syncs: the forward and both backward ops size every tensor from shapes alone (the rows read are
found by a sort and padded to a bound known without the data, see _touched_rows), so a CUDA stream never
waits for the host and torch.compile keeps a memory layer in one graph (the tests trace them and check
that no size or value in the graph is data-dependent). On the CPU, where a sync costs nothing, the sparse
gradient holds exactly the rows read; embedding_bag_row_grad, which returns exactly those rows, syncs
everywhere.

Tiles: BLOCK_K rows x BLOCK_D columns per program (_blocks). MEMORY_KERNELS_AUTOTUNE=1 in the environment
(read at import; CUDA only, never under the interpreter) autotunes BLOCK_K, BLOCK_D and num_warps instead,
per dim and dtypes, over a small space that holds the default. tools/kernel_builds.py compiles every kernel for
real GPUs without one and reports registers, spills and 128-bit loads.
"""
import contextlib
import os
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch backend serves everything
    triton = None

BACKENDS = ("auto", "triton", "torch")
WEIGHT_GRADS = ("deterministic", "atomic")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AUTOTUNE = os.environ.get("MEMORY_KERNELS_AUTOTUNE") == "1"
GATHER_BYTES = 2**28  # rows gathered at a time by the torch backend's per-sample-weight gradient off the CPU


def embedding_bag(weight, indices, per_sample_weights, backend="auto", weight_grad="deterministic",
                  sparse_grad=False, read=None, grad_into=None):
    """Weighted sum of rows. weight (N, dim); indices (tokens, bag) int32/int64; per_sample_weights (tokens, bag)
    any float dtype.

    Returns (tokens, dim) in the dtype of the table read, differentiable in weight and per_sample_weights. The
    table gradient is dense (N, dim), or with sparse_grad a sparse COO tensor of the rows read (on the CPU
    exactly those rows, coalesced; elsewhere and under torch.compile min(tokens * bag, N) rows, the rows read
    in ascending order then repeats of the last one with zero gradients, uncoalesced: counting the rows would
    sync the host). read: a copy of weight in a narrower dtype to read instead (an fp32 master's copy under
    autocast, say): the output is in read's dtype, weight's gradient in weight's dtype, accumulated in fp32 and
    never rounded to read's. grad_into: a contiguous dense tensor of weight's shape, dtype and device (not
    with sparse_grad): the backward adds weight's gradient into it in place, touching only the rows read, and
    autograd gets none for weight (its hooks still run; torch.autograd.grad finds none): many reads then share
    one gradient, never an (N, dim) tensor each. backend: "auto" (Triton for CUDA tensors when Triton is
    installed, PyTorch otherwise), "triton" or "torch". weight_grad: "deterministic" or "atomic" (see the
    module docstring). The op and its backward are registered with torch.library, so torch.compile keeps
    them in its graph.
    """
    table = weight if read is None else read
    if table.shape != weight.shape or table.device != weight.device:
        raise ValueError(f"embedding_bag: read {tuple(table.shape)} on {table.device} must match weight "
                         f"{tuple(weight.shape)} on {weight.device}")
    use_triton = _use_triton(backend, weight_grad, table, indices, per_sample_weights)
    if grad_into is not None and (sparse_grad or grad_into.layout != torch.strided or not grad_into.is_contiguous()
                                  or (grad_into.shape, grad_into.dtype, grad_into.device)
                                  != (weight.shape, weight.dtype, weight.device)):
        raise ValueError(f"embedding_bag: grad_into must be a contiguous dense {tuple(weight.shape)} {weight.dtype} "
                         f"tensor on {weight.device} like weight, and sparse_grad off")
    in_range = f"embedding_bag: indices must lie in [0, {weight.shape[0]})"
    if _sync_free(indices):  # checked on the device: no host sync, no graph break
        torch._assert_async(((indices >= 0) & (indices < weight.shape[0])).all(), in_range)
    elif indices.numel() and not 0 <= indices.min() <= indices.max() < weight.shape[0]:
        raise ValueError(in_range)
    return _bag_op(weight, table, indices, per_sample_weights, use_triton, weight_grad, sparse_grad, grad_into)


def embedding_bag_row_grad(indices, per_sample_weights, grad_out, backend="auto", weight_grad="deterministic"):
    """Table gradient restricted to the rows the bag read, without any (N, dim) tensor.

    Returns (rows (U,) int64 sorted ascending, grads (U, dim) in grad_out's dtype): the touched rows of
    embedding_bag's dense weight gradient (its other rows are zero) for the same inputs and grad_out.
    U is read on the host (a sync on CUDA). weight_grad is validated; the rows are always reduced in
    sorted order.
    """
    use_triton = _use_triton(backend, weight_grad, grad_out, indices, per_sample_weights)
    if grad_out.shape[0] != indices.shape[0]:
        raise ValueError(f"embedding_bag_row_grad: grad_out {tuple(grad_out.shape)} must be (tokens, dim) "
                         f"for indices {tuple(indices.shape)}")
    rows, grads, _ = _row_grads(indices, per_sample_weights, grad_out, None, use_triton, grad_out.dtype)
    return rows, grads


def _sync_free(t):
    """Whether the host must not wait for t's values: off the CPU, and while torch.compile traces (t is fake
    then: torch 2.11's is_compiling() is False while it traces a backward)."""
    return t.device.type != "cpu" or torch.compiler.is_compiling() or is_fake(t)


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
def _bag_op(weight: torch.Tensor, table: torch.Tensor, indices: torch.Tensor, per_sample_weights: torch.Tensor,
            use_triton: bool, weight_grad: str, sparse_grad: bool, grad_into: Optional[torch.Tensor]) -> torch.Tensor:
    """The forward reads `table` (weight itself, or its narrower copy); gradients go to weight, or grad_into."""
    if not use_triton:
        return F.embedding_bag(indices, table, per_sample_weights=per_sample_weights.to(table.dtype), mode="sum")
    tokens, bag = indices.shape
    offsets = torch.arange(0, tokens * bag + 1, bag, device=indices.device)
    return _bag(table, indices, per_sample_weights, offsets, True, table.dtype)


@_bag_op.register_fake
def _(weight, table, indices, per_sample_weights, use_triton, weight_grad, sparse_grad, grad_into):
    return table.new_empty(indices.shape[0], table.shape[1])


def _dense_backward(grad_into: Optional[torch.Tensor], table: torch.Tensor, indices: torch.Tensor,
                    per_sample_weights: torch.Tensor, grad_out: torch.Tensor, use_triton: bool, weight_grad: str,
                    grad_dtype: torch.dtype, need_weight: bool, need_psw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense table gradient in grad_dtype, per-sample weight gradient), each empty when not needed. With
    grad_into the table gradient is added into it in place instead (touching the rows read only)."""
    grad_weight, grad_psw = grad_out.new_empty(0, dtype=grad_dtype), per_sample_weights.new_empty(0)
    atomic = use_triton and weight_grad == "atomic" and grad_dtype == torch.float32
    row_bags = need_weight and grad_into is None and not use_triton  # a bag per table row: no zero fill
    pairs = row_offsets = None
    if (need_weight and not atomic) or (need_psw and not use_triton):
        pairs = _sort_pairs(indices, per_sample_weights)
    if row_bags or (need_psw and not use_triton):
        row_offsets = _row_offsets(pairs, table.shape[0])
    if row_bags:  # empty bags for the rows nobody read
        grad_weight = _bag(grad_out, pairs.tokens, pairs.weights, row_offsets, False, grad_dtype)
    elif need_weight:
        if grad_into is None:
            grad_weight = grad_into = torch.zeros(table.shape, dtype=grad_dtype, device=grad_out.device)
        if atomic:
            _scatter_add(indices, per_sample_weights, grad_out, grad_into)
        else:  # each row read once, added to its row
            num_bags = min(indices.numel(), table.shape[0]) if _sync_free(indices) else None
            rows, offsets = _touched_rows(pairs, num_bags)
            _bag(grad_out, pairs.tokens, pairs.weights, offsets, use_triton, grad_dtype, into=(grad_into, rows))
    if need_psw:
        grad_psw = _psw_grad(table, indices, grad_out, use_triton, pairs, row_offsets).to(per_sample_weights.dtype)
    return grad_weight, grad_psw


def _row_backward(table: torch.Tensor, indices: torch.Tensor, per_sample_weights: torch.Tensor,
                  grad_out: torch.Tensor, use_triton: bool, grad_dtype: torch.dtype, need_psw: bool,
                  exact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, grads, per-sample weight gradient or empty): the table gradient of the rows read, exactly
    those rows (their count read on the host) or padded to min(tokens * bag, N) rows (see _touched_rows)."""
    num_bags = None if exact else min(indices.numel(), table.shape[0])
    rows, grads, pairs = _row_grads(indices, per_sample_weights, grad_out, num_bags, use_triton, grad_dtype)
    grad_psw = (_psw_grad(table, indices, grad_out, use_triton, pairs).to(per_sample_weights.dtype) if need_psw
                else per_sample_weights.new_empty(0))
    return rows, grads, grad_psw


_dense_backward_op = torch.library.custom_op("memory_layers::embedding_bag_backward", _dense_backward,
                                             mutates_args=("grad_into",))
_row_backward_op = torch.library.custom_op("memory_layers::embedding_bag_row_backward", _row_backward,
                                           mutates_args=())


@_dense_backward_op.register_fake
def _(grad_into, table, indices, per_sample_weights, grad_out, use_triton, weight_grad, grad_dtype, need_weight,
      need_psw):
    fresh = need_weight and grad_into is None
    return (grad_out.new_empty(table.shape if fresh else 0, dtype=grad_dtype),
            per_sample_weights.new_empty(per_sample_weights.shape if need_psw else 0))


@_row_backward_op.register_fake
def _(table, indices, per_sample_weights, grad_out, use_triton, grad_dtype, need_psw, exact):
    num_bags = torch.library.get_ctx().new_dynamic_size() if exact else min(indices.numel(), table.shape[0])
    return (indices.new_empty(num_bags, dtype=torch.int64),
            grad_out.new_empty(num_bags, table.shape[1], dtype=grad_dtype),
            per_sample_weights.new_empty(per_sample_weights.shape if need_psw else 0))


def _setup_context(ctx, inputs, output):
    weight, table, indices, per_sample_weights, ctx.use_triton, ctx.weight_grad, ctx.sparse_grad, grad_into = inputs
    ctx.grad_dtype = weight.dtype
    ctx.grad_into = grad_into  # not saved: each read's backward changes it, which saved tensors refuse
    ctx.save_for_backward(table, indices, per_sample_weights)


def _backward(ctx, grad_out):
    table, indices, per_sample_weights = ctx.saved_tensors
    need_weight, _, _, need_psw = ctx.needs_input_grad[:4]
    if need_weight and ctx.sparse_grad:
        exact = not _sync_free(indices)
        rows, grads, grad_psw = _row_backward_op(table, indices, per_sample_weights, grad_out, ctx.use_triton,
                                                 ctx.grad_dtype, need_psw, exact)
        grad_weight = torch.sparse_coo_tensor(rows.unsqueeze(0), grads, table.shape, is_coalesced=exact,
                                              check_invariants=False)
    else:
        grad_weight, grad_psw = _dense_backward_op(ctx.grad_into, table, indices, per_sample_weights, grad_out,
                                                   ctx.use_triton, ctx.weight_grad, ctx.grad_dtype, need_weight,
                                                   need_psw)
        if ctx.grad_into is not None:
            grad_weight = None  # added into grad_into
    return ((grad_weight if need_weight else None), None, None, (grad_psw if need_psw else None), None, None, None,
            None)


_bag_op.register_autograd(_backward, setup_context=_setup_context)


class _Pairs(NamedTuple):
    """The (token, slot) pairs sorted by row, stably (so by token and slot within a row)."""
    rows: torch.Tensor  # (P,) the row each pair reads, ascending, in indices' dtype
    order: torch.Tensor  # (P,) its flat token * bag + slot position
    tokens: torch.Tensor  # (P,) its token
    weights: torch.Tensor  # (P,) its per-sample weight


def _sort_pairs(indices, per_sample_weights):
    """Invert token -> row with one stable sort ("reverse indices")."""
    rows, order = torch.sort(indices.reshape(-1), stable=True)  # int32 sorts faster than int64
    return _Pairs(rows, order, order // indices.shape[1], per_sample_weights.reshape(-1)[order])


def _row_offsets(pairs, num_rows):
    """Bag b = the pairs of table row b, empty for rows nobody read: (num_rows + 1,) offsets."""
    rows = torch.arange(num_rows + 1, dtype=pairs.rows.dtype, device=pairs.rows.device)
    return torch.searchsorted(pairs.rows, rows)


def _touched_rows(pairs, num_bags=None):
    """Bag b = the pairs of the b-th distinct row read: (rows (num_bags,) int64, offsets (num_bags + 1,)).

    num_bags: None for exactly the distinct rows, counted on the host (a sync on CUDA); or a bound on them
    known without the data (min(pairs, N)): bags past the distinct rows are empty and repeat the last row
    read, so they add nothing to it wherever they are summed.
    """
    first = torch.ones_like(pairs.rows, dtype=torch.bool)
    first[1:] = pairs.rows[1:] != pairs.rows[:-1]
    bag_of_pair = first.cumsum(0) - 1
    num_bags = int(first.sum()) if num_bags is None else num_bags
    offsets = torch.searchsorted(bag_of_pair, torch.arange(num_bags + 1, device=first.device))
    return pairs.rows[offsets[:-1].clamp(max=len(first) - 1)].long(), offsets


def _row_grads(indices, per_sample_weights, grad_out, num_bags, use_triton, dtype):
    """(rows, grads in dtype, pairs): _touched_rows' bags of grad_out, fp32 accumulation."""
    pairs = _sort_pairs(indices, per_sample_weights)
    rows, offsets = _touched_rows(pairs, num_bags)
    return rows, _bag(grad_out, pairs.tokens, pairs.weights, offsets, use_triton, dtype), pairs


def _bag(table, indices, weights, offsets, use_triton, dtype, into=None):
    """Bag b sums weights[p] * table[indices[p]] over p in [offsets[b], offsets[b+1]), as a new (bags, dim)
    tensor in dtype; into=(out, rows) adds bag b to out[rows[b]] instead (out contiguous, in dtype)."""
    indices, weights = indices.reshape(-1), weights.reshape(-1)
    if not use_triton:  # grad_out is cast, not the sums: a half-precision grad_out still sums in fp32
        sums = F.embedding_bag(indices, table.to(dtype), offsets, mode="sum", include_last_offset=True,
                               per_sample_weights=weights.to(dtype))
        return sums if into is None else into[0].index_add_(0, into[1], sums)
    bags, dim = len(offsets) - 1, table.shape[1]
    out, rows = into or (torch.empty(bags, dim, dtype=dtype, device=table.device), None)
    _launch(_bag_kernel, lambda meta: (bags, triton.cdiv(dim, meta["BLOCK_D"])), table,
            table, *table.stride(), indices, weights, offsets, out, rows, dim, SCATTER=into is not None)
    return out


def _psw_grad(table, indices, grad_out, use_triton, pairs, row_offsets=None):
    if use_triton:
        return _pair_dots(table, indices, grad_out)
    return _torch_pair_dots(table, indices, grad_out, pairs, row_offsets)


def _pair_dots(table, indices, grad_out):
    """Per-sample weight gradient (tokens, bag) in fp32: dot(grad_out[t], table[indices[t, j]])."""
    out = torch.empty(indices.shape, dtype=torch.float32, device=table.device)
    tokens, bag = indices.shape
    _launch(_pair_dot_kernel, lambda meta: (tokens, triton.cdiv(bag, meta["BLOCK_K"])), table,
            table, *table.stride(), indices.contiguous(), grad_out, *grad_out.stride(), out, bag, table.shape[1])
    return out


def _scatter_add(slots, per_sample_weights, grad_out, out):
    """out (slots, dim) fp32, contiguous: out[slots[t, j]] += w[t, j] * grad_out[t], with fp32 atomics."""
    tokens, dim = grad_out.shape
    _launch(_scatter_add_kernel, lambda meta: (tokens, triton.cdiv(dim, meta["BLOCK_D"])), grad_out,
            slots.contiguous(), per_sample_weights.contiguous(), grad_out, *grad_out.stride(), out, slots.shape[1],
            dim)
    return out


def _torch_pair_dots(table, indices, grad_out, pairs, row_offsets=None):
    """Per-sample weight gradient with PyTorch ops: dot(grad_out[t], table[indices[t, j]]).

    On CPU (fp32/fp64) a sampled matmul over the row-sorted pairs streams each touched row once and
    never builds the (tokens, bag, dim) gather, which makes it much faster there than gather + bmm; other
    devices and dtypes gather, in chunks (_gathered_pair_dots).
    row_offsets: _row_offsets(pairs, N) when the caller has them.
    """
    if table.device.type != "cpu" or table.dtype not in (torch.float32, torch.float64):
        return _gathered_pair_dots(table, indices, grad_out)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the one op used here is tested
        warnings.simplefilter("ignore", UserWarning)
        values = torch.zeros_like(pairs.weights, dtype=table.dtype)  # beta=0 still adds 0 * values: NaN stays
        if row_offsets is None:
            row_offsets = _row_offsets(pairs, table.shape[0])
        pattern = torch.sparse_csr_tensor(row_offsets, pairs.tokens, values,
                                          (table.shape[0], len(indices)), check_invariants=False)
    dots = torch.sparse.sampled_addmm(pattern, table, grad_out.t().to(table.dtype), beta=0.0).values()
    return torch.empty_like(dots).index_copy_(0, pairs.order, dots).view(indices.shape)


def _gathered_pair_dots(table, indices, grad_out, chunk_bytes=GATHER_BYTES):
    """dot(grad_out[t], table[indices[t, j]]) by gathering the rows of as many tokens as fit in chunk_bytes
    at a time: the whole (tokens, bag, dim) gather is 6.4 GB per read at GPT-2 small's 16k tokens."""
    step = max(1, chunk_bytes // (indices.shape[1] * table.shape[1] * table.element_size()))
    return torch.cat([torch.bmm(table[i], g.unsqueeze(2)).squeeze(2)
                      for i, g in zip(indices.split(step), grad_out.split(step))])


def _blocks(table):
    """Tiles of BLOCK_K rows x BLOCK_D columns: up to 1 KiB of each row per load, 16 rows in flight
    (a guess made without a GPU to tune on; MEMORY_KERNELS_AUTOTUNE=1 searches around it)."""
    return 16, min(triton.next_power_of_2(table.shape[1]), 1024 // table.element_size())


def _launch(kernel, grid, tiles_for, *args, **constexprs):
    """kernel[grid](*args) with _blocks(tiles_for) tiles, or the autotuner's when it wraps the kernel, on
    tiles_for's GPU: Triton launches on the current device, which a run on cuda:1 never sets."""
    if not isinstance(kernel, triton.runtime.Autotuner):
        constexprs["BLOCK_K"], constexprs["BLOCK_D"] = _blocks(tiles_for)
    with torch.cuda.device(tiles_for.device) if tiles_for.is_cuda else contextlib.nullcontext():
        kernel[grid](*args, **constexprs)


_INTERPRETED = False
if triton is not None:
    @triton.jit
    def _bag_kernel(table, stride_row, stride_col, indices, weights, offsets, out, out_rows, dim,
                    SCATTER: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """Columns cols of bag b: sum of weights[p] * table[indices[p], cols] over p in [offsets[b], offsets[b+1]),
        stored to out[b] (SCATTER: added to out[out_rows[b]], and only for a non-empty bag).

        BLOCK_K rows are gathered and accumulated as a (BLOCK_K, BLOCK_D) tile, reduced over rows once after
        the loop, so the loads of one step never wait on a reduction of the previous one."""
        b = tl.program_id(0).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        col_mask = cols < dim
        start = tl.load(offsets + b)
        end = tl.load(offsets + b + 1)
        acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
        for p in range(start, end, BLOCK_K):
            pairs = p + tl.arange(0, BLOCK_K)
            pair_mask = pairs < end
            rows = tl.load(indices + pairs, mask=pair_mask, other=0).to(tl.int64)
            w = tl.load(weights + pairs, mask=pair_mask, other=0).to(tl.float32)
            vals = tl.load(table + rows[:, None] * stride_row + cols[None, :] * stride_col,
                           mask=pair_mask[:, None] & col_mask[None, :], other=0).to(tl.float32)
            acc += vals * w[:, None]
        total = tl.sum(acc, axis=0)
        if SCATTER:
            if end > start:
                dst = out + tl.load(out_rows + b) * dim + cols
                total += tl.load(dst, mask=col_mask, other=0).to(tl.float32)
                tl.store(dst, total.to(out.dtype.element_ty), mask=col_mask)
        else:
            tl.store(out + b * dim + cols, total.to(out.dtype.element_ty), mask=col_mask)

    @triton.jit
    def _pair_dot_kernel(table, stride_row, stride_col, indices, grad_out, stride_gt, stride_gc, out, bag, dim,
                         BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[t, j] = dot(grad_out[t], table[indices[t, j]]) for BLOCK_K slots j of token t; products
        accumulate as a (BLOCK_K, BLOCK_D) tile, reduced over columns once after the loop."""
        t = tl.program_id(0).to(tl.int64)
        slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        slot_mask = slots < bag
        rows = tl.load(indices + t * bag + slots, mask=slot_mask, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
        for d in range(0, dim, BLOCK_D):
            cols = (d + tl.arange(0, BLOCK_D)).to(tl.int64)
            col_mask = cols < dim
            g = tl.load(grad_out + t * stride_gt + cols * stride_gc, mask=col_mask, other=0).to(tl.float32)
            vals = tl.load(table + rows[:, None] * stride_row + cols[None, :] * stride_col,
                           mask=slot_mask[:, None] & col_mask[None, :], other=0).to(tl.float32)
            acc += vals * g[None, :]
        tl.store(out + t * bag + slots, tl.sum(acc, axis=1), mask=slot_mask)

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
    if AUTOTUNE and not _INTERPRETED:  # a small space around _blocks' default (16 rows, 1 KiB of a row, 4 warps)
        _CONFIGS = [triton.Config({"BLOCK_K": k, "BLOCK_D": d}, num_warps=w)
                    for k in (8, 16, 32) for d in (128, 256, 512) for w in (4, 8)]
        _bag_kernel = triton.autotune(_CONFIGS, key=["dim", "SCATTER"], restore_value=["out"])(_bag_kernel)
        _pair_dot_kernel = triton.autotune(_CONFIGS, key=["dim", "bag"])(_pair_dot_kernel)
        _scatter_add_kernel = triton.autotune(_CONFIGS, key=["dim", "bag"], restore_value=["out"])(_scatter_add_kernel)
