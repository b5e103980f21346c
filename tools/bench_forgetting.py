"""Learning new facts without forgetting, run by `python tools/bench.py forgetting`: sparse memory finetuning
(Lin et al. 2025) against full finetuning, LoRA and finetuning every value, as the paper compares them.

The base model keeps its facts in its memory, so that new facts have somewhere to go: the capacity
preset's Memory+ (configs/capacity_*.py: 2 layers of width 32, 65,536 values in the second), pretrained
on knowledge base A until it recalls most of it (OUT/base, made once and reused). Every run finetunes it on
knowledge base B (other people, in the same vocabulary) with small batches, so that each step holds a
few dozen facts and the rows it may update serve each of them (in the paper a batch holds one fact's
paraphrases), and scores B (learned) and A (retained) at every eval: the whole learned/retained curve of
each run is in OUT/results.md and OUT/forgetting.png. No run decays weights: decay would shrink every row
of the table, read or not, and count as forgetting. The methods are swept over what they depend on
(learning rates, LoRA's rank, smf's rows per step and optimizer), with two ablations of smf's ranking (tf
alone; the background taken from B instead of A); each method's point at equal learning is rerun with
more seeds.
"""
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

from errors import UserError
from facts import ATTRIBUTES, EVAL_FILE
from prepare_data import write_facts
from tools.bench_facts import config_path, mean, pyplot, train_and_log

METHODS = ("full", "lora", "values", "smf")  # the finetune modes compared; ablations are smf runs beside them


def lrs(lr):
    return {"learning_rate": lr, "min_lr": lr / 10}


SWEEP = (  # (method, run name, train.py settings)
    *(("full", f"full_lr{lr:g}", {**lrs(lr), "mem_value_lr": 10 * lr}) for lr in (1e-4, 3e-4, 1e-3, 3e-3)),
    *(("lora", f"lora_r{r}_lr{lr:g}", {**lrs(lr), "lora_rank": r}) for r, lr in ((8, 1e-4), (8, 3e-4), (8, 1e-3), (2, 3e-4))),
    *(("values", f"values_lr{lr:g}", {"mem_value_lr": lr}) for lr in (0.01, 0.03, 0.1)),
    *(("smf", f"smf_rows{rows}_lr{lr:g}", {"smf_rows": rows, "mem_value_lr": lr})
      for rows, lr in ((500, 0.1), (1000, 0.1), (2000, 0.1), (4000, 0.1), (2000, 0.03), (2000, 0.3))),
    *(("smf", f"smf_rows2000_sgd_lr{lr:g}", {"smf_rows": 2000, "optimizer": "sgd", **lrs(lr), "mem_value_lr": lr})
      for lr in (100.0, 300.0, 1000.0)),
    ("smf, tf only", "smf_rows2000_lr0.1_tf_only", {"smf_rows": 2000, "mem_value_lr": 0.1, "smf_idf": False}),
    ("smf, background B", "smf_rows2000_lr0.1_background_B",
     {"smf_rows": 2000, "mem_value_lr": 0.1, "smf_background_dataset": "kb_new"}),
)
QUICK_SWEEP = tuple(r for r in SWEEP if r[1] in ("full_lr0.001", "lora_r8_lr0.001", "values_lr0.1", "smf_rows2000_lr0.1"))
BUDGET = {  # (people in A, people in B, pretraining iterations, finetuning iterations, eval interval, seeds)
    "full": (1000, 200, 3000, 300, 25, 3),
    "quick": (100, 30, 400, 40, 10, 1),
}
BASE_SEED = 1  # the capacity preset's seeds spread widely: this one recalls 96% of A, the default 1337 only 23%
BASE = [config_path("facts_common"), config_path("capacity_common"), config_path("capacity_memplus")]
FINETUNE = ["--batch_size=16", "--warmup_iters=0", "--weight_decay=0.0", "--log_interval=10"]


def first_at(evals, level):
    """The first eval whose B accuracy reaches level, or None."""
    return next((e for e in evals if e["facts_acc"] >= level), None)


def pretrained(base, common, iters):
    """base, pretrained on A unless it already holds a finished run of this budget (the cached step)."""
    log = os.path.join(base, "log.jsonl")
    if os.path.exists(os.path.join(base, "ckpt.pt")) and os.path.exists(log):
        with open(log) as f:
            if any(f'"iter": {iters}, ' in line and '"event": "eval"' in line for line in f):
                return base
    shutil.rmtree(base, ignore_errors=True)
    train_and_log([*common, "--dataset=kb", f"--max_iters={iters}", f"--eval_interval={iters // 4}", f"--seed={BASE_SEED}"],
                  base)
    return base


def run_forgetting(args):
    """The `forgetting` subcommand: pretrain on A (or take --base), finetune on B by every run of the sweep."""
    people, new_people, base_iters, iters, interval, seeds = BUDGET["quick" if args.quick else "full"]
    if args.jobs < 1:
        raise UserError("--jobs must be at least 1")
    data = os.path.join(args.out, "data")
    if not os.path.exists(os.path.join(data, "kb_new", EVAL_FILE)):
        write_facts(people, 0, tuple(ATTRIBUTES), "compact", "kb", data, new_entities=new_people)
    common = [*BASE, f"--data_dir={data}", "--facts_eval_size=500"]
    base = args.base or pretrained(os.path.join(args.out, "base"), common, base_iters)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def finetune(job):
        method, name, settings, seed = job
        out_dir = os.path.join(args.out, name + (f"_seed{seed}" if seed > 1 else ""))
        shutil.rmtree(out_dir, ignore_errors=True)
        mode = method.split(",")[0]
        events, wall = train_and_log([*common, *FINETUNE, "--dataset=kb_new", f"--init_from={base}", f"--finetune={mode}",
                                      "--facts_retain_dataset=kb", f"--max_iters={iters}", f"--eval_interval={interval}",
                                      f"--seed={seed}", *[f"--{k}={v!r}" for k, v in settings.items()]], out_dir, threads)
        evals = [e for e in events if e["event"] == "eval"]
        smf = [e for e in events if e["event"] == "train" and "smf_read_mass" in e]
        print(f"{name} seed {seed}: B acc {evals[-1]['facts_acc']:.1%}, A acc {evals[-1]['retain_facts_acc']:.1%}, "
              f"{wall:.0f} s", flush=True)
        return {"method": method, "name": name, "seed": seed, "wall_s": wall, "evals": evals, "smf": smf}

    sweep, start = QUICK_SWEEP if args.quick else SWEEP, time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(finetune, [(*run, 1) for run in sweep]))
        level, chosen = equal_learning(results)
        again = [(r["method"], r["name"], dict(next(s for m, n, s in sweep if n == r["name"])), seed)
                 for r in chosen.values() for seed in range(2, seeds + 1)]
        repeats = list(pool.map(finetune, again))
    report = forgetting_report(args, results, repeats, level, chosen, (people, new_people, iters, interval))
    report += f"\n{len(results) + len(repeats)} finetuning runs in {(time.time() - start) / 60:.1f} minutes with --jobs {args.jobs}.\n"
    if plot_forgetting(results, os.path.join(args.out, "forgetting.png")):
        report += "\n![learned against retained, every eval of every run](forgetting.png)\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report)
    print(report)


def best_b(result):
    return max(e["facts_acc"] for e in result["evals"])


def drop_at(result, level):
    """(the eval where B first reaches level, A's relative drop there), or (None, None)."""
    hit = first_at(result["evals"], level)
    base_a = result["evals"][0]["retain_facts_acc"]
    return (hit, (base_a - hit["retain_facts_acc"]) / base_a) if hit and base_a else (None, None)


def equal_learning(results):
    """(level, {method: its run with the lowest A drop at level}): level is the highest B accuracy that every
    method of METHODS reaches in some run."""
    level = min(max(best_b(r) for r in results if r["method"] == m) for m in METHODS)
    chosen = {}
    for r in results:
        drop = drop_at(r, level)[1]
        if r["method"] in METHODS and drop is not None and (
                r["method"] not in chosen or drop < drop_at(chosen[r["method"]], level)[1]):
            chosen[r["method"]] = r
    return level, chosen


def forgetting_report(args, results, repeats, level, chosen, budget):
    people, new_people, iters, interval = budget
    start = results[0]["evals"][0]
    base_a, base_b = start["retain_facts_acc"], start["facts_acc"]
    best = {m: max(best_b(r) for r in results if r["method"] == m) for m in METHODS}
    lines = [f"# Learning new facts without forgetting\n\nCommand: `python tools/bench.py forgetting {' '.join(args.argv)}`. "
             f"Memory+ pretrained on {people} people (A: {base_a:.1%} of their facts recalled, B: {base_b:.1%}), "
             f"finetuned on {new_people} new people (B) for {iters} iterations, evaluated every {interval}.\n",
             f"Equal learning: the first eval where B accuracy reaches {level:.1%}, the highest level every method "
             "reaches; the drop of A accuracy is relative to the pretrained model's.\n",
             "| method | run | B acc at equal learning (iter) | A acc there | A drop | best B acc | A acc at the end | "
             "smf: read mass / grad norm in the rows | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        hit, drop = drop_at(r, level)
        smf = (f"{mean([e['smf_read_mass'][0] for e in r['smf']]):.0%} / "
               f"{mean([e['smf_grad_share'][0] for e in r['smf']]):.0%}" if r["smf"] else "")
        lines.append(f"| {r['method']} | {r['name']} | " + (f"{hit['facts_acc']:.1%} ({hit['iter']}) | "
                     f"{hit['retain_facts_acc']:.1%} | {drop:.0%} | " if hit else "- | - | - | ") +
                     f"{best_b(r):.1%} | {r['evals'][-1]['retain_facts_acc']:.1%} | {smf} | {r['wall_s']:.0f} |")
    lines += ["\nEach method's run with the lowest A drop at equal learning, over seeds (mean ± half the range):\n",
              "| method | run | seeds | A drop at equal learning | best B acc | A acc at the end |", "|---|---|---|---|---|---|"]
    for method, r in chosen.items():
        runs = [r] + [x for x in repeats if x["name"] == r["name"]]
        drops = [drop_at(x, level)[1] for x in runs]
        lines.append(f"| {method} | {r['name']} | {len(runs)} | {spread(drops, '.0%')} | "
                     f"{spread([best_b(x) for x in runs], '.1%')} | "
                     f"{spread([x['evals'][-1]['retain_facts_acc'] for x in runs], '.1%')} |")
    learned = best["full"]  # a second level: what full finetuning learns at best
    lines += [f"\nAt the learning of full finetuning (B accuracy {learned:.1%}), each method's run with the lowest A drop:\n",
              "| method | run | A drop | A acc there |", "|---|---|---|---|"]
    for method in METHODS:
        hits = [(drop_at(r, learned), r["name"]) for r in results if r["method"] == method]
        hits = sorted(((drop, hit["retain_facts_acc"], name) for (hit, drop), name in hits if hit), key=lambda h: h[0])
        lines.append(f"| {method} | {hits[0][2]} | {hits[0][0]:.0%} | {hits[0][1]:.1%} |" if hits else
                     f"| {method} | - | does not reach it | - |")
    lines.append("\nBest B accuracy per method: " + ", ".join(f"{m} {b:.1%}" for m, b in best.items()) +
                 f"; smf reaches {best['smf'] / best['full']:.0%} of full finetuning's." if best["full"] else "")
    lines.append("\nEvery eval (B acc / A acc, %), per run:\n")
    for r in results + repeats:
        seed = f" seed {r['seed']}" if r["seed"] > 1 else ""
        lines.append(f"- {r['name']}{seed}: " + " ".join(f"{100 * e['facts_acc']:.0f}/{100 * e['retain_facts_acc']:.0f}"
                                                        for e in r["evals"]))
    return "\n".join(lines) + "\n"


def spread(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{mean(values):{fmt}}" + (f" ± {(max(values) - min(values)) / 2:{fmt}}" if len(values) > 1 else "")


def plot_forgetting(results, path):
    """Accuracy on B (learned) against accuracy on A (retained), a curve per run; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = dict(zip(sorted({r["method"] for r in results}), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for r in results:
        ax.plot([e["facts_acc"] for e in r["evals"]], [e["retain_facts_acc"] for e in r["evals"]], marker="o",
                markersize=2, color=colors[r["method"]], label=r["name"], alpha=0.8)
    ax.set_xlabel("fact accuracy on B (new facts, learned)")
    ax.set_ylabel("fact accuracy on A (old facts, retained)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def add_command(commands):
    """bench.py's `forgetting` subcommand."""
    fo = commands.add_parser("forgetting", help="sparse memory finetuning against full finetuning and LoRA")
    fo.add_argument("--out", default="runs/forgetting", help="data, runs, results.md and forgetting.png go here")
    fo.add_argument("--base", help="a run pretrained on OUT/data/kb to finetune (default: OUT/base, pretrained once)")
    fo.add_argument("--quick", action="store_true", help="a tiny knowledge base and budget, four runs (a smoke run)")
    fo.add_argument("--jobs", type=int, default=1, help="finetuning runs at once, sharing the CPU cores")
    fo.set_defaults(run=run_forgetting)
