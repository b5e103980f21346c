"""Shared fixtures and helpers: offline tokenizer files, a tiny character-level dataset, tiny train configs,
processes started as torchrun ranks, brute-force references."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
sys.path.insert(0, ROOT)
# Triton reads TRITON_INTERPRET when it is imported and when kernels are defined: set before anything
# imports them, so the Triton kernels run on CPU tensors (tests/test_kernels.py). CPU tensors take the
# PyTorch path everywhere else, so nothing else changes.
os.environ.setdefault("TRITON_INTERPRET", "1")
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):  # an optional offline cache of the GPT-2 BPE files
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))


@pytest.fixture(scope="session")
def gpt2_bpe():
    """tiktoken's GPT-2 encoding (from its cache, or downloaded once); tests that need it are skipped, with
    the reason, where it cannot be had (offline with no cache)."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        pytest.skip(f"GPT-2 BPE files unavailable (offline and not in tiktoken's cache: {type(e).__name__})")

@pytest.fixture(scope="session")
def corpus_text():
    """The first 200k characters of tinyshakespeare, which the repository ships (corpora/)."""
    with open(os.path.join(ROOT, "corpora", "tinyshakespeare.txt"), encoding="utf-8") as f:
        return f.read()[:200_000]


@pytest.fixture(scope="session")
def char_data_dir(tmp_path_factory, corpus_text):
    """A data_dir holding the character-level dataset 'tiny'."""
    from prepare_data import write_dataset
    data_dir = str(tmp_path_factory.mktemp("data"))
    write_dataset(corpus_text, "tiny", "char", data_dir)
    return data_dir


TINY = dict(dataset="tiny", n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, eval_iters=2,
            learning_rate=3e-3, min_lr=3e-4, warmup_iters=5, device="cpu", mem_n_keys=8, mem_knn=4, mem_heads=2)


def config_for(data_dir, out_dir, **changes):
    """A train config of a tiny model on the dataset 'tiny' of data_dir (char_data_dir)."""
    from config import load_config
    config = load_config([])
    config.update(TINY, data_dir=data_dir, out_dir=str(out_dir), **changes)
    return config


def read_log(out_dir, event):
    """The events of one kind in out_dir/log.jsonl."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [e for e in map(json.loads, f) if e["event"] == event]


def run(script, *args, cwd=ROOT, timeout=300):
    """Run a script of the repository in a fresh process; its CompletedProcess (text output). Past the
    timeout the script and every process it started (a benchmark's train.py runs) are killed, so a slow
    run fails its test and leaves nothing running."""
    with subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


DEADLINE = 60  # seconds for any launch here; they take a few
DISTRIBUTED_SETTINGS = ["--dataset=tiny", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
                        "--eval_iters=2", "--eval_interval=3", "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=6", "--device=cpu",
                        "--dtype=float32", "--memory_layers=(0, 1)", "--mem_n_keys=8", "--mem_knn=4",
                        "--mem_heads=2", "--learning_rate=3e-3", "--mem_value_lr=3e-2",
                        "--gradient_accumulation_steps=2"]  # tiny runs as several ranks


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in extra.items()}}


def wait_all(procs, deadline=DEADLINE):
    """(returncode, stdout, stderr) of each process; past the deadline all of them and their children
    are killed and the test fails."""
    end, results = time.time() + deadline, []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(0.1, end - time.time()))
            results.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"processes still running after {deadline} s: a hang")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return results


def run_ranks(worker, world, *args):
    """worker(rank, world, port, *args) in world spawned processes (a gloo group on a free port); the test
    fails if any of them fails or is still running after DEADLINE."""
    import multiprocessing
    port, spawn = free_port(), multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=worker, args=(rank, world, port, *args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    end = time.time() + DEADLINE
    for proc in procs:
        proc.join(max(0.1, end - time.time()))
    hung = [proc for proc in procs if proc.is_alive()]
    for proc in hung:
        proc.kill()
    assert not hung and all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]


def start(args, **extra_env):
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(**extra_env),
                            start_new_session=True)


def start_train(out_dir, data_dir, *args):
    """One process: python train.py."""
    return start([sys.executable, os.path.join(ROOT, "train.py"), *DISTRIBUTED_SETTINGS, f"--data_dir={data_dir}",
                  f"--out_dir={out_dir}", *args])


def start_torchrun(nprocs, out_dir, data_dir, *args):
    """nprocs ranks launched by torchrun, as a user would."""
    return start([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
                  os.path.join(ROOT, "train.py"), *DISTRIBUTED_SETTINGS, f"--data_dir={data_dir}",
                  f"--out_dir={out_dir}", *args])


def start_ranks(nprocs, out_dir, data_dir, *args):
    """nprocs ranks started directly with the environment torchrun would give them, without its agent
    (which would stop the others when one fails): what a rank does on its own."""
    port = free_port()
    return [start([sys.executable, os.path.join(ROOT, "train.py"), *DISTRIBUTED_SETTINGS, f"--data_dir={data_dir}",
                   f"--out_dir={out_dir}", *args], RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=nprocs,
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for rank in range(nprocs)]


def full_keys(layer, head):
    """All n_keys**2 keys of one head, key i*n_keys+j = concat(sub_keys[h,0,i], sub_keys[h,1,j])."""
    import torch
    k1, k2 = layer.sub_keys[head, 0], layer.sub_keys[head, 1]
    n = layer.n_keys
    return torch.cat([k1.repeat_interleave(n, 0), k2.repeat(n, 1)], dim=1)


def brute_force_lookup(layer, x):
    """Score every full key of every head; top-knn; per-head softmax. (tokens, heads, knn) each."""
    import torch
    import torch.nn.functional as F
    q = (x @ layer.query.weight.T + layer.query.bias).view(len(x), layer.heads, layer.k_dim)
    scores = torch.stack([q[:, h] @ full_keys(layer, h).T for h in range(layer.heads)], dim=1)
    top, idx = scores.topk(layer.knn, dim=-1)
    return idx, top, F.softmax(top, dim=-1)

def no_host_reads(gm, example_inputs):
    """A torch.compile backend that refuses graphs holding a size or value known only on the device (an
    unbacked symbol: bincount, unique, nonzero, .item() ...), which a GPU run would sync the host to read.
    (torch 2.13's fullgraph=True captures those as unbacked symbols rather than refusing them.)"""
    reads = [str(node.target) for node in gm.graph.nodes if node.meta.get("unbacked_bindings")]
    assert not reads, f"data-dependent sizes or values (host syncs): {reads}"
    return gm.forward
