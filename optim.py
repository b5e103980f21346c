"""A row-wise ("lazy") AdamW for the memory value tables, whose gradients arrive as touched rows only.

Dense AdamW (the paper's optimiser) updates every row of an (N, v_dim) table every step, so a step costs
O(N * v_dim) however few rows the tokens read. RowAdamW updates only the rows that have a gradient this
step: each row keeps its own moments and its own step count, and is bias-corrected by that count, so a
row behaves exactly as if dense AdamW ran on it alone over the steps that touched it. Untouched rows and
their moments stay as they were (dense AdamW would keep moving them along their decaying momentum).
Weight decay is decoupled and lazy: a row is decayed by lr * weight_decay when it is updated.
"""
import torch


class RowAdamW(torch.optim.Optimizer):
    """AdamW over the rows of 2-D parameters whose .grad is a sparse COO tensor (row indices only)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ValueError("RowAdamW needs sparse row gradients (the value table's sparse_grad mode)")
                grad = p.grad.coalesce()
                rows, g = grad.indices()[0], grad.values().float()
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                step = state["step"].index_add_(0, rows, torch.ones_like(rows, dtype=torch.float32))[rows]
                m = state["exp_avg"][rows].lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                # torch.optim.AdamW's arithmetic, with a bias correction per row
                step_size = (group["lr"] / (1 - beta1 ** step)).unsqueeze(1)
                denom = (v.sqrt() / (1 - beta2 ** step).sqrt().unsqueeze(1)).add_(group["eps"])
                new = p[rows].float().mul_(1 - group["lr"] * group["weight_decay"]).sub_(step_size * m / denom)
                p.index_copy_(0, rows, new.to(p.dtype))


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
