"""The GPT: per-layer feed-forward choice, value-table ownership, generation, accounting, config checks."""
import copy

import pytest
import torch

from errors import ConfigError
from model import GPT, GPTConfig, SwiGLU
from memory import ProductKeyMemory

TINY = dict(vocab_size=50, block_size=24, n_layer=3, n_head=2, n_embd=32, mem_n_keys=8, mem_heads=2, mem_knn=4)


def test_memory_layers_replace_the_chosen_ffns_only():
    model = GPT(GPTConfig(**TINY, memory_layers=(0, 2)))
    kinds = [type(b.ffn) for b in model.blocks]
    assert kinds == [ProductKeyMemory, SwiGLU, ProductKeyMemory]
    assert len(model.values) == 1 and model.values[0].weight.shape == (64, 32)
    assert len(GPT(GPTConfig(**TINY, memory_layers=(0, 2), mem_share_values=False)).values) == 2
    assert len(GPT(GPTConfig(**TINY)).values) == 0


def test_shared_table_gradient_is_the_sum_of_each_layers_contribution():
    """A shared table gets the sum of the gradients that separate copies of it get, one per layer."""
    torch.manual_seed(0)
    shared = GPT(GPTConfig(**TINY, memory_layers=(0, 1, 2)))
    separate = GPT(GPTConfig(**TINY, memory_layers=(0, 1, 2), mem_share_values=False))
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("values.")}
    for slot in range(3):
        state[f"values.{slot}.weight"] = shared.values[0].weight.detach().clone()
    separate.load_state_dict(state)
    x = torch.randint(0, 50, (3, 24))
    loss_shared = shared(x, x)[1]
    loss_separate = separate(x, x)[1]
    torch.testing.assert_close(loss_shared, loss_separate)
    loss_shared.backward()
    loss_separate.backward()
    summed = sum(t.weight.grad for t in separate.values)
    assert all(t.weight.grad.abs().sum() > 0 for t in separate.values)
    torch.testing.assert_close(shared.values[0].weight.grad, summed)


def test_two_models_share_nothing():
    cfg = GPTConfig(**TINY, memory_layers=(1,))
    a, b = GPT(cfg), GPT(cfg)
    ptrs = lambda m: {t.data_ptr() for t in list(m.parameters()) + list(m.buffers())}
    assert not ptrs(a) & ptrs(b)
    x = torch.randint(0, 50, (2, 24))
    before = b(x)[0]
    with torch.no_grad():
        a.values[0].weight.add_(1.0)
        a.blocks[1].ffn.sub_keys.mul_(-1)
    torch.testing.assert_close(b(x)[0], before)


@pytest.mark.parametrize("memory_layers", [(), (1,)])
def test_greedy_generation_with_and_without_kv_cache_agree(memory_layers):
    torch.manual_seed(1)
    model = GPT(GPTConfig(**TINY, memory_layers=memory_layers)).eval()
    prompt = torch.randint(0, 50, (2, 5))
    cached = model.generate(prompt, 19, temperature=0)
    plain = model.generate(prompt, 19, temperature=0, use_cache=False)
    assert torch.equal(cached, plain) and cached.shape == (2, 24)
    # and the cached logits equal a full forward at every position
    from model import KVCache
    caches = [KVCache(2, 2, 24, 16, "cpu", torch.float32) for _ in range(3)]
    step_logits = [model(cached[:, :5], caches=caches)[0]]
    step_logits += [model(cached[:, t:t + 1], caches=caches, start=t)[0] for t in range(5, 24)]
    torch.testing.assert_close(torch.cat(step_logits, 1), model(cached)[0], rtol=1e-4, atol=1e-5)


def test_generation_past_the_context_window():
    model = GPT(GPTConfig(**TINY)).eval()
    out = model.generate(torch.zeros(1, 30, dtype=torch.long), 40, temperature=1.0, top_k=5)
    assert out.shape == (1, 70) and out.max() < 50


def test_parameter_and_flop_counts_match_hand_counts():
    d, V, T, h = 32, 50, 24, 128  # ffn_hidden: 8/3*32 = 85.3 -> 128
    dense = GPT(GPTConfig(**TINY))
    per_layer = 4 * d * d + 3 * d * h + 2 * d  # attention, SwiGLU, two norms
    assert dense.param_counts() == {"total": V * d + 3 * per_layer + d, "active": V * d + 3 * per_layer + d}
    assert dense.flops_per_token() == 2 * V * d + 3 * (8 * d * d + 4 * T * d + 6 * d * h)

    mem = GPT(GPTConfig(**TINY, memory_layers=(1,)))
    k, v, n, heads, knn = 16, 32, 8, 2, 4
    memory_params = (d * heads * k + heads * k) + heads * n * k + (d * v + v) + (v * d + d)
    total = V * d + 3 * (4 * d * d + 2 * d) + 2 * 3 * d * h + memory_params + n * n * v + d
    assert mem.param_counts() == {"total": total, "active": total - n * n * v + heads * knn * v}
    candidates = 8  # rank pairs (a, b) with (a+1)(b+1) <= knn=4: 4 + 2 + 1 + 1
    memory_flops = 2 * d * heads * k + 2 * heads * n * k + heads * candidates + 2 * heads * knn * v + 4 * d * v
    assert mem.flops_per_token() == 2 * V * d + 3 * (8 * d * d + 4 * T * d) + 2 * 6 * d * h + memory_flops


def test_untied_embeddings_count_one_active_row():
    model = GPT(GPTConfig(**TINY, tie_embeddings=False))
    counts = model.param_counts()
    assert counts["total"] - counts["active"] == 50 * 32 - 32


@pytest.mark.parametrize("change, message", [
    (dict(memory_layers=(3,)), "memory_layers names [3]"),
    (dict(memory_layers=(1, 1)), "lists a layer twice"),
    (dict(memory_layers=(1,), mem_knn=9), "mem_knn=9 must be at most mem_n_keys=8"),
    (dict(memory_layers=(1,), mem_k_dim=7), "mem_k_dim=7 must be even"),
    (dict(memory_layers=(1,), mem_swilu=False, mem_v_dim=48), "must equal n_embd"),
    (dict(n_head=3), "divisible by n_head"),
])
def test_bad_model_settings_name_the_problem(change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        GPTConfig(**{**TINY, **change})


def test_optimizer_groups_give_the_value_table_its_own_lr():
    model = GPT(GPTConfig(**TINY, memory_layers=(1,)))
    groups = {g["name"]: g for g in model.optimizer_groups(0.1, 1e-3, 1e-2)}
    assert groups["values"]["params"] == [model.values[0].weight] and groups["values"]["peak_lr"] == 1e-2
    assert groups["decay"]["peak_lr"] == 1e-3 and groups["no_decay"]["weight_decay"] == 0.0
    seen = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert all(p.dim() < 2 for p in groups["no_decay"]["params"])


def test_norm_gains_and_biases_are_not_decayed_whatever_their_shape():
    """The qk-norm query gain is (2, k_dim/2): a gain, not a weight matrix, so it must not be decayed."""
    model = GPT(GPTConfig(**TINY, memory_layers=(1,), mem_qk_norm=True, moe_layers=(0,)))
    groups = {g["name"]: g for g in model.optimizer_groups(0.1, 1e-3, 1e-2)}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    named = dict(model.named_parameters())
    expected = {n for n in named if n.endswith(("bias", "_gain")) or "norm" in n.split(".")[-2]}
    assert "blocks.1.ffn.query_gain" in expected and named["blocks.1.ffn.query_gain"].dim() == 2
    assert {n for n, p in named.items() if id(p) in no_decay} == expected
    assert groups["decay"]["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in groups["decay"]["params"])


def test_value_tables_are_initialised_once(monkeypatch):
    """Drawing a 1M x 768 table costs seconds: the model must not draw it again after the table has."""
    from memory import ValueTable
    calls = []
    original = ValueTable.reset_parameters
    monkeypatch.setattr(ValueTable, "reset_parameters", lambda self: calls.append(self) or original(self))
    model = GPT(GPTConfig(**TINY, memory_layers=(0, 1), mem_share_values=False))
    assert len(calls) == 2 and {id(t) for t in calls} == {id(t) for t in model.values}


def test_value_parameters_name_the_tables_in_order():
    model = GPT(GPTConfig(**TINY, memory_layers=(0, 1), mem_share_values=False))
    names = [name for name, _ in model.value_parameters()]
    assert [p for _, p in model.value_parameters()] == [t.weight for t in model.values]
    assert all(dict(model.named_parameters())[n] is p for n, p in model.value_parameters()) and len(names) == 2


def test_deepcopy_and_state_dict_round_trip():
    model = GPT(GPTConfig(**TINY, memory_layers=(0,)))
    clone = GPT(GPTConfig(**TINY, memory_layers=(0,)))
    clone.load_state_dict(copy.deepcopy(model.state_dict()))
    x = torch.randint(0, 50, (1, 10))
    torch.testing.assert_close(clone(x)[0], model(x)[0])
