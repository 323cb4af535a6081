"""`make gpu-check` rehearsed without a GPU: the plumbing of the prepared GPU check
(benchmarks/gpu_check.py) must work before a GPU machine's few minutes are spent on it.

The rehearsal runs every stage on the CPU with tiny shapes: the build stage verifies the
extension already built instead of rebuilding it (a CUDA build here would take many minutes),
the tests stage runs the cuda-marked selection (all skip on a CPU), bench and e2e time tiny CPU
shapes, aot compiles a smoke subset of the Triton enumeration. Checked: every stage reports ok
in its summary line, the summary lines come last, the files (at most 8, never the committed
results' names) exist and the results header carries the exact command and the device.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("env", "build", "tests", "bench", "e2e", "aot")

if torch.cuda.is_available():
    pytest.skip("a GPU is present: `make gpu-check` is the real check there, not a rehearsal",
                allow_module_level=True)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MAKEFLAGS", "MAKELEVEL")}
    env.update(GPU_CHECK_OUT=str(out), PYTHONUNBUFFERED="1")
    make = shutil.which("make")
    argv = [make, "-s", "gpu-check", f"PYTHON={sys.executable}"] if make else \
        [sys.executable, os.path.join("benchmarks", "gpu_check.py")]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out, bool(make)


def test_every_stage_reports_ok(rehearsal):
    proc, _, _ = rehearsal
    lines = [l for l in proc.stdout.splitlines() if l.startswith("gpu-check: ")]
    stages = {l.split()[1]: l for l in lines}
    assert set(STAGES) <= set(stages), f"missing summary lines:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    bad = [l for s, l in stages.items() if s in STAGES and l.split()[2] != "ok"]
    assert not bad, "\n".join(bad) + f"\n--- output tail:\n{proc.stdout[-4000:]}"
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_summary_comes_last(rehearsal):
    proc, _, _ = rehearsal
    tail = proc.stdout.strip().splitlines()[-(len(STAGES) + 2):]
    assert [l.split()[1] for l in tail] == list(STAGES) + ["files", "total"], "\n".join(tail)
    assert "rehearsal" in tail[-1]


def test_files_and_header(rehearsal):
    proc, out, via_make = rehearsal
    files = sorted(os.listdir(out))
    assert 0 < len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    stem = f"rehearsal-cpu-{os.cpu_count()}core"
    for suffix in (".json", ".md", "-gpu-check.log"):
        assert stem + suffix in files, (files, proc.stdout[-2000:])
    with open(out / f"{stem}.json") as f:
        records = json.load(f)
    head = records[0]
    assert head["type"] == "header" and head["device"].startswith("cpu")
    assert "gpu_check.py" in head["command"] and f"GPU_CHECK_OUT={out}" in head["command"]
    assert head["command"].startswith(f"GPU_CHECK_OUT={out} make gpu-check") == via_make
    assert [s["stage"] for s in head["gpu_check"]["stages"]] == list(STAGES)
    ops = {(r["op"], r["impl"]) for r in records[1:] if r.get("ms") is not None}
    assert {("bn", "torch"), ("sbn", "nk"), ("l2bn+relu", "nk-fused"), ("bn+relu", "torch+relu")} <= ops
    assert any(r["op"] == "resnet50-step" for r in records[1:] if r.get("ms") is not None)
    md = (out / f"{stem}.md").read_text()
    assert head["command"] in md and "| stage | status |" in md
    log = (out / f"{stem}-gpu-check.log").read_text()
    assert all(f"===== {s}" in log for s in STAGES if s != "env") and "===== env" in log
