"""Mixture-of-experts feed-forward: SwiGLU experts behind a token-choice top-k router, dropless.

The router (fp32) gives each token a softmax over all experts and sends it to its top_k; the gates are
those probabilities renormalised to sum to 1. At top_k=1 that would be a constant 1 and the router would
learn from the auxiliary losses alone, so top-1 keeps the raw probability as its gate (Switch Transformer).

Dispatch is dropless: the (token, choice) slots are sorted by expert, each expert runs once on its
contiguous slice, and the gate-weighted outputs are added back to their tokens. No capacity factor, no
token dropped; the price is one host sync per layer for the slice sizes.

Auxiliary losses: the Switch load-balancing loss, num_experts * sum_e f_e * P_e with f_e the fraction of
slots routed to expert e and P_e its mean router probability (1.0 for uniform routing, up to num_experts
when one expert takes everything), and the router z-loss (ST-MoE), the mean squared logsumexp of the logits,
which keeps them small. Expert-choice routing is not offered: there an expert picks its tokens from the
whole batch, so a token's output depends on later tokens, which a causal model cannot see when generating.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import need


class MoE(nn.Module):
    """num_experts SwiGLU experts (dim -> hidden -> dim); each token runs through top_k of them.

    After every forward, balance_loss and z_loss (in the graph) and expert_fractions (the share of slots
    each expert got) hold that batch's routing; aux_loss() is what the model adds to its training loss.
    out_std: init std of the experts' output projections (the model scales them with depth).
    """

    reads = ()  # forward takes x alone (model.py's FFN_KINDS)

    def __init__(self, dim, hidden, num_experts, top_k, aux_loss_weight=0.0, z_loss_weight=0.0, out_std=0.02):
        super().__init__()
        self.dim, self.hidden, self.num_experts, self.top_k = dim, hidden, num_experts, top_k
        self.aux_loss_weight, self.z_loss_weight, self.out_std = aux_loss_weight, z_loss_weight, out_std
        self.router = nn.Linear(dim, num_experts, bias=False)
        # expert e computes w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x)); each slice is laid out like nn.Linear.weight
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.balance_loss = self.z_loss = self.expert_fractions = None
        self.reset_parameters()

    @classmethod
    def from_config(cls, c):
        """The MoE of a GPTConfig (its moe_* settings), output projections scaled with depth."""
        return cls(c.n_embd, c.moe_hidden, c.moe_num_experts, c.moe_top_k, c.moe_aux_loss_weight,
                   c.moe_z_loss_weight, out_std=c.residual_std)

    @staticmethod
    def check_config(c):
        for name in ("moe_num_experts", "moe_top_k", "moe_hidden"):
            need(getattr(c, name) > 0, f"{name} must be positive, got {getattr(c, name)}")
        need(c.moe_top_k <= c.moe_num_experts,
             f"moe_top_k={c.moe_top_k} must be at most moe_num_experts={c.moe_num_experts}")
        for name in ("moe_aux_loss_weight", "moe_z_loss_weight"):
            need(getattr(c, name) >= 0, f"{name} must be non-negative, got {getattr(c, name)}")

    def reset_parameters(self):
        """Like the model's dense SwiGLU: N(0, 0.02), output projections N(0, out_std)."""
        for weight in (self.router.weight, self.w1, self.w3):
            nn.init.normal_(weight, std=0.02)
        nn.init.normal_(self.w2, std=self.out_std)

    def route(self, x):
        """x (tokens, dim) -> gates (tokens, top_k) fp32, experts (tokens, top_k) int64, slots per expert.

        Records the auxiliary losses and expert fractions of this batch on the module.
        """
        dtype = torch.promote_types(self.router.weight.dtype, torch.float32)  # fp32, or fp64 for checks
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.router.weight.to(dtype))
        probs = F.softmax(logits, dim=-1)
        gates, experts = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        counts = torch.bincount(experts.flatten(), minlength=self.num_experts)
        self.expert_fractions = counts.to(dtype) / experts.numel()
        self.balance_loss = self.num_experts * (self.expert_fractions * probs.mean(dim=0)).sum()
        self.z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return gates, experts, counts

    def aux_loss(self):
        """The weighted auxiliary losses of the latest forward."""
        return self.aux_loss_weight * self.balance_loss + self.z_loss_weight * self.z_loss

    def expert(self, e, x):
        return F.linear(F.silu(F.linear(x, self.w1[e])) * F.linear(x, self.w3[e]), self.w2[e])

    def forward(self, x):
        """x (..., dim) -> (..., dim)."""
        shape = x.shape
        x = x.reshape(-1, self.dim)
        gates, experts, counts = self.route(x)
        slots = experts.flatten().argsort(stable=True)  # slot s is choice s % top_k of token s // top_k
        tokens = slots // self.top_k
        chunks = x[tokens].split(counts.tolist())
        y = torch.cat([self.expert(e, chunk) for e, chunk in enumerate(chunks)])
        y = y * gates.flatten()[slots].unsqueeze(-1).to(y.dtype)
        out = y.new_zeros(x.shape[0], self.dim).index_add_(0, tokens, y)
        return out.reshape(shape).to(x.dtype)

    def active_params(self):
        """The router and top_k experts."""
        return self.router.weight.numel() + self.top_k * 3 * self.dim * self.hidden

    def flops_per_token(self):
        return 2 * self.router.weight.numel() + self.top_k * 2 * 3 * self.dim * self.hidden
