"""What a config costs, and the baselines a memory model is compared with (DESIGN.md section 4).

    python sizing.py configs/A.py [configs/B.py ...] [--key=value ...]

For each config (with the overrides, as train.py reads them): total parameters, parameters active per
token, forward FLOPs per token. For a config with memory layers, also its baselines, each with the
train.py overrides that turn the config into it:
- dense at 1x, 2x and 4x its FLOPs per token (`dense_baseline`);
- the MoE with the smallest expert count whose total parameters exceed the memory model's (`moe_baseline`).
vocab_size comes from the dataset's meta.json when it has been prepared, else GPTConfig's default.
Models are built on the meta device: nothing is allocated, so large configs cost nothing to size.
"""
import json
import os
import shlex
import sys
from dataclasses import asdict, replace
from itertools import count

import torch

from model import GPT, ConfigError, GPTConfig
from train import MODEL_KEYS, load_config


def costs(config):
    """Total parameters, active parameters per token and forward FLOPs per token of a GPTConfig."""
    with torch.device("meta"):
        model = GPT(config)
    return {**model.param_counts(), "flops": model.flops_per_token()}


def dense_version(config):
    """config with every feed-forward block a dense SwiGLU."""
    return replace(config, memory_layers=(), moe_layers=(), peer_layers=())


def dense_baseline(config, factor):
    """The dense model with about factor x config's FLOPs per token, by widening n_embd.

    Memory (MoE, PEER) layers become dense FFNs, then n_embd grows in steps that keep the head size even,
    ffn_hidden in proportion; the width whose FLOPs are closest to the target wins. Widening the whole
    model, not only ffn_hidden, keeps it a usual shape (a 4x model would otherwise be almost all FFN);
    keeping n_layer keeps the layer positions comparable.
    """
    target = factor * costs(config)["flops"]
    base = dense_version(config)
    step = 2 * base.n_head

    def widened(n_embd):
        return replace(base, n_embd=n_embd, ffn_hidden=round(base.ffn_hidden * n_embd / base.n_embd))

    n_embd = step
    while costs(widened(n_embd + step))["flops"] <= target:
        n_embd += step
    return min((widened(n_embd), widened(n_embd + step)), key=lambda c: abs(costs(c)["flops"] - target))


def moe_baseline(config):
    """The paper's MoE baseline: every feed-forward block an MoE of top-1 experts shaped like the dense FFN
    (so the FLOPs are the dense model's plus the routers'), with the smallest number of experts whose total
    parameters exceed config's."""
    target = costs(config)["total"]
    base = replace(dense_version(config), moe_layers=tuple(range(config.n_layer)), moe_top_k=1,
                   moe_hidden=config.ffn_hidden)
    return next(moe for moe in (replace(base, moe_num_experts=e) for e in count(1)) if costs(moe)["total"] > target)


def overrides(config, changed):
    """The train.py --key=value arguments that turn config into changed."""
    old, new = asdict(config), asdict(changed)
    return " ".join(shlex.quote(f"--{k}={v!r}") for k, v in new.items() if v != old[k])


def report(config, name):
    """Lines of text: config's costs and, for a memory model, its baselines with their FLOPs relative to it."""
    own = costs(config)
    line = "{:<32} {:>14,} params {:>14,} active {:>14,} FLOPs/token"
    lines = [line.format(name, own["total"], own["active"], own["flops"])]
    if config.memory_layers:
        baselines = [(f"  dense {f}x", dense_baseline(config, f)) for f in (1, 2, 4)]
        baselines.append(("  moe", moe_baseline(config)))
        for label, baseline in baselines:
            c = costs(baseline)
            lines.append(line.format(label, c["total"], c["active"], c["flops"])
                         + f" (x{c['flops'] / own['flops']:.2f})  {overrides(config, baseline)}")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    files = [a for a in argv if not a.startswith("--")]
    if not files:
        sys.exit(__doc__)
    try:
        for path in files:  # a+b.py: config files applied in order, as train.py applies them
            config = load_config(path.split("+") + [a for a in argv if a.startswith("--")])
            meta = os.path.join(config["data_dir"], config["dataset"], "meta.json")
            vocab = {}
            if os.path.exists(meta):
                with open(meta) as f:
                    vocab = {"vocab_size": json.load(f)["vocab_size"]}
            model_config = GPTConfig(**vocab, **{k: config[k] for k in MODEL_KEYS})
            print("\n".join(report(model_config, os.path.basename(path))))
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
