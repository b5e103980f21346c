"""Generate text from a checkpoint.

    python sample.py --out_dir=DIR [--start=TEXT|FILE:path] [--num_samples=N] [--max_new_tokens=N]
                     [--temperature=T] [--top_k=K] [--seed=S] [--device=...]

The checkpoint carries the model config and the tokenizer's meta.json, so nothing else is needed.
temperature 0 is greedy decoding. A prompt longer than the model's context (block_size) is kept whole in
the output, but the model conditions on its last block_size tokens only.
"""
import argparse
import sys

import torch

from checkpoint import load_checkpoint
from config import pick_device
from data import Tokenizer
from errors import DataError, UserError
from model import GPT, GPTConfig


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0 (0 is greedy)")
    return args


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    try:
        with open(start[5:], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read prompt file {start[5:]}: {e.strerror}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        device = pick_device(args.device)
        checkpoint = load_checkpoint(f"{args.out_dir}/ckpt.pt", device)
        model = GPT(GPTConfig.from_dict(checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
        model.to(device).eval()
        tokenizer = Tokenizer(checkpoint["meta"])
        prompt = read_prompt(args.start)
        if not prompt:
            raise DataError("the prompt is empty: pass --start=TEXT (the default is a newline)")
        try:
            ids = tokenizer.encode(prompt)
        except ValueError as e:
            raise DataError(f"cannot encode the prompt: {e}")
    except (UserError, RuntimeError) as e:
        sys.exit(f"error: {e}")
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
