"""Checkpoints that survive crashes: atomic writes, the previous one kept, corruption detected on load;
one run per out_dir.

A checkpoint is a plain dict of tensors and Python values saved with torch.save; it loads with
torch.load(weights_only=True), so loading never runs code. Writing goes to a temporary file in the same
folder (named for the writing process), is fsynced, and only then renamed over ckpt.pt; the checkpoint it
replaces becomes ckpt.prev.pt once its records' CRCs check out (a damaged one is moved to ckpt.damaged.pt
and the good previous one kept). A crash at any moment leaves at least one complete checkpoint, and a
failed write (a full disk) leaves every earlier one as it was. On load, the CRC32 of every record in the
file (torch.save's zip format stores them) is checked, so a truncated or bit-flipped file is reported
instead of being loaded as garbage. Loads map the file (copy-on-write) rather than read it, so the ranks
of a node that each load a large checkpoint share one copy in the page cache.

A run holds out_dir/run.lock (RunLock) for its whole life, so that two runs never write into one out_dir.
"""
import fcntl
import glob
import os
import socket
import zipfile

import torch

from errors import CheckpointError

# what the checkpoints train.py writes hold, and the type of each
KEY_TYPES = {"model_config": dict, "model": dict, "meta": dict, "iter_num": int, "rng_state": torch.Tensor,
             "optimizer": dict}
WEIGHTS = ("model_config", "model", "meta")  # enough to sample or finetune
STATE = WEIGHTS + ("iter_num", "rng_state", "optimizer")  # enough to resume


def previous_path(path):
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def damaged_path(path):
    root, ext = os.path.splitext(path)
    return f"{root}.damaged{ext}"


def fsync_dir(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def damage(path):
    """What is wrong with the torch.save zip at path (not a zip, a record whose CRC fails), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as e:  # a damaged file fails in many ways (BadZipFile, EOFError, OSError, ...)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return f"record {bad} is corrupted (CRC mismatch)" if bad else None


def save_checkpoint(state, path):
    """Write state to path atomically, keeping the checkpoint it replaces as previous_path(path) if whole.

    A write that fails for the OS (a full disk, a file-size limit) raises a CheckpointError naming the
    file and the OS error; its temporary file is removed and the earlier checkpoints stay as they were.
    """
    tmp = f"{path}.{os.getpid()}.tmp"  # one per writer: two processes never write into the same file
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__context__  # torch.save wraps the file's OSError
        if not isinstance(cause, OSError):
            raise
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"cannot write checkpoint {path}: {cause.strerror or cause} (the partial file was "
                              f"removed and the earlier checkpoints kept): free disk space or choose another out_dir")
    if os.path.exists(path):
        problem = damage(path)
        if problem:  # rotating it would push out the last good checkpoint
            os.replace(path, damaged_path(path))
            print(f"warning: {path} is damaged ({problem}): moved to {damaged_path(path)}, "
                  f"{previous_path(path)} kept", flush=True)
        else:
            os.replace(path, previous_path(path))
    os.replace(tmp, path)
    fsync_dir(path)


def load_checkpoint(path, device="cpu", keys=()):
    """The checkpoint dict at path, which must hold keys (e.g. WEIGHTS), or a one-line CheckpointError
    naming the file and the problem."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: train one first (init_from='scratch') or fix out_dir")
    problem = damage(path)
    if problem:
        raise CheckpointError(f"cannot read checkpoint {path}: {problem}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {reason})")
    if not isinstance(checkpoint, dict):
        problem = f"holds a {type(checkpoint).__name__}, not a dict"
    else:
        wrong = [k for k in keys if not isinstance(checkpoint.get(k), KEY_TYPES[k])]
        problem = wrong and f"has no {', '.join(wrong)} of the right type (its keys: {sorted(map(str, checkpoint))[:8]})"
    if problem:
        raise CheckpointError(f"{path} is not a checkpoint of this train.py: it {problem}; it comes from another "
                              "program or an older version: train one with `python train.py`, or point out_dir at "
                              "a run of this version")
    return checkpoint


def load_latest(path, device="cpu", keys=()):
    """The checkpoint at path, or the previous one when path is missing or damaged (with a warning).

    Returns (checkpoint, path it came from). Raises the error about path when neither loads.
    """
    try:
        return load_checkpoint(path, device, keys), path
    except CheckpointError as error:
        prev = previous_path(path)
        if not os.path.exists(prev):
            raise
        print(f"warning: {error}; resuming from the previous checkpoint {prev}", flush=True)
        return load_checkpoint(prev, device, keys), prev


class RunLock:
    """out_dir/run.lock, held with flock for a run's whole life: a second run into out_dir is refused.

    The file names its holder (pid and host) for that refusal. The kernel drops the lock of a process
    however it ends, so the file a crashed run left behind is simply taken over.
    """

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "run.lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that is starting"
                os.close(fd)
                raise CheckpointError(f"out_dir {out_dir} is in use by the run of {holder} ({self.path}): wait for "
                                      "it to end, stop it, or choose another out_dir")
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # its holder ended and removed it meanwhile: lock the file that is there now
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self):
        if os.path.exists(self.path):  # removed while still locked, so that no one locks a removed file
            os.remove(self.path)
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def open_run(out_dir, replaces_checkpoint, overwrite):
    """Create out_dir and lock it for this run (RunLock); the run's one-line errors about out_dir.

    A run that starts a new checkpoint (replaces_checkpoint) into an out_dir that holds one is refused
    unless overwrite. Temporary files of writers that crashed are removed: the lock makes this run the
    only writer.
    """
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = RunLock(out_dir)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(f"out_dir {out_dir} is a file or lies inside one, not a folder: choose another out_dir")
    except OSError as e:
        raise CheckpointError(f"cannot write in out_dir {out_dir}: {e.strerror}: choose another out_dir")
    ckpt = os.path.join(out_dir, "ckpt.pt")
    held = [p for p in (ckpt, previous_path(ckpt)) if os.path.exists(p)]
    if replaces_checkpoint and held and not overwrite:
        lock.release()
        raise CheckpointError(f"out_dir {out_dir} holds the checkpoint of an earlier run ({held[0]}): continue it "
                              "with --init_from=resume, or start afresh over it with --overwrite=True")
    for tmp in glob.glob(f"{glob.escape(ckpt)}.*tmp"):
        os.remove(tmp)
    return lock
