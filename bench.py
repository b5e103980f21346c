"""Benchmarks, one subcommand each: `python bench.py kernels|layer|train|facts ...`.

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
(kernels.gpu_builds): per build, whether it compiled, registers, spills and 128-bit global loads.

gpu: the one command to run on the first GPU at hand (`python bench.py gpu`, meant to take under 8 minutes
on an H100): the card's copy bandwidth; the kernels at the paper's shapes in bf16 and fp32 against it and
against F.embedding_bag; the memory layer at GPT-2-small width against the dense FFN (bf16 autocast); 30
training steps of configs/gpt2_small_memplus.py with torch.compile on random tokens (tokens/s, MFU, peak
memory), with dense and with sparse value updates. One markdown table, printed and written to --out.
`--device=cpu` runs the same code at tiny shapes, a smoke test.

forgetting: sparse memory finetuning against full finetuning, LoRA and all values (`python bench.py
forgetting`): one Memory+ model pretrained on knowledge base A, finetuned on a disjoint knowledge base B
by each method over a short learning-rate sweep; fact accuracy on B (learned) and on A (retained) at
fixed intervals; OUT/results.md compares the retained-A drop where every method first reaches a common
B accuracy, and OUT/forgetting.png draws learned against retained.

facts: the factual-recall comparison (`python bench.py facts --help`): every configs/facts_<model>.py
(on top of configs/facts_common.py, which holds the data and the one training budget) trained in its own
out_dir, then a markdown table (and a plot when matplotlib is installed) of fact accuracy and answer NLL
against FLOPs and parameters, in OUT/results.md.

Every benchmark that trains starts train.py in a fresh process and reads its log.jsonl (train_and_log).
"""
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

import kernels
from config import OneLineErrors, pick_device
from errors import UserError
from facts import ATTRIBUTES, DEFAULT_ENTITIES, EVAL_FILE
from prepare_data import write_facts

ROOT = os.path.dirname(os.path.abspath(__file__))

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


def bench_device(name):
    """--device, else cuda when there is one; a one-line error when its backend is missing (pick_device)."""
    return pick_device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        raise UserError(f"unknown shape {text!r}: a name in {sorted(SHAPES)} or TOKENSxBAGxROWSxDIM")
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
    device = bench_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = kernel_backends(device)
    if args.backends:
        unknown = set(args.backends.split(",")) - set(backends)
        if unknown:
            raise UserError(f"backends {sorted(unknown)} not available on {device}; have {list(backends)}")
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


def layer_step(kind, dim, tokens, num_values, device, reps, dtype=None):
    """Best ms of one forward+backward of a memory layer ("memory", "memory-sparse") or of the dense FFN,
    and the process's peak memory in MB (run in a fresh process); dtype: under that autocast."""
    from memory import ProductKeyMemory, ValueTable
    from model import SwiGLU, GPTConfig
    torch.manual_seed(0)
    device = torch.device(device)
    if kind == "dense":
        layer, values = SwiGLU(dim, GPTConfig(n_embd=dim, n_head=1).ffn_hidden).to(device), None
    else:
        n_keys = round(num_values ** 0.5)
        layer = ProductKeyMemory(dim, n_keys, heads=4, knn=32, k_dim=dim // 2, v_dim=dim).to(device)
        values = ValueTable(n_keys ** 2, dim).to(device)
        values.sparse_grad = kind == "memory-sparse"
    x = torch.randn(tokens, dim, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def step(_):
        for p in list(layer.parameters()) + ([values.weight] if values else []):
            p.grad = None
        with autocast:
            out = layer(x, values)
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


def train_and_log(args, out_dir, threads=None):
    """Run `python train.py ARGS --out_dir=OUT_DIR` in a fresh process (its output in OUT_DIR/train.out, with
    OMP_NUM_THREADS=threads when given); returns (the events of its log.jsonl, wall seconds)."""
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    start = time.time()
    with open(os.path.join(out_dir, "train.out"), "w") as out:
        code = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, f"--out_dir={out_dir}"],
                              stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.time() - start
    if code != 0:
        with open(os.path.join(out_dir, "train.out")) as f:
            last = (f.read().strip().splitlines() or [""])[-1]
        raise UserError(f"train.py {' '.join(args)} failed with exit code {code} ({last}): see {out_dir}/train.out")
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f], wall


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
    """The `ptx` subcommand: a table (or JSON) of kernels.gpu_builds; exit 1 when a kernel fails to compile."""
    if kernels.triton is None:
        raise UserError("bench.py ptx compiles the Triton kernels: pip install triton")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    builds = kernels.gpu_builds(tuple(args.archs), tuple(dtypes[d] for d in args.dtypes),
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


def run_gpu(args):
    """The `gpu` subcommand: every GPU figure of the README in one process, one markdown table."""
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("bench.py gpu needs a CUDA device (or --device=cpu for a smoke run at tiny shapes)")
    tiny, reps = device.type == "cpu", 2 if device.type == "cpu" else 10
    torch.backends.cuda.matmul.allow_tf32 = True
    copy = copy_gbps(device, (32 << 20) if tiny else (1 << 30), reps)
    rows = [("copy bandwidth", f"{copy:.0f} GB/s", "")]
    shapes = [("tiny", TINY["kernel"])] if tiny else [(name, SHAPES[name]) for name in GPU_KERNEL_SHAPES]
    for dtype in (torch.bfloat16, torch.float32):
        for name, shape in shapes:
            results = bench_shape(name, shape, dtype, device, kernel_backends(device), reps, copy)
            base = next(r for r in results if r["backend"] == "F.embedding_bag")
            for r in results:
                both = base["fwd_ms"] + base["bwd_ms"]
                rows.append((f"bag {str(dtype)[6:]} {name} {'x'.join(map(str, shape))} {r['backend']}",
                             f"fwd {r['fwd_ms']:.2f} ms ({r['fwd_pct_copy']:.0f}% of copy), bwd {r['bwd_ms']:.2f} ms "
                             f"({r['bwd_pct_copy']:.0f}%)", f"fwd+bwd {both / (r['fwd_ms'] + r['bwd_ms']):.2f}x "
                             "F.embedding_bag"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    dim, tokens, values = TINY["layer"] if tiny else (768, 8192, 2**20)
    dense_ms, _ = layer_step("dense", dim, tokens, 0, device, reps, torch.bfloat16)
    for kind in ("memory", "memory-sparse"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms, peak = layer_step(kind, dim, tokens, values, device, reps, torch.bfloat16)
        rows.append((f"{kind} layer d={dim}, {tokens} tokens, {values:,} values, bf16", f"{ms:.2f} ms, peak {peak:,.0f} MB",
                     f"{ms / dense_ms:.2f}x the dense FFN ({dense_ms:.2f} ms)"))
    with tempfile.TemporaryDirectory() as tmp:
        random_dataset(tmp, 1 << 16 if tiny else 1 << 24)
        steps = 3 if tiny else 30
        for sparse in (False, True):
            events, wall = train_and_log([os.path.join(ROOT, "configs", "gpt2_small_memplus.py"), f"--data_dir={tmp}",
                                          "--dataset=random", f"--max_iters={steps}", f"--log_interval={steps // 3}",
                                          "--eval_interval=1000000", "--eval_iters=1", f"--device={device}",
                                          f"--mem_sparse_update={sparse}", *(TINY["train"] if tiny else [])],
                                         os.path.join(tmp, f"run{sparse}"))
            start, last = events[0], [e for e in events if e["event"] == "train"][-1]
            peak = peak_tflops(device)
            mfu = f", MFU {3 * start['flops_per_token'] * last['tokens_per_s'] / (peak * 1e12):.1%}" if peak else ""
            rows.append((f"train gpt2_small_memplus, {'sparse' if sparse else 'dense'} value update, "
                         f"{'eager' if tiny else 'compiled'}",
                         f"{last['tokens_per_s']:,.0f} tokens/s, {last['ms_per_iter']:.0f} ms/iter{mfu}",
                         f"peak {last['peak_memory_mb']:,.0f} MB, {wall:.0f} s with compilation"))
    table = "\n".join([f"`python bench.py gpu` on {machine(device)}, torch {torch.__version__}", "",
                       "| measurement | result | against |", "|---|---|---|"] +
                      [f"| {a} | {b} | {c} |" for a, b, c in rows])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(table + "\n")
    print(table)


# ---- forgetting: learning new facts without losing the old ---------------------------------------------
FORGET_METHODS = {  # finetune mode: the settings swept (AdamW; the value tables keep 10x the others' lr)
    "full": [{"learning_rate": lr, "min_lr": lr / 10, "mem_value_lr": 10 * lr} for lr in (1e-3, 3e-3)],
    "lora": [{"learning_rate": lr, "min_lr": lr / 10} for lr in (3e-3, 1e-2)],
    "values": [{"mem_value_lr": lr} for lr in (1e-2, 3e-2)],
    "smf": [{"mem_value_lr": lr} for lr in (1e-2, 3e-2)],
}
FORGET_BUDGET = {  # (people in A, people in B, pretraining iterations, finetuning iterations, eval interval)
    "full": (2000, 500, 1000, 150, 30),
    "quick": (100, 30, 20, 10, 5),
}
QUICK_MODEL = ["--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=8", "--eval_iters=2",
               "--facts_eval_size=40", "--mem_n_keys=16", "--mem_knn=8", "--mem_k_dim=16", "--smf_background_batches=4"]


def first_at(evals, level):
    """The first eval whose B accuracy reaches level, or None."""
    return next((e for e in evals if e["facts_acc"] >= level), None)


def run_forgetting(args):
    """The `forgetting` subcommand: pretrain on A (or take --base), finetune on B by every method and lr."""
    people, new_people, base_iters, iters, interval = FORGET_BUDGET["quick" if args.quick else "full"]
    model = QUICK_MODEL if args.quick else ["--facts_eval_size=300", "--eval_iters=5"]  # 2 x 600 pairs per eval
    data = os.path.join(args.out, "data")
    if not os.path.exists(os.path.join(data, "kb_new", EVAL_FILE)):
        write_facts(people, 0, tuple(ATTRIBUTES), "compact", "kb", data, new_entities=new_people)
    common = [config_path("common"), config_path("memplus"), f"--data_dir={data}", *model]
    base = args.base or os.path.join(args.out, "base")
    if not args.base:
        shutil.rmtree(base, ignore_errors=True)
        train_and_log([*common, "--dataset=kb", f"--max_iters={base_iters}", f"--eval_interval={base_iters}"], base)
    runs = [(method, settings) for method, sweep in FORGET_METHODS.items() for settings in sweep[:1 if args.quick else None]]

    def finetune(method_settings):
        method, settings = method_settings
        key = "mem_value_lr" if method in ("values", "smf") else "learning_rate"
        name = f"{method}_lr{settings[key]:g}"
        out_dir = os.path.join(args.out, name)
        shutil.rmtree(out_dir, ignore_errors=True)
        events, wall = train_and_log([*common, "--dataset=kb_new", f"--init_from={base}", f"--finetune={method}",
                                      "--facts_retain_dataset=kb", f"--max_iters={iters}", f"--eval_interval={interval}",
                                      "--warmup_iters=0", *[f"--{k}={v!r}" for k, v in settings.items()]],
                                     out_dir, max(1, (os.cpu_count() or 1) // args.jobs))
        print(f"{name}: B acc {events[-1].get('facts_acc', 0):.1%}, A acc {events[-1].get('retain_facts_acc', 0):.1%}, "
              f"{wall:.0f} s", flush=True)
        return {"method": method, "name": name, "settings": settings, "wall_s": wall,
                "evals": [e for e in events if e["event"] == "eval"]}

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(finetune, runs))
    start = results[0]["evals"][0]
    base_a, base_b = start["retain_facts_acc"], start["facts_acc"]
    best = {m: max(e["facts_acc"] for r in results if r["method"] == m for e in r["evals"]) for m in FORGET_METHODS}
    level = min(best.values())  # the B accuracy every method reaches
    lines = [f"# Learning new facts without forgetting\n\nCommand: `python bench.py forgetting {' '.join(args.argv)}`. "
             f"Memory+ pretrained on {people} people (A: {base_a:.1%} of their facts recalled, B: {base_b:.1%}), "
             f"finetuned on {new_people} new people (B) for {iters} iterations, evaluated every {interval}.\n",
             f"Equal learning: the first eval where B accuracy reaches {level:.1%}, the highest level every method "
             "reaches; the drop of A accuracy is relative to the pretrained model's.\n",
             "| method | run | iter | B acc (learned) | A acc (retained) | A drop | A val loss | best B acc | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for r in results:
        hit = first_at(r["evals"], level)
        drop = (base_a - hit["retain_facts_acc"]) / base_a if hit and base_a else None
        if hit and (r["method"] not in summary or drop < summary[r["method"]]):
            summary[r["method"]] = drop
        lines.append(f"| {r['method']} | {r['name']} | {hit['iter'] if hit else '-'} | "
                     f"{hit['facts_acc']:.1%} | {hit['retain_facts_acc']:.1%} | "
                     f"{'-' if drop is None else f'{drop:.0%}'} | {hit['retain_val_loss']:.3f} | " if hit else
                     f"| {r['method']} | {r['name']} | - | - | - | - | - | ")
        lines[-1] += f"{max(e['facts_acc'] for e in r['evals']):.1%} | {r['wall_s']:.0f} |"
    lines.append("\nLowest A drop at equal learning, per method: " +
                 ", ".join(f"{m} {d:.0%}" for m, d in summary.items() if d is not None) +
                 ". Best B accuracy: " + ", ".join(f"{m} {b:.1%}" for m, b in best.items()) + ".")
    report = "\n".join(lines) + "\n"
    if plot_forgetting(results, os.path.join(args.out, "forgetting.png")):
        report += "\n![learned against retained](forgetting.png)\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report)
    print(report)


def plot_forgetting(results, path):
    """Accuracy on B (learned) against accuracy on A (retained), a curve per run; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = dict(zip(FORGET_METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for r in results:
        ax.plot([e["facts_acc"] for e in r["evals"]], [e["retain_facts_acc"] for e in r["evals"]], marker="o",
                markersize=3, color=colors[r["method"]], label=r["name"], alpha=0.85)
    ax.set_xlabel("fact accuracy on B (new facts, learned)")
    ax.set_ylabel("fact accuracy on A (old facts, retained)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- facts: the factual-recall comparison ----------------------------------------------------------------
MODELS = ("dense", "dense2x", "dense4x", "memory", "memplus", "moe", "peer")  # configs/facts_<model>.py
REPEATED = ("dense", "memplus")  # the headline pair: trained with every seed, the others with the first
COLUMNS = (("model", "model"), ("seed", "seed"), ("params", "params"), ("active params", "active_params"),
           ("FLOPs/token", "flops_per_token"), ("tokens", "tokens"), ("fact acc", "facts_acc"),
           ("held-out acc", "facts_acc_heldout"), ("answer NLL", "facts_nll"), ("held-out NLL", "facts_nll_heldout"),
           ("val loss", "val_loss"), ("wall s", "wall_s"))


def config_path(model):
    return os.path.join(ROOT, "configs", f"facts_{model}.py")


def facts_run(model, seed, out_dir, train_args, threads):
    """Train configs/facts_common.py then configs/facts_<model>.py in out_dir (emptied first); returns its
    sizes from the start event, its scores from the last eval event and its wall seconds."""
    shutil.rmtree(out_dir, ignore_errors=True)
    events, wall = train_and_log([config_path("common"), config_path(model), f"--seed={seed}", *train_args],
                                 out_dir, threads)
    start = next(e for e in events if e["event"] == "start")
    final = [e for e in events if e["event"] == "eval"][-1]
    if "facts_acc" not in final:
        raise UserError(f"{out_dir}/log.jsonl has no fact scores: does the dataset folder hold {EVAL_FILE}?")
    return {"params": start["params"], "active_params": start["active_params"],
            "flops_per_token": start["flops_per_token"], "tokens": start["tokens_per_iter"] * final["iter"],
            **{k: final[k] for k in ("val_loss", "facts_acc", "facts_acc_heldout", "facts_nll", "facts_nll_heldout")},
            "wall_s": wall}


def markdown_table(rows):
    def cell(key, value):
        if key.startswith("facts_acc"):
            return f"{value:.1%}"
        if isinstance(value, float):
            return f"{value:.3f}" if key != "wall_s" else f"{value:.0f}"
        return f"{value:,}" if isinstance(value, int) and key != "seed" else str(value)
    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(key, row[key]) for _, key in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def headline(rows):
    """The paper's claims, checked on means over seeds: Memory+ against dense at equal FLOPs, and dense2x."""
    def mean(model, key):
        values = [r[key] for r in rows if r["model"] == model]
        return sum(values) / len(values) if values else None
    acc = {m: mean(m, "facts_acc") for m in ("dense", "memplus", "moe")}
    nll = {m: mean(m, "facts_nll") for m in ("memplus", "dense2x")}
    lines = []
    if acc["memplus"] is not None and acc["dense"] is not None:
        ratio = f"{acc['memplus'] / acc['dense']:.1f}x" if acc["dense"] else "no ratio (dense at 0%)"
        lines.append(f"- Memory+ fact accuracy {acc['memplus']:.1%} against dense {acc['dense']:.1%} at equal FLOPs "
                     f"per token: {ratio} (target: at least 2x)")
    if None not in nll.values():
        lines.append(f"- Memory+ answer NLL {nll['memplus']:.3f} against {nll['dense2x']:.3f} for dense with 2x the "
                     "FLOPs (target: lower)")
    if acc["memplus"] is not None and acc["moe"] is not None:
        lines.append(f"- Memory+ fact accuracy {acc['memplus']:.1%} against {acc['moe']:.1%} for the MoE matched in "
                     "FLOPs and parameters (target: higher)")
    return "\n".join(lines)


def plot_facts(rows, path):
    """Fact accuracy against FLOPs per token and against total parameters; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "flops_per_token", "forward FLOPs per token"), (axes[1], "params", "total parameters")):
        for model in dict.fromkeys(r["model"] for r in rows):
            points = [(r[key], r["facts_acc"]) for r in rows if r["model"] == model]
            ax.scatter(*zip(*points), label=model)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fact accuracy (greedy exact match)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_facts(args):
    """The `facts` subcommand: train every model of the suite, then write the results table and plot."""
    if args.models:
        models = args.models.split(",")
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            raise UserError(f"unknown models {unknown}: choose from {', '.join(MODELS)}")
        missing = [config_path(m) for m in models if not os.path.exists(config_path(m))]
        if missing:
            raise UserError(f"no config for {', '.join(missing)}")
    else:
        models = [m for m in MODELS if os.path.exists(config_path(m))]
        skipped = [m for m in MODELS if m not in models]
        if skipped:
            print(f"no config for {', '.join(skipped)}: skipped")
    if args.seeds < 1 or args.jobs < 1:
        raise UserError("--seeds and --jobs must be at least 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(f"overrides must look like key=value, got {bad}")
    if not os.path.exists(os.path.join(args.data_dir, "facts", EVAL_FILE)):
        meta = write_facts(DEFAULT_ENTITIES, 0, tuple(ATTRIBUTES), "compact", "facts", args.data_dir)
        print(f"made {args.data_dir}/facts: {meta['source']}")
    train_args = [f"--data_dir={args.data_dir}"] + [f"--{o}" for o in args.overrides]
    runs = [(m, seed) for m in models for seed in range(1, (args.seeds if m in REPEATED else 1) + 1)]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def run(model_seed):
        model, seed = model_seed
        out_dir = os.path.join(args.out, f"{model}_seed{seed}")
        row = {"model": model, "seed": seed, **facts_run(model, seed, out_dir, train_args, threads)}
        print(f"{model} seed {seed}: fact acc {row['facts_acc']:.1%}, answer nll {row['facts_nll']:.3f}, "
              f"{row['wall_s']:.0f} s", flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, runs))
    with open(os.path.join(args.data_dir, "facts", "meta.json")) as f:
        source = json.load(f)["source"]
    report = (f"# Factual recall: memory against dense at equal compute\n\nData: {source}. Command: `python bench.py "
              f"facts {' '.join(args.argv)}`.\n\n{markdown_table(rows)}\n\n{headline(rows)}\n")
    if plot_facts(rows, os.path.join(args.out, "facts.png")):
        report += "\n![fact accuracy against FLOPs and parameters](facts.png)\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report)
    print(report)


def powers_of_two(text):
    """--exponents: comma-separated exponents, e.g. 14,16,18,20."""
    return [int(e) for e in text.split(",")]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = OneLineErrors(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    k = commands.add_parser("kernels", help="embedding-bag forward/backward against F.embedding_bag")
    k.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    k.add_argument("--shapes", help=f"comma-separated names {sorted(SHAPES)} or TOKENSxBAGxROWSxDIM "
                                    f"(default cpu: {DEFAULT_SHAPES['cpu']}; cuda: {DEFAULT_SHAPES['cuda']})")
    k.add_argument("--backends", help="comma-separated subset of F.embedding_bag,torch,triton,triton-atomic")
    k.add_argument("--reps", type=int, help="timed calls per measurement (default 10 on cuda, 5 on cpu)")
    k.add_argument("--json", action="store_true", help="machine-readable output")
    k.set_defaults(run=run_kernels)
    lay = commands.add_parser("layer", help="memory layer forward+backward against the dense FFN, across N")
    lay.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    lay.add_argument("--dim", type=int, default=256)
    lay.add_argument("--tokens", type=int, default=4096)
    lay.add_argument("--exponents", type=powers_of_two, default=[14, 16, 18, 20],
                     help="table sizes as powers of two, comma-separated (even: N = n_keys**2)")
    lay.add_argument("--reps", type=int, help="timed calls per measurement (default 10 on cuda, 5 on cpu)")
    lay.add_argument("--json", action="store_true")
    lay.set_defaults(run=run_layer)
    tr = commands.add_parser("train", help="whole training steps of a config across N, dense vs sparse updates")
    tr.add_argument("config", nargs="?", default="configs/shakespeare_char_memplus.py")
    tr.add_argument("overrides", nargs="*", help="--key=value overrides for train.py")
    tr.add_argument("--exponents", type=powers_of_two, default=[14, 16, 18, 20])
    tr.add_argument("--iters", type=int, default=10, help="steps per timing window (the second window counts)")
    tr.add_argument("--compile", action="store_true", help="also time torch.compile")
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(run=run_train)
    x = commands.add_parser("ptx", help="compile every Triton kernel for sm_80/sm_90 without a GPU")
    x.add_argument("--archs", type=powers_of_two, default=[80, 90], help="compute capabilities (default 80,90)")
    x.add_argument("--dtypes", type=lambda t: t.split(","), default=["float32", "bfloat16", "float16"],
                   help="table dtypes, comma-separated")
    x.add_argument("--dim", type=int, default=768, help="the table width the kernels are specialised for")
    x.add_argument("--json", action="store_true", help="a list of objects, one per build")
    x.set_defaults(run=run_ptx)
    g = commands.add_parser("gpu", help="every GPU figure in one run (under 8 minutes), one markdown table")
    g.add_argument("--device", help="default cuda; cpu runs a tiny smoke test of the same code")
    g.add_argument("--out", default="runs/gpu.md", help="where the markdown table goes")
    g.set_defaults(run=run_gpu)
    fo = commands.add_parser("forgetting", help="sparse memory finetuning against full finetuning and LoRA")
    fo.add_argument("--out", default="runs/forgetting", help="data, runs, results.md and forgetting.png go here")
    fo.add_argument("--base", help="a Memory+ run pretrained on OUT/data/kb to finetune (default: pretrain one)")
    fo.add_argument("--quick", action="store_true", help="a tiny model and budget, one lr per method (a smoke run)")
    fo.add_argument("--jobs", type=int, default=1, help="finetuning runs at once, sharing the CPU cores")
    fo.set_defaults(run=run_forgetting)
    f = commands.add_parser("facts", help="the factual-recall comparison: every facts config at one budget")
    f.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} (default: every one with a config)")
    f.add_argument("--seeds", type=int, default=2, help=f"seeds of {' and '.join(REPEATED)}; the others get one")
    f.add_argument("--out", default="runs/facts", help="runs go to OUT/<model>_seed<seed>, results to OUT/results.md")
    f.add_argument("--data_dir", default="data", help="the dataset is DATA_DIR/facts, made with the defaults if missing")
    f.add_argument("--jobs", type=int, default=1, help="runs trained at once, sharing the CPU cores between them")
    f.add_argument("overrides", nargs="*", metavar="key=value", help="train.py settings for every run")
    f.set_defaults(run=run_facts)
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
