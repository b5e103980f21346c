"""Every Triton kernel of kernels.py compiled for real NVIDIA GPUs by Triton's own compiler, on a machine
without one (`python tools/bench.py ptx`): what the CPU interpreter accepts and a GPU would reject shows here,
and so do registers, spills and whether the loads vectorised."""
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

import kernels
from tools import ROOT

triton = kernels.triton  # None without Triton


def gpu_builds(archs=(80, 90), dtypes=kernels.TRITON_DTYPES, index_dtypes=(torch.int32, torch.int64), dim=768, bag=128):
    """Compile every Triton kernel for real NVIDIA GPUs with Triton's own compiler; no GPU needed.

    Each kernel is specialised as the JIT specialises it at our call sites (Triton's own binder over
    arguments shaped like ours: contiguous tables of `dim` columns, so unit strides become constants and
    16-byte-aligned pointers and dims divisible by 16 get tt.divisibility), with the default tiles, for
    each arch (compute capability: 80 = A100, 90 = H100), table dtype and index dtype (kernels that take
    our own int64 positions rather than the caller's indices are built once, index_dtype "int64").
    Returns one dict per build: kernel (the call site), arch, dtype, index_dtype, compiled, registers
    (per thread, ptxas), spills (bytes of spill stores + loads), vector_loads_128 (128-bit ld.global in
    the PTX: loads that vectorised) and error (None, or why it failed).
    """
    if triton is None:
        raise RuntimeError("gpu_builds needs Triton")
    if kernels._INTERPRETED:  # compiling from inside the interpreter fails (it patches triton.language): a clean process
        names = lambda ds: f"({''.join(f'{d}, ' for d in ds)})"
        call = f"kernel_builds.gpu_builds({tuple(archs)!r}, {names(dtypes)}, {names(index_dtypes)}, {dim}, {bag})"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, "-c", f"import json, torch; from tools import kernel_builds; print(json.dumps({call}))"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"gpu_builds in a subprocess failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.splitlines()[-1])
    builds, seen = [], set()
    for arch in archs:
        for dtype in dtypes:
            for index_dtype in index_dtypes:
                for name, kernel, args, constexprs, uses_indices in call_sites(dtype, index_dtype, dim, bag):
                    key = (name, arch, dtype, index_dtype if uses_indices else torch.int64)
                    if key not in seen:
                        seen.add(key)
                        builds.append(build(name, kernel, args, constexprs, arch, dtype, key[3]))
    return builds


def call_sites(dtype, index_dtype, dim, bag):
    """(name, kernel, args, constexprs, takes the caller's indices) for each launch our code makes, tensors
    as Triton MockTensors (16-byte aligned); kept in step with kernels._bag, _pair_dots and _scatter_add."""
    tensor = triton.runtime.MockTensor
    table, indices, weights = tensor(dtype), tensor(index_dtype), tensor(torch.float32)
    positions, fp32 = tensor(torch.int64), tensor(torch.float32)
    tiles = dict(zip(("BLOCK_K", "BLOCK_D"), kernels._blocks(torch.empty(0, dim, dtype=dtype))))
    return [
        ("bag forward", kernels._bag_kernel, (table, dim, 1, indices, weights, positions, table, None, dim),
         dict(tiles, SCATTER=False), True),
        ("bag row grads", kernels._bag_kernel, (table, dim, 1, positions, weights, positions, fp32, None, dim),
         dict(tiles, SCATTER=False), False),
        ("bag dense grad", kernels._bag_kernel, (table, dim, 1, positions, weights, positions, fp32, positions, dim),
         dict(tiles, SCATTER=True), False),
        ("pair dots", kernels._pair_dot_kernel, (table, dim, 1, indices, table, dim, 1, fp32, bag, dim), tiles, True),
        ("scatter add", kernels._scatter_add_kernel, (indices, weights, table, dim, 1, fp32, bag, dim), tiles, True),
    ]


def build(name, kernel, args, constexprs, arch, dtype, index_dtype):
    """One of gpu_builds' dicts: kernel specialised for args by the JIT's binder, compiled for arch."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    result = dict(kernel=name, arch=arch, dtype=str(dtype).removeprefix("torch."),
                  index_dtype=str(index_dtype).removeprefix("torch."), compiled=False, registers=None, spills=None,
                  vector_loads_128=None, error=None)
    try:
        jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        options = dict(constexprs, num_warps=4)
        bound, specialization, rest = create_function_from_signature(jit.signature, jit.params, backend)(
            *args, **options)
        options, signature, constants, attrs = jit._pack_args(backend, options, bound, specialization, rest)
        compiled = triton.compile(ASTSource(jit, signature, constants, attrs), target=target,
                                  options=options.__dict__)
        ptx = compiled.asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "kernel.ptx")
            with open(source, "w") as f:
                f.write(ptx)
            log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                                  source, "-o", os.path.join(tmp, "kernel.cubin")],
                                 capture_output=True, text=True, check=True).stderr
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        result.update(compiled=True, registers=int(re.search(r"Used (\d+) registers", log)[1]),
                      spills=int(spills[1]) + int(spills[2]),
                      vector_loads_128=len(re.findall(r"ld\.global\S*\.(?:v4\.[bfsu]32|v2\.[bfsu]64)\s", ptx)))
    except Exception as e:  # a failed build is a result to report, not a reason to stop the others
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
    return result
