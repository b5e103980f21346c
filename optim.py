"""The optimizers of a GPT, among them a row-wise ("lazy") AdamW for the memory value tables.

Dense AdamW (the paper's optimiser) updates every row of an (N, v_dim) table every step, so a step costs
O(N * v_dim) however few rows the tokens read. RowAdamW updates only the rows that have a gradient this
step: each row keeps its own moments and its own step count, and is bias-corrected by that count, so a
row behaves exactly as if dense AdamW ran on it alone over the steps that touched it. Untouched rows and
their moments stay as they were (dense AdamW would keep moving them along their decaying momentum).
Weight decay is decoupled and lazy: a row is decayed by lr * weight_decay when it is updated.
The per-row counts are kept under the state key "step", which torch's load_state_dict leaves on the device it
was saved from (it moves only "step"s of fused or capturable optimizers): RowAdamW moves them after loading.
The per-row update gathers, updates and scatters three (rows, v_dim) tensors; torch.compile fuses that
into one pass over the touched rows, so it is compiled by default.

The optimizer decides the layout of a value table's gradient: RowAdamW marks the weights it updates
(mark_row_grads; make_optimizers marks SGD's too when asked for row updates), and a memory.ValueTable
gives a marked weight a sparse COO gradient of the rows read; every other weight gets a dense gradient.
The helpers here that handle gradients (clip_grad_norm_, all_reduce_grads_) take either layout.
"""
import warnings

import torch
import torch.distributed as dist


def mark_row_grads(params):
    """Mark params (value tables' weights) as updated by rows: the attribute `row_grads = True` on each,
    which memory.ValueTable reads to give them sparse row gradients. RowAdamW marks its own parameters;
    torch.optim.SGD (without momentum) also takes row gradients. A deepcopy of a Parameter drops the mark
    (torch copies no attributes of Parameters): mark the copy again."""
    for p in params:
        p.row_grads = True


def make_optimizers(model, kind="adamw", learning_rate=1e-3, value_lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95),
                    row_updates=False, fused=False):
    """The optimizers of a GPT's parameter groups (model.optimizer_groups), by name. kind 'adamw':
    {"optimizer": AdamW} over every group, or with row_updates AdamW without the value tables (if anything
    else trains) plus {"value_optimizer": RowAdamW} over them (touched rows only); kind 'sgd': {"optimizer":
    SGD} over every group, the tables undecayed (SGD takes row gradients undecayed only) and, with
    row_updates, given row gradients. fused: AdamW's fused kernels (CUDA)."""
    groups = model.optimizer_groups(weight_decay, learning_rate, value_lr)
    values = [g for g in groups if g["name"] == model.VALUE_GROUP]
    if kind == "sgd":
        for g in values:
            g["weight_decay"] = 0.0
            if row_updates:
                mark_row_grads(g["params"])
        return {"optimizer": torch.optim.SGD(groups)}
    rows = values if row_updates else []
    dense = [g for g in groups if all(g is not v for v in rows)]
    optimizers = {"optimizer": torch.optim.AdamW(dense, betas=betas, fused=fused)} if dense else {}
    if rows:  # finetune='smf' or 'values' with row updates train the tables only: no AdamW then
        optimizers["value_optimizer"] = RowAdamW(rows, betas=betas)
    return optimizers


def adamw_rows(param, exp_avg, exp_avg_sq, step, rows, grad, lr, beta1: float, beta2: float, eps: float,
               weight_decay: float):
    """torch.optim.AdamW's arithmetic on param[rows] (rows unique), with a bias correction per row."""
    step.index_add_(0, rows, torch.ones_like(rows, dtype=step.dtype))
    count = step[rows].unsqueeze(1)
    m = exp_avg[rows].lerp(grad, 1 - beta1)
    v = exp_avg_sq[rows] * beta2 + (1 - beta2) * grad * grad
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
    denom = v.sqrt() / (1 - beta2 ** count).sqrt() + eps
    new = param[rows].float() * (1 - lr * weight_decay) - (lr / (1 - beta1 ** count)) * m / denom
    param.index_copy_(0, rows, new.to(param.dtype))


class RowAdamW(torch.optim.Optimizer):
    """AdamW over the rows of 2-D parameters whose .grad is a sparse COO tensor (row indices only); it marks
    every parameter it is given (mark_row_grads), so that value tables give them that gradient.

    compile: fuse the row update with torch.compile (falls back to eager, with a warning, where it cannot).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, compile=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.update = torch.compile(adamw_rows, dynamic=True) if compile else adamw_rows
        self.register_load_state_dict_post_hook(_state_to_param_devices)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        mark_row_grads(self.param_groups[-1]["params"])

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ValueError("RowAdamW needs sparse row gradients (a value table gives them to the weights "
                                     "RowAdamW marks when it is built), got a dense one")
                grad = p.grad.coalesce()
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                # detached: views of the sparse tensor's own index and value tensors trip torch.compile
                args = (p, state["exp_avg"], state["exp_avg_sq"], state["step"], grad.indices()[0].detach(),
                        grad.values().detach().float(), torch.tensor(group["lr"], device=p.device), beta1, beta2,
                        group["eps"], group["weight_decay"])
                try:
                    self.update(*args)
                except Exception as e:  # no compiler on this machine, say: the eager update is the same
                    if self.update is adamw_rows:
                        raise
                    warnings.warn(f"RowAdamW: torch.compile failed ({type(e).__name__}), updating rows eagerly")
                    self.update = adamw_rows
                    self.update(*args)


def _state_to_param_devices(optimizer):
    """Every state tensor on its parameter's device (a resumed run's per-row step counts included)."""
    for p, state in optimizer.state.items():
        for key, value in state.items():
            state[key] = value.to(p.device)


def clip_grad_norm_(params, max_norm, group=None):
    """Clip params' gradients, dense or sparse rows, to a total norm of max_norm (0: only measure);
    returns the norm before clipping.

    Sparse row gradients are coalesced first (rows read by several layers or micro-steps summed), so the
    norm is that of the dense gradient, computed from the touched rows alone. group: the ranks holding
    the other column shards of params; the norm is then the whole table's, the same on each of them (a
    collective).
    """
    grads = []
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad.values())  # a view: clipping it clips the gradient
        elif p.grad is not None:
            grads.append(p.grad)
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    if group is not None:
        norm = norm.square()
        torch.distributed.all_reduce(norm, group=group)
        norm = norm.sqrt()
    if max_norm > 0:  # torch.nn.utils.clip_grad_norm_'s coefficient
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def all_reduce_grads_(params, group):
    """Sum params' gradients over the ranks of group, in place (a collective: every rank of group). Dense
    gradients are all-reduced; row gradients are all-gathered, since each rank read its own rows."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = _gather_rows(p.grad, group)
        elif p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def _gather_rows(grad, group):
    """A sparse row gradient summed over group: every rank's rows, padded to the longest for the gather."""
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(group.size())]
    dist.all_gather(sizes, torch.tensor([len(rows)], device=rows.device), group=group)
    longest = int(max(sizes))
    gathered_rows = [rows.new_empty(longest) for _ in sizes]
    gathered_values = [values.new_empty(longest, values.shape[1]) for _ in sizes]
    dist.all_gather(gathered_rows, torch.cat([rows, rows.new_zeros(longest - len(rows))]), group=group)
    dist.all_gather(gathered_values, torch.cat([values, values.new_zeros(longest - len(rows), values.shape[1])]),
                    group=group)
    rows = torch.cat([r[:int(n)] for r, n in zip(gathered_rows, sizes)])
    values = torch.cat([v[:int(n)] for v, n in zip(gathered_values, sizes)])
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, grad.shape, check_invariants=False).coalesce()
