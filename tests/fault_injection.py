"""Faults a run must survive: kills at random moments, a second run into its out_dir, a full disk.

    python tests/fault_injection.py [--kills N] [--seed S] [--max_iters I]

A tiny character-level model trains once without interruption. Then the same run is started, killed
with SIGKILL at a random moment (during start-up, a step, an eval or a checkpoint write), resumed from
whatever checkpoint survived, killed again, N times, and finally left to finish. Every loss it logged,
before and after each kill, must equal the uninterrupted run's loss at the same iteration, bit for bit.
Then two runs are started into one out_dir: the second must be refused at once, naming the first's pid,
and the first must finish with the uninterrupted losses. Last, a run resumes under a file-size limit
that its next checkpoint exceeds (a full disk, to the program): the write must fail in one line, leave
no temporary file, and leave the previous checkpoint as it was and loadable.
"""
import argparse
import glob
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--eval_iters=2",
            "--eval_interval=5", "--log_interval=1", "--warmup_iters=5", "--device='cpu'", "--memory_layers=(1,)",
            "--mem_n_keys=8", "--mem_knn=4", "--mem_heads=2"]


def losses(out_dir):
    """{(event, iter): [every loss logged for it]} from out_dir/log.jsonl."""
    seen = {}
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        for event in map(json.loads, f):
            if event["event"] in ("train", "eval"):
                seen.setdefault((event["event"], event["iter"]), []).append(
                    event.get("loss", event.get("val_loss")))
    return seen


def command(data_dir, out_dir, max_iters, resume):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--dataset='tiny'", f"--data_dir='{data_dir}'",
            f"--out_dir='{out_dir}'", f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}", *SETTINGS,
            f"--init_from='{'resume' if resume else 'scratch'}'"]


def run_to_end(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"training failed: {result.stderr[-2000:]}")


def has_checkpoint(out_dir):
    return any(os.path.exists(os.path.join(out_dir, name)) for name in ("ckpt.pt", "ckpt.prev.pt"))


def write_data(workdir):
    """workdir/data, holding the dataset 'tiny' (the first 100k characters of tinyshakespeare)."""
    from prepare_data import write_dataset
    with open(os.path.join(ROOT, "corpora", "tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read()[:100_000]
    data_dir = os.path.join(workdir, "data")
    write_dataset(text, "tiny", "char", data_dir)
    return data_dir


def prepare(workdir, max_iters):
    """The dataset (write_data) and an uninterrupted run in workdir/reference: (data_dir, its losses, its
    wall seconds)."""
    data_dir = write_data(workdir)
    reference_dir = os.path.join(workdir, "reference")
    start = time.time()
    run_to_end(command(data_dir, reference_dir, max_iters, False))
    return data_dir, losses(reference_dir), time.time() - start


def differences(out_dir, reference, max_iters):
    """What out_dir's logged losses have that the reference's do not, and whether it finished."""
    mismatches = []
    for key, values in sorted(losses(out_dir).items()):
        if any(v != reference.get(key, [None])[0] for v in values):
            mismatches.append(f"{key}: uninterrupted {reference.get(key)}, interrupted runs logged {values}")
    if ("eval", max_iters) not in losses(out_dir):
        mismatches.append("the interrupted run never finished")
    return mismatches


def run_fault_injection(kills, seed, max_iters, workdir):
    """Returns a list of mismatch descriptions (empty when every resume matched)."""
    data_dir, reference, duration = prepare(workdir, max_iters)

    rng = random.Random(seed)
    out_dir = os.path.join(workdir, "killed")
    for _ in range(kills):
        proc = subprocess.Popen(command(data_dir, out_dir, max_iters, has_checkpoint(out_dir)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.2, 1.0) * duration)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    run_to_end(command(data_dir, out_dir, max_iters, has_checkpoint(out_dir)))
    return differences(out_dir, reference, max_iters)


def run_two_into_one_out_dir(workdir, max_iters):
    """Problems (none: an empty list) when a second run starts into the out_dir of a run in progress."""
    data_dir, reference, _ = prepare(workdir, max_iters)
    out_dir = os.path.join(workdir, "shared_out")
    first = subprocess.Popen(command(data_dir, out_dir, max_iters, False), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    while not os.path.exists(os.path.join(out_dir, "log.jsonl")):  # the log comes after the lock
        if first.poll() is not None:
            return [f"the first run ended before it logged: {first.stderr.read()[-2000:]}"]
        time.sleep(0.05)
    if first.poll() is not None:
        return ["the first run ended before the second started: the test proves nothing"]
    first.send_signal(signal.SIGSTOP)  # paused, holding its lock: it cannot end before the second is refused
    try:
        start = time.time()
        second = subprocess.run(command(data_dir, out_dir, max_iters, False), capture_output=True, text=True)
    finally:
        first.send_signal(signal.SIGCONT)
    problems = []
    if second.returncode != 1 or second.stderr.count("\n") != 1 or f"in use by the run of pid {first.pid} " \
            not in second.stderr:
        problems.append(f"the second run was not refused naming pid {first.pid}: {second.stderr[-2000:]}")
    if time.time() - start > 30:
        problems.append(f"the second run took {time.time() - start:.0f} s to be refused")
    if first.wait() != 0:
        problems.append(f"the first run failed: {first.stderr.read()[-2000:]}")
    return problems + differences(out_dir, reference, max_iters)


def file_size_limit(limit):
    """A preexec_fn: files of the child stop at limit bytes, and writing past it fails with EFBIG, as a
    full disk fails (instead of the SIGXFSZ that would kill the process)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def run_disk_full(workdir, max_iters=10):
    """Problems (none: an empty list) when a resumed run cannot write its next checkpoint."""
    data_dir = write_data(workdir)
    out_dir = os.path.join(workdir, "full")
    run_to_end(command(data_dir, out_dir, max_iters // 2, False))
    ckpt = os.path.join(out_dir, "ckpt.pt")
    with open(ckpt, "rb") as f:
        before = hashlib.sha256(f.read()).hexdigest()
    result = subprocess.run(command(data_dir, out_dir, max_iters, True), capture_output=True, text=True,
                            preexec_fn=file_size_limit(os.path.getsize(ckpt) // 2))
    problems = []
    if result.returncode != 1 or result.stderr.count("\n") != 1 or "Traceback" in result.stderr or \
            not result.stderr.startswith(f"error: cannot write checkpoint {ckpt}: File too large"):
        problems.append(f"the failed write was not one line naming {ckpt}: {result.stderr[-2000:]}")
    left = glob.glob(os.path.join(out_dir, "*tmp"))
    if left:
        problems.append(f"temporary files left: {left}")
    with open(ckpt, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != before:
            problems.append(f"{ckpt} changed")
    from checkpoint import load_checkpoint
    if load_checkpoint(ckpt)["iter_num"] != max_iters // 2:
        problems.append(f"{ckpt} does not load at iteration {max_iters // 2}")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_iters", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        problems = run_fault_injection(args.kills, args.seed, args.max_iters, os.path.join(workdir, "kills"))
        print("\n".join(problems) or f"all {args.kills} kills resumed to the uninterrupted losses")
        concurrent = run_two_into_one_out_dir(os.path.join(workdir, "concurrent"), args.max_iters)
        print("\n".join(concurrent) or "a second run into the same out_dir was refused, the first went on untouched")
        full = run_disk_full(os.path.join(workdir, "full"))
        print("\n".join(full) or "a checkpoint write that failed left one line and the previous checkpoint intact")
    sys.exit(1 if problems or concurrent or full else 0)


if __name__ == "__main__":
    main()
