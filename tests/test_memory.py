"""The product-key memory layer against brute force over all n_keys**2 materialised keys."""
import pytest
import torch
import torch.nn.functional as F

import kernels
import memory
from memory import ProductKeyMemory, ValueTable, product_key_topk
from optim import RowAdamW, mark_row_grads
from conftest import brute_force_lookup, no_host_reads


def boxed_no_host_reads(gm, example_inputs):
    from functorch.compile import make_boxed_func
    return make_boxed_func(no_host_reads(gm, example_inputs))


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
    params = [x, values.weight, layer.sub_keys, layer.query.weight]
    ref = torch.autograd.grad(want, params, grad)
    out.backward(grad)  # the table's .grad is dense, as dense AdamW takes it
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r)


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
    """On the CPU the search is exactly fp32 whatever autocast says."""
    torch.manual_seed(5)
    layer = ProductKeyMemory(dim=16, n_keys=8, heads=2, knn=3, k_dim=8, v_dim=16)
    x = torch.randn(6, 16)
    q, keys = layer.queries_and_keys(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s1, _ = layer.half_scores(q, keys)
        _, weights = layer.lookup(x)
    assert s1.dtype == torch.float32 and weights.dtype == torch.float32
    assert torch.equal(s1, torch.einsum("thk,hnk->thn", q[:, :, 0], keys[:, 0]))


def test_tensor_core_search_is_exact_for_the_scores_it_computes(monkeypatch):
    """CUDA's search scores with bf16 operands (SEARCH_DTYPES); forced on the CPU here: fp32 scores equal to
    the product of the bf16-rounded operands, and the top-k equals brute force over those scores."""
    monkeypatch.setitem(memory.SEARCH_DTYPES, "cpu", torch.bfloat16)
    torch.manual_seed(9)
    layer = ProductKeyMemory(dim=16, n_keys=12, heads=2, knn=5, k_dim=8, v_dim=16)
    x = torch.randn(30, 16)
    q, keys = layer.queries_and_keys(x)
    s1, s2 = layer.half_scores(q, keys)
    want_s1 = torch.einsum("thk,hnk->thn", q[:, :, 0].bfloat16(), keys[:, 0].bfloat16()).float()
    assert s1.dtype == torch.float32 and torch.equal(s1, want_s1)
    assert not torch.equal(s1, torch.einsum("thk,hnk->thn", q[:, :, 0], keys[:, 0]))  # the bf16 path did run
    indices, _ = layer.lookup(x)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
    chosen = full.gather(-1, indices.long().view(30, 2, 5))
    torch.testing.assert_close(chosen, full.topk(5, dim=-1).values, rtol=0, atol=0)


def dense_reference_grad(table, reads, grads):
    """The table gradient of several reads (one backward each), by F.embedding_bag in fp64."""
    weight = table.detach().double().requires_grad_()
    for (indices, weights), grad in zip(reads, grads):
        F.embedding_bag(indices, weight, per_sample_weights=weights.double(), mode="sum").backward(grad.double())
    return weight.grad


@pytest.mark.parametrize("gpu_form", [True, False], ids=["gpu-form", "cpu-form"])
def test_a_table_rowadamw_updates_gets_each_row_read_once(monkeypatch, gpu_form):
    """RowAdamW chooses the layout: built over the table, it makes every backward's .grad a coalesced sparse
    tensor of exactly the rows read, over 3 reads of the table per backward and 4 backwards (micro-steps),
    equal to F.embedding_bag's gradient. In the GPU's form (padded, uncoalesced row gradients, which CUDA
    autograd sums by concatenation; forced here) as in the CPU's; a single read's own gradient holds its
    rows only (padded to its pairs on the GPU), never an (N, v_dim) tensor."""
    if gpu_form:
        monkeypatch.setattr(kernels, "_sync_free", lambda t: True)
    torch.manual_seed(10)
    values = ValueTable(200, 6)
    RowAdamW(values.parameters(), compile=False)
    reads = [(torch.randint(0, 200, (5, 4)), torch.rand(5, 4)) for _ in range(12)]
    grads = [torch.randn(5, 6) for _ in reads]
    one_read = torch.autograd.grad((values(*reads[0]) * grads[0]).sum(), values.weight)[0]
    assert one_read.is_sparse and one_read._nnz() == (20 if gpu_form else len(reads[0][0].unique()))  # not 200
    for step in range(4):
        sum((values(*read) * grad).sum() for read, grad in zip(reads[3 * step:3 * step + 3],
                                                               grads[3 * step:3 * step + 3])).backward()
    grad = values.weight.grad
    assert grad.dtype == torch.float32 and grad.is_sparse and grad.is_coalesced()
    assert torch.equal(grad.indices()[0], torch.cat([i.flatten() for i, _ in reads]).unique())
    torch.testing.assert_close(grad.to_dense().double(), dense_reference_grad(values.weight, reads, grads))


class TensorsMade(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an op returns (not the ops inside a custom op)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("gpu_form", [True, False], ids=["gpu-form", "cpu-form"])
def test_reads_of_layers_x_micro_steps_add_into_one_dense_gradient(monkeypatch, gpu_form):
    """Under a dense optimizer, reads of any size (3 pairs of 40 rows, or 20): 3 reads per backward, 4
    micro-steps, then a new step after zero_grad. Every backward after the first adds into one (N, v_dim)
    gradient (the same tensor, step after step) and makes no tensor of the table's shape, dense or sparse;
    each step's gradient is F.embedding_bag's. GPU form: the rows read padded to a bound, not counted."""
    if gpu_form:
        monkeypatch.setattr(kernels, "_sync_free", lambda t: True)
    torch.manual_seed(11)
    values = ValueTable(40, 6)
    optimizer = torch.optim.SGD(values.parameters(), lr=0.0)

    def read(tokens, bag):
        return torch.randint(0, 40, (tokens, bag)), torch.rand(tokens, bag), torch.randn(tokens, 6)
    steps = [[[read(1, 3), read(5, 4), read(1, 3)] for _ in range(4)], [[read(1, 3)]]]
    buffer = None
    for step, micro_steps in enumerate(steps):
        optimizer.zero_grad()
        for micro, reads in enumerate(micro_steps):
            loss = sum((values(i, w) * g).sum() for i, w, g in reads)
            with TensorsMade() as made:
                loss.backward()
            if step or micro:
                assert (40, 6) not in made.shapes
        buffer = buffer if buffer is not None else values.weight.grad
        assert values.weight.grad is buffer and buffer.layout == torch.strided
        reads = [(i, w) for reads in micro_steps for i, w, _ in reads]
        grads = [g for reads in micro_steps for _, _, g in reads]
        torch.testing.assert_close(values.weight.grad.double(), dense_reference_grad(values.weight, reads, grads),
                                   rtol=1e-5, atol=1e-6)  # fp32 sums against fp64


def test_a_compiled_step_adds_into_the_gradient_buffer_itself():
    """The step as train.py runs it: the optimizer's zero_grad, then the table's, then a compiled forward and
    backward of two large reads. Inductor's code (both graphs) makes no (N, v_dim) tensor, so no second
    buffer to zero, save and copy back: the backward adds into weight.grad itself, the same tensor as
    before, which holds F.embedding_bag's gradient."""
    import re
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    torch.manual_seed(14)
    values = ValueTable(997, 24)  # sizes to find in the generated code
    optimizer = torch.optim.SGD(values.parameters(), lr=0.0)
    reads = [(torch.randint(0, 997, (300, 4)), torch.rand(300, 4), torch.randn(300, 24)) for _ in range(2)]

    def loss():
        return sum((values(i, w) * g).sum() for i, w, g in reads)
    loss().backward()  # eager: the first backward makes the buffer
    buffer = values.weight.grad
    optimizer.zero_grad(set_to_none=True)
    values.zero_grad()
    compiled = torch.compile(loss, fullgraph=True)
    _, code = run_and_get_code(lambda: compiled().backward())
    assert len(code) == 2  # the forward and the backward
    made = [m for c in code for m in re.findall(r"empty_strided\w*\(\(997, 24\)", c)]
    assert not made, made
    assert values.weight.grad is buffer
    torch.testing.assert_close(buffer.double(), dense_reference_grad(values.weight, [r[:2] for r in reads],
                                                                     [r[2] for r in reads]), rtol=1e-5, atol=1e-6)


def test_zero_grad_readies_the_buffer_that_reads_add_into():
    """The table's zero_grad makes the dense buffer before any backward and zeroes it before each step, as
    weight.grad; a read of few pairs and one of many both add into it, step after step. Once RowAdamW takes
    the table, zero_grad drops the buffer and leaves no gradient."""
    torch.manual_seed(15)
    values = ValueTable(40, 6)
    buffers = []
    for _ in range(2):
        values.zero_grad()
        buffers.append(values.weight.grad)
        assert not buffers[-1].any()
        reads = [(torch.randint(0, 40, (1, 3)), torch.rand(1, 3), torch.randn(1, 6)),
                 (torch.randint(0, 40, (5, 4)), torch.rand(5, 4), torch.randn(5, 6))]
        sum((values(i, w) * g).sum() for i, w, g in reads).backward()
        assert values.weight.grad is buffers[0] is buffers[-1]
        torch.testing.assert_close(buffers[-1].double(), dense_reference_grad(
            values.weight, [r[:2] for r in reads], [r[2] for r in reads]), rtol=1e-5, atol=1e-6)
    RowAdamW(values.parameters(), compile=False)
    values.zero_grad()
    assert values.weight.grad is None and values._grad is None


def test_a_converted_table_gets_a_new_gradient_buffer():
    """The buffer is the weight's dtype and device: after .double() the old fp32 one is dropped, not added into."""
    torch.manual_seed(13)
    values = ValueTable(40, 6)
    indices, weights = torch.randint(0, 40, (5, 4)), torch.rand(5, 4)
    values(indices, weights).sum().backward()
    values.double()
    values.weight.grad = None
    values(indices, weights.double()).sum().backward()
    assert values.weight.grad.dtype == torch.float64 and values._grad is values.weight.grad
    torch.testing.assert_close(values.weight.grad, dense_reference_grad(values.weight, [(indices, weights)],
                                                                        [torch.ones(5, 6)]))


def test_copied_tables_keep_their_gradient_hook():
    """deepcopy and pickling drop tensor hooks: a copied table must still keep its first dense gradient as
    the buffer later reads add into, and give RowAdamW coalesced rows (a deepcopied weight is a new
    Parameter, which RowAdamW marks again)."""
    import copy
    import pickle
    values = ValueTable(100, 4)
    indices = torch.tensor([[7, 3, 3], [50, 7, 1]])
    for rows in (False, True):
        for clone in (copy.deepcopy(values), pickle.loads(pickle.dumps(values))):
            if rows:
                RowAdamW(clone.parameters(), compile=False)
            clone(indices, torch.rand(2, 3)).sum().backward()
            grad = clone.weight.grad
            if rows:
                assert grad.is_sparse and grad.is_coalesced() and grad.indices()[0].tolist() == [1, 3, 7, 50]
            else:
                assert grad.layout == torch.strided and clone._grad is grad


@pytest.mark.parametrize("rows", [False, True], ids=["dense", "sparse-rows"])
def test_keep_grad_rows_leaves_the_masked_gradient(rows):
    """keep_grad_rows, under a dense optimizer and under RowAdamW: what is left is F.embedding_bag's gradient
    with every other row zeroed (row gradients: the other rows dropped, not stored as zeros), the dense
    buffer masked in place; it returns the kept share of the gradient's norm (None without a gradient)."""
    torch.manual_seed(16)
    values = ValueTable(40, 6)
    if rows:
        RowAdamW(values.parameters(), compile=False)
    assert values.keep_grad_rows(torch.tensor([1])) is None
    reads = [(torch.randint(0, 30, (5, 4)), torch.rand(5, 4)) for _ in range(2)]  # rows 30-39 never read
    grads = [torch.randn(5, 6) for _ in reads]
    sum((values(*read) * grad).sum() for read, grad in zip(reads, grads)).backward()
    before = values.weight.grad
    read = torch.cat([i.flatten() for i, _ in reads]).unique()
    kept = torch.cat([read[::2], torch.tensor([35])])
    full = dense_reference_grad(values.weight, reads, grads)
    mask = torch.zeros(40, 1, dtype=torch.bool)
    mask[kept] = True
    want = full * mask
    share = values.keep_grad_rows(kept)
    grad = values.weight.grad
    if rows:
        assert grad.is_sparse and grad.is_coalesced() and torch.equal(grad.indices()[0], read[::2])
        grad = grad.to_dense()
    else:
        assert grad is before
    torch.testing.assert_close(grad.double(), want)
    torch.testing.assert_close(share.double(), want.norm() / full.norm())


def test_reads_under_autocast_move_bf16_and_train_the_fp32_master(monkeypatch):
    """Under bf16 autocast every read of a step reads one bf16 copy of the table (2 bytes per element),
    returns bf16, and the fp32 weight gets an fp32 gradient equal to the fp32 computation's within bf16
    tolerance; the copy is remade after a backward and after an in-place edit of the weight."""
    torch.manual_seed(11)
    values = ValueTable(40, 16)
    tables_read, real = [], memory.embedding_bag
    monkeypatch.setattr(memory, "embedding_bag",
                        lambda *args, read=None, **kw: tables_read.append(read) or real(*args, read=read, **kw))
    reads = [(torch.randint(0, 40, (6, 5)), torch.rand(6, 5, requires_grad=True)) for _ in range(3)]
    grads = [torch.randn(6, 16) for _ in reads]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [values(*read) for read in reads]
    assert all(t is tables_read[0] and t.dtype == torch.bfloat16 for t in tables_read)  # one copy, made once
    assert torch.equal(tables_read[0], values.weight.detach().bfloat16())
    assert all(out.dtype == torch.bfloat16 for out in outs)
    sum((out.float() * grad).sum() for out, grad in zip(outs, grads)).backward()
    weight = values.weight.detach().double().requires_grad_()
    want = [F.embedding_bag(i, weight, per_sample_weights=w.detach().double(), mode="sum") for i, w in reads]
    for out, w in zip(outs, want):
        torch.testing.assert_close(out.double(), w.detach(), rtol=0, atol=3e-2 * w.abs().max().item())
    sum((w * grad.double()).sum() for w, grad in zip(want, grads)).backward()
    assert values.weight.grad.dtype == torch.float32 and not values.weight.grad.is_sparse
    torch.testing.assert_close(values.weight.grad.double(), weight.grad, rtol=0, atol=3e-2 * weight.grad.abs().max())
    for (i, w), grad in zip(reads, grads):
        ref = (weight.detach()[i] * grad.double().unsqueeze(1)).sum(-1)
        assert w.grad.dtype == torch.float32
        torch.testing.assert_close(w.grad.double(), ref, rtol=0, atol=3e-2 * ref.abs().max().item())

    assert values._copy is None  # dropped by the backward: the optimizer will change the weight
    with torch.no_grad():
        values.weight.mul_(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = values.read_copy()
        with torch.no_grad():
            values.weight.add_(1)
        assert torch.equal(values.read_copy(), values.weight.detach().bfloat16()) and first is not values._copy


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse-rows"])
def test_layer_forward_and_backward_compile_in_one_graph_without_host_syncs(sparse):
    """A memory layer reading a ValueTable: forward and backward trace into one graph each (fullgraph), with
    no size or value the host must read, and give eager's output and gradients, over a step of two
    micro-steps and the next step (dense: the first backward makes the gradient buffer, the next step's first
    read zeroes it, and reads add into it). keep_inference_input_mutations as inductor sets it."""
    import copy
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd
    torch._dynamo.reset()
    torch.manual_seed(12)
    layer = ProductKeyMemory(dim=16, n_keys=8, heads=2, knn=4, k_dim=8, v_dim=16)
    values = ValueTable(64, 16)
    xs = torch.randn(3, 10, 16)
    backend = aot_autograd(fw_compiler=boxed_no_host_reads, bw_compiler=boxed_no_host_reads,
                           keep_inference_input_mutations=True)
    results = []
    for compiled in (False, True):
        layer_, values_ = copy.deepcopy((layer, values))
        params = [values_.weight, *layer_.parameters()]
        if sparse:
            mark_row_grads([values_.weight])

        def step(x):
            return layer_(x, values_).square().sum()
        fn = torch.compile(step, fullgraph=True, backend=backend) if compiled else step
        results.append([])
        for micro, x in enumerate(xs):  # micro-steps 0 and 1 make one step; 2 starts the next
            if micro != 1:
                for p in params:
                    p.grad = None
            loss = fn(x)
            loss.backward()
            results[-1] += [loss.detach()] + [p.grad.to_dense() if p.grad.is_sparse else p.grad.clone() for p in params]
            assert values_.weight.grad.is_sparse == sparse
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


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

