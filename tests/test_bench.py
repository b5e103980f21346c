"""tools/bench.py's prepared GPU command runs end to end on CPU at tiny shapes, so the first GPU run cannot fail
on a typo."""
import pytest
import torch

from conftest import run


def test_gpu_command_writes_each_row_as_measured_and_goes_on_past_failures(tmp_path, monkeypatch, capsys):
    """tools/bench.py gpu at tiny shapes (--device=cpu, 3 training steps) with two failures forced: the memory layer
    (when it fails, the rows measured before it are in the file already) and the sparse training run (its log
    is kept beside the table). Each failure is one error row, every later measurement still runs, no
    checkpoint is written, and the command ends with a one-line error."""
    from tools import bench, bench_gpu
    out, seen = tmp_path / "gpu", {}
    real_layer, real_train = bench_gpu.layer_step, bench_gpu.train_and_log

    def layer_step(kind, *args):
        if kind != "memory":
            return real_layer(kind, *args)
        seen["table"] = (out / "gpu.md").read_text()
        raise RuntimeError("forced\nfailure")

    def train_and_log(args, out_dir):
        return real_train(args + (["--no_such_key=1"] if "--mem_sparse_update=True" in args else []), out_dir)
    monkeypatch.setattr(bench_gpu, "layer_step", layer_step)
    monkeypatch.setattr(bench_gpu, "train_and_log", train_and_log)
    with pytest.raises(SystemExit) as stop:
        bench.main(["gpu", "--device=cpu", f"--out={out}", "--steps=3"])
    assert stop.value.code == f"error: 2 measurements failed: their rows in {out / 'gpu.md'} say why"
    table = (out / "gpu.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == (
        ["| copy bandwidth"] + [f"| bag {d} tiny 64x8x1024x40 int32 {b}" for d in ("bfloat16", "float32")
                                for b in ("F.embedding_bag", "torch")] +
        ["| dense FFN d=32, 64 tokens, bf16", "| memory layer", "| memory-sparse layer d=32, 64 tokens, 1,024 values, bf16",
         "| train gpt2_small_memplus, dense value update, eager, 3 steps", "| train, sparse value update"])
    assert seen["table"].splitlines() == table.splitlines()[:len(seen["table"].splitlines())]
    assert [row.split(" | ")[0] for row in seen["table"].splitlines()[4:]] == [row.split(" | ")[0] for row in rows[:6]]
    assert rows[6] == "| memory layer | error | RuntimeError: forced failure |"
    assert "tokens/s" in rows[8] and "x the dense FFN" in rows[7]
    log = out / "train-sparse" / "train.out"
    assert rows[9].startswith("| train, sparse value update | error | UserError: train.py ") and str(log) in rows[9]
    assert "unknown config key 'no_such_key'" in log.read_text()
    assert not list(out.rglob("ckpt*")) and sorted(p.name for p in (out / "train-dense").iterdir()) == [
        "log.jsonl", "train.out"]
    printed = capsys.readouterr().out
    assert all(row in printed for row in rows), printed


def test_gpu_command_runs_the_sections_chosen(tmp_path):
    result = run("tools/bench.py", "gpu", "--device=cpu", f"--out={tmp_path}", "--sections=copy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line for line in (tmp_path / "gpu.md").read_text().splitlines() if line.startswith("| ")][1:] == [
        line for line in result.stdout.splitlines() if line.startswith("| copy bandwidth")]
    result = run("tools/bench.py", "gpu", "--device=cpu", "--sections=copy,layers", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == (
        "error: unknown sections ['layers']: choose from copy,kernels,layer,train\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would run in full")
def test_gpu_command_without_a_gpu_says_so_in_one_line(tmp_path):
    result = run("tools/bench.py", "gpu", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: tools/bench.py gpu needs a CUDA device")


def test_ptx_command_reports_every_kernel_compiled_for_a_real_gpu(tmp_path):
    """`python bench.py ptx --json` (one arch and dtype here, for time): Triton's own compiler, no GPU."""
    import json
    result = run("tools/bench.py", "ptx", "--archs=90", "--dtypes=bfloat16", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    builds = json.loads(result.stdout)
    keys = {"kernel", "arch", "dtype", "compiled", "registers", "spills", "vector_loads_128"}
    assert builds and all(keys <= set(b) and b["compiled"] and b["arch"] == 90 for b in builds)
    assert {b["index_dtype"] for b in builds} == {"int32", "int64"} and {b["dtype"] for b in builds} == {"bfloat16"}
    assert all(b["vector_loads_128"] > 0 for b in builds if b["kernel"] == "bag forward")


def test_forgetting_quick_runs_every_method_and_smf_learns(tmp_path, gpt2_bpe):
    from conftest import read_log
    out = tmp_path / "forgetting"
    result = run("tools/bench.py", "forgetting", "--quick", f"--out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (out / "results.md").read_text()
    runs = table[table.index("| method | run | B acc"):table.index("Each method's run")].strip().splitlines()[2:]
    assert [row.split(" | ")[0] for row in runs] == ["| full", "| lora", "| values", "| smf"]
    assert "Each method's run with the lowest A drop at equal learning" in table
    # the smoke run is one in which sparse memory finetuning visibly learns B and keeps most of A
    first, *_, last = read_log(out / "smf_rows2000_lr0.1", "eval")
    assert last["facts_acc"] >= first["facts_acc"] + 0.05, (first["facts_acc"], last["facts_acc"])
    assert last["retain_facts_acc"] >= 0.8 * first["retain_facts_acc"]
    assert (out / "base" / "ckpt.pt").exists()  # pretrained once, then reused


def test_a_benchmark_past_its_timeout_leaves_nothing_running(tmp_path):
    """conftest.run kills the script and the processes it started (a benchmark's train.py runs) when it times
    out: a timed-out benchmark test must not leave training runs behind on the machine."""
    import subprocess
    import time
    pid_file, script = tmp_path / "child.pid", tmp_path / "starts_a_child.py"
    script.write_text("import subprocess, sys, time\n"
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                      f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
                      "time.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        run(str(script), timeout=3)
    child = int(pid_file.read_text())
    for _ in range(50):  # killed: gone, or a zombie until something reaps it
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    pytest.fail(f"process {child}, started by the timed-out script, is still running")
