"""Several processes (gloo on CPU) against one: the sharded read, the loss curve, checkpoints, bad launches.

Every process started here runs under a deadline and is killed with its children when it passes it, so
a hung collective fails a test instead of hanging pytest.
"""
import json
import os
import shutil
import signal
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from conftest import DEADLINE, ROOT, run_ranks, start, start_ranks, start_torchrun, start_train, wait_all

LOSS_TOLERANCE = 1e-4  # absolute, on losses near 4: the runs differ by float summation order only


def losses(out_dir):
    """{(event, iter): loss} of a run's log."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {(e["event"], e["iter"]): e.get("loss", e.get("val_loss")) for e in map(json.loads, f)
                if e["event"] in ("train", "eval")}


def greedy_sample(out_dir):
    return start([sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={out_dir}", "--start=First",
                  "--num_samples=1", "--max_new_tokens=60", "--temperature=0", "--device=cpu"])


# ---- the sharded read against the unsharded layer ---------------------------------------------------------
def sharded_layer_worker(rank, world, port, results_path):
    """One rank: for each layout of `world` ranks, the memory layer's output and gradients on this rank's
    tokens, sharded and DDP-averaged as in training, minus the unsharded layer's on all tokens."""
    import distributed
    from memory import ProductKeyMemory, ValueTable

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=DEADLINE))
    tokens, dim, v_dim = 5, 16, 12
    differences = {}
    for m in (1, 2, 4):
        par = distributed.joined(torch.device("cpu"), m)
        torch.manual_seed(0)
        layer = ProductKeyMemory(dim, n_keys=8, heads=2, knn=4, k_dim=8, v_dim=v_dim, swilu=True)
        table = ValueTable(64, v_dim)
        torch.manual_seed(0)  # the same seed builds the same layer and this rank's columns of the same table
        sharded_layer = ProductKeyMemory(dim, n_keys=8, heads=2, knn=4, k_dim=8, v_dim=v_dim, swilu=True)
        shard = par.value_table(64, v_dim)
        x = torch.randn(world * tokens, dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
        grad_out = torch.randn(world * tokens, dim, generator=torch.Generator().manual_seed(2))
        mine = slice(rank * tokens, (rank + 1) * tokens)

        # reference: one process, all tokens, the loss is the mean of the ranks' losses
        out = layer(x, table)
        ((out * grad_out).sum() / world).backward()
        # sharded: this rank's tokens and loss; DDP would average the replicated gradients
        x_mine = x.detach()[mine].requires_grad_()
        sharded_out = sharded_layer(x_mine, shard)
        (sharded_out * grad_out[mine]).sum().backward()
        for p in sharded_layer.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        par.average_value_grads(shard.parameters())

        diff = lambda a, b: (a - b).abs().max().item()
        differences[m] = {
            "initial values": diff(shard.weight, table.weight[:, shard.columns]),
            "output": diff(sharded_out, out[mine]),
            "input grad": diff(x_mine.grad / world, x.grad[mine]),
            "value grad": diff(shard.weight.grad, table.weight.grad[:, shard.columns]),
            **{f"{name} grad": diff(p.grad, dict(layer.named_parameters())[name].grad)
               for name, p in sharded_layer.named_parameters()}}
    torch.save(differences, f"{results_path}.{rank}")
    dist.destroy_process_group()


def test_sharded_layer_equals_the_unsharded_layer(tmp_path):
    """4 ranks in memory-parallel groups of 1, 2 and 4 (so 4, 2 and 1 replicas of each shard)."""
    world, results = 4, str(tmp_path / "differences")
    run_ranks(sharded_layer_worker, world, results)
    for rank in range(world):
        for m, differences in torch.load(f"{results}.{rank}").items():
            assert set(differences) >= {"output", "value grad", "sub_keys grad", "query.weight grad",
                                        "w1.weight grad", "w2.weight grad"}
            assert differences["initial values"] == 0, (rank, m)
            worst = max(differences, key=differences.get)
            assert differences[worst] < 1e-5, f"rank {rank}, mem_parallel={m}: {worst} differs by {differences[worst]}"


# ---- training: 2 ranks against 1 process --------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, char_data_dir):
    """A 1-process run with batch 8 for 6 iterations, and a torchrun of 2 ranks with batch 4 each and the
    table split over both for the first 3 of them; both accumulate 2 micro-steps per iteration."""
    root = tmp_path_factory.mktemp("runs")
    for code, _, err in wait_all([
            start_train(root / "one", char_data_dir, "--batch_size=8", "--max_iters=6"),
            start_torchrun(2, root / "two", char_data_dir, "--batch_size=4", "--mem_parallel=2", "--max_iters=3")]):
        assert code == 0, err
    return root, char_data_dir


def test_two_ranks_follow_the_one_process_loss_curve(runs):
    root, _ = runs
    one, two = losses(root / "one"), losses(root / "two")
    assert sorted(two) == sorted(key for key in one if key[1] <= 3)  # train 1..3 and eval 0, 3
    for key, loss in two.items():
        assert abs(loss - one[key]) < LOSS_TOLERANCE, (key, loss, one[key])
    with open(root / "two" / "log.jsonl") as f:
        start = json.loads(f.readline())
    assert start["world"] == 2 and start["mem_parallel"] == 2 and start["tokens_per_iter"] == 8 * 32 * 2


def test_a_two_rank_checkpoint_resumes_and_samples_in_one_process(runs, tmp_path):
    root, data_dir = runs
    # the checkpoint holds each table whole, as one process has it
    checkpoint = torch.load(root / "two" / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == 3 and checkpoint["model"]["values.0.weight"].shape == (64, 32)
    assert all(t.shape == (64, 32) for t in checkpoint["optimizer"]["state"][max(checkpoint["optimizer"]["state"])]
               .values() if t.dim())
    # it samples the text the one-process run's checkpoint at the same iteration samples
    os.makedirs(tmp_path / "one_at_3")
    shutil.copy(root / "one" / "ckpt.prev.pt", tmp_path / "one_at_3" / "ckpt.pt")
    assert torch.load(tmp_path / "one_at_3" / "ckpt.pt", weights_only=True)["iter_num"] == 3
    # and one process resumes it onto the one-process loss curve
    shutil.copytree(root / "two", tmp_path / "resumed")
    results = wait_all([greedy_sample(root / "two"), greedy_sample(tmp_path / "one_at_3"),
                        start_train(tmp_path / "resumed", data_dir, "--batch_size=8", "--max_iters=6", "--init_from=resume")])
    assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
    assert results[0][1] == results[1][1] and results[0][1].startswith("First")
    one, resumed = losses(root / "one"), losses(tmp_path / "resumed")
    for key in [("train", 4), ("train", 5), ("train", 6), ("eval", 6)]:
        assert abs(resumed[key] - one[key]) < LOSS_TOLERANCE, (key, resumed[key], one[key])


def test_a_checkpoint_of_another_model_stops_every_rank(runs, tmp_path):
    root, data_dir = runs
    shutil.copytree(root / "two", tmp_path / "out")
    results = wait_all(start_ranks(2, tmp_path / "out", data_dir, "--batch_size=4", "--mem_parallel=2",
                                   "--max_iters=6", "--init_from=resume", "--n_embd=64"))
    for code, _, err in results:
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith("error: config contradicts") and "n_embd=32 in the checkpoint but 64 now" in err


def test_sparse_updates_on_two_groups_of_two_follow_the_one_process_curve(char_data_dir, tmp_path):
    """Row gradients and RowAdamW: 4 ranks (2 memory-parallel groups whose replicas gather each other's
    rows) against 1 process with the whole batch."""
    results = wait_all([
        start_train(tmp_path / "one", char_data_dir, "--batch_size=8", "--max_iters=3", "--mem_sparse_update=True"),
        start_torchrun(4, tmp_path / "four", char_data_dir, "--batch_size=2", "--mem_parallel=2", "--max_iters=3",
                 "--mem_sparse_update=True")])
    assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
    one, four = losses(tmp_path / "one"), losses(tmp_path / "four")
    assert sorted(four) == sorted(one)
    for key, loss in four.items():
        assert abs(loss - one[key]) < LOSS_TOLERANCE, (key, loss, one[key])


# ---- bad launches ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world, mem_parallel, v_dim, message", [
    (1, 2, 32, "mem_parallel=2 splits the value tables over that many processes: launch with torchrun "
               "--nproc_per_node=2 (or a multiple of it)"),
    (2, 4, 32, "mem_parallel=4 must divide the number of processes, 2"),
    (4, 2, 33, "mem_parallel=2 must divide mem_v_dim=33"),
    (2, 0, 32, "mem_parallel must be at least 1, got 0"),
])
def test_bad_layouts_are_refused_before_any_process_group(monkeypatch, world, mem_parallel, v_dim, message):
    import distributed
    from errors import ConfigError
    from model import GPTConfig
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # were a check missing, joining would fail, not wait
    if world > 1:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
    config = GPTConfig(vocab_size=65, n_embd=32, n_head=2, memory_layers=(1,), mem_v_dim=v_dim)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        distributed.setup(mem_parallel, torch.device("cpu"), config)
    assert not dist.is_initialized()


def test_mem_parallel_without_torchrun_is_a_one_line_error(char_data_dir, tmp_path):
    """(A bad checkpoint above shows the same on every rank of a real launch.)"""
    [(code, _, err)] = wait_all([start_train(tmp_path, char_data_dir, "--mem_parallel=2")])
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "launch with torchrun --nproc_per_node=2" in err


def wait_for_training(procs, out_dir):
    """Returns once the ranks have logged two iterations."""
    log, end = out_dir / "log.jsonl", time.time() + DEADLINE
    while not log.exists() or log.read_text().count('"event": "train"') < 2:
        assert time.time() < end and all(p.poll() is None for p in procs), "training did not start"
        time.sleep(0.2)


def test_a_signal_to_one_rank_stops_all_with_a_checkpoint(char_data_dir, tmp_path):
    procs = start_ranks(2, tmp_path, char_data_dir, "--batch_size=4", "--mem_parallel=2", "--max_iters=100000")
    try:
        wait_for_training(procs, tmp_path)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        results = wait_all(procs)
    assert [code for code, _, _ in results] == [128 + signal.SIGTERM] * 2, [err for _, _, err in results]
    with open(tmp_path / "log.jsonl") as f:
        stopped = [e for e in map(json.loads, f) if e["event"] == "stop"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM"
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == stopped[0]["iter"] and checkpoint["model"]["values.0.weight"].shape == (64, 32)


def test_a_rank_that_dies_makes_the_others_exit(char_data_dir, tmp_path):
    procs = start_ranks(2, tmp_path, char_data_dir, "--batch_size=4", "--mem_parallel=2", "--max_iters=100000")
    try:
        wait_for_training(procs, tmp_path)
        procs[1].kill()
        killed = time.time()
    finally:
        results = wait_all(procs, deadline=30)
    code, _, err = results[0]
    assert code == 1 and "caused by a remote worker" in err, err  # gloo's words for a lost peer
    assert time.time() - killed < 10
