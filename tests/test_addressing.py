"""Addressing (facts.shared_rows, facts.answer_reads, tools/addressing.py and the overlap train.py logs): the
rows two questions share, against pairwise set intersections, and the rows read where the answer is
predicted, against a forward pass over each whole question and answer."""
import itertools
import json
import random

import pytest
import torch

import memory
import facts
from conftest import run
from prepare_data import write_facts
from facts import answer_reads, shared_rows
from tools.bench_facts import read_events


def pairwise_shared(rows, people, attributes):
    """shared_rows by brute force: the mean over ordered pairs of each kind of |rows_i & rows_j| / mean |rows|."""
    sets = [set(r.tolist()) for r in rows]
    size = sum(map(len, sets)) / len(sets)
    kinds = {k: [] for k in range(4)}
    for i, j in itertools.permutations(range(len(sets)), 2):
        same_person, same_attribute = people[i] == people[j], attributes[i] == attributes[j]
        kind = 0 if same_person and same_attribute else 1 if same_person else 2 if same_attribute else 3
        kinds[kind].append(len(sets[i] & sets[j]) / size)
    return [sum(v) / len(v) if v else float("nan") for v in kinds.values()]


def test_shared_rows_equals_the_mean_of_pairwise_intersections():
    """Random reads (two heads that may read one row twice) of 5 people x 3 attributes x 2 questions each."""
    rng = random.Random(0)
    people, attributes = zip(*[(p, a) for p in "abcde" for a in "xyz" for _ in range(2)])
    rows = torch.tensor([[rng.randrange(12) for _ in range(6)] for _ in people])
    assert shared_rows(rows, people, attributes) == pytest.approx(pairwise_shared(rows, people, attributes), rel=1e-9)


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory, gpt2_bpe):
    """A memory model trained 4 steps on a knowledge base of 20 people (its out_dir)."""
    from config import load_config
    from train import train
    folder = tmp_path_factory.mktemp("addressing")
    write_facts(20, 0, list(facts.ATTRIBUTES), "compact", "facts", str(folder / "data"))
    config = load_config([])
    config.update(dataset="facts", data_dir=str(folder / "data"), out_dir=str(folder / "run"), n_layer=2, n_head=2,
                  n_embd=32, block_size=32, batch_size=4, max_iters=4, eval_interval=4, eval_iters=1,
                  facts_eval_size=20, memory_layers=(1,), mem_n_keys=8, mem_heads=2, mem_knn=4, device="cpu")
    train(config)
    return folder / "run"


def reads_one_question_at_a_time(model, questions):
    """The rows a memory model reads where it predicts each answer, from a pass over question and answer."""
    seen, lookup, reads = [], memory.ProductKeyMemory.lookup, []
    for q in questions:
        ids = q["prompt_ids"] + q["answer_ids"]
        memory.ProductKeyMemory.lookup = lambda layer, h: seen.append(lookup(layer, h)) or seen[-1]
        try:
            with torch.no_grad():
                model(torch.tensor([ids]))
        finally:
            memory.ProductKeyMemory.lookup = lookup
        reads.append(seen.pop()[0].reshape(len(ids), -1)[len(q["prompt_ids"]) - 1])
    return torch.stack(reads)


def trained_questions(memory_run, n):
    with open(memory_run.parent / "data" / "facts" / facts.EVAL_FILE) as f:
        return [p for p in json.load(f)["pairs"] if not p["heldout"]][:n]


def test_rows_read_are_those_of_the_last_prompt_token_in_a_pass_over_question_and_answer(memory_run):
    """Batches of 2 prompts of unequal lengths: right-padding must not move the read position."""
    from sample import load_model
    model, _, _ = load_model(str(memory_run / "ckpt.pt"), "cpu")
    questions = trained_questions(memory_run, 5)
    assert len({len(q["prompt_ids"]) for q in questions}) > 1
    reads, = answer_reads(model, [q["prompt_ids"] for q in questions], batch_size=2)
    assert torch.equal(reads, reads_one_question_at_a_time(model, questions))


def test_the_log_gives_the_rows_shared_across_people_at_each_eval(memory_run):
    """The last eval's mem_cross_person_overlap, against brute-force intersections of the checkpoint's reads."""
    from sample import load_model
    model, _, ckpt = load_model(str(memory_run / "ckpt.pt"), "cpu")
    evals = [e for e in read_events(memory_run / "log.jsonl") if e["event"] == "eval"]
    assert evals[-1]["iter"] == ckpt["iter_num"] and all(len(e["mem_cross_person_overlap"]) == 1 for e in evals)
    questions = trained_questions(memory_run, 20)
    want = pairwise_shared(reads_one_question_at_a_time(model, questions), [q["entity"] for q in questions],
                           [q["attribute"] for q in questions])[2]
    assert evals[-1]["mem_cross_person_overlap"][0] == pytest.approx(want, rel=1e-9)


def test_the_command_prints_a_row_per_memory_layer_and_refuses_a_folder_without_a_run(memory_run, tmp_path):
    result = run("tools/addressing.py", str(memory_run), "--questions=30")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(f"| {memory_run} |")]
    assert len(rows) == 1
    _, iteration, _, layer, read, *shared = rows[0].strip("| ").split(" | ")
    assert (iteration, layer) == ("4", "1") and 0 < int(read.replace(",", "")) <= 64 and len(shared) == 4
    result = run("tools/addressing.py", str(tmp_path))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "OUT_DIR must be a train.py out_dir" in result.stderr
