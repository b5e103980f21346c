"""The factual-recall benchmark on the knowledge base of facts.py, run by `python tools/bench.py facts`.

facts: the factual-recall comparison, in one of two presets. `quick` (the default): every
configs/facts_<model>.py (on top of configs/facts_common.py, which holds the data and the one training
budget) trained in its own out_dir. `capacity`: a knowledge base larger than the small dense model can
hold, trained until the dense model's recall stops rising, and Memory+ swept over its memory size at
fixed FLOPs per token, with the dense models of 1x, 2x and 4x the FLOPs and the MoE matched to the
largest memory (the paper's scaling figure in miniature). Either writes a markdown table (and a plot
when matplotlib is installed) of fact accuracy and answer NLL against FLOPs and parameters, in
OUT/results.md.

The forgetting benchmark (bench_forgetting.py) trains on the same knowledge bases.

Every run is train.py in a fresh process, read back from its log.jsonl (train_and_log).
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from config import gpt_config, load_config
from errors import UserError
from facts import ATTRIBUTES, DEFAULT_ENTITIES, EVAL_FILE
from model import GPTConfig
from prepare_data import write_facts
from tools import ROOT
from tools.sizing import dense_baseline, moe_baseline, overrides



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


# ---- facts: the factual-recall comparison ----------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One model of a suite: its configs (files under configs/, in order), then its train.py overrides."""
    name: str  # the row's label; its runs go to OUT/<name>_seed<seed>
    configs: tuple
    overrides: tuple = ()
    repeated: bool = True  # trained with every seed, or with the first only
    series: str = ""  # runs of one series are drawn as a line through their means, the rest as points
    share: int = None  # the split preset: the percent of the sparse parameters given to Engram (the plot's x)


QUICK_MODELS = ("dense", "dense2x", "dense4x", "memory", "memplus", "moe", "peer", "engram")  # configs/facts_<model>.py
COLUMNS = (("model", "model"), ("seed", "seed"), ("params", "params"), ("active params", "active_params"),
           ("FLOPs/token", "flops_per_token"), ("tokens", "tokens"), ("acc at half", "facts_acc_half"),
           ("fact acc", "facts_acc"), ("held-out acc", "facts_acc_heldout"), ("answer NLL", "facts_nll"),
           ("held-out NLL", "facts_nll_heldout"), ("val loss", "val_loss"), ("wall s", "wall_s"))


def quick_suite(vocab_size):
    """Every configs/facts_<model>.py on configs/facts_common.py; dense and Memory+ with every seed."""
    return [Run(m, ("facts_common", f"facts_{m}"), repeated=m in ("dense", "memplus"),
                series="dense" if m.startswith("dense") else "") for m in QUICK_MODELS]


def values_label(n_keys):
    values = n_keys * n_keys
    return f"{values // 2**20}M" if values >= 2**20 else f"{values // 2**10}k"


def capacity_configs(*own, scale=()):
    """The config files of a capacity run: the preset's base, the model's own files, then the scale's."""
    return ("facts_common", "capacity_common", *own, *scale)


def sized(files, vocab_size, *args):
    """The GPTConfig of config files (names under configs/) and train.py overrides."""
    return gpt_config(load_config([config_path(f) for f in files] + list(args)), vocab_size)


def capacity_suite(vocab_size, keys, scale=()):
    """Memory+ at every mem_n_keys of keys on the small dense model of configs/capacity_common.py; that dense
    model and its 2x and 4x widenings (sizing.dense_baseline); the MoE matched to the largest memory
    (sizing.moe_baseline); Engram (configs/capacity_engram.py, about that memory's parameters and FLOPs);
    PEER (configs/capacity_peer.py) with the first seed only. scale: config files applied last to every run
    (a larger base model, its data and budget)."""
    def configs(*own):
        return capacity_configs(*own, scale=scale)

    def changed(base, other):
        return tuple(shlex.split(overrides(base, other)))

    dense = sized(configs(), vocab_size)
    largest = sized(configs("capacity_memplus"), vocab_size, f"--mem_n_keys={keys[-1]}")
    return ([Run("dense", configs(), series="dense")] +
            [Run(f"dense{f}x", configs(), changed(dense, dense_baseline(dense, f)), series="dense") for f in (2, 4)] +
            [Run(f"memplus_{values_label(n)}", configs("capacity_memplus"), (f"--mem_n_keys={n}",), series="memplus")
             for n in keys] +
            [Run("moe", configs(), tuple(a for a in changed(dense, moe_baseline(largest)) if a.startswith("--moe_"))),
             Run("engram", configs("capacity_engram")),
             Run("peer", configs("capacity_peer"), repeated=False)])


def split_suite(vocab_size, keys=256, shares=(0, 25, 50, 75, 100)):
    """The sparse parameters of the capacity preset's largest Memory+ (its value table, keys**2 rows) divided
    between Memory+ in the second layer and Engram (configs/capacity_engram.py's rows) in the first, each
    share the percent given to Engram: 0 is that Memory+ alone, 100 Engram alone in the first layer. Total
    parameters stay equal; FLOPs differ by the first layer's block (the dense FFN where Engram has no share)."""
    memplus = sized(capacity_configs("capacity_memplus"), vocab_size, f"--mem_n_keys={keys}")
    engram = sized(capacity_configs("capacity_engram"), vocab_size)
    budget = keys ** 2 * memplus.mem_v_dim
    runs = []
    for share in shares:
        own, args = (), ()
        if share < 100:
            own += ("capacity_memplus",)
            args += (f"--mem_n_keys={round(((100 - share) / 100 * budget / memplus.mem_v_dim) ** 0.5)}",)
        if share > 0:
            own += ("capacity_engram",)
            args += ("--engram_layers=(0,)", f"--engram_rows={round(share / 100 * budget / engram.engram_dim)}")
        runs.append(Run(f"engram_{share}pct", capacity_configs(*own), args, series="split", share=share))
    return runs


CAPACITY_KEYS = (32, 64, 128, 256)  # mem_n_keys of the CPU sweep: 1k to 64k values
PRESETS = {  # name: (the suite for a vocabulary size, people in the knowledge base, default seeds)
    "quick": (quick_suite, DEFAULT_ENTITIES, 2),
    # its dense model recalls 97% of 500 people's facts, 27% of 1000's and 8% of 2000's in 3000 iterations
    "capacity": (partial(capacity_suite, keys=CAPACITY_KEYS), 1000, 3),
    # the largest Memory+'s sparse parameters split between Memory+ and Engram, on the capacity preset
    "split": (partial(split_suite, keys=CAPACITY_KEYS[-1]), 1000, 3),
    # configs/capacity_gpu.py: the same suite at 4 layers of width 128, 16k to 1M values (one GPU)
    "capacity-gpu": (partial(capacity_suite, keys=(128, 256, 512, 1024), scale=("capacity_gpu",)), 8000, 3),
}


def config_path(name):
    return os.path.join(ROOT, "configs", f"{name}.py")


def facts_run(run, seed, out_dir, train_args, threads):
    """Train one run in out_dir (emptied first) and return its run_scores, or return those of the run already
    there when it finished with the same command: a stopped sweep, started again, trains only what is missing."""
    args = [*map(config_path, run.configs), *run.overrides, f"--seed={seed}", *train_args]
    path = os.path.join(out_dir, "log.jsonl")
    try:
        start, evals = finished(read_events(path))
        if start["command"][1:] == [os.path.join(ROOT, "train.py"), *args, f"--out_dir={out_dir}"]:
            return log_scores(start, evals, path)
    except (OSError, ValueError):  # nothing there, or no finished run
        pass
    shutil.rmtree(out_dir, ignore_errors=True)
    events, _ = train_and_log(args, out_dir, threads)
    return log_scores(*finished(events), path)


def read_events(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def finished(events):
    """(start event, eval events) of a finished run's log; ValueError for a run that did not finish."""
    start = next((e for e in events if e["event"] == "start"), None)
    evals = [e for e in events if e["event"] == "eval"]
    if start is None or not evals or evals[-1]["iter"] != start["config"]["max_iters"]:
        raise ValueError("not a finished run")
    return start, evals


def run_scores(out_dir):
    """A finished run's sizes (from its start event), scores (from its last eval), accuracy half-way and at
    every eval, and wall seconds from its start to its last eval, read from out_dir/log.jsonl."""
    path = os.path.join(out_dir, "log.jsonl")
    try:
        return log_scores(*finished(read_events(path)), path)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): train the run again (without --report)") from None
    except ValueError:
        raise UserError(f"{path} is not a finished run: train it again (without --report)") from None


def log_scores(start, evals, path):
    """run_scores of a finished run's start and eval events (of the log at path)."""
    final = evals[-1]
    if "facts_acc" not in final:
        raise UserError(f"{path} has no fact scores: does the dataset folder hold {EVAL_FILE}?")
    half, three_quarters = (min(evals, key=lambda e: abs(e["iter"] - final["iter"] * f)) for f in (1 / 2, 3 / 4))
    return {"params": start["params"], "active_params": start["active_params"],
            "flops_per_token": start["flops_per_token"], "tokens": start["tokens_per_iter"] * final["iter"],
            **{k: final[k] for k in ("val_loss", "facts_acc", "facts_acc_heldout", "facts_nll", "facts_nll_heldout")},
            "facts_acc_half": half["facts_acc"], "last_quarter": final["facts_acc"] - three_quarters["facts_acc"],
            "wall_s": final["time"] - start["time"],
            "curve": [(e["iter"] * start["tokens_per_iter"], e["facts_acc"]) for e in evals],
            "evals": [{k: e.get(k) for k in ("iter", "facts_acc", "mem_read_fraction", "mem_kl_uniform",
                                               "mem_cross_person_overlap")} for e in evals]}


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


def summary_table(rows):
    """One line per model: its sizes, the mean ± half the range of its accuracies over seeds and the range of its
    answer NLL."""
    lines = ["| model | seeds | params | FLOPs/token | fact acc | acc at half | last quarter | held-out acc | answer NLL |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_key = {key: by_model(rows, key) for key in ("seed", "params", "flops_per_token", "facts_acc", "facts_acc_half",
                                                   "last_quarter", "facts_acc_heldout", "facts_nll")}
    for model, seeds in by_key["seed"].items():
        lines.append(f"| {model} | {len(seeds)} | {by_key['params'][model][0]:,} | {by_key['flops_per_token'][model][0]:,} | "
                     f"{spread(by_key['facts_acc'][model])} | {spread(by_key['facts_acc_half'][model])} | "
                     f"{100 * mean(by_key['last_quarter'][model]):+.1f} | "
                     f"{spread(by_key['facts_acc_heldout'][model])} | {nll_range(by_key['facts_nll'][model])} |")
    return "\n".join(lines)


def curves_table(rows):
    """Every run's fact accuracy at each eval, and for memory runs (of the first memory layer) the values read,
    the KL of the reads from uniform and the rows shared across people (facts.shared_rows, in logs that have
    it): when each seed learns its facts, and how it uses its memory meanwhile."""
    def usage(e):
        shared = e.get("mem_cross_person_overlap")
        return (f"{e['mem_read_fraction'][0]:.0%}, {e['mem_kl_uniform'][0]:.1f}" +
                (f", {shared[0]:.2f}" if shared else ""))

    iters = [e["iter"] for e in rows[0]["evals"]]
    lines = ["| run | " + " | ".join(map(str, iters)) + " |", "|" + "---|" * (len(iters) + 1)]
    for r in rows:
        if [e["iter"] for e in r["evals"]] != iters:
            continue  # another schedule: no common columns
        lines.append(f"| {r['model']} seed {r['seed']} | " + " | ".join(f"{e['facts_acc']:.0%}" for e in r["evals"]) + " |")
        if r["evals"][0]["mem_read_fraction"]:
            lines.append("| read, KL, shared | " + " | ".join(map(usage, r["evals"])) + " |")
    return "\n".join(lines)


def by_model(rows, key):
    """{model: [key of each of its rows]}, in the order the models first appear."""
    values = {}
    for r in rows:
        values.setdefault(r["model"], []).append(r[key])
    return values


def mean(values):
    return sum(values) / len(values)


def spread(values):
    """mean ± half the range, as text: the seed spread of a table row's model."""
    return f"{mean(values):.1%}" + (f" ± {(max(values) - min(values)) / 2:.1%}" if len(values) > 1 else "")


def nll_range(values):
    """mean (lowest-highest over seeds), as text: whether two models' answer NLLs overlap at any seed."""
    return f"{mean(values):.3f}" + (f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else "")


def headline(rows):
    """The paper's claims, checked on means over seeds: Memory+ against dense at equal FLOPs, dense 2x and 4x
    and the matched MoE; for a memory-size sweep, whether accuracy rises with size; whether dense has stopped."""
    acc, nll = by_model(rows, "facts_acc"), by_model(rows, "facts_nll")
    sweep = [m for m in acc if m.startswith("memplus_")]
    memory = sweep[-1] if sweep else "memplus"
    lines = []
    if len(sweep) > 1:
        steps = list(zip(sweep, sweep[1:]))
        rising = sum(mean(acc[b]) > mean(acc[a]) for a, b in steps)
        clear = sum(mean(acc[b]) > max(acc[a]) for a, b in steps)
        lines.append("- Fact accuracy by memory size: " + ", ".join(f"{m[8:]} {spread(acc[m])}" for m in sweep) +
                     f"; the mean rises at {rising} of {len(steps)} steps (target: every one), {clear} of them "
                     "above the best seed of the size before")
        falling = sum(mean(nll[b]) < mean(nll[a]) for a, b in steps)
        apart = sum(max(nll[b]) < min(nll[a]) for a, b in steps)
        lines.append("- Answer NLL by memory size: " + ", ".join(f"{m[8:]} {nll_range(nll[m])}" for m in sweep) +
                     f"; the mean falls at {falling} of {len(steps)} steps, {apart} of them with every seed below "
                     "every seed of the size before")
    if memory in acc and "dense" in acc:
        ratio = f"{mean(acc[memory]) / mean(acc['dense']):.1f}x" if mean(acc["dense"]) else "no ratio (dense at 0%)"
        lines.append(f"- Memory+ ({memory}) fact accuracy {spread(acc[memory])} against dense {spread(acc['dense'])} "
                     f"at equal FLOPs per token: {ratio} (target: at least 2x)")
    for other in ("dense2x", "dense4x"):
        if memory in acc and other in acc:
            lines.append(f"- Memory+ ({memory}) against dense with {other[5:]} the FLOPs: fact accuracy "
                         f"{spread(acc[memory])} against {spread(acc[other])}, answer NLL {nll_range(nll[memory])} "
                         f"against {nll_range(nll[other])}")
    if memory in acc and "moe" in acc:
        seeds = list(zip(acc[memory], acc["moe"]))
        lines.append(f"- Memory+ ({memory}) fact accuracy {spread(acc[memory])} against {spread(acc['moe'])} for the MoE "
                     f"matched in FLOPs and parameters; higher at {sum(a > b for a, b in seeds)} of {len(seeds)} seeds "
                     "(target: every seed)")
    if memory in acc and "engram" in acc:
        lines.append(f"- Engram at about the parameters and FLOPs of Memory+ ({memory}): fact accuracy "
                     f"{spread(acc['engram'])} against {spread(acc[memory])}, answer NLL {mean(nll['engram']):.3f} "
                     f"against {mean(nll[memory]):.3f}")
    split = [m for m in acc if m.startswith("engram_") and m.endswith("pct")]
    if split:
        best = max(split, key=lambda m: mean(acc[m]))
        lines.append("- Sparse parameters given to Engram, the rest to Memory+: " +
                     ", ".join(f"{m[7:-3]}% {spread(acc[m])} (NLL {mean(nll[m]):.3f})" for m in split) +
                     f"; the most facts at {best[7:-3]}%")
    widest = max(acc, key=lambda m: max(acc[m]) - min(acc[m]))
    lines.append(f"- The widest seed spread: {widest} {spread(acc[widest])} (half the range; target: at most 5 points)")
    if "dense" in acc:
        gain = by_model(rows, "last_quarter")["dense"]
        lines.append(f"- Dense gained {100 * mean(gain):+.1f} points of fact accuracy in the last quarter of its schedule "
                     "(mean over seeds; a plateau: under 2)")
    half = by_model(rows, "facts_acc_half")
    if memory in acc and "dense" in acc:
        lines.append(f"- Gained in the second half of training (fact accuracy points, mean over seeds): dense "
                     f"{100 * (mean(acc['dense']) - mean(half['dense'])):+.1f}, Memory+ ({memory}) "
                     f"{100 * (mean(acc[memory]) - mean(half[memory])):+.1f}")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot drawing to files only, or None when matplotlib is not installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_facts(rows, runs, path):
    """Fact accuracy and answer NLL against total parameters (the means of each series as a line, seeds as
    bars), or against Engram's share of them for the split preset, and fact accuracy against tokens seen
    (mean over seeds); False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    series = {r.name: r.series for r in runs}
    shares = {r.name: r.share for r in runs}
    by_share = all(s is not None for s in shares.values())
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    groups = {}  # a line per series, a point per model outside one
    for model in by_model(rows, "model"):
        groups.setdefault(series.get(model) or model, []).append(model)
    for label, models in groups.items():
        color = next(colors)
        for ax, key in ((axes[0], "facts_acc"), (axes[1], "facts_nll")):
            points = [(shares[m] if by_share else by_model(rows, "params")[m][0], by_model(rows, key)[m])
                      for m in models]
            x, ys = zip(*points)
            ax.errorbar(x, [mean(y) for y in ys], yerr=[[mean(y) - min(y) for y in ys], [max(y) - mean(y) for y in ys]],
                        marker="o", capsize=3, color=color, label=label, linestyle="-" if len(models) > 1 else "none")
        for m, style in zip(models, ("-", "--", ":", "-.") * len(models)):
            curves = by_model(rows, "curve")[m]
            axes[2].plot([t for t, _ in curves[0]], [mean([c[i][1] for c in curves]) for i in range(len(curves[0]))],
                         color=color, linestyle=style, label=m)
    against = "Engram's share of the sparse parameters" if by_share else "parameters"
    titles = (f"recall against {against} (mean, bars: seed range)", f"answer NLL against {against}",
              "recall during training (mean over seeds)")
    for ax, ylabel, title in zip(axes, ("fact accuracy (greedy exact match)", "answer NLL per token", "fact accuracy"),
                                 titles):
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.set_xscale("linear" if by_share else "log")
        ax.set_xlabel("percent of the sparse parameters in Engram" if by_share else "total parameters")
    axes[1].set_yscale("log")  # trained to the end, models differ by factors of NLL where accuracy is near 100%
    axes[2].set_xlabel("tokens seen")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_facts(args):
    """The `facts` subcommand: train every model of the preset's suite, then write the results table and plot."""
    suite, default_entities, default_seeds = PRESETS[args.preset]
    entities = default_entities if args.entities is None else args.entities
    seeds = default_seeds if args.seeds is None else args.seeds
    if seeds < 1 or args.jobs < 1 or entities < 1:
        raise UserError("--seeds, --jobs and --entities must be at least 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(f"overrides must look like key=value, got {bad}")
    names = [r.name for r in suite(GPTConfig.vocab_size)]  # the names do not depend on the vocabulary
    chosen = args.models.split(",") if args.models else names
    unknown = [m for m in chosen if m not in names]
    if unknown:
        raise UserError(f"unknown models {unknown}: the {args.preset} preset has {', '.join(names)}")
    dataset = "facts" if entities == DEFAULT_ENTITIES else f"facts_{entities}"
    folder = os.path.join(args.data_dir, dataset)
    if not os.path.exists(os.path.join(folder, EVAL_FILE)):
        meta = write_facts(entities, 0, tuple(ATTRIBUTES), "compact", dataset, args.data_dir)
        print(f"made {folder}: {meta['source']}")
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    runs = [r for r in suite(meta["vocab_size"]) if r.name in chosen]
    train_args = [f"--data_dir={args.data_dir}", f"--dataset={dataset}"] + [f"--{o}" for o in args.overrides]
    jobs = [(r, seed) for r in runs for seed in range(1, (seeds if r.repeated else 1) + 1)]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def train(job):
        run, seed = job
        out_dir = os.path.join(args.out, f"{run.name}_seed{seed}")
        row = {"model": run.name, "seed": seed, **(run_scores(out_dir) if args.report else
                                                   facts_run(run, seed, out_dir, train_args, threads))}
        print(f"{run.name} seed {seed}: fact acc {row['facts_acc']:.1%}, answer nll {row['facts_nll']:.3f}, "
              f"{row['wall_s']:.0f} s", flush=True)
        return row

    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(train, jobs))
    took = ("" if args.report else f", {len(jobs)} runs in {(time.time() - start) / 60:.0f} minutes with --jobs {args.jobs}")
    settings = "\n".join(f"- {r.name}: `{' '.join([*r.configs, *r.overrides])}`" for r in runs)
    report = (f"# Factual recall: memory against dense at equal compute ({args.preset})\n\nData: {meta['source']}. "
              f"Command: `python tools/bench.py facts {' '.join(args.argv)}`{took}.\n\n{summary_table(rows)}\n\n"
              f"{headline(rows)}\n\nEvery run (wall s: from its start to its last eval):\n\n{markdown_table(rows)}\n\n"
              f"Fact accuracy at each eval (and a memory's values read, KL of its reads from uniform):\n\n"
              f"{curves_table(rows)}\n\n"
              f"Each model's configs (under configs/) and train.py overrides:\n{settings}\n")
    if plot_facts(rows, runs, os.path.join(args.out, "facts.png")):
        report += "\n![fact accuracy and answer NLL against parameters, and accuracy against tokens](facts.png)\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report)
    print(report)


def add_command(commands):
    """bench.py's `facts` subcommand."""
    f = commands.add_parser("facts", help="the factual-recall comparison: every model of a preset at one budget")
    f.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick: configs/facts_<model>.py (the default); capacity: the memory-size sweep on a knowledge "
                        "base larger than the small dense model holds; capacity-gpu: that sweep at a GPU's scale; "
                        "split: the largest Memory+'s sparse parameters split between Memory+ and Engram")
    f.add_argument("--models", help=f"comma-separated subset of the preset's models (quick: {','.join(QUICK_MODELS)}; "
                                    f"capacity: dense,dense2x,dense4x,memplus_1k,memplus_4k,memplus_16k,memplus_64k,moe,engram,peer; split: "
                                    f"engram_0pct,engram_25pct,engram_50pct,engram_75pct,engram_100pct)")
    f.add_argument("--seeds", type=int, help="seeds of the repeated models, the others get one (default: quick 2, "
                                              "capacity 3)")
    f.add_argument("--entities", type=int, help="people in the knowledge base (default: the preset's)")
    f.add_argument("--out", default="runs/facts", help="runs go to OUT/<model>_seed<seed>, results to OUT/results.md")
    f.add_argument("--data_dir", default="data",
                   help="the knowledge base is DATA_DIR/facts (or facts_<entities>), made if missing")
    f.add_argument("--jobs", type=int, default=1, help="runs trained at once, sharing the CPU cores between them")
    f.add_argument("--report", action="store_true", help="train nothing: write the table and plot of the runs in OUT")
    f.add_argument("overrides", nargs="*", metavar="key=value", help="train.py settings for every run")
    f.set_defaults(run=run_facts)
