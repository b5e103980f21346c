"""Benchmarks, one subcommand each: `python bench.py kernels [--device cpu|cuda] [--json] ...`.

kernels: forward and backward of kernels.embedding_bag (each backend) against PyTorch's
F.embedding_bag and against the machine's copy bandwidth (a plain tensor copy timed in the same run).
Effective bandwidth counts the bytes of rows each call must move (s = bytes per table element):
  forward:  tokens*bag*dim*s rows read + tokens*dim*s output written;
  backward: tokens*bag*dim*s rows re-read (per-sample-weight gradient) + tokens*dim*s output gradient
            read + N*dim*s dense table gradient written (the layout autograd demands).
Tables are bf16 on CUDA (fp32 per-sample weights, as the memory layer passes them), fp32 on CPU.
"""
import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

import kernels

SHAPES = {  # name: (tokens, bag, rows N, dim)
    "cpu-target": (4096, 128, 2**18, 256),  # issue 3's CPU target: backward <= 3x forward
    "paper-4k": (4096, 128, 2**20, 2048),  # paper: 4 heads x knn 32 per token, 1M values, 1.3B model dim
    "paper-32k": (32768, 128, 2**20, 2048),
    "official": (4096, 10, 2**20, 4096),  # the official repo's kernel benchmark (16 GiB fp32 table on CPU)
    "official-small": (4096, 10, 2**16, 4096),  # the same with N cut to fit a small CPU machine
}
DEFAULT_SHAPES = {"cpu": "cpu-target,official-small", "cuda": "cpu-target,paper-4k,paper-32k,official"}


def pytorch_embedding_bag(weight, indices, weights):
    """The baseline: PyTorch's op (per-sample weights must share the table's dtype)."""
    return F.embedding_bag(indices, weight, per_sample_weights=weights.to(weight.dtype), mode="sum")


def kernel_backends(device):
    """name -> op(weight, indices, weights); Triton only on CUDA (the CPU interpreter is ~10^4x slower)."""
    backends = {"F.embedding_bag": pytorch_embedding_bag,
                "torch": lambda *a: kernels.embedding_bag(*a, backend="torch")}
    if device.type == "cuda" and kernels.triton is not None:
        backends["triton"] = lambda *a: kernels.embedding_bag(*a, backend="triton")
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
    indices = torch.randint(0, num_rows, (tokens, bag), device=device, generator=gen)
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


def parse_shape(text):
    """A preset name or TOKENSxBAGxROWSxDIM, e.g. 4096x128x262144x256."""
    if text in SHAPES:
        return text, SHAPES[text]
    try:
        tokens, bag, num_rows, dim = (int(v) for v in text.split("x"))
    except ValueError:
        raise SystemExit(f"bench: unknown shape {text!r}: a name in {sorted(SHAPES)} or TOKENSxBAGxROWSxDIM")
    return text, (tokens, bag, num_rows, dim)


def machine(device):
    """The card's name, or the CPU's model and the threads PyTorch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads"


def run_kernels(args):
    """The `kernels` subcommand: print a table (or JSON) of embedding-bag timings."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = kernel_backends(device)
    if args.backends:
        unknown = set(args.backends.split(",")) - set(backends)
        if unknown:
            raise SystemExit(f"bench: backends {sorted(unknown)} not available on {device}; have {list(backends)}")
        backends = {name: backends[name] for name in args.backends.split(",")}
    reps = args.reps or (10 if device.type == "cuda" else 5)
    copy = copy_gbps(device, (1 << 30) if device.type == "cuda" else (256 << 20), reps)
    results = []
    for text in (args.shapes or DEFAULT_SHAPES[device.type]).split(","):
        results += bench_shape(*parse_shape(text), dtype, device, backends, reps, copy)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header = dict(machine=machine(device), device=device.type, dtype=str(dtype).removeprefix("torch."),
                  torch=torch.__version__, copy_gbps=copy, reps=reps)
    if args.json:
        print(json.dumps(dict(header, results=results), indent=1))
        return
    print(f"{header['machine']}; {header['dtype']} table; torch {header['torch']}; best of {reps}; "
          f"copy bandwidth {copy:.1f} GB/s")
    print(f"{'shape (tokens x bag x N x dim)':<36}{'backend':<16}{'fwd ms':>9}{'GB/s':>8}{'%copy':>7}"
          f"{'bwd ms':>9}{'GB/s':>8}{'%copy':>7}{'bwd/fwd':>9}{'fwd x':>7}{'bwd x':>7}")
    for r in results:
        shape = f"{r['shape']} {r['tokens']}x{r['bag']}x{r['rows']}x{r['dim']}"
        print(f"{shape:<36}{r['backend']:<16}{r['fwd_ms']:>9.2f}{r['fwd_gbps']:>8.1f}{r['fwd_pct_copy']:>7.0f}"
              f"{r['bwd_ms']:>9.2f}{r['bwd_gbps']:>8.1f}{r['bwd_pct_copy']:>7.0f}{r['bwd_over_fwd']:>9.2f}"
              f"{r['fwd_speedup'] or float('nan'):>7.2f}{r['bwd_speedup'] or float('nan'):>7.2f}")
    print("fwd x / bwd x: speedup over F.embedding_bag at the same shape")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    k = commands.add_parser("kernels", help="embedding-bag forward/backward against F.embedding_bag")
    k.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    k.add_argument("--shapes", help=f"comma-separated names {sorted(SHAPES)} or TOKENSxBAGxROWSxDIM "
                                    f"(default cpu: {DEFAULT_SHAPES['cpu']}; cuda: {DEFAULT_SHAPES['cuda']})")
    k.add_argument("--backends", help="comma-separated subset of F.embedding_bag,torch,triton,triton-atomic")
    k.add_argument("--reps", type=int, help="timed calls per measurement (default 10 on cuda, 5 on cpu)")
    k.add_argument("--json", action="store_true", help="machine-readable output")
    k.set_defaults(run=run_kernels)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
