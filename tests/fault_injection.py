"""Kill a training run at random moments and check that resuming always lands on the uninterrupted result.

    python tests/fault_injection.py [--kills N] [--seed S] [--max_iters I]

A tiny character-level model trains once without interruption. Then the same run is started, killed
with SIGKILL at a random moment (during start-up, a step, an eval or a checkpoint write), resumed from
whatever checkpoint survived, killed again, N times, and finally left to finish. Every loss it logged,
before and after each kill, must equal the uninterrupted run's loss at the same iteration, bit for bit.
"""
import argparse
import json
import os
import random
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


def run_fault_injection(kills, seed, max_iters, workdir):
    """Returns a list of mismatch descriptions (empty when every resume matched)."""
    from prepare_data import write_dataset
    text_path = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
    text = open(text_path, encoding="utf-8").read()[:100_000] if os.path.exists(text_path) else "To be. " * 9000
    data_dir = os.path.join(workdir, "data")
    write_dataset(text, "tiny", "char", data_dir)

    reference_dir = os.path.join(workdir, "reference")
    start = time.time()
    run_to_end(command(data_dir, reference_dir, max_iters, False))
    duration = time.time() - start
    reference = losses(reference_dir)

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

    mismatches = []
    for key, values in sorted(losses(out_dir).items()):
        if any(v != reference.get(key, [None])[0] for v in values):
            mismatches.append(f"{key}: uninterrupted {reference.get(key)}, interrupted runs logged {values}")
    if ("eval", max_iters) not in losses(out_dir):
        mismatches.append("the interrupted run never finished")
    return mismatches


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_iters", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        mismatches = run_fault_injection(args.kills, args.seed, args.max_iters, workdir)
    print("\n".join(mismatches) or f"all {args.kills} kills resumed to the uninterrupted losses")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
