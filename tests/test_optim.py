"""RowAdamW against torch.optim.AdamW run on each row alone; touched-row clipping against dense clipping."""
import warnings

import pytest
import torch

from optim import RowAdamW, clip_grad_norm_, make_optimizers


def sparse_rows(rows, values, shape):
    return torch.sparse_coo_tensor(torch.tensor(rows).unsqueeze(0), values, shape, check_invariants=True)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_row_adamw_equals_adamw_on_each_row_over_the_steps_that_touched_it(compile):
    torch.manual_seed(0)
    n, dim, lr, wd = 12, 5, 0.05, 0.1
    table = torch.nn.Parameter(torch.randn(n, dim))
    initial = table.detach().clone()
    rows_per_step = [[0, 3, 3, 7], [3, 5], [0, 7, 9], [], [3, 9, 9, 9], [0]]  # repeats: summed like dense grads
    grads = [torch.randn(len(r), dim) for r in rows_per_step]
    optimizer = RowAdamW([table], lr=lr, betas=(0.9, 0.95), weight_decay=wd, compile=compile)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the compiled update must not fall back to eager
        for rows, g in zip(rows_per_step, grads):
            table.grad = sparse_rows(rows, g, (n, dim)) if rows else None
            optimizer.step()

    for row in range(n):
        alone = torch.nn.Parameter(initial[row].clone())
        reference = torch.optim.AdamW([alone], lr=lr, betas=(0.9, 0.95), weight_decay=wd)
        touched = 0
        for rows, g in zip(rows_per_step, grads):
            if row in rows:
                alone.grad = sum(g[i] for i, r in enumerate(rows) if r == row)
                reference.step()
                touched += 1
        torch.testing.assert_close(table[row], alone, rtol=1e-6, atol=1e-7)
        state = optimizer.state[table]
        assert state["step"][row] == touched
        if touched:
            torch.testing.assert_close(state["exp_avg"][row], reference.state[alone]["exp_avg"])
            torch.testing.assert_close(state["exp_avg_sq"][row], reference.state[alone]["exp_avg_sq"])
        else:  # never read: untouched, moments zero
            assert torch.equal(table[row], initial[row])
            assert not state["exp_avg"][row].any() and not state["exp_avg_sq"][row].any()


def test_clipping_touched_rows_equals_clipping_the_dense_gradient():
    torch.manual_seed(1)
    a, b = torch.nn.Parameter(torch.randn(10, 3)), torch.nn.Parameter(torch.randn(6, 3))
    grads = [sparse_rows([1, 4, 1, 8], torch.randn(4, 3) * 3, (10, 3)), sparse_rows([0, 5], torch.randn(2, 3), (6, 3))]
    dense = [g.to_dense() for g in grads]
    a.grad, b.grad = grads
    norm = clip_grad_norm_([a, b], max_norm=1.0)

    da, db = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    da.grad, db.grad = dense
    want = torch.nn.utils.clip_grad_norm_([da, db], max_norm=1.0)
    torch.testing.assert_close(norm, want)
    assert norm > 1.0
    torch.testing.assert_close(a.grad.to_dense(), da.grad)
    torch.testing.assert_close(b.grad.to_dense(), db.grad)

    a.grad = sparse_rows([2], torch.full((1, 3), 0.1), (10, 3))
    b.grad = None
    assert clip_grad_norm_([a, b], max_norm=1.0) < 1.0  # below the limit: unchanged
    torch.testing.assert_close(a.grad.to_dense()[2], torch.full((3,), 0.1))


def test_loaded_state_follows_the_parameter_to_its_device():
    """load_state_dict moves state to the parameter's device, except a key named "step" unless told (torch
    keeps step counts where they were): RowAdamW's per-row counts must move too. `meta` stands in for a GPU."""
    table = torch.nn.Parameter(torch.randn(6, 3))
    optimizer = RowAdamW([table], compile=False)
    table.grad = sparse_rows([1, 4], torch.randn(2, 3), (6, 3))
    optimizer.step()
    elsewhere = torch.nn.Parameter(torch.empty(6, 3, device="meta"))
    resumed = RowAdamW([elsewhere], compile=False)
    resumed.load_state_dict(optimizer.state_dict())
    state = resumed.state[elsewhere]
    assert set(state) == {"exp_avg", "exp_avg_sq", "step"}
    assert all(t.device.type == "meta" and t.dtype == torch.float32 for t in state.values())


@pytest.mark.parametrize("kind, row_updates", [("adamw", False), ("adamw", True), ("sgd", False), ("sgd", True)])
def test_the_optimizers_choose_the_value_tables_gradient_layout(kind, row_updates):
    """make_optimizers: with row updates the tables (RowAdamW's, or SGD's) get a sparse gradient of exactly
    the rows read, otherwise a dense one; either way the gradient is autograd's through a plain gather."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, memory_layers=(0, 1),
                          mem_n_keys=8, mem_heads=2, mem_knn=4))
    optimizers = make_optimizers(model, kind, row_updates=row_updates)
    assert set(optimizers) == ({"optimizer", "value_optimizer"} if kind == "adamw" and row_updates else {"optimizer"})
    table = model.values[0]
    reads = [(torch.randint(0, 64, (6, 8)), torch.rand(6, 8)) for _ in range(2)]  # two layers' reads, say
    sum(table(i, w).square().sum() for i, w in reads).backward()
    weight = table.weight.detach().clone().requires_grad_()
    sum((weight[i] * w.unsqueeze(-1)).sum(1).square().sum() for i, w in reads).backward()
    grad = table.weight.grad
    assert grad.is_sparse == row_updates
    if row_updates:
        assert torch.equal(grad.indices()[0], torch.cat([i.flatten() for i, _ in reads]).unique())
        grad = grad.to_dense()
    torch.testing.assert_close(grad, weight.grad)
