"""The Engram block against independent references: its hash against a plain-int loop over n-grams, its
forward and gradients against a plain gather-concat-gate, its rows across processes, decoding and spread."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from engram import Engram, ngram_hash
from memory import ValueTable
from conftest import ROOT

P = 2**31 - 1
M64 = 2**64 - 1


def reference_splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def reference_rows(tokens, orders, heads, table_rows, prefix=None):
    """The documented hash, one n-gram at a time in Python ints: tokens a list of ids, prefix the ids before
    them (any number; -1 before those) -> [position][order-major (order, head)] rows."""
    context = max(orders) - 1
    before = ([-1] * context + list(prefix or []))[-context:] if context else []
    seq = before + list(tokens)
    out = []
    for t in range(len(before), len(seq)):
        row = []
        for n in orders:
            gram = seq[t - n + 1:t + 1]
            for j in range(heads):
                key = n * 2**32 + j
                a = 2 + reference_splitmix64(2 * key) % (P - 2)
                h = reference_splitmix64(2 * key + 1) % P
                for token in gram:
                    h = ((h ^ (token + 1)) * a) % P
                row.append(h % table_rows)
        out.append(row)
    return out


def reference_forward(engram, x, table, rows):
    """Gather each row with F.embedding, concatenate, project, gate: the paper's formula written out."""
    e = F.embedding(rows, table).flatten(2)  # (B, T, reads * emb_dim)
    k, v = e @ engram.w_k.weight.T, e @ engram.w_v.weight.T

    def rms_norm(z, gain, eps):
        return z / (z.pow(2).mean(-1, keepdim=True) + eps).sqrt() * gain

    h_hat = rms_norm(x, engram.norm_h.weight, engram.norm_h.eps)
    k_hat = rms_norm(k, engram.norm_k.weight, engram.norm_k.eps)
    alpha = torch.sigmoid((h_hat * k_hat).sum(-1, keepdim=True) / engram.dim ** 0.5)
    return alpha * v


def test_reference_splitmix64_is_the_published_one():
    assert reference_splitmix64(0) == 0xE220A8397B1DCDAF  # SplitMix64's first output from seed 0


@pytest.mark.parametrize("orders,heads,table_rows", [((2, 3), 4, 97), ((1, 2, 4), 3, 1000), ((3,), 1, 2**31 - 1)])
@pytest.mark.parametrize("prefix_length", [None, 1, "context", 7])
def test_hash_matches_brute_force_loop(orders, heads, table_rows, prefix_length):
    torch.manual_seed(0)
    B, T, context = 3, 6, max(orders) - 1
    idx = torch.randint(0, 50_000, (B, T))
    prefix = None
    if prefix_length is not None:  # shorter than the n-grams reach (PAD before it), exact, or longer
        prefix = torch.randint(0, 50_000, (B, context if prefix_length == "context" else prefix_length))
    rows = ngram_hash(idx, orders, heads, table_rows, prefix)
    assert rows.dtype == torch.int64 and rows.shape == (B, T, len(orders) * heads)
    for b in range(B):
        want = reference_rows(idx[b].tolist(), orders, heads, table_rows,
                              None if prefix is None else prefix[b].tolist())
        assert rows[b].tolist() == want


def test_hash_rejects_bad_sizes():
    idx = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="prefix"):
        ngram_hash(idx, (2, 3), 4, 100, prefix=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="table_rows"):
        ngram_hash(idx, (2, 3), 4, 2**31)
    with pytest.raises(ValueError, match="orders"):
        Engram(dim=8, table_rows=100, emb_dim=4, orders=(0, 2))
    with pytest.raises(ValueError, match="distinct"):  # a repeated order would read the same rows twice
        Engram(dim=8, table_rows=100, emb_dim=4, orders=(2, 2))


def make_block(table_rows, dtype=torch.float64):
    """An Engram with random (not initial) norm gains and a W_v large enough that every term matters."""
    torch.manual_seed(0)
    engram = Engram(dim=12, table_rows=table_rows, emb_dim=5, orders=(2, 3), heads=3).to(dtype)
    values = ValueTable(*engram.table_shape()).to(dtype)
    with torch.no_grad():
        engram.w_v.weight.normal_(std=0.3)
        engram.norm_h.weight.uniform_(0.5, 1.5)
        engram.norm_k.weight.uniform_(0.5, 1.5)
    return engram, values


@pytest.mark.parametrize("table_rows", [23, 4099])  # a dense gradient buffer, and row gradients made dense
def test_forward_and_gradients_match_plain_gather(table_rows):
    engram, values = make_block(table_rows)
    idx = torch.randint(0, 30, (2, 7))
    x = torch.randn(2, 7, engram.dim, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([reference_rows(seq, engram.orders, engram.heads, table_rows) for seq in idx.tolist()])

    values.zero_grad()
    out = engram(x, values, idx)
    table = values.weight.detach().clone().requires_grad_()
    want = reference_forward(engram, x, table, rows)
    torch.testing.assert_close(out, want)

    grad = torch.randn_like(out)
    params = [x, engram.w_k.weight, engram.w_v.weight, engram.norm_h.weight, engram.norm_k.weight]
    out.backward(grad)
    got = [p.grad for p in params] + [values.weight.grad]
    for g, r in zip(got, torch.autograd.grad(want, params + [table], grad)):
        torch.testing.assert_close(g, r)


def test_reads_are_recorded_in_the_usage_tally():
    engram, values = make_block(50)
    values.usage = torch.zeros(50)
    idx = torch.randint(0, 30, (2, 7))
    with torch.no_grad():
        engram(torch.randn(2, 7, engram.dim, dtype=torch.float64), values, idx)
    rows = torch.tensor(reference_rows(idx[0].tolist(), (2, 3), 3, 50) + reference_rows(idx[1].tolist(), (2, 3), 3, 50))
    torch.testing.assert_close(values.usage, torch.bincount(rows.flatten(), minlength=50).float())


def test_block_runs_under_autocast():
    engram, values = make_block(64, torch.float32)
    idx, x = torch.randint(0, 30, (2, 5)), torch.randn(2, 5, engram.dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = engram(x, values, idx)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, engram(x, values, idx), rtol=0.05, atol=0.02)


HASH_IN_A_PROCESS = ("import torch; from engram import ngram_hash; "
                     "print(ngram_hash(torch.arange(40).view(2, 20) * 997 % 50257, (2, 3), 4, 10007).tolist())")
PINNED = [[42, 763, 20, 853], [533, 378, 540, 574], [71, 965, 971, 672], [209, 718, 758, 488]]


def test_rows_are_the_same_in_every_process_and_pinned():
    """A trained table is only as good as the rows it was trained at: they may never depend on the process
    (Python's salted hash would) nor change between versions."""
    here = ngram_hash(torch.arange(40).view(2, 20) * 997 % 50257, (2, 3), 4, 10007).tolist()
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run([sys.executable, "-c", HASH_IN_A_PROCESS], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)
        assert eval(run.stdout) == here
    assert ngram_hash(torch.tensor([[0, 1, 2, 3]]), (2, 3), 2, 1000)[0].tolist() == PINNED


def test_incremental_decoding_with_prefix_equals_the_full_sequence():
    engram, values = make_block(101)
    B, T, context = 2, 9, max(engram.orders) - 1
    idx = torch.randint(0, 30, (B, T))
    x = torch.randn(B, T, engram.dim, dtype=torch.float64)
    full_rows = ngram_hash(idx, engram.orders, engram.heads, 101)
    full_out = engram(x, values, idx)
    padded = torch.cat([torch.full((B, context), -1), idx], dim=1)
    for t, length in [(0, 1), (1, 1), (2, 1), (5, 1), (8, 1), (3, 4)]:  # single tokens and a chunk
        prefix = padded[:, t:t + context]  # the context tokens before position t, -1 before the start
        step = slice(t, t + length)
        assert torch.equal(ngram_hash(idx[:, step], engram.orders, engram.heads, 101, prefix), full_rows[:, step])
        torch.testing.assert_close(engram(x[:, step], values, idx[:, step], prefix), full_out[:, step])


@pytest.mark.parametrize("stream", ["random", "consecutive"])
def test_rows_spread_evenly_and_heads_disagree(stream):
    """Each (order, head) puts 20 n-grams on a row on average; a row more than 3x that is out of the question
    for a uniform hash (Poisson(20) tail), and two hashes of one n-gram agree about 1 time in table_rows.
    Consecutive ids are structured input, on which a weak hash (a sum of ids, say) leaves rows unread."""
    table_rows, n = 1000, 20_000
    if stream == "random":
        idx = torch.randint(0, 50_257, (1, n), generator=torch.Generator().manual_seed(0))
    else:
        idx = torch.arange(n).view(1, n)
    rows = ngram_hash(idx, (2, 3), 4, table_rows)[0]  # (n, 8)
    for pair in rows.T:
        counts = torch.bincount(pair, minlength=table_rows)
        assert counts.max() <= 3 * n / table_rows and counts.min() > 0
    agree = (rows[:, :, None] == rows[:, None, :]).float().mean(0)  # (8, 8) fraction of positions
    assert agree[~torch.eye(8, dtype=torch.bool)].max() < 0.005


def test_parameter_and_flop_counts_match_hand_counts():
    dim, emb, reads = 12, 5, 6  # orders (2, 3), 3 heads
    engram = Engram(dim=dim, table_rows=100, emb_dim=emb, orders=(2, 3), heads=3)
    assert engram.table_shape() == (100, emb)
    assert engram.active_params() == 2 * reads * emb * dim + 2 * dim + reads * emb
    assert engram.flops_per_token() == 2 * reads * emb + 2 * 2 * reads * emb * dim + 2 * dim


def engram_gpt(**over):
    from model import GPT, GPTConfig
    config = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, engram_layers=(1,),
                  engram_rows=997, engram_dim=8, engram_orders=(2, 3), engram_heads=2)
    return GPT(GPTConfig(**{**config, **over}))


def test_cached_decoding_reads_the_rows_of_the_full_sequence():
    """Token by token with the KV cache, the model's Engram layer hashes the n-grams the full sequence has
    (GPT.forward's prefix): the logits equal the full forward's. Without the prefix they would not."""
    from model import KVCache
    torch.manual_seed(0)
    model = engram_gpt().eval()
    torch.nn.init.normal_(model.blocks[1].ffn.w_v.weight, std=1.0)  # make the block's read count
    idx = torch.randint(0, 50, (2, 12))
    full, _ = model(idx)

    def decoded(with_prefix):
        caches = [KVCache(2, 2, 16, 16, "cpu", torch.float32) for _ in model.blocks]
        logits = [model(idx[:, :6], caches=caches)[0]]
        for pos in range(6, 12):
            prefix = idx[:, :pos] if with_prefix else None
            logits.append(model(idx[:, pos:pos + 1], caches=caches, start=pos, prefix=prefix)[0])
        return torch.cat(logits, dim=1)

    torch.testing.assert_close(decoded(True), full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(decoded(False), full, atol=1e-3)
    model.generate(idx[:, :4], 4, temperature=0)  # the generation loop passes its prefix


def test_an_engram_model_learns_what_follows_each_pair_of_tokens():
    """A sequence where each token is a fixed function of the two before it: a model whose only feed-forward
    block is Engram (2-grams hashed) learns it; its loss falls far below the first step's."""
    torch.manual_seed(0)
    rule = torch.randint(0, 50, (50, 50))
    seqs = torch.randint(0, 50, (256, 17))
    for t in range(2, 17):
        seqs[:, t] = rule[seqs[:, t - 2], seqs[:, t - 1]]
    model = engram_gpt(n_layer=1, engram_layers=(0,), engram_orders=(2,), engram_rows=4093, engram_dim=16)
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.0, 1e-2, 1e-1))
    losses = []
    for step in range(150):
        batch = seqs[torch.randint(0, 256, (32,))]
        for table in model.values:
            table.zero_grad()
        loss = model(batch[:, :-1], batch[:, 1:])[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 3.5 and sum(losses[-10:]) / 10 < 1.0, (losses[0], losses[-10:])
