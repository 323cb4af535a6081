"""Compile csrc/cuda/*.cu with nvcc for sm_90 (compile only; no GPU needed) and read ptxas's
resource report.

The CPU torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated at torch's CUDA build),
so a temp include dir provides a one-line stub of it. Fails (not skips) when nvcc is missing and
CI is set; skips otherwise. Fails on a compile error, on a warning from our own source, and on a
kernel that spills more than MAX_SPILL_BYTES (a few bytes of stack around calls to 64-bit integer
or IEEE division routines are expected; register pressure spills are not). Prints registers per
kernel family (pytest -s).
"""
import glob
import inspect
import collections
import os
import re
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
MAX_SPILL_BYTES = 16


def _ptxas_report(stderr):
    """[(kernel mangled name, registers, spill store bytes)] from ptxas -v output."""
    rows, name, spill = [], None, 0
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            spill = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            rows.append((name, int(m.group(1)), spill))
            name, spill = None, 0
    return rows


def _family(mangled):
    m = re.search(r"([a-z][a-z_]*_kernel)", mangled)
    return m.group(1) if m else mangled


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
                nvcc = os.path.join(home, "bin", "nvcc")
                break
    if nvcc is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc not found but CI is set: the CUDA sources must be compile-checked")
        pytest.skip("nvcc not found")
    return nvcc


def _cxx_std():
    import torch.utils.cpp_extension as ce

    # the standard torch's own extension builds use (c++20 for recent torch, c++17 before)
    return "c++20" if "-std=c++20" in inspect.getsource(ce) else "c++17"


@pytest.fixture(scope="module")
def nvcc_runs(tmp_path_factory):
    """source -> (command, CompletedProcess-like result, object path): every source compiled at
    once, one nvcc per source in parallel (each is one compilation unit, and the torch headers
    alone take a minute to parse)."""
    nvcc = _nvcc()
    import torch.utils.cpp_extension as ce

    tmp = tmp_path_factory.mktemp("nvcc")
    stub = tmp / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [str(tmp / "stub")] + ce.include_paths() + [sysconfig.get_paths()["include"]]
    procs = {}
    for source in SOURCES:
        obj = tmp / (os.path.basename(source) + ".o")
        cmd = [nvcc, "-arch=sm_90", f"-std={_cxx_std()}", "-Xptxas", "-v", "-c", source, "-o", str(obj)]
        cmd += list(ce.COMMON_NVCC_FLAGS) + ["-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=_C"]
        cmd += [f"-I{p}" for p in includes]
        procs[source] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), obj)
    runs = {}
    for source, (cmd, p, obj) in procs.items():
        out, err = p.communicate(timeout=900)
        runs[source] = (cmd, subprocess.CompletedProcess(cmd, p.returncode, out, err), obj)
    return runs


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_nvcc_compiles(source, nvcc_runs):
    cmd, proc, obj = nvcc_runs[source]
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr[-8000:]}"
    assert obj.stat().st_size > 0
    # no warnings from our own source (torch headers may warn)
    own = [l for l in proc.stderr.splitlines() if os.path.basename(source) in l and "warning" in l]
    assert not own, "\n".join(own)
    rows = _ptxas_report(proc.stderr)
    assert rows, "no ptxas resource report"
    families = collections.defaultdict(list)
    for name, regs, spill in rows:
        families[_family(name)].append(regs)
    print(f"\n{os.path.basename(source)}: {len(rows)} kernels for sm_90")
    for fam, regs in sorted(families.items()):
        print(f"  {fam}: {len(regs)} kernels, {min(regs)}-{max(regs)} registers")
    spilling = [(name, spill) for name, _, spill in rows if spill > MAX_SPILL_BYTES]
    assert not spilling, f"kernels spilling more than {MAX_SPILL_BYTES} bytes: {spilling}"


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/*.cu missing"
