"""Factual recall in miniature: the paper's headline (memory beats dense at equal compute) on a laptop.

A synthetic knowledge base: made-up people, each with a few attributes (birth year, city, employer,
field, instrument). Every fact is written in several statement templates and several question templates;
one question template per attribute is never trained on, so the eval measures extraction as well as
memorisation. The eval set holds a (prompt, answer) pair for every fact and question template.

    python prepare_data.py facts [--n_entities N] [--seed S] ...   # data/facts: bins, meta.json, eval.json
    python tools/bench.py facts [--seeds 2] [--jobs 1] [--models dense,memplus] [key=value ...]   # the comparison

This module holds the knowledge base and its metric (greedy exact-match accuracy and gold-answer NLL,
which train.py logs at every eval when the dataset folder has an eval.json).
"""
import json
import math
import os
import random

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import read_json
from errors import DataError
from memory import ProductKeyMemory

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


def make_names(n, rng, exclude=()):
    """n distinct two-part names, none of them in exclude. First and last names are each shared by many
    people, so only the pair identifies a person (as with real names); excluding another knowledge base's
    names makes new people (for finetuning on facts the model has never seen), whose first or last name
    alone may still be familiar, as within one knowledge base. An empty exclude draws what it always drew."""
    firsts = sorted({(a + b).capitalize() for a in FIRST_SYLLABLES for b in SECOND_SYLLABLES})
    lasts = sorted({(a + e).capitalize() for a in FIRST_SYLLABLES for e in LAST_ENDINGS})
    if n > len(firsts) * len(lasts) // 2:
        raise ValueError(f"n_entities={n} exceeds the {len(firsts) * len(lasts) // 2:,} names this generator makes")
    firsts = rng.sample(firsts, min(len(firsts), 4 * math.isqrt(n) + 8))
    exclude = set(exclude)
    drawable = {f"{first} {last}" for first in firsts for last in lasts} if exclude else set()
    if n > len(firsts) * len(lasts) - len(exclude & drawable):  # the draw below would never end
        raise ValueError(f"n_entities={n} exceeds the names left after excluding {len(exclude):,}")
    names = set()
    while len(names) < n:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name not in exclude:
            names.add(name)
    return sorted(names)


def make_facts(n_entities, seed, attributes=tuple(ATTRIBUTES), exclude=()):
    """The knowledge base: [(name, {attribute: value})], deterministic for (n_entities, seed, attributes,
    exclude). exclude: names no person may have, e.g. [name for name, _ in kb_a] for a second knowledge
    base of new people with the same kinds of attributes (the finetuning set of finetune.py)."""
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown or not attributes:
        raise ValueError(f"unknown attributes {unknown}: choose from {', '.join(ATTRIBUTES)}")
    if n_entities < 1:
        raise ValueError(f"n_entities must be at least 1, got {n_entities}")
    rng = random.Random(seed)
    return [(name, {a: rng.choice(ATTRIBUTES[a][0]) for a in attributes})
            for name in make_names(n_entities, rng, exclude)]


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


@dataclass(frozen=True)
class EvalSample:
    """The fixed eval sample of a knowledge base: (prompt ids, answer ids) of trained and of held-out question
    templates, and the (person, attribute) each trained pair asks about."""
    trained: list
    heldout: list
    asked: list


def load_eval(folder, size, vocab_size):
    """The EvalSample of a dataset folder, size pairs of each kind; None when the folder has no eval file.
    A file that is not what write_eval writes for a vocabulary of vocab_size is a one-line DataError."""
    path = os.path.join(folder, EVAL_FILE)
    if size <= 0 or not os.path.exists(path):
        return None
    data, problem = read_json(path, lambda d: eval_problem(d, vocab_size))
    if problem:
        raise DataError(f"{path} {problem}: make it again with `python prepare_data.py facts --name "
                        f"{os.path.basename(os.path.abspath(folder))}`, or delete it to train without fact scores")
    trained, heldout = ([p for p in data["pairs"] if p["heldout"] == kind][:size] for kind in (False, True))
    return EvalSample([(p["prompt_ids"], p["answer_ids"]) for p in trained],
                      [(p["prompt_ids"], p["answer_ids"]) for p in heldout],
                      [(p["entity"], p["attribute"]) for p in trained])


def eval_problem(data, vocab_size):
    """What keeps data (an eval file's JSON) from being trained and held-out pairs of ids below vocab_size."""
    def ids(value):
        return isinstance(value, list) and value and all(type(i) is int and 0 <= i < vocab_size for i in value)
    pairs = data.get("pairs") if isinstance(data, dict) else None
    if not isinstance(pairs, list):
        return "holds no list of 'pairs'"
    for n, p in enumerate(pairs):
        if not (isinstance(p, dict) and type(p.get("heldout")) is bool and ids(p.get("prompt_ids"))
                and ids(p.get("answer_ids")) and isinstance(p.get("entity"), str)
                and isinstance(p.get("attribute"), str)):
            return (f"has a pair {n} that is not prompt_ids and answer_ids (ids below the vocabulary size "
                    f"{vocab_size}), entity and attribute (text) and heldout (true or false)")
    if {p["heldout"] for p in pairs} != {False, True}:
        return "lacks pairs of trained or of held-out questions"
    return None


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


# ---- addressing: whether a memory's reads tell the facts apart --------------------------------------------
PAIRS = ("same fact, other question", "same person, other attribute", "other person, same attribute",
         "other person, other attribute")
CROSS_PERSON = "other person, same attribute"  # rows shared across people must hold all their answers at once


def shared_rows(rows, people, attributes):
    """Mean fraction of a question's rows that another question reads too, for each kind of pair in PAIRS.

    rows (questions, k): the rows each question reads (a row read by two heads counts once); people,
    attributes: one label per question. Counted per row rather than per pair: a row read by n questions of a
    group is shared by n**2 ordered pairs of it (each question with itself included), so the squares of the
    counts per (row, group) sum the shared rows of all pairs within each group, with no questions**2 matrix."""
    def label_ids(labels):
        ids = {}
        return torch.tensor([ids.setdefault(label, len(ids)) for label in labels])

    question = torch.arange(len(rows))[:, None].expand_as(rows)
    read = torch.unique(torch.stack([question.flatten(), rows.flatten()], 1), dim=0)  # (question, row), once each
    person, attribute = label_ids(people), label_ids(attributes)
    groups = {"fact": label_ids(list(zip(people, attributes))), "person": person, "attribute": attribute,
              "all": torch.zeros_like(person)}
    shared, pairs = {}, {}
    for name, group in groups.items():
        by_row = torch.unique(torch.stack([read[:, 1], group[read[:, 0]]], 1), dim=0, return_counts=True)[1]
        shared[name] = float((by_row.double() ** 2).sum())
        pairs[name] = float((torch.bincount(group).double() ** 2).sum())
    n, own = len(rows), len(read)  # own: each question with itself
    kinds = [(shared["fact"] - own, pairs["fact"] - n),
             (shared["person"] - shared["fact"], pairs["person"] - pairs["fact"]),
             (shared["attribute"] - shared["fact"], pairs["attribute"] - pairs["fact"]),
             (shared["all"] - shared["person"] - shared["attribute"] + shared["fact"],
              pairs["all"] - pairs["person"] - pairs["attribute"] + pairs["fact"])]
    per_question = own / n
    return [s / (p * per_question) if p else float("nan") for s, p in kinds]


@torch.no_grad()
def answer_reads(model, prompts, device="cpu", batch_size=128):
    """(questions, heads * knn) rows read at each prompt's last token, where the model predicts the answer: one
    tensor per memory layer ([] without one). A forward hook repeats each memory layer's lookup on its input,
    so the model runs unchanged; rows are right-padded, which the causal model never sees from earlier tokens."""
    layers = [m for m in model.modules() if isinstance(m, ProductKeyMemory)]
    reads, batches = [], []
    hooks = [layer.register_forward_hook(lambda m, args, out: reads.append(m.lookup(args[0].reshape(-1, m.dim))[0]))
             for layer in layers]
    try:
        for start in range(0 if layers else len(prompts), len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            length = max(map(len, chunk))
            idx = torch.tensor([p + [0] * (length - len(p)) for p in chunk], device=device)
            last = torch.tensor([len(p) - 1 for p in chunk], device=device)
            reads.clear()
            model(idx)
            batches.append([r.reshape(len(chunk), length, -1)[torch.arange(len(chunk), device=device), last].cpu()
                            for r in reads])
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(layer) for layer in zip(*batches)]


def score_facts(model, sample, device):
    """facts_acc, facts_nll (trained question templates), facts_acc_heldout, facts_nll_heldout of an EvalSample,
    and for a memory model mem_cross_person_overlap (one per memory layer: how far its reads fail to tell
    people apart, shared_rows); model in eval mode."""
    was_training = model.training
    model.eval()
    scores = {}
    for suffix, pairs in (("", sample.trained), ("_heldout", sample.heldout)):
        result = score(model, pairs, device)
        scores[f"facts_acc{suffix}"], scores[f"facts_nll{suffix}"] = result["acc"], result["nll"]
    reads = answer_reads(model, [prompt for prompt, _ in sample.trained], device)
    if reads and len(sample.asked) > 1:
        people, attributes = zip(*sample.asked)
        scores["mem_cross_person_overlap"] = [shared_rows(r, people, attributes)[PAIRS.index(CROSS_PERSON)]
                                              for r in reads]
    model.train(was_training)
    return scores


def describe_scores(scores):
    return (f", facts acc {scores['facts_acc']:.1%} (held-out questions {scores['facts_acc_heldout']:.1%}), "
            f"answer nll {scores['facts_nll']:.3f} ({scores['facts_nll_heldout']:.3f})" +
            "".join(f", rows shared across people {s:.3f}" for s in scores.get("mem_cross_person_overlap", [])))
