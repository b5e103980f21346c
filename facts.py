"""Factual recall in miniature: the paper's headline (memory beats dense at equal compute) on a laptop.

A synthetic knowledge base: made-up people, each with a few attributes (birth year, city, employer,
field, instrument). Every fact is written in several statement templates and several question templates;
one question template per attribute is never trained on, so the eval measures extraction as well as
memorisation. The eval set holds a (prompt, answer) pair for every fact and question template.

    python prepare_data.py facts [--n_entities N] [--seed S] ...   # data/facts: bins, meta.json, eval.json
    python facts.py compare [--seeds 2] [--jobs 1] [--out runs/facts] [--models dense,memplus] [key=value ...]

`compare` trains every configs/facts_<model>.py (on top of configs/facts_common.py, which holds the data
and the one training budget) in its own out_dir, and writes a markdown table (and a plot when matplotlib
is installed) of fact accuracy and answer NLL against FLOPs and parameters.
"""
import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
EVAL_FILE = "eval.json"
DEFAULT_ENTITIES = 2000

# ---- the knowledge base -------------------------------------------------------------------------------
FIRST_SYLLABLES = ("al", "bar", "cor", "dan", "el", "fen", "gar", "hal", "is", "jor", "kel", "lor", "mar", "nor",
                   "or", "per", "quin", "ros", "sal", "tor", "ul", "val", "wen", "yor", "zan")
SECOND_SYLLABLES = ("a", "an", "e", "el", "en", "i", "in", "is", "o", "on", "or", "u", "us", "ia", "ic")
LAST_ENDINGS = ("berg", "dale", "ford", "gate", "holm", "mont", "ridge", "stein", "ton", "vik", "wick", "worth")

# attribute: (values, statement templates, question prompts). A question's line is its prompt, a space and
# the value; the last question of each attribute is held out of training.
ATTRIBUTES = {
    "year": (tuple(str(y) for y in range(1900, 2000)),
             ("{n} was born in {v}.", "{n}'s year of birth is {v}.", "The birth year of {n} is {v}."),
             ("Q: In what year was {n} born? A:", "Q: What is {n}'s birth year? A:", "Q: What year was {n} born in? A:")),
    "city": (("Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Vienna", "Prague", "Madrid", "Berlin", "Paris",
              "Rome", "Athens", "Tokyo", "Seoul", "Delhi", "Mumbai", "Nairobi", "Lagos", "Havana", "Quito",
              "Sydney", "Perth", "Toronto", "Chicago", "Boston", "Denver", "Houston", "Seattle", "Warsaw",
              "Helsinki", "Stockholm", "Geneva"),
             ("{n} grew up in {v}.", "{n}'s home town is {v}.", "The city where {n} grew up is {v}."),
             ("Q: In which city did {n} grow up? A:", "Q: Where is {n}'s home town? A:",
              "Q: Where did {n} grow up? A:")),
    "employer": (("Apex", "Borealis", "Cobalt", "Dynamo", "Everest", "Falcon", "Granite", "Harbor", "Ion",
                  "Juniper", "Keystone", "Lumen", "Meridian", "Nimbus", "Orbit", "Pinnacle", "Quartz", "Radiant",
                  "Summit", "Titan", "Umbra", "Vertex", "Willow", "Zenith"),
                 ("{n} works for {v}.", "{n} is employed by {v}.", "The employer of {n} is {v}."),
                 ("Q: Which company does {n} work for? A:", "Q: Who employs {n}? A:", "Q: Where does {n} work? A:")),
    "field": (("physics", "chemistry", "biology", "geology", "history", "law", "medicine", "music", "poetry",
               "economics", "botany", "astronomy", "architecture", "linguistics", "statistics", "philosophy"),
              ("{n} studied {v}.", "{n} holds a degree in {v}.", "The field of {n} is {v}."),
              ("Q: What did {n} study? A:", "Q: In which field is {n}'s degree? A:", "Q: What is {n}'s field? A:")),
    "instrument": (("piano", "violin", "cello", "flute", "guitar", "drums", "harp", "trumpet", "oboe", "banjo",
                    "clarinet", "organ"),
                   ("{n} plays the {v}.", "{n} practises the {v} every day.", "The instrument of {n} is the {v}."),
                   ("Q: Which instrument does {n} play? A: the", "Q: What does {n} practise every day? A: the",
                    "Q: What is {n}'s instrument? A: the")),
}


def make_names(n, rng):
    """n distinct two-part names. First and last names are each shared by many people, so only the pair
    identifies a person (as with real names)."""
    firsts = sorted({(a + b).capitalize() for a in FIRST_SYLLABLES for b in SECOND_SYLLABLES})
    lasts = sorted({(a + e).capitalize() for a in FIRST_SYLLABLES for e in LAST_ENDINGS})
    if n > len(firsts) * len(lasts) // 2:
        raise ValueError(f"n_entities={n} exceeds the {len(firsts) * len(lasts) // 2:,} names this generator makes")
    firsts = rng.sample(firsts, min(len(firsts), 4 * math.isqrt(n) + 8))
    names = set()
    while len(names) < n:
        names.add(f"{rng.choice(firsts)} {rng.choice(lasts)}")
    return sorted(names)


def make_facts(n_entities, seed, attributes=tuple(ATTRIBUTES)):
    """The knowledge base: [(name, {attribute: value})], deterministic for (n_entities, seed, attributes)."""
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown or not attributes:
        raise ValueError(f"unknown attributes {unknown}: choose from {', '.join(ATTRIBUTES)}")
    if n_entities < 1:
        raise ValueError(f"n_entities must be at least 1, got {n_entities}")
    rng = random.Random(seed)
    return [(name, {a: rng.choice(ATTRIBUTES[a][0]) for a in attributes}) for name in make_names(n_entities, rng)]


def fact_lines(name, attribute, value):
    """The fact in every statement template and every trained question."""
    _, statements, questions = ATTRIBUTES[attribute]
    return [s.format(n=name, v=value) for s in statements] + [f"{q.format(n=name)} {value}" for q in questions[:-1]]


def knowledge_text(facts, seed):
    """(train text, val text). Train: every fact in every training template, one per line, shuffled.
    Val: every fact once, in a random training template, so val loss measures how much of the knowledge
    base the model holds."""
    rng = random.Random(seed + 1)
    train, val = [], []
    for name, values in facts:
        for attribute, value in values.items():
            lines = fact_lines(name, attribute, value)
            train += lines
            val.append(rng.choice(lines))
    rng.shuffle(train)
    rng.shuffle(val)
    return "\n".join(train) + "\n", "\n".join(val) + "\n"


def eval_pairs(facts):
    """(prompt, answer) for every fact and question; the answer is the space and value that end the line."""
    return [{"prompt": q.format(n=name), "answer": " " + value, "entity": name, "attribute": attribute,
             "heldout": t == len(ATTRIBUTES[attribute][2]) - 1}
            for name, values in facts for attribute, value in values.items()
            for t, q in enumerate(ATTRIBUTES[attribute][2])]


def encode_pair(tokenizer, prompt, answer):
    """(prompt ids, answer ids): the tokens of "\\n" + prompt + answer split where the value starts.

    The newline puts the prompt at the start of a line, as in training. The answer's leading space goes
    to the prompt where the tokenizer keeps it apart (char), so that every answer token carries part of
    the value; with BPE it is part of the value's first token.
    """
    full = tokenizer.encode("\n" + prompt + answer)
    for head in ("\n" + prompt + " ", "\n" + prompt):
        try:
            ids = tokenizer.encode(head)
        except ValueError:  # a lone space is no token of a compact BPE vocabulary
            continue
        if full[:len(ids)] == ids and len(ids) < len(full):
            return ids, full[len(ids):]
    raise ValueError(f"the tokens of {prompt + answer!r} do not split between prompt and answer")


def write_eval(facts, seed, tokenizer, path):
    """eval.json: every pair with its token ids, in a random order, so any prefix is a random sample."""
    pairs = eval_pairs(facts)
    random.Random(seed + 2).shuffle(pairs)
    for pair in pairs:
        pair["prompt_ids"], pair["answer_ids"] = encode_pair(tokenizer, pair["prompt"], pair["answer"])
    with open(path, "w") as f:
        json.dump({"pairs": pairs}, f)
    return pairs


def write_dataset(n_entities, seed, attributes, tokenizer, name="facts", data_dir="data"):
    """data_dir/name: the bins and meta.json of prepare_data.write_dataset, and eval.json; returns meta."""
    import prepare_data  # imported here: prepare_data imports this module
    kb = make_facts(n_entities, seed, tuple(attributes))
    train, val = knowledge_text(kb, seed)
    source = f"facts.py: {n_entities} entities, attributes {','.join(attributes)}, seed {seed}"
    meta = prepare_data.write_dataset(train, name, tokenizer, data_dir, source, val_text=val)
    write_eval(kb, seed, prepare_data.Tokenizer(meta), os.path.join(data_dir, name, EVAL_FILE))
    return meta


def load_eval(folder, size):
    """The fixed eval sample of a dataset folder: {"": pairs of trained question templates, "_heldout":
    pairs of held-out ones}, size of each, as (prompt ids, answer ids); None when the folder has no eval file."""
    path = os.path.join(folder, EVAL_FILE)
    if size <= 0 or not os.path.exists(path):
        return None
    with open(path) as f:
        pairs = json.load(f)["pairs"]
    return {suffix: [(p["prompt_ids"], p["answer_ids"]) for p in pairs if p["heldout"] == heldout][:size]
            for suffix, heldout in (("", False), ("_heldout", True))}


# ---- scoring ------------------------------------------------------------------------------------------
@torch.no_grad()
def score(model, pairs, device="cpu", batch_size=128):
    """Exact-match accuracy of greedy answers and mean NLL per gold answer token, teacher-forced.

    model(idx) must return (logits, ...). One forward pass over prompt + gold answer gives both: greedy
    decoding reproduces the answer exactly when, at every answer position, the argmax given the gold
    prefix is the gold token (a greedy run that has matched so far has that very prefix). Rows are
    right-padded, which the causal model never sees from earlier positions.
    """
    correct, nll_sum, n_tokens = 0, 0.0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        length = max(len(p) + len(a) for p, a in chunk)
        idx = torch.zeros(len(chunk), length, dtype=torch.long)
        targets = torch.zeros_like(idx)
        is_answer = torch.zeros_like(idx, dtype=torch.bool)  # positions whose next token is an answer token
        for row, (prompt, answer) in enumerate(chunk):
            idx[row, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            span = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)
            targets[row, span] = torch.tensor(answer)
            is_answer[row, span] = True
        idx, targets, is_answer = idx.to(device), targets.to(device), is_answer.to(device)
        logits = model(idx)[0].float()
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        hit = (logits.argmax(-1) == targets) | ~is_answer
        correct += int(hit.all(dim=1).sum())
        nll_sum += float(nll[is_answer].sum())
        n_tokens += int(is_answer.sum())
    return {"acc": correct / len(pairs), "nll": nll_sum / n_tokens}


def score_facts(model, sample, device):
    """facts_acc, facts_nll (trained question templates), facts_acc_heldout, facts_nll_heldout; model in eval mode."""
    was_training = model.training
    model.eval()
    scores = {}
    for suffix, pairs in sample.items():
        result = score(model, pairs, device)
        scores[f"facts_acc{suffix}"], scores[f"facts_nll{suffix}"] = result["acc"], result["nll"]
    model.train(was_training)
    return scores


def describe_scores(scores):
    return (f", facts acc {scores['facts_acc']:.1%} (held-out questions {scores['facts_acc_heldout']:.1%}), "
            f"answer nll {scores['facts_nll']:.3f} ({scores['facts_nll_heldout']:.3f})")


# ---- the comparison -----------------------------------------------------------------------------------
MODELS = ("dense", "dense2x", "dense4x", "memory", "memplus", "moe", "peer")  # configs/facts_<model>.py
REPEATED = ("dense", "memplus")  # the headline pair: trained with every seed, the others with the first
COLUMNS = (("model", "model"), ("seed", "seed"), ("params", "params"), ("active params", "active_params"),
           ("FLOPs/token", "flops_per_token"), ("tokens", "tokens"), ("fact acc", "facts_acc"),
           ("held-out acc", "facts_acc_heldout"), ("answer NLL", "facts_nll"), ("held-out NLL", "facts_nll_heldout"),
           ("val loss", "val_loss"), ("wall s", "wall_s"))


def config_path(model):
    return os.path.join(ROOT, "configs", f"facts_{model}.py")


def train_run(model, seed, out_dir, train_args, threads):
    """Train configs/facts_common.py then configs/facts_<model>.py in out_dir (emptied first), output to
    out_dir/train.out; returns wall seconds."""
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    command = [sys.executable, os.path.join(ROOT, "train.py"), config_path("common"), config_path(model),
               f"--out_dir={out_dir}", f"--seed={seed}", *train_args]
    start = time.time()
    with open(os.path.join(out_dir, "train.out"), "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                              env=dict(os.environ, OMP_NUM_THREADS=str(threads))).returncode
    if code != 0:
        raise RuntimeError(f"training {model} (seed {seed}) failed with exit code {code}: see {out_dir}/train.out")
    return time.time() - start


def read_run(out_dir):
    """Sizes from the run's start event and scores from its last eval event in log.jsonl."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        events = [json.loads(line) for line in f]
    start = next(e for e in events if e["event"] == "start")
    final = [e for e in events if e["event"] == "eval"][-1]
    if "facts_acc" not in final:
        raise RuntimeError(f"{out_dir}/log.jsonl has no fact scores: does the dataset folder hold {EVAL_FILE}?")
    return {"params": start["params"], "active_params": start["active_params"],
            "flops_per_token": start["flops_per_token"], "tokens": start["tokens_per_iter"] * final["iter"],
            **{k: final[k] for k in ("val_loss", "facts_acc", "facts_acc_heldout", "facts_nll", "facts_nll_heldout")}}


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


def plot(rows, path):
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


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"error: {message}")


def compare(argv):
    """python facts.py compare: train every model of the suite, then write the results table and plot."""
    p = OneLineErrors(prog="facts.py compare", description=compare.__doc__)
    p.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} (default: every one with a config)")
    p.add_argument("--seeds", type=int, default=2, help=f"seeds of {' and '.join(REPEATED)}; the others get one")
    p.add_argument("--out", default="runs/facts", help="runs go to OUT/<model>_seed<seed>, results to OUT/results.md")
    p.add_argument("--data_dir", default="data", help="the dataset is DATA_DIR/facts, made with the defaults if missing")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, sharing the CPU cores between them")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="train.py settings for every run")
    args = p.parse_args(argv)
    if args.models:
        models = args.models.split(",")
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            raise ValueError(f"unknown models {unknown}: choose from {', '.join(MODELS)}")
        missing = [config_path(m) for m in models if not os.path.exists(config_path(m))]
        if missing:
            raise ValueError(f"no config for {', '.join(missing)}")
    else:
        models = [m for m in MODELS if os.path.exists(config_path(m))]
        skipped = [m for m in MODELS if m not in models]
        if skipped:
            print(f"no config for {', '.join(skipped)}: skipped")
    if args.seeds < 1 or args.jobs < 1:
        raise ValueError("--seeds and --jobs must be at least 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value, got {bad}")
    if not os.path.exists(os.path.join(args.data_dir, "facts", EVAL_FILE)):
        meta = write_dataset(DEFAULT_ENTITIES, 0, tuple(ATTRIBUTES), "compact", "facts", args.data_dir)
        print(f"made {args.data_dir}/facts: {meta['source']}")
    train_args = [f"--data_dir={args.data_dir}"] + [f"--{o}" for o in args.overrides]
    runs = [(m, seed) for m in models for seed in range(1, (args.seeds if m in REPEATED else 1) + 1)]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def run(model_seed):
        model, seed = model_seed
        out_dir = os.path.join(args.out, f"{model}_seed{seed}")
        wall = train_run(model, seed, out_dir, train_args, threads)
        row = {"model": model, "seed": seed, **read_run(out_dir), "wall_s": wall}
        print(f"{model} seed {seed}: fact acc {row['facts_acc']:.1%}, answer nll {row['facts_nll']:.3f}, "
              f"{wall:.0f} s", flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, runs))
    with open(os.path.join(args.data_dir, "facts", "meta.json")) as f:
        source = json.load(f)["source"]
    report = (f"# Factual recall: memory against dense at equal compute\n\nData: {source}. Command: `python facts.py "
              f"compare {' '.join(argv)}`.\n\n{markdown_table(rows)}\n\n{headline(rows)}\n")
    if plot(rows, os.path.join(args.out, "facts.png")):
        report += "\n![fact accuracy against FLOPs and parameters](facts.png)\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report)
    print(report)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "compare":
        sys.exit("usage: python facts.py compare [--seeds N] [--jobs N] [--out DIR] [--models A,B] [key=value ...]")
    try:
        compare(argv[1:])
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
