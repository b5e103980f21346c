"""Reading datasets: tokenizers rebuilt from meta.json, token files (one per split or in shards), batches.

prepare_data.py writes what this module reads: DATA_DIR/NAME/train.bin and val.bin (uint16 ids, or
numbered shards train_000000.bin, ...) and meta.json, which holds what is needed to decode.
"""
import glob
import json
import os

import numpy as np
import torch

from errors import DataError

TOKENIZERS = ("compact", "gpt2", "char")
VOCABULARY = ("tokenizer", "vocab_size", "chars", "compact_ids")  # the meta.json fields that fix the ids
MAX_VOCAB = 2**16  # ids are stored as uint16


def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its BPE files on first use
        raise DataError("cannot load the GPT-2 tokenizer: tiktoken downloads it once from the internet, "
                        f"or set TIKTOKEN_CACHE_DIR to a folder that holds its files ({type(e).__name__}: {e})")


class UnknownPieces(ValueError):
    """Text a vocabulary cannot encode; pieces: (offset in the text, piece) of each piece it has no id for."""

    def __init__(self, kind, pieces):
        self.kind, self.pieces = kind, pieces
        shown = list(dict.fromkeys(piece for _, piece in pieces))[:5]
        super().__init__(f"{'characters' if kind == 'char' else 'BPE pieces'} {shown!r} have no id in this {kind} "
                         "vocabulary: the text it was made from never holds them")


class Tokenizer:
    """Encode/decode for the three tokenizers (char, gpt2, compact), rebuilt from meta.json."""

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
        """The ids of text, or UnknownPieces: a char or compact vocabulary lacks what its text never held."""
        try:
            if self.kind == "char":
                return [self.char_to_id[c] for c in text]
            ids = self.bpe.encode_ordinary(text)
            return ids if self.kind == "gpt2" else [self.gpt2_to_id[g] for g in ids]
        except KeyError:
            raise UnknownPieces(self.kind, self.unknown(text)) from None

    def unknown(self, text):
        """(offset in text, piece) of each character (char) or GPT-2 BPE piece (compact) without an id, in order."""
        if self.kind == "char":
            return [(i, c) for i, c in enumerate(text) if c not in self.char_to_id]
        if self.kind == "gpt2":
            return []
        ids = self.bpe.encode_ordinary(text)
        offsets = self.bpe.decode_with_offsets(ids)[1]
        return [(offset, self.bpe.decode([g])) for g, offset in zip(ids, offsets) if g not in self.gpt2_to_id]

    def decode(self, ids):
        if self.kind == "char":
            return "".join(self.chars[i] for i in ids)
        if self.kind == "compact":
            ids = [self.compact_ids[i] for i in ids]
        return self.bpe.decode(ids)


DATASET_NAME = "a plain folder name such as 'shakespeare_char' (no '/', not '.' or '..', not empty)"


def is_dataset_name(name):
    """A dataset is a folder directly under data_dir, so its name is a plain one: never a path that leads
    out of data_dir ('../x', 'a/b') or to data_dir itself ('', '.'). prepare_data.py and train.py both
    check names with this."""
    return name.strip() != "" and name not in (".", "..") and not any(c in name for c in "/\\\0")


def prepare_command(dataset):
    """The prepare_data.py command that makes a dataset of this name (shakespeare_char, facts, ...)."""
    corpus, _, tokenizer = dataset.partition("_")
    if corpus == "shakespeare" and tokenizer in ("", *TOKENIZERS):
        return f"`python prepare_data.py shakespeare --tokenizer {tokenizer or 'compact'}`"
    if dataset in ("facts", "fineweb_edu"):
        return f"`python prepare_data.py {dataset}{' --num_tokens N' if dataset == 'fineweb_edu' else ''}`"
    return f"`python prepare_data.py text --input FILE --name {dataset}`"


def vocabulary(meta):
    """The fields of meta (a dataset's or a checkpoint's) that fix what each id means."""
    return {k: meta[k] for k in VOCABULARY if k in meta}


def meta_problem(meta):
    """What keeps meta (a meta.json's object) from describing a tokenizer, or None."""
    if not isinstance(meta, dict):
        return f"holds a JSON {type(meta).__name__}, not an object"
    vocab_size, kind = meta.get("vocab_size"), meta.get("tokenizer")
    if type(vocab_size) is not int or not 0 < vocab_size <= MAX_VOCAB:
        return f"has vocab_size={vocab_size!r}, not a whole number in 1..{MAX_VOCAB}"
    if kind not in TOKENIZERS:
        return f"has tokenizer={kind!r}, not one of {', '.join(TOKENIZERS)}"
    table, item = {"char": ("chars", str), "compact": ("compact_ids", int)}.get(kind, (None, None))
    values = meta.get(table)
    if table and not (isinstance(values, list) and len(values) >= vocab_size and
                      all(type(v) is item for v in values)):
        return f"has no list {table} of {vocab_size} {item.__name__}s (one per id), which a {kind} tokenizer needs"
    return None


def same_vocabulary(meta, other):
    """Whether two meta.json objects (a dataset's, a checkpoint's) describe one vocabulary."""
    return all(meta.get(k) == other.get(k) for k in VOCABULARY)


def read_json(path, problem_of):
    """(the JSON at path, what is wrong with it: problem_of(it), or that it does not parse; None when fine)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, f"is not readable JSON ({type(e).__name__}: {e})"
    return data, problem_of(data)


def read_meta(path, dataset):
    """The tokenizer description at path (a dataset's meta.json), or a DataError naming the file."""
    meta, problem = read_json(path, meta_problem)
    if problem:
        raise DataError(f"{path} {problem}: make the dataset again with {prepare_command(dataset)}")
    return meta


class Tokens:
    """A split's uint16 token ids, stored in one file or in numbered shards, read as one sequence."""

    def __init__(self, paths, dataset):
        self.name = paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more shards)"
        for path in paths:  # a copy cut short would be read shifted by a byte, or not mapped at all
            size = os.path.getsize(path)
            if size == 0 or size % 2:
                raise DataError(f"{path} holds {size} bytes, not a whole number of uint16 token ids (at least one): "
                                f"make the dataset again with {prepare_command(dataset)}")
        self.shards = [np.memmap(path, dtype=np.uint16, mode="r") for path in paths]
        self.starts = np.cumsum([0] + [len(shard) for shard in self.shards])  # of each shard, then the end

    def __len__(self):
        return int(self.starts[-1])

    def read(self, start, length):
        """The ids at start..start+length-1, across shard boundaries."""
        parts, shard = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            part = self.shards[shard][start - self.starts[shard]:start - self.starts[shard] + length]
            parts.append(part)
            start, length, shard = start + len(part), length - len(part), shard + 1
        return np.concatenate(parts)


def load_dataset(data_dir, dataset, block_size):
    """train/val tokens (split.bin, or shards split_000000.bin, ...) and meta.json of data_dir/dataset,
    checked alike on every rank before any collective: one-line DataErrors naming the file."""
    folder = os.path.join(data_dir, dataset)
    files = {s: [os.path.join(folder, f"{s}.bin")] if os.path.exists(os.path.join(folder, f"{s}.bin"))
             else sorted(glob.glob(os.path.join(folder, f"{s}_*.bin"))) for s in ("train", "val")}
    missing = [f"{s}.bin" for s, paths in files.items() if not paths]
    if not os.path.exists(os.path.join(folder, "meta.json")):
        missing.append("meta.json")
    if missing:
        raise DataError(f"dataset '{dataset}' not found ({folder} lacks {', '.join(missing)}): make it "
                        f"with {prepare_command(dataset)}")
    meta = read_meta(os.path.join(folder, "meta.json"), dataset)
    splits = {s: Tokens(paths, dataset) for s, paths in files.items()}
    for split, data in splits.items():
        if len(data) <= block_size:
            raise DataError(f"block_size={block_size} needs more than {len(data)} tokens, "
                            f"the size of {data.name}: lower block_size")
        largest = max(int(shard.max()) for shard in data.shards)  # read once here, not checked per batch
        if largest >= meta["vocab_size"]:  # a wrong or stale meta.json would otherwise fail deep in the embedding
            raise DataError(f"{data.name} holds token id {largest}, beyond the vocabulary of {meta['vocab_size']} "
                            f"in its meta.json: make the dataset again with {prepare_command(dataset)}")
    return splits, meta


def get_batch(data, batch_size, block_size, generator, device, rank=0, world=1):
    """batch_size random windows of data: inputs and next-token targets, (batch_size, block_size) int64.

    With world ranks the generator draws world*batch_size windows and rank takes its batch_size of them,
    so the ranks together see exactly the batch that one process with world*batch_size would.
    """
    starts = torch.randint(len(data) - block_size, (world * batch_size,), generator=generator)
    starts = starts[rank * batch_size:(rank + 1) * batch_size].tolist()
    windows = torch.from_numpy(np.stack([data.read(s, block_size + 1) for s in starts]).astype(np.int64))
    windows = windows.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else windows.to(device)
    return windows[:, :-1], windows[:, 1:]


def batch_generator(seed, step):
    """The batches of a step depend only on (seed, step): runs resume on the same data order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)
