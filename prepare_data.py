"""Tokenise a corpus into data/<name>/train.bin, val.bin (uint16) and meta.json.

    python prepare_data.py shakespeare [--input PATH] [--tokenizer compact|gpt2|char]
    python prepare_data.py text --input FILE [FILE ...] --name NAME [--tokenizer ...]
    python prepare_data.py facts [--n_entities N] [--seed S] [--attributes A,B,...] [--tokenizer ...]

"facts" is the synthetic knowledge base of facts.py: it also writes data/facts/eval.json, the question
and answer pairs that train.py scores at each eval.

Tokenizers: "gpt2" (tiktoken's GPT-2 BPE, 50257 ids), "compact" (GPT-2 BPE restricted to the ids the
corpus uses, renumbered 0..V-1: a small CPU model is otherwise dominated by a 50257-row output layer)
and "char" (one id per character). meta.json holds what is needed to decode, so sample.py needs only it.
"""
import argparse
import json
import os
import sys
import urllib.request

import numpy as np

import facts

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TOKENIZERS = ("compact", "gpt2", "char")


def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its BPE files on first use
        raise RuntimeError("cannot load the GPT-2 tokenizer: tiktoken downloads it once from the internet, "
                           f"or set TIKTOKEN_CACHE_DIR to a folder that holds its files ({type(e).__name__}: {e})")


class Tokenizer:
    """Encode/decode for the three tokenizers, rebuilt from meta.json."""

    def __init__(self, meta):
        self.kind = meta["tokenizer"]
        self.vocab_size = meta["vocab_size"]
        if self.kind == "char":
            self.chars = meta["chars"]
            self.char_to_id = {c: i for i, c in enumerate(self.chars)}
        else:
            self.bpe = gpt2_encoding()
            self.compact_ids = meta.get("compact_ids")
            if self.kind == "compact":
                self.gpt2_to_id = {g: i for i, g in enumerate(self.compact_ids)}

    def encode(self, text):
        if self.kind == "char":
            missing = sorted(set(text) - self.char_to_id.keys())
            if missing:
                raise ValueError(f"characters {missing!r} are not in this dataset's vocabulary")
            return [self.char_to_id[c] for c in text]
        ids = self.bpe.encode_ordinary(text)
        if self.kind == "gpt2":
            return ids
        missing = [self.bpe.decode([g]) for g in ids if g not in self.gpt2_to_id]
        if missing:
            raise ValueError(f"tokens {missing[:5]!r} never occur in this dataset, so its compact vocabulary "
                             "cannot encode them")
        return [self.gpt2_to_id[g] for g in ids]

    def decode(self, ids):
        if self.kind == "char":
            return "".join(self.chars[i] for i in ids)
        if self.kind == "compact":
            ids = [self.compact_ids[i] for i in ids]
        return self.bpe.decode(ids)


def tokenize(text, kind):
    """(token ids as uint16, meta fields) for a whole corpus."""
    if kind == "char":
        chars = sorted(set(text))
        lookup = {c: i for i, c in enumerate(chars)}
        return np.array([lookup[c] for c in text], dtype=np.uint16), {"vocab_size": len(chars), "chars": chars}
    ids = np.array(gpt2_encoding().encode_ordinary(text), dtype=np.uint16)
    if kind == "gpt2":
        return ids, {"vocab_size": 50257}
    used, remapped = np.unique(ids, return_inverse=True)
    return remapped.astype(np.uint16), {"vocab_size": len(used), "compact_ids": used.tolist()}


def write_dataset(text, name, kind, data_dir="data", source=None, val_fraction=0.1, val_text=None):
    """Tokenise text, split the tokens 90/10 into train/val, write the bins and meta.json; returns meta.

    With val_text, text is all train and val_text all val, in one vocabulary (text should end where a
    token ends, e.g. with a newline before a letter, for the split to fall exactly between them).
    """
    ids, fields = tokenize(text + (val_text or ""), kind)
    if len(ids) < 2:
        raise ValueError(f"the corpus for '{name}' holds {len(ids)} tokens: nothing to train on")
    split = int(len(ids) * (1 - val_fraction)) if val_text is None else len(tokenize(text, kind)[0])
    out = os.path.join(data_dir, name)
    os.makedirs(out, exist_ok=True)
    ids[:split].tofile(os.path.join(out, "train.bin"))
    ids[split:].tofile(os.path.join(out, "val.bin"))
    meta = {"name": name, "tokenizer": kind, **fields, "train_tokens": split, "val_tokens": len(ids) - split,
            "source": source}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta


def read_text(paths):
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except OSError as e:
            raise ValueError(f"cannot read input file {path}: {e.strerror}")
        except UnicodeDecodeError:
            raise ValueError(f"input file {path} is not UTF-8 text")
    return "\n".join(texts)


def shakespeare_text(input_path, data_dir):
    """The tinyshakespeare corpus: from --input, else downloaded once (as nanoGPT does) into data_dir."""
    if input_path:
        return read_text([input_path]), input_path
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="corpus", required=True)
    for corpus in ("shakespeare", "text", "facts"):
        p = sub.add_parser(corpus)
        p.add_argument("--tokenizer", choices=TOKENIZERS, default="compact")
        p.add_argument("--data_dir", default="data", help="datasets are written to DATA_DIR/NAME")
        if corpus == "shakespeare":
            p.add_argument("--input", help="local tinyshakespeare file (default: download it)")
            p.add_argument("--name", help="dataset name (default: shakespeare, or shakespeare_<tokenizer> "
                                          "for the gpt2 and char tokenizers)")
        elif corpus == "text":
            p.add_argument("--input", nargs="+", required=True, help="UTF-8 text files, concatenated")
            p.add_argument("--name", required=True)
        else:
            p.add_argument("--name", default="facts")
            p.add_argument("--n_entities", type=int, default=facts.DEFAULT_ENTITIES, help="people in the knowledge base")
            p.add_argument("--attributes", default=",".join(facts.ATTRIBUTES), help="comma-separated; everyone has all")
            p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.corpus == "facts":
            name = args.name
            meta = facts.write_dataset(args.n_entities, args.seed, args.attributes.split(","), args.tokenizer,
                                       name, args.data_dir)
        else:
            if args.corpus == "shakespeare":
                text, source = shakespeare_text(args.input, args.data_dir)
                name = args.name or ("shakespeare" if args.tokenizer == "compact" else f"shakespeare_{args.tokenizer}")
            else:
                text, source, name = read_text(args.input), " ".join(args.input), args.name
            meta = write_dataset(text, name, args.tokenizer, args.data_dir, source)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {os.path.join(args.data_dir, name)}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} "
          f"val tokens, {meta['tokenizer']} vocabulary of {meta['vocab_size']:,}")


if __name__ == "__main__":
    main()
