"""Plot training runs side by side from their log.jsonl files (written by train.py).

    python tools/plot.py OUT_DIR [OUT_DIR ...] [--out FILE.png] [--title T] [--labels a,b,c]

One PNG with these panels: train and val loss against iterations, val loss against tokens seen, the
learning rate against iterations, and, when any run has memory layers, the fraction of each value
table's rows read at each eval. Runs are labelled by their folder names unless --labels is given.
Default output: OUT_DIR/plot.png for one run, runs.png in the current folder for several.

A log holding several "start" events is one resumed run: a start at iteration s drops what the run had
logged after s (those steps were redone), and tokens are counted with each segment's tokens per iter.
matplotlib is optional for the rest of the repository; this script needs it (pip install matplotlib).
"""
import argparse
import json
import os
import sys


class PlotError(Exception):
    """Bad input: one line for the user, no traceback."""


REQUIRED = {"start": ("iter", "tokens_per_iter"), "train": ("iter", "loss", "lr"), "eval": ("iter", "val_loss")}


def tokens_at(segment, it):
    """Tokens seen by iteration it of segment (first iter, tokens seen by then, tokens per iter); None when
    no start event came first."""
    if segment is None:
        return None
    start, tokens, per_iter = segment
    return tokens + (it - start) * per_iter


def read_run(out_dir):
    """The run logged in out_dir/log.jsonl: {"train": [...], "eval": [...]}, each a list of events sorted by
    iter, every event with a "tokens" field (tokens seen at its iter)."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{out_dir} has no log.jsonl: train first (python train.py CONFIG.py --out_dir={out_dir})")
    points = {"train": {}, "eval": {}}  # iter -> event: a resumed run's later event replaces the earlier one
    segment = None  # (first iter, tokens seen at it, tokens per iter) of the latest start
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
                kind = event["event"]
                missing = [key for key in REQUIRED.get(kind, ())
                           if not isinstance(event.get(key), (int, float)) or isinstance(event[key], bool)]
            except (ValueError, TypeError, KeyError):
                raise PlotError(f"{path} line {number} is not a JSON object with an 'event' field") from None
            if missing:
                raise PlotError(f"{path} line {number}: {kind} event without a number for {', '.join(missing)}")
            if kind == "start":
                start, per_iter = event["iter"], event["tokens_per_iter"]
                segment = (start, start * per_iter if segment is None else tokens_at(segment, start), per_iter)
                for series in points.values():  # a resumed run redoes the steps after its start
                    for it in [it for it in series if it > start]:
                        del series[it]
            elif kind in points:
                points[kind][event["iter"]] = {**event, "tokens": tokens_at(segment, event["iter"])}
    if not points["train"] and not points["eval"]:
        raise PlotError(f"{path} has no train or eval events: nothing to plot")
    return {kind: [series[it] for it in sorted(series)] for kind, series in points.items()}


def draw(runs, labels, out, title):
    """Write the figure comparing runs (lists of events from read_run) to the PNG out."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        raise PlotError("plot.py needs matplotlib: pip install matplotlib") from None
    with_usage = any("mem_read_fraction" in e for run in runs for e in run["eval"])
    fig, axes = plt.subplots(2, 2, figsize=(13, 9)) if with_usage else plt.subplots(1, 3, figsize=(18, 5))
    axes = list(axes.flat) if with_usage else list(axes)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (run, label) in enumerate(zip(runs, labels)):
        color = colors[k % len(colors)]
        train, evals = run["train"], run["eval"]
        axes[0].plot([e["iter"] for e in train], [e["loss"] for e in train], color=color, lw=1, alpha=0.6,
                     label=f"{label} train")
        axes[0].plot([e["iter"] for e in evals], [e["val_loss"] for e in evals], "o--", color=color, ms=3,
                     label=f"{label} val")
        counted = [e for e in evals if e["tokens"] is not None]
        axes[1].plot([e["tokens"] for e in counted], [e["val_loss"] for e in counted], "o-", color=color, ms=3,
                     label=label)
        axes[2].plot([e["iter"] for e in train], [e["lr"] for e in train], color=color, label=label)
        if with_usage:
            usage = [e for e in evals if "mem_read_fraction" in e]
            for table in range(max((len(e["mem_read_fraction"]) for e in usage), default=0)):
                read = [(e["iter"], e["mem_read_fraction"][table]) for e in usage
                        if table < len(e["mem_read_fraction"])]
                axes[3].plot(*zip(*read), marker="o", color=color, ms=3, ls=("-", "--", ":", "-.")[table % 4],
                             label=label if table == 0 else f"{label} table {table}")
    panels = [("train (solid) and val (dashed) loss", "iteration", "loss", "log"),
              ("val loss against tokens seen", "tokens seen", "val loss", "log"),
              ("learning rate (all weights but the value tables)", "iteration", "learning rate", "linear"),
              ("value table rows read at each eval", "iteration", "fraction of values read", "linear")]
    for ax, (name, xlabel, ylabel, yscale) in zip(axes, panels):
        ax.set(title=name, xlabel=xlabel, ylabel=ylabel, yscale=yscale)
        if yscale == "log":  # plain numbers at 1, 1.2, 1.5, 2, 3, ... of each decade rather than powers of ten
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 1.2, 1.5, 2, 3, 4, 5, 7)))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    axes[1].xaxis.set_major_formatter(ticker.EngFormatter())  # 500k, 1M, ...
    if with_usage:
        axes[3].set_ylim(0, 1.02)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot training runs from their OUT_DIR/log.jsonl files.")
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="a train.py out_dir holding log.jsonl")
    parser.add_argument("--out", help="PNG to write (default: OUT_DIR/plot.png for one run, else runs.png)")
    parser.add_argument("--title", help="figure title (default: the run labels)")
    parser.add_argument("--labels", help="comma-separated labels, one per OUT_DIR (default: folder names)")
    args = parser.parse_args(argv)
    try:
        labels = ([label.strip() for label in args.labels.split(",")] if args.labels
                  else [os.path.basename(os.path.abspath(d)) for d in args.out_dirs])
        if len(labels) != len(args.out_dirs):
            raise PlotError(f"--labels gives {len(labels)} labels for {len(args.out_dirs)} runs")
        runs = [read_run(d) for d in args.out_dirs]
        out = args.out or (os.path.join(args.out_dirs[0], "plot.png") if len(runs) == 1 else "runs.png")
        draw(runs, labels, out, args.title or ", ".join(labels))
    except PlotError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # an unreadable log, an unwritable --out
        sys.exit(f"error: {e}")
    print(out)


if __name__ == "__main__":
    main()
