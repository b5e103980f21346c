"""Learning new facts without forgetting: sparse memory finetuning (Lin et al. 2025, arXiv 2510.15103).

A pretrained memory model is finetuned on new data by updating only the value rows that the new data
reads unusually often; everything else stays frozen, so what the model knew is mostly left in place
(docs/method.md section 6). Per table and finetuning step:

    c(i)   = reads of row i by the step's batch (all tokens, heads, and memory layers sharing the table)
    tf(i)  = c(i) / sum_j c(j)
    df(i)  = number of background (pretraining) documents, out of D, that read row i; a document is one
             sequence of a background batch
    idf(i) = log((D + 1) / (df(i) + 1))
    train the top `rows` rows by tf(i) * idf(i) (ties: the lower row first; rows scoring 0 never)

A row scoring 0 was either not read (it has no gradient anyway) or read by every background batch, the
rows the method exists to protect. The baselines are the other FINETUNE_MODES: "full" (every parameter),
"values" (all of every value table) and "lora" (low-rank adapters on the attention and dense FFN
projections).

How a training loop uses it (the caller builds the optimizer from what prepare returns):

    params = prepare(model, mode, lora_rank)                    # before DDP and torch.compile
    if mode == "smf":
        idf = inverse_document_frequency(*document_frequency(model, background_batches, par.sum))
        smf = SparseMemoryFinetune(model, idf, rows=500, reduce=par.sum)
    per step: forward + backward over the micro-steps (reads are counted as they happen),
              par.average_value_grads(...), smf.mask_gradients(), clipping, optimizer.step()

Optimizers. "full" and "lora": any, e.g. AdamW on model.optimizer_groups (frozen parameters get no
gradient, so AdamW skips them). "values": SGD, AdamW or optim.RowAdamW on the tables. "smf":
mask_gradients keeps only the selected rows' gradients (ValueTable.keep_grad_rows); then exactly the
selected rows move under torch.optim.SGD without momentum, or under optim.RowAdamW, which bias-corrects
each row by its own steps and decays only the rows it updates (train.py gives smf one of these two, with
row updates: optim.make_optimizers). Under dense torch.optim.AdamW a row would keep moving on its
moments after it leaves the selection, and a row first selected at step t would take a step of about
sqrt(1 - beta2**t) / (1 - beta1**t) lr instead of lr. "values" and "smf" leave DDP nothing to average (the
tables are not DDP's): do not wrap the model in DDP then.

Under torchrun with column-sharded tables each rank counts its own tokens' reads; `reduce` (par.sum of
distributed.Parallel) sums the counts over ranks, so every rank ranks the same rows, those of the whole
batch. Read counting is tested eagerly, not under torch.compile.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import ConfigError

FINETUNE_MODES = ("full", "lora", "values", "smf")


class ReadCounts:
    """c(i) of every value table of a GPT, counted by a forward pre-hook on each table: a table's forward
    gets (indices, weights), indices (tokens, heads*knn), once per memory layer call, so the count covers
    every layer that shares the table. With grad_only, forwards without autograd (evaluation) are not
    counted: they make no gradient to mask."""

    def __init__(self, model, grad_only=False):
        self.grad_only, self.tables = grad_only, list(model.values)
        self.counts = [None] * len(self.tables)
        self.handles = [table.register_forward_pre_hook(self.hook(k)) for k, table in enumerate(self.tables)]

    def hook(self, k):
        def count(table, inputs):
            if self.grad_only and not torch.is_grad_enabled():
                return
            indices = inputs[0].flatten()
            if self.counts[k] is None:
                self.counts[k] = torch.zeros(len(table.weight), dtype=torch.long, device=indices.device)
            self.counts[k].index_add_(0, indices, torch.ones_like(indices, dtype=torch.long))
        return count

    def take(self, reduce=None):
        """The counts since the last take, summed by reduce (over ranks) when given; counting restarts."""
        counts = [c if c is not None else torch.zeros(len(t.weight), dtype=torch.long, device=t.weight.device)
                  for c, t in zip(self.counts, self.tables)]
        self.counts = [None] * len(self.tables)
        return [reduce(c) for c in counts] if reduce else counts

    def remove(self):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def document_frequency(model, batches, reduce=None):
    """([df per table], D): in how many of the D background documents each row is read. A document is one
    sequence of a batch (token ids (batch, T), or (ids, targets)), whichever memory layer read the row.
    A whole batch would be too long a document: at 4,096 tokens it reads most rows of a 64k table, so df
    saturates at D and idf is 0 for the rows new data reads too (docs/method.md section 6). Run it under
    the training run's autocast, where the search may pick other rows; under torchrun every rank passes
    its own part of the same batches and reduce=par.sum."""
    reads = [[] for _ in model.values]  # per table, this batch's (document, row) keys of every layer

    def hook(k):
        def record(table, inputs):
            rows = inputs[0].reshape(documents, -1).long()  # a layer's reads are (tokens, heads*knn), batch-major
            reads[k].append(rows + len(table.weight) * torch.arange(documents, device=rows.device)[:, None])
        return record

    handles = [table.register_forward_pre_hook(hook(k)) for k, table in enumerate(model.values)]
    was_training, n = model.training, 0
    df = [torch.zeros(len(t.weight), dtype=torch.long, device=t.weight.device) for t in model.values]
    model.eval()
    try:
        for batch in batches:
            ids = batch[0] if isinstance(batch, (tuple, list)) else batch
            documents = len(ids)
            model(ids)
            for k, table in enumerate(model.values):
                if reads[k]:
                    read = torch.cat(reads[k]).flatten().unique() % len(table.weight)  # a row once per document
                    df[k] += torch.bincount(read, minlength=len(table.weight))
                reads[k] = []
            n += documents
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not n:
        raise ValueError("document_frequency needs at least one background batch")
    if reduce:
        df = [reduce(d) for d in df]
        n = int(reduce(torch.tensor(n, device=df[0].device if df else "cpu")))
    return df, n


def inverse_document_frequency(df, n_documents):
    """idf(i) = log((D + 1) / (df(i) + 1)), fp64, per table: 0 for rows every background document reads."""
    return [torch.log((n_documents + 1) / (d.double() + 1)) for d in df]  # exactly 0 where df = D


def select_rows(counts, idf, rows):
    """The top `rows` rows by tf * idf with a positive score, best first, the lower row first among equals."""
    score = counts.double() / counts.sum().clamp(min=1) * idf.to(counts.device)
    order = torch.sort(score, descending=True, stable=True).indices[:rows]
    return order[score[order] > 0]


class SparseMemoryFinetune:
    """Counts each step's reads (training forwards only) and restricts the tables' gradients to the rows
    select_rows picks: call mask_gradients() after the step's last backward, before clipping and the step,
    and measure_update() after the step. stats() says why a finetune learns or does not (per table): the
    share of rows at idf 0 (never selectable), the rows the step read, the share of its reads and of its
    value-gradient norm that fall in the selected rows, the selected rows' update against their norm, and
    the rows selected at least once so far."""

    def __init__(self, model, idf, rows, reduce=None):
        if len(idf) != len(model.values):
            raise ValueError(f"{len(idf)} idf vectors for {len(model.values)} value tables")
        self.tables, self.idf, self.rows, self.reduce = list(model.values), idf, rows, reduce
        self.counter = ReadCounts(model, grad_only=True)
        self.selected = None  # the rows of each table that the last mask_gradients kept
        self.measures = []  # per table, the last step's measures (tensors: stats() reads them)
        self.before = []  # per table, the selected rows before the step (measure_update compares)
        self.changed = [torch.zeros(len(t.weight), dtype=torch.bool, device=t.weight.device) for t in self.tables]

    @torch.no_grad()
    def mask_gradients(self):
        """Restrict each table's gradient to its selected rows; returns [selected rows per table]."""
        self.selected, self.measures, self.before = [], [], []
        for table, counts, idf, changed in zip(self.tables, self.counter.take(self.reduce), self.idf, self.changed):
            rows = select_rows(counts, idf, self.rows).to(table.weight.device)
            self.selected.append(rows)
            changed[rows] = True
            measures = {"rows_read": (counts > 0).sum(), "read_mass": counts[rows].sum() / counts.sum().clamp(min=1)}
            self.before.append(table.weight[rows].clone())
            self.measures.append(measures)
            share = table.keep_grad_rows(rows)
            if share is not None:
                measures["grad_share"] = share
        return self.selected

    @torch.no_grad()
    def measure_update(self):
        """After the optimizer step: how far the selected rows moved, against their norm before it."""
        for table, rows, before, measures in zip(self.tables, self.selected, self.before, self.measures):
            measures["update_ratio"] = (table.weight[rows] - before).norm() / before.norm().clamp(min=1e-30)

    def stats(self):
        """The last step's measures as log fields, a list (one entry per table) under smf_<name>."""
        out = {f"smf_{key}": [float(m[key]) for m in self.measures] for key in self.measures[0]} if self.measures else {}
        out["smf_idf_zero"] = [float((idf == 0).double().mean()) for idf in self.idf]
        out["smf_rows_changed"] = [int(changed.sum()) for changed in self.changed]
        return out

    def remove(self):
        self.counter.remove()


class LoRALinear(nn.Module):
    """W x + (alpha / r) B A x around a frozen nn.Linear: A (r, in) small random, B (out, r) zero, so the
    model is unchanged until B learns; merge() folds the product into W for a plain checkpoint."""

    def __init__(self, base, rank, alpha=None):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), (alpha or rank) / rank
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init, as PEFT does

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)

    @torch.no_grad()
    def merge(self):
        """The base Linear with W + (alpha / r) B A."""
        self.base.weight += self.scale * (self.lora_b @ self.lora_a)
        return self.base


def add_lora(model, rank, alpha=None):
    """Wrap the Linears each module names in its lora_targets (model.py: the attention projections qkv and
    proj, the dense SwiGLU FFNs' w1, w2, w3) in LoRALinear."""
    for module in list(model.modules()):
        for name in getattr(module, "lora_targets", ()):
            setattr(module, name, LoRALinear(getattr(module, name), rank, alpha))


def merge_lora(model):
    """Fold every adapter into its Linear, in place: the model's state dict is a plain GPT's again. (To
    checkpoint mid-run, merge a copy.deepcopy of the model.)"""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merge())
    return model


def merged_state(state, model):
    """The state dict `state` of model, adapters folded into their Linears: a plain GPT's, as checkpoints
    and sample.py want it, without copying the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            weight = state.pop(f"{name}.base.weight")
            delta = state.pop(f"{name}.lora_b") @ state.pop(f"{name}.lora_a")
            state[f"{name}.weight"] = weight + module.scale * delta
    return state


def prepare(model, mode, lora_rank=8, lora_alpha=None):
    """Freeze the model for a finetuning mode and return the parameters to optimise: every one ("full"),
    the value tables ("values", "smf": smf's row masking is SparseMemoryFinetune's), or new adapters ("lora")."""
    if mode not in FINETUNE_MODES:
        raise ConfigError(f"finetune mode {mode!r} is not one of {', '.join(FINETUNE_MODES)}")
    if mode in ("values", "smf") and not len(model.values):
        raise ConfigError(f"finetune mode {mode!r} trains memory values, but the model has no memory layers")
    model.requires_grad_(mode == "full")
    if mode in ("values", "smf"):
        for _, p in model.value_parameters():
            p.requires_grad_(True)
    if mode == "lora":
        add_lora(model, lora_rank, lora_alpha)
    return [p for p in model.parameters() if p.requires_grad]
