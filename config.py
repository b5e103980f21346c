"""Training settings: the keys and their defaults, config files and --key=value overrides, device and dtype.

A config file is Python that assigns keys; config files apply in the order given, then the command
line's --key=value overrides (which always win, wherever they stand). A config file may start from another
with include("other.py") (a path relative to its own folder): the keys assigned after it win. Every key is a field of TrainConfig
below or of model.GPTConfig; its comment there is its help text (`python train.py --help` prints them).
"""
import ast
import difflib
import inspect
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields

import torch

from data import DATASET_NAME, is_dataset_name
from errors import ConfigError
from finetune import FINETUNE_MODES
from model import GPTConfig


@dataclass
class TrainConfig:
    # data and output
    dataset: str = "shakespeare"  # folder under data_dir made by prepare_data.py
    data_dir: str = "data"  # where datasets live
    out_dir: str = "out"  # checkpoints and log.jsonl of this run
    init_from: str = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt), or another run's out_dir (its weights only)
    eval_only: bool = False  # evaluate the checkpoint init_from names (losses, fact scores) and stop
    overwrite: bool = False  # allow a scratch run into an out_dir that holds another run's checkpoint (replaced)
    # loop
    max_iters: int = 2000  # optimizer steps in all
    eval_interval: int = 250  # iterations between evals (and checkpoints); 0: neither (a run timed only)
    eval_iters: int = 20  # batches per split at each eval
    facts_eval_size: int = 500  # question/answer pairs of each kind scored at each eval when the dataset has them
    log_interval: int = 10  # iterations between train log lines
    batch_size: int = 16  # sequences per micro-step (per rank under torchrun)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    # AdamW and schedule: linear warmup, cosine decay to min_lr at lr_decay_iters (0: max_iters)
    learning_rate: float = 1e-3  # peak learning rate of every weight but the value tables
    min_lr: float = 1e-4  # learning rate at the end of the decay
    warmup_iters: int = 100  # iterations of linear warmup
    lr_decay_iters: int = 0  # iteration where the cosine decay ends (0: max_iters)
    weight_decay: float = 0.1  # AdamW's decoupled weight decay (not on biases and norm gains)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max norm of every gradient but the value tables' (0: off)
    mem_value_lr: float = 1e-2  # peak lr of the value tables, same schedule
    mem_value_grad_clip: float = 1.0  # max norm of the value tables' gradient, clipped on its own (0: off)
    mem_sparse_update: bool = False  # value tables: touched-row gradients and RowAdamW instead of dense AdamW (always with finetune='smf')
    nonfinite: str = "stop"  # a non-finite loss or gradient: 'stop' (weights untouched) or 'skip' the step
    # system
    device: str = "auto"  # 'auto': cuda, then mps, then cpu
    dtype: str = "auto"  # 'float32', 'bfloat16', 'float16' (autocast); 'auto': bfloat16 on cuda if supported
    compile: bool = False  # torch.compile the model
    seed: int = 1337  # weights' initialisation (and the order of batches unless data_seed is set)
    data_seed: int = 0  # the order of training batches (0: seed), to tell a seed's initialisation from its data order
    mem_parallel: int = 1  # under torchrun: ranks per group that splits the value tables by columns
    vocab_multiple: int = 1  # the model's vocabulary rounded up to a multiple of this (64 suits GPU matmuls)
    # finetuning a trained model (finetune.py, docs/method.md section 6)
    finetune: str = "full"  # what trains: 'full' (every weight), 'lora', 'values' (the value tables), 'smf'
    optimizer: str = "adamw"  # 'adamw', or 'sgd' (plain SGD, no momentum: the sparse memory finetuning paper's)
    lora_rank: int = 8  # rank of the adapters on the attention and dense FFN projections (finetune='lora')
    smf_rows: int = 2000  # value rows per table updated each step: the batch's top rows by tf-idf (finetune='smf')
    smf_background_batches: int = 50  # pretraining batches whose reads give each row's idf (finetune='smf')
    smf_idf: bool = True  # rank rows by tf * idf; False: by tf alone (an ablation)
    smf_background_dataset: str = ""  # those batches' dataset ('': the one the init_from checkpoint trained on)
    facts_retain_dataset: str = ""  # another dataset whose val loss and facts are also scored at each eval (retain_*)


MODEL_KEYS = [f.name for f in fields(GPTConfig) if f.name != "vocab_size"]  # vocab_size comes from the data
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def one_of(*choices):
    return lambda v, c: v in choices, " or ".join(map(repr, choices))


RULES = {  # key: (test of its value in the whole config, the allowed values in words, filled from the config)
    **{k: (lambda v, c: v >= 1, "at least 1") for k in (
        "batch_size", "log_interval", "eval_iters", "gradient_accumulation_steps", "mem_parallel",
        "lora_rank", "smf_rows", "smf_background_batches")},
    **{k: (lambda v, c: v >= 0, "at least 0") for k in (
        "max_iters", "eval_interval", "warmup_iters", "facts_eval_size", "weight_decay", "grad_clip",
        "mem_value_grad_clip")},
    **{k: (lambda v, c: v > 0, "above 0") for k in ("learning_rate", "mem_value_lr", "rope_theta", "norm_eps")},
    **{k: (lambda v, c: 0 <= v < 1, "in [0, 1)") for k in ("beta1", "beta2")},
    **{k: (lambda v, c: 0 <= v < 2**32, "in [0, 2**32)") for k in ("seed", "data_seed")},
    "min_lr": (lambda v, c: 0 <= v <= c["learning_rate"], "in [0, learning_rate={learning_rate}]"),
    "lr_decay_iters": (lambda v, c: v == 0 or v >= c["warmup_iters"],
                       "0 (decay until max_iters) or at least warmup_iters={warmup_iters}"),
    "nonfinite": one_of("stop", "skip"),
    "optimizer": one_of("adamw", "sgd"),
    "finetune": one_of(*FINETUNE_MODES),  # and what each needs of init_from, checked after (validate)
    "dtype": one_of("auto", "float32", "bfloat16", "float16"),
    "device": (lambda v, c: DEVICE_NAME.fullmatch(v), "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    **{k: (lambda v, c: v.strip() != "", "a name, not empty") for k in ("data_dir", "out_dir", "init_from")},
    "dataset": (lambda v, c: is_dataset_name(v), DATASET_NAME),
    **{k: (lambda v, c: v == "" or is_dataset_name(v), "'' (unset) or " + DATASET_NAME)
       for k in ("facts_retain_dataset", "smf_background_dataset")},
}


class Config(dict):
    """A train config: a dict whose keys also read and write as attributes (config.max_iters)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key '{key}'") from None

    def __setattr__(self, key, value):
        self[key] = value


def default_config():
    config = Config(asdict(TrainConfig()))
    config.update({f.name: f.default for f in fields(GPTConfig) if f.name in MODEL_KEYS})
    return config


def gpt_config(config, vocab_size):
    """The GPTConfig of a train config, for a dataset vocabulary of vocab_size (rounded up to vocab_multiple:
    the extra ids never occur in the data, so the model learns never to predict them)."""
    multiple = config.get("vocab_multiple", 1)
    return GPTConfig(vocab_size=-(-vocab_size // multiple) * multiple, **{k: config[k] for k in MODEL_KEYS})


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


def read_config_file(path):
    """The keys a config file assigns (at least one), or a one-line ConfigError naming the file."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}")
    try:
        json.loads(source)
    except ValueError:
        pass  # not JSON: Python, as it should be
    else:
        raise ConfigError(f"config file {path} is JSON, not Python: write its keys as Python assignments such "
                          "as dataset = 'shakespeare_char' (`python train.py --help` lists the keys)")
    namespace = {"include": lambda name: namespace.update(read_config_file(os.path.join(os.path.dirname(path), name)))}
    try:
        exec(compile(source, path, "exec"), namespace)
    except SyntaxError as e:
        raise ConfigError(f"config file {path} line {e.lineno}: {e.msg}")
    except ConfigError:  # an included file's own one-line error
        raise
    except Exception as e:
        raise ConfigError(f"config file {path} fails to run ({type(e).__name__}: {e})")
    keys = {k: v for k, v in namespace.items()
            if not k.startswith("_") and k != "include" and type(v).__name__ != "module"}
    if not keys:  # an empty file, bare expressions: nothing would change, so it is surely a mistake
        raise ConfigError(f"config file {path} assigns no config key: write Python assignments such as "
                          "dataset = 'shakespeare_char' (`python train.py --help` lists the keys)")
    return keys


def parse_override(arg):
    """--key=value -> (key, value): a Python literal, else the bare string (--dataset=shakespeare)."""
    key, sep, text = arg[2:].partition("=")
    if not sep or not key:
        raise ConfigError(f"override {arg!r} must look like --key=value")
    try:
        return key, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return key, text


def load_config(argv):
    """Defaults, then the config files of argv in order, then its --key=value overrides in order."""
    config = default_config()
    for path in [a for a in argv if not a.startswith("--")]:
        for key, value in read_config_file(path).items():
            set_key(config, key, value, path)
    for arg in [a for a in argv if a.startswith("--")]:
        set_key(config, *parse_override(arg), "command line")
    validate(config)
    return config


def validate(config):
    """Every setting in its meaningful range, and the model it builds (GPTConfig.validate), before anything
    is created on disk: a ConfigError naming the key, its value, the range and a value to write instead."""
    defaults = default_config()
    for key, value in config.items():
        ok, allowed = RULES.get(key, (lambda v, c: True, None))
        if isinstance(value, float) and not math.isfinite(value):
            ok, allowed = (lambda v, c: False), "a finite number"
        if not ok(value, config):
            instead = next((v for v in (defaults[key], 0) if ok(v, config)), defaults[key])
            raise ConfigError(f"{key}={value!r} must be {allowed.format(**config)}: write e.g. {key}={instead!r}")
    mode, start = config.finetune, config.init_from
    if mode != "full" and start == "scratch":
        raise ConfigError(f"finetune={mode!r} needs a trained model to start from, but init_from='scratch': set "
                          "init_from=<a trained run's out_dir>, or finetune='full' to train from scratch")
    if mode == "lora" and start == "resume":
        raise ConfigError("finetune='lora' cannot resume (its checkpoints hold the merged weights): set "
                          "init_from=<the out_dir it finetuned> to finetune again")
    gpt_config(config, GPTConfig.vocab_size)  # the vocabulary comes from the data, later


def pick_device(name):
    """The torch.device for a device setting; a one-line error when its backend is missing here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if not DEVICE_NAME.fullmatch(name):
        raise ConfigError(f"device={name!r} must be {RULES['device'][1]}: write e.g. device='auto'")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but this torch sees no CUDA device: use device='auto' or 'cpu' (or "
                          "install a CUDA build of torch)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r} but there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r} but MPS is not available here: use device='auto' or 'cpu'")
    return device


def pick_dtype(name, device):
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def key_help():
    """(section, key, default, meaning) of every key, from the comments beside the config dataclasses' fields."""
    rows = []
    for cls in (TrainConfig, GPTConfig):
        section = cls.__name__
        defaults = {f.name: f.default for f in fields(cls)}
        for line in inspect.getsource(cls).splitlines():
            heading = re.match(r"\s+# (.*)", line)
            field = re.match(r"\s+(\w+): \w+ = .*?(?:  # (.*))?$", line)
            if heading:
                section = heading.group(1)
            elif field and field.group(1) in defaults and field.group(1) != "vocab_size":
                rows.append((section, field.group(1), defaults[field.group(1)], field.group(2) or ""))
    return rows


def usage():
    """`python train.py --help`: usage, config-file syntax and every key with its default and meaning."""
    lines = ["usage: python train.py [CONFIG.py ...] [--key=value ...]",
             "       torchrun --standalone --nproc_per_node=N train.py CONFIG.py [--mem_parallel=M ...]", "",
             "A config file is Python that assigns keys (dataset = 'shakespeare_char', memory_layers = (1, 3, 5)).",
             "Config files apply in order, then every --key=value override (a Python literal or a bare string).",
             "Outputs: OUT_DIR/ckpt.pt, OUT_DIR/ckpt.prev.pt and OUT_DIR/log.jsonl.", ""]
    section = None
    for where, key, default, meaning in key_help():
        if where != section:
            section = where
            lines += ["", f"{section}:"]
        lines.append(f"  {key:<28} {default!r:<14} {meaning}")
    return "\n".join(lines)
