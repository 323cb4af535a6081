"""The prepared GPU check (issues #11, #19): `make gpu-check`, one command that fits the ~7 minutes a
lent GPU machine gives one command (the device session's timeout_s ~420 s).

On a machine with a CUDA GPU (the H100 / H200 lent now and then: torch 2.11 + triton 3.6, 16 cores,
no package registry, so nothing is installed), in this order, each stage a subprocess with its
own cap; the caps add up to less than the deadline, so every stage gets its time whatever the
others do, and a hang or a failure in one still leaves the others' results:

    stage    cap (s)  what
    env        10     nvidia-smi, torch/triton/nvcc versions
    aot        50     tests/test_triton_compile.py's enumeration compiled by the machine's own
                      triton (3.6, its ptxas 12.8: the registers and spills of the cubins it really
                      runs), on all cores. First: the compiles land in Triton's cache, which the
                      tests and the bench then hit instead of compiling cold (the ResNet-50 shapes
                      of the bench are in the enumeration)
    build     130     python setup.py build_ext --inplace with TORCH_CUDA_ARCH_LIST=9.0,
                      NORMKERNELS_FORCE_CUDA=1, MAX_JOBS=<all cores>; checks the CUDA kernels
                      registered
    tests      60     the op tests on the GPU (TEST_SELECTION: the [cuda] cases of the L2BN, SBN,
                      BN+SBN and running-stats op tests and of the CUDA graph capture of a
                      training step, and test_sbn_triton.py), without the
                      torch.compile and opcheck tests (inductor compiles would take the minute)
    bench      55     python benchmarks/bench.py: nk vs torch (BatchNorm2d) for L2BN, SBN, BN+SBN
                      at the four ResNet-50 stage shapes, small to large, float32 and bfloat16,
                      fwd and fwd+bwd
    e2e        35     the ResNet-50 training step per variant (bench --e2e-only)
    compile    45     the torch.compile rows of the same table (the eager references compiled by
                      inductor), small shapes first: what fits in its cap
    total     385     DEADLINE_S = 400: the summary and files are written in the remaining seconds

A stage that outlives its cap gets SIGTERM, then SIGKILL 5 s later (its whole process group).
Every results file is written whole or not at all (a temporary file, then os.replace), the
bench's checkpoints included (they go through atomic_write_outputs below): a stage stopped
mid-write leaves the previous complete table, never a truncated one.

Files (GPU_CHECK_OUT, default benchmarks/results; 4 files): <device>.json (the bench records,
the header carrying the exact command, device, versions and every stage's outcome), <device>.md
(stage table + bench table), <device>.png, <device>-gpu-check.log (every stage's full output).
The last lines printed are one summary line per stage, `gpu-check: <stage> <status> ...` (only
the tail of the output comes back from the GPU machine).

Without a GPU the same command is a rehearsal of the plumbing (about a minute, CPU): the build
stage verifies the extension already built (import, registered ops) instead of rebuilding, the
tests stage runs the GPU selection restricted to cuda-marked tests (none runs on a CPU: it proves
the invocation and the parsing), bench, compile and e2e run tiny CPU shapes, aot compiles a smoke
subset. Its files are named rehearsal-<device>.* so that committed results are never
overwritten. CI runs the rehearsal (tests/test_gpu_check.py).

    make gpu-check                                  # or: python benchmarks/gpu_check.py
    GPU_CHECK_OUT=/tmp/out make gpu-check
    python benchmarks/gpu_check.py --stages build,tests --rehearsal
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The whole check; the device session's command timeout is ~420 s, and the summary lines (printed
# last) must come back.
DEADLINE_S = 400
TERM_GRACE_S = 5            # SIGTERM, then SIGKILL this much later

# stage -> cap in seconds (GPU, rehearsal), in the order the stages run. The GPU caps add up to
# less than DEADLINE_S (tests/test_gpu_check.py checks it), each is also cut to what is left.
# The build's is the largest: nvcc takes ~2 minutes for csrc/cuda/l2bn_cuda.cu on the 2-core
# development VM (one compilation unit: more cores do not help it).
TIMEOUTS = {"env": (10, 15), "aot": (50, 40), "build": (130, 20), "tests": (60, 30), "bench": (55, 40),
            "e2e": (35, 40), "compile": (45, 40)}
STAGES = tuple(TIMEOUTS)
# ResNet-50's four stage shapes, small to large (a stage cut short keeps the small ones)
RESNET50 = "64x2048x7x7,64x1024x14x14,64x512x28x28,64x256x56x56"
BENCH_OPS = "l2bn,sbn,bnsbn"   # with bn (torch's BatchNorm2d, the baseline of every ratio)
TEST_FILES = ["tests/test_l2bn_ops.py", "tests/test_running_stats.py", "tests/test_sbn_family.py", "tests/test_sbn_triton.py",
              "tests/test_graph_capture.py"]
TEST_SELECTION = TEST_FILES + ["-k", "(cuda or test_sbn_triton) and not torch_compile and not opcheck"]

# Runs benchmarks/bench.py with its result writes made atomic (the bench checkpoints its JSON and
# table after every measurement; a stage stopped mid-write must not truncate them).
BENCH_RUNNER = """
import os, sys
sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import bench
from gpu_check import atomic_write_outputs
bench.write_outputs = atomic_write_outputs
sys.exit(bench.main(sys.argv[1:]))
"""


def atomic_write(path: str, text: str):
    """Write path whole or not at all."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_outputs(records, json_path=None, md_path=None, png_path=None) -> dict:
    """benchmarks/bench.py.write_outputs with every file replaced atomically."""
    import bench
    written = {}
    for path in (json_path, md_path, png_path):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if json_path:        # the format of bench.write_outputs: one record per line
        atomic_write(json_path, "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
        written["json"] = json_path
    if md_path:
        atomic_write(md_path, bench.render_markdown(records))
        written["md"] = md_path
    if png_path:
        tmp = f"{png_path}.tmp{os.getpid()}.png"
        if bench.plot_ratios(records, tmp):
            os.replace(tmp, png_path)
            written["png"] = png_path
    return written


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def stop(proc: subprocess.Popen) -> str:
    """Stop a stage's process group: SIGTERM (a Python stage unwinds, a result being replaced stays
    whole), SIGKILL after TERM_GRACE_S. Returns the output it left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        out, _ = proc.communicate(timeout=TERM_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
    return out or ""


class Check:
    def __init__(self, out_dir: str, rehearsal: bool, log_path: str):
        self.out_dir, self.rehearsal = out_dir, rehearsal
        self.log = open(log_path, "a", buffering=1)
        self.start = time.monotonic()
        self.results: list[dict] = []
        self.extra_records: list[dict] = []   # e2e and compile rows, merged by finish()

    def remaining(self) -> float:
        return DEADLINE_S - (time.monotonic() - self.start)

    def run(self, name: str, argv: list[str], env: dict | None = None, timeout: float | None = None):
        """Run one command of a stage, its output into the log; (returncode or None on timeout,
        output text, seconds)."""
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        timeout = max(1.0, min(timeout or TIMEOUTS[name][self.rehearsal], self.remaining() - TERM_GRACE_S))
        self.log.write(f"\n===== {name}: {shlex.join(argv)}  (timeout {timeout:.0f} s"
                       f"{', env ' + ' '.join(f'{k}={v}' for k, v in (env or {}).items()) if env else ''})\n")
        t0 = time.monotonic()
        # own process group: a timeout kills the stage and everything it started
        proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            out, rc = stop(proc), None
        self.log.write(out or "")
        self.log.write(f"===== {name}: {'timed out' if rc is None else f'exit {rc}'} after "
                       f"{time.monotonic() - t0:.1f} s\n")
        return rc, out or "", time.monotonic() - t0

    def record(self, stage: str, ok: bool, seconds: float, detail: str, tail: str = ""):
        status = "ok" if ok else "FAIL"
        self.results.append({"stage": stage, "status": status, "seconds": round(seconds, 1), "detail": detail})
        if not ok and tail:
            print(f"--- {stage} (last lines; full output in the log)")
            print("\n".join(tail.strip().splitlines()[-15:]))
        print(f"[{time.monotonic() - self.start:6.1f} s] {stage}: {status} {detail}", flush=True)


def _why(rc, seconds) -> str:
    return f"timed out after {seconds:.0f} s" if rc is None else f"exit {rc}"


# ---------------------------------------------------------------------------------------------
# stages

def stage_env(c: Check, gpu: bool):
    script = ("import torch, platform; "
              "import importlib.util as u; "
              "t = __import__('triton').__version__ if u.find_spec('triton') else None; "
              "d = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; "
              "print(f'python {platform.python_version()} torch {torch.__version__} cuda {torch.version.cuda} "
              "triton {t} device {d} cores {len(__import__(\"os\").sched_getaffinity(0))}')")
    rc, out, s = c.run("env", [sys.executable, "-c", script])
    info = out.strip().splitlines()[-1] if rc == 0 and out.strip() else ""
    for tool in (["nvidia-smi", "-L"], ["nvcc", "--version"]):
        try:
            p = subprocess.run(tool, capture_output=True, text=True, timeout=10)
            c.log.write(f"$ {' '.join(tool)}\n{p.stdout}{p.stderr}")
            if tool[0] == "nvcc":
                m = re.search(r"release (\d+\.\d+)", p.stdout)
                info += f" nvcc {m.group(1) if m else '?'}"
        except (OSError, subprocess.TimeoutExpired) as e:
            c.log.write(f"$ {' '.join(tool)}: {e}\n")
            if gpu and tool[0] == "nvidia-smi":
                info += " (no nvidia-smi)"
    c.record("env", rc == 0, s, info or _why(rc, s), out)


VERIFY = ("import torch, normkernels._C, normkernels; "
          "ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith('normkernels::')]; "
          "cuda = [n for n in ops if torch._C._dispatch_has_kernel_for_dispatch_key(n, 'CUDA')]; "
          "print(f'normkernels._C loads: {len(ops)} normkernels ops, {len(cuda)} with CUDA kernels; "
          "backends {normkernels.backends()}')")


def stage_build(c: Check, gpu: bool):
    if gpu:
        cores = str(len(os.sched_getaffinity(0)))
        env = {"TORCH_CUDA_ARCH_LIST": "9.0", "NORMKERNELS_FORCE_CUDA": "1", "MAX_JOBS": cores}
        rc, out, s = c.run("build", [sys.executable, "setup.py", "build_ext", "--inplace"], env)
        if rc != 0:
            c.record("build", False, s, f"build_ext {_why(rc, s)} (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS={cores})", out)
            return
        rc2, out2, s2 = c.run("build", [sys.executable, "-c", VERIFY + "; assert cuda, 'built without CUDA kernels'"],
                              timeout=30)
        detail = out2.strip().splitlines()[-1] if out2.strip() else _why(rc2, s2)
        c.record("build", rc2 == 0, s + s2, f"sm_90 in {s:.0f} s with {cores} jobs; {detail}", out2)
        return
    # rehearsal: never rebuild (minutes on 2 cores): verify the extension already built
    rc, out, s = c.run("build", [sys.executable, "-c", VERIFY])
    detail = out.strip().splitlines()[-1] if rc == 0 else _why(rc, s)
    c.record("build", rc == 0, s, f"rehearsal: verified the existing build, no rebuild; {detail}", out)


def _pytest_counts(out: str) -> dict:
    """Outcome counts from pytest's closing line, or (after a timeout) from the -rA lines so far."""
    counts = {}
    closing = re.findall(r"^=* ?((?:\d+ \w+,? ?)+) in [\d.]+s", out, flags=re.M)
    if closing:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", closing[-1]):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
        return counts
    for what in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
        counts[what.lower() if what != "ERROR" else "error"] = len(re.findall(rf"\b{what}\b", out))
    return counts


def stage_tests(c: Check, gpu: bool):
    # a module that fails to import must not stop the others (it still counts as an error)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfE", "--tb=short", "-q",
            "--continue-on-collection-errors"] + TEST_SELECTION
    if gpu:
        argv += ["-v"]
        if _has("xdist"):   # one file per worker: each worker compiles its own file's kernels
            argv += ["-n", str(min(8, len(os.sched_getaffinity(0)))), "--dist", "loadfile"]
        if _has("pytest_timeout"):
            argv += ["--timeout", "30"]
    else:
        argv += ["-m", "cuda"]         # rehearsal: the same files and -k; no [cuda] case runs on a CPU
    rc, out, s = c.run("tests", argv)
    n = _pytest_counts(out)
    summary = ", ".join(f"{v} {k}" for k, v in n.items() if v) or "no test ran"
    ok = rc == 0 or (rc == 5 and not gpu)
    selection = "rehearsal -m cuda" if not gpu else "the op tests' [cuda] cases and test_sbn_triton.py"
    c.record("tests", ok and (n.get("passed", 0) > 0 or not gpu), s,
             f"{summary} ({selection}{'' if rc is not None else ', ' + _why(rc, s) + ', counts so far'})", out)


def _bench_argv(gpu: bool, paths: dict, stage: str) -> list[str]:
    # the plot is drawn once, from the merged records, by finish()
    argv = [sys.executable, "-c", BENCH_RUNNER, "--no-progress", "--json", paths["json"], "--md", paths["md"],
            "--no-plot"]
    if stage == "e2e":
        if gpu:
            return argv + ["--e2e-only", "--device", "cuda", "--dtype", "float32,bfloat16", "--quick",
                           "--e2e-rep-ms", "300"]
        # one thread: OpenMP threads on a loaded 2-core CI machine wait for each other for ms;
        # two variants (plain, and SBN inserted by normkernels.convert): the plumbing, not numbers
        return argv + ["--e2e-only", "--device", "cpu", "--dtype", "float32", "--quick", "--e2e-size", "2x32",
                       "--e2e-rep-ms", "50", "--e2e-variants", "bn,bn+sbn4", "--threads", "1", "--no-memory"]
    impls = "nk" if stage == "bench" else "compile"   # (bn's torch row always comes first)
    if gpu:
        return argv + ["--device", "cuda", "--shapes", RESNET50, "--dtype", "float32,bfloat16", "--quick",
                       "--rep-ms", "50", "--ops", BENCH_OPS, "--impls", impls]
    argv += ["--device", "cpu", "--shapes", "2x4x8x8", "--dtype", "float32", "--quick", "--threads", "1",
             "--rep-ms", "20", "--impls", impls]
    # rehearsal of compile: one inductor compile (L2BN forward), the rest is the same plumbing
    return argv + (["--ops", BENCH_OPS] if stage == "bench" else ["--ops", "l2bn", "--passes", "fwd"])


def _records(path: str) -> list:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


def stage_bench(c: Check, gpu: bool, stem: str, name: str):
    """bench: into the results' files; e2e and compile: into scratch files, merged by finish()."""
    e2e = name == "e2e"
    paths = {k: f"{stem}.{k}" for k in ("json", "md")}
    if name != "bench":
        paths = {k: os.path.join(c.out_dir, f".{name}-scratch.{k}") for k in ("json", "md")}
    rc, out, s = c.run(name, _bench_argv(gpu, paths, name))
    recs = [r for r in _records(paths["json"]) if "op" in r]
    if name == "compile":   # its bn rows repeat the bench's
        recs = [r for r in recs if r["impl"] == "compile"]
    timed = [r for r in recs if r.get("ms") is not None]
    detail = f"{len(timed)}/{len(recs)} measurements"
    if timed and not e2e:
        bn = [r for r in timed if r["op"] == "bn" and r.get("pct_copy")]
        best = [r for r in timed if r["op"] != "bn" and r["impl"] in ("nk", "compile") and r.get("ratio_bn")]
        if bn:
            detail += f"; BN at {min(r['pct_copy'] for r in bn):.0f}-{max(r['pct_copy'] for r in bn):.0f}% of copy"
        if best:
            detail += (f"; {best[0]['impl']} x BN {min(r['ratio_bn'] for r in best):.2f}-"
                       f"{max(r['ratio_bn'] for r in best):.2f}")
    if timed and e2e:
        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
        detail += "; step x BN " + ", ".join(f"{r['impl']} {short.get(r['dtype'], r['dtype'])} {r['ratio_bn']:.2f}"
                                            for r in timed if r.get("ratio_bn") and r["impl"] != "bn")
    errors = [r for r in recs if r.get("ms") is None]
    if errors:
        detail += f"; {len(errors)} failed, e.g. {errors[0]['op']}/{errors[0]['impl']}: {errors[0].get('error', '')[:120]}"
    if rc != 0:
        detail += f"; {_why(rc, s)}"
    if name != "bench":
        c.extra_records += recs
        for p in paths.values():
            if os.path.exists(p):
                os.remove(p)
    # compile: what fits in its cap is its result (the first rows are enough)
    finished = rc == 0 or (name == "compile" and rc is None)
    c.record(name, finished and bool(timed) and not errors, s, detail, out)


def stage_aot(c: Check, gpu: bool):
    env = {"TRITON_INTERPRET": "0"}
    argv = [sys.executable, os.path.join("tests", "test_triton_compile.py"), "--json", os.path.join(c.out_dir, ".aot.json")]
    if not gpu:
        argv += ["--smoke", "--jobs", "2"]
    rc, out, s = c.run("aot", argv, env)
    rep = _records(os.path.join(c.out_dir, ".aot.json")) or {}
    if os.path.exists(os.path.join(c.out_dir, ".aot.json")):
        os.remove(os.path.join(c.out_dir, ".aot.json"))
    if not rep:
        c.record("aot", False, s, f"no report ({_why(rc, s)})", out)
        return
    rows = rep.get("results", [])
    errs = [r for r in rows if r["error"] is not None]
    spill = [r for r in rows if r["error"] is None and (r["stack_bytes"] or r["spill_stores"] or r["local_bytes"])]
    ok_rows = [r for r in rows if r["error"] is None]
    regs = f"{min(r['registers'] for r in ok_rows)}-{max(r['registers'] for r in ok_rows)}" if ok_rows else "-"
    c.aot_summary = rep.get("summary", "")
    done = "" if rep.get("complete") else f" (of {rep.get('specialisations', '?')}: {_why(rc, s)})"
    c.record("aot", rc == 0 and rep.get("complete", False) and not errs and not spill, s,
             f"{len(rows)} specialisations{done} ({rep['triton']}, {rep['ptxas'].split(' (')[0]}): registers {regs}, "
             f"{len(spill)} spilling, {len(errs)} compile errors", out)


# ---------------------------------------------------------------------------------------------

def _command(argv) -> str:
    via_make = "MAKELEVEL" in os.environ
    out = os.environ.get("GPU_CHECK_OUT")
    cmd = "python benchmarks/gpu_check.py" + ("" if not argv else " " + shlex.join(argv))
    if via_make:
        cmd = f"make gpu-check ({cmd})"
    return (f"GPU_CHECK_OUT={out} " if out else "") + cmd


def finish(c: Check, stem: str, argv, device: str):
    """Merge the e2e and compile records into the bench JSON, add the stage outcomes to its header,
    and re-render the Markdown (stage table first) and the plot."""
    sys.path.insert(0, ROOT)
    import bench
    records = _records(stem + ".json")
    if not records:
        records = [{"type": "header", "device": device}]
    head = records[0]
    records = [head] + [r for r in records[1:] if "op" in r] + c.extra_records
    for r in records[1:]:
        r.pop("ratio_bn", None)
    bench._add_ratios(records)
    head["bench_command"] = head.get("command")
    head["command"] = _command(argv)
    head["device"] = head.get("device") or device
    head["gpu_check"] = {"rehearsal": c.rehearsal, "stages": c.results, "wall_s": round(time.monotonic() - c.start, 1)}
    atomic_write_outputs(records, stem + ".json")
    lines = [f"# gpu-check{' rehearsal' if c.rehearsal else ''}: {head['device']}", "",
             f"- command: `{head['command']}`", "", "| stage | status | s | detail |", "|---|---|---:|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['detail']} |" for r in c.results]
    if getattr(c, "aot_summary", ""):
        lines += ["", "Triton AOT compile on this machine:", "", "```", c.aot_summary, "```"]
    atomic_write(stem + ".md", "\n".join(lines) + "\n\n" + bench.render_markdown(records))
    atomic_write_outputs(records, png_path=stem + ".png")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {','.join(STAGES)}")
    p.add_argument("--rehearsal", action="store_true", help="the CPU rehearsal even where a GPU is present")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"unknown stages {bad}")
    sys.path.insert(0, ROOT)
    import torch
    gpu = torch.cuda.is_available() and not args.rehearsal
    from bench import device_tag
    device = torch.cuda.get_device_name() if gpu else "cpu"
    tag = device_tag("cuda" if gpu else "cpu")
    out_dir = os.path.abspath(os.environ.get("GPU_CHECK_OUT") or os.path.join(ROOT, "benchmarks", "results"))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, tag if gpu else f"rehearsal-{tag}")
    log_path = stem + "-gpu-check.log"
    open(log_path, "w").close()
    c = Check(out_dir, not gpu, log_path)
    c.log.write(f"gpu-check {'rehearsal ' if not gpu else ''}on {device}: {_command(argv)}\n")
    print(f"gpu-check{' rehearsal (no GPU)' if not gpu else ''} on {device}: stages {','.join(stages)}; "
          f"files {stem}.*", flush=True)
    if os.path.exists(stem + ".json"):
        os.remove(stem + ".json")     # never merge into a previous run's records
    for stage in stages:
        try:
            if stage == "env":
                stage_env(c, gpu)
            elif stage == "build":
                stage_build(c, gpu)
            elif stage == "tests":
                stage_tests(c, gpu)
            elif stage in ("bench", "e2e", "compile"):
                stage_bench(c, gpu, stem, stage)
            elif stage == "aot":
                stage_aot(c, gpu)
        except Exception as e:                # a broken stage must not take the others down
            c.record(stage, False, 0.0, f"gpu_check error: {type(e).__name__}: {e}")
    try:
        finish(c, stem, argv, device)
    except Exception as e:
        c.record("files", False, 0.0, f"writing results failed: {type(e).__name__}: {e}")
    files = sorted(f for f in os.listdir(out_dir) if f.startswith(os.path.basename(stem)))
    c.log.close()
    print()
    for r in c.results:       # printed last: only the tail of the output comes back from a GPU run
        print(f"gpu-check: {r['stage']:7s} {r['status']:4s} {r['seconds']:6.1f} s  {r['detail']}")
    print(f"gpu-check: files   {len(files)} in {out_dir}: {' '.join(files)}")
    print(f"gpu-check: total   {time.monotonic() - c.start:.0f} s, "
          f"{sum(r['status'] == 'ok' for r in c.results)}/{len(c.results)} stages ok"
          f"{' (rehearsal: no GPU)' if not gpu else ''}")
    return 0 if all(r["status"] == "ok" for r in c.results) else 1


if __name__ == "__main__":
    sys.exit(main())
