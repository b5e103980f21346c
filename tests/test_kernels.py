"""kernels.embedding_bag and embedding_bag_row_grad against fp64 references, on CPU.

The Triton kernels run through Triton's interpreter (about 10^4x slower than compiled): tiny shapes.
"""
import json

import pytest
import torch
import torch.nn.functional as F

import kernels  # conftest set TRITON_INTERPRET=1 first
from conftest import no_host_reads

needs_triton = pytest.mark.skipif(not kernels._INTERPRETED,
                                  reason="needs Triton with TRITON_INTERPRET=1 (Triton missing or variable set to 0)")
CONFIGS = [  # (backend, weight_grad)
    ("torch", "deterministic"),
    pytest.param("triton", "deterministic", marks=needs_triton),
    pytest.param("triton", "atomic", marks=needs_triton),
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # relative to the largest value


def make_indices(pattern, tokens, bag, num_rows, gen):
    """random: uniform rows; skewed: most picks from 3 hot rows; repeats: rows repeated within each bag."""
    if pattern == "random":
        return torch.randint(0, num_rows, (tokens, bag), generator=gen)
    if pattern == "skewed":
        hot = torch.randint(0, num_rows, (3,), generator=gen)
        idx = hot[torch.randint(0, 3, (tokens, bag), generator=gen)]
        cold = torch.rand(tokens, bag, generator=gen) < 0.2
        return torch.where(cold, torch.randint(0, num_rows, (tokens, bag), generator=gen), idx)
    assert pattern == "repeats"
    return torch.randint(0, num_rows, (tokens, (bag + 2) // 3), generator=gen).repeat(1, 3)[:, :bag]


def reference(weight, indices, weights, grad_out):
    """Naive fp64 gather + weighted sum, differentiated by autograd: (out, grad_weight, grad_weights)."""
    weight = weight.detach().double().requires_grad_()
    weights = weights.detach().double().requires_grad_()
    out = (weight[indices.long()] * weights.unsqueeze(-1)).sum(1)
    out.backward(grad_out.double())
    return out.detach(), weight.grad, weights.grad


def reference_f(weight, indices, weights, grad_out):
    """torch.nn.functional.embedding_bag in fp64: (out, grad_weight, grad_weights)."""
    weight = weight.detach().double().requires_grad_()
    weights = weights.detach().double().requires_grad_()
    out = F.embedding_bag(indices, weight, per_sample_weights=weights, mode="sum")
    out.backward(grad_out.double())
    return out.detach(), weight.grad, weights.grad


def assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype] * max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=0)


def run_case(backend, weight_grad, dtype=torch.float32, pattern="random", tokens=6, bag=7, num_rows=50, dim=40,
             index_dtype=torch.int64, ref=reference, seed=0):
    """Forward and both gradients of kernels.embedding_bag against `ref`, plus the touched-row gradient."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_rows, dim, generator=gen).to(dtype).requires_grad_()
    indices = make_indices(pattern, tokens, bag, num_rows, gen).to(index_dtype)
    weights = torch.rand(tokens, bag, generator=gen).requires_grad_()
    grad_out = torch.randn(tokens, dim, generator=gen).to(dtype)

    out = kernels.embedding_bag(weight, indices, weights, backend=backend, weight_grad=weight_grad)
    out.backward(grad_out)
    want_out, want_grad_weight, want_grad_weights = ref(weight, indices, weights, grad_out)
    assert out.dtype == weight.grad.dtype == dtype and weights.grad.dtype == torch.float32
    assert_close(out, want_out, dtype)
    assert_close(weight.grad, want_grad_weight, dtype)
    assert_close(weights.grad, want_grad_weights, dtype)
    untouched = torch.ones(num_rows, dtype=torch.bool)
    untouched[indices.long().flatten()] = False
    assert (weight.grad[untouched] == 0).all()

    rows, grads = kernels.embedding_bag_row_grad(indices, weights.detach(), grad_out, backend=backend,
                                                 weight_grad=weight_grad)
    assert torch.equal(rows, torch.unique(indices.long()))
    assert grads.dtype == dtype
    assert_close(grads, want_grad_weight[rows], dtype)


@pytest.mark.parametrize("backend,weight_grad", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["random", "skewed", "repeats"])
def test_matches_naive_reference(backend, weight_grad, dtype, pattern):
    run_case(backend, weight_grad, dtype, pattern)


@pytest.mark.parametrize("backend,weight_grad", CONFIGS)
@pytest.mark.parametrize("case", [
    dict(ref=reference_f),  # PyTorch's own embedding_bag as the reference
    dict(tokens=1),
    dict(bag=1, num_rows=3),
    dict(dim=300, bag=20, tokens=3),  # two column tiles, the second one masked
    dict(dim=1, tokens=4),
    dict(index_dtype=torch.int32, pattern="skewed"),
    dict(bag=40, tokens=2, pattern="skewed", dtype=torch.float16),  # several BLOCK_K chunks per bag and per row
], ids=["vs-F.embedding_bag", "one-token", "bag-1", "dim-300", "dim-1", "int32", "long-bags"])
def test_shapes(backend, weight_grad, case):
    run_case(backend, weight_grad, **case)


@pytest.mark.parametrize("backend,weight_grad", CONFIGS)
def test_strided_table_and_broadcast_grad(backend, weight_grad):
    """A column slice of a wider table (row stride != dim) and a stride-0 output gradient."""
    full = torch.randn(30, 20, dtype=torch.float64).float().requires_grad_()
    indices = torch.randint(0, 30, (5, 6))
    weights = torch.rand(5, 6, requires_grad=True)
    scale = torch.randn(13)
    out = kernels.embedding_bag(full[:, 4:17], indices, weights, backend=backend, weight_grad=weight_grad)
    (out * scale).sum().backward()
    want_out, want_grad_weight, want_grad_weights = reference(full[:, 4:17], indices, weights, scale.expand(5, 13))
    assert_close(out, want_out, torch.float32)
    assert_close(full.grad[:, 4:17], want_grad_weight, torch.float32)
    assert (full.grad[:, :4] == 0).all() and (full.grad[:, 17:] == 0).all()
    assert_close(weights.grad, want_grad_weights, torch.float32)


@needs_triton
def test_triton_addresses_past_2_31_elements():
    """Rows whose element offset passes 2**31 (int32 address math would wrap): a lazily allocated 4 GiB table."""
    num_rows, dim = 2**28 + 2, 8
    try:
        weight = torch.empty(num_rows, dim, dtype=torch.float16)  # untouched pages cost no memory
    except RuntimeError as e:
        pytest.skip(f"cannot reserve a 4 GiB table: {e}")
    indices = torch.tensor([[num_rows - 1, 3, num_rows - 2]])
    weight[indices[0]] = torch.randn(3, dim).half()
    weights = torch.rand(1, 3, requires_grad=True)
    grad_out = torch.randn(1, dim).half()
    out = kernels.embedding_bag(weight, indices, weights, backend="triton")
    out.backward(grad_out)
    want_out, _, want_grad_weights = reference(weight[indices[0]], torch.arange(3).view(1, 3), weights, grad_out)
    assert_close(out, want_out, torch.float16)
    assert_close(weights.grad, want_grad_weights, torch.float16)


def small_inputs(dtype=torch.float32):
    return torch.randn(10, 4, dtype=dtype), torch.randint(0, 10, (3, 5)), torch.rand(3, 5)


@pytest.mark.parametrize("change,message", [
    (dict(backend="cuda"), "unknown backend"),
    (dict(weight_grad="sorted"), "unknown weight_grad"),
    (dict(indices=torch.randint(0, 10, (3, 4))), "must both be"),
    (dict(indices=torch.randint(0, 10, (15,)), per_sample_weights=torch.rand(15)), "must both be"),
    (dict(indices=torch.zeros(3, 0, dtype=torch.long), per_sample_weights=torch.rand(3, 0)), "bag >= 1"),
    (dict(indices=torch.rand(3, 5)), "int32/int64"),
    (dict(indices=torch.full((3, 5), 10)), r"\[0, 10\)"),
    (dict(indices=torch.full((3, 5), -1)), r"\[0, 10\)"),
    (dict(weight=torch.randn(10, 4, device="meta")), "different devices"),
    (dict(weight=torch.randn(10, 4, dtype=torch.float64), backend="triton"), "Triton backend takes"),
])
def test_bad_input_raises(change, message):
    weight, indices, weights = small_inputs()
    call = dict(weight=weight, indices=indices, per_sample_weights=weights) | change
    with pytest.raises(ValueError, match=message):
        kernels.embedding_bag(**call)


def test_row_grad_rejects_mismatched_grad_out():
    _, indices, weights = small_inputs()
    with pytest.raises(ValueError, match="grad_out"):
        kernels.embedding_bag_row_grad(indices, weights, torch.randn(4, 4))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(kernels, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.embedding_bag(*small_inputs(), backend="triton")


def test_missing_triton(monkeypatch):
    """Without Triton, backend='triton' says so and auto still serves CPU tensors through PyTorch."""
    monkeypatch.setattr(kernels, "triton", None)
    with pytest.raises(ValueError, match="not installed"):
        kernels.embedding_bag(*small_inputs(), backend="triton")
    weight, indices, weights = small_inputs()
    assert_close(kernels.embedding_bag(weight, indices, weights), reference(weight, indices, weights,
                                                                            torch.zeros(3, 4))[0], torch.float32)


def test_auto_uses_torch_on_cpu(monkeypatch):
    """auto must not launch Triton on CPU tensors, even with the interpreter available."""
    monkeypatch.setattr(kernels, "_bag_kernel", None, raising=False)
    weight, indices, weights = small_inputs()
    assert_close(kernels.embedding_bag(weight, indices, weights), reference(weight, indices, weights,
                                                                            torch.zeros(3, 4))[0], torch.float32)


@pytest.mark.parametrize("backend,weight_grad", CONFIGS)
def test_no_uninitialized_memory_read(backend, weight_grad):
    """In deterministic mode PyTorch fills fresh tensors with NaN, so a read of uninitialized memory shows."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        run_case(backend, weight_grad, pattern="skewed")
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("backend,weight_grad", CONFIGS)
@pytest.mark.parametrize("table_grad", [True, False], ids=["table-grad", "frozen-table"])
def test_one_gradient_at_a_time(backend, weight_grad, table_grad):
    """Only the input that asks for a gradient gets one; it still matches the reference."""
    weight, indices, weights = small_inputs()
    weight.requires_grad_(table_grad)
    weights.requires_grad_(not table_grad)
    grad_out = torch.randn(3, 4)
    kernels.embedding_bag(weight, indices, weights, backend=backend, weight_grad=weight_grad).backward(grad_out)
    _, want_grad_weight, want_grad_weights = reference(weight, indices, weights, grad_out)
    got, want = (weight.grad, want_grad_weight) if table_grad else (weights.grad, want_grad_weights)
    assert_close(got, want, torch.float32)
    assert (weights.grad if table_grad else weight.grad) is None


def test_double_backward_raises():
    weight, indices, weights = small_inputs()
    weights.requires_grad_()
    out = kernels.embedding_bag(weight, indices, weights)
    (grad,) = torch.autograd.grad(out.square().sum(), weights, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_bench_kernels_json(capsys):
    """`python tools/bench.py kernels --json` at a tiny shape: one row per CPU backend, in the bytes it documents."""
    from tools import bench
    bench.main(["kernels", "--device", "cpu", "--shapes", "32x4x64x24", "--reps", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in report["results"]] == ["F.embedding_bag", "torch"]
    for r in report["results"]:
        assert r["fwd_gbps"] == pytest.approx((32 * 4 + 32) * 24 * 4 / r["fwd_ms"] / 1e6)
        assert r["bwd_gbps"] == pytest.approx((32 * 4 + 32 + 64) * 24 * 4 / r["bwd_ms"] / 1e6)
    assert report["copy_gbps"] > 0


@pytest.mark.parametrize("backend,weight_grad", CONFIGS)
@pytest.mark.parametrize("pattern", ["random", "skewed", "repeats"])
def test_sparse_table_gradient_holds_the_touched_rows_of_the_dense_one(backend, weight_grad, pattern):
    """sparse_grad: a sparse gradient whose rows are exactly those read, equal to the reference's."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(50, 13, generator=gen).requires_grad_()
    indices = make_indices(pattern, 7, 9, 50, gen)
    weights = torch.rand(7, 9, generator=gen).requires_grad_()
    grad_out = torch.randn(7, 13, generator=gen)
    kernels.embedding_bag(weight, indices, weights, backend=backend, weight_grad=weight_grad,
                          sparse_grad=True).backward(grad_out)
    _, want_grad_weight, want_grad_weights = reference(weight, indices, weights, grad_out)
    assert weight.grad.is_sparse
    assert torch.equal(weight.grad._indices()[0], indices.flatten().unique())  # each row once, sorted
    assert_close(weight.grad.to_dense(), want_grad_weight, torch.float32)
    assert_close(weights.grad, want_grad_weights, torch.float32)


def test_sparse_gradients_of_several_reads_accumulate():
    """Two reads of one table (two memory layers, or two micro-steps) sum their touched rows."""
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(30, 5, generator=gen).requires_grad_()
    reads = [(torch.randint(0, 30, (4, 6), generator=gen), torch.rand(4, 6, generator=gen)) for _ in range(2)]
    sum(kernels.embedding_bag(weight, i, w, sparse_grad=True).square().sum() for i, w in reads).backward()
    dense = weight.detach().clone().requires_grad_()
    sum(F.embedding_bag(i, dense, per_sample_weights=w, mode="sum").square().sum() for i, w in reads).backward()
    assert weight.grad.is_sparse
    assert_close(weight.grad.to_dense(), dense.grad.double(), torch.float32)


@pytest.mark.parametrize("backend,weight_grad", CONFIGS)
@pytest.mark.parametrize("pattern", ["random", "skewed"])
def test_reads_add_their_table_gradient_into_grad_into(backend, weight_grad, pattern):
    """grad_into: three reads (three layers) in one backward add their table gradients into one tensor that
    already holds a gradient; the table itself gets none, the per-sample weights theirs."""
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(40, 11, generator=gen).requires_grad_()
    reads = [(make_indices(pattern, 5, 6, 40, gen), torch.rand(5, 6, generator=gen).requires_grad_(),
              torch.randn(5, 11, generator=gen)) for _ in range(3)]
    earlier = torch.randn(40, 11, generator=gen)
    into = earlier.clone()
    sum((kernels.embedding_bag(weight, i, w, backend=backend, weight_grad=weight_grad, grad_into=into) * g).sum()
        for i, w, g in reads).backward()
    assert weight.grad is None
    refs = [reference(weight, i, w, g) for i, w, g in reads]
    assert_close(into - earlier, sum(r[1] for r in refs), torch.float32)
    for (_, w, _), (_, _, want_grad_weights) in zip(reads, refs):
        assert_close(w.grad, want_grad_weights, torch.float32)


@pytest.mark.parametrize("into", [torch.zeros(10, 4, dtype=torch.float64), torch.zeros(10, 5), torch.zeros(4, 10).t(),
                                  torch.zeros(10, 4).to_sparse(), "sparse_grad"],
                         ids=["dtype", "shape", "strided", "sparse", "with-sparse-grad"])
def test_bad_grad_into_raises(into):
    weight, indices, weights = small_inputs()
    call = dict(sparse_grad=True, grad_into=torch.zeros(10, 4)) if into == "sparse_grad" else dict(grad_into=into)
    with pytest.raises(ValueError, match="grad_into must be"):
        kernels.embedding_bag(weight, indices, weights, **call)


def test_compile_keeps_the_op_in_one_graph():
    """torch.compile traces through the registered op (dense gradient): no graph break, same result."""
    import torch._dynamo
    torch._dynamo.reset()
    weight, indices, weights = small_inputs()
    weight.requires_grad_()
    fn = lambda w, i, p: kernels.embedding_bag(w, i, p).sin().sum()
    explanation = torch._dynamo.explain(fn)(weight, indices, weights)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    eager = torch.autograd.grad(fn(weight, indices, weights), weight)[0]
    compiled = torch.autograd.grad(torch.compile(fn, backend="aot_eager")(weight, indices, weights), weight)[0]
    torch.testing.assert_close(compiled, eager)


def half_table_inputs(dtype=torch.bfloat16, num_rows=50, tokens=6, bag=7, dim=12, seed=8):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_rows, dim, generator=gen).to(dtype)
    indices = make_indices("skewed", tokens, bag, num_rows, gen).int()
    return weight, indices, torch.rand(tokens, bag, generator=gen), torch.randn(tokens, dim, generator=gen).to(dtype)


@pytest.mark.parametrize("body", ["dense", "dense-into", "rows"])
def test_backward_bodies_size_nothing_from_data(body):
    """The backward ops' bodies as they run on a GPU (torch backend; a bf16 table, so the per-sample weight
    gradient gathers rather than using the CPU's sparse product) trace into one graph whose every size is
    known from the input shapes: no host sync. Their results match the reference."""
    import torch._dynamo
    torch._dynamo.reset()
    weight, indices, weights, grad_out = half_table_inputs()
    _, want_grad_weight, want_grad_weights = reference(weight, indices, weights, grad_out)
    if body.startswith("dense"):  # a fresh gradient, or added into one that holds something already
        fn = torch.compile(kernels._dense_backward, fullgraph=True, backend=no_host_reads)
        earlier = torch.randn(weight.shape)
        into = earlier.clone() if body == "dense-into" else None
        grad_weight, grad_weights = fn(into, weight, indices, weights, grad_out, False, "deterministic",
                                       torch.float32, True, True)
        if into is not None:
            assert not grad_weight.numel()
            grad_weight = into - earlier
    else:
        fn = torch.compile(kernels._row_backward, fullgraph=True, backend=no_host_reads)
        rows, grads, grad_weights = fn(weight, indices, weights, grad_out, False, torch.float32, True, False)
        count = len(indices.unique())
        assert len(rows) == min(indices.numel(), len(weight))
        assert torch.equal(rows[:count], indices.long().unique()) and (rows[count:] == rows[count - 1]).all()
        assert not grads[count:].any()  # padding: repeats of the last row read that add nothing to it
        grad_weight = torch.zeros_like(grads[:1]).expand_as(weight).clone().index_add_(0, rows, grads)
    assert grad_weight.dtype == torch.float32  # the fp32 master's gradient from a bf16 read
    assert_close(grad_weight, want_grad_weight, torch.bfloat16)
    assert_close(grad_weights, want_grad_weights, torch.bfloat16)


def test_gathered_pair_dots_in_chunks_equal_the_direct_dots():
    """The torch backend off the CPU gathers rows for the per-sample weight gradient a few tokens at a time."""
    weight, indices, _, grad_out = half_table_inputs(torch.float32, tokens=7, bag=5, dim=9)
    want = (weight.double()[indices] * grad_out.double().unsqueeze(1)).sum(-1)
    for chunk_bytes in (1, 2 * 5 * 9 * 4, 10**9):  # one token, two tokens (a short last chunk), all at once
        assert_close(kernels._gathered_pair_dots(weight, indices, grad_out, chunk_bytes), want, torch.float32)


@needs_triton
def test_dense_triton_backward_launches_over_the_rows_read(monkeypatch):
    """The sorted dense backward launches one program per row read (at most tokens * bag), not per table row."""
    grids, kernel = [], kernels._bag_kernel
    monkeypatch.setattr(kernels, "_sync_free", lambda t: True)  # as on a GPU: the rows read are not counted

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                grids.append(grid(constexprs))
                return kernel[grid](*args, **constexprs)
            return launch
    monkeypatch.setattr(kernels, "_bag_kernel", Spy())
    weight, indices, weights, grad_out = half_table_inputs(torch.float32, num_rows=500, tokens=3, bag=4)
    weight.requires_grad_()
    kernels.embedding_bag(weight, indices, weights, backend="triton").backward(grad_out)
    assert [g[0] for g in grids] == [3, 12]  # forward: a program per token; backward: per (padded) row read
    assert_close(weight.grad, reference(weight, indices, weights, grad_out)[1], torch.float32)


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
def test_a_launch_runs_on_the_device_of_its_tensors(monkeypatch):
    """A table on cuda:1 while the current device is 0 (one process started with --device=cuda:1): the kernel
    is launched with cuda:1 current, and 0 is current again after. Without a GPU: a recording device guard,
    a stand-in kernel and a stand-in for the table."""
    import contextlib
    current, launched = [0], []

    @contextlib.contextmanager
    def device(d):
        before, current[0] = current[0], torch.device(d).index
        yield
        current[0] = before

    class Table:  # what a launch reads of a (50, 40) fp32 tensor on cuda:1
        device, is_cuda, shape = torch.device("cuda", 1), True, (50, 40)
        element_size = staticmethod(lambda: 4)

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **constexprs: launched.append((current[0], constexprs))

    monkeypatch.setattr(torch.cuda, "device", device)
    kernels._launch(Kernel(), (1,), Table(), SCATTER=False)
    assert launched == [(1, dict(SCATTER=False, BLOCK_K=16, BLOCK_D=64))] and current == [0]
