"""train.py end to end on a tiny character dataset: learning, exact resume, config checks, sample.py."""
import json
import os

import pytest
import torch

from config import gpt_config, load_config
from conftest import ROOT, config_for, read_log, run
from train import train


@pytest.mark.parametrize("memory_layers", [(), (1,)])
def test_tiny_model_drives_the_loss_down(char_data_dir, tmp_path, memory_layers):
    config = config_for(char_data_dir, tmp_path, max_iters=120, eval_interval=120, log_interval=120,
                        memory_layers=memory_layers)
    train(config)
    evals = read_log(tmp_path, "eval")
    assert evals[0]["train_loss"] > 3.5  # about ln(vocab size) at init
    if memory_layers:  # the value table's usage is measured at every eval
        assert 0 < evals[-1]["mem_read_fraction"][0] <= 1 and evals[-1]["mem_kl_uniform"][0] >= 0
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 1.0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-adamw", "row-adamw"])
def test_resume_continues_exactly(char_data_dir, tmp_path, sparse):
    """N iterations, a stop and M more give the same losses as N+M in one run (CPU, fp32)."""
    common = dict(eval_interval=4, log_interval=1, lr_decay_iters=12, memory_layers=(0,), mem_sparse_update=sparse)
    train(config_for(char_data_dir, tmp_path / "once", max_iters=12, **common))
    train(config_for(char_data_dir, tmp_path / "twice", max_iters=8, **common))
    train(config_for(char_data_dir, tmp_path / "twice", max_iters=12, init_from="resume", **common))
    once = [(e["iter"], e["loss"]) for e in read_log(tmp_path / "once", "train")]
    twice = [(e["iter"], e["loss"]) for e in read_log(tmp_path / "twice", "train")]
    assert len(once) == 12 and once == twice

    checkpoint = torch.load(tmp_path / "twice" / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == 12 and checkpoint["meta"]["tokenizer"] == "char"
    assert ("value_optimizer" in checkpoint) == sparse


def test_sparse_updates_leave_unread_rows_alone(char_data_dir, tmp_path):
    """With mem_sparse_update, a value row no token read keeps its initial value (dense AdamW would decay it)."""
    config = config_for(char_data_dir, tmp_path, max_iters=5, eval_interval=5, memory_layers=(1,), mem_n_keys=16,
                        mem_sparse_update=True)
    trained = train(config).values[0].weight.detach()
    initial = torch.load(tmp_path / "ckpt.prev.pt", weights_only=True)  # written at iter 0
    assert initial["iter_num"] == 0
    initial = initial["model"]["values.0.weight"]
    steps = torch.load(tmp_path / "ckpt.pt", weights_only=True)["value_optimizer"]["state"][0]["step"]
    assert (steps == 0).any() and (steps > 0).any()
    assert torch.equal(trained[steps == 0], initial[steps == 0])
    assert not torch.equal(trained[steps > 0], initial[steps > 0])


def test_sample_generates_from_a_checkpoint(char_data_dir, tmp_path):
    train(config_for(char_data_dir, tmp_path, max_iters=2, eval_interval=2, memory_layers=(1,)))
    result = run("sample.py", f"--out_dir={tmp_path}", "--start=First", "--num_samples=2", "--max_new_tokens=40",
                 "--temperature=0")
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("---------------\n")
    assert samples[0].startswith("First") and len(samples[0]) == len("First") + 40 + 1
    assert samples[0] == samples[1]  # greedy


@pytest.fixture
def config_file(tmp_path, char_data_dir):
    path = tmp_path / "cfg.py"
    path.write_text(f"dataset = 'tiny'\ndata_dir = {char_data_dir!r}\nout_dir = {str(tmp_path / 'out')!r}\n"
                    "n_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 16\nmax_iters = 0\n")
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["--lerning_rate=1e-3"], "unknown config key 'lerning_rate' (did you mean 'learning_rate'?)"),
    (["--max_iters=ten"], "config key 'max_iters' expects int, got 'ten'"),
    (["--compile=1"], "config key 'compile' expects bool, got 1"),
    (["--memory_layers=[5]"], "memory_layers names [5], but layers are 0..1"),
    (["--memory_layers=[1]", "--mem_n_keys=8", "--mem_knn=16"], "mem_knn=16 must be at most mem_n_keys=8"),
    (["--memory_layers=[1]", "--mem_k_dim=15"], "mem_k_dim=15 must be even"),
    (["--dataset=nowhere"], "dataset 'nowhere' not found"),
    (["--init_from=resume"], "no checkpoint at"),
    (["--max_iters"], "must look like --key=value"),
])
def test_bad_input_is_a_one_line_error(config_file, args, message):
    result = run("train.py", config_file, *args)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def test_unreadable_checkpoint_is_a_one_line_error(config_file, tmp_path):
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "ckpt.pt").write_bytes(b"not a checkpoint")
    for result in (run("train.py", config_file, "--init_from=resume"), run("sample.py", f"--out_dir={tmp_path}/out")):
        assert result.returncode != 0 and result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"error: cannot read checkpoint {tmp_path}/out/ckpt.pt")


def test_resume_with_a_different_model_is_refused(config_file):
    assert run("train.py", config_file).returncode == 0
    result = run("train.py", config_file, "--init_from=resume", "--n_embd=64")
    assert result.returncode != 0 and "n_embd=32 in the checkpoint but 64 now" in result.stderr


def test_config_files_and_overrides_apply_in_order(config_file):
    config = load_config([config_file, "--n_embd=48", "--memory_layers=(0, 1)", "--learning_rate=1"])
    assert config["n_embd"] == 48 and config["memory_layers"] == (0, 1) and config["learning_rate"] == 1.0
    assert config["n_layer"] == 2 and config["dataset"] == "tiny"


def test_config_keys_read_as_attributes_and_train_takes_a_plain_dict(char_data_dir, tmp_path):
    """The checkpoint records the config as a plain dict, which torch.load(weights_only=True) reads. Every key
    reads as itself: a key named like a dict method (items, values, copy...) would read as the method."""
    config = config_for(char_data_dir, tmp_path, max_iters=1, eval_interval=1)
    config.seed = 7
    assert config.seed == config["seed"] == 7
    assert [k for k in config if getattr(config, k) is not config[k]] == []
    with pytest.raises(AttributeError, match="config has no key 'lerning_rate'"):
        config.lerning_rate
    train(dict(config))
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]
    assert type(saved) is dict and saved == config


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "configs"))))
def test_shipped_configs_load_and_build(name):
    from model import GPT
    config = load_config([os.path.join(ROOT, "configs", name)])
    model_config = gpt_config(config, 65)
    if model_config.n_embd <= 256:  # CPU configs: build them for real
        GPT(model_config)


def test_help_lists_every_key_with_its_default_and_meaning():
    from config import default_config
    result = run("train.py", "--help")
    assert result.returncode == 0 and result.stderr == ""
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    for key, default in default_config().items():
        assert key in lines, key
        assert repr(default) in lines[key] and len(lines[key].split(repr(default), 1)[1].strip()) > 5, lines[key]


def test_every_event_has_a_time_and_the_start_event_says_how_the_run_was_made(char_data_dir, tmp_path):
    import time
    before = time.time()
    train(config_for(char_data_dir, tmp_path, max_iters=2, eval_interval=2, log_interval=1))
    with open(tmp_path / "log.jsonl") as f:
        events = [json.loads(line) for line in f]
    assert all(before <= e["time"] <= time.time() for e in events)
    start = events[0]
    assert start["event"] == "start" and start["config"]["n_embd"] == 32 and start["torch"] == torch.__version__
    assert start["dtype"] == "float32" and start["device"] == "cpu" and start["command"]
    assert all("eval_s" in e for e in events if e["event"] == "eval")


def test_init_from_another_run_takes_its_weights_only(char_data_dir, tmp_path):
    """Finetuning: the new run starts from the other run's weights (its first eval is the other's last) with
    a fresh optimizer and schedule (iteration 0), and writes only its own out_dir."""
    common = dict(memory_layers=(1,), eval_interval=4, log_interval=1)
    train(config_for(char_data_dir, tmp_path / "base", max_iters=8, **common))
    before = (tmp_path / "base" / "ckpt.pt").read_bytes()
    train(config_for(char_data_dir, tmp_path / "tuned", max_iters=4, init_from=str(tmp_path / "base"), **common))
    base_last, tuned_first = read_log(tmp_path / "base", "eval")[-1], read_log(tmp_path / "tuned", "eval")[0]
    assert tuned_first["iter"] == 0 and tuned_first["val_loss"] == pytest.approx(base_last["val_loss"], abs=1e-6)
    assert read_log(tmp_path / "tuned", "train")[0]["lr"] < 3e-3 / 5  # warmup again: a new schedule
    assert (tmp_path / "base" / "ckpt.pt").read_bytes() == before
    tuned = torch.load(tmp_path / "tuned" / "ckpt.pt", weights_only=True)
    assert tuned["iter_num"] == 4 and tuned["val_loss"] == read_log(tmp_path / "tuned", "eval")[-1]["val_loss"]


def test_init_from_a_run_with_another_vocabulary_is_refused(char_data_dir, tmp_path):
    from prepare_data import write_dataset
    train(config_for(char_data_dir, tmp_path / "base", max_iters=0))
    write_dataset("abc abc cab " * 200, "tiny", "char", str(tmp_path / "other_data"))
    from errors import ConfigError
    with pytest.raises(ConfigError, match=r"char vocabulary of \d+ ids .* but dataset 'tiny' has a char vocabulary of 4"):
        train(config_for(str(tmp_path / "other_data"), tmp_path / "tuned", init_from=str(tmp_path / "base")))


def test_eval_only_scores_a_checkpoint_and_writes_nothing_else(char_data_dir, tmp_path):
    train(config_for(char_data_dir, tmp_path, max_iters=3, eval_interval=3))
    written = (tmp_path / "ckpt.pt").read_bytes()
    last = read_log(tmp_path, "eval")[-1]
    train(config_for(char_data_dir, tmp_path, init_from="resume", eval_only=True))
    again = read_log(tmp_path, "eval")[-1]
    assert again["iter"] == 3 and again["val_loss"] == pytest.approx(last["val_loss"], abs=1e-6)
    assert again["checkpoint"].endswith("ckpt.pt") and (tmp_path / "ckpt.pt").read_bytes() == written
    result = run("train.py", f"--data_dir={char_data_dir}", "--dataset=tiny", f"--out_dir={tmp_path}", "--eval_only=True")
    assert result.returncode == 1 and "eval_only=True evaluates a checkpoint" in result.stderr


@pytest.mark.parametrize("eval_interval", [0, 2], ids=["timing-run", "with-evals"])
def test_compile_traces_the_training_step_once(char_data_dir, tmp_path, monkeypatch, eval_interval):
    """torch.compile traces the training step once, counted by Dynamo's frame counter: the value table's
    gradient buffer is made and zeroed before each step, outside the graph, so every micro-step finds it the
    same. Evals add two (the train split, and the val split, which measures the tables' usage), the same
    before the buffer exists and after. eval_interval=0 (bench.py gpu's training runs): no eval and no
    checkpoint. (Dynamo's frames do not depend on the backend: eager here, for time.)"""
    import torch._dynamo
    from torch._dynamo.utils import counters
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    train(config_for(char_data_dir, tmp_path, max_iters=4, eval_interval=eval_interval, log_interval=2,
                     compile=True, gradient_accumulation_steps=2, memory_layers=(1,)))
    assert counters["frames"]["ok"] == counters["stats"]["unique_graphs"] == (3 if eval_interval else 1)
    assert [e["iter"] for e in read_log(tmp_path, "train")] == [2, 4]
    assert [e["iter"] for e in read_log(tmp_path, "eval")] == ([0, 2, 4] if eval_interval else [])
    assert ("ckpt.pt" in os.listdir(tmp_path)) == bool(eval_interval)
    if not eval_interval:
        assert os.listdir(tmp_path) == ["log.jsonl"]


def test_data_seed_changes_the_batches_and_not_the_initialisation(char_data_dir, tmp_path):
    """seed alone sets both; data_seed=seed is the same run; another data_seed keeps the initial weights (the same
    first eval) and trains on other batches (another first loss)."""
    def losses(name, **seeds):
        train(config_for(char_data_dir, tmp_path / name, max_iters=2, eval_interval=2, log_interval=1, **seeds))
        return read_log(tmp_path / name, "eval")[0]["val_loss"], [e["loss"] for e in read_log(tmp_path / name, "train")]
    alone, same, other, reseeded = (losses("alone", seed=3), losses("same", seed=3, data_seed=3),
                                    losses("other", seed=3, data_seed=4), losses("reseeded", seed=4, data_seed=3))
    assert alone == same
    assert other[0] == alone[0] and other[1][0] != alone[1][0]
    assert reseeded[0] != alone[0]
