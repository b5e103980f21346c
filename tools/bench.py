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

gpu: every GPU figure in one run, one markdown table (bench_gpu.py).

facts and forgetting: the benchmarks on the knowledge base of facts.py, in bench_facts.py and bench_forgetting.py.

Every benchmark that trains starts train.py in a fresh process and reads its log.jsonl (train_and_log).
"""
import argparse
import json
import multiprocessing
import os
import sys
import tempfile

import torch

if __package__ in (None, ""):  # run as `python tools/bench.py`: the repository's modules are one folder up
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import kernels
from config import pick_device
from errors import OneLineErrors, UserError
from tools import bench_facts, bench_forgetting, bench_gpu, kernel_builds
from tools.bench_facts import train_and_log
from tools.measure import SHAPES, bench_shape, copy_gbps, kernel_backends, layer_step, machine


DEFAULT_SHAPES = {"cpu": "cpu-target,official-small", "cuda": "cpu-target,paper-4k,paper-32k,official"}


def bench_device(name):
    """--device, else cuda when there is one; a one-line error when its backend is missing (pick_device)."""
    return pick_device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    bench_gpu.add_command(commands)
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
