"""Tokenise a corpus into data/<name>/train.bin, val.bin (uint16) and meta.json.

    python prepare_data.py shakespeare [--input PATH] [--tokenizer compact|gpt2|char]
    python prepare_data.py text --input FILE [FILE ...] --name NAME [--tokenizer ... | --vocab_from DATASET_OR_OUT_DIR]
    python prepare_data.py fineweb_edu --num_tokens N [--input JSONL ...] [--shard_tokens S] [--val_tokens V]
    python prepare_data.py facts [--n_entities N] [--new_entities M] [--seed S] [--attributes A,B,...] [--tokenizer ...]

fineweb_edu streams HuggingFaceFW/fineweb-edu from the Hugging Face hub (`pip install datasets`, needed
for that alone), or reads local jsonl files with the same "text" field, and writes GPT-2 ids in numbered
shards, val_000000.bin, ..., then train_000000.bin, ..., so that no file has to hold the whole corpus.
"facts" is the synthetic knowledge base of facts.py: it also writes data/facts/eval.json, the question
and answer pairs that train.py scores at each eval.

Tokenizers: "gpt2" (tiktoken's GPT-2 BPE, 50257 ids), "compact" (GPT-2 BPE restricted to the ids the
corpus uses, renumbered 0..V-1: a small CPU model is otherwise dominated by a 50257-row output layer)
and "char" (one id per character). meta.json holds what is needed to decode, so sample.py needs only it.

NAME is a plain folder name under DATA_DIR; a dataset that exists there is replaced only with --overwrite.
"text --vocab_from" encodes new text in the vocabulary of an existing dataset or of a run's checkpoint,
so that the run can be finetuned on it; text that vocabulary has no ids for is refused.
"""
import argparse
import glob
import itertools
import json
import os
import shutil
import sys
import urllib.request
from contextlib import contextmanager

import numpy as np
import torch

import facts
from checkpoint import load_latest, previous_path
from data import (DATASET_NAME, TOKENIZERS, Tokenizer, UnknownPieces, gpt2_encoding, is_dataset_name, meta_problem,
                  read_meta, same_vocabulary, vocabulary)
from errors import DataError, OneLineErrors, UserError

SHIPPED_SHAKESPEARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora", "tinyshakespeare.txt")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
OVERWRITE_HELP = "replace DATA_DIR/NAME if it holds a dataset (checkpoints under out/ trained on it are named)"


def tokenize(text, kind, vocab_text="", vocab=None):
    """(token ids as uint16, meta fields) for a whole corpus. The char and compact vocabularies also cover
    vocab_text: datasets written with the same vocab_text share one vocabulary (a model trained on one
    can be finetuned on the other). With vocab (data.vocabulary of a meta), text is encoded in that one,
    or refused (data.UnknownPieces)."""
    if vocab:
        return np.array(Tokenizer(vocab).encode(text), dtype=np.uint16), vocab
    if kind == "char":
        chars = sorted(set(text) | set(vocab_text))
        lookup = {c: i for i, c in enumerate(chars)}
        return np.array([lookup[c] for c in text], dtype=np.uint16), {"vocab_size": len(chars), "chars": chars}
    encoding = gpt2_encoding()
    ids = np.array(encoding.encode_ordinary(text), dtype=np.uint16)
    if kind == "gpt2":
        return ids, {"vocab_size": 50257}
    used = np.unique(np.concatenate([ids, np.array(encoding.encode_ordinary(vocab_text), dtype=np.uint16)]))
    return np.searchsorted(used, ids).astype(np.uint16), {"vocab_size": len(used), "compact_ids": used.tolist()}


def dataset_files(folder):
    """The files of the dataset in folder, meta.json first (written last, it marks a finished dataset)."""
    names = ["meta.json", facts.EVAL_FILE] + sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.bin")))
    return [os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))]


def trained_on(folder, root="out"):
    """{path: meta} of the checkpoints under root (where train.py's configs write) that trained on the dataset
    in folder: the ones prepare_data.py knows of, whose vocabulary a new dataset in folder may not match."""
    found = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "ckpt.pt"), recursive=True)):
        try:  # mapped, not read: only the small config and meta are touched
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            config = checkpoint["config"]
            if os.path.abspath(os.path.join(config["data_dir"], config["dataset"])) == os.path.abspath(folder):
                found[path] = checkpoint["meta"]
        except Exception:  # damaged, or not a checkpoint of train.py: not one of the dataset's
            continue
    return found


def check_target(data_dir, name, overwrite):
    """Before anything is read or written: name must be a plain one (data.is_dataset_name), and an existing
    dataset is replaced only with --overwrite (the checkpoints trained on it are named)."""
    if not is_dataset_name(name):
        raise ValueError(f"--name={name!r} must be {DATASET_NAME}")
    folder = os.path.join(data_dir, name)
    if dataset_files(folder) and not overwrite:
        trained = trained_on(folder)
        users = (f"; {', '.join(trained)} trained on it and would no longer match another vocabulary"
                 if trained else "")
        raise ValueError(f"dataset {folder} exists{users}: choose another --name, or replace it with --overwrite")


@contextmanager
def staged(data_dir, name):
    """A new folder to write dataset data_dir/name into. Once the writing is done its files replace the
    old dataset's (stale shards too; other files in data_dir/name stay); if the writing fails, from bad
    input or a full disk, it is removed and the old dataset stays whole."""
    folder, staging = os.path.join(data_dir, name), os.path.join(data_dir, f".{name}.{os.getpid()}.tmp")
    os.makedirs(staging, exist_ok=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.makedirs(folder, exist_ok=True)
    for old in dataset_files(folder):
        os.remove(old)
    for new in reversed(dataset_files(staging)):
        os.replace(new, os.path.join(folder, os.path.basename(new)))
    os.rmdir(staging)


def write_meta(folder, meta):
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)


def write_dataset(text, name, kind, data_dir="data", source=None, val_fraction=0.1, val_text=None, extra=None,
                  vocab_text="", vocab=None):
    """Tokenise text, split the tokens 90/10 into train/val, write the bins and meta.json; returns meta.

    With val_text, text is all train and val_text all val, in one vocabulary (text should end where a
    token ends, e.g. with a newline before a letter, for the split to fall exactly between them).
    extra(folder, meta) writes more files of the dataset, which replace the old ones with the rest.
    vocab_text: more text the vocabulary must cover; vocab: an existing vocabulary to encode in (tokenize).
    """
    ids, fields = tokenize(text + (val_text or ""), kind, vocab_text, vocab)
    if len(ids) < 2:
        raise ValueError(f"the corpus for '{name}' holds {len(ids)} tokens: nothing to train on")
    split = int(len(ids) * (1 - val_fraction)) if val_text is None else len(tokenize(text, kind, vocab_text, vocab)[0])
    meta = {"name": name, "tokenizer": kind, **fields, "train_tokens": split, "val_tokens": len(ids) - split,
            "source": source}
    with staged(data_dir, name) as out:
        ids[:split].tofile(os.path.join(out, "train.bin"))
        ids[split:].tofile(os.path.join(out, "val.bin"))
        if extra:
            extra(out, meta)
        write_meta(out, meta)
    return meta


def write_facts(n_entities, seed, attributes, kind, name="facts", data_dir="data", new_entities=0):
    """data_dir/name: the knowledge base of facts.py as bins and meta.json (write_dataset), and its eval.json;
    returns meta. With new_entities, also data_dir/name_new: a second knowledge base of that many other
    people (no name of the first), in the same vocabulary, to finetune a model of the first on."""
    kbs = {name: facts.make_facts(n_entities, seed, tuple(attributes))}
    if new_entities:
        kbs[f"{name}_new"] = facts.make_facts(new_entities, seed + 1, tuple(attributes),
                                              exclude={person for person, _ in kbs[name]})
    texts = {n: facts.knowledge_text(kb, seed) for n, kb in kbs.items()}
    vocab_text = "".join(train + val for train, val in texts.values()) if new_entities else ""
    metas = []
    for n, kb in kbs.items():
        def write_eval(folder, meta, kb=kb):
            facts.write_eval(kb, seed, Tokenizer(meta), os.path.join(folder, facts.EVAL_FILE))
        source = f"facts.py: {len(kb)} entities, attributes {','.join(attributes)}, seed {seed}"
        if n != name:
            source += f", none of them in '{name}'"
        train, val = texts[n]
        metas.append(write_dataset(train, n, kind, data_dir, source, val_text=val, extra=write_eval,
                                   vocab_text=vocab_text))
    return metas[0]


def read_texts(paths):
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except OSError as e:
            raise ValueError(f"cannot read input file {path}: {e.strerror}")
        except UnicodeDecodeError:
            raise ValueError(f"input file {path} is not UTF-8 text")
    return texts


def read_text(paths):
    return "\n".join(read_texts(paths))


def vocabulary_of(source, data_dir):
    """The vocabulary (data.vocabulary) of a dataset, named in data_dir or by its folder, or of the
    checkpoint in a run's out_dir (which keeps it even when the dataset is gone)."""
    for folder in dict.fromkeys([os.path.join(data_dir, source), source]):
        ckpt = os.path.join(folder, "ckpt.pt")
        if os.path.exists(os.path.join(folder, "meta.json")):
            return vocabulary(read_meta(os.path.join(folder, "meta.json"), os.path.basename(folder)))
        if os.path.exists(ckpt) or os.path.exists(previous_path(ckpt)):
            checkpoint, path = load_latest(ckpt, keys=("meta",))
            problem = meta_problem(checkpoint["meta"])
            if problem:
                raise DataError(f"the meta of {path} {problem}: name its dataset in --vocab_from instead")
            return vocabulary(checkpoint["meta"])
    raise DataError(f"--vocab_from={source} is neither a dataset in --data_dir={data_dir} nor a folder with a "
                    "meta.json or a ckpt.pt: name the dataset, or the out_dir of the run, whose vocabulary to use")


def where(offset, paths, texts):
    """'FILE line N' of a character offset into the texts joined by newlines (read_text)."""
    for path, text in zip(paths, texts):
        if offset <= len(text):
            return f"{path} line {text.count(chr(10), 0, offset) + 1}"
        offset -= len(text) + 1


def write_text(paths, name, kind, data_dir, vocab_from=None):
    """data_dir/name from the text files at paths, in a new vocabulary of kind or in that of vocab_from
    (vocabulary_of). Text that vocabulary cannot encode is refused, naming the first few pieces and where
    they are, before anything is written."""
    texts, source = read_texts(paths), " ".join(paths)
    if not vocab_from:
        return write_dataset("\n".join(texts), name, kind, data_dir, source)
    vocab = vocabulary_of(vocab_from, data_dir)
    try:
        return write_dataset("\n".join(texts), name, vocab["tokenizer"], data_dir,
                             f"{source} (the vocabulary of {vocab_from})", vocab=vocab)
    except UnknownPieces as e:
        first = {}
        for offset, piece in e.pieces:
            first.setdefault(piece, offset)
        shown = ", ".join(f"{piece!r} ({where(offset, paths, texts)})" for piece, offset in list(first.items())[:5])
        more = f" and {len(first) - 5:,} more" if len(first) > 5 else ""
        pieces = ("character" if e.kind == "char" else "BPE piece") + ("s" if len(first) > 1 else "")
        gpt2 = "" if e.kind == "char" else " (or with --tokenizer=gpt2, which encodes any text)"
        raise DataError(f"the {e.kind} vocabulary of {vocab_from} has no id for {len(first):,} {pieces} of the input, "
                        f"which its training text never held: {shown}{more}; write them with characters and words "
                        f"that text holds, or pretrain on a dataset whose text holds them too{gpt2}") from None


def shakespeare_text(input_path, data_dir):
    """The tinyshakespeare corpus: from --input, else the repository's copy (corpora/), else downloaded once
    (as nanoGPT does) into data_dir."""
    if input_path:
        return read_text([input_path]), input_path
    if os.path.exists(SHIPPED_SHAKESPEARE):
        return read_text([SHIPPED_SHAKESPEARE]), "corpora/tinyshakespeare.txt"
    cached = os.path.join(data_dir, "tinyshakespeare.txt")
    if not os.path.exists(cached):
        print(f"downloading {SHAKESPEARE_URL}")
        try:
            os.makedirs(data_dir, exist_ok=True)
            urllib.request.urlretrieve(SHAKESPEARE_URL, cached + ".part")
            os.replace(cached + ".part", cached)
        except OSError as e:
            raise ValueError(f"cannot download tinyshakespeare ({e}); pass a local copy with --input PATH")
    return read_text([cached]), SHAKESPEARE_URL


def fineweb_documents(inputs, subset):
    """The texts of fineweb-edu: from local jsonl files (one {"text": ...} per line), else streamed."""
    if not inputs:
        try:
            import datasets  # optional: only this corpus needs it
        except ImportError:
            raise ValueError("streaming fineweb_edu needs the Hugging Face `datasets` package: pip install datasets "
                             "(or pass local jsonl files with --input)")
        try:
            yield from (row["text"] for row in datasets.load_dataset(FINEWEB_EDU, name=subset, split="train",
                                                                     streaming=True))
        except OSError as e:  # the hub unreachable, also midway
            raise ValueError(f"cannot stream {FINEWEB_EDU} from the Hugging Face hub ({type(e).__name__}: {e}); "
                             "pass local jsonl files with --input")
        return
    for path in inputs:
        try:
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        yield text_of(line, f"{path} line {number}")
        except OSError as e:
            raise ValueError(f"cannot read input file {path}: {e.strerror}")


def text_of(line, where):
    """The 'text' of one jsonl line, or a ValueError that says where the line is."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{where} is not a JSON object with a 'text' string")
    return record["text"]


def gpt2_ids(documents, encoding, batch=256):
    """Each document's GPT-2 ids led by <|endoftext|> (the separator GPT-2 trained with), as uint16;
    tiktoken encodes a batch of documents on all cores."""
    documents = iter(documents)
    while texts := list(itertools.islice(documents, batch)):
        for ids in encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count()):
            yield np.array([encoding.eot_token, *ids], dtype=np.uint16)


class ShardWriter:
    """Writes a split's ids to numbered files of shard_tokens ids each: split_000000.bin, split_000001.bin, ..."""

    def __init__(self, folder, split, shard_tokens):
        self.folder, self.split = folder, split
        self.buffer, self.filled = np.empty(shard_tokens, dtype=np.uint16), 0
        self.shards = self.written = 0

    def write(self, ids):
        while len(ids):
            take = min(len(ids), len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + take] = ids[:take]
            self.filled, ids = self.filled + take, ids[take:]
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self):
        if self.filled:
            self.buffer[:self.filled].tofile(os.path.join(self.folder, f"{self.split}_{self.shards:06d}.bin"))
            self.shards, self.written, self.filled = self.shards + 1, self.written + self.filled, 0


def write_shards(documents, name, data_dir, num_tokens, val_tokens, shard_tokens, source):
    """Tokenise documents until num_tokens ids: the first val_tokens go to the val shards, the rest to the
    train shards (replacing the dataset data_dir/name held once all are written); writes meta.json and
    returns it."""
    encoding = gpt2_encoding()
    with staged(data_dir, name) as folder:
        val, train = (ShardWriter(folder, split, shard_tokens) for split in ("val", "train"))
        written = 0
        for ids in gpt2_ids(documents, encoding):
            ids = ids[:num_tokens - written]
            to_val = max(0, min(len(ids), val_tokens - written))
            val.write(ids[:to_val])
            train.write(ids[to_val:])
            written += len(ids)
            if written == num_tokens:
                break
        val.flush()
        train.flush()
        if not train.written:
            raise ValueError(f"the corpus ran out after {written:,} tokens, all of them validation tokens "
                             f"(--val_tokens={val_tokens:,}): nothing to train on")
        meta = {"name": name, "tokenizer": "gpt2", "vocab_size": encoding.n_vocab, "train_tokens": train.written,
                "val_tokens": val.written, "shard_tokens": shard_tokens, "source": source}
        write_meta(folder, meta)
    return meta


def count(text):
    """A token count for the command line: 1000000 or 1e6."""
    value = float(text)
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(value)


def main(argv=None):
    parser = OneLineErrors(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="corpus", required=True)
    for corpus in ("shakespeare", "text", "facts"):
        p = sub.add_parser(corpus)
        tokens = p.add_mutually_exclusive_group() if corpus == "text" else p
        tokens.add_argument("--tokenizer", choices=TOKENIZERS, default="compact")
        p.add_argument("--data_dir", default="data", help="datasets are written to DATA_DIR/NAME")
        p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
        if corpus == "shakespeare":
            p.add_argument("--input", help="another copy of the corpus (default: corpora/tinyshakespeare.txt)")
            p.add_argument("--name", help="dataset name (default: shakespeare, or shakespeare_<tokenizer> "
                                          "for the gpt2 and char tokenizers)")
        elif corpus == "text":
            p.add_argument("--input", nargs="+", required=True, help="UTF-8 text files, concatenated")
            p.add_argument("--name", required=True)
            tokens.add_argument("--vocab_from", metavar="DATASET_OR_OUT_DIR", help="encode in the vocabulary of this "
                                "dataset (a name in DATA_DIR, or a folder) or of the checkpoint in this run's out_dir, "
                                "so that the run can be finetuned on the new dataset")
        else:
            p.add_argument("--name", default="facts")
            p.add_argument("--n_entities", type=int, default=facts.DEFAULT_ENTITIES, help="people in the knowledge base")
            p.add_argument("--attributes", default=",".join(facts.ATTRIBUTES), help="comma-separated; everyone has all")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--new_entities", type=int, default=0, help="also NAME_new: that many other people in "
                           "the same vocabulary, new facts to finetune on")
    p = sub.add_parser("fineweb_edu")
    p.add_argument("--num_tokens", type=count, required=True, help="tokens to write, validation included (1e9 works)")
    p.add_argument("--val_tokens", type=count, help="the first ones, for validation (default: a tenth, at most 10M)")
    p.add_argument("--shard_tokens", type=count, default=100_000_000, help="tokens per shard file (default: 1e8)")
    p.add_argument("--subset", default="sample-10BT", help="fineweb-edu configuration to stream (default: sample-10BT)")
    p.add_argument("--input", nargs="+", help="local jsonl files with a 'text' field instead of the hub")
    p.add_argument("--name", default="fineweb_edu")
    p.add_argument("--data_dir", default="data", help="datasets are written to DATA_DIR/NAME")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = parser.parse_args(argv)
    name = args.name if args.name is not None else (  # only shakespeare's has no default
        "shakespeare" if args.tokenizer == "compact" else f"shakespeare_{args.tokenizer}")
    try:
        for target in [name] + [f"{name}_new"] * (getattr(args, "new_entities", 0) > 0):
            check_target(args.data_dir, target, args.overwrite)
        if args.corpus == "fineweb_edu":
            val_tokens = min(args.num_tokens // 10, 10_000_000) if args.val_tokens is None else args.val_tokens
            if val_tokens >= args.num_tokens:
                raise ValueError(f"--val_tokens={val_tokens:,} leaves nothing of --num_tokens={args.num_tokens:,} "
                                 "to train on")
            source = " ".join(args.input) if args.input else f"{FINEWEB_EDU} ({args.subset})"
            meta = write_shards(fineweb_documents(args.input, args.subset), name, args.data_dir, args.num_tokens,
                                val_tokens, args.shard_tokens, source)
        elif args.corpus == "facts":
            if args.new_entities < 0:
                raise ValueError(f"--new_entities={args.new_entities} must be 0 (none) or more")
            meta = write_facts(args.n_entities, args.seed, args.attributes.split(","), args.tokenizer, name,
                               args.data_dir, args.new_entities)
        elif args.corpus == "shakespeare":
            text, source = shakespeare_text(args.input, args.data_dir)
            meta = write_dataset(text, name, args.tokenizer, args.data_dir, source)
        else:
            meta = write_text(args.input, name, args.tokenizer, args.data_dir, args.vocab_from)
    except (ValueError, UserError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # reading errors are ValueErrors above: this is writing the dataset
        sys.exit(f"error: cannot write the dataset into --data_dir={args.data_dir} ({e.strerror}: {e.filename}): "
                 "free disk space or choose another --data_dir")
    print(f"wrote {os.path.join(args.data_dir, name)}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} "
          f"val tokens, {meta['tokenizer']} vocabulary of {meta['vocab_size']:,}")
    folder = os.path.join(args.data_dir, name)
    stale = [path for path, old in trained_on(folder).items() if not same_vocabulary(old, meta)] if args.overwrite \
        else []
    if stale:
        print(f"warning: the vocabulary of {folder} changed; checkpoints trained on the old one cannot resume or "
              f"finetune on it: {', '.join(stale)}", file=sys.stderr)


if __name__ == "__main__":
    main()
