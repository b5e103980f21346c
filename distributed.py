"""Training on several processes (torchrun): DDP for the dense weights, value tables split by columns.

    torchrun --standalone --nproc_per_node=N train.py configs/X.py [--mem_parallel=M]
    python tools/sizing.py configs/X.py --mem_parallel=M   # what each rank holds

The ranks form memory-parallel groups of M consecutive ranks (so a group stays inside a node when M
divides the GPUs per node). In a group each rank holds every row of each value table but only v_dim/M
of its columns (docs/method.md section 2); ranks holding the same columns in different groups are replicas.
Every other parameter is replicated on all ranks and averaged by DistributedDataParallel, which never
sees the tables. NCCL on GPUs, gloo on CPU.

A read (ShardedValueTable.forward) all-gathers the (indices, weights) of the group's tokens, bags all of
them on this rank's columns, and an all-to-all hands each rank its own tokens' rows at full width. The
backward runs the reverse all-to-all and reduce-scatters the weight gradients (partial sums over the
column shards) back to their tokens' ranks; a shard's own gradient sums the group's tokens. Once a step,
Parallel.average_value_grads divides it by the world size and sums it over the replicas: the mean over
all ranks' losses, which is what DDP makes of every other gradient.

Checkpoints hold each table whole, gathered on rank 0, so they load with any layout and on one CPU.
"""
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from errors import ConfigError, UserError
from memory import ValueTable
from optim import all_reduce_grads_

# torch 2.13 renamed the single-tensor collectives; older versions have only the old names
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class GatherTokens(torch.autograd.Function):
    """(n, ...) on each rank -> (M*n, ...): every token of the group, in rank order, on every rank.

    Backward: each rank's gradient of the gathered tensor is a partial sum (its own columns only), so a
    reduce-scatter sums them and hands each rank the rows of its own tokens.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty((group.size() * len(x), *x.shape[1:]))
        all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((len(grad) // ctx.group.size(), *grad.shape[1:]))
        reduce_scatter_single(out, grad.contiguous(), group=ctx.group)
        return out, None


def all_to_all(x, group):
    """Chunk j of x's rows goes to rank j of group; chunk i of the result came from rank i."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


class ColumnsToTokens(torch.autograd.Function):
    """(M*n, v_dim/M), the group's tokens on this rank's columns -> (n, v_dim), this rank's tokens whole.

    Backward: the same exchange the other way round.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        m, n = group.size(), len(x) // group.size()
        return all_to_all(x, group).view(m, n, -1).transpose(0, 1).reshape(n, -1)

    @staticmethod
    def backward(ctx, grad):
        m, n = ctx.group.size(), len(grad)
        return all_to_all(grad.reshape(n, m, -1).transpose(0, 1).reshape(m * n, -1), ctx.group), None


def take_columns(table, state_dict, prefix, *args):
    """load_state_dict pre-hook: checkpoints hold each table whole; a shard loads its columns of it."""
    key = prefix + "weight"
    if key in state_dict and state_dict[key].shape[-1] == table.v_dim:
        state_dict[key] = state_dict[key][:, table.columns]


class ShardedValueTable(ValueTable):
    """Columns [shard*v_dim/shards, (shard+1)*v_dim/shards) of a value table; reads go through `group`."""

    def __init__(self, num_values, v_dim, shard, shards, group):
        width = v_dim // shards
        super().__init__(num_values, v_dim, slice(shard * width, (shard + 1) * width))
        self.group = group
        self.register_load_state_dict_pre_hook(take_columns)

    def forward(self, indices, weights):
        """As ValueTable.forward; every rank of the group must read as many tokens (equal batch shapes)."""
        indices, weights = GatherTokens.apply(indices, self.group), GatherTokens.apply(weights, self.group)
        return ColumnsToTokens.apply(super().forward(indices, weights), self.group)  # this shard's columns


def value_state_ids(optimizer, model):
    """The state-dict ids of the value tables' parameters in optimizer, in table order (a state dict numbers
    the parameters of its groups in order)."""
    ids = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    return [ids[id(p)] for _, p in model.value_parameters() if id(p) in ids]


class Parallel:
    """This process's place in a run: `world` ranks, value tables split over groups of `mem_parallel`.

    One process without torchrun is world 1: then nothing is wrapped and no method runs a collective.
    Every method that does run one must be called by all ranks alike (each says so).
    """

    def __init__(self, device, rank=0, world=1, mem_parallel=1, mp_group=None, replica_group=None):
        self.device, self.rank, self.world, self.mem_parallel = device, rank, world, mem_parallel
        self.mp_group = mp_group  # the ranks that hold the other columns of this rank's tables
        self.replica_group = replica_group  # the ranks, one per group, that hold the same columns

    @property
    def is_main(self):
        """Rank 0 alone logs and writes files."""
        return self.rank == 0

    def value_table(self, num_values, v_dim):
        """The GPT's value_table factory: this rank's column shard of each table, or the table whole."""
        if self.mem_parallel == 1:
            return ValueTable(num_values, v_dim)
        return ShardedValueTable(num_values, v_dim, self.rank % self.mem_parallel, self.mem_parallel, self.mp_group)

    def wrap(self, model):
        """DDP over every parameter but the value tables (collective); the model itself on one process.

        DDP ignores the buffers too: they are rotary tables, computed alike on every rank, and
        broadcasting them each forward would only cost time (and break torch.compile's graph).
        """
        ignored = [name for name, _ in model.value_parameters()]
        if self.world == 1 or not any(p.requires_grad for n, p in model.named_parameters() if n not in ignored):
            return model  # one process, or only the tables train (finetune 'values', 'smf'): nothing to average
        ignored += [name for name, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def sync(self, wrapped, last_micro_step):
        """Context for a micro-step's forward and backward: DDP averages gradients on the last one only."""
        return wrapped.no_sync() if isinstance(wrapped, DistributedDataParallel) and not last_micro_step else nullcontext()

    def average_value_grads(self, params):
        """The tables' gradients made means over all ranks' losses, like DDP's (collective: every rank)."""
        if self.world == 1:
            return
        grads = [p for p in params if p.grad is not None]  # a frozen table (finetune='lora') has none
        for p in grads:
            p.grad.div_(self.world)
        if self.replica_group is not None:
            all_reduce_grads_(grads, self.replica_group)

    def mean(self, x):
        """x averaged over all ranks (collective: every rank)."""
        return self.sum(x) / self.world

    def sum(self, x):
        """x summed over all ranks (collective: every rank)."""
        if self.world == 1:
            return x
        x = x.detach().clone()
        dist.all_reduce(x)
        return x

    def agree(self, check):
        """check() on this rank; the UserError it raised on any rank is raised on every rank (the lowest
        rank's), so that a check only some ranks make (rank 0 locks out_dir and writes checkpoints) stops
        them all with one message instead of leaving the others waiting in the next collective.
        Returns check()'s result (collective: every rank)."""
        error = result = None
        try:
            result = check()
        except UserError as e:
            error = e
        if self.world > 1:
            errors = [None] * self.world
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise error
        return result

    def max(self, value):
        """The largest of every rank's int (collective: every rank)."""
        if self.world == 1:
            return value
        t = torch.tensor(value, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def full_model_state(self, model):
        """The model's state dict with each table whole, on rank 0; None elsewhere.

        Collective: every rank calls it; the first group's ranks send their columns to rank 0, the others
        hold replicas of them and send nothing.
        """
        state = model.state_dict()
        if self.mem_parallel > 1 and self.rank < self.mem_parallel:
            for name, p in model.value_parameters():
                state[name] = self.gather_columns(p.detach())
        return state if self.is_main else None

    def full_optimizer_state(self, optimizer, model):
        """An optimizer's state dict with the tables' moments whole, on rank 0; None elsewhere (collective,
        as full_model_state). Per-row state (RowAdamW's step counts) is the same on every shard."""
        state = optimizer.state_dict()
        if self.mem_parallel > 1 and self.rank < self.mem_parallel:
            for i in value_state_ids(optimizer, model):
                if i in state["state"]:  # a new dict: the optimizer's own state stays as it is
                    state["state"][i] = {name: self.gather_columns(t) if t.dim() == 2 else t
                                         for name, t in state["state"][i].items()}
        return state if self.is_main else None

    def gather_columns(self, shard):
        """The first group's column shards joined on rank 0's CPU (None on the senders), one shard on the
        wire at a time, so that rank 0's device never holds a whole table."""
        if not self.is_main:
            dist.send(shard.contiguous(), dst=0)
            return None
        width = shard.shape[1]
        whole = torch.empty(len(shard), width * self.mem_parallel, dtype=shard.dtype)
        whole[:, :width] = shard.cpu()
        received = torch.empty_like(shard)
        for src in range(1, self.mem_parallel):
            dist.recv(received, src=src)
            whole[:, src * width:(src + 1) * width] = received.cpu()
        return whole

    def own_columns(self, optimizer_state, optimizer, model):
        """A checkpoint's optimizer state (tables' moments whole) with each table's moments cut to the
        columns this rank holds; the model's tables cut their own weights as they load (take_columns)."""
        if self.mem_parallel > 1:
            for i, table in zip(value_state_ids(optimizer, model), model.values):
                if i in optimizer_state["state"]:
                    optimizer_state["state"][i] = {
                        name: t[:, table.columns].contiguous() if t.dim() == 2 else t
                        for name, t in optimizer_state["state"][i].items()}
        return optimizer_state


def setup(mem_parallel, device, model_config):
    """This process's Parallel, from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, ...).

    The layout is checked before any process group exists, so a bad one stops every rank at once with
    the same one-line error. On GPUs each rank takes cuda:LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1
    if mem_parallel < 1:
        raise ConfigError(f"mem_parallel must be at least 1, got {mem_parallel}")
    if world == 1 and mem_parallel > 1:
        raise ConfigError(f"mem_parallel={mem_parallel} splits the value tables over that many processes: launch "
                          f"with torchrun --nproc_per_node={mem_parallel} (or a multiple of it) train.py ...")
    if world % mem_parallel:
        raise ConfigError(f"mem_parallel={mem_parallel} must divide the number of processes, {world}")
    if model_config.memory_layers and model_config.mem_v_dim % mem_parallel:
        raise ConfigError(f"mem_parallel={mem_parallel} must divide mem_v_dim={model_config.mem_v_dim}: each rank "
                          "holds mem_v_dim/mem_parallel columns of the value tables")
    if world == 1:
        return Parallel(device)
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"training on several processes runs on cuda (NCCL) or cpu (gloo), not {device.type}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return joined(device, mem_parallel)


def joined(device, mem_parallel):
    """The Parallel of a process in an initialised process group: makes the memory-parallel groups of
    mem_parallel consecutive ranks and the groups of their replicas (collective: every rank)."""
    rank, world, m = dist.get_rank(), dist.get_world_size(), mem_parallel
    mp_group = replica_group = None
    if m > 1:
        mp_group, _ = dist.new_subgroups_by_enumeration([list(range(g, g + m)) for g in range(0, world, m)])
    if world > m:
        replica_group, _ = dist.new_subgroups_by_enumeration([list(range(s, world, m)) for s in range(m)])
    return Parallel(device, rank, world, m, mp_group, replica_group)


def shutdown():
    """Leave the process group if this process joined one (at exit, after an error too); whether it had."""
    if not dist.is_initialized():
        return False
    dist.destroy_process_group()
    return True
