"""The embedding bag behind every memory read: out[t] = sum_j w[t, j] * weight[idx[t, j]].

One public function, `embedding_bag`, with a backend switch. The PyTorch path serves every device;
the Triton kernels (CUDA) plug in behind the same call.
"""
import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch")


def embedding_bag(weight, indices, per_sample_weights, backend="auto"):
    """Weighted sum of rows. weight (N, dim); indices (tokens, bag) int; per_sample_weights (tokens, bag).

    Returns (tokens, dim) in weight's dtype, differentiable in weight and per_sample_weights.
    """
    if backend not in BACKENDS:
        raise ValueError(f"embedding_bag: unknown backend {backend!r}, expected one of {BACKENDS}")
    if indices.shape != per_sample_weights.shape or indices.dim() != 2:
        raise ValueError(f"embedding_bag: indices {tuple(indices.shape)} and per_sample_weights "
                         f"{tuple(per_sample_weights.shape)} must both be (tokens, bag)")
    return F.embedding_bag(indices, weight, per_sample_weights=per_sample_weights.to(weight.dtype), mode="sum")
