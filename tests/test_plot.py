"""plot.py on small synthetic logs: the PNG it writes, resumed logs, bad input and missing matplotlib."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from tools import plot

PLOT = os.path.join(ROOT, "tools", "plot.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def start(it=0, tokens_per_iter=1000):
    return {"event": "start", "iter": it, "params": 1000, "active_params": 500, "flops_per_token": 3000,
            "tokens_per_iter": tokens_per_iter, "device": "cpu"}


def train(it, loss=None):
    return {"event": "train", "iter": it, "loss": 4.0 / (1 + it) ** 0.2 if loss is None else loss,
            "lr": 1e-3 * min(1, it / 5), "grad_norm": 1.0, "ms_per_iter": 10.0, "tokens_per_s": 1e5}


def evaluate(it, read_fraction=None):
    event = {"event": "eval", "iter": it, "train_loss": 4.0 / (1 + it) ** 0.2, "val_loss": 4.2 / (1 + it) ** 0.2}
    if read_fraction is not None:
        event["mem_read_fraction"] = [read_fraction]
    return event


def write_run(folder, events=None, lines=None):
    """A run folder whose log.jsonl holds events (dicts) or raw text lines."""
    os.makedirs(folder, exist_ok=True)
    lines = lines if lines is not None else [json.dumps(e) for e in events]
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(folder)


def run_events(memory=False, iters=20):
    events = [start()]
    for it in range(0, iters + 1, 2):
        if it:
            events.append(train(it))
        if it % 10 == 0:
            events.append(evaluate(it, read_fraction=it / iters if memory else None))
    return events + [{"event": "stop", "iter": iters, "signal": "SIGTERM"}]


def check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    import matplotlib.image
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 0.01  # not blank


def run_script(*args, prefix=()):
    return subprocess.run([sys.executable, *prefix, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_one_run_writes_its_plot_next_to_its_log(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folder = write_run(tmp_path / "dense", run_events())
    plot.main([folder])
    out = os.path.join(folder, "plot.png")
    assert capsys.readouterr().out.strip() == out
    check_png(out)


def test_two_runs_one_with_memory_usage(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    dense = write_run(tmp_path / "dense", run_events())
    memplus = write_run(tmp_path / "memplus", run_events(memory=True))
    monkeypatch.chdir(tmp_path)
    plot.main([dense, memplus, "--title", "dense against Memory+", "--labels", "dense,Memory+"])
    assert capsys.readouterr().out.strip() == "runs.png"
    check_png(tmp_path / "runs.png")
    plot.main([dense, memplus, "--out", str(tmp_path / "sub" / "both.png")])
    check_png(tmp_path / "sub" / "both.png")


def test_a_resumed_log_is_one_run(tmp_path, capsys):
    """Resumed at iter 10 after logging up to 14: the steps after 10 are redone, tokens counted per segment."""
    events = [start(0, 1000), evaluate(0)] + [train(it) for it in (2, 4, 6, 8, 10)] + [evaluate(10)]
    events += [train(12, loss=99.0), train(14, loss=99.0), evaluate(14)]  # lost with the crash
    events += [start(10, 2000), evaluate(10)] + [train(it) for it in (12, 14, 16)] + [evaluate(16)]
    folder = write_run(tmp_path / "resumed", events)
    run = plot.read_run(folder)
    assert [e["iter"] for e in run["train"]] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert max(e["loss"] for e in run["train"]) < 99
    assert [(e["iter"], e["tokens"]) for e in run["eval"]] == [(0, 0), (10, 10_000), (16, 22_000)]
    pytest.importorskip("matplotlib")
    plot.main([folder])
    check_png(os.path.join(folder, "plot.png"))


@pytest.mark.parametrize("case", ["no log", "no events", "not json", "not an object", "missing field", "labels"])
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, case):
    folder = str(tmp_path / "run")
    args, culprit = [folder], folder
    if case == "no log":
        os.makedirs(folder)
        culprit = "train first"
    elif case == "no events":
        write_run(folder, [start(), {"event": "stop", "iter": 0}])
        culprit = os.path.join(folder, "log.jsonl")
    elif case == "not json":
        write_run(folder, lines=[json.dumps(start()), json.dumps(train(1)), '{"event": "train", "iter'])
        culprit = "log.jsonl line 3"
    elif case == "not an object":
        write_run(folder, lines=[json.dumps(start()), "[1, 2]"])
        culprit = "log.jsonl line 2"
    elif case == "missing field":
        write_run(folder, lines=[json.dumps(start()), json.dumps({"event": "train", "iter": 1, "lr": 1e-3})])
        culprit = "line 2: train event without a number for loss"
    else:
        args = [write_run(folder, run_events()), "--labels", "a,b"]
        culprit = "2 labels for 1 runs"
    result = run_script(PLOT, *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(folder, "plot.png"))


HIDE_MATPLOTLIB = """
import runpy, sys

class HideMatplotlib:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, HideMatplotlib())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_without_matplotlib_it_says_how_to_install_it(tmp_path):
    folder = write_run(tmp_path / "dense", run_events())
    result = run_script(PLOT, folder, prefix=("-c", HIDE_MATPLOTLIB))
    assert result.returncode == 1
    assert result.stderr.strip() == "error: plot.py needs matplotlib: pip install matplotlib"
    assert not os.path.exists(os.path.join(folder, "plot.png"))
