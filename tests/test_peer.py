"""The PEER block against brute force over all materialised experts; its counts, training, errors."""
import pytest
import torch
import torch.nn.functional as F

from errors import ConfigError
from model import GPT, GPTConfig
from peer import PEER
from conftest import brute_force_lookup
from conftest import config_for, read_log
from train import train

TINY = dict(vocab_size=50, block_size=24, n_layer=3, n_head=2, n_embd=32)


def brute_force_peer(peer, x):
    """Every expert's output for every token, then each head's softmax weights over its top-knn of all
    n_keys**2 full keys (scored one by one), summed over heads."""
    flat = x.reshape(-1, peer.dim)
    all_experts = F.gelu(flat @ peer.down.T).unsqueeze(-1) * peer.up  # (tokens, n_keys**2, dim)
    idx, _, weights = brute_force_lookup(peer.search, flat)  # (tokens, heads, knn) each
    dense_weights = torch.zeros(len(flat), peer.heads, len(peer.up), dtype=flat.dtype)
    dense_weights = dense_weights.scatter(-1, idx, weights).sum(1)  # (tokens, n_keys**2)
    return (dense_weights.unsqueeze(-1) * all_experts).sum(1).view(x.shape)


def test_peer_equals_brute_force_over_all_experts():
    torch.manual_seed(0)
    peer = PEER(dim=16, n_keys=7, heads=3, knn=5, k_dim=8).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    out, want = peer(x), brute_force_peer(peer, x)
    torch.testing.assert_close(out, want)

    params = [x, peer.down, peer.up, peer.search.sub_keys, peer.search.query.weight]
    grad = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(want, params, grad)):
        torch.testing.assert_close(g, r)


def test_peer_runs_under_autocast():
    peer = PEER(dim=16, n_keys=8, heads=2, knn=3, k_dim=8)
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = peer(x)
    torch.testing.assert_close(out, peer(x), rtol=0.05, atol=0.01)


def test_parameter_and_flop_counts_match_hand_counts():
    d, V, T, h = 32, 50, 24, 128  # dense ffn_hidden: 8/3*32 -> 128
    n, heads, knn, k = 8, 2, 4, 16
    model = GPT(GPTConfig(**TINY, peer_layers=(1,), peer_n_keys=n, peer_heads=heads, peer_knn=knn))
    rest = V * d + 3 * (4 * d * d + 2 * d) + d + 2 * 3 * d * h  # embedding, attention, norms, two dense FFNs
    search = d * heads * k + heads * k + heads * n * k  # query with bias, sub-keys
    assert model.param_counts() == {"total": rest + search + 2 * n * n * d,
                                    "active": rest + search + 2 * heads * knn * d}
    candidates = 8  # rank pairs (a, b) with (a+1)(b+1) <= knn=4: 4 + 2 + 1 + 1
    peer_flops = 2 * d * heads * k + 2 * heads * n * k + heads * candidates + 2 * 2 * heads * knn * d
    assert model.flops_per_token() == 2 * V * d + 3 * (8 * d * d + 4 * T * d) + 2 * 6 * d * h + peer_flops


@pytest.mark.parametrize("change, message", [
    (dict(peer_layers=(1,), peer_n_keys=8, peer_knn=9), "peer_knn=9 must be at most peer_n_keys=8"),
    (dict(peer_layers=(1,), peer_k_dim=7), "peer_k_dim=7 must be even"),
    (dict(peer_layers=(1,), peer_heads=0), "peer_heads must be positive, got 0"),
    (dict(peer_layers=(-1,)), r"peer_layers names \[-1\], but layers are 0..2"),
    (dict(peer_layers=(2,), moe_layers=(0, 2)), r"layers \[2\] are listed in both moe_layers and peer_layers"),
])
def test_bad_peer_settings_name_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**{**TINY, **change})


def test_tiny_peer_model_drives_the_loss_down(char_data_dir, tmp_path):
    train(config_for(char_data_dir, tmp_path, max_iters=80, eval_interval=80, log_interval=80,
                     peer_layers=(1,), peer_n_keys=16, peer_heads=4, peer_knn=8))
    evals = read_log(tmp_path, "eval")
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 1.0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
