"""Train a GPT whose feed-forward blocks are dense, memory, MoE or PEER layers.

    python train.py configs/NAME.py [--key=value ...]
    torchrun --standalone --nproc_per_node=N train.py configs/NAME.py [--mem_parallel=M ...]

A config file is Python that assigns keys (see TrainConfig and model.GPTConfig for all of them and
their defaults); --key=value overrides it. Logs go to OUT_DIR/log.jsonl (one JSON object per event),
the checkpoint to OUT_DIR/ckpt.pt (a plain dict: torch.load(..., weights_only=True) reads it).
Under torchrun, batch_size is per rank, rank 0 alone logs and writes, and the value tables are split
by columns over groups of mem_parallel ranks (distributed.py); checkpoints do not depend on the layout.
"""
import ast
import difflib
import glob
import json
import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

import distributed
from checkpoint import load_checkpoint, load_latest, save_checkpoint
from facts import describe_scores, load_eval, score_facts
from memory import usage_stats
from optim import RowAdamW, clip_grad_norm_
from model import GPT, ConfigError, GPTConfig


@dataclass
class TrainConfig:
    # data and output
    dataset: str = "shakespeare"
    data_dir: str = "data"
    out_dir: str = "out"
    init_from: str = "scratch"  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    # loop
    max_iters: int = 2000
    eval_interval: int = 250
    eval_iters: int = 20
    facts_eval_size: int = 500  # question/answer pairs of each kind scored at each eval when the dataset has them
    log_interval: int = 10
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    # AdamW and schedule: linear warmup, cosine decay to min_lr at lr_decay_iters (0: max_iters)
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max norm of every gradient but the value tables' (0: off)
    mem_value_lr: float = 1e-2  # peak lr of the value tables, same schedule
    mem_value_grad_clip: float = 1.0  # max norm of the value tables' gradient, clipped on its own (0: off)
    mem_sparse_update: bool = False  # value tables: touched-row gradients and RowAdamW instead of dense AdamW
    nonfinite: str = "stop"  # a non-finite loss or gradient: 'stop' (weights untouched) or 'skip' the step
    # system
    device: str = "auto"  # 'auto': cuda, then mps, then cpu
    dtype: str = "auto"  # 'float32', 'bfloat16', 'float16' (autocast); 'auto': bfloat16 on cuda if supported
    compile: bool = False
    seed: int = 1337
    mem_parallel: int = 1  # under torchrun: ranks per group that splits the value tables by columns


MODEL_KEYS = [f.name for f in fields(GPTConfig) if f.name != "vocab_size"]  # vocab_size comes from the data


def default_config():
    config = asdict(TrainConfig())
    config.update({f.name: f.default for f in fields(GPTConfig) if f.name in MODEL_KEYS})
    return config


def coerce(key, value, default):
    """value converted to the type of key's default, or a ConfigError naming the key."""
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is tuple and isinstance(value, (list, tuple)):
        value = tuple(value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
    elif isinstance(value, expected) and (expected is bool or not isinstance(value, bool)):
        return value
    want = "a tuple of ints" if expected is tuple else expected.__name__
    raise ConfigError(f"config key '{key}' expects {want}, got {value!r}")


def set_key(config, key, value, where):
    if key not in config:
        close = difflib.get_close_matches(key, config, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: unknown config key '{key}'{hint}")
    config[key] = coerce(key, value, config[key])


def load_config(argv):
    """Defaults, then the config files in argv, then its --key=value overrides, in order."""
    config = default_config()
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"override {arg!r} must look like --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare string such as --dataset=shakespeare
            set_key(config, key, value, "command line")
        else:
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise ConfigError(f"cannot read config file {arg}: {e.strerror}")
            namespace = {}
            exec(compile(source, arg, "exec"), namespace)
            for key, value in namespace.items():
                if not key.startswith("_") and not type(value).__name__ == "module":
                    set_key(config, key, value, arg)
    for key, allowed in (("init_from", ("scratch", "resume")), ("nonfinite", ("stop", "skip"))):
        if config[key] not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {config[key]!r}")
    return config


# ---- data -------------------------------------------------------------------------------------------
class Tokens:
    """A split's uint16 token ids, stored in one file or in numbered shards, read as one sequence."""

    def __init__(self, paths):
        self.name = paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more shards)"
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


def load_dataset(config):
    """train/val tokens (split.bin, or shards split_000000.bin, ...) and meta.json of data_dir/dataset."""
    folder = os.path.join(config["data_dir"], config["dataset"])
    files = {s: [os.path.join(folder, f"{s}.bin")] if os.path.exists(os.path.join(folder, f"{s}.bin"))
             else sorted(glob.glob(os.path.join(folder, f"{s}_*.bin"))) for s in ("train", "val")}
    missing = [f"{s}.bin" for s, paths in files.items() if not paths]
    if not os.path.exists(os.path.join(folder, "meta.json")):
        missing.append("meta.json")
    if missing:
        raise ConfigError(f"dataset '{config['dataset']}' not found ({folder} lacks {', '.join(missing)}): make it "
                          f"with `python prepare_data.py shakespeare` or `python prepare_data.py text --input FILE "
                          f"--name {config['dataset']}`")
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    splits = {s: Tokens(paths) for s, paths in files.items()}
    for split, data in splits.items():
        if len(data) <= config["block_size"]:
            raise ConfigError(f"block_size={config['block_size']} needs more than {len(data)} tokens, "
                              f"the size of {data.name}: lower block_size")
    return splits, meta


def get_batch(data, batch_size, block_size, generator, device, vocab_size, rank=0, world=1):
    """batch_size random windows of data: inputs and next-token targets, (batch_size, block_size) int64.

    With world ranks the generator draws world*batch_size windows and rank takes its batch_size of them,
    so the ranks together see exactly the batch that one process with world*batch_size would.
    """
    starts = torch.randint(len(data) - block_size, (world * batch_size,), generator=generator)
    starts = starts[rank * batch_size:(rank + 1) * batch_size].tolist()
    windows = torch.from_numpy(np.stack([data.read(s, block_size + 1) for s in starts]).astype(np.int64))
    if windows.max() >= vocab_size:  # a wrong or stale meta.json would otherwise fail deep in the embedding
        raise ConfigError(f"{data.name} holds token id {int(windows.max())}, beyond the vocabulary of "
                          f"{vocab_size} in its meta.json: prepare the dataset again")
    windows = windows.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else windows.to(device)
    return windows[:, :-1], windows[:, 1:]


def batch_generator(seed, step):
    """The batches of a step depend only on (seed, step): runs resume on the same data order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ---- training ---------------------------------------------------------------------------------------
def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}")


def pick_dtype(name, device):
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ConfigError(f"dtype must be one of {['auto', *dtypes]}, got {name!r}")
    return dtypes[name]


def lr_factor(step, config):
    """Linear warmup to 1, cosine decay to min_lr/learning_rate at lr_decay_iters, then flat."""
    decay_iters = config["lr_decay_iters"] or config["max_iters"]
    floor = config["min_lr"] / config["learning_rate"]
    if step < config["warmup_iters"]:
        return (step + 1) / (config["warmup_iters"] + 1)
    if step >= decay_iters:
        return floor
    progress = (step - config["warmup_iters"]) / max(1, decay_iters - config["warmup_iters"])
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (1 - floor)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.no_grad()
def estimate_loss(model, splits, config, device, autocast, vocab_size, par, tables):
    """Mean loss over eval_iters batches per split; the same batches at every eval, so evals compare.

    Every rank evaluates its part of each batch (par: distributed.Parallel), then the means are averaged.
    On the val split the value tables' usage is measured too (memory.usage_stats, one entry per table).
    """
    model.eval()
    out = {}
    for split, data in splits.items():
        for table in tables:
            table.usage = torch.zeros(len(table.weight), device=device) if split == "val" else None
        generator = torch.Generator().manual_seed(config["seed"])
        losses = []
        for _ in range(config["eval_iters"]):
            x, y = get_batch(data, config["batch_size"], config["block_size"], generator, device, vocab_size,
                             par.rank, par.world)
            with autocast:
                losses.append(model(x, y)[1].float())
        out[split] = par.mean(torch.stack(losses).mean()).item()
    stats = [usage_stats(par.sum(table.usage)) for table in tables]
    for table in tables:
        table.usage = None
    if stats:
        out.update({f"mem_{key}": [s[key] for s in stats] for key in stats[0]})
    model.train()
    return out


class Logger:
    """Prints and appends JSON lines to out_dir/log.jsonl."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "log.jsonl")
        if os.path.exists(self.path):  # drop a line cut short by a crash, so every line parses
            with open(self.path, "rb+") as f:
                text = f.read()
                f.truncate(text.rfind(b"\n") + 1)

    def __call__(self, event, message=None, **fields):
        if message:
            print(message, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, **fields}) + "\n")


class StopRequest:
    """Remembers a SIGTERM or SIGINT so that training can finish its step, checkpoint and exit.

    A second signal of the same kind acts at once (the default handler is restored after the first).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}

    def handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous[signum])

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def make_optimizers(model, config, device):
    """{"optimizer": AdamW} over every parameter group (model.optimizer_groups), or with mem_sparse_update
    AdamW without the value tables plus {"value_optimizer": RowAdamW} over them (touched rows only)."""
    groups = model.optimizer_groups(config["weight_decay"], config["learning_rate"], config["mem_value_lr"])
    betas = (config["beta1"], config["beta2"])
    value_groups = [g for g in groups if g["name"] == "values"] if config["mem_sparse_update"] else []
    dense_groups = [g for g in groups if not any(g is v for v in value_groups)]
    optimizers = {"optimizer": torch.optim.AdamW(dense_groups, betas=betas, fused=device.type == "cuda")}
    if value_groups:
        optimizers["value_optimizer"] = RowAdamW(value_groups, betas=betas)
    return optimizers


class NonFiniteError(ConfigError):
    """A non-finite loss or gradient with nonfinite='stop'."""


def train(config):
    """Train as config says; returns the model. Raises ConfigError (and subclasses) for bad input."""
    torch.manual_seed(config["seed"])
    device = pick_device(config["device"])
    dtype = pick_dtype(config["dtype"], device)
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    splits, meta = load_dataset(config)
    facts_sample = load_eval(os.path.join(config["data_dir"], config["dataset"]), config["facts_eval_size"])
    os.makedirs(config["out_dir"], exist_ok=True)
    ckpt_path = os.path.join(config["out_dir"], "ckpt.pt")
    model_config = GPTConfig(vocab_size=meta["vocab_size"], **{k: config[k] for k in MODEL_KEYS})
    par = distributed.setup(config["mem_parallel"], device, model_config)
    device = par.device
    if dtype == torch.float16 and par.world > 1:
        raise ConfigError("dtype='float16' skips steps on overflow rank by rank, so ranks would drift apart: "
                          "use 'bfloat16' or 'float32' with several processes")

    checkpoint = None
    if config["init_from"] == "resume":
        checkpoint, ckpt_source = load_latest(ckpt_path)
        now = asdict(model_config)
        differ = [f"{k}={v!r} in the checkpoint but {now.get(k)!r} now"
                  for k, v in checkpoint["model_config"].items() if now.get(k) != v]
        if differ:
            raise ConfigError(f"config contradicts {ckpt_source}: {'; '.join(differ)}")
    model = GPT(model_config, value_table=par.value_table)
    if checkpoint:
        model.load_state_dict(checkpoint["model"])  # a sharded table takes its columns of the whole one
    model.to(device)
    for table in model.values:
        table.sparse_grad = config["mem_sparse_update"]
    optimizers = make_optimizers(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_iter = 0
    if checkpoint:
        if set(optimizers) != {name for name in ("optimizer", "value_optimizer") if name in checkpoint}:
            raise ConfigError(f"{ckpt_source} was trained with mem_sparse_update={not config['mem_sparse_update']}: "
                              "resume with the same setting")
        for name, optimizer in optimizers.items():
            settings = [{k: g[k] for k in ("peak_lr", "weight_decay", "betas")} for g in optimizer.param_groups]
            optimizer.load_state_dict(par.own_columns(checkpoint[name], model))
            for group, setting in zip(optimizer.param_groups, settings):  # the config, not the checkpoint, decides
                group.update(setting)
        torch.set_rng_state(checkpoint["rng_state"])
        start_iter = checkpoint["iter_num"]
    del checkpoint  # it holds every table and its moments whole: not to be kept in host memory all run
    value_params = list(model.values.parameters())
    value_ids = {id(p) for p in value_params}
    other_params = [p for p in model.parameters() if id(p) not in value_ids]
    wrapped = par.wrap(model)  # DDP, blind to the value tables
    step_model = torch.compile(wrapped) if config["compile"] else wrapped

    log = Logger(config["out_dir"]) if par.is_main else lambda *args, **fields: None
    counts = model.param_counts()
    tokens_per_iter = par.world * config["batch_size"] * config["block_size"] * config["gradient_accumulation_steps"]
    ranks = f", {par.world} ranks, tables split over groups of {par.mem_parallel}" if par.world > 1 else ""
    log("start", f"{counts['total']:,} parameters ({counts['active']:,} active per token), "
                 f"{model.flops_per_token():,} forward FLOPs per token, {tokens_per_iter:,} tokens per iter, "
                 f"{device.type} {str(dtype).removeprefix('torch.')}{ranks}, from iter {start_iter}",
        iter=start_iter, params=counts["total"], active_params=counts["active"],
        flops_per_token=model.flops_per_token(), tokens_per_iter=tokens_per_iter, device=device.type,
        world=par.world, mem_parallel=par.mem_parallel)

    def save(iter_num):
        """Every rank calls it: the tables' columns are gathered on rank 0, which writes."""
        state = {"model": par.full_model_state(model),
                 **{name: par.full_optimizer_state(optimizer) for name, optimizer in optimizers.items()}}
        if par.is_main:
            save_checkpoint({**state, "model_config": asdict(model_config), "config": config, "meta": meta,
                             "iter_num": iter_num, "rng_state": torch.get_rng_state()}, ckpt_path)

    stop = StopRequest()
    try:
        iter_num, t0, timed_iters = start_iter, time.time(), 0
        while True:
            factor = lr_factor(iter_num, config)
            for optimizer in optimizers.values():
                for g in optimizer.param_groups:
                    g["lr"] = g["peak_lr"] * factor
            if iter_num % config["eval_interval"] == 0 or iter_num == config["max_iters"]:
                losses = estimate_loss(step_model, splits, config, device, autocast, model_config.vocab_size, par,
                                       model.values)
                message = f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                message += "".join(f", values read {f:.1%} (KL from uniform {kl:.2f})" for f, kl in
                                   zip(losses.get("mem_read_fraction", []), losses.get("mem_kl_uniform", [])))
                if facts_sample:
                    with autocast:
                        losses.update(score_facts(model, facts_sample, device))
                    message += describe_scores(losses)
                log("eval", message, iter=iter_num, train_loss=losses.pop("train"), val_loss=losses.pop("val"),
                    **losses)
                if iter_num > start_iter or config["init_from"] == "scratch":
                    save(iter_num)
                t0, timed_iters = time.time(), 0  # time training steps only
            if iter_num >= config["max_iters"]:
                break

            generator = batch_generator(config["seed"], iter_num)
            loss_sum = 0.0
            micro_steps = config["gradient_accumulation_steps"]
            for micro_step in range(micro_steps):
                x, y = get_batch(splits["train"], config["batch_size"], config["block_size"], generator, device,
                                 model_config.vocab_size, par.rank, par.world)
                with par.sync(wrapped, last_micro_step=micro_step == micro_steps - 1):
                    with autocast:
                        loss = step_model(x, y)[1] / micro_steps
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            par.average_value_grads(model.values)
            loss_sum = par.mean(loss_sum)  # with the norms below, the same on every rank: all take the same branch
            for optimizer in optimizers.values():
                scaler.unscale_(optimizer)
            grad_norm = clip_grad_norm_(other_params, config["grad_clip"])
            value_grad_norm = clip_grad_norm_(value_params, config["mem_value_grad_clip"], par.mp_group)
            # the GradScaler skips non-finite fp16 steps itself; otherwise check (one host sync per step)
            if not scaler.is_enabled() and not torch.isfinite(loss_sum + grad_norm + value_grad_norm):
                message = (f"non-finite loss or gradient at iter {iter_num} (loss {float(loss_sum)}, gradient norm "
                           f"{float(grad_norm)}, value gradient norm {float(value_grad_norm)})")
                if config["nonfinite"] == "stop":
                    raise NonFiniteError(f"{message}; weights not updated, {ckpt_path} left as it was: resume "
                                         "from it with a lower learning_rate, or set nonfinite='skip'")
                log("skip", f"{message}: step skipped", iter=iter_num)
            else:
                for optimizer in optimizers.values():
                    scaler.step(optimizer)
                scaler.update()
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            timed_iters += 1

            if iter_num % config["log_interval"] == 0:
                loss_value = float(loss_sum)  # a host sync, only when logging
                dt = (time.time() - t0) / timed_iters
                t0, timed_iters = time.time(), 0
                log("train", f"iter {iter_num}: loss {loss_value:.4f}, {dt * 1000:.0f} ms/iter, "
                             f"{tokens_per_iter / dt:,.0f} tokens/s",
                    iter=iter_num, loss=loss_value, lr=config["learning_rate"] * factor,
                    grad_norm=float(grad_norm), value_grad_norm=float(value_grad_norm), ms_per_iter=dt * 1000,
                    tokens_per_s=tokens_per_iter / dt, peak_memory_mb=peak_memory_mb(device),
                    **model.routing_stats())
            signum = par.max(stop.signum or 0)  # a signal to any rank stops them all
            if signum:
                save(iter_num)
                name = signal.Signals(signum).name
                log("stop", f"{name}: stopped at iter {iter_num}, checkpoint written to {ckpt_path}; "
                            "continue with --init_from=resume", iter=iter_num, signal=name)
                sys.exit(128 + signum)
    finally:
        stop.restore()
    return model


def main(argv=None):
    try:
        train(load_config(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        sys.exit(f"error: {e}")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
