"""Every Triton kernel specialisation the launchers produce for real shapes, compiled for sm_90.

No GPU and no libcuda needed. In a subprocess WITHOUT TRITON_INTERPRET (conftest.py sets it for
this process before triton is imported; interpreted kernels cannot be compiled), the host
functions are called with meta-device tensors inside ``normkernels.triton.launch.recording()``:
nothing runs, every launch is recorded. Each unique specialisation (what the JIT would compile at
the first launch on the GPU: the JIT's own binder gives pointer dtypes, tt.divisibility 16 for
pointers and integers divisible by 16, constexpr 1 for integers equal to 1) is then compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``
and its cubin read with triton's bundled cuobjdump: registers, stack frame, local-memory
instructions (STL/LDL = spills). The tests fail on a compile error, on spills, on a launched
kernel of normkernels/triton that no recorded launch reaches, and on a difference between the
JIT's binder and the rules written out in tools/triton_aot.py's explicit_specialisation. The summary (registers
and spills per kernel) is printed at the end of the pytest run; the full table:

    python tests/test_triton_compile.py [--json out.json] [--jobs N] [--quick | --smoke]

What is recorded: every op of CONTRACT_OPS through IMPL of normkernels/triton/sbn.py (the host
functions, named and called exactly as the C++ ops of csrc/sbn.cpp), with the BN stage on
(BN+SBN) and off (SBN). The compiling is generic:
whatever was recorded is compiled.

Shapes: ResNet-50's (64,256,56,56) (64,512,28,28) (64,1024,14,14) (64,2048,7,7) and CIFAR's
(128,64,32,32); float32, bfloat16, float16, float64 (parameters in float32, and in the input's
dtype for 16-bit inputs: a model.half()); contiguous and channels_last (the output gradient in
either layout); training and eval; affine or not; every activation; every path: the Parseval
ops with the BN stage on and off, the pieces of the synchronized path (P = 3 processes), the FFT path's spectral
kernels.

Which ptxas compiles sm_90 (read this before comparing register counts with the GPU machine):
triton 3.9 (CI here) sends sm_90 and up to its bundled ``ptxas-blackwell``, a CUDA 13.4 ptxas (PTX
ISA 9.4); triton 3.6 (the GPU machine, with torch 2.11) sends everything below sm_100 to its
bundled ``ptxas``, CUDA 12.8 (PTX ISA 8.7, LLVM at +ptx86), and uses its ptxas-blackwell (12.9)
only for sm_100+. The cubins the GPU machine runs therefore come from another register allocator
(and another triton pipeline) than the ones compiled here: a kernel that fits here can spill there
and the other way round. So when this triton's sm_90 ptxas is not a CUDA 12 one, every kernel's
PTX is also assembled by the CUDA 12 ``ptxas`` bundled next to it (12.9 in triton 3.9, its
.version lowered to 8.8: the closest to 3.6's 12.8 available here; cached in triton's cache) and
must not spill with either. That is still an approximation: the three toolchains disagree at
the margin (an 8-warp float64 FFT apply once spilled only under the real triton 3.6 + ptxas 12.8,
installed beside on PYTHONPATH; the current kernels compile without local memory under all
three). Why small spills appear at all: ptxas trades a few spilled values (8-16 B of stack) for
occupancy, capping a 256-thread kernel at 64, 80 or 128 registers (4, 3, 2 blocks a
multiprocessor) when it needs a little more; the cure is fewer live values or another tile, not
.maxnreg (given one, ptxas stops capping and takes far more: 48 -> 94 registers for the float64
eval backward apply). The exact 3.6 numbers come from the GPU machine: `make gpu-check` runs
this enumeration there (its aot stage). Either ptxas's cubin loads on the GPU machine's driver
(580, CUDA 13.0); only PTX JIT would need PTX ISA <= 9.0.

Time on 2 shared cores: ~6 minutes for the 560 specialisations when triton's cache is cold
(~1.2 s of CPU each with the second ptxas), ~10 s of compiling when it is warm (triton's own
cache, kept across runs in ~/.triton/cache, and the second ptxas's results cached there too).
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))  # tools/triton_aot.py: the ahead-of-time compile

pytestmark = pytest.mark.gpu_compile

RESNET50_SHAPES = [(64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7)]
CIFAR_SHAPES = [(128, 64, 32, 32)]
SHAPES = RESNET50_SHAPES + CIFAR_SHAPES
DTYPES = ("float32", "bfloat16", "float16", "float64")
LAYOUTS = ("contiguous", "channels_last")
ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu")
FFT_NORMS = ("backward", "ortho", "forward")
SYNC_PROCESSES = 3

# The op contract (csrc/sbn.cpp): IMPL of normkernels/triton/sbn.py maps each op name to a host
# function with the C++ op's signature; these are the ops recorded, by name. Every one must be in
# IMPL: a missing one fails the test (edit this table if the contract changes).
CONTRACT_OPS = ("sbn_stats", "sbn_finish", "sbn_forward", "sbn_grad_stats", "sbn_grad_finish",
                "sbn_backward", "sbn_fft_spectral_forward", "sbn_fft_spectral_backward")
SAVED_COLS, ROW_COLS, GSUM_COLS = 26, 8, 4   # csrc/sbn.cpp (normkernels/ops/sbn_layout.py)


# ---------------------------------------------------------------------------------------------
# the enumeration (runs in the subprocess)

class Case:
    """One configuration: meta tensors and parameters for the host functions."""

    def __init__(self, shape, dtype: str, layout: str, dy_layout: str, training: bool, act: str,
                 affine: bool, param_dtype: str, index: int):
        import torch
        self.torch = torch
        self.shape, self.training, self.act, self.affine = shape, training, act, affine
        self.dtype = getattr(torch, dtype)
        self.acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.pdt = getattr(torch, param_dtype)
        fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
        self.x = torch.empty(shape, device="meta", dtype=self.dtype, memory_format=fmt[layout])
        self.dy = torch.empty(shape, device="meta", dtype=self.dtype, memory_format=fmt[dy_layout])
        self.C = shape[1]
        self.dy_same = layout == dy_layout       # forward ops do not see dy: record them once
        # deterministic spread of the float options over the cases (they are runtime floats:
        # no specialisation depends on them, but every value gets exercised)
        self.fft_norm = FFT_NORMS[index % len(FFT_NORMS)]
        self.act_param = 0.01 if act == "leaky_relu" else 0.0
        self.where = (f"{'x'.join(map(str, shape))} {dtype} {layout} dy:{dy_layout} "
                      f"{'train' if training else 'eval'} {act} {'affine' if affine else 'no-affine'} "
                      f"params:{param_dtype}")

    def t(self, *shape, dtype=None):
        return self.torch.empty(shape, device="meta", dtype=dtype or self.acc)

    def param(self):
        return self.torch.empty(self.C, device="meta", dtype=self.pdt) if self.affine else None

    def f64(self, *shape):
        return self.torch.empty(shape, device="meta", dtype=self.torch.float64)


def contract_calls(impl: dict, c: Case):
    """(op name, thunk) of every op of the contract for one case (csrc/sbn.cpp's arguments), with
    the BN stage on (BN+SBN) and off (SBN)."""
    x, dy, C, act, ap, fn = c.x, c.dy, c.C, c.act, c.act_param, c.fft_norm
    P = SYNC_PROCESSES
    calls = []
    for bn in (True, False):
        w, b = c.param(), c.param()
        bw, bb = (c.param(), c.param()) if bn else (None, None)
        mean, var = (None, None) if c.training else (c.t(C, 2), c.t(C))
        bmean, bvar = (None, None) if c.training or not bn else (c.t(C), c.t(C))
        calls.append(("sbn_backward", lambda bn=bn: impl["sbn_backward"](dy, x, c.f64(C, SAVED_COLS), bn,
                                                                          c.training, fn, act, ap)))
        if c.dy_same:
            calls.append(("sbn_forward", lambda bn=bn, bw=bw, bb=bb, w=w, b=b, bmean=bmean, bvar=bvar, mean=mean,
                          var=var: impl["sbn_forward"](x, bn, bw, bb, bmean, bvar, w, b, mean, var, 1e-5, 1e-5,
                                                       fn, act, ap)))
        if c.training:     # the synchronized path: statistics of P processes, this one rank 1
            calls.append(("sbn_grad_finish", lambda bn=bn: impl["sbn_grad_finish"](
                dy, x, c.f64(C, SAVED_COLS), c.f64(C, GSUM_COLS), c.f64(C, GSUM_COLS), bn, True, fn, act, ap)))
            if c.dy_same:
                calls.append(("sbn_finish", lambda bn=bn, bw=bw, bb=bb, w=w, b=b: impl["sbn_finish"](
                    x, c.f64(P, C, ROW_COLS), 1, bn, bw, bb, w, b, 1e-5, 1e-5, fn, act, ap)))
    if c.training:
        calls.append(("sbn_grad_stats", lambda: impl["sbn_grad_stats"](dy, x, c.f64(C, SAVED_COLS), act, ap)))
        if c.dy_same:
            calls.append(("sbn_stats", lambda: impl["sbn_stats"](x)))
    return calls + fft_calls(impl, c)


def fft_calls(impl: dict, c: Case):
    """The FFT path's spectral kernels: on the real view (N, C, H, W//2+1, 2) of rfft2(x) in
    the accumulation dtype (what ops/sbn_fft.py hands them). No activation (never fused there)."""
    N, C, H, W = c.shape
    Xr = c.t(N, C, H, W // 2 + 1, 2)
    w, b = c.param(), c.param()
    stats = None if c.training else c.t(C, 3)
    if not c.dy_same or c.act != "identity":   # contiguous spectra, no activation: once per case
        return []
    return [("sbn_fft_spectral_forward", lambda: impl["sbn_fft_spectral_forward"](Xr, w, b, stats, 1e-5)),
            ("sbn_fft_spectral_backward", lambda: impl["sbn_fft_spectral_backward"](
                c.t(N, C, H, W // 2 + 1, 2), Xr, w, c.t(C, 3), 1e-5, W, c.training))]


def cases(quick: bool = False, smoke: bool = False):
    """quick: two shapes; smoke (gpu-check's rehearsal): the CIFAR shape in float32, training."""
    shapes = CIFAR_SHAPES if smoke else SHAPES[:1] + CIFAR_SHAPES if quick else SHAPES
    i = 0
    for shape in shapes:
        for dtype in (DTYPES[:1] if smoke else DTYPES):
            pdts = ("float64",) if dtype == "float64" else \
                ("float32",) if dtype == "float32" else ("float32", dtype)
            for layout in LAYOUTS:
                for dy_layout in LAYOUTS:
                    for training in ((True,) if smoke else (True, False)):
                        for act in ACTIVATIONS:
                            for affine in (True, False):
                                for pdt in (pdts if affine else pdts[:1]):
                                    yield Case(shape, dtype, layout, dy_layout, training, act, affine, pdt, i)
                                    i += 1


def launcher_module():
    """Op name -> host function: IMPL of normkernels/triton/sbn.py (called exactly as the C++ ops
    of csrc/sbn.cpp) and the FFT path's two spectral passes."""
    from normkernels.triton import sbn
    IMPL = dict(sbn.IMPL, sbn_fft_spectral_forward=sbn.sbn_fft_spectral_forward,
                sbn_fft_spectral_backward=sbn.sbn_fft_spectral_backward)
    missing = [op for op in CONTRACT_OPS if op not in IMPL]
    if missing:
        raise SystemExit(f"normkernels.triton.sbn.IMPL lacks {missing}: the op contract of csrc/sbn.cpp "
                         "(or update CONTRACT_OPS in tests/test_triton_compile.py)")
    return IMPL


def record_all(quick: bool = False, smoke: bool = False):
    """Every launch of every case, each tagged with the op and case that made it."""
    from normkernels.triton.launch import recording
    mod = launcher_module()
    launches, calls_made = [], 0
    for c in cases(quick, smoke):
        calls = contract_calls(mod, c)
        for op, thunk in calls:
            with recording() as rec:
                thunk()
            calls_made += 1
            for r in rec:
                r.where = f"{op} {c.where}"
            launches += rec
    return launches, calls_made


def launched_kernels() -> dict:
    """Every @triton.jit function of normkernels/triton that is a kernel (not called from another
    jit function's body): name -> module. Each must be reached by some recorded launch."""
    import importlib
    import pkgutil

    import normkernels.triton as pkg
    from triton.runtime.jit import JITFunction
    jit = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "launch":
            continue
        mod = importlib.import_module(f"normkernels.triton.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                jit[name] = mod.__name__
    called = set()
    for name, modname in jit.items():
        fn = getattr(importlib.import_module(modname), name).fn
        tree = ast.parse(inspect.getsource(fn).lstrip())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                called.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None)
    return {n: m for n, m in jit.items() if n not in called}


def specialisation_mismatches(launches) -> list[str]:
    """Launches where triton_aot.explicit_specialisation disagrees with the JIT's own binder (the
    attributes compared by their content: triton 3.9 also lists empty ones for constexprs)."""
    from triton_aot import explicit_specialisation, launch_key, specialise
    out, seen, bound = [], set(), set()
    for r in launches:
        lk = launch_key(r)            # launches the binder cannot tell apart: checked once
        if lk in bound:
            continue
        bound.add(lk)
        sig, cx, attrs, _ = specialise(r)
        key = (r.name, tuple(sig.items()), tuple(sorted(k for k, v in attrs.items() if v)))
        if key in seen:
            continue
        seen.add(key)
        mine = explicit_specialisation(r)
        for what, jit, ours in (("signature", sig, mine[0]),
                                ("constexprs", {k: str(v) for k, v in cx.items()}, {k: str(v) for k, v in mine[1].items()}),
                                ("attrs", {k: v for k, v in attrs.items() if v}, {k: v for k, v in mine[2].items() if v})):
            if jit != ours:
                diff = {k: (jit.get(k), ours.get(k)) for k in set(jit) | set(ours) if jit.get(k) != ours.get(k)}
                out.append(f"{r.name} [{r.where}] {what} (jit, explicit): {diff}")
    return out[:20]


def spills(res: dict) -> bool:
    """Local memory in use: spilled registers (STL/LDL) or a stack frame."""
    return bool(res["spill_stores"] or res["spill_loads"] or res["stack_bytes"] or res["local_bytes"])


def resource_sets(report: dict):
    """(label, [(row, resources)]) for the primary compile and, if done, the second ptxas."""
    rows = report["results"]
    yield report["ptxas"], [(r, r) for r in rows if r["error"] is None]
    if report.get("reassembled_with"):
        yield report["reassembled_with"], [(r, r["reassembled"]) for r in rows
                                           if r["error"] is None and r["reassembled"]["error"] is None]


def summarise(report: dict) -> str:
    """The per-kernel table: specialisations, warps, registers, stack, STL/LDL, shared memory."""
    rows = report["results"]
    lines = [f"{len(rows)} specialisations of {len({r['kernel'] for r in rows})} kernels from {report['launches']} "
             f"launches ({report['calls']} host calls on meta tensors, {report['record_s']} s), "
             f"compiled for sm_90a by {report['triton']} in {report['compile_s']} s with {report['jobs']} jobs"]
    for label, pairs in resource_sets(report):
        lines.append(f"{label}:")
        lines.append(f"  {'kernel':26s} {'specs':>5s} {'warps':>5s} {'registers':>9s} {'stack B':>7s} "
                     f"{'STL/LDL':>8s} {'spilling':>8s} {'shared B':>9s}")
        for name in sorted({r["kernel"] for r in rows}):
            ps = [(r, res) for r, res in pairs if r["kernel"] == name]
            if not ps:
                lines.append(f"  {name:26s} no compiled specialisation")
                continue
            rng = lambda key: f"{min(res[key] for _, res in ps)}-{max(res[key] for _, res in ps)}"
            warps = "/".join(str(w) for w in sorted({r["num_warps"] for r, _ in ps}))
            stl = f"{sum(res['spill_stores'] for _, res in ps)}/{sum(res['spill_loads'] for _, res in ps)}"
            lines.append(f"  {name:26s} {len(ps):5d} {warps:>5s} {rng('registers'):>9s} {rng('stack_bytes'):>7s} "
                         f"{stl:>8s} {sum(spills(res) for _, res in ps):8d} {rng('shared_bytes') if 'shared_bytes' in ps[0][1] else '':>9s}")
    for r in rows:
        if r["error"] is not None:
            lines.append(f"ERROR {r['kernel']} {r['constexprs']} e.g. {r['where'][:1]}: "
                         f"{r['error'].splitlines()[-1][:300]}")
    return "\n".join(lines)


def spill_lines(report: dict) -> list[str]:
    return [f"{label}: {r['kernel']} {r['constexprs']} warps={r['num_warps']} {r['pointers']}: {res['registers']} "
            f"registers, {res['stack_bytes']} B stack, {res['local_bytes']} B local, {res['spill_stores']} STL / "
            f"{res['spill_loads']} LDL (e.g. {r['where'][:1]})"
            for label, pairs in resource_sets(report) for r, res in pairs if spills(res)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="compile every Triton specialisation for sm_90")
    p.add_argument("--json", default=None, help="write the full report here")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: all cores)")
    p.add_argument("--quick", action="store_true", help="two shapes only")
    p.add_argument("--smoke", action="store_true", help="one shape, float32, training (a plumbing check)")
    p.add_argument("--no-legacy-ptxas", action="store_true", help="skip the CUDA 12 ptxas pass")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1: interpreted kernels cannot be compiled; unset it", file=sys.stderr)
        return 2
    import warnings
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    import triton

    import triton_aot as launch
    t0 = time.perf_counter()
    launches, calls = record_all(args.quick, args.smoke)
    record_s = time.perf_counter() - t0
    jobs = args.jobs or len(os.sched_getaffinity(0))
    path, release = launch.ptxas_for_sm90()
    legacy = None if args.no_legacy_ptxas or release.startswith("12.") else launch.legacy_ptxas()
    report = {"triton": f"triton {triton.__version__}", "launches": len(launches),
              "calls": calls, "record_s": round(record_s, 1), "jobs": jobs,
              "ptxas": f"ptxas {release} ({os.path.basename(path)}: this triton's choice for sm_90)",
              "reassembled_with": None if legacy is None else
              f"ptxas {legacy[1]} (bundled '{os.path.basename(legacy[0])}', as triton 3.6 uses for sm_90; "
              "same PTX, .version lowered)",
              "kernels_expected": sorted(launched_kernels()),
              "kernels_recorded": sorted({r.name for r in launches}),
              "specialisation_mismatches": specialisation_mismatches(launches)}
    t1 = time.perf_counter()
    report.update(results=[], complete=False)

    def progress(row, total):
        # a partial report every 50 compiles: a caller's timeout (gpu-check) still gets them
        report["results"].append(row)
        report["specialisations"] = total
        if args.json and len(report["results"]) % 50 == 1:
            with open(args.json, "w") as f:
                json.dump(report, f, default=str)
    launch.compile_launches(launches, jobs=jobs, reassemble_with=legacy, progress=progress)
    report["compile_s"] = round(time.perf_counter() - t1, 1)
    report["complete"] = True
    text = summarise(report)
    report["summary"] = text
    print(text)
    for line in spill_lines(report):
        print("SPILLS " + line)
    print(f"total {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


# ---------------------------------------------------------------------------------------------
# the tests (run the enumeration and the compiles once, in a subprocess)

@pytest.fixture(scope="module")
def report(tmp_path_factory, terminal_section):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("triton_compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"compile subprocess failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    with open(out) as f:
        rep = json.load(f)
    terminal_section("Triton kernels compiled for sm_90 (tests/test_triton_compile.py)", rep["summary"])
    return rep


def test_every_specialisation_compiles(report):
    rows = report["results"]
    assert rows, "no launch was recorded"
    errors = [f"{r['kernel']} {r['constexprs']} {r['pointers']} ({r['where'][:1]}): {r['error'][-1500:]}"
              for r in rows if r["error"] is not None]
    errors += [f"{r['kernel']} {r['constexprs']}: {r['reassembled']['error']}" for r in rows
               if r["error"] is None and r.get("reassembled") and r["reassembled"]["error"] is not None]
    assert not errors, f"{len(errors)} specialisations failed to compile:\n" + "\n".join(errors[:5])


def test_no_register_spills(report):
    found = spill_lines(report)
    assert not found, f"{len(found)} compiled specialisations use local memory (spills):\n" + "\n".join(found[:12])


def test_every_kernel_is_reached(report):
    missing = sorted(set(report["kernels_expected"]) - set(report["kernels_recorded"]))
    assert report["kernels_expected"], "found no Triton kernel in normkernels/triton"
    assert not missing, f"no recorded launch reaches {missing}: add their path to the enumeration"


def test_explicit_rules_match_the_jit(report):
    assert not report["specialisation_mismatches"], "\n".join(report["specialisation_mismatches"])


def test_registers_are_reported(report):
    pairs = [pair for _, ps in resource_sets(report) for pair in ps]
    assert pairs and all(0 < res["registers"] <= 255 for _, res in pairs), "cuobjdump's register counts were not read"


# launch.py's recording itself, in this process (kernels interpreted under TRITON_INTERPRET=1)

def _tiny_kernel():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def fill(out_ptr, n, value, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, value, mask=i < n)
    return triton, fill


def test_recording_collects_every_launch_and_runs_none():
    import torch

    from normkernels.triton.launch import launch, recording
    triton, fill = _tiny_kernel()
    tuned = triton.autotune([triton.Config({"BLOCK": 8}, num_warps=1), triton.Config({"BLOCK": 16}, num_warps=2)],
                            key=["n"])(fill)
    out = torch.zeros(20)
    with recording() as calls:
        launch(fill, (3,), out, 20, 1.5, BLOCK=8, num_warps=2)
        fill[(2,)](out, 20, 2.5, BLOCK=16)
        fill[lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)](out, 20, 3.5, BLOCK=4, num_stages=2)
        tuned[(1,)](out, 20, 4.5)
    assert torch.all(out == 0), "a recorded launch ran"
    got = [(c.name, c.grid, c.args[1:], c.constexprs, c.num_warps, c.num_stages) for c in calls]
    assert got == [("fill", (3,), (20, 1.5), {"BLOCK": 8}, 2, None), ("fill", (2,), (20, 2.5), {"BLOCK": 16}, 4, None),
                   ("fill", (5,), (20, 3.5), {"BLOCK": 4}, 4, 2), ("fill", (1,), (20, 4.5), {"BLOCK": 8}, 1, 3),
                   ("fill", (1,), (20, 4.5), {"BLOCK": 16}, 2, 3)], got
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():   # outside: launches run again
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        out = torch.zeros(20, device=dev)
        launch(fill, (3,), out, 20, 1.5, BLOCK=8)
        assert torch.all(out.cpu() == 1.5)


def test_multiprocessor_count():
    import torch

    from normkernels.triton.launch import RECORDING_SM_COUNT, multiprocessor_count
    assert multiprocessor_count(torch.empty(1, device="meta").device) == RECORDING_SM_COUNT == 132
    with pytest.raises(ValueError, match="not a CUDA device"):
        multiprocessor_count("cpu")


if __name__ == "__main__":
    sys.exit(main())
