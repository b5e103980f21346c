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


def test_ptx_command_reports_every_kernel_compiled_for_a_real_gpu(tmp_path):
    """`python bench.py ptx --json` (one arch and dtype here, for time): Triton's own compiler, no GPU."""
    import json
    result = run("bench.py", "ptx", "--archs=90", "--dtypes=bfloat16", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    builds = json.loads(result.stdout)
    keys = {"kernel", "arch", "dtype", "compiled", "registers", "spills", "vector_loads_128"}
    assert builds and all(keys <= set(b) and b["compiled"] and b["arch"] == 90 for b in builds)
    assert {b["index_dtype"] for b in builds} == {"int32", "int64"} and {b["dtype"] for b in builds} == {"bfloat16"}
    assert all(b["vector_loads_128"] > 0 for b in builds if b["kernel"] == "bag forward")


def test_forgetting_quick_runs_every_method_and_writes_its_table(tmp_path, gpt2_bpe):
    out = tmp_path / "forgetting"
    result = run("bench.py", "forgetting", "--quick", f"--out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0] for row in rows] == ["| full", "| lora", "| values", "| smf"]
    assert "Lowest A drop at equal learning" in table
