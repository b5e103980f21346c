"""What a config costs, the baselines a memory model is compared with (docs/method.md section 4), and
what each rank holds when the value tables are split over GPUs.

    python tools/sizing.py configs/A.py [configs/B.py ...] [--key=value ...]
    python tools/sizing.py configs/A.py --mem_parallel=8   # also the bytes one rank holds, for M = 1 and 8

For each config (with the overrides, as train.py reads them): total parameters, parameters active per
token, forward FLOPs per token. For a config with memory layers, also its baselines, each with the
train.py overrides that turn the config into it:
- dense at 1x, 2x and 4x its FLOPs per token (`dense_baseline`);
- the MoE with the smallest expert count whose total parameters exceed the memory model's (`moe_baseline`).
With --mem_parallel=M: the parameters and fp32 bytes (weights, gradients, DDP buckets, AdamW moments) one
rank holds with the tables split by columns over M ranks, against M = 1 (activations not included).
vocab_size comes from the dataset's meta.json when it has been prepared, else GPTConfig's default.
Models are built on the meta device: nothing is allocated, so large configs cost nothing to size.
"""
import os
import shlex
import sys
from dataclasses import asdict, replace
from functools import partial
from itertools import count

import torch

if __package__ in (None, ""):  # run as `python tools/sizing.py`: the repository's modules are one folder up
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from config import gpt_config, load_config
from data import read_meta
from distributed import ShardedValueTable
from errors import UserError
from model import FFN_KINDS, GPT, GPTConfig


def costs(config):
    """Total parameters, active parameters per token and forward FLOPs per token of a GPTConfig."""
    with torch.device("meta"):
        model = GPT(config)
    return {**model.param_counts(), "flops": model.flops_per_token()}


def dense_version(config):
    """config with every feed-forward block a dense SwiGLU."""
    return replace(config, **{field: () for field in FFN_KINDS})


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


def bytes_per_rank(model_config, mem_parallel):
    """Parameters on one rank and the bytes of its fp32 weights, gradients, DDP buckets and AdamW moments."""
    with torch.device("meta"):  # shapes only, nothing allocated
        model = GPT(model_config, value_table=partial(ShardedValueTable, shard=0, shards=mem_parallel, group=None))
    table = sum(p.numel() for _, p in model.value_parameters())
    replicated = sum(p.numel() for p in model.parameters()) - table
    held = {"weights": 4 * (table + replicated), "grads": 4 * (table + replicated),
            "DDP buckets": 4 * replicated,  # DDP all-reduces a copy of the replicated gradients
            "AdamW": 8 * (table + replicated)}  # exp_avg and exp_avg_sq
    return {"table": table, "replicated": replicated, **held, "total": sum(held.values())}


def per_rank_report(model_config, mem_parallel):
    """Lines of text: what one rank holds with mem_parallel = 1 and with the given one, fp32 GiB."""
    if model_config.mem_v_dim % mem_parallel:
        raise UserError(f"mem_parallel={mem_parallel} must divide mem_v_dim={model_config.mem_v_dim}")
    values = model_config.mem_n_keys ** 2 if model_config.memory_layers else 0
    full = bytes_per_rank(model_config, 1)
    columns = ["weights", "grads", "DDP buckets", "AdamW", "total"]
    lines = [f"per rank: {values:,} values x {model_config.mem_v_dim} ({full['table'] / 1e6:,.1f}M table parameters), "
             f"{full['replicated'] / 1e6:,.1f}M replicated parameters; fp32 GiB, activations not included",
             f"{'mem_parallel':>12} {'params/rank':>12} " + " ".join(f"{c:>11}" for c in columns)]
    for m in sorted({1, mem_parallel}):
        held = bytes_per_rank(model_config, m)
        lines.append(f"{m:>12} {(held['table'] + held['replicated']) / 1e6:>11,.1f}M " +
                     " ".join(f"{held[c] / 2**30:>11.2f}" for c in columns))
    lines.append(f"a checkpoint (weights and AdamW moments, tables whole) is "
                 f"{(full['weights'] + full['AdamW']) / 2**30:.2f} GiB, gathered in rank 0's host memory to be written")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    files = [a for a in argv if not a.startswith("--")]
    try:
        if not files:
            raise UserError("name at least one config file: python tools/sizing.py CONFIG.py [--key=value ...] "
                            "(--help for more)")
        for path in files:  # a+b.py: config files applied in order, as train.py applies them
            config = load_config(path.split("+") + [a for a in argv if a.startswith("--")])
            meta = os.path.join(config.data_dir, config.dataset, "meta.json")
            vocab_size = read_meta(meta, config.dataset)["vocab_size"] if os.path.exists(meta) else GPTConfig.vocab_size
            model_config = gpt_config(config, vocab_size)
            print("\n".join(report(model_config, os.path.basename(path))))
            if any(a.startswith("--mem_parallel=") for a in argv):
                print("\n".join(per_rank_report(model_config, config.mem_parallel)))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
