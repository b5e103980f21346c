"""Finetuning on one's own text: prepare_data.py text --vocab_from writes a second corpus in the vocabulary
of the first (a dataset, or a run's checkpoint when the dataset is gone), a model trained on the first is
finetuned on it (finetune='smf', the first as background), and text the vocabulary cannot encode is
refused with nothing written."""
import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest

import prepare_data
from conftest import config_for, read_log, run
from errors import ConfigError
from train import train

SMF = dict(memory_layers=(1,), mem_n_keys=16, mem_swilu=False, eval_interval=20, log_interval=10)


@pytest.fixture(params=["char", "compact"])
def tokenizer(request):
    if request.param == "compact":
        request.getfixturevalue("gpt2_bpe")  # skipped with the reason where the BPE files cannot be had
    return request.param


@pytest.fixture
def texts(tmp_path, corpus_text):
    """{name: file} of three corpora: the first, new text made of its lines (a few, repeated), and one
    holding a character and a word the first never has."""
    first = corpus_text[:60_000]
    lines = random.Random(0).sample([line for line in first.splitlines() if len(line) > 20], 4)
    texts = {"first": first, "second": "\n".join(lines * 40) + "\n",
             "third": "\n".join(lines) + "\nThe Zorgblaxian owes\n12 ducats §\n"}
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    return {name: str(tmp_path / f"{name}.txt") for name in texts}


def prepare(*args):
    prepare_data.main(["text", *args])


def files(*folders):
    """{path: sha256} of every file under folders."""
    return {os.path.join(d, f): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for folder in folders for d, _, names in os.walk(folder) for f in names}


def reference_ids(text, meta, bpe):
    """The ids of text in meta's vocabulary, counted out here: the index of each character (char), or of
    each GPT-2 id among the corpus's (compact)."""
    if meta["tokenizer"] == "char":
        return [meta["chars"].index(c) for c in text]
    return [meta["compact_ids"].index(g) for g in bpe.encode_ordinary(text)]


def test_a_model_of_ones_own_text_is_finetuned_on_new_text_in_its_vocabulary(tokenizer, texts, tmp_path, request):
    data, base, smf = tmp_path / "data", tmp_path / "base", tmp_path / "smf"
    prepare("--input", texts["first"], "--name=first", f"--tokenizer={tokenizer}", f"--data_dir={data}")
    prepare("--input", texts["second"], "--name=second", "--vocab_from=first", f"--data_dir={data}")
    first, second = (json.loads((data / n / "meta.json").read_text()) for n in ("first", "second"))
    assert all(second[k] == first[k] for k in ("tokenizer", "vocab_size", "chars", "compact_ids") if k in first)
    bpe = request.getfixturevalue("gpt2_bpe") if tokenizer == "compact" else None
    with open(texts["second"], encoding="utf-8") as f:
        new_text = f.read()
    want = reference_ids(new_text, first, bpe)
    got = np.concatenate([np.fromfile(data / "second" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert got.tolist() == want

    train(config_for(str(data), base, dataset="first", max_iters=200, **SMF))
    train(config_for(str(data), smf, dataset="second", max_iters=40, init_from=str(base), finetune="smf",
                     smf_rows=64, smf_background_batches=4, mem_value_lr=0.3, facts_retain_dataset="first", **SMF))
    evals = read_log(smf, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.05, evals  # the new text is learned
    assert read_log(smf, "start")[0]["config"]["smf_background_dataset"] == "first"  # the checkpoint's corpus
    prompt = new_text.split(" ")[0]  # whole pieces: a cut word could be a piece the vocabulary lacks
    sample = run("sample.py", f"--out_dir={smf}", f"--start={prompt}", "--max_new_tokens=20", "--num_samples=1")
    assert sample.returncode == 0 and sample.stdout.startswith(prompt), sample.stderr

    before = files(data, base, smf)
    with pytest.raises(SystemExit) as refused:
        prepare("--input", texts["third"], "--name=third", "--vocab_from=first", f"--data_dir={data}")
    message = str(refused.value)
    assert message.startswith(f"error: the {tokenizer} vocabulary of first has no id for") and "\n" not in message
    assert (f"'§' ({texts['third']} line 6)" if tokenizer == "char" else f"({texts['third']} line 5)") in message
    assert files(data, base, smf) == before and not (data / "third").exists()


def test_a_runs_checkpoint_gives_its_vocabulary_when_the_dataset_is_gone(texts, tmp_path):
    """--vocab_from=OUT_DIR: new text, and the pretraining text again as smf's background (the same files
    as before); a background or a dataset in another vocabulary is refused, saying how to prepare it."""
    data, base = tmp_path / "data", tmp_path / "base"
    prepare("--input", texts["first"], "--name=first", "--tokenizer=char", f"--data_dir={data}")
    written = files(data / "first")
    train(config_for(str(data), base, dataset="first", max_iters=2, **SMF))
    shutil.rmtree(data / "first")
    prepare("--input", texts["second"], "--name=second", f"--vocab_from={base}", f"--data_dir={data}")
    prepare("--input", texts["first"], "--name=first", f"--vocab_from={base}", f"--data_dir={data}")
    assert {p: h for p, h in files(data / "first").items() if p.endswith(".bin")} == \
           {p: h for p, h in written.items() if p.endswith(".bin")}
    smf = dict(dataset="second", max_iters=1, init_from=str(base), finetune="smf", smf_background_batches=2, **SMF)
    train(config_for(str(data), tmp_path / "smf", **smf))

    prepare("--input", texts["first"], texts["third"], "--name=other", "--tokenizer=char", f"--data_dir={data}")
    with pytest.raises(ConfigError, match=f"smf_background_dataset 'other' has another vocabulary than the checkpoint "
                                          f"of {base}: .* --name other --vocab_from={base}`"):
        train(config_for(str(data), tmp_path / "smf2", smf_background_dataset="other", **smf))
    with pytest.raises(ConfigError, match=f"prepare the new data in its vocabulary with .* --vocab_from={base}`"):
        train(config_for(str(data), tmp_path / "smf3", **{**smf, "dataset": "other"}))  # says how to get it


@pytest.mark.parametrize("args, words", [
    (["--vocab_from=nothere"], "--vocab_from=nothere is neither a dataset in --data_dir="),
    (["--vocab_from=first", "--tokenizer=char"], "argument --tokenizer: not allowed with argument --vocab_from"),
])
def test_a_vocabulary_that_cannot_be_had_is_one_line_and_writes_nothing(texts, tmp_path, args, words):
    data = tmp_path / "data"
    prepare("--input", texts["first"], "--name=first", "--tokenizer=char", f"--data_dir={data}")
    before = files(data)
    with pytest.raises(SystemExit) as refused:
        prepare("--input", texts["second"], "--name=second", f"--data_dir={data}", *args)
    assert str(refused.value).startswith("error: ") and words in str(refused.value) and "\n" not in str(refused.value)
    assert files(data) == before
