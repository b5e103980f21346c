"""Benchmarks, one subcommand each: `python tools/bench.py kernels|layer|train|ptx|gpu|facts|forgetting ...`.

kernels: forward and backward of kernels.embedding_bag (each backend) against PyTorch's
F.embedding_bag and against the machine's copy bandwidth (a plain tensor copy timed in the same run).
Effective bandwidth counts the bytes of rows each call must move (s = bytes per table element):
  forward:  tokens*bag*dim*s rows read + tokens*dim*s output written;
  backward: tokens*bag*dim*s rows re-read (per-sample-weight gradient) + tokens*dim*s output gradient
            read + N*dim*s dense table gradient written (the layout autograd demands).
Tables are bf16 on CUDA (fp32 per-sample weights, as the memory layer passes them), fp32 on CPU.

layer: forward+backward of one memory layer (Memory+: swilu, 4 heads, knn 32, k_dim d/2, v_dim d) at
N = 2**14 ... 2**20 values, with a dense and with a sparse (touched rows) table gradient, against the
dense SwiGLU FFN it replaces, on the same tokens. Each measurement runs in a fresh process, so its peak
memory is its own.

train: a whole training step (forward, backward, clipping, optimizer) of a config, from train.py's own
timing, at N = 2**14 ... 2**20 values, with dense AdamW and with sparse row updates (RowAdamW), and
optionally torch.compile; a fresh train.py process per measurement.

ptx: every Triton kernel compiled by Triton's own compiler for sm_80 and sm_90 on any machine, no GPU needed
(kernel_builds.gpu_builds): per build, whether it compiled, registers, spills and 128-bit global loads.

gpu: the one command to run on the first GPU at hand (`python tools/bench.py gpu`, under 6 minutes on an H100 by
estimate, see the README), its sections cheapest first: the card's copy bandwidth; the kernels at the paper's
shapes in bf16 and fp32 (int32 indices, as the model reads) against it and against F.embedding_bag; the memory
layer at GPT-2-small width against the dense FFN (bf16 autocast); --steps (30) training steps of
configs/gpt2_small_memplus.py with torch.compile on random tokens (tokens/s, MFU, peak memory), with dense and
with sparse value updates, no eval and no checkpoint. Each row goes to OUT/gpu.md and stdout as soon as it is
measured; a measurement that fails is an error row and the next one runs; --sections picks sections.
`--device=cpu` runs the same code at tiny shapes, a smoke test.

facts and forgetting: the benchmarks on the knowledge base of facts.py, in bench_facts.py and bench_forgetting.py.

Every benchmark that trains starts train.py in a fresh process and reads its log.jsonl (train_and_log).
"""
import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as `python tools/bench.py`: the repository's modules are one folder up
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import kernels
from config import pick_device
from errors import OneLineErrors, UserError
from tools import ROOT, bench_facts, bench_forgetting, kernel_builds
from tools.bench_facts import train_and_log


SHAPES = {  # name: (tokens, bag, rows N, dim)
    "cpu-target": (4096, 128, 2**18, 256),  # the CPU target: backward <= 3x forward
    "paper-4k": (4096, 128, 2**20, 2048),  # paper: 4 heads x knn 32 per token, 1M values, 1.3B model dim
    "paper-32k": (32768, 128, 2**20, 2048),
    "official": (4096, 10, 2**20, 4096),  # the official repo's kernel benchmark (16 GiB fp32 table on CPU)
    "official-small": (4096, 10, 2**16, 4096),  # the same with N cut to fit a small CPU machine
}
DEFAULT_SHAPES = {"cpu": "cpu-target,official-small", "cuda": "cpu-target,paper-4k,paper-32k,official"}


def pytorch_embedding_bag(weight, indices, weights):
    """The baseline: PyTorch's op (per-sample weights must share the table's dtype)."""
    return F.embedding_bag(indices, weight, per_sample_weights=weights.to(weight.dtype), mode="sum")


def bench_device(name):
    """--device, else cuda when there is one; a one-line error when its backend is missing (pick_device)."""
    return pick_device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def parse_shapes(text):
    """--shapes: comma-separated preset names or TOKENSxBAGxROWSxDIM (e.g. 4096x128x262144x256), each at
    least 1; a list of (name, shape), checked when the arguments are read."""
    shapes = []
    for name in text.split(","):
        try:
            shape = SHAPES.get(name) or tuple(int(v) for v in name.split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 4:
            raise argparse.ArgumentTypeError(f"unknown shape {name!r}: a name in {sorted(SHAPES)} or "
                                             "TOKENSxBAGxROWSxDIM")
        if min(shape) < 1:
            raise argparse.ArgumentTypeError(f"shape {name!r} has a size below 1: tokens, bag, rows and dim are "
                                             "each at least 1")
        shapes.append((name, shape))
    return shapes


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
    device = bench_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = kernel_backends(device, dtype)
    if args.backends:
        unknown = set(args.backends.split(",")) - set(backends)
        if unknown:
            raise UserError(f"backends {sorted(unknown)} not available on {device}; have {list(backends)}")
        backends = {name: backends[name] for name in args.backends.split(",")}
    reps = args.reps or (10 if device.type == "cuda" else 5)
    copy = copy_gbps(device, (1 << 30) if device.type == "cuda" else (256 << 20), reps)
    results = []
    for name, shape in args.shapes or parse_shapes(DEFAULT_SHAPES[device.type]):
        results += bench_shape(name, shape, dtype, device, backends, reps, copy)
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


def run_layer(args):
    """The `layer` subcommand: memory layer against dense FFN across table sizes."""
    device = bench_device(args.device).type
    reps = args.reps or (10 if device == "cuda" else 5)
    context = multiprocessing.get_context("spawn")
    rows = []
    with context.Pool(1, maxtasksperchild=1) as pool:
        dense_ms, dense_peak = pool.apply(layer_step, ("dense", args.dim, args.tokens, 0, device, reps))
        for exponent in args.exponents:
            for kind in ("memory", "memory-sparse"):
                ms, peak = pool.apply(layer_step, (kind, args.dim, args.tokens, 2**exponent, device, reps))
                rows.append(dict(values=2**exponent, kind=kind, ms=ms, tokens_per_s=args.tokens / ms * 1e3,
                                 peak_mb=peak, over_dense=ms / dense_ms))
    header = dict(machine=machine(torch.device(device)), dim=args.dim, tokens=args.tokens, reps=reps,
                  dense_ms=dense_ms, dense_peak_mb=dense_peak)
    if args.json:
        print(json.dumps(dict(header, results=rows), indent=1))
        return
    print(f"{header['machine']}; {args.tokens} tokens, d={args.dim}, 4 heads, knn 32, k_dim {args.dim // 2}; "
          f"forward+backward, best of {reps}")
    print(f"dense SwiGLU FFN: {dense_ms:.1f} ms, peak {dense_peak:,.0f} MB")
    print(f"{'values':>10}{'table grad':>12}{'ms':>9}{'tokens/s':>11}{'peak MB':>10}{'x dense':>9}")
    for r in rows:
        grad = "sparse" if r["kind"] == "memory-sparse" else "dense"
        print(f"{r['values']:>10,}{grad:>12}{r['ms']:>9.1f}{r['tokens_per_s']:>11,.0f}{r['peak_mb']:>10,.0f}"
              f"{r['over_dense']:>9.2f}")


def train_step_ms(config, overrides, iters):
    """ms per training step and peak memory (MB) of `train.py config overrides`, from its log.jsonl."""
    with tempfile.TemporaryDirectory() as out_dir:
        events, _ = train_and_log([config, f"--max_iters={2 * iters}", f"--log_interval={iters}",
                                   "--eval_interval=1000000", "--eval_iters=1", *overrides], out_dir)
    last = [e for e in events if e["event"] == "train"][-1]  # the second window: warm
    return last["ms_per_iter"], last["peak_memory_mb"], last["tokens_per_s"]


def run_train(args):
    """The `train` subcommand: whole training steps across table sizes and update rules."""
    variants = [("dense AdamW", ["--mem_sparse_update=False"]), ("RowAdamW", ["--mem_sparse_update=True"])]
    if args.compile:
        variants += [(f"{name}, compiled", flags + ["--compile=True"]) for name, flags in variants]
    rows = []
    for exponent in args.exponents:
        for name, flags in variants:
            ms, peak, tokens_per_s = train_step_ms(args.config, [f"--mem_n_keys={2 ** (exponent // 2)}", *flags,
                                                                 *args.overrides], args.iters)
            rows.append(dict(values=2 ** exponent, update=name, ms=ms, tokens_per_s=tokens_per_s, peak_mb=peak))
    for r in rows:
        smallest = next(s for s in rows if s["update"] == r["update"])
        r["over_smallest"] = r["ms"] / smallest["ms"]
    if args.json:
        print(json.dumps(dict(config=args.config, overrides=args.overrides, results=rows), indent=1))
        return
    print(f"{args.config} {' '.join(args.overrides)}: ms per training step (train.py's own timing, "
          f"iterations {args.iters + 1}-{2 * args.iters})")
    print(f"{'values':>10}  {'update':<24}{'ms/step':>9}{'tokens/s':>11}{'peak MB':>10}{'x smallest N':>14}")
    for r in rows:
        print(f"{r['values']:>10,}  {r['update']:<24}{r['ms']:>9.1f}{r['tokens_per_s']:>11,.0f}{r['peak_mb']:>10,.0f}"
              f"{r['over_smallest']:>14.2f}")


def run_ptx(args):
    """The `ptx` subcommand: a table (or JSON) of kernel_builds.gpu_builds; exit 1 when a kernel fails to compile."""
    if kernels.triton is None:
        raise UserError("bench.py ptx compiles the Triton kernels: pip install triton")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    builds = kernel_builds.gpu_builds(tuple(args.archs), tuple(dtypes[d] for d in args.dtypes),
                                (torch.int32, torch.int64), args.dim)
    for b in builds:  # JSON-ready: dtypes as names
        b.update(dtype=str(b["dtype"]).removeprefix("torch."), index_dtype=str(b["index_dtype"]).removeprefix("torch."))
    if args.json:
        print(json.dumps(builds, indent=1))
    else:
        print(f"{'kernel':<28}{'arch':>6}{'dtype':>10}{'indices':>9}{'compiled':>10}{'registers':>11}{'spills':>8}"
              f"{'128-bit loads':>15}")
        for b in builds:
            print(f"{b['kernel']:<28}{'sm_' + str(b['arch']):>6}{b['dtype']:>10}{b['index_dtype']:>9}"
                  f"{'yes' if b['compiled'] else 'NO':>10}{b['registers'] if b['compiled'] else '-':>11}"
                  f"{b['spills'] if b['compiled'] else '-':>8}{b['vector_loads_128'] if b['compiled'] else '-':>15}")
    failed = [f"{b['kernel']} sm_{b['arch']} {b['dtype']}: {b['error']}" for b in builds if not b["compiled"]]
    if failed:
        raise UserError(f"{len(failed)} builds failed, the first: {failed[0]}")


# ---- gpu: the prepared command for a GPU --------------------------------------------------------------
PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "H800": 989, "A100": 312, "L40S": 362, "A10": 125}  # dense
GPU_KERNEL_SHAPES = ("paper-4k", "paper-32k", "official")
GPU_SECTIONS = ("copy", "kernels", "layer", "train")  # cheapest first
TINY = {"kernel": (64, 8, 1024, 40), "layer": (32, 64, 1024),  # CPU smoke run: tokens x bag x N x dim; dim, tokens, N
        "train": ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=32", "--batch_size=2",
                  "--gradient_accumulation_steps=1", "--memory_layers=(1,)", "--mem_n_keys=32", "--mem_k_dim=32",
                  "--mem_v_dim=64", "--compile=False"]}


def random_dataset(data_dir, tokens, vocab_size=50257):
    """data_dir/random: uniform random GPT-2 ids, for timing training without a corpus."""
    folder = os.path.join(data_dir, "random")
    os.makedirs(folder, exist_ok=True)
    ids = torch.randint(vocab_size, (tokens,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    for split in ("train", "val"):
        ids.numpy().astype("uint16").tofile(os.path.join(folder, f"{split}.bin"))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"name": "random", "tokenizer": "gpt2", "vocab_size": vocab_size, "source": "bench.py gpu"}, f)


def peak_tflops(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class GpuTable:
    """bench.py gpu's markdown table: each row appended to its file and printed as soon as it is measured, so
    a command cut short keeps every figure it got; a measurement that fails is a row saying so."""

    def __init__(self, path, title):
        self.path, self.errors = path, 0
        with open(path, "w"):
            pass
        self.write(title, "", "| measurement | result | against |", "|---|---|---|")

    def write(self, *lines):
        with open(self.path, "a") as f:
            f.write("".join(line + "\n" for line in lines))
        print(*lines, sep="\n", flush=True)

    def attempt(self, name, rows):
        """Write the rows (cells) the generator rows yields; if it fails, an error row for name, and go on."""
        try:
            for cells in rows:
                self.write("| " + " | ".join(cells) + " |")
        except Exception as e:  # every failure is a row; the next measurement still runs
            self.errors += 1
            self.write(f"| {name} | error | {one_line(e)} |")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def one_line(error, limit=400):
    """An error as one table cell: its start and its end (where a failed run's log is named)."""
    text = " ".join(f"{type(error).__name__}: {error}".split()).replace("|", "/")
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"


def gpu_copy_rows(device, tiny, reps, measured):
    measured["copy"] = copy_gbps(device, (32 << 20) if tiny else (1 << 30), reps)
    yield "copy bandwidth", f"{measured['copy']:.0f} GB/s", ""


def gpu_kernel_rows(name, shape, dtype, device, reps, measured):
    """One row per backend at one shape and table dtype, against copy bandwidth and F.embedding_bag."""
    copy = measured.get("copy", float("nan"))
    results = bench_shape(name, shape, dtype, device, kernel_backends(device, dtype), reps, copy)
    base = next(r for r in results if r["backend"] == "F.embedding_bag")
    for r in results:
        both = base["fwd_ms"] + base["bwd_ms"]
        yield (f"bag {str(dtype)[6:]} {name} {'x'.join(map(str, shape))} int32 {r['backend']}",
               f"fwd {r['fwd_ms']:.2f} ms ({r['fwd_pct_copy']:.0f}% of copy), bwd {r['bwd_ms']:.2f} ms "
               f"({r['bwd_pct_copy']:.0f}%)", f"fwd+bwd {both / (r['fwd_ms'] + r['bwd_ms']):.2f}x F.embedding_bag")


def gpu_layer_rows(kind, dim, tokens, values, device, reps, measured):
    """One layer's forward+backward under bf16 autocast, against the dense FFN's when that was measured."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms, peak = layer_step(kind, dim, tokens, values, device, reps, torch.bfloat16)
    if kind == "dense":
        measured["dense_ms"] = ms
        yield f"dense FFN d={dim}, {tokens} tokens, bf16", f"{ms:.2f} ms, peak {peak:,.0f} MB", ""
        return
    dense = measured.get("dense_ms")
    yield (f"{kind} layer d={dim}, {tokens} tokens, {values:,} values, bf16", f"{ms:.2f} ms, peak {peak:,.0f} MB",
           f"{ms / dense:.2f}x the dense FFN" if dense else "")


def gpu_train_rows(data_dir, run_dir, device, sparse, steps, tiny):
    """A training run of gpt2_small_memplus on random tokens (written to data_dir by the first run), compiled
    on a GPU, no eval and no checkpoint (train.py --eval_interval=0), its log kept in run_dir; timed over its
    last third of steps."""
    if not os.path.isdir(os.path.join(data_dir, "random")):
        random_dataset(data_dir, 1 << 16 if tiny else 1 << 24)
    shutil.rmtree(run_dir, ignore_errors=True)  # a previous command's log would be read as this run's
    events, wall = train_and_log([os.path.join(ROOT, "configs", "gpt2_small_memplus.py"), f"--data_dir={data_dir}",
                                  "--dataset=random", f"--max_iters={steps}", f"--log_interval={steps // 3}",
                                  "--eval_interval=0", f"--device={device}", f"--mem_sparse_update={sparse}",
                                  *(TINY["train"] if tiny else [])], run_dir)
    start, last = events[0], [e for e in events if e["event"] == "train"][-1]
    peak = peak_tflops(device)
    mfu = f", MFU {3 * start['flops_per_token'] * last['tokens_per_s'] / (peak * 1e12):.1%}" if peak else ""
    yield (f"train gpt2_small_memplus, {'sparse' if sparse else 'dense'} value update, "
           f"{'eager' if tiny else 'compiled'}, {steps} steps",
           f"{last['tokens_per_s']:,.0f} tokens/s, {last['ms_per_iter']:.0f} ms/iter{mfu}",
           f"peak {last['peak_memory_mb']:,.0f} MB, {wall:.0f} s with start-up and compilation")


def run_gpu(args):
    """The `gpu` subcommand: the chosen sections, cheapest first, each measurement a row of OUT/gpu.md as
    soon as it is taken; training runs' logs in OUT/train-dense and OUT/train-sparse."""
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("tools/bench.py gpu needs a CUDA device (or --device=cpu for a smoke run at tiny shapes)")
    unknown = set(args.sections) - set(GPU_SECTIONS)
    if unknown:
        raise UserError(f"unknown sections {sorted(unknown)}: choose from {','.join(GPU_SECTIONS)}")
    if args.steps < 3:
        raise UserError(f"--steps={args.steps} must be at least 3: the last third of them is timed")
    if device.type == "cuda" and device.index is not None:  # the timing events and syncs use the current device
        torch.cuda.set_device(device)
    tiny, reps, began = device.type == "cpu", 2 if device.type == "cpu" else 10, time.time()
    torch.backends.cuda.matmul.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    table = GpuTable(os.path.join(args.out, "gpu.md"), f"`python tools/bench.py gpu` on {machine(device)}, torch "
                     f"{torch.__version__}, triton {kernels.triton.__version__ if kernels.triton else 'none'}")
    measured = {}
    if "copy" in args.sections:
        table.attempt("copy bandwidth", gpu_copy_rows(device, tiny, reps, measured))
    if "kernels" in args.sections:
        shapes = [("tiny", TINY["kernel"])] if tiny else [(name, SHAPES[name]) for name in GPU_KERNEL_SHAPES]
        for dtype in (torch.bfloat16, torch.float32):
            for name, shape in shapes:
                table.attempt(f"bag {str(dtype)[6:]} {name}",
                              gpu_kernel_rows(name, shape, dtype, device, reps, measured))
    if "layer" in args.sections:
        dim, tokens, values = TINY["layer"] if tiny else (768, 8192, 2**20)
        for kind in ("dense", "memory", "memory-sparse"):
            table.attempt(f"{kind} layer", gpu_layer_rows(kind, dim, tokens, values, device, reps, measured))
    if "train" in args.sections:
        with tempfile.TemporaryDirectory() as data_dir:
            for sparse in (False, True):
                run_dir = os.path.join(args.out, f"train-{'sparse' if sparse else 'dense'}")
                table.attempt(f"train, {'sparse' if sparse else 'dense'} value update",
                              gpu_train_rows(data_dir, run_dir, device, sparse, args.steps, tiny))
    table.write("", f"{time.time() - began:.0f} s in all.")
    if table.errors:
        raise UserError(f"{table.errors} measurements failed: their rows in {table.path} say why")


def numbers(text):
    """Comma-separated whole numbers, e.g. 80,90."""
    try:
        return [int(e) for e in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated whole numbers")


def even_exponents(least):
    """--exponents: comma-separated table sizes as powers of two, e.g. 14,16,18,20; each even (N = n_keys**2)
    and at least least, checked when the arguments are read."""
    def parse(text):
        exponents = numbers(text)
        if any(e % 2 or e < least for e in exponents):
            raise argparse.ArgumentTypeError(f"{text!r}: a table of N = n_keys**2 values needs even exponents of at "
                                             f"least {least}, e.g. 14,16,18,20")
        return exponents
    return parse


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = OneLineErrors(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    k = commands.add_parser("kernels", help="embedding-bag forward/backward against F.embedding_bag")
    k.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    k.add_argument("--shapes", type=parse_shapes,
                   help=f"comma-separated names {sorted(SHAPES)} or TOKENSxBAGxROWSxDIM "
                        f"(default cpu: {DEFAULT_SHAPES['cpu']}; cuda: {DEFAULT_SHAPES['cuda']})")
    k.add_argument("--backends", help="comma-separated subset of F.embedding_bag,torch,triton,triton-atomic")
    k.add_argument("--reps", type=int, help="timed calls per measurement (default 10 on cuda, 5 on cpu)")
    k.add_argument("--json", action="store_true", help="machine-readable output")
    k.set_defaults(run=run_kernels)
    lay = commands.add_parser("layer", help="memory layer forward+backward against the dense FFN, across N")
    lay.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    lay.add_argument("--dim", type=int, default=256)
    lay.add_argument("--tokens", type=int, default=4096)
    lay.add_argument("--exponents", type=even_exponents(10), default=[14, 16, 18, 20],
                     help="table sizes as powers of two, comma-separated (even: N = n_keys**2; from 10: "
                          "n_keys >= knn = 32)")
    lay.add_argument("--reps", type=int, help="timed calls per measurement (default 10 on cuda, 5 on cpu)")
    lay.add_argument("--json", action="store_true")
    lay.set_defaults(run=run_layer)
    tr = commands.add_parser("train", help="whole training steps of a config across N, dense vs sparse updates")
    tr.add_argument("config", nargs="?", default="configs/shakespeare_char_memplus.py")
    tr.add_argument("overrides", nargs="*", help="--key=value overrides for train.py")
    tr.add_argument("--exponents", type=even_exponents(2), default=[14, 16, 18, 20])
    tr.add_argument("--iters", type=int, default=10, help="steps per timing window (the second window counts)")
    tr.add_argument("--compile", action="store_true", help="also time torch.compile")
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(run=run_train)
    x = commands.add_parser("ptx", help="compile every Triton kernel for sm_80/sm_90 without a GPU")
    x.add_argument("--archs", type=numbers, default=[80, 90], help="compute capabilities (default 80,90)")
    x.add_argument("--dtypes", type=lambda t: t.split(","), default=["float32", "bfloat16", "float16"],
                   help="table dtypes, comma-separated")
    x.add_argument("--dim", type=int, default=768, help="the table width the kernels are specialised for")
    x.add_argument("--json", action="store_true", help="a list of objects, one per build")
    x.set_defaults(run=run_ptx)
    g = commands.add_parser("gpu", help="every GPU figure in one run (under 6 minutes), one markdown table")
    g.add_argument("--device", help="default cuda; cpu runs a tiny smoke test of the same code")
    g.add_argument("--out", default="runs/gpu", help="the folder for gpu.md (the table) and the training logs")
    g.add_argument("--sections", type=lambda t: t.split(","), default=list(GPU_SECTIONS),
                   help=f"comma-separated subset of {','.join(GPU_SECTIONS)} (run in that order)")
    g.add_argument("--steps", type=int, default=30, help="steps of each training run; the last third is timed")
    g.set_defaults(run=run_gpu)
    bench_facts.add_command(commands)
    bench_forgetting.add_command(commands)
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "train":
        args.overrides += unknown  # train.py's --key=value
    args.argv = argv[1:]
    try:
        args.run(args)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
