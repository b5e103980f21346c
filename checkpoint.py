"""Checkpoints that survive crashes: atomic writes, the previous one kept, corruption detected on load.

A checkpoint is a plain dict of tensors and Python values saved with torch.save; it loads with
torch.load(weights_only=True), so loading never runs code. Writing goes to a temporary file in the same
folder, is fsynced, and only then renamed over ckpt.pt; the checkpoint it replaces becomes ckpt.prev.pt.
A crash at any moment leaves at least one complete checkpoint. On load, the CRC32 of every record in
the file (torch.save's zip format stores them) is checked, so a truncated or bit-flipped file is
reported instead of being loaded as garbage. Loads map the file (copy-on-write) rather than read it, so
the ranks of a node that each load a large checkpoint share one copy in the page cache.
"""
import os
import zipfile

import torch

from errors import CheckpointError


def previous_path(path):
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def fsync_dir(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state, path):
    """Write state to path atomically, keeping the checkpoint it replaces as previous_path(path)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(path):
        os.replace(path, previous_path(path))
    os.replace(tmp, path)
    fsync_dir(path)


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict at path, or a one-line CheckpointError naming the file and the problem."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: train one first (init_from='scratch') or fix out_dir")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise CheckpointError(f"cannot read checkpoint {path}: record {bad} is corrupted (CRC mismatch)")
        return torch.load(path, map_location=device, weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {reason})")


def load_latest(path, device="cpu"):
    """The checkpoint at path, or the previous one when path is missing or damaged (with a warning).

    Returns (checkpoint, path it came from). Raises the error about path when neither loads.
    """
    try:
        return load_checkpoint(path, device), path
    except CheckpointError as error:
        prev = previous_path(path)
        if not os.path.exists(prev):
            raise
        print(f"warning: {error}; resuming from the previous checkpoint {prev}", flush=True)
        return load_checkpoint(prev, device), prev
