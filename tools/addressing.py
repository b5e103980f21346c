"""Whether a memory model's reads tell its facts apart: which value rows each question of the knowledge base
reads where the model predicts the answer, and how many of them two questions share.

    python tools/addressing.py OUT_DIR [OUT_DIR ...] [--questions 2000] [--checkpoint ckpt.pt]

For every memory layer of each run's checkpoint (a facts run of tools/bench.py, or any train.py run on a
dataset made by `prepare_data.py facts`): the distinct rows the questions read, then the mean fraction of
its rows a question shares with another question, over four kinds of pairs. A memory that has learned its
facts reads the same rows for one fact asked in other words, and few rows in common for two people asked
the same attribute: rows shared across people must hold all of their answers at once. The capacity
benchmark's seeds that recall fewer facts share more rows across people (README: the capacity figure).
"""
import json
import os
import sys

import torch

if __package__ in (None, ""):  # run as `python tools/addressing.py`: the repository's modules are one folder up
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from errors import OneLineErrors, UserError
from facts import EVAL_FILE, PAIRS, answer_reads, shared_rows
from sample import load_model
from tools.bench_facts import read_events


def run_report(out_dir, questions, checkpoint):
    """The markdown rows of one run: one per memory layer."""
    events = read_events(os.path.join(out_dir, "log.jsonl"))
    config = next(e for e in events if e["event"] == "start")["config"]
    scored = [e for e in events if e["event"] == "eval" and "facts_acc" in e]
    eval_path = os.path.join(config["data_dir"], config["dataset"], EVAL_FILE)
    if not os.path.exists(eval_path):
        raise UserError(f"{out_dir} was trained on {config['dataset']}, which has no {EVAL_FILE} in "
                        f"{config['data_dir']}: addressing needs a knowledge base made by prepare_data.py facts")
    with open(eval_path) as f:
        asked = [p for p in json.load(f)["pairs"] if not p["heldout"]][:questions]
    model, _, ckpt = load_model(os.path.join(out_dir, checkpoint), "cpu")
    layers = answer_reads(model, [p["prompt_ids"] for p in asked])
    if not layers:
        raise UserError(f"{out_dir} has no memory layer: addressing measures the reads of memory layers")
    acc = f"{scored[-1]['facts_acc']:.1%}" if scored else "-"
    rows = []
    for layer, reads in zip(model.config.memory_layers, layers):
        shared = shared_rows(reads, [p["entity"] for p in asked], [p["attribute"] for p in asked])
        rows.append(f"| {out_dir} | {ckpt['iter_num']} | {acc} | {layer} | {len(torch.unique(reads)):,} | "
                    + " | ".join(f"{s:.3f}" for s in shared) + " |")
    return rows


def main(argv=None):
    parser = OneLineErrors(description=__doc__.splitlines()[0])
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="a train.py out_dir with ckpt.pt and log.jsonl")
    parser.add_argument("--questions", type=int, default=2000, help="questions of trained templates asked (2000)")
    parser.add_argument("--checkpoint", default="ckpt.pt", help="the checkpoint file in each OUT_DIR (ckpt.pt)")
    args = parser.parse_args(argv)
    if args.questions < 2:
        parser.error(f"--questions={args.questions}: at least 2, for a pair")
    print(f"| run | iter | fact acc | layer | rows read | {' | '.join(PAIRS)} |")
    print("|---" * (5 + len(PAIRS)) + "|")
    try:
        for out_dir in args.out_dirs:
            print("\n".join(run_report(out_dir, args.questions, args.checkpoint)), flush=True)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # no log.jsonl or checkpoint there
        sys.exit(f"error: cannot read {e.filename} ({e.strerror}): OUT_DIR must be a train.py out_dir")


if __name__ == "__main__":
    main()
