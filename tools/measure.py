"""Timing primitives shared by tools/bench.py's micro-benchmarks and tools/bench_gpu.py's report: the best of
repeated calls (CUDA events on a GPU), the copy bandwidth that is the roofline, the embedding bag at a shape
against PyTorch's op, one memory layer's forward and backward."""
import contextlib
import os
import platform
import time

import torch
import torch.nn.functional as F

import kernels

SHAPES = {  # name: (tokens, bag, rows N, dim)
    "cpu-target": (4096, 128, 2**18, 256),  # the CPU target: backward <= 3x forward
    "paper-4k": (4096, 128, 2**20, 2048),  # paper: 4 heads x knn 32 per token, 1M values, 1.3B model dim
    "paper-32k": (32768, 128, 2**20, 2048),
    "official": (4096, 10, 2**20, 4096),  # the official repo's kernel benchmark (16 GiB fp32 table on CPU)
    "official-small": (4096, 10, 2**16, 4096),  # the same with N cut to fit a small CPU machine
}


def pytorch_embedding_bag(weight, indices, weights):
    """The baseline: PyTorch's op (per-sample weights must share the table's dtype)."""
    return F.embedding_bag(indices, weight, per_sample_weights=weights.to(weight.dtype), mode="sum")


def kernel_backends(device, dtype):
    """name -> op(weight, indices, weights) for a table of dtype; Triton only on CUDA (the CPU interpreter is
    ~10^4x slower), its atomics only for an fp32 table (other gradients are summed in sorted order)."""
    backends = {"F.embedding_bag": pytorch_embedding_bag,
                "torch": lambda *a: kernels.embedding_bag(*a, backend="torch")}
    if device.type == "cuda" and kernels.triton is not None:
        backends["triton"] = lambda *a: kernels.embedding_bag(*a, backend="triton")
        if dtype == torch.float32:
            backends["triton-atomic"] = lambda *a: kernels.embedding_bag(*a, backend="triton", weight_grad="atomic")
    return backends


def best_ms(fn, device, reps, prepare=lambda: None):
    """Best time of fn(prepare()) over reps calls after a warm-up (other processes only add time);
    prepare is not timed."""
    times = []
    for _ in range(reps + 1):
        arg = prepare()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn(arg)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn(arg)
            times.append((time.perf_counter() - start) * 1e3)
    return min(times[1:])


def copy_gbps(device, nbytes, reps):
    """Bandwidth of a plain device copy (bytes read + written per second): the roofline."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    return 2 * nbytes / best_ms(lambda _: dst.copy_(src), device, reps) / 1e6


def bench_shape(name, shape, dtype, device, backends, reps, copy):
    """Forward and backward timings of every backend at one shape, as result dicts."""
    tokens, bag, num_rows, dim = shape
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(num_rows, dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    indices = torch.randint(0, num_rows, (tokens, bag), device=device, generator=gen, dtype=torch.int32)  # as the model
    weights = torch.rand(tokens, bag, device=device, generator=gen).requires_grad_()
    grad_out = torch.randn(tokens, dim, device=device, dtype=dtype, generator=gen)
    s = weight.element_size()
    fwd_bytes = (tokens * bag + tokens) * dim * s
    bwd_bytes = (tokens * bag + tokens + num_rows) * dim * s
    results = []
    for backend, op in backends.items():
        def forward():
            weight.grad = weights.grad = None
            return op(weight, indices, weights)
        fwd_ms = best_ms(lambda _: forward(), device, reps)
        bwd_ms = best_ms(lambda out: out.backward(grad_out), device, reps, prepare=forward)
        weight.grad = weights.grad = None
        results.append(dict(shape=name, tokens=tokens, bag=bag, rows=num_rows, dim=dim, backend=backend,
                            fwd_ms=fwd_ms, bwd_ms=bwd_ms, bwd_over_fwd=bwd_ms / fwd_ms,
                            fwd_gbps=fwd_bytes / fwd_ms / 1e6, bwd_gbps=bwd_bytes / bwd_ms / 1e6,
                            fwd_pct_copy=100 * fwd_bytes / fwd_ms / 1e6 / copy,
                            bwd_pct_copy=100 * bwd_bytes / bwd_ms / 1e6 / copy))
    base = next((r for r in results if r["backend"] == "F.embedding_bag"), None)
    for r in results:
        r["fwd_speedup"] = base and base["fwd_ms"] / r["fwd_ms"]
        r["bwd_speedup"] = base and base["bwd_ms"] / r["bwd_ms"]
    return results


def machine(device):
    """The card's name, or the CPU's model and the threads PyTorch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads"


def layer_step(kind, dim, tokens, num_values, device, reps, dtype=None):
    """Best ms of one forward+backward of a memory layer ("memory", "memory-sparse") or of the dense FFN,
    and the process's peak memory in MB (run in a fresh process); dtype: under that autocast."""
    from memory import ValueTable
    from model import FFN_KINDS, GPTConfig, SwiGLU
    from optim import RowAdamW
    torch.manual_seed(0)
    device = torch.device(device)
    # the blocks as model.py builds them; the dense FFN's config lists no memory layer, so its mem_n_keys goes unread
    config = GPTConfig(n_embd=dim, n_head=1, n_layer=1, memory_layers=() if kind == "dense" else (0,),
                       mem_n_keys=round(num_values ** 0.5), mem_heads=4, mem_knn=32)
    layer = (SwiGLU if kind == "dense" else FFN_KINDS["memory_layers"]).from_config(config).to(device)
    values = ValueTable(*layer.table_shape()).to(device) if "values" in layer.reads else None
    if kind == "memory-sparse":  # the table's gradient as RowAdamW takes it (the optimizer never steps here)
        RowAdamW(values.parameters(), compile=False)
    x = torch.randn(tokens, dim, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    reads = {"values": values} if values else {}  # what the block's forward takes besides x (Block hands it the same)

    def step(_):
        for p in list(layer.parameters()) + ([values.weight] if values else []):
            p.grad = None
        with autocast:
            out = layer(x, **reads)
        out.float().square().mean().backward()
    ms = best_ms(step, device, reps)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
            __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return ms, peak
