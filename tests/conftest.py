"""Shared fixtures: offline tokenizer files and a tiny character-level dataset."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
sys.path.insert(0, ROOT)
# Triton reads TRITON_INTERPRET when it is imported and when kernels are defined: set before anything
# imports them, so the Triton kernels run on CPU tensors (tests/test_kernels.py). CPU tensors take the
# PyTorch path everywhere else, so nothing else changes.
os.environ.setdefault("TRITON_INTERPRET", "1")
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))

SAMPLE_TEXT = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?
"""


@pytest.fixture(scope="session")
def corpus_text():
    """tinyshakespeare when ../shared has it (the real corpus), else a few repeated lines."""
    path = os.path.join(SHARED, "data", "tinyshakespeare.txt")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()[:200_000]
    return SAMPLE_TEXT * 500


@pytest.fixture(scope="session")
def char_data_dir(tmp_path_factory, corpus_text):
    """A data_dir holding the character-level dataset 'tiny'."""
    from prepare_data import write_dataset
    data_dir = str(tmp_path_factory.mktemp("data"))
    write_dataset(corpus_text, "tiny", "char", data_dir)
    return data_dir
