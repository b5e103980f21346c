"""Generate text from a checkpoint.

    python sample.py --out_dir=DIR [--start=TEXT|FILE:path] [--num_samples=N] [--max_new_tokens=N]
                     [--temperature=T] [--top_k=K] [--seed=S] [--device=...]

The checkpoint carries the model config and the tokenizer's meta.json, so nothing else is needed.
temperature 0 is greedy decoding. A prompt longer than the model's context (block_size) is kept whole in
the output, but the model conditions on its last block_size tokens only.
"""
import argparse
import math
import sys

import torch

from checkpoint import WEIGHTS, load_checkpoint
from config import pick_device
from data import Tokenizer, meta_problem
from errors import CheckpointError, ConfigError, DataError, OneLineErrors, UserError
from model import GPT, GPTConfig


def parse_args(argv):
    p = OneLineErrors(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="the run's folder: its ckpt.pt is sampled (default: out)")
    p.add_argument("--start", default="\n", help="the prompt, or FILE:path to read it from a UTF-8 text file "
                                                 "(default: a newline)")
    p.add_argument("--num_samples", type=int, default=3, help="samples to draw, at least 1 (default: 3)")
    p.add_argument("--max_new_tokens", type=int, default=300, help="tokens per sample, at least 1 (default: 300)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature, finite and >= 0; 0 is greedy (default: 0.8)")
    p.add_argument("--top_k", type=int, default=200,
                   help="sample among the k likeliest tokens, >= 0; 0 is all of them (default: 200)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling (default: 1337)")
    p.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' "
                                                    "or 'mps' (default: auto)")
    args = p.parse_args(argv)
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)} must be at least 1: write e.g. --{name}={p.get_default(name)}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        p.error(f"--temperature={args.temperature} must be a finite number >= 0 (0 is greedy): write e.g. "
                "--temperature=0.8")
    if args.top_k < 0:
        p.error(f"--top_k={args.top_k} must be >= 0 (0 samples among all tokens): write e.g. --top_k=200")
    return args


def read_prompt(start):
    """The prompt text: start itself, or the UTF-8 text of the file FILE:path names."""
    if not start.startswith("FILE:"):
        return start
    path = start[5:]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"cannot read prompt file {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        raise DataError(f"prompt file {path} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}): "
                        "pass a text file, or the prompt itself with --start=TEXT")
    if "\0" in text:
        raise DataError(f"prompt file {path} holds NUL bytes: it is a binary file, not a text prompt; pass a text "
                        "file, or the prompt itself with --start=TEXT")
    return text


def load_model(path, device):
    """(model in eval mode on device, tokenizer, checkpoint) from the checkpoint at path; one-line errors
    that name the file when it holds no model of this program."""
    checkpoint = load_checkpoint(path, device, keys=WEIGHTS)
    problem = meta_problem(checkpoint["meta"])
    if problem:
        raise CheckpointError(f"{path} is not a checkpoint of this train.py: its meta.json {problem}")
    try:
        model = GPT(GPTConfig.from_dict(checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (ConfigError, TypeError, RuntimeError) as e:
        reason = str(e).splitlines()[0]
        raise CheckpointError(f"{path} holds a model this version cannot build ({type(e).__name__}: {reason}): "
                              "it comes from another program or an older version")
    return model.to(device).eval(), Tokenizer(checkpoint["meta"]), checkpoint


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    path = f"{args.out_dir}/ckpt.pt"
    try:
        device = pick_device(args.device)
        prompt = read_prompt(args.start)
        if not prompt:
            raise DataError("the prompt is empty: pass --start=TEXT (the default is a newline)")
        model, tokenizer, checkpoint = load_model(path, device)
        try:
            ids = tokenizer.encode(prompt)
        except ValueError as e:
            raise DataError(f"cannot encode the prompt: {e}")
    except UserError as e:
        sys.exit(f"error: {e}")
    details = [f"iteration {checkpoint['iter_num']}"] if "iter_num" in checkpoint else []
    if isinstance(checkpoint.get("val_loss"), float):  # checkpoints written at an eval have it
        details.append(f"val loss {checkpoint['val_loss']:.4f}")
    print(f"loaded {path}" + (f": {', '.join(details)}" if details else ""), file=sys.stderr)
    if len(ids) > model.config.block_size:
        print(f"note: the prompt's {len(ids)} tokens are longer than the context of {model.config.block_size}; "
              "the model sees its last tokens only", file=sys.stderr)
    torch.manual_seed(args.seed)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    for row in out.tolist():
        print(tokenizer.decode(row))
        print("---------------")


if __name__ == "__main__":
    main()
