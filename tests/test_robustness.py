"""Runs that survive: atomic checkpoints, corruption detection, kill/resume, signals, NaNs, bad inputs."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
from checkpoint import CheckpointError, load_checkpoint, load_latest, open_run, save_checkpoint
from conftest import ROOT
from fault_injection import file_size_limit, run_disk_full, run_fault_injection, run_two_into_one_out_dir


def state(value):
    return {"weights": torch.full((64, 64), float(value)), "iter_num": value}


def test_a_crash_before_the_rename_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(state(1), path)

    def crash(src, dst):
        raise OSError("simulated crash")
    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(state(2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["iter_num"] == 1
    save_checkpoint(state(3), path)  # the leftover temporary file does not get in the way
    assert load_checkpoint(path)["iter_num"] == 3 and load_checkpoint(str(tmp_path / "ckpt.prev.pt"))["iter_num"] == 1


def test_a_crash_between_the_renames_falls_back_to_the_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(state(1), path)
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash")
        real_replace(src, dst)
    monkeypatch.setattr(checkpoint.os, "replace", crash_on_second)
    with pytest.raises(OSError):
        save_checkpoint(state(2), path)
    monkeypatch.undo()
    assert not os.path.exists(path)
    loaded, source = load_latest(path)
    assert loaded["iter_num"] == 1 and source.endswith("ckpt.prev.pt")


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_damaged_checkpoints_are_detected(tmp_path, damage):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(state(1), path)
    data = bytearray(open(path, "rb").read())
    if damage == "flip":  # inside the tensor data, which torch.load alone would read without complaint
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = b"not a checkpoint"
    open(path, "wb").write(data)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {path}"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):  # no previous checkpoint to fall back to
        load_latest(path)


def test_a_damaged_checkpoint_is_moved_aside_and_the_good_previous_one_kept(tmp_path, capsys):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(state(1), path)
    save_checkpoint(state(2), path)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # ckpt.pt (2) rots on disk; ckpt.prev.pt (1) is good
    open(path, "wb").write(data)
    save_checkpoint(state(3), path)
    assert load_checkpoint(path)["iter_num"] == 3
    assert load_checkpoint(str(tmp_path / "ckpt.prev.pt"))["iter_num"] == 1  # not pushed out by the damaged one
    assert open(tmp_path / "ckpt.damaged.pt", "rb").read() == data
    warning = capsys.readouterr().out
    assert warning.count("\n") == 1 and "ckpt.pt is damaged" in warning and "ckpt.damaged.pt" in warning


def test_a_failed_write_is_one_line_and_keeps_every_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(state(1), path)
    save_checkpoint(state(2), path)
    before = {name: open(tmp_path / name, "rb").read() for name in os.listdir(tmp_path)}

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {path}: No space left on device"):
        save_checkpoint(state(3), path)
    assert {name: open(tmp_path / name, "rb").read() for name in os.listdir(tmp_path)} == before  # no temporary


def test_each_writer_has_its_own_temporary_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    others = [f"{path}.tmp", f"{path}.1.tmp"]  # another process's, being written
    for other in others:
        open(other, "w").write("another writer's")
    save_checkpoint(state(1), path)
    assert load_checkpoint(path)["iter_num"] == 1
    assert all(open(other).read() == "another writer's" for other in others)


def test_one_run_per_out_dir(tmp_path):
    out = str(tmp_path / "out")
    lock = open_run(out, replaces_checkpoint=True, overwrite=False)
    with pytest.raises(CheckpointError, match=f"in use by the run of pid {os.getpid()} on "):
        open_run(out, replaces_checkpoint=False, overwrite=False)
    lock.release()
    assert os.listdir(out) == []
    # a crashed run's lock file (no process holds it any more) is taken over, its temporary files removed
    (tmp_path / "out" / "run.lock").write_text("pid 999999999 on a-host\n")
    (tmp_path / "out" / "ckpt.pt.999999999.tmp").write_text("cut short")
    with open_run(out, replaces_checkpoint=True, overwrite=False):
        assert os.listdir(out) == ["run.lock"]
        assert (tmp_path / "out" / "run.lock").read_text().startswith(f"pid {os.getpid()} on ")


def test_a_scratch_run_over_a_checkpoint_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    save_checkpoint(state(1), str(out / "ckpt.pt"))
    with pytest.raises(CheckpointError, match="continue it with --init_from=resume, or start afresh over it with "
                                              "--overwrite=True"):
        open_run(str(out), replaces_checkpoint=True, overwrite=False)
    assert sorted(os.listdir(out)) == ["ckpt.pt"]  # its lock let go
    open_run(str(out), replaces_checkpoint=False, overwrite=False).release()  # resuming it is fine
    open_run(str(out), replaces_checkpoint=True, overwrite=True).release()


def test_a_second_run_into_a_busy_out_dir_is_refused_and_the_first_goes_on(tmp_path):
    assert run_two_into_one_out_dir(str(tmp_path), max_iters=20) == []


def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    assert run_disk_full(str(tmp_path)) == []


def test_a_checkpoint_write_that_fails_on_rank_0_stops_every_rank(char_data_dir, tmp_path):
    """Rank 0 alone writes; its failure is shared, so rank 1 stops with the same line instead of waiting."""
    from conftest import DISTRIBUTED_SETTINGS, env, free_port, wait_all
    port, started = free_port(), time.time()
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *DISTRIBUTED_SETTINGS, f"--data_dir={char_data_dir}",
                               f"--out_dir={tmp_path}", "--batch_size=4", "--mem_parallel=2", "--max_iters=6"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env=env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port),
                              preexec_fn=file_size_limit(50_000) if rank == 0 else None) for rank in range(2)]
    results = wait_all(procs)
    for code, _, err in results:
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: cannot write checkpoint {tmp_path}/ckpt.pt: File too large")
    assert time.time() - started < 45 and not [f for f in os.listdir(tmp_path) if f.endswith("tmp")]


def test_kill_at_a_random_moment_resumes_to_the_uninterrupted_losses(tmp_path):
    assert run_fault_injection(kills=1, seed=int(time.time()), max_iters=15, workdir=str(tmp_path)) == []


def train_cmd(config_file, *args):
    return [sys.executable, os.path.join(ROOT, "train.py"), config_file, *args]


@pytest.fixture
def config_file(tmp_path, char_data_dir):
    path = tmp_path / "cfg.py"
    path.write_text(f"dataset = 'tiny'\ndata_dir = {char_data_dir!r}\nout_dir = {str(tmp_path / 'out')!r}\n"
                    "n_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 16\nbatch_size = 4\neval_iters = 1\n"
                    "log_interval = 1\neval_interval = 4\ndevice = 'cpu'\n")
    return str(path)


def events(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [e for e in map(json.loads, f) if e["event"] == kind]


def test_sigterm_writes_the_last_completed_step(config_file, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(train_cmd(config_file, "--max_iters=100000"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while not (out / "log.jsonl").exists() or len(events(out, "train")) < 6:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr
    stopped = events(out, "stop")[-1]
    assert stopped["signal"] == "SIGTERM" and stopped["iter"] >= 6
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == stopped["iter"]


def stop_after(proc, out, ready, signum):
    """Send signum to proc once ready(out) holds (polled in out's log); (returncode, stdout, stderr, seconds
    from the signal to the exit). The test fails if proc ends before, or is still running 60 s after."""
    while not (out / "log.jsonl").exists() or not ready(out):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signum)
    sent = time.time()
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{signal.Signals(signum).name} did not end the run within 60 s")
    return proc.returncode, stdout, stderr, time.time() - sent


def test_a_stop_ends_a_step_of_a_million_micro_steps_within_seconds(config_file, tmp_path):
    """The stop is taken at the next micro-step, not at the end of the step; no step completed since
    the checkpoint of iter 0, so it is left as it was."""
    out = tmp_path / "out"
    proc = subprocess.Popen(train_cmd(config_file, "--gradient_accumulation_steps=1000000", "--max_iters=10"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, stdout, stderr, seconds = stop_after(proc, out, lambda out: (out / "ckpt.pt").exists(), signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and stderr == "", stderr
    assert seconds < 30  # a few micro-steps of a few ms; generous for a loaded machine
    stopped = events(out, "stop")[-1]
    assert stopped["iter"] == 0 and not stopped["saved"]
    assert stdout.endswith("SIGTERM: stopped at iter 0, no step completed since the last save; continue with "
                           "--init_from=resume\n")
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 0 and not (out / "ckpt.prev.pt").exists()


def test_a_stop_mid_step_keeps_the_last_completed_step_and_resumes_exactly(config_file, tmp_path):
    """Ctrl-C inside a step of 200 micro-steps (about a second): the checkpoint is the state after the last
    completed step, not after the step in progress, and the resumed run logs the uninterrupted run's losses."""
    from fault_injection import losses
    settings = ["--gradient_accumulation_steps=200", "--eval_interval=100", "--max_iters=5"]
    reference = tmp_path / "reference"
    assert subprocess.run(train_cmd(config_file, *settings, f"--out_dir={reference}")).returncode == 0
    out = tmp_path / "out"
    proc = subprocess.Popen(train_cmd(config_file, *settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    completed = []
    code, _, stderr, _ = stop_after(proc, out, lambda out: completed.append(len(events(out, "train"))) or
                                 completed[-1] >= 2, signal.SIGINT)
    assert code == 128 + signal.SIGINT and stderr == "", stderr
    stopped = events(out, "stop")[-1]
    assert stopped["saved"] and stopped["iter"] == completed[-1] == load_checkpoint(str(out / "ckpt.pt"))["iter_num"]
    assert subprocess.run(train_cmd(config_file, *settings, "--init_from=resume")).returncode == 0
    assert losses(out) == losses(reference)


def test_a_nan_stops_the_run_and_leaves_the_checkpoint_alone(config_file, tmp_path):
    out = tmp_path / "out"
    assert subprocess.run(train_cmd(config_file, "--max_iters=4"), capture_output=True).returncode == 0
    digest = hashlib.sha256(open(out / "ckpt.pt", "rb").read()).hexdigest()
    # an absurd learning rate makes the weights overflow within a step or two
    result = subprocess.run(train_cmd(config_file, "--max_iters=8", "--init_from=resume", "--learning_rate=1e30",
                                      "--warmup_iters=0"), capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: non-finite loss or gradient at iter ")
    assert hashlib.sha256(open(out / "ckpt.pt", "rb").read()).hexdigest() == digest
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 4

    skipped = subprocess.run(train_cmd(config_file, "--max_iters=8", "--init_from=resume", "--learning_rate=1e30",
                                       "--warmup_iters=0", "--nonfinite=skip"), capture_output=True, text=True)
    assert skipped.returncode == 0, skipped.stderr
    assert len(events(out, "skip")) >= 1


def test_token_ids_beyond_the_vocabulary_are_reported(config_file, tmp_path, char_data_dir):
    bad_dir = tmp_path / "bad_data"
    (bad_dir / "tiny").mkdir(parents=True)
    for name in ("train.bin", "val.bin"):
        (bad_dir / "tiny" / name).write_bytes(open(os.path.join(char_data_dir, "tiny", name), "rb").read())
    meta = json.load(open(os.path.join(char_data_dir, "tiny", "meta.json")))
    json.dump({**meta, "vocab_size": 10}, open(bad_dir / "tiny" / "meta.json", "w"))
    result = subprocess.run(train_cmd(config_file, f"--data_dir={bad_dir}", "--max_iters=1"),
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "beyond the vocabulary of 10 in its meta.json" in result.stderr


def test_block_size_larger_than_the_data_is_reported(config_file, tmp_path):
    result = subprocess.run(train_cmd(config_file, "--block_size=100000000"), capture_output=True, text=True)
    assert result.returncode == 1 and "lower block_size" in result.stderr and result.stderr.count("\n") == 1


def test_sample_prompts(config_file, tmp_path):
    assert subprocess.run(train_cmd(config_file, "--max_iters=0"), capture_output=True).returncode == 0
    sample = [sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={tmp_path / 'out'}", "--num_samples=1",
              "--max_new_tokens=5"]
    empty = subprocess.run(sample + ["--start="], capture_output=True, text=True)
    assert empty.returncode == 1 and "the prompt is empty" in empty.stderr
    unknown = subprocess.run(sample + ["--start=\u00e9t\u00e9"], capture_output=True, text=True)
    assert unknown.returncode == 1 and "cannot encode the prompt" in unknown.stderr
    (tmp_path / "long.txt").write_text("First Citizen: " * 10)  # 150 characters, block_size 16
    long = subprocess.run(sample + [f"--start=FILE:{tmp_path / 'long.txt'}"], capture_output=True, text=True)
    assert long.returncode == 0 and long.stdout.startswith("First Citizen: " * 10)
    assert "longer than the context" in long.stderr
    val_loss = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["val_loss"]
    assert long.stderr.startswith(f"loaded {tmp_path / 'out'}/ckpt.pt: iteration 0, val loss {val_loss:.4f}\n")
    missing = subprocess.run(sample + ["--start=FILE:/nonexistent/prompt.txt"], capture_output=True, text=True)
    assert missing.returncode == 1 and "cannot read prompt file /nonexistent/prompt.txt" in missing.stderr


def test_missing_tokenizer_files_offline_are_reported(tmp_path):
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    (tmp_path / "in.txt").write_text("hello world")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "text", "--input",
                             str(tmp_path / "in.txt"), "--name", "x", "--data_dir", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: cannot load the GPT-2 tokenizer")
