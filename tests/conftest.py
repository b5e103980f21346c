"""Shared fixtures and helpers: offline tokenizer files, a tiny character-level dataset, tiny train configs."""
import json
import os
import subprocess
import sys

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


def run(script, *args, cwd=ROOT):
    """Run a script of the repository in a fresh process; its CompletedProcess (text output)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
