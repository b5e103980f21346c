"""PEER feed-forward ("Mixture of a Million Experts", He 2024): product-key retrieval of one-neuron experts.

Expert i is a single hidden neuron: a down vector u_i and an up vector v_i, both of size dim, n_keys**2
experts in all. A token finds its experts exactly as a memory layer finds its values (a
memory.ProductKeyMemory used for its search only: heads queries, two sub-key tables per head, the exact
product top-knn, a softmax over each head's knn scores), then

    out = sum over heads and selected experts i of  w_i * gelu(u_i . x) * v_i.

The up half is the memory read itself, an embedding bag over the v_i rows, here with per-sample weights
w_i * gelu(u_i . x); the down half gathers the u_i rows and dots each with x. The paper leaves the
activation open; GELU is what the open implementations use.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import need
from kernels import embedding_bag
from memory import ProductKeyMemory


class PEER(nn.Module):
    reads = ()  # forward takes x alone: the experts are its own parameters (model.py's FFN_KINDS)

    def __init__(self, dim, n_keys, heads, knn, k_dim):
        super().__init__()
        self.dim, self.heads, self.knn = dim, heads, knn
        self.search = ProductKeyMemory(dim, n_keys, heads, knn, k_dim, v_dim=dim, swilu=False)
        self.down = nn.Parameter(torch.empty(n_keys ** 2, dim))  # u_i
        self.up = nn.Parameter(torch.empty(n_keys ** 2, dim))  # v_i
        self.reset_parameters()

    @classmethod
    def from_config(cls, c):
        """The PEER layer of a GPTConfig (its peer_* settings)."""
        return cls(c.n_embd, c.peer_n_keys, c.peer_heads, c.peer_knn, c.peer_k_dim)

    @staticmethod
    def check_config(c):
        for name in ("peer_n_keys", "peer_heads", "peer_knn", "peer_k_dim"):
            need(getattr(c, name) > 0, f"{name} must be positive, got {getattr(c, name)}")
        need(c.peer_knn <= c.peer_n_keys, f"peer_knn={c.peer_knn} must be at most peer_n_keys={c.peer_n_keys}")
        need(c.peer_k_dim % 2 == 0, f"peer_k_dim={c.peer_k_dim} must be even (it is split in two halves)")

    def reset_parameters(self):
        """The memory layer's search init; u_i . x starts about N(0, 1) for unit-RMS x, v_i like memory values."""
        self.search.reset_parameters()
        nn.init.normal_(self.down, std=self.dim ** -0.5)
        nn.init.normal_(self.up, std=self.dim ** -0.5)

    def forward(self, x):
        """x (..., dim) -> (..., dim)."""
        shape = x.shape
        x = x.reshape(-1, self.dim)
        indices, weights = self.search.lookup(x)  # (tokens, heads*knn) each
        u = F.embedding(indices, self.down)  # (tokens, heads*knn, dim)
        activations = F.gelu(torch.einsum("tkd,td->tk", u, x.to(u.dtype)))
        out = embedding_bag(self.up, indices, weights * activations)
        return out.reshape(shape).to(x.dtype)

    def active_params(self):
        """The search's (its parameters and the v_i rows it reads) plus the u_i rows."""
        return self.search.active_params() + self.heads * self.knn * self.dim

    def flops_per_token(self):
        """The search and its read of the v_i rows, as a memory layer counts them, plus the u_i . x products."""
        return self.search.flops_per_token() + 2 * self.heads * self.knn * self.dim
