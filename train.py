"""Train a GPT whose feed-forward blocks are dense, memory, MoE or PEER layers.

    python train.py configs/NAME.py [--key=value ...]
    torchrun --standalone --nproc_per_node=N train.py configs/NAME.py [--mem_parallel=M ...]

A config file is Python that assigns keys (config.py; `python train.py --help` lists every key with its
default and meaning); --key=value overrides win over every config file. Logs go to OUT_DIR/log.jsonl (one JSON object per event),
the checkpoint to OUT_DIR/ckpt.pt (a plain dict: torch.load(..., weights_only=True) reads it).
Under torchrun, batch_size is per rank, rank 0 alone logs and writes, and the value tables are split
by columns over groups of mem_parallel ranks (distributed.py); checkpoints do not depend on the layout.
"""
import json
import math
import os
import resource
import signal
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict

import torch

import distributed
from checkpoint import STATE, WEIGHTS, load_latest, open_run, save_checkpoint
from config import Config, gpt_config, load_config, pick_device, pick_dtype, usage
from data import batch_generator, get_batch, load_dataset, same_vocabulary
from errors import ConfigError, NumericsError, UserError
from facts import describe_scores, load_eval, score_facts
from finetune import SparseMemoryFinetune, document_frequency, inverse_document_frequency, merged_state, prepare
from memory import usage_stats
from model import GPT
from optim import clip_grad_norm_, make_optimizers


# ---- training ---------------------------------------------------------------------------------------
def lr_factor(step, config):
    """Linear warmup to 1, cosine decay to min_lr/learning_rate at lr_decay_iters, then flat."""
    decay_iters = config.lr_decay_iters or config.max_iters
    floor = config.min_lr / config.learning_rate
    if step < config.warmup_iters:
        return (step + 1) / (config.warmup_iters + 1)
    if step >= decay_iters:
        return floor
    progress = (step - config.warmup_iters) / max(1, decay_iters - config.warmup_iters)
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (1 - floor)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Logger:
    """Prints and appends JSON lines to out_dir/log.jsonl."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "log.jsonl")
        if os.path.exists(self.path):  # drop a line cut short by a crash, so every line parses
            self.write("rb+", lambda f: f.truncate(f.read().rfind(b"\n") + 1))

    def __call__(self, event, message=None, **fields):
        if message:
            print(message, flush=True)
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n"
        self.write("a", lambda f: f.write(line))

    def write(self, mode, action):
        """action(the log opened in mode); a write that fails (a full disk) is one line naming the file."""
        try:
            with open(self.path, mode) as f:
                action(f)
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror}: free disk space or choose another out_dir")


def duration(seconds):
    """3m40s, 1h05m, 12s: an ETA a person reads at a glance."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_details(config, device, dtype, world):
    """What the start event records besides sizes: the resolved config, versions, device and command line."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"config": dict(config), "torch": torch.__version__, "triton": triton_version,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "dtype": str(dtype).removeprefix("torch."), "command": [sys.executable, *sys.argv], "world": world}


def retained(config, meta):
    """(val split, facts sample) of facts_retain_dataset, which must share the run's vocabulary; None unset."""
    name = config.facts_retain_dataset
    if not name:
        return None
    splits, other = load_dataset(config.data_dir, name, config.block_size)
    if not same_vocabulary(meta, other):
        raise ConfigError(f"facts_retain_dataset '{name}' has another vocabulary than dataset '{config.dataset}': "
                          f"prepare it with `prepare_data.py text --input FILE --name {name} --vocab_from="
                          f"{config.dataset}` (facts: both with one command, facts --new_entities)")
    sample = load_eval(os.path.join(config.data_dir, name), config.facts_eval_size, meta["vocab_size"])
    return {"val": splits["val"]}, sample


def sparse_finetune(model, checkpoint, config, device, par):
    """finetune='smf': the row selection of finetune.SparseMemoryFinetune, with each row's idf from the
    sequences of smf_background_batches batches of the pretraining data (the dataset the checkpoint
    trained on, or smf_background_dataset, which must share its vocabulary), read with the checkpoint's
    weights; smf_idf=False ranks by tf alone. The dataset is recorded in config, so a resumed run reads
    the same one."""
    name = (config.smf_background_dataset or checkpoint["config"].get("smf_background_dataset")
            or checkpoint["config"]["dataset"])
    config.smf_background_dataset = name
    data, background = load_dataset(config.data_dir, name, config.block_size)
    if not same_vocabulary(checkpoint["meta"], background):  # its ids would mean other text than in pretraining
        run_dir = config.out_dir if config.init_from == "resume" else config.init_from
        raise ConfigError(f"smf_background_dataset '{name}' has another vocabulary than the checkpoint of {run_dir}: "
                          f"prepare the pretraining text again with `prepare_data.py text --input FILE --name {name} "
                          f"--vocab_from={run_dir}`, or set smf_background_dataset to a dataset in its vocabulary")
    data = data["train"]
    generator = torch.Generator().manual_seed(config.seed + 1)
    batches = (get_batch(data, config.batch_size, config.block_size, generator, device, par.rank, par.world)
               for _ in range(config.smf_background_batches))
    idf = (inverse_document_frequency(*document_frequency(model, batches, par.sum)) if config.smf_idf else
           [torch.ones(len(t.weight), dtype=torch.float64, device=device) for t in model.values])  # tf alone
    return SparseMemoryFinetune(model, idf, config.smf_rows, par.sum)


def starting_point(config, model_config, meta):
    """The checkpoint init_from names, and whether training continues it (optimizer, iteration, RNG).

    'scratch': (None, None, False). 'resume': out_dir's latest checkpoint, continued. Another run's out_dir:
    its latest checkpoint's weights only, for finetuning with a new optimizer, schedule and data.
    """
    if config.init_from == "scratch":
        if config.eval_only:
            raise ConfigError("eval_only=True evaluates a checkpoint: set init_from='resume' (out_dir's) or "
                              "init_from=<another run's out_dir>")
        return None, None, False
    resume = config.init_from == "resume"
    folder = config.out_dir if resume else config.init_from
    if not resume and not os.path.isdir(folder):
        raise ConfigError(f"init_from={folder!r} is not a folder: use 'scratch', 'resume' or another run's out_dir")
    checkpoint, source = load_latest(os.path.join(folder, "ckpt.pt"), keys=STATE if resume else WEIGHTS)
    old_meta = checkpoint.get("meta", {})
    if not same_vocabulary(old_meta, meta):
        raise ConfigError(f"{source} was trained on a {old_meta.get('tokenizer')} vocabulary of "
                          f"{old_meta.get('vocab_size')} ids ({old_meta.get('name')}) but dataset "
                          f"'{config.dataset}' has a {meta.get('tokenizer')} vocabulary of {meta.get('vocab_size')}: "
                          f"prepare the new data in its vocabulary with `prepare_data.py text --input FILE --name NAME "
                          f"--vocab_from={folder}`")
    now = asdict(model_config)
    differ = [f"{k}={v!r} in the checkpoint but {now.get(k)!r} now"
              for k, v in checkpoint["model_config"].items() if now.get(k) != v]
    if differ:
        raise ConfigError(f"config contradicts {source}: {'; '.join(differ)}")
    if resume and not config.eval_only and config.max_iters < checkpoint["iter_num"]:
        raise ConfigError(f"max_iters={config.max_iters} is below the iteration of {source}, "
                          f"{checkpoint['iter_num']}: write max_iters={checkpoint['iter_num']} or more to continue it, "
                          "or eval_only=True to evaluate it")
    return checkpoint, source, resume


class StopRequest:
    """Remembers a SIGTERM or SIGINT so that training can stop at the next micro-step, keep the last
    completed step and exit. A second signal of the same kind acts at once (the default handler is
    restored after the first)."""

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


def train(config):
    """Train as config (a dict) says; returns the model. Raises a UserError for bad input. The run works on
    a copy of config, so the caller's is left as it was; what the run holds (the out_dir lock) is let go
    however it ends."""
    with ExitStack() as held:
        return Trainer(Config(config), held).train()


class Trainer:
    """One training run: set up from its config (data, model, optimizers, the state it resumes), then
    evaluated once (eval_only) or trained to max_iters. Every rank makes one; rank 0 alone logs and writes."""

    def __init__(self, config, held):
        """held: an ExitStack, which lets go of out_dir's lock when the run ends."""
        torch.manual_seed(config.seed)
        self.config = config
        device = pick_device(config.device)
        self.dtype = dtype = pick_dtype(config.dtype, device)
        self.autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
        self.splits, self.meta = load_dataset(config.data_dir, config.dataset, config.block_size)
        self.facts_sample = load_eval(os.path.join(config.data_dir, config.dataset), config.facts_eval_size,
                                      self.meta["vocab_size"])
        self.retain = retained(config, self.meta)
        self.ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
        self.model_config = gpt_config(config, self.meta["vocab_size"])
        self.par = par = distributed.setup(config.mem_parallel, device, self.model_config)
        self.device = par.device
        if dtype == torch.float16 and par.world > 1:
            raise ConfigError("dtype='float16' skips steps on overflow rank by rank, so ranks would drift apart: "
                              "use 'bfloat16' or 'float32' with several processes")
        fresh = config.init_from != "resume" and not config.eval_only  # would replace out_dir's checkpoint
        held.enter_context(par.agree(lambda: open_run(config.out_dir, fresh, config.overwrite) if par.is_main
                                     else nullcontext()))  # rank 0 alone writes, so it alone locks out_dir
        checkpoint, self.source, self.resume = starting_point(config, self.model_config, self.meta)
        with torch.device(self.device):  # every weight initialised once, where it lives
            self.model = model = GPT(self.model_config, value_table=par.value_table)
        if checkpoint:
            model.load_state_dict(checkpoint["model"])  # a sharded table takes its columns of the whole one
        # smf's unselected rows must not move: under dense AdamW they would go on moving on their moments, and a
        # row selected late would get a step bias-corrected by the run's step count (docs/method.md section 6)
        config.mem_sparse_update |= config.finetune == "smf"
        self.smf = sparse_finetune(model, checkpoint, config, self.device, par) if config.finetune == "smf" else None
        prepare(model, config.finetune, config.lora_rank)  # freezes what this finetune mode does not train
        self.optimizers = make_optimizers(model, config.optimizer, config.learning_rate, config.mem_value_lr,
                                          config.weight_decay, (config.beta1, config.beta2),
                                          row_updates=config.mem_sparse_update, fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)
        self.start_iter = self.saved_iter = self.continue_from(checkpoint) if self.resume else 0
        self.value_params = [p for _, p in model.value_parameters()]
        self.other_params = [p for p in model.parameters() if all(p is not v for v in self.value_params)]
        self.wrapped = par.wrap(model)  # DDP, blind to the value tables
        self.step_model = torch.compile(self.wrapped) if config.compile else self.wrapped
        self.log = Logger(config.out_dir) if par.is_main else lambda *args, **fields: None
        self.tokens_per_iter = par.world * config.batch_size * config.block_size * config.gradient_accumulation_steps

    def continue_from(self, checkpoint):
        """Takes up the checkpoint's optimizer state and RNG; returns its iteration."""
        if set(self.optimizers) != {name for name in ("optimizer", "value_optimizer") if name in checkpoint}:
            raise ConfigError(f"{self.source} was trained with mem_sparse_update={not self.config.mem_sparse_update}: "
                              "resume with the same setting")
        for name, optimizer in self.optimizers.items():
            settings = [{k: g[k] for k in ("peak_lr", "weight_decay", "betas")} for g in optimizer.param_groups]
            optimizer.load_state_dict(self.par.own_columns(checkpoint[name], optimizer, self.model))
            for group, setting in zip(optimizer.param_groups, settings):  # the config, not the checkpoint, decides
                group.update(setting)
        torch.set_rng_state(checkpoint["rng_state"])
        return checkpoint["iter_num"]

    def train(self):
        """Evaluates (eval_only), or trains: each iteration sets the learning rate, evaluates and saves every
        eval_interval, takes a step and logs every log_interval. Returns the model."""
        config, log = self.config, self.log
        if config.eval_only:
            message, fields = self.evaluate(self.start_iter)
            log("eval", f"{self.source}: {message}", checkpoint=self.source, **fields)
            return self.model
        self.log_start()
        self.stop = StopRequest()
        try:
            iter_num, t0, timed_iters = self.start_iter, time.time(), 0
            while True:
                self.stop_if_signalled(iter_num)
                factor = lr_factor(iter_num, config)
                for optimizer in self.optimizers.values():
                    for g in optimizer.param_groups:
                        g["lr"] = g["peak_lr"] * factor
                if config.eval_interval and (iter_num % config.eval_interval == 0 or iter_num == config.max_iters):
                    message, fields = self.evaluate(iter_num)
                    log("eval", message, **fields)
                    if iter_num > self.start_iter or not self.resume:
                        self.save(iter_num, fields["val_loss"])
                    t0, timed_iters = time.time(), 0  # time training steps only
                if iter_num >= config.max_iters:
                    break
                loss, *norms = self.train_step(iter_num)
                iter_num, timed_iters = iter_num + 1, timed_iters + 1
                if iter_num % config.log_interval == 0:
                    loss = float(loss)  # a host sync, only when logging: it waits for the steps timed
                    dt, t0, timed_iters = (time.time() - t0) / timed_iters, time.time(), 0
                    self.log_train(iter_num, config.learning_rate * factor, loss, *norms, dt)
        finally:
            self.stop.restore()
        return self.model

    def train_step(self, iter_num):
        """One optimizer step over gradient_accumulation_steps micro-batches: (loss, gradient norm, value
        gradient norm), tensors that are read only when logged. A non-finite step stops the run or is
        skipped (nonfinite)."""
        config, par, scaler = self.config, self.par, self.scaler
        for table in self.model.values:  # outside the compiled step: its gradient buffer zeroed in place
            table.zero_grad()
        generator = batch_generator(config.data_seed or config.seed, iter_num)
        loss_sum = 0.0
        micro_steps = config.gradient_accumulation_steps
        for micro_step in range(micro_steps):
            if micro_step:  # the first was checked before the eval
                self.stop_if_signalled(iter_num)
            x, y = get_batch(self.splits["train"], config.batch_size, config.block_size, generator, self.device,
                             par.rank, par.world)
            with par.sync(self.wrapped, last_micro_step=micro_step == micro_steps - 1):
                with self.autocast:
                    loss = self.step_model(x, y)[1] / micro_steps
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        par.average_value_grads(self.value_params)
        if self.smf:
            self.smf.mask_gradients()
        loss_sum = par.mean(loss_sum)  # with the norms below, the same on every rank: all take the same branch
        for optimizer in self.optimizers.values():
            scaler.unscale_(optimizer)
        grad_norm = clip_grad_norm_(self.other_params, config.grad_clip)
        value_grad_norm = clip_grad_norm_(self.value_params, config.mem_value_grad_clip, par.mp_group)
        # the GradScaler skips non-finite fp16 steps itself; otherwise check (one host sync per step)
        if not scaler.is_enabled() and not torch.isfinite(loss_sum + grad_norm + value_grad_norm):
            message = (f"non-finite loss or gradient at iter {iter_num} (loss {float(loss_sum)}, gradient norm "
                       f"{float(grad_norm)}, value gradient norm {float(value_grad_norm)})")
            if config.nonfinite == "stop":
                raise NumericsError(f"{message}; weights not updated, {self.ckpt_path} left as it was: resume "
                                    "from it with a lower learning_rate, or set nonfinite='skip'")
            self.log("skip", f"{message}: step skipped", iter=iter_num)
        else:
            for optimizer in self.optimizers.values():
                scaler.step(optimizer)
            scaler.update()
            if self.smf:
                self.smf.measure_update()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm, value_grad_norm

    def evaluate(self, iter_num):
        """Losses on both splits, the value tables' usage and fact scores: (console line, log fields). With
        facts_retain_dataset, its val loss and facts too, with the prefix retain_ (what a finetuned model
        still knows)."""
        t0, model, autocast, device = time.time(), self.model, self.autocast, self.device
        fields = self.estimate_loss(self.splits, model.values)
        message = f"train loss {fields['train']:.4f}, val loss {fields['val']:.4f}"
        message += "".join(f", values read {f:.1%} (KL from uniform {kl:.2f})" for f, kl in
                           zip(fields.get("mem_read_fraction", []), fields.get("mem_kl_uniform", [])))
        if self.facts_sample:
            with autocast:
                fields.update(score_facts(model, self.facts_sample, device))
            message += describe_scores(fields)
        if self.retain:
            splits, sample = self.retain
            kept = {"val_loss": self.estimate_loss(splits, [])["val"]}
            message += f"; {self.config.facts_retain_dataset}: val loss {kept['val_loss']:.4f}"
            if sample:
                with autocast:
                    kept.update(score_facts(model, sample, device))
                message += describe_scores(kept)
            fields.update({f"retain_{k}": v for k, v in kept.items()})
        seconds = time.time() - t0
        fields = {"iter": iter_num, "train_loss": fields.pop("train"), "val_loss": fields.pop("val"), **fields,
                  "eval_s": seconds}
        return f"iter {iter_num}/{self.config.max_iters} eval ({seconds:.1f} s): {message}", fields

    @torch.no_grad()
    def estimate_loss(self, splits, tables):
        """Mean loss over eval_iters batches per split; the same batches at every eval, so evals compare.

        Every rank evaluates its part of each batch, then the means are averaged. On the val split the
        usage of tables is measured too (memory.usage_stats, one entry per table).
        """
        config, par, model = self.config, self.par, self.step_model
        model.eval()
        out = {}
        for split, data in splits.items():
            for table in tables:
                table.usage = torch.zeros(len(table.weight), device=self.device) if split == "val" else None
            generator = torch.Generator().manual_seed(config.seed)
            losses = []
            for _ in range(config.eval_iters):
                x, y = get_batch(data, config.batch_size, config.block_size, generator, self.device, par.rank,
                                 par.world)
                with self.autocast:
                    losses.append(model(x, y)[1].float())
            out[split] = par.mean(torch.stack(losses).mean()).item()
        stats = [usage_stats(par.sum(table.usage)) for table in tables]
        for table in tables:
            table.usage = None
        if stats:
            out.update({f"mem_{key}": [s[key] for s in stats] for key in stats[0]})
        model.train()
        return out

    def save(self, iter_num, val_loss=None):
        """Every rank calls it: the tables' columns are gathered on rank 0, which writes."""
        self.saved_iter = iter_num
        par, model = self.par, self.model
        state = {"model": par.full_model_state(model),
                 **{name: par.full_optimizer_state(optimizer, model) for name, optimizer in self.optimizers.items()}}

        def write():  # on rank 0; a failed write (a full disk) stops every rank alike
            if par.is_main:
                if self.config.finetune == "lora":
                    state["model"] = merged_state(state["model"], model)
                save_checkpoint({**state, "model_config": asdict(self.model_config), "config": dict(self.config),
                                 "meta": self.meta, "iter_num": iter_num, "val_loss": val_loss,
                                 "rng_state": torch.get_rng_state()}, self.ckpt_path)
        par.agree(write)

    def stop_if_signalled(self, iter_num):
        """Ends the run if any rank received a signal (every rank calls it, between micro-steps). One process
        reads its flag; under torchrun the ranks must agree, or those that stopped alone would leave the
        others waiting in a collective: one small all-reduce (a host sync) per micro-step, the price of
        stopping within a micro-step. The step in progress is abandoned (its gradients are never applied),
        so the weights, optimizer and RNG are those after iter_num steps; they are saved if a step completed
        since the last save."""
        signum = self.par.max(self.stop.signum or 0)
        if not signum:
            return
        name = signal.Signals(signum).name
        saved = iter_num != self.saved_iter
        if saved:
            self.save(iter_num)
        kept = f"checkpoint written to {self.ckpt_path}" if saved else "no step completed since the last save"
        self.log("stop", f"{name}: stopped at iter {iter_num}, {kept}; continue with --init_from=resume",
                 iter=iter_num, signal=name, saved=saved)
        sys.exit(128 + signum)

    def log_start(self):
        """The start event: the model's sizes, tokens per iter, where its weights come from, run_details."""
        model, par, device, dtype = self.model, self.par, self.device, self.dtype
        counts = model.param_counts()
        ranks = f", {par.world} ranks, tables split over groups of {par.mem_parallel}" if par.world > 1 else ""
        origin = (f"from iter {self.start_iter}" if self.resume else
                  f"weights of {self.source}" if self.source else "from scratch")
        self.log("start", f"{counts['total']:,} parameters ({counts['active']:,} active per token), "
                          f"{model.flops_per_token():,} forward FLOPs per token, {self.tokens_per_iter:,} tokens per "
                          f"iter, {device.type} {str(dtype).removeprefix('torch.')}{ranks}, {origin}",
                 iter=self.start_iter, params=counts["total"], active_params=counts["active"],
                 flops_per_token=model.flops_per_token(), tokens_per_iter=self.tokens_per_iter, device=device.type,
                 mem_parallel=par.mem_parallel, init_from=self.source,
                 **run_details(self.config, device, dtype, par.world))

    def log_train(self, iter_num, lr, loss, grad_norm, value_grad_norm, dt):
        """dt: seconds per iteration since the last eval or train log."""
        left, tokens_per_s = self.config.max_iters - iter_num, self.tokens_per_iter / dt
        self.log("train", f"iter {iter_num}/{self.config.max_iters} | loss {loss:.4f} | lr {lr:.2e} | "
                          f"{dt * 1000:.0f} ms/iter | {tokens_per_s / 1e3:,.1f}k tok/s | ETA {duration(dt * left)}",
                 iter=iter_num, loss=loss, lr=lr, grad_norm=float(grad_norm), value_grad_norm=float(value_grad_norm),
                 ms_per_iter=dt * 1000, tokens_per_s=tokens_per_s, peak_memory_mb=peak_memory_mb(self.device),
                 **self.model.routing_stats(), **(self.smf.stats() if self.smf else {}))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(usage())
        return
    try:
        train(load_config(argv))
        code = 0
    except UserError as e:
        code = f"error: {e}"
    except SystemExit as e:  # a signal's stop: 128 + its number
        code = 0 if e.code is None else e.code
    finally:
        joined = distributed.shutdown()
    if joined:
        # Skip the interpreter's teardown, which can abort (SIGABRT) while torch's C++ threads wind down and
        # turn a clean stop into a crash; everything this run writes is written and closed by now.
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
