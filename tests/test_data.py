"""Datasets in numbered shards: prepare_data.py fineweb_edu on local jsonl files, read back by train.py; an
existing dataset replaced only with --overwrite."""
import json
import os
import sys

import numpy as np
import pytest
import torch

import prepare_data
from data import get_batch, load_dataset


@pytest.fixture(autouse=True)
def needs_gpt2_bpe(gpt2_bpe):
    """Every dataset here is GPT-2 ids."""


@pytest.fixture
def documents(corpus_text):
    return [d for d in corpus_text[:30_000].split("\n\n") if d.strip()]


@pytest.fixture
def jsonl(tmp_path, documents):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(documents)) + "\n\n")
    return str(path)


def gpt2_stream(documents, n):
    """The first n ids of the documents, each led by <|endoftext|>, encoded one by one."""
    encoding = prepare_data.gpt2_encoding()
    ids = [i for d in documents for i in [encoding.eot_token, *encoding.encode_ordinary(d)]]
    assert len(ids) >= n
    return np.array(ids[:n], dtype=np.uint16)


def fineweb(jsonl, data_dir, *args):
    prepare_data.main(["fineweb_edu", "--input", jsonl, "--data_dir", str(data_dir), *args])


def test_shards_hold_the_documents_in_order_and_train_reads_them(jsonl, documents, tmp_path):
    fineweb(jsonl, tmp_path, "--num_tokens=3000", "--val_tokens=500", "--shard_tokens=700")
    folder = tmp_path / "fineweb_edu"
    assert sorted(os.listdir(folder)) == ["meta.json", "train_000000.bin", "train_000001.bin", "train_000002.bin",
                                          "train_000003.bin", "val_000000.bin"]
    assert [os.path.getsize(folder / f"train_00000{i}.bin") // 2 for i in range(4)] == [700, 700, 700, 400]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert meta["train_tokens"] == 2500 and meta["val_tokens"] == 500
    want = gpt2_stream(documents, 3000)

    splits, _ = load_dataset(str(tmp_path), "fineweb_edu", 64)
    assert len(splits["val"]) == 500 and len(splits["train"]) == 2500
    assert np.array_equal(splits["val"].read(0, 500), want[:500])
    assert np.array_equal(splits["train"].read(0, 2500), want[500:])
    assert np.array_equal(splits["train"].read(650, 800), want[500 + 650:500 + 1450])  # across three shards

    generator = torch.Generator().manual_seed(0)
    x, y = get_batch(splits["train"], 16, 64, generator, torch.device("cpu"))
    starts = torch.randint(2500 - 64, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    assert torch.equal(x, torch.tensor(np.stack([want[500 + s:500 + s + 64] for s in starts]), dtype=torch.long))
    assert torch.equal(y[:, :-1], x[:, 1:])


def test_writing_again_replaces_every_shard(jsonl, tmp_path):
    fineweb(jsonl, tmp_path, "--num_tokens=3000", "--val_tokens=500", "--shard_tokens=700")
    fineweb(jsonl, tmp_path, "--num_tokens=1000", "--val_tokens=100", "--shard_tokens=2000", "--overwrite")
    assert sorted(os.listdir(tmp_path / "fineweb_edu")) == ["meta.json", "train_000000.bin", "val_000000.bin"]


def test_bad_input_midway_keeps_the_dataset_it_would_replace(jsonl, tmp_path):
    fineweb(jsonl, tmp_path, "--num_tokens=3000", "--val_tokens=500", "--shard_tokens=700")
    folder = tmp_path / "fineweb_edu"
    (folder / "notes.txt").write_text("the user's own")
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    (tmp_path / "bad.jsonl").write_text('{"text": "a document"}\n' * 50 + "not json\n")
    with pytest.raises(SystemExit, match="bad.jsonl line 51 is not a JSON object"):
        fineweb(str(tmp_path / "bad.jsonl"), tmp_path, "--num_tokens=3000", "--val_tokens=10", "--shard_tokens=20",
                "--overwrite")
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "docs.jsonl", "fineweb_edu"]  # no staging folder left
    fineweb(jsonl, tmp_path, "--num_tokens=1000", "--val_tokens=100", "--shard_tokens=2000", "--overwrite")
    assert sorted(os.listdir(folder)) == ["meta.json", "notes.txt", "train_000000.bin", "val_000000.bin"]


@pytest.mark.parametrize("content, args, message", [
    ('{"text": "fine"}\nnot json\n', [], "docs.jsonl line 2 is not a JSON object with a 'text' string"),
    ('{"body": "no text"}\n', [], "docs.jsonl line 1 is not a JSON object with a 'text' string"),
    ('{"text": "short"}\n', [], "the corpus ran out after 2 tokens, all of them validation tokens"),
    ('{"text": "fine"}\n', ["--val_tokens=100"], "--val_tokens=100 leaves nothing of --num_tokens=100 to train on"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, content, args, message):
    (tmp_path / "docs.jsonl").write_text(content)
    with pytest.raises(SystemExit) as stop:
        fineweb(str(tmp_path / "docs.jsonl"), tmp_path, "--num_tokens=100", *args)
    assert message in str(stop.value) and "\n" not in str(stop.value)


def test_streaming_without_the_datasets_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(SystemExit, match="needs the Hugging Face `datasets` package: pip install datasets"):
        prepare_data.main(["fineweb_edu", "--num_tokens=100", "--data_dir", str(tmp_path)])


def test_a_dataset_is_replaced_only_with_overwrite_which_names_the_checkpoints_it_breaks(tmp_path, monkeypatch,
                                                                                        capsys):
    monkeypatch.chdir(tmp_path)  # where train.py's out/ is looked for
    (tmp_path / "a.txt").write_text("abc " * 100)
    (tmp_path / "b.txt").write_text("xyz! " * 100)
    text = ["text", "--tokenizer=char", "--name=mine", "--data_dir=data", "--input"]
    prepare_data.main(text + ["a.txt"])
    folder = tmp_path / "data" / "mine"
    os.makedirs("out/run")  # a checkpoint trained on it, and one trained on another dataset
    meta = json.loads((folder / "meta.json").read_text())
    torch.save({"config": {"data_dir": "data", "dataset": "mine"}, "meta": meta}, "out/run/ckpt.pt")
    os.makedirs("out/other")
    torch.save({"config": {"data_dir": "data", "dataset": "theirs"}, "meta": meta}, "out/other/ckpt.pt")
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    with pytest.raises(SystemExit) as refused:
        prepare_data.main(text + ["b.txt"])
    assert str(refused.value) == ("error: dataset data/mine exists; out/run/ckpt.pt trained on it and would no "
                                  "longer match another vocabulary: choose another --name, or replace it with "
                                  "--overwrite")
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    capsys.readouterr()
    prepare_data.main(text + ["a.txt", "--overwrite"])  # the same vocabulary: the checkpoint still matches
    assert capsys.readouterr().err == ""
    prepare_data.main(text + ["b.txt", "--overwrite"])
    assert capsys.readouterr().err == ("warning: the vocabulary of data/mine changed; checkpoints trained on the "
                                       "old one cannot resume or finetune on it: out/run/ckpt.pt\n")
    assert json.loads((folder / "meta.json").read_text())["chars"] == [" ", "!", "x", "y", "z"]
