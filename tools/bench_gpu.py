"""`python tools/bench.py gpu`: the one command to run on the first GPU at hand (under 6 minutes on an H100 by
estimate, see the README), its sections cheapest first: the card's copy bandwidth; the kernels at the paper's
shapes in bf16 and fp32 (int32 indices, as the model reads) against it and against F.embedding_bag; the memory
layer at GPT-2-small width against the dense FFN (bf16 autocast); --steps (30) training steps of
configs/gpt2_small_memplus.py with torch.compile on random tokens (tokens/s, MFU, peak memory), with dense and
with sparse value updates, no eval and no checkpoint. Each row goes to OUT/gpu.md and stdout as soon as it is
measured; a measurement that fails is an error row and the next one runs; --sections picks sections.
`--device=cpu` runs the same code at tiny shapes, a smoke test."""
import json
import os
import shutil
import tempfile
import time

import torch

import kernels
from errors import UserError
from tools import ROOT
from tools.bench_facts import train_and_log
from tools.measure import SHAPES, bench_shape, copy_gbps, kernel_backends, layer_step, machine

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


def add_command(commands):
    """bench.py's `gpu` subcommand."""
    g = commands.add_parser("gpu", help="every GPU figure in one run (under 6 minutes), one markdown table")
    g.add_argument("--device", help="default cuda; cpu runs a tiny smoke test of the same code")
    g.add_argument("--out", default="runs/gpu", help="the folder for gpu.md (the table) and the training logs")
    g.add_argument("--sections", type=lambda t: t.split(","), default=list(GPU_SECTIONS),
                   help=f"comma-separated subset of {','.join(GPU_SECTIONS)} (run in that order)")
    g.add_argument("--steps", type=int, default=30, help="steps of each training run; the last third is timed")
    g.set_defaults(run=run_gpu)
