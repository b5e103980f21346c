"""Sparse memory finetuning (finetune.py) against references: the TF-IDF ranking against a brute-force
count of every layer's lookups, the rows an optimizer step changes, two column-sharded ranks against one
process, LoRA before and after merging, and the disjoint second knowledge base."""
import copy
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

import facts
from finetune import (LoRALinear, SparseMemoryFinetune, document_frequency, inverse_document_frequency,
                      merge_lora, prepare)
from memory import ProductKeyMemory
from model import GPT, GPTConfig
from optim import RowAdamW, mark_row_grads
from conftest import DEADLINE, run_ranks

# three layers, two of them memory layers that share one table of 256 rows
CONFIG = GPTConfig(vocab_size=32, block_size=16, n_layer=3, n_head=2, n_embd=16, memory_layers=(0, 2),
                   mem_n_keys=16, mem_heads=2, mem_knn=4)
ROWS = 10  # rows updated per step


def tiny_model(**changes):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**CONFIG.__dict__, **changes}))


def tokens(seed, batch, length=8):
    return torch.randint(0, CONFIG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


BACKGROUND = [tokens(100 + b, 2) for b in range(6)]  # small batches, so that rows differ in df
BATCH = tokens(1, 4), tokens(2, 4)  # (ids, targets) of the finetuning step


def brute_force_reads(model, idx):
    """Every memory layer's read rows for idx, each from the layer's own lookup of the input that
    Block.forward hands it (the forward written out; its logits are checked against the model's)."""
    cos, sin = model.rotary(0, idx.shape[1])
    x, reads = model.tok_emb(idx), []
    for block in model.blocks:
        x = x + block.attn(block.attn_norm(x), cos, sin)
        h = block.ffn_norm(x)
        if isinstance(block.ffn, ProductKeyMemory):
            reads.append(block.ffn.lookup(h.reshape(-1, h.shape[-1]))[0].numpy().ravel())
            x = x + block.ffn(h, model.values[0])
        else:
            x = x + block.ffn(h)
    torch.testing.assert_close(model.lm_head(model.norm(x)), model(idx)[0], rtol=0, atol=0)
    return reads


def reference_selection(batch_reads, background_reads, n_rows, rows=ROWS):
    """(selected rows best first, df), by counting in numpy: tf * idf, ties to the lower row, score > 0."""
    c = np.bincount(np.concatenate(batch_reads), minlength=n_rows)
    df = sum((np.bincount(np.concatenate(r), minlength=n_rows) > 0).astype(int) for r in background_reads)
    score = c / c.sum() * np.log((len(background_reads) + 1) / (df + 1))
    order = sorted(range(n_rows), key=lambda i: (-score[i], i))
    return [i for i in order[:rows] if score[i] > 0], df


@torch.no_grad()
def reads_of(model, batches):
    return [brute_force_reads(model, idx) for idx in batches]


def test_the_ranking_counts_every_layer_sharing_the_table_against_brute_force():
    model = tiny_model()
    prepare(model, "smf")
    n_rows = len(model.values[0].weight)
    df, n = document_frequency(model, BACKGROUND)
    idf = inverse_document_frequency(df, n)
    smf, every = SparseMemoryFinetune(model, idf, ROWS), SparseMemoryFinetune(model, idf, n_rows)
    ids, targets = BATCH
    for half in (slice(0, 2), slice(2, 4)):  # two micro-steps: the step's batch is both
        model(ids[half], targets[half])[1].backward()
    with torch.no_grad():
        model(tokens(3, 4))  # an evaluation in between reads rows but trains none
    selected, positive = smf.mask_gradients()[0].tolist(), every.mask_gradients()[0].tolist()

    # a document is one sequence: each background sequence read on its own
    batch_reads, background_reads = reads_of(model, [ids])[0], reads_of(model, [s[None] for b in BACKGROUND for s in b])
    expected, expected_df = reference_selection(batch_reads, background_reads, n_rows)
    assert n == sum(map(len, BACKGROUND)) and df[0].tolist() == expected_df.tolist()
    assert selected == expected and len(selected) == ROWS
    # rows scoring 0 (unread, or read by every background batch) are never selected
    assert positive == reference_selection(batch_reads, background_reads, n_rows, n_rows)[0]
    assert ROWS < len(positive) < n_rows
    # the test tells: counting one layer, or ranking by tf alone, picks other rows
    assert reference_selection(batch_reads[:1], background_reads, n_rows)[0] != expected
    assert reference_selection(batch_reads, [[np.zeros(1, int)]], n_rows)[0] != expected
    # and whole batches as documents give other document frequencies
    assert reference_selection(batch_reads, reads_of(model, BACKGROUND), n_rows)[1].tolist() != expected_df.tolist()
    assert model.training


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.5),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0),
    "rowadamw": lambda params: RowAdamW(params, lr=1e-2, weight_decay=0.1, compile=False),
}


@pytest.mark.parametrize("sparse, optimizer", [(False, "sgd"), (False, "adamw"), (True, "sgd"), (True, "rowadamw")])
def test_a_step_changes_exactly_the_selected_rows(sparse, optimizer):
    model = tiny_model()
    params = prepare(model, "smf")
    table = model.values[0]
    if sparse:  # RowAdamW marks its own
        mark_row_grads(params)
    assert params == [table.weight]
    smf = SparseMemoryFinetune(model, inverse_document_frequency(*document_frequency(model, BACKGROUND)), ROWS)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    opt = OPTIMIZERS[optimizer](params)
    model(*BATCH)[1].backward()
    assert table.weight.grad.is_sparse == sparse
    with torch.no_grad():
        rows_with_grad = int((table.weight.grad.to_dense().abs().sum(1) > 0).sum())
    selected = smf.mask_gradients()[0]
    opt.step()
    changed = (table.weight != before["values.0.weight"]).any(1).nonzero().flatten()
    assert sorted(changed.tolist()) == sorted(selected.tolist()) and len(selected) == ROWS
    assert rows_with_grad > 3 * ROWS  # without the mask, many more rows would have changed
    for name, t in model.state_dict().items():
        if name != "values.0.weight":
            assert torch.equal(t, before[name]), name


def sharded_worker(rank, world, port, path):
    """One of two ranks holding half the columns of the table: document frequencies and the step's
    selection from this rank's half of every batch, counts summed over ranks."""
    import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=DEADLINE))
    par = distributed.joined(torch.device("cpu"), world)
    torch.manual_seed(0)
    model = GPT(CONFIG, value_table=par.value_table)
    prepare(model, "smf")
    mine = lambda t: t.chunk(world)[rank]
    idf = inverse_document_frequency(*document_frequency(model, [mine(b) for b in BACKGROUND], par.sum))
    smf = SparseMemoryFinetune(model, idf, ROWS, reduce=par.sum)
    model(*map(mine, BATCH))[1].backward()
    par.average_value_grads([model.values[0].weight])
    selected = smf.mask_gradients()[0]
    grad_rows = (model.values[0].weight.grad.abs().sum(1) > 0).nonzero().flatten()
    torch.save({"selected": selected, "grad_rows": grad_rows, "width": model.values[0].weight.shape[1]},
               f"{path}.{rank}")
    dist.barrier()  # neither rank tears gloo down while the other still talks to it (a rare SIGABRT at exit)
    dist.destroy_process_group()


def unsharded_selection(batch, background):
    model = tiny_model()
    prepare(model, "smf")
    smf = SparseMemoryFinetune(model, inverse_document_frequency(*document_frequency(model, background)), ROWS)
    model(*batch)[1].backward()
    return smf.mask_gradients()[0].tolist()


def test_two_column_sharded_ranks_select_the_rows_of_the_combined_batch(tmp_path):
    world, path = 2, str(tmp_path / "selected")
    run_ranks(sharded_worker, world, path)
    expected = unsharded_selection(BATCH, BACKGROUND)
    assert len(expected) == ROWS
    for rank in range(world):
        result = torch.load(f"{path}.{rank}")
        assert result["width"] == CONFIG.n_embd // world  # a column shard
        assert result["selected"].tolist() == expected, rank
        assert sorted(result["grad_rows"].tolist()) == sorted(expected), rank
    # the test tells: one rank's tokens alone rank other rows
    halves = [t.chunk(world)[0] for t in BATCH], [b.chunk(world)[0] for b in BACKGROUND]
    assert unsharded_selection(*halves) != expected


def test_lora_starts_as_the_model_and_merges_into_the_same_outputs():
    model = tiny_model(memory_layers=(1,))
    original = copy.deepcopy(model)
    params = prepare(model, "lora", lora_rank=4, lora_alpha=8)
    adapted = {name.removesuffix(".lora_a").removesuffix(".lora_b") for name, p in model.named_parameters()
               if p.requires_grad}
    assert adapted == {f"blocks.{i}.{m}" for i in range(3) for m in ("attn.qkv", "attn.proj")} | {
        f"blocks.{i}.ffn.{w}" for i in (0, 2) for w in ("w1", "w2", "w3")}
    assert len(params) == 2 * len(adapted)
    ids, targets = BATCH
    assert torch.equal(model(ids)[0], original(ids)[0])  # B = 0: the model itself

    opt = torch.optim.AdamW(params, lr=1e-2)
    model(ids, targets)[1].backward()
    opt.step()
    assert all(m.lora_b.abs().min() > 0 for m in model.modules() if isinstance(m, LoRALinear))
    with torch.no_grad():
        unmerged = model(ids)[0]
        assert (unmerged - original(ids)[0]).abs().max() > 1e-3  # the step changed the outputs
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(ids)[0], unmerged, rtol=0, atol=1e-5)
        plain = tiny_model(memory_layers=(1,))
        plain.load_state_dict(model.state_dict())  # a plain GPT checkpoint again
        torch.testing.assert_close(plain(ids)[0], unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode, trained", [("full", "all"), ("values", "values"), ("smf", "values")])
def test_modes_train_what_they_say(mode, trained):
    model = tiny_model()
    params = prepare(model, mode)
    expected = list(model.parameters()) if trained == "all" else [p for _, p in model.value_parameters()]
    assert {id(p) for p in params} == {id(p) for p in expected}
    assert all(p.requires_grad == (id(p) in {id(q) for q in params}) for p in model.parameters())


def test_a_second_knowledge_base_has_new_people_with_the_same_attributes():
    first = facts.make_facts(300, seed=0)
    names = [name for name, _ in first]
    second = facts.make_facts(300, seed=0, exclude=names)  # the same seed would redraw every name of the first
    assert facts.make_facts(300, seed=0, exclude=()) == first  # nothing excluded: the draw is unchanged
    assert second == facts.make_facts(300, seed=0, exclude=names)
    assert len({name for name, _ in second}) == 300 and not set(names) & {name for name, _ in second}
    assert all(set(values) == set(facts.ATTRIBUTES) for _, values in second)
    firsts = {(a + b).capitalize() for a in facts.FIRST_SYLLABLES for b in facts.SECOND_SYLLABLES}
    lasts = {(a + e).capitalize() for a in facts.FIRST_SYLLABLES for e in facts.LAST_ENDINGS}
    with pytest.raises(ValueError, match="names left after excluding"):
        facts.make_facts(1, seed=0, exclude=[f"{f} {l}" for f in firsts for l in lasts])


def test_train_py_smf_changes_only_value_rows_and_scores_what_is_retained(char_data_dir, tmp_path):
    """Through train.py: finetune='smf' with SGD leaves every weight but the table bit-identical, changes at
    most smf_rows rows per step, and logs the retained dataset's scores at each eval."""
    from conftest import config_for, read_log
    from train import train
    common = dict(memory_layers=(1,), mem_n_keys=16, eval_interval=2, log_interval=1)
    train(config_for(char_data_dir, tmp_path / "base", max_iters=2, **common))
    train(config_for(char_data_dir, tmp_path / "smf", max_iters=2, init_from=str(tmp_path / "base"), finetune="smf",
                     optimizer="sgd", smf_rows=5, smf_background_batches=2, mem_value_lr=1.0,
                     facts_retain_dataset="tiny", **common))
    before = torch.load(tmp_path / "base" / "ckpt.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "smf" / "ckpt.pt", weights_only=True)["model"]
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["values.0.weight"]
    rows = (before["values.0.weight"] != after["values.0.weight"]).any(dim=1).sum()
    assert 0 < rows <= 2 * 5
    evals = read_log(tmp_path / "smf", "eval")
    assert all("retain_val_loss" in e for e in evals)
    assert evals[0]["retain_val_loss"] == pytest.approx(evals[0]["val_loss"], abs=1e-6)  # the same data here


def test_train_py_lora_checkpoints_load_as_a_plain_gpt(char_data_dir, tmp_path):
    from conftest import config_for, run
    from train import train
    train(config_for(char_data_dir, tmp_path / "base", max_iters=2, eval_interval=2, memory_layers=(1,)))
    train(config_for(char_data_dir, tmp_path / "lora", max_iters=3, eval_interval=3, memory_layers=(1,),
                     init_from=str(tmp_path / "base"), finetune="lora", lora_rank=2, learning_rate=1e-2))
    before = torch.load(tmp_path / "base" / "ckpt.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "lora" / "ckpt.pt", weights_only=True)["model"]
    assert set(before) == set(after)  # merged: no adapter keys
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("attn.qkv.weight", "attn.proj.weight", "ffn.w1.weight", "ffn.w2.weight",
                                       "ffn.w3.weight")) for k in changed)
    assert "blocks.1.ffn.query.weight" not in changed and "values.0.weight" not in changed
    result = run("sample.py", f"--out_dir={tmp_path / 'lora'}", "--max_new_tokens=5", "--num_samples=1")
    assert result.returncode == 0, result.stderr


def test_finetuning_modes_need_a_trained_model(char_data_dir, tmp_path):
    from conftest import run
    result = run("train.py", f"--data_dir={char_data_dir}", "--dataset=tiny", f"--out_dir={tmp_path}",
                 "--finetune=smf")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: finetune='smf' needs a trained model to start from, but "
                                    "init_from='scratch': set init_from=<a trained run's out_dir>")


def test_train_py_smf_learns_new_facts_and_keeps_the_old(tmp_path):
    """Sparse memory finetuning learns: from a memory model that knows knowledge base A, finetune='smf' on B
    lowers B's answer NLL by a margin while A's stays within a tolerance. With whole batches as the idf's
    documents every row this table holds is read by every background batch (idf 0), and nothing is learned."""
    from conftest import config_for, read_log
    from prepare_data import write_facts
    from train import train
    data_dir = str(tmp_path / "data")
    write_facts(40, 0, tuple(facts.ATTRIBUTES), "char", "kb", data_dir, new_entities=10)
    model = dict(dataset="kb", n_layer=2, n_embd=32, block_size=96, batch_size=8, memory_layers=(1,), mem_heads=1,
                 mem_n_keys=32, mem_knn=8, mem_k_dim=16, mem_swilu=True, mem_qk_norm=True, facts_eval_size=100,
                 eval_iters=2, log_interval=10)
    train(config_for(data_dir, tmp_path / "base", max_iters=300, eval_interval=300, learning_rate=1e-2,
                     min_lr=1e-3, mem_value_lr=1e-1, **model))
    train(config_for(data_dir, tmp_path / "smf", **{**model, "dataset": "kb_new", "batch_size": 4}, init_from=str(tmp_path / "base"),
                     finetune="smf", facts_retain_dataset="kb", max_iters=150, eval_interval=150, warmup_iters=0,
                     weight_decay=0.0, smf_rows=64, smf_background_batches=20, mem_value_lr=0.1,
                     mem_sparse_update=True))
    first, last = read_log(tmp_path / "smf", "eval")
    assert last["facts_nll"] < first["facts_nll"] - 0.2  # B learned (measured: -0.28)
    assert last["retain_facts_nll"] < first["retain_facts_nll"] + 0.15  # A kept (measured: +0.09)
    trained = read_log(tmp_path / "smf", "train")[-1]
    assert trained["smf_idf_zero"][0] < 0.5  # whole batches as documents: most rows at idf 0
