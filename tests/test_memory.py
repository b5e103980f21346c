"""The product-key memory layer against brute force over all n_keys**2 materialised keys."""
import pytest
import torch
import torch.nn.functional as F

from memory import ProductKeyMemory, ValueTable, product_key_topk


def full_keys(layer, head):
    """All n_keys**2 keys of one head, key i*n_keys+j = concat(sub_keys[h,0,i], sub_keys[h,1,j])."""
    k1, k2 = layer.sub_keys[head, 0], layer.sub_keys[head, 1]
    n = layer.n_keys
    return torch.cat([k1.repeat_interleave(n, 0), k2.repeat(n, 1)], dim=1)


def brute_force_lookup(layer, x):
    """Score every full key of every head; top-knn; per-head softmax. (tokens, heads, knn) each."""
    q = (x @ layer.query.weight.T + layer.query.bias).view(len(x), layer.heads, layer.k_dim)
    scores = torch.stack([q[:, h] @ full_keys(layer, h).T for h in range(layer.heads)], dim=1)
    top, idx = scores.topk(layer.knn, dim=-1)
    return idx, top, F.softmax(top, dim=-1)


def test_product_topk_equals_brute_force_on_random_scores():
    torch.manual_seed(0)
    for n_keys, knn in [(16, 4), (37, 37), (50, 1), (64, 20)]:
        s1, s2 = torch.randn(5, 3, n_keys), torch.randn(5, 3, n_keys)
        i, j = product_key_topk(s1, s2, knn)
        full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
        want_scores, want_idx = full.topk(knn, dim=-1)
        assert torch.equal(i * n_keys + j, want_idx)
        assert torch.equal(s1.gather(-1, i) + s2.gather(-1, j), want_scores)


def test_product_topk_scores_are_exact_with_ties():
    """With many equal scores the chosen keys may differ from brute force, their scores may not."""
    torch.manual_seed(6)
    s1, s2 = torch.randint(0, 4, (200, 30)).float(), torch.randint(0, 4, (200, 30)).float()
    for knn in (1, 7, 30):
        i, j = product_key_topk(s1, s2, knn)
        full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
        assert torch.equal(s1.gather(-1, i) + s2.gather(-1, j), full.topk(knn, dim=-1).values)
        assert all(len(set(row)) == knn for row in (i * 30 + j).tolist())  # knn distinct keys


def test_lookup_equals_brute_force_over_materialised_keys():
    torch.manual_seed(1)
    layer = ProductKeyMemory(dim=24, n_keys=12, heads=3, knn=5, k_dim=10, v_dim=24).double()
    x = torch.randn(40, 24, dtype=torch.float64)
    indices, weights = layer.lookup(x)
    want_idx, _, want_w = brute_force_lookup(layer, x)
    assert torch.equal(indices.long(), want_idx.flatten(1))
    torch.testing.assert_close(weights, want_w.flatten(1))
    torch.testing.assert_close(weights.view(40, 3, 5).sum(-1), torch.ones(40, 3, dtype=torch.float64))


def test_qk_norm_scores_are_normalised_dot_products():
    torch.manual_seed(2)
    layer = ProductKeyMemory(dim=16, n_keys=8, heads=2, knn=3, k_dim=8, v_dim=16, qk_norm=True)
    with torch.no_grad():
        layer.query_gain.uniform_(0.5, 2.0)
    x = torch.randn(10, 16)
    s1, s2 = layer.half_scores(*layer.queries_and_keys(x))
    q = layer.query(x).view(10, 2, 2, 4)
    rms = lambda t: t / t.pow(2).mean(-1, keepdim=True).add(torch.finfo(t.dtype).eps).sqrt()
    keys = rms(layer.sub_keys) / 2.0  # 1/sqrt(k_dim/2)
    want = torch.einsum("thpk,hpnk->thpn", rms(q) * layer.query_gain, keys)
    torch.testing.assert_close(s1, want[:, :, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, want[:, :, 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("swilu", [False, True])
def test_forward_and_gradients_equal_gather_reference(swilu):
    torch.manual_seed(3)
    dim, v_dim = 16, (24 if swilu else 16)
    layer = ProductKeyMemory(dim=dim, n_keys=10, heads=4, knn=6, k_dim=8, v_dim=v_dim, swilu=swilu).double()
    values = ValueTable(100, v_dim).double()
    x = torch.randn(2, 7, dim, dtype=torch.float64, requires_grad=True)
    out = layer(x, values)

    flat = x.reshape(-1, dim)
    idx, _, w = brute_force_lookup(layer, flat)
    rows = values.weight[idx.flatten(1)]  # (tokens, heads*knn, v_dim)
    y = (w.flatten(1).unsqueeze(-1) * rows).sum(1)
    if swilu:
        y = layer.w2(y * F.silu(layer.w1(flat)))
    want = y.view(2, 7, dim)
    torch.testing.assert_close(out, want)

    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, values.weight, layer.sub_keys, layer.query.weight], grad)
    ref = torch.autograd.grad(want, [x, values.weight, layer.sub_keys, layer.query.weight], grad)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)


def test_official_initialisation_with_zero_biases():
    torch.manual_seed(4)
    layer = ProductKeyMemory(dim=64, n_keys=32, heads=4, knn=8, k_dim=32, v_dim=96)
    bound = 32 ** -0.5
    assert layer.sub_keys.abs().max() <= bound and layer.sub_keys.abs().max() > 0.9 * bound
    for bias in (layer.query.bias, layer.w1.bias, layer.w2.bias):
        assert torch.count_nonzero(bias) == 0
    assert abs(layer.w1.weight.std().item() - 64 ** -0.5) < 0.1 * 64 ** -0.5
    values = ValueTable(4096, 96)
    assert abs(values.weight.std().item() - 96 ** -0.5) < 0.05 * 96 ** -0.5


def test_search_stays_fp32_under_autocast():
    torch.manual_seed(5)
    layer = ProductKeyMemory(dim=16, n_keys=8, heads=2, knn=3, k_dim=8, v_dim=16)
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s1, _ = layer.half_scores(*layer.queries_and_keys(x))
        _, weights = layer.lookup(x)
    assert s1.dtype == torch.float32 and weights.dtype == torch.float32


def test_usage_stats_on_known_distributions():
    import math
    from memory import usage_stats
    assert usage_stats(torch.ones(64)) == {"read_fraction": 1.0, "kl_uniform": 0.0}
    one_row = usage_stats(torch.zeros(64).index_fill_(0, torch.tensor([5]), 3.0))
    assert one_row["read_fraction"] == 1 / 64 and math.isclose(one_row["kl_uniform"], math.log(64), rel_tol=1e-6)
    half = usage_stats(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert half["read_fraction"] == 0.5 and math.isclose(half["kl_uniform"], math.log(2), rel_tol=1e-6)


def test_recorded_usage_is_the_read_weights_of_the_brute_force_lookup():
    torch.manual_seed(7)
    layer = ProductKeyMemory(dim=16, n_keys=6, heads=2, knn=3, k_dim=8, v_dim=16).double()
    values = ValueTable(36, 16).double()
    x = torch.randn(9, 16, dtype=torch.float64)
    layer(x, values)  # not measuring: nothing recorded
    assert values.usage is None
    values.usage = torch.zeros(36)
    layer(x, values)
    idx, _, w = brute_force_lookup(layer, x)
    want = torch.zeros(36, dtype=torch.float64).index_add_(0, idx.flatten(), w.flatten())
    torch.testing.assert_close(values.usage, want.float())
    assert values.usage.sum().item() == pytest.approx(9 * 2)  # each head's weights sum to 1

