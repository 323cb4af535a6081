"""`make gpu-check` rehearsed without a GPU: the plumbing of the prepared GPU check
(benchmarks/gpu_check.py) must work before a GPU machine's few minutes are spent on it.

The rehearsal runs every stage on the CPU with tiny shapes: the build stage verifies the
extension already built instead of rebuilding it (a CUDA build here would take many minutes),
the tests stage runs the GPU selection's cuda-marked tests (all skip on a CPU), bench, compile
and e2e time tiny CPU shapes, aot compiles a smoke subset of the Triton enumeration. Checked:
every stage reports ok in its summary line, the summary lines come last, the files (at most 8,
never the committed results' names) exist and the results header carries the exact command and
the device. And the plan itself: the caps fit the deadline, aot runs first, a stage past its cap
gets SIGTERM before SIGKILL, results are replaced atomically (a writer killed at any moment
leaves a complete file), the bench is nk vs torch (then torch.compile) at the ResNet-50 shapes
small to large, and the GPU test selection has no torch.compile or opcheck test.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("env", "aot", "build", "tests", "bench", "e2e", "compile")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402

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
    assert {("bn", "torch"), ("l2bn", "nk"), ("sbn", "nk"), ("bnsbn", "nk"), ("l2bn", "compile")} <= ops
    assert any(r["op"] == "resnet50-step" for r in records[1:] if r.get("ms") is not None)
    md = (out / f"{stem}.md").read_text()
    assert head["command"] in md and "| stage | status |" in md
    log = (out / f"{stem}-gpu-check.log").read_text()
    assert all(f"===== {s}" in log for s in STAGES if s != "env") and "===== env" in log


# --------------------------------------------------------------------------- the plan itself
def test_stages_and_caps_fit_the_deadline():
    assert gpu_check.STAGES == STAGES            # aot first after env: it warms Triton's cache
    gpu_caps = [gpu for gpu, _ in gpu_check.TIMEOUTS.values()]
    # every stage stopped at its cap still leaves time to write the files and the summary
    assert sum(gpu_caps) + gpu_check.TERM_GRACE_S < gpu_check.DEADLINE_S <= 400  # command limit ~420 s
    assert sum(r for _, r in gpu_check.TIMEOUTS.values()) < gpu_check.DEADLINE_S


def test_bench_is_nk_vs_torch_then_compile_small_to_large():
    paths = {"json": "r.json", "md": "r.md"}
    bench = gpu_check._bench_argv(True, paths, "bench")
    comp = gpu_check._bench_argv(True, paths, "compile")

    def opt(argv, name):
        return argv[argv.index(name) + 1]

    shapes = [tuple(int(v) for v in s.split("x")) for s in opt(bench, "--shapes").split(",")]
    assert {s[1:] for s in shapes} == {(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)}
    sizes = [s[0] * s[1] * s[2] * s[3] for s in shapes]
    assert sizes == sorted(sizes)
    assert opt(bench, "--dtype") == "float32,bfloat16" and opt(bench, "--impls") == "nk"
    assert set(opt(bench, "--ops").split(",")) == {"l2bn", "sbn", "bnsbn"}
    assert opt(comp, "--impls") == "compile" and opt(comp, "--shapes") == opt(bench, "--shapes")


def test_gpu_test_selection_has_no_compile_or_opcheck():
    """The selection's -k on the CPU twins of its [cuda] cases: no inductor compiles, no opcheck,
    a few hundred small tests (the GPU runs them in its 60 s with Triton's cache warm)."""
    sel = gpu_check.TEST_SELECTION
    assert "tests" not in sel and all(os.path.exists(os.path.join(ROOT, f)) for f in sel if f.startswith("tests/"))
    k = sel[sel.index("-k") + 1]
    assert "cuda" in k
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
                          + [a if a != k else k.replace("cuda", "cpu") for a in sel],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    nodes = [l for l in proc.stdout.splitlines() if "::" in l]
    assert nodes, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not [n for n in nodes if "torch_compile" in n or "opcheck" in n]
    assert len(nodes) < 500, len(nodes)


def test_stop_sends_sigterm_before_sigkill(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "TERM_GRACE_S", 2)
    marker = tmp_path / "got-sigterm"
    polite = ("import signal, sys, time, pathlib\n"
              f"def bye(*_):\n    pathlib.Path({str(marker)!r}).write_text('1'); sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, bye)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('ready', flush=True)\ntime.sleep(60)\n")
    for code in (polite, stubborn):
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
        assert p.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        gpu_check.stop(p)
        assert p.returncode is not None and time.monotonic() - t0 < 10
        if code is polite:
            assert marker.read_text() == "1" and p.returncode == 0
        else:
            assert p.returncode == -signal.SIGKILL


def test_results_are_replaced_atomically(tmp_path):
    """A writer killed at any moment (SIGKILL) leaves a complete JSON table, never a torn one."""
    path = tmp_path / "r.json"
    code = ("import sys, itertools\n"
            f"sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); sys.path.insert(0, {ROOT!r})\n"
            "from gpu_check import atomic_write_outputs\n"
            "for i in itertools.count():\n"
            "    atomic_write_outputs([{'type': 'header', 'i': i}] + [{'op': 'x' * 200, 'k': k} for k in range(20000)],"
            f" {str(path)!r})\n"
            "    if i == 0: print('ready', flush=True)\n")
    for delay in (0.05, 0.2, 0.5):
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.kill()
        p.wait()
        with open(path) as f:
            records = json.load(f)
        assert records[0]["type"] == "header" and len(records) == 20001
