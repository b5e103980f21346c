"""Baseline sizing: dense at 2x and 4x the FLOPs, MoE by the paper's parameter rule, and the shipped configs."""
import os
from dataclasses import replace

import pytest

from conftest import ROOT
from model import GPT, GPTConfig
from config import gpt_config, load_config
from tools.sizing import bytes_per_rank, costs, dense_baseline, main, moe_baseline

MEMORY = GPTConfig(vocab_size=50, block_size=24, n_layer=3, n_head=2, n_embd=32, memory_layers=(1,), mem_n_keys=64,
                   mem_heads=2, mem_knn=4)


@pytest.mark.parametrize("factor", [2, 4])
def test_dense_baseline_is_the_widening_closest_to_the_flop_target(factor):
    target = factor * GPT(MEMORY).flops_per_token()
    dense = dense_baseline(MEMORY, factor)
    assert dense.memory_layers == () and (dense.n_layer, dense.n_head) == (MEMORY.n_layer, MEMORY.n_head)
    assert dense.ffn_hidden * MEMORY.n_embd == MEMORY.ffn_hidden * dense.n_embd  # in proportion (128/32)
    miss = abs(GPT(dense).flops_per_token() - target)
    assert miss < 0.15 * target
    for n_embd in (dense.n_embd - 4, dense.n_embd + 4):  # the neighbouring widths (head size stays even)
        other = replace(dense, n_embd=n_embd, ffn_hidden=4 * n_embd)
        assert abs(GPT(other).flops_per_token() - target) >= miss


def test_moe_baseline_has_the_fewest_experts_that_outnumber_the_memory_models_parameters():
    memory_total = GPT(MEMORY).param_counts()["total"]
    moe = moe_baseline(MEMORY)
    assert moe.memory_layers == () and moe.moe_layers == (0, 1, 2)
    assert (moe.moe_top_k, moe.moe_hidden) == (1, MEMORY.ffn_hidden)
    assert GPT(moe).param_counts()["total"] > memory_total
    assert GPT(replace(moe, moe_num_experts=moe.moe_num_experts - 1)).param_counts()["total"] <= memory_total
    dense = GPT(replace(MEMORY, memory_layers=()))
    routers = 3 * 2 * moe.moe_num_experts * 32
    assert GPT(moe).flops_per_token() == dense.flops_per_token() + routers


def shipped(name):
    config = load_config([os.path.join(ROOT, "configs", name)])
    return gpt_config(config, 65)


def test_shakespeare_moe_and_peer_configs_match_memory_plus():
    """The MoE config is the Memory+ config's baseline by the paper's rule; PEER has about its FLOPs."""
    memplus, moe, peer = (shipped(f"shakespeare_char_{n}.py") for n in ("memplus", "moe", "peer"))
    flops = {name: costs(c)["flops"] for name, c in [("memplus", memplus), ("moe", moe), ("peer", peer)]}
    rule = moe_baseline(memplus)
    assert (moe.moe_layers, moe.moe_num_experts, moe.moe_top_k, moe.moe_hidden) == \
           (rule.moe_layers, rule.moe_num_experts, rule.moe_top_k, rule.moe_hidden)
    assert abs(flops["peer"] / flops["memplus"] - 1) < 0.01 and abs(flops["moe"] / flops["memplus"] - 1) < 0.01


def test_command_line_prints_costs_and_baseline_overrides(capsys):
    main([os.path.join(ROOT, "configs", "shakespeare_char_memplus.py"), "--data_dir=/nonexistent"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["shakespeare_char_memplus.py", "dense", "dense", "dense", "moe"]
    assert "--memory_layers=()" in lines[2] and "--n_embd=" in lines[2]
    assert "'--moe_layers=(0, 1, 2, 3, 4, 5)'" in lines[4]


def test_bytes_per_rank_splits_the_tables_only():
    config = GPTConfig(vocab_size=65, n_layer=2, n_head=2, n_embd=32, memory_layers=(0, 1), mem_n_keys=8,
                       mem_knn=4)
    whole = GPT(config).param_counts()["total"]
    for m in (1, 2, 4):
        held = bytes_per_rank(config, m)
        assert held["table"] == 64 * 32 // m and held["replicated"] == whole - 64 * 32
        assert held["AdamW"] == 8 * (held["table"] + held["replicated"]) and held["DDP buckets"] == 4 * held["replicated"]
