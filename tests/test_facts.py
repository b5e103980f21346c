"""The factual-recall benchmark: generator, prepared files, scoring against references, train.py and compare."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tools import bench_facts
import facts
from conftest import ROOT
from model import GPT, GPTConfig
from data import Tokenizer
from prepare_data import write_facts


def test_generator_is_deterministic_for_a_seed():
    assert facts.make_facts(200, seed=3) == facts.make_facts(200, seed=3)
    assert facts.knowledge_text(facts.make_facts(50, 3), 3) == facts.knowledge_text(facts.make_facts(50, 3), 3)
    assert facts.make_facts(200, seed=3) != facts.make_facts(200, seed=4)
    kb = facts.make_facts(500, seed=0)
    names = [name for name, _ in kb]
    assert len(set(names)) == 500
    assert len({n.split()[0] for n in names}) < 250 and len({n.split()[1] for n in names}) < 250  # shared parts
    assert all(set(values) == set(facts.ATTRIBUTES) for _, values in kb)


def test_every_eval_answer_is_a_fact_of_the_training_text():
    kb = facts.make_facts(40, seed=1)
    truth = {name: values for name, values in kb}
    train, val = facts.knowledge_text(kb, seed=1)
    lines = train.splitlines()
    pairs = facts.eval_pairs(kb)
    assert len(pairs) == 40 * len(facts.ATTRIBUTES) * 3
    for pair in pairs:
        value = pair["answer"].strip()
        assert value == truth[pair["entity"]][pair["attribute"]]
        stating = [line for line in lines if pair["entity"] in line and line.rstrip(".").endswith(value)]
        assert len(stating) >= 3  # the fact itself is trained, in several phrasings
        line = pair["prompt"] + pair["answer"]
        if pair["heldout"]:  # only the question's phrasing is new
            assert not any(l.startswith(pair["prompt"]) for l in lines)
        else:
            assert line in lines
    assert set(val.splitlines()) <= set(lines)
    assert sum(p["heldout"] for p in pairs) == len(pairs) // 3


@pytest.mark.parametrize("kind", ["compact", "char"])
def test_prepared_files_decode_to_the_knowledge_text(tmp_path, kind, request):
    if kind == "compact":
        request.getfixturevalue("gpt2_bpe")
    meta = write_facts(30, 5, list(facts.ATTRIBUTES), kind, "kb", str(tmp_path))
    tokenizer = Tokenizer(meta)
    train, val = facts.knowledge_text(facts.make_facts(30, 5), 5)
    for split, text in (("train", train), ("val", val)):
        ids = np.fromfile(tmp_path / "kb" / f"{split}.bin", dtype=np.uint16).tolist()
        assert tokenizer.decode(ids) == text
    with open(tmp_path / "kb" / "eval.json") as f:
        pairs = json.load(f)["pairs"]
    assert len(pairs) == 30 * len(facts.ATTRIBUTES) * 3
    for pair in pairs:
        assert tokenizer.decode(pair["prompt_ids"] + pair["answer_ids"]) == "\n" + pair["prompt"] + pair["answer"]
        answer_text = tokenizer.decode(pair["answer_ids"])
        assert answer_text.strip() == pair["answer"].strip()
        assert answer_text.startswith(" ") == (kind == "compact")  # char: the space is part of the prompt


def test_unknown_attribute_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "facts", "--attributes=year,shoe",
                             f"--data_dir={tmp_path}"], capture_output=True, text=True)
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: unknown attributes ['shoe']")


class LookupModel:
    """Stand-in with GPT's interface that knows the continuation of some sequences: a big logit on the known
    next token after a known prefix, uniform logits elsewhere."""

    def __init__(self, vocab_size, known_sequences):
        self.vocab_size = vocab_size
        self.next_token = {tuple(seq[:i]): seq[i] for seq in known_sequences for i in range(1, len(seq))}

    def __call__(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                token = self.next_token.get(tuple(row[:t + 1]))
                if token is not None:
                    logits[b, t, token] = 50.0
        return logits, None


def random_pairs(n, vocab_size, seed):
    """n (prompt, answer) pairs of ids 1..vocab_size-1 whose prompts differ in their first two tokens, so
    that no pair's sequence is a prefix of another's."""
    g = torch.Generator().manual_seed(seed)
    heads = torch.randperm((vocab_size - 1) ** 2, generator=g)[:n].tolist()
    randoms = lambda low, high: torch.randint(1, vocab_size, (int(torch.randint(low, high, (1,), generator=g)),),
                                              generator=g).tolist()
    return [([1 + h // (vocab_size - 1), 1 + h % (vocab_size - 1)] + randoms(0, 6), randoms(1, 4)) for h in heads]


def test_a_model_that_knows_the_answers_scores_100_percent_and_zero_nll():
    pairs = random_pairs(300, 40, seed=0)
    result = facts.score(LookupModel(40, [p + a for p, a in pairs]), pairs, batch_size=32)
    assert result["acc"] == 1.0 and result["nll"] < 1e-6


def test_knowing_half_the_answers_or_only_the_first_answer_token_counts_right():
    pairs = [(p, a) for p, a in random_pairs(400, 40, seed=1) if len(a) >= 2]
    half = pairs[::2]
    assert facts.score(LookupModel(40, [p + a for p, a in half]), pairs)["acc"] == len(half) / len(pairs)
    first_only = facts.score(LookupModel(40, [p + a[:1] for p, a in pairs]), pairs)
    assert first_only["acc"] == 0.0
    n_tokens = sum(len(a) for _, a in pairs)  # first tokens known (nll 0), the rest uniform
    assert first_only["nll"] == pytest.approx(math.log(40) * (n_tokens - len(pairs)) / n_tokens, rel=1e-5)


def test_uniform_and_random_models_score_chance():
    vocab = 50
    pairs = random_pairs(2000, vocab, seed=2)
    uniform = facts.score(LookupModel(vocab, []), pairs)
    assert uniform["nll"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert uniform["acc"] == 0.0  # argmax of equal logits is token 0, which no answer uses
    g = torch.Generator().manual_seed(3)
    single = [(p, a[:1]) for p, a in pairs]
    random_acc = facts.score(lambda idx: (torch.randn(*idx.shape, vocab, generator=g), None), single)["acc"]
    assert abs(random_acc - 1 / vocab) < 4 * math.sqrt(1 / vocab / len(single))  # 4 sigma of a binomial


def test_scores_equal_greedy_generation_and_unbatched_nll_of_a_real_model():
    """Accuracy against model.generate (greedy, KV cache) and NLL against one unpadded sequence at a time."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=32, n_layer=2, n_head=2, n_embd=32, memory_layers=(1,),
                          mem_n_keys=8, mem_heads=2, mem_knn=4)).eval()
    pairs = []
    for i, (prompt, answer) in enumerate(random_pairs(60, 30, seed=4)):
        greedy = model.generate(torch.tensor([prompt]), len(answer), temperature=0)[0, len(prompt):].tolist()
        pairs.append((prompt, greedy if i % 3 else answer))  # about two thirds are the model's own answers
    want_acc = sum(model.generate(torch.tensor([p]), len(a), temperature=0)[0, len(p):].tolist() == a
                   for p, a in pairs) / len(pairs)
    nll, n = 0.0, 0
    for p, a in pairs:
        with torch.no_grad():
            logits = model(torch.tensor([p + a]))[0][0, len(p) - 1:-1]
        nll += float(F.cross_entropy(logits, torch.tensor(a), reduction="sum"))
        n += len(a)
    result = facts.score(model, pairs, batch_size=7)
    assert 0.5 < want_acc < 1 and result["acc"] == want_acc
    assert result["nll"] == pytest.approx(nll / n, rel=1e-5)


@pytest.fixture(scope="module")
def facts_data_dir(tmp_path_factory, gpt2_bpe):
    data_dir = tmp_path_factory.mktemp("facts_data")
    write_facts(40, 0, list(facts.ATTRIBUTES), "compact", "facts", str(data_dir))
    return str(data_dir)


def test_train_logs_fact_scores_at_each_eval(facts_data_dir, tmp_path):
    from config import load_config
    from train import train
    config = load_config([])
    config.update(dataset="facts", data_dir=facts_data_dir, out_dir=str(tmp_path), n_layer=1, n_head=2, n_embd=32,
                  block_size=32, batch_size=4, max_iters=4, eval_interval=2, eval_iters=1, facts_eval_size=20,
                  device="cpu")
    train(config)
    with open(tmp_path / "log.jsonl") as f:
        evals = [e for e in map(json.loads, f) if e["event"] == "eval"]
    assert [e["iter"] for e in evals] == [0, 2, 4]
    for e in evals:
        assert 0 <= e["facts_acc"] <= 1 and 0 <= e["facts_acc_heldout"] <= 1
        assert e["facts_nll"] > 0 and e["facts_nll_heldout"] > 0
    assert evals[0]["facts_nll"] == pytest.approx(math.log(evals and json.load(open(
        os.path.join(facts_data_dir, "facts", "meta.json")))["vocab_size"]), rel=0.2)  # about uniform at init


def test_compare_trains_each_model_and_writes_the_table(facts_data_dir, tmp_path):
    tiny = ["n_head=2", "n_embd=32", "block_size=32", "batch_size=4", "max_iters=2", "eval_interval=2", "eval_iters=1",
            "facts_eval_size=10", "mem_n_keys=8", "mem_knn=4", "mem_k_dim=16"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "facts", "--models=dense,memplus",
                             "--seeds=2", "--jobs=2", f"--out={tmp_path}", f"--data_dir={facts_data_dir}", *tiny],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "results.md").read_text()
    every_run = table.split("Every run")[1].split("Fact accuracy at each eval")[0]
    rows = [line for line in every_run.splitlines() if line.startswith("| dense") or line.startswith("| memplus")]
    assert [r.split(" | ")[:2] for r in rows] == [["| dense", "1"], ["| dense", "2"], ["| memplus", "1"],
                                                  ["| memplus", "2"]]
    assert "Memory+ (memplus) fact accuracy" in table
    assert all(len(r.split(" | ")) == len(bench_facts.COLUMNS) for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--models=dense,mlp"], "error: unknown models ['mlp']"),
    (["--seeds=0"], "error: --seeds, --jobs and --entities must be at least 1"),
    (["--preset=capacity", "--entities=0"], "error: --seeds, --jobs and --entities must be at least 1"),
    (["--preset=capacity", "--models=dense,memplus_2k"], "error: unknown models ['memplus_2k']: the capacity preset has"),
    (["max_iters"], "error: overrides must look like key=value"),
    (["--sedes=3"], "error: unrecognized arguments: --sedes=3"),
])
def test_compare_bad_input_is_a_one_line_error(args, message, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "facts", f"--out={tmp_path}", *args],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and result.stderr.startswith(message)


@pytest.mark.parametrize("preset", ["capacity", "capacity-gpu"])
def test_capacity_suite_sizes_what_it_promises(preset):
    """The memory sweep at about the dense model's FLOPs with parameters growing with the table; dense 2x
    and 4x at those multiples; the MoE with the fewest experts whose parameters exceed the largest memory's;
    PEER about as large, Engram as large at the same FLOPs. Sizes are recomputed here from the runs' own config files and overrides, on the
    meta device."""
    from config import gpt_config, load_config
    from tools.sizing import costs

    def sized(run, *changes):
        return costs(gpt_config(load_config([bench_facts.config_path(c) for c in run.configs] + list(run.overrides)
                                            + list(changes)), 500))

    runs = {r.name: r for r in bench_facts.PRESETS[preset][0](500)}
    memory = [name for name in runs if name.startswith("memplus_")]
    assert list(runs) == ["dense", "dense2x", "dense4x", *memory, "moe", "engram", "peer"] and len(memory) == 4
    dense, sweep = sized(runs["dense"]), [sized(runs[name]) for name in memory]
    assert all(0.85 * dense["flops"] < m["flops"] <= 1.05 * dense["flops"] for m in sweep)
    assert [m["total"] for m in sweep] == sorted(m["total"] for m in sweep) and sweep[-1]["total"] > 40 * dense["total"]
    for factor in (2, 4):
        assert sized(runs[f"dense{factor}x"])["flops"] == pytest.approx(factor * dense["flops"], rel=0.1)
    moe, experts = sized(runs["moe"]), load_config(list(runs["moe"].overrides))["moe_num_experts"]
    assert moe["total"] > sweep[-1]["total"] >= sized(runs["moe"], f"--moe_num_experts={experts - 1}")["total"]
    assert moe["flops"] < 1.3 * dense["flops"]
    assert sized(runs["peer"])["total"] == pytest.approx(sweep[-1]["total"], rel=0.1)
    engram = sized(runs["engram"])
    assert engram["total"] == pytest.approx(sweep[-1]["total"], rel=1e-3)
    assert engram["flops"] == pytest.approx(sweep[-1]["flops"], rel=0.01)


def test_split_suite_divides_the_largest_memory_between_memory_and_engram():
    """Every split at the parameters of the capacity preset's largest Memory+ (the 0% run), Memory+ in the
    second layer and Engram in the first; FLOPs within the first layer's block of each other."""
    from config import load_config
    runs = bench_facts.PRESETS["split"][0](500)
    assert [r.share for r in runs] == [0, 25, 50, 75, 100]
    settings = [load_config([bench_facts.config_path(c) for c in r.configs] + list(r.overrides)) for r in runs]
    assert [(s["memory_layers"], s["engram_layers"]) for s in settings] == [((1,), ())] + [((1,), (0,))] * 3 + [((), (0,))]
    sparse = [(s["mem_n_keys"] ** 2 * s["n_embd"] if s["memory_layers"] else 0) +
              (s["engram_rows"] * s["engram_dim"] if s["engram_layers"] else 0) for s in settings]
    assert all(b == pytest.approx(sparse[0], rel=0.01) for b in sparse)
    engram_part = [s["engram_rows"] * s["engram_dim"] / sparse[0] if s["engram_layers"] else 0 for s in settings]
    assert engram_part == pytest.approx([0, 0.25, 0.5, 0.75, 1.0], abs=0.01)


def test_headline_counts_rises_spreads_and_seeds():
    rows = [{"model": m, "seed": s, "facts_acc": a, "facts_acc_half": a / 2, "last_quarter": a / 4, "facts_nll": n}
            for m, accs, nlls in (("dense", (0.1, 0.2), (2.0, 2.0)), ("memplus_1k", (0.1, 0.3), (1.0, 0.6)),
                                  ("memplus_4k", (0.25, 0.45), (0.7, 0.5)), ("memplus_16k", (0.5, 0.6), (0.2, 0.4)),
                                  ("moe", (0.5, 0.1), (1.0, 1.0)))
            for s, (a, n) in enumerate(zip(accs, nlls), 1)]
    text = bench_facts.headline(rows)
    assert "1k 20.0% ± 10.0%, 4k 35.0% ± 10.0%, 16k 55.0% ± 5.0%" in text
    # 4k's mean is above 1k's best seed though its worst seed is not: the seeds' spreads may overlap
    assert "rises at 2 of 2 steps (target: every one), 2 of them above the best seed of the size before" in text
    assert "1k 0.800 (0.600-1.000), 4k 0.600 (0.500-0.700), 16k 0.300 (0.200-0.400); the mean falls at 2 of 2 " \
           "steps, 1 of them with every seed below every seed of the size before" in text
    assert "against dense 15.0% ± 5.0% at equal FLOPs per token: 3.7x" in text
    assert "higher at 1 of 2 seeds" in text
    assert "dense +7.5, Memory+ (memplus_16k) +27.5" in text
    assert "The widest seed spread: moe 30.0% ± 20.0%" in text
    assert "Dense gained +3.8 points of fact accuracy in the last quarter" in text
    table = bench_facts.summary_table([{**r, "params": 1, "flops_per_token": 1, "facts_acc_heldout": 0.0} for r in rows])
    assert "| memplus_4k | 2 | 1 | 1 | 35.0% ± 10.0% | 17.5% ± 5.0% | +8.8 | 0.0% ± 0.0% | 0.600 (0.500-0.700) |" in table


def test_capacity_preset_trains_the_sweep_and_writes_table_and_plot(gpt2_bpe, tmp_path):
    """Three models of the capacity preset at a tiny budget, two seeds, on a knowledge base it makes."""
    tiny = ["max_iters=2", "eval_interval=1", "eval_iters=1", "facts_eval_size=10", "batch_size=4"]
    sweep = [sys.executable, os.path.join(ROOT, "tools", "bench.py"), "facts", "--preset=capacity",
             "--models=dense,memplus_1k,memplus_4k", "--entities=30", "--seeds=2", "--jobs=2",
             f"--out={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data'}", *tiny]
    result = subprocess.run(sweep, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "out" / "results.md").read_text()

    def written():
        return {log.parent.name: log.stat().st_mtime_ns for log in (tmp_path / "out").glob("*/log.jsonl")}
    before = written()
    result = subprocess.run(sweep, capture_output=True, text=True, timeout=180)  # started again: trains nothing
    assert result.returncode == 0 and written() == before, result.stderr[-2000:]
    dense = [a if not a.startswith("--models=") else "--models=dense" for a in sweep[:-1]] + ["batch_size=3"]
    result = subprocess.run(dense, capture_output=True, text=True, timeout=180)
    again = written()  # dense with another command: trained again
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(k for k in before if again[k] != before[k]) == ["dense_seed1", "dense_seed2"]
    (tmp_path / "out" / "results.md").write_text(table)
    assert (tmp_path / "data" / "facts_30" / facts.EVAL_FILE).exists()
    table = (tmp_path / "out" / "results.md").read_text()
    summary, every_run = table.split("Every run")
    every_run = every_run.split("Fact accuracy at each eval")[0]
    rows = [line.split(" | ")[:2] for line in every_run.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == [["| dense", "1"], ["| dense", "2"], ["| memplus_1k", "1"], ["| memplus_1k", "2"],
                    ["| memplus_4k", "1"], ["| memplus_4k", "2"]]
    assert [line.split(" | ")[:2] for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:] \
        == [["| dense", "2"], ["| memplus_1k", "2"], ["| memplus_4k", "2"]]
    assert "Fact accuracy by memory size: 1k" in table and "30 entities" in table
    assert (tmp_path / "out" / "facts.png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    assert "- memplus_4k: `facts_common capacity_common capacity_memplus --mem_n_keys=64`" in table
    curves = [line.split(" | ") for line in table.split("Fact accuracy at each eval")[1].splitlines()
              if line.startswith("| ") and "---" not in line]
    assert curves[0] == ["| run", "0", "1", "2 |"]
    usage = "| read, KL, shared"
    assert [c[0] for c in curves[1:]] == ["| dense seed 1", "| dense seed 2"] + ["| memplus_1k seed 1", usage,
        "| memplus_1k seed 2", usage, "| memplus_4k seed 1", usage, "| memplus_4k seed 2", usage]
    assert all(len(cell.split(", ")) == 3 for c in curves if c[0] == usage for cell in c[1:])
    events = [json.loads(line) for line in open(tmp_path / "out" / "memplus_4k_seed2" / "log.jsonl")]
    start = next(e for e in events if e["event"] == "start")
    assert start["config"]["mem_n_keys"] == 64 and start["config"]["seed"] == 2 and start["config"]["dataset"] == "facts_30"

    report = [sys.executable, os.path.join(ROOT, "tools", "bench.py"), "facts", "--preset=capacity", "--report",
              "--models=dense,memplus_1k,memplus_4k", "--entities=30", "--seeds=2", f"--out={tmp_path / 'out'}",
              f"--data_dir={tmp_path / 'data'}"]
    (tmp_path / "out" / "results.md").unlink()
    result = subprocess.run(report, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    rebuilt = (tmp_path / "out" / "results.md").read_text()
    assert [line for line in rebuilt.splitlines() if line.startswith("| memplus")] == \
           [line for line in table.splitlines() if line.startswith("| memplus")]
    log = tmp_path / "out" / "dense_seed2" / "log.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))  # as if it had been stopped
    result = subprocess.run(report, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {log} is not a finished run")


def test_headline_compares_engram_and_names_the_best_split():
    rows = [{"model": m, "seed": s, "facts_acc": a, "facts_acc_half": a, "facts_nll": n}
            for m, accs, n in (("memplus_64k", (0.8, 0.9), 1.0), ("engram", (0.2, 0.3), 2.0),
                               ("engram_0pct", (0.8, 0.8), 1.0), ("engram_25pct", (0.9, 0.7), 1.5),
                               ("engram_100pct", (0.1, 0.1), 3.0))
            for s, a in enumerate(accs, 1)]
    text = bench_facts.headline(rows)
    assert "Engram at about the parameters and FLOPs of Memory+ (memplus_64k): fact accuracy 25.0% ± 5.0% " \
           "against 85.0% ± 5.0%, answer NLL 2.000 against 1.000" in text
    assert "0% 80.0% ± 0.0% (NLL 1.000), 25% 80.0% ± 10.0% (NLL 1.500), 100% 10.0% ± 0.0% (NLL 3.000); " \
           "the most facts at 0%" in text
