"""The mixture-of-experts block against dense SwiGLU and a per-token loop; its losses, counts, training, errors."""
import pytest
import torch
import torch.nn.functional as F

from errors import ConfigError
from model import GPT, GPTConfig, SwiGLU
from moe import MoE
from conftest import config_for, read_log, run
from train import train

TINY = dict(vocab_size=50, block_size=24, n_layer=3, n_head=2, n_embd=32)


def expert_as_swiglu(moe, e):
    """Expert e of moe as the model's dense SwiGLU, sharing its weights (so gradients flow back to moe)."""
    ffn = SwiGLU(moe.dim, moe.hidden)
    for name in ("w1", "w2", "w3"):
        del getattr(ffn, name).weight
        getattr(ffn, name).weight = getattr(moe, name)[e]
    return ffn


def per_token_reference(moe, x):
    """Each token on its own: softmax over all experts, top_k by sorting, gates renormalised (raw at top-1),
    output the gate-weighted sum of its experts' outputs."""
    experts = [expert_as_swiglu(moe, e) for e in range(moe.num_experts)]
    outputs = []
    for token in x.reshape(-1, moe.dim):
        probs = F.softmax(token @ moe.router.weight.T, dim=-1)
        chosen = sorted(range(moe.num_experts), key=lambda e: -probs[e].item())[:moe.top_k]
        gates = [probs[e] / (sum(probs[c] for c in chosen) if moe.top_k > 1 else 1) for e in chosen]
        outputs.append(sum(g * experts[e](token) for g, e in zip(gates, chosen)))
    return torch.stack(outputs).view(x.shape)


def test_one_expert_top1_equals_dense_swiglu():
    torch.manual_seed(0)
    dense, moe = SwiGLU(16, 40).double(), MoE(16, 40, num_experts=1, top_k=1).double()
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(moe, name)[0] = getattr(dense, name).weight
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    out, want = moe(x), dense(x)
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, moe.w1, moe.w2, moe.w3], grad)
    ref = torch.autograd.grad(want, [x, dense.w1.weight, dense.w2.weight, dense.w3.weight], grad)
    torch.testing.assert_close(got[0], ref[0])
    for g, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(g[0], r)


@pytest.mark.parametrize("top_k, skewed", [(1, False), (2, False), (5, False), (2, True)])
def test_dropless_output_and_gradients_equal_a_per_token_loop(top_k, skewed):
    torch.manual_seed(1)
    moe = MoE(16, 24, num_experts=5, top_k=top_k).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    if skewed:  # nearly every token prefers expert 0: no capacity, so none may be dropped
        x = x + 2.0
        with torch.no_grad():
            moe.router.weight[0] += 0.5
    x.requires_grad_()
    out = moe(x)
    if skewed:
        assert moe.expert_fractions[0] > 0.45  # of 2 slots per token: expert 0 is nearly every token's first
    want = per_token_reference(moe, x)
    torch.testing.assert_close(out, want)

    params = [x, moe.router.weight, moe.w1, moe.w2, moe.w3]
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad)
    ref = torch.autograd.grad(want, params, grad)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)
    assert got[1].abs().sum() > 0  # the router learns through the gates (no auxiliary loss here)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_balance_loss_is_one_for_uniform_routing(top_k):
    """E one-hot tokens; token t scores expert t highest, t+1 next, and so on around the circle: every
    expert gets the same share of slots and the same mean probability."""
    E = 6
    logits = sum(torch.roll(torch.eye(E, dtype=torch.float64), r, dims=1) * (3.0 - r) for r in range(E))
    moe = MoE(E, 4, num_experts=E, top_k=top_k).double()
    with torch.no_grad():
        moe.router.weight.copy_(logits.T)  # one-hot token t gets router logits logits[t]
    moe(torch.eye(E, dtype=torch.float64))
    torch.testing.assert_close(moe.expert_fractions, torch.full((E,), 1 / E, dtype=torch.float64))
    assert moe.balance_loss.item() == pytest.approx(1.0, abs=1e-12)


def test_balance_loss_grows_with_skew_and_z_loss_is_the_squared_logsumexp():
    torch.manual_seed(2)
    x = torch.randn(40, 8, dtype=torch.float64)
    moe = MoE(8, 4, num_experts=4, top_k=1).double()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    x[:, 0] = x[:, 0].abs() + 0.1  # every token scores expert 0 highest
    moe(x)
    probs = F.softmax(x @ moe.router.weight.T, dim=-1)
    assert moe.expert_fractions.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert moe.balance_loss.item() == pytest.approx(4 * probs[:, 0].mean().item(), rel=1e-12)
    assert moe.balance_loss.item() > 1.5
    lse = torch.log(torch.exp(x @ moe.router.weight.T).sum(-1))
    assert moe.z_loss.item() == pytest.approx((lse ** 2).mean().item(), rel=1e-12)


def test_router_runs_in_fp32_under_autocast():
    moe = MoE(16, 24, num_experts=4, top_k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates, _, _ = moe.route(torch.randn(10, 16))
    assert gates.dtype == moe.balance_loss.dtype == moe.z_loss.dtype == torch.float32


def test_training_loss_adds_the_weighted_aux_losses_and_eval_does_not():
    torch.manual_seed(3)
    model = GPT(GPTConfig(**TINY, moe_layers=(0, 2), moe_num_experts=4, moe_top_k=2,
                          moe_aux_loss_weight=0.5, moe_z_loss_weight=0.25))
    x = torch.randint(0, 50, (2, 24))
    logits, loss = model(x, x)
    moes = [model.blocks[0].ffn, model.blocks[2].ffn]
    aux = sum(0.5 * m.balance_loss + 0.25 * m.z_loss for m in moes)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), x.flatten()) + aux)
    stats = model.routing_stats()
    assert stats["moe_balance_loss"] == pytest.approx(sum(m.balance_loss.item() for m in moes) / 2)
    assert sorted(stats["moe_expert_fractions"]) == [0, 2]
    assert all(sum(f) == pytest.approx(1, abs=1e-3) and len(f) == 4 for f in stats["moe_expert_fractions"].values())
    model.eval()
    logits, loss = model(x, x)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), x.flatten()))
    assert GPT(GPTConfig(**TINY)).routing_stats() == {}


def test_parameter_and_flop_counts_match_hand_counts():
    d, V, T, h = 32, 50, 24, 128  # dense ffn_hidden: 8/3*32 -> 128
    E, k, eh = 4, 2, 48
    model = GPT(GPTConfig(**TINY, moe_layers=(1,), moe_num_experts=E, moe_top_k=k, moe_hidden=eh))
    rest = V * d + 3 * (4 * d * d + 2 * d) + d  # embedding, attention, norms
    assert model.param_counts() == {"total": rest + 2 * 3 * d * h + E * d + E * 3 * d * eh,
                                    "active": rest + 2 * 3 * d * h + E * d + k * 3 * d * eh}
    moe_flops = 2 * E * d + k * 6 * d * eh
    assert model.flops_per_token() == 2 * V * d + 3 * (8 * d * d + 4 * T * d) + 2 * 6 * d * h + moe_flops
    assert GPTConfig(**TINY, moe_layers=(1,)).moe_hidden == h  # expert hidden defaults to the dense one


@pytest.mark.parametrize("change, message", [
    (dict(moe_layers=(1,), moe_num_experts=2, moe_top_k=3), "moe_top_k=3 must be at most moe_num_experts=2"),
    (dict(moe_layers=(1,), moe_num_experts=0), "moe_num_experts must be positive, got 0"),
    (dict(moe_layers=(1,), moe_top_k=0), "moe_top_k must be positive, got 0"),
    (dict(moe_layers=(1,), moe_aux_loss_weight=-1.0), "moe_aux_loss_weight must be non-negative"),
    (dict(moe_layers=(3,)), r"moe_layers names \[3\], but layers are 0..2"),
    (dict(moe_layers=(0, 0)), "moe_layers lists a layer twice"),
    (dict(moe_layers=(0, 1), memory_layers=(1, 2)), r"layers \[1\] are listed in both memory_layers and moe_layers"),
])
def test_bad_moe_settings_name_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**{**TINY, **change})


def test_bad_moe_setting_on_the_command_line_is_a_one_line_error(char_data_dir, tmp_path):
    result = run("train.py", f"--data_dir={char_data_dir}", "--dataset=tiny", f"--out_dir={tmp_path}", "--n_layer=2",
                 "--moe_layers=[1]", "--moe_num_experts=2", "--moe_top_k=3")
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert result.stderr == "error: moe_top_k=3 must be at most moe_num_experts=2\n"


def test_tiny_moe_model_drives_the_loss_down_and_logs_its_routing(char_data_dir, tmp_path):
    train(config_for(char_data_dir, tmp_path, max_iters=80, eval_interval=80, log_interval=40,
                     moe_layers=(0, 1), moe_num_experts=4, moe_top_k=2, moe_hidden=64))
    evals = read_log(tmp_path, "eval")
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 1.0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    logged = read_log(tmp_path, "train")[-1]
    assert 0 < logged["moe_balance_loss"] <= 4 and logged["moe_z_loss"] > 0
    assert sorted(logged["moe_expert_fractions"]) == ["0", "1"]
