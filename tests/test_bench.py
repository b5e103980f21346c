"""bench.py's prepared GPU command runs end to end on CPU at tiny shapes, so the first GPU run cannot fail
on a typo."""
import pytest
import torch

from conftest import run


def test_gpu_command_runs_on_cpu_at_tiny_shapes(tmp_path):
    out = tmp_path / "gpu.md"
    result = run("bench.py", "gpu", "--device=cpu", f"--out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [row.split(" | ")[0] for row in rows]
    assert names[0] == "| copy bandwidth"
    assert sum("bag bfloat16" in n for n in names) == 2 and sum("bag float32" in n for n in names) == 2
    assert sum(" layer d=" in n for n in names) == 2 and sum("train gpt2_small_memplus" in n for n in names) == 2
    assert all("tokens/s" in row for row in rows if "train" in row)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would run in full")
def test_gpu_command_without_a_gpu_says_so_in_one_line(tmp_path):
    result = run("bench.py", "gpu", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: bench.py gpu needs a CUDA device")
