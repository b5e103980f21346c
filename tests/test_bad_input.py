"""Bad input to every tool is one line on stderr, `error: <message>`, naming the culprit: a non-zero exit,
no traceback, and nothing the user had on disk changed.

Each case runs its tool (prepare_data.py, train.py, sample.py, tools/bench.py, tools/sizing.py) in a fresh process,
in a folder of its own that holds {data}, a copy of the dataset 'tiny', and {run}, an out_dir (a copy of
a trained run's where the setup says so). A case is (id, tool, arguments, setup, words its message must
hold); arguments may name {data}, {run} and {case} (the folder). The files of the folder are hashed
before and after. The cases run at once on the machine's cores (the fixture `results`); each test then
checks its own.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from checkpoint import RunLock
from conftest import ROOT, TINY, config_for

TRAIN = ["{case}/cfg.py", "--data_dir={data}", "--out_dir={run}"]  # cfg.py: the trained run's settings
CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")


# ---- setups: each changes the case's folder before the tool runs ------------------------------------------
def trained(case):
    """{run} holds the trained run (ckpt.pt at iteration 2, ckpt.prev.pt, log.jsonl)."""
    shutil.copytree(case.parent / "trained", case / "run")


def write(path, content):
    def setup(case):
        (case / path).parent.mkdir(parents=True, exist_ok=True)
        (case / path).write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def saved(path, obj):
    def setup(case):
        (case / path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, case / path)
    return setup


def meta(change):
    """data/tiny/meta.json changed: change(meta dict) returns the new content (an object or raw text)."""
    def setup(case):
        path = case / "data" / "tiny" / "meta.json"
        new = change(json.loads(path.read_text()))
        path.write_text(new if isinstance(new, str) else json.dumps(new))
    return setup


def checkpoint_meta(new_meta):
    """{run} holds the trained run with new_meta in its ckpt.pt."""
    def setup(case):
        trained(case)
        checkpoint = torch.load(case / "run" / "ckpt.pt", weights_only=True)
        torch.save({**checkpoint, "meta": new_meta}, case / "run" / "ckpt.pt")
    return setup


def trained_on_case_data(case):
    """{case}/out/run holds the trained run, its checkpoint recording the case's data/tiny as its dataset."""
    shutil.copytree(case.parent / "trained", case / "out" / "run")
    path = case / "out" / "run" / "ckpt.pt"
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, "config": {**checkpoint["config"], "data_dir": str(case / "data")}}, path)


def append(path, content):
    def setup(case):
        with open(case / path, "ab") as f:
            f.write(content)
    return setup


def busy(case):
    """{run} is locked by this test process, as by a run in progress (released after all cases ran)."""
    (case / "run").mkdir()
    return RunLock(str(case / "run"))


def unwritable(case):
    (case / "run").mkdir()
    os.chmod(case / "run", 0o500)


EVAL_PAIR = {"prompt": "Q", "answer": " A", "entity": "E", "attribute": "city", "heldout": False,
             "prompt_ids": [1, 2], "answer_ids": [3]}
CASES = [
    # train.py: every setting in its range, checked before anything is created on disk
    ("lr-negative", "train.py", TRAIN + ["--learning_rate=-1e-3"], None, ["learning_rate=-0.001", "above 0"]),
    ("lr-nan-in-file", "train.py", ["{case}/nan.py"] + TRAIN[1:], write("nan.py", "learning_rate = float('nan')"),
     ["learning_rate=nan", "finite"]),
    ("min-lr-above-lr", "train.py", TRAIN + ["--min_lr=1e-2"], None, ["min_lr=0.01", "learning_rate=0.003"]),
    ("accumulation-zero", "train.py", TRAIN + ["--gradient_accumulation_steps=0"], None,
     ["gradient_accumulation_steps=0", "at least 1"]),
    ("decay-before-warmup-ends", "train.py", TRAIN + ["--lr_decay_iters=3"], None,
     ["lr_decay_iters=3", "warmup_iters=5"]),
    ("device-unknown", "train.py", TRAIN + ["--device=tpu"], None, ["device='tpu'", "'cuda:N'"]),
    pytest.param("device-cuda-missing", "train.py", TRAIN + ["--device=cuda"], None, ["device='cuda'", "no CUDA"],
                 marks=CUDA),
    pytest.param("device-mps-missing", "train.py", TRAIN + ["--device=mps"], None, ["device='mps'"], marks=MPS),
    ("out-dir-empty", "train.py", TRAIN + ["--out_dir="], None, ["out_dir=''"]),
    ("config-syntax-error", "train.py", ["{case}/bad.py"], write("bad.py", "n_layer = = 2\n"), ["bad.py line 1"]),
    ("config-json", "train.py", ["{case}/cfg.py", "{data}/tiny/meta.json"] + TRAIN[1:], None,
     ["meta.json is JSON, not Python"]),
    ("config-json-dict", "train.py", ["{case}/cfg.py", "{case}/run.json"] + TRAIN[1:],
     write("run.json", '{"max_iters": 1, "eval_interval": 1}'), ["run.json is JSON, not Python"]),
    ("config-include-missing", "train.py", ["{case}/top.py"] + TRAIN[1:], write("top.py", 'include("base.py")\n'),
     ["cannot read config file", "base.py"]),
    ("config-empty", "train.py", ["{case}/cfg.py", "{case}/empty.py"] + TRAIN[1:], write("empty.py", ""),
     ["empty.py assigns no config key"]),
    ("config-expressions", "train.py", ["{case}/cfg.py", "{case}/expr.py"] + TRAIN[1:],
     write("expr.py", "'dataset', 'tiny'\n2 ** 10\n"), ["expr.py assigns no config key"]),
    ("dataset-name-escapes", "train.py", TRAIN + ["--dataset=../escape"], None,
     ["dataset='../escape'", "plain folder name"]),
    ("finetune-without-init-from", "train.py", TRAIN + ["--finetune=smf"], None,
     ["error: finetune='smf' needs a trained model", "init_from='scratch'"]),
    ("unknown-key", "train.py", TRAIN + ["--lerning_rate=1e-3"], None, ["lerning_rate", "learning_rate"]),
    ("memory-layer-beyond-model", "train.py", TRAIN + ["--memory_layers=(5,)"], None, ["memory_layers", "[5]"]),
    # train.py: out_dir
    ("out-dir-is-a-file", "train.py", TRAIN + ["--out_dir={case}/notes.txt"], write("notes.txt", "mine"),
     ["notes.txt", "is a file"]),
    ("out-dir-inside-a-file", "train.py", TRAIN + ["--out_dir={case}/notes.txt/run"], write("notes.txt", "mine"),
     ["notes.txt/run", "not a folder"]),
    pytest.param("out-dir-not-writable", "train.py", TRAIN, unwritable, ["cannot write in out_dir", "Permission"],
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")),
    ("out-dir-in-use", "train.py", TRAIN, busy, ["in use by the run of pid", str(os.getpid())]),
    ("log-not-writable", "train.py", TRAIN, write("run/log.jsonl/notes.txt", "mine"), ["log.jsonl", "directory"]),
    ("scratch-over-a-checkpoint", "train.py", TRAIN, trained, ["holds the checkpoint", "--init_from=resume",
                                                               "--overwrite=True"]),
    ("resume-below-max-iters", "train.py", TRAIN + ["--init_from=resume", "--max_iters=1"], trained,
     ["max_iters=1", "ckpt.pt, 2"]),
    ("resume-without-checkpoint", "train.py", TRAIN + ["--init_from=resume"], None, ["no checkpoint at"]),
    ("resume-foreign-dict", "train.py", TRAIN + ["--init_from=resume"], saved("run/ckpt.pt", {"weights": 1}),
     ["ckpt.pt is not a checkpoint of this train.py", "model_config"]),
    ("resume-not-a-dict", "train.py", TRAIN + ["--init_from=resume"], saved("run/ckpt.pt", torch.zeros(3)),
     ["ckpt.pt is not a checkpoint of this train.py", "Tensor"]),
    ("resume-garbage", "train.py", TRAIN + ["--init_from=resume"], write("run/ckpt.pt", b"not a zip"),
     ["cannot read checkpoint", "ckpt.pt"]),
    ("init-from-foreign-checkpoint", "train.py", TRAIN + ["--init_from={case}/other"],
     saved("other/ckpt.pt", {"state_dict": {}}), ["other/ckpt.pt is not a checkpoint of this train.py"]),
    # train.py: data files
    ("train-bin-odd-size", "train.py", TRAIN, append("data/tiny/train.bin", b"\0"), ["train.bin", "bytes"]),
    ("val-bin-empty", "train.py", TRAIN, write("data/tiny/val.bin", b""), ["val.bin holds 0 bytes"]),
    ("meta-not-json", "train.py", TRAIN, meta(lambda m: "{vocab_size: 65"), ["meta.json", "JSON"]),
    ("meta-without-vocab-size", "train.py", TRAIN, meta(lambda m: {"tokenizer": "char", "chars": m["chars"]}),
     ["meta.json", "vocab_size=None"]),
    ("meta-tokenizer-unknown", "train.py", TRAIN, meta(lambda m: {**m, "tokenizer": "bpe"}), ["tokenizer='bpe'"]),
    ("meta-without-chars", "train.py", TRAIN, meta(lambda m: {**m, "chars": None}), ["meta.json", "chars"]),
    ("token-ids-beyond-vocabulary", "train.py", TRAIN, meta(lambda m: {**m, "vocab_size": 10}),
     ["train.bin holds token id", "vocabulary of 10"]),
    ("eval-file-not-json", "train.py", TRAIN, write("data/tiny/eval.json", "{"), ["eval.json", "JSON"]),
    ("eval-pair-without-answer", "train.py", TRAIN, write("data/tiny/eval.json", json.dumps(
        {"pairs": [{"prompt_ids": [1], "heldout": False}]})), ["eval.json", "pair 0"]),
    ("eval-ids-beyond-vocabulary", "train.py", TRAIN, write("data/tiny/eval.json", json.dumps(
        {"pairs": [{**EVAL_PAIR, "answer_ids": [999]}, {**EVAL_PAIR, "heldout": True}]})), ["eval.json", "pair 0"]),
    ("eval-pair-without-person", "train.py", TRAIN, write("data/tiny/eval.json", json.dumps(
        {"pairs": [EVAL_PAIR, {**EVAL_PAIR, "heldout": True, "entity": None}]})), ["eval.json", "pair 1", "entity"]),
    # sample.py
    ("top-k-negative", "sample.py", ["--out_dir={run}", "--top_k=-1"], trained, ["--top_k=-1"]),
    ("temperature-nan", "sample.py", ["--out_dir={run}", "--temperature=nan"], trained, ["--temperature=nan"]),
    ("temperature-negative", "sample.py", ["--out_dir={run}", "--temperature=-1"], trained, ["--temperature=-1"]),
    ("num-samples-zero", "sample.py", ["--out_dir={run}", "--num_samples=0"], trained, ["--num_samples=0"]),
    ("max-new-tokens-zero", "sample.py", ["--out_dir={run}", "--max_new_tokens=0"], trained, ["--max_new_tokens=0"]),
    ("sample-unknown-option", "sample.py", ["--out_dir={run}", "--prompt=x"], trained, ["--prompt=x"]),
    ("prompt-not-utf8", "sample.py", ["--out_dir={run}", "--start=FILE:{case}/p.bin"], write("p.bin", b"\xff\xfe\x00"),
     ["p.bin is not UTF-8"]),
    ("prompt-binary", "sample.py", ["--out_dir={run}", "--start=FILE:{case}/p.bin"], write("p.bin", b"ab\0\0cd"),
     ["p.bin holds NUL bytes"]),
    ("sample-without-checkpoint", "sample.py", ["--out_dir={run}"], None, ["no checkpoint at", "run/ckpt.pt"]),
    ("sample-foreign-dict", "sample.py", ["--out_dir={run}"], saved("run/ckpt.pt", {"model": {}}),
     ["not a checkpoint of this train.py", "model_config"]),
    ("sample-not-a-dict", "sample.py", ["--out_dir={run}"], saved("run/ckpt.pt", [1, 2]), ["holds a list"]),
    ("sample-checkpoint-meta-broken", "sample.py", ["--out_dir={run}"], checkpoint_meta({"tokenizer": "char"}),
     ["ckpt.pt", "vocab_size=None"]),
    pytest.param("sample-device-cuda-missing", "sample.py", ["--out_dir={run}", "--device=cuda"], trained,
                 ["device='cuda'", "no CUDA device"], marks=CUDA),
    # bench.py
    pytest.param("bench-kernels-cuda-missing", "tools/bench.py", ["kernels", "--device=cuda"], None, ["device='cuda'"],
                 marks=CUDA),
    pytest.param("bench-layer-cuda-missing", "tools/bench.py", ["layer", "--device=cuda"], None, ["device='cuda'"],
                 marks=CUDA),
    ("bench-unknown-shape", "tools/bench.py", ["kernels", "--device=cpu", "--shapes=huge"], None, ["shape 'huge'"]),
    ("bench-exponents-not-numbers", "tools/bench.py", ["layer", "--exponents=a,b"], None, ["--exponents", "'a,b'"]),
    ("bench-exponents-odd", "tools/bench.py", ["layer", "--exponents=7"], None, ["--exponents", "'7'", "even"]),
    ("bench-shape-zero-bag", "tools/bench.py", ["kernels", "--device=cpu", "--shapes=10x0x5x4"], None,
     ["shape '10x0x5x4'", "at least 1"]),
    ("bench-facts-unknown-model", "tools/bench.py", ["facts", "--models=gpt4", "--out={case}/facts"], None, ["gpt4"]),
    # sizing.py
    ("sizing-without-config", "tools/sizing.py", ["--n_layer=2"], None, ["config file"]),
    ("sizing-config-missing", "tools/sizing.py", ["{case}/none.py"], None, ["cannot read config file"]),
    ("sizing-lr-negative", "tools/sizing.py", TRAIN[:2] + ["--learning_rate=-1.0"], None, ["learning_rate=-1.0"]),
    ("sizing-mem-parallel-indivisible", "tools/sizing.py", TRAIN[:2] + ["--memory_layers=(1,)", "--mem_parallel=3"], None,
     ["mem_parallel=3", "mem_v_dim=32"]),
    ("sizing-meta-not-json", "tools/sizing.py", TRAIN[:2], meta(lambda m: "["), ["meta.json", "JSON"]),
    # prepare_data.py
    ("prepare-input-missing", "prepare_data.py", ["text", "--input", "{case}/none.txt", "--name=x",
                                                  "--data_dir={data}"], None, ["none.txt"]),
    ("prepare-input-not-utf8", "prepare_data.py", ["text", "--input", "{case}/in.txt", "--name=x",
                                                   "--data_dir={data}"], write("in.txt", b"\xff\xfe"),
     ["in.txt is not UTF-8"]),
    ("prepare-input-empty", "prepare_data.py", ["text", "--input", "{case}/in.txt", "--name=x",
                                                "--data_dir={data}", "--tokenizer=char"], write("in.txt", ""),
     ["holds 0 tokens"]),
    ("prepare-tokenizer-unknown", "prepare_data.py", ["shakespeare", "--tokenizer=bpe", "--data_dir={data}"], None,
     ["'bpe'"]),
    ("prepare-num-tokens-zero", "prepare_data.py", ["fineweb_edu", "--num_tokens=0", "--data_dir={data}"], None,
     ["'0' is not a positive whole number"]),
    ("prepare-val-tokens-all", "prepare_data.py", ["fineweb_edu", "--num_tokens=100", "--val_tokens=100",
                                                   "--data_dir={data}"], None, ["--val_tokens=100"]),
    ("prepare-facts-no-entities", "prepare_data.py", ["facts", "--n_entities=0", "--data_dir={data}"], None,
     ["n_entities"]),
    ("prepare-facts-attribute-unknown", "prepare_data.py", ["facts", "--attributes=height", "--data_dir={data}"],
     None, ["'height'"]),
    ("prepare-data-dir-is-a-file", "prepare_data.py", ["text", "--input", "{case}/in.txt", "--name=x",
                                                       "--tokenizer=char", "--data_dir={case}/in.txt"],
     write("in.txt", "hello"), ["--data_dir", "in.txt"]),
    ("prepare-name-escapes", "prepare_data.py", ["text", "--input", "{case}/cfg.py", "--name=../escape",
                                                 "--tokenizer=char", "--data_dir={data}"], None,
     ["--name='../escape'", "plain folder name"]),
    ("prepare-name-empty", "prepare_data.py", ["text", "--input", "{case}/cfg.py", "--name=", "--tokenizer=char",
                                               "--data_dir={data}"], None, ["--name=''", "not empty"]),
    ("prepare-over-a-dataset", "prepare_data.py", ["text", "--input", "{case}/cfg.py", "--name=tiny",
                                                   "--tokenizer=char", "--data_dir={data}"], trained_on_case_data,
     ["data/tiny exists; out/run/ckpt.pt trained on it", "another vocabulary", "--overwrite"]),
    ("prepare-facts-new-over-a-dataset", "prepare_data.py", ["facts", "--name=tiny", "--new_entities=5",
                                                             "--n_entities=5", "--data_dir={case}"],
     write("tiny_new/meta.json", "{}"), ["tiny_new exists", "--overwrite"]),
]


def case_id(case):
    return (case.values if hasattr(case, "values") else case)[0]


def folder_state(folder):
    """{path: sha256} of every file under folder."""
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read())
            .hexdigest() for d, _, files in os.walk(folder) for f in files}


@pytest.fixture(scope="module")
def results(tmp_path_factory, char_data_dir):
    """{case id: (CompletedProcess, files before, files after)} of every case, all run at once."""
    from train import train
    root = tmp_path_factory.mktemp("bad_input")
    train(config_for(char_data_dir, root / "trained", max_iters=2, eval_interval=2))
    settings = {**TINY, "max_iters": 2, "eval_interval": 2}
    held, commands = [], {}
    for case in CASES:
        name, tool, args, setup, _ = case.values if hasattr(case, "values") else case
        folder = root / name
        shutil.copytree(os.path.join(char_data_dir, "tiny"), folder / "data" / "tiny")
        (folder / "cfg.py").write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
        if setup:
            held.append(setup(folder))
        paths = {"case": folder, "data": folder / "data", "run": folder / "run"}
        commands[name] = (folder, [sys.executable, os.path.join(ROOT, tool), *(a.format(**paths) for a in args)])
    before = {name: folder_state(folder) for name, (folder, _) in commands.items()}

    def run(name):
        folder, command = commands[name]
        return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    with ThreadPoolExecutor((os.cpu_count() or 1) + 1) as pool:
        done = dict(zip(commands, pool.map(run, commands)))
    after = {name: folder_state(folder) for name, (folder, _) in commands.items()}
    for lock in held:
        if isinstance(lock, RunLock):
            lock.release()
    return {name: (done[name], before[name], after[name]) for name in commands}


@pytest.mark.parametrize("override, words", [
    ("--learning_rate=0", "learning_rate=0.0 must be above 0: write e.g. learning_rate=0.001"),
    ("--min_lr=-1e-4", "min_lr=-0.0001 must be in [0, learning_rate=0.001]"),
    ("--batch_size=0", "batch_size=0 must be at least 1: write e.g. batch_size=16"),
    ("--block_size=0", "block_size must be positive"),
    ("--max_iters=-1", "max_iters=-1 must be at least 0"),
    ("--eval_interval=-1", "eval_interval=-1 must be at least 0"),
    ("--log_interval=0", "log_interval=0 must be at least 1"),
    ("--eval_iters=0", "eval_iters=0 must be at least 1"),
    ("--warmup_iters=-5", "warmup_iters=-5 must be at least 0"),
    ("--lr_decay_iters=-1", "lr_decay_iters=-1 must be 0 (decay until max_iters) or at least warmup_iters=100"),
    ("--facts_eval_size=-1", "facts_eval_size=-1 must be at least 0"),
    ("--mem_parallel=0", "mem_parallel=0 must be at least 1"),
    ("--seed=-1", "seed=-1 must be in [0, 2**32)"),
    ("--seed=4294967296", "seed=4294967296 must be in [0, 2**32)"),
    ("--mem_value_lr=0.0", "mem_value_lr=0.0 must be above 0"),
    ("--weight_decay=-0.1", "weight_decay=-0.1 must be at least 0"),
    ("--beta1=1.0", "beta1=1.0 must be in [0, 1)"),
    ("--beta2=-0.5", "beta2=-0.5 must be in [0, 1)"),
    ("--grad_clip=-1.0", "grad_clip=-1.0 must be at least 0"),
    ("--mem_value_grad_clip=1e999", "mem_value_grad_clip=inf must be a finite number"),
    ("--rope_theta=0.0", "rope_theta=0.0 must be above 0"),
    ("--norm_eps=-1e-5", "norm_eps=-1e-05 must be above 0"),
    ("--moe_aux_loss_weight=1e999", "moe_aux_loss_weight=inf must be a finite number"),
    ("--dtype=float8", "dtype='float8' must be 'auto' or 'float32' or 'bfloat16' or 'float16'"),
    ("--nonfinite=ignore", "nonfinite='ignore' must be 'stop' or 'skip'"),
    ("--device=cuda:x", "device='cuda:x' must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    ("--dataset=", "dataset='' must be a plain folder name"),
    ("--dataset=a/b", "dataset='a/b' must be a plain folder name"),
    ("--facts_retain_dataset=..", "facts_retain_dataset='..' must be '' (unset) or a plain folder name"),
    ("--init_from=", "init_from='' must be a name"),
    ("--n_head=5", "n_embd=384 must be divisible by n_head=5"),
])
def test_every_setting_is_checked_when_the_config_loads(override, words):
    """config.validate, in this process: the ranges of the keys the subprocess cases above do not reach."""
    from config import load_config
    from errors import ConfigError
    with pytest.raises(ConfigError) as error:
        load_config([override])
    assert words in str(error.value) and "\n" not in str(error.value)


def test_an_included_config_applies_first_and_the_including_file_wins(tmp_path):
    """include("base.py"), relative to the including file's folder, wherever the command runs."""
    from config import load_config
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.py").write_text("n_layer = 3\nn_embd = 96\nlearning_rate = 1e-4\n")
    (tmp_path / "sub" / "top.py").write_text('n_embd = 64\ninclude("base.py")\nn_layer = 2\n')
    config = load_config([str(tmp_path / "sub" / "top.py")])
    assert (config["n_layer"], config["n_embd"], config["learning_rate"]) == (2, 96, 1e-4)
    assert "include" not in config


def test_settings_at_the_ends_of_their_ranges_load():
    from config import load_config
    config = load_config(["--min_lr=1e-3", "--lr_decay_iters=100", "--beta1=0.0", "--max_iters=0", "--seed=0",
                          "--grad_clip=0.0", "--device=cuda:1", "--init_from=out/other"])
    assert config["min_lr"] == config["learning_rate"] and config["lr_decay_iters"] == config["warmup_iters"]


def test_there_are_enough_cases():
    assert len(CASES) >= 60 and len({case_id(c) for c in CASES}) == len(CASES)
    assert {(c.values if hasattr(c, "values") else c)[1] for c in CASES} == {
        "train.py", "sample.py", "tools/bench.py", "tools/sizing.py", "prepare_data.py"}


@pytest.mark.parametrize("name, tool, args, setup, words", CASES, ids=[case_id(c) for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(results, name, tool, args, setup, words):
    result, before, after = results[name]
    assert result.returncode != 0, result.stdout[-500:]
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)
    assert after == before
