"""The Triton kernels compiled for a real GPU (sm_90) by Triton's own compiler, on a machine without one."""
import pytest
import torch

from tools import kernel_builds
import kernels


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
def test_every_kernel_builds_for_sm90_and_the_bag_loads_vectorise():
    """fp32 and bf16 tables, int32 indices, specialised as the JIT does at our call sites: every kernel
    compiles, none spills, and the bag's row loads are 128-bit (ld.global.v4), the bandwidth it needs."""
    builds = kernel_builds.gpu_builds(archs=(90,), dtypes=(torch.float32, torch.bfloat16), index_dtypes=(torch.int32,))
    assert {(b["kernel"], b["dtype"]) for b in builds} == {
        (k, d) for k in ("bag forward", "bag row grads", "bag dense grad", "pair dots", "scatter add")
        for d in ("float32", "bfloat16")}
    failed = [(b["kernel"], b["dtype"], b["error"]) for b in builds if not b["compiled"]]
    assert not failed
    assert all(b["arch"] == 90 and b["registers"] > 0 and b["spills"] == 0 for b in builds)
    for b in builds:
        if b["kernel"].startswith("bag"):
            assert b["vector_loads_128"] > 0, b
