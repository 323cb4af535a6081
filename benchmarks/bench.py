"""Benchmarks: every layer against torch's BatchNorm and against the bandwidth limit.

    python benchmarks/bench.py                      # short run on whatever device is present
    python benchmarks/bench.py --quick              # a few minutes on a 2-core CPU
    python benchmarks/bench.py --json r.json --md r.md --e2e

One table comes out: for each op (torch's BatchNorm2d baseline, L2BN, SBN, BN+SBN), shape,
dtype and pass (``fwd`` = a training-mode forward, ``fwd+bwd`` = forward then the gradients of
the input and the affine parameters), the time of every implementation, its ratio to
nn.BatchNorm2d on the same tensor in the same run, the bandwidth it achieves counted with the
minimal traffic of the pass (forward 3x the tensor's bytes, forward+backward 8x, docs/DESIGN.md §5),
that bandwidth as a percentage of a device-to-device copy measured in the same run, and the peak
memory of the pass relative to BatchNorm's.

Implementations (``impl``):
    torch        nn.BatchNorm2d (the baseline every ratio refers to)
    nk           normkernels' own layer, backend="auto" (nk.L2BatchNorm2d / SpectralBatchNorm2d /
                 BatchNormSBN2d)
    nk-fft       nk.SpectralBatchNorm2d(algorithm="fft"): the FFT path of the library
    eager        the literal definition in plain torch ops, written here: L2BN =
                 F.batch_norm(F.normalize(x.flatten(1)).view_as(x)); SBN = rfft2 -> complex
                 mean/var -> normalize/affine -> irfft2 (computed in float32 for 16-bit inputs,
                 since torch.fft has no bfloat16)
    compile      torch.compile of that eager reference
    two-modules  nn.BatchNorm2d followed by nk.SpectralBatchNorm2d (the unfused pair)

Fused-activation rows (issue #13; ops ``<layer>+relu``), ReLU after each layer:
    nk-fused     nk.L2BatchNormAct2d / SpectralBatchNormAct2d / BatchNormSBNAct2d with nn.ReLU:
                 the layer passes activation="relu" to normkernels.functional.* (fused into the
                 kernels' passes once they implement it; before, applied after the op)
    nk+relu      the nk layer followed by nn.ReLU(inplace=True)
    torch+relu   nn.BatchNorm2d followed by nn.ReLU(inplace=True) (op bn+relu)
    compile+relu torch.compile of that pair (op bn+relu): Inductor's fused kernel, the anchor
Their columns: ``x BN+ReLU`` (time / torch+relu), ``x nk+ReLU`` (nk-fused time / nk+relu: the
issue's <= 0.8 target) and ``mem x layer`` (peak memory / the nk layer alone's: target <= 1).

Timing: triton.testing.do_bench (median) on CUDA; on CPU the median of many synchronous runs.
Inputs rotate among several pre-made random tensors (never zeros) so caches do not flatter.
The records are also what benchmarks/render.py turns into the Markdown table and the PNG.
"""
from __future__ import annotations

import os
import sys

import argparse
import ctypes
import datetime
import gc
import json
import math
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RESNET50_SHAPES", "CIFAR_SHAPES", "OPS", "PASSES", "IMPLS", "E2E_VARIANTS",
    "L2BNComposite", "SBNLiteral", "suite_shapes", "build", "make_runner", "time_ms",
    "copy_bandwidth", "peak_memory", "measure", "e2e_step", "run_e2e", "e2e_config", "render_markdown",
    "plot_ratios", "main",
]

# ---------------------------------------------------------------------------------------------
# what is measured

RESNET50_SHAPES = [(64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7)]
CIFAR_SHAPES = [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8)]
CPU_BATCH = {"resnet50": 8, "cifar": 16}          # CPU: same C, H, W with a smaller batch
CPU_BATCH_QUICK = {"resnet50": 4, "cifar": 8}
QUICK_SHAPES = {"resnet50": [(64, 1024, 14, 14)], "cifar": [(128, 128, 16, 16)]}
# the CPU targets of issues #10 and #13: `--quick` on a CPU measures these
CPU_TARGET_SHAPES = [(32, 128, 28, 28), (16, 256, 8, 8), (8, 2048, 7, 7)]

OPS = ("bn", "l2bn", "sbn", "bnsbn", "bn+relu", "l2bn+relu", "sbn+relu", "bnsbn+relu")
PASSES = ("fwd", "fwd+bwd")
TRAFFIC = {"fwd": 3, "fwd+bwd": 8}                # minimal traffic in tensor-sized transfers
IMPLS = {
    "bn": ("torch",),
    "l2bn": ("nk", "eager", "compile"),
    "sbn": ("nk", "nk-fft", "eager", "compile"),
    "bnsbn": ("nk", "two-modules", "eager", "compile"),
    "bn+relu": ("torch+relu", "compile+relu"),
    "l2bn+relu": ("nk-fused", "nk+relu"),
    "sbn+relu": ("nk-fused", "nk+relu"),
    "bnsbn+relu": ("nk-fused", "nk+relu"),
}
OP_LABEL = {"bn": "BatchNorm2d", "l2bn": "L2BN", "sbn": "SBN", "bnsbn": "BN+SBN", "bn+relu": "BatchNorm2d+ReLU",
            "l2bn+relu": "L2BN+ReLU", "sbn+relu": "SBN+ReLU", "bnsbn+relu": "BN+SBN+ReLU"}
ACTIVATION = "relu"
E2E_VARIANTS = ("bn", "bn+sbn4", "bn+sbn34", "l2bn")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def suite_shapes(device: str, quick: bool = False, families=("resnet50", "cifar"), targets: bool = True) -> list[tuple]:
    """The benchmark shapes for a device: full batches on GPU; on CPU smaller batches of the
    same C, H, W and the CPU target shapes (``--quick`` on CPU: the target shapes only)."""
    if device == "cpu" and quick and targets:
        return list(CPU_TARGET_SHAPES)
    out = []
    for fam in families:
        shapes = QUICK_SHAPES[fam] if quick else (RESNET50_SHAPES if fam == "resnet50" else CIFAR_SHAPES)
        for n, c, h, w in shapes:
            if device == "cpu":
                n = (CPU_BATCH_QUICK if quick else CPU_BATCH)[fam]
            out.append((n, c, h, w))
    if device == "cpu" and not quick and targets:
        out += [s for s in CPU_TARGET_SHAPES if s not in out]
    return out


# ---------------------------------------------------------------------------------------------
# eager references (the literal definitions of docs/DESIGN.md §1)

class L2BNComposite(nn.BatchNorm2d):
    """L2BN as the paper writes it: F.normalize over each sample, then nn.BatchNorm2d."""

    def forward(self, x):
        return super().forward(F.normalize(x.flatten(1), dim=1).view_as(x))


class SBNLiteral(nn.Module):
    """SBN as Algorithm 1 of the paper: rfft2 -> complex per-channel mean and one real variance
    of the modulus -> normalize and real affine -> irfft2. Running statistics as in BatchNorm
    (complex running_mean, unbiased factor over n = N*H*(W//2+1) coefficients)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features, dtype=torch.complex64))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        n_, _, h, w = x.shape
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        spec = torch.fft.rfft2(xf)
        if self.training:
            mu = spec.mean(dim=(0, 2, 3))
            d = spec - mu[:, None, None]
            var = (d.real.square() + d.imag.square()).mean(dim=(0, 2, 3))
            with torch.no_grad():
                n = n_ * h * spec.shape[-1]
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(mu.detach().to(self.running_mean.dtype) * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (m * n / max(n - 1, 1)))
                self.num_batches_tracked.add_(1)
        else:
            d = spec - self.running_mean[:, None, None]
            var = self.running_var
        scale = (self.weight / torch.sqrt(var + self.eps))[:, None, None]
        y = torch.fft.irfft2(d * scale + self.bias[:, None, None], s=(h, w))
        return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# building an implementation

def _nk():
    import normkernels as nk
    return nk


def _compiled(module: nn.Module):
    import torch._dynamo
    torch._dynamo.reset()        # each (shape, dtype) gets fresh, specialized code
    return torch.compile(module)


def build(op: str, impl: str, channels: int, device, dtype=torch.float32) -> tuple[Callable, list]:
    """(callable x -> y, trainable parameters) for one op/impl; raises if it is unavailable.

    Parameters stay float32 (as under autocast); the input carries the benchmark dtype."""
    c = channels
    nk_layer = {"l2bn+relu": lambda: _nk().L2BatchNorm2d(c), "sbn+relu": lambda: _nk().SpectralBatchNorm2d(c),
                "bnsbn+relu": lambda: _nk().BatchNormSBN2d(c)}
    # the NormAct layers pass activation="relu" to normkernels.functional (fused in the kernels)
    nk_fused = {"l2bn+relu": lambda: _nk().L2BatchNormAct2d(c, act_layer=nn.ReLU),
                "sbn+relu": lambda: _nk().SpectralBatchNormAct2d(c, act_layer=nn.ReLU),
                "bnsbn+relu": lambda: _nk().BatchNormSBNAct2d(c, act_layer=nn.ReLU)}
    if op == "bn" and impl == "torch":
        m = nn.BatchNorm2d(c)
    elif op == "bn+relu" and impl in ("torch+relu", "compile+relu"):
        m = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True))
    elif op in nk_fused and impl == "nk-fused":
        m = nk_fused[op]()
    elif op in nk_layer and impl == "nk+relu":
        m = nn.Sequential(nk_layer[op](), nn.ReLU(inplace=True))
    elif op == "l2bn":
        m = {"nk": lambda: _nk().L2BatchNorm2d(c), "eager": lambda: L2BNComposite(c),
             "compile": lambda: L2BNComposite(c)}[impl]()
    elif op == "sbn":
        m = {"nk": lambda: _nk().SpectralBatchNorm2d(c),
             "nk-fft": lambda: _nk().SpectralBatchNorm2d(c, algorithm="fft"),
             "eager": lambda: SBNLiteral(c), "compile": lambda: SBNLiteral(c)}[impl]()
    elif op == "bnsbn":
        m = {"nk": lambda: _nk().BatchNormSBN2d(c),
             "two-modules": lambda: nn.Sequential(nn.BatchNorm2d(c), _nk().SpectralBatchNorm2d(c)),
             "eager": lambda: nn.Sequential(nn.BatchNorm2d(c), SBNLiteral(c)),
             "compile": lambda: nn.Sequential(nn.BatchNorm2d(c), SBNLiteral(c))}[impl]()
    else:
        raise KeyError(f"unknown op/impl {op}/{impl}")
    m = m.to(device).train()
    params = [p for p in m.parameters() if p.requires_grad]
    fn = _compiled(m) if impl in ("compile", "compile+relu") else m
    return fn, params


def _pool_size(nbytes: int, device: str) -> int:
    """How many distinct inputs to rotate through: enough to spill the last-level cache."""
    target = (256 if device == "cuda" else 96) * 2**20
    return max(3, min(16, math.ceil(target / max(nbytes, 1))))


def make_inputs(shape, device, dtype, count: int, seed: int = 0):
    # drawn on the device: a 200 MB tensor drawn on the CPU and copied costs seconds per shape
    g = torch.Generator(device=device).manual_seed(seed)
    xs = [(torch.randn(shape, generator=g, device=device) * 2 + 0.5).to(dtype) for _ in range(count)]
    dys = [torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(count)]
    return xs, dys


def make_runner(fn: Callable, params: list, xs: list, dys: list, pass_: str) -> Callable[[], None]:
    """A no-argument closure running one pass on the next input of the rotation."""
    state = {"i": 0}
    if pass_ == "fwd":
        def run():
            i = state["i"] = (state["i"] + 1) % len(xs)
            fn(xs[i])
        return run
    xgs = [x.detach().requires_grad_(True) for x in xs]

    def run():
        i = state["i"] = (state["i"] + 1) % len(xgs)
        y = fn(xgs[i])
        torch.autograd.grad(y, [xgs[i], *params], dys[i])
    return run


# ---------------------------------------------------------------------------------------------
# timing, bandwidth, memory

def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(run: Callable[[], None], device: str, quick: bool = False, rep_ms: float | None = None) -> float:
    """Median milliseconds of one call, synchronized with the device.

    rep_ms: GPU measuring time (do_bench's rep; default 100 quick / 400), CPU time budget."""
    if device == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:                      # pragma: no cover - CUDA without triton
            do_bench = None
        if do_bench is not None:
            rep = rep_ms or (100 if quick else 400)
            return float(do_bench(run, warmup=max(25, rep // 4), rep=rep, return_mode="median"))
        times = []
        for _ in range(5):
            run()
        for _ in range(20 if quick else 100):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); run(); b.record(); torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)
    budget = (rep_ms / 1e3) if rep_ms else (0.25 if quick else 1.0)
    run(); run()                                  # warm up (allocator, first-call paths)
    times, end = [], time.perf_counter() + budget
    while len(times) < 5 or (time.perf_counter() < end and len(times) < 200):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def copy_bandwidth(device: str, quick: bool = False) -> float:
    """GB/s of a device-to-device copy (read + write counted) of a large float32 tensor."""
    numel = (64 if device == "cuda" else 16) * 2**20
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, quick)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _cpu_peak_bytes(run: Callable[[], None]) -> float | None:
    """Peak of live bytes allocated during one call on CPU, from the profiler's memory events."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        events = prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except Exception:                             # private API; report n/a rather than guess
        return None
    cur = peak = 0
    for _, nbytes in mem:
        cur += nbytes
        peak = max(peak, cur)
    return float(peak) if mem else None


def peak_memory(run: Callable[[], None], device: str) -> float | None:
    """Bytes allocated at the peak of one call, above what was allocated before it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    if device == "cpu":
        return _cpu_peak_bytes(run)
    return None


# ---------------------------------------------------------------------------------------------
# one measurement

def _fmt_shape(shape) -> str:
    return "x".join(str(s) for s in shape)


def _error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


def measure(op: str, impl: str, shape, dtype: torch.dtype, device: str, passes=PASSES,
            quick: bool = False, copy_gbps: float | None = None, inputs=None, memory: bool = True,
            rep_ms: float | None = None) -> list[dict]:
    """Records for one op/impl on one shape and dtype, one per pass (error records on failure)."""
    dname = str(dtype).replace("torch.", "")
    base = {"op": op, "impl": impl, "shape": list(shape), "dtype": dname}
    try:
        fn, params = build(op, impl, shape[1], device, dtype)
    except Exception as e:
        return [dict(base, **{"pass": p, "ms": None, "gbps": None, "peak_mem_ratio": None,
                              "error": "unavailable: " + _error(e)}) for p in passes]
    if inputs is None:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        inputs = make_inputs(shape, device, dtype, _pool_size(nbytes, device))
    xs, dys = inputs
    nbytes = xs[0].numel() * xs[0].element_size()
    out = []
    for p in passes:
        rec = dict(base, **{"pass": p})
        try:
            run = make_runner(fn, params, xs, dys, p)
            run()                                  # compile / autotune / first call outside timing
            _sync(device)
            ms = time_ms(run, device, quick, rep_ms)
            gbps = TRAFFIC[p] * nbytes / (ms * 1e-3) / 1e9
            rec.update(ms=ms, gbps=gbps, pct_copy=100 * gbps / copy_gbps if copy_gbps else None)
            rec["peak_mem_bytes"] = peak_memory(run, device) if memory else None
        except Exception as e:
            rec.update(ms=None, gbps=None, error=_error(e))
        rec.setdefault("peak_mem_ratio", None)
        out.append(rec)
    del fn, params
    return out


def _add_ratios(records: list[dict]) -> None:
    """ratio_bn and peak_mem_ratio against the torch BatchNorm record of the same tensor/pass;
    ratio_bn_relu of the fused-activation rows against BatchNorm2d + ReLU."""
    key = lambda r: (tuple(r["shape"]), r["dtype"], r["pass"], r["op"] == "resnet50-step")
    ref, ref_relu, unfused, layer = {}, {}, {}, {}
    for r in records:
        if not r.get("ms"):
            continue
        if (r["op"] == "bn" and r["impl"] == "torch") or (r["op"] == "resnet50-step" and r["impl"] == "bn"):
            ref[key(r)] = r
        if r["op"] == "bn+relu" and r["impl"] == "torch+relu":
            ref_relu[key(r)] = r
        if r["op"].endswith("+relu") and r["impl"] == "nk+relu":
            unfused[(r["op"],) + key(r)] = r
        if r["op"] in OPS and r["impl"] == "nk":
            layer[(r["op"] + "+relu",) + key(r)] = r
    for r in records:
        if "op" not in r:
            continue
        b = ref.get(key(r))
        r["ratio_bn"] = r["ms"] / b["ms"] if b and r.get("ms") else None
        if r["op"].endswith("+relu"):
            br = ref_relu.get(key(r))
            r["ratio_bn_relu"] = r["ms"] / br["ms"] if br and r.get("ms") else None
        if r["impl"] == "nk-fused":
            u = unfused.get((r["op"],) + key(r))
            r["ratio_unfused"] = r["ms"] / u["ms"] if u and r.get("ms") else None
            lb, fb = (layer.get((r["op"],) + key(r)) or {}).get("peak_mem_bytes"), r.get("peak_mem_bytes")
            r["peak_mem_ratio_layer"] = fb / lb if lb and fb is not None else None
        pb, pr = (b or {}).get("peak_mem_bytes"), r.get("peak_mem_bytes")
        r["peak_mem_ratio"] = pr / pb if pb and pr is not None else None


# ---------------------------------------------------------------------------------------------
# end to end: one ResNet-50 training step

def _resnet50_builder():
    try:
        import torchvision
        return (lambda: torchvision.models.resnet50(num_classes=1000)), "torchvision.models.resnet50"
    except Exception:   # missing, or a build whose C extension does not load with this torch
        pass            # (torch 2.13's torchvision wheel is a CUDA build: on the CPU torch it raises)
    from normkernels.models import resnet50      # raises ImportError if neither exists
    return (lambda: resnet50(num_classes=1000)), "normkernels.models.resnet50"


def _e2e_model(variant: str, builder):
    model = builder()
    if variant == "bn":
        return model
    nk = _nk()
    if variant == "bn+sbn4":
        return nk.convert.insert_sbn(model, stages=(4,))
    if variant == "bn+sbn34":
        return nk.convert.insert_sbn(model, stages=(3, 4))
    if variant == "l2bn":
        return nk.convert.convert_bn_to_l2bn(model)
    raise KeyError(variant)


def e2e_config(device: str, quick: bool, size: str | None = None) -> tuple[int, int]:
    """(batch, resolution) of the end-to-end step; ``size`` "BATCHxRES" overrides."""
    if size:
        batch, res = (int(v) for v in size.lower().split("x"))
        return batch, res
    if device == "cuda":
        return (32, 224) if quick else (64, 224)
    return (2, 96) if quick else (4, 128)


def e2e_step(variant: str, device: str, dtype: torch.dtype = torch.float32, batch: int = 4,
             resolution: int = 128, seed: int = 0):
    """(step, source): a closure running one training step (forward, cross-entropy, backward,
    SGD with momentum) of ResNet-50 in the given variant on rotating random batches.
    16-bit dtypes run under torch.autocast, as mixed-precision training does."""
    builder, source = _resnet50_builder()
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 3, resolution, resolution)
    xs = [torch.randn(shape, generator=g).to(device) for _ in range(3)]
    ts = [torch.randint(0, 1000, (batch,), generator=g).to(device) for _ in range(3)]
    torch.manual_seed(seed)
    model = _e2e_model(variant, builder).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    state = {"i": 0}
    autocast = dtype != torch.float32

    def step():
        i = state["i"] = (state["i"] + 1) % len(xs)
        with torch.autocast(device_type=device, dtype=dtype, enabled=autocast):
            loss = F.cross_entropy(model(xs[i]), ts[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step.model = model
    return step, source


def run_e2e(device: str, dtype: torch.dtype = torch.float32, quick: bool = False,
            variants=E2E_VARIANTS, batch: int | None = None, resolution: int | None = None,
            progress=None, memory: bool = True, on_record=None, rep_ms: float | None = None) -> list[dict]:
    """One SGD training step of ResNet-50 per variant (records; ratios added by _add_ratios)."""
    b0, r0 = e2e_config(device, quick)
    batch, resolution = batch or b0, resolution or r0
    dname = str(dtype).replace("torch.", "")
    out = []
    for v in variants:
        rec = {"op": "resnet50-step", "impl": v, "shape": [batch, 3, resolution, resolution], "dtype": dname,
               "pass": "train-step", "gbps": None}
        try:
            step, rec["model"] = e2e_step(v, device, dtype, batch, resolution)
            step(); step()
            _sync(device)
            # whole steps take 10-1000 ms: give do_bench room for ~10 of them
            rec["ms"] = time_ms(step, device, quick=True, rep_ms=rep_ms or (1500 if device == "cuda" else 1000))
            rec["peak_mem_bytes"] = peak_memory(step, device) if memory else None
            del step
        except Exception as e:
            rec.update(ms=None, error=_error(e))
        rec.setdefault("peak_mem_ratio", None)
        out.append(rec)
        if on_record is not None:
            on_record(rec)
        gc.collect()
        if progress is not None:
            progress.update(1)
    return out


# ---------------------------------------------------------------------------------------------
# header, table, plot

def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({model or 'unknown'}, {torch.get_num_threads()} threads)"


def device_tag(device: str) -> str:
    """A file-name tag for the device: cpu-<cores>core, or the GPU's name in lower case."""
    if device == "cuda":
        name = torch.cuda.get_device_name().lower()
        return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").replace("--", "-")
    return f"cpu-{os.cpu_count()}core"


def header(device: str, copy_gbps: float | None, argv) -> dict:
    try:
        from importlib.metadata import version
        triton_version = version("triton")
    except Exception:
        triton_version = None
    try:
        backends = _nk().backends()
    except Exception as e:
        backends = "unavailable: " + _error(e)
    return {"type": "header", "device": _device_name(device), "torch": torch.__version__,
            "triton": triton_version, "copy_gbps": copy_gbps,
            "command": "python benchmarks/bench.py " + " ".join(argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "backends": backends, "loadavg_start": _loadavg()}


def steady_cpu_allocator() -> str | None:
    """Keep freed CPU memory in the process (glibc mallopt), as a caching allocator does on GPU.

    By default glibc gives blocks above a dynamic threshold back to the OS, so a 25 MB tensor
    then pays thousands of page faults on first touch, or not, depending on the allocation
    history: the same layer measured 6 ms in one run and 20 ms in the next. Raising the mmap
    threshold to its maximum (32 MB) and disabling trimming makes CPU timings measure the
    kernels. Returns a description for the results header, or None where it does not apply."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**31 - 1):
        return "glibc mallopt: mmap threshold 32 MB, no trimming"
    return None


def _loadavg():
    """1-minute load average: other processes on the machine distort CPU timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _split(records):
    head = next((r for r in records if "op" not in r), {})
    return head, [r for r in records if "op" in r]


def _num(v, fmt, na="n/a"):
    return na if v is None else format(v, fmt)


def render_markdown(records: list[dict]) -> str:
    """The results table (and the run's header) as Markdown."""
    head, rows = _split(records)
    lines = []
    if head:
        lines += [f"- device: {head.get('device')}", f"- torch {head.get('torch')}, triton {head.get('triton')}",
                  f"- device-to-device copy: {_num(head.get('copy_gbps'), '.1f')} GB/s (read + write)",
                  f"- backends: {head.get('backends')}",
                  *([f"- CPU allocator: {head['cpu_allocator']}"] if head.get("cpu_allocator") else []),
                  f"- 1-min load average at start / end: {head.get('loadavg_start')} / {head.get('loadavg_end')}",
                  f"- command: `{head.get('command')}`", f"- date: {head.get('date')}", ""]
    lines += ["| op | shape | dtype | pass | impl | ms | x BN | x BN+ReLU | x nk+ReLU | GB/s | % copy | peak mem x BN "
              "| mem x layer |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {o: i for i, o in enumerate(OPS + ("resnet50-step",))}
    impl_order = {i: k for k, i in enumerate(("torch", "nk", "nk-fft", "two-modules", "eager", "compile",
                                              "torch+relu", "compile+relu", "nk-fused", "nk+relu")
                                             + E2E_VARIANTS)}
    first = {}
    for r in rows:
        first.setdefault(tuple(r["shape"]), len(first))
    rows = sorted(rows, key=lambda r: (r["op"] == "resnet50-step", r["dtype"], first[tuple(r["shape"])],
                                       PASSES.index(r["pass"]) if r["pass"] in PASSES else 9,
                                       order.get(r["op"], 99), impl_order.get(r["impl"], 99)))
    errors = []
    for r in rows:
        if r.get("ms") is None:
            errors.append(r)
            ms = "n/a [%d]" % len(errors)
        else:
            ms = _num(r["ms"], ".3f")
        op = OP_LABEL.get(r["op"], r["op"])
        lines.append(f"| {op} | {_fmt_shape(r['shape'])} | {r['dtype']} | {r['pass']} | {r['impl']} | {ms} | "
                     f"{_num(r.get('ratio_bn'), '.2f', '')} | {_num(r.get('ratio_bn_relu'), '.2f', '')} | "
                     f"{_num(r.get('ratio_unfused'), '.2f', '')} | {_num(r.get('gbps'), '.1f', '')} | "
                     f"{_num(r.get('pct_copy'), '.0f', '')} | {_num(r.get('peak_mem_ratio'), '.2f', 'n/a')} | "
                     f"{_num(r.get('peak_mem_ratio_layer'), '.2f', '')} |")
    if errors:
        lines.append("")
        for i, r in enumerate(errors, 1):
            lines.append(f"[{i}] {OP_LABEL.get(r['op'], r['op'])}/{r['impl']} {_fmt_shape(r['shape'])} "
                         f"{r['dtype']} {r['pass']}: {r.get('error', 'no time')}")
    return "\n".join(lines) + "\n"


IMPL_COLORS = {"nk": "tab:blue", "nk-fft": "tab:cyan", "two-modules": "tab:purple", "eager": "tab:orange",
               "compile": "tab:green", "torch+relu": "tab:gray", "compile+relu": "tab:olive", "nk-fused": "navy",
               "nk+relu": "tab:brown", "bn": "tab:gray", "bn+sbn4": "tab:blue", "bn+sbn34": "tab:purple",
               "l2bn": "tab:red"}


def plot_ratios(records: list[dict], path: str) -> str | None:
    """Bar chart of every implementation's time relative to nn.BatchNorm2d; returns the path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    head, rows = _split(records)
    rows = [r for r in rows if r.get("ratio_bn") is not None and not (r["op"] == "bn")]
    panels = sorted({(r["op"] == "resnet50-step", r["dtype"], r["pass"]) for r in rows},
                    key=lambda k: (k[0], k[1], PASSES.index(k[2]) if k[2] in PASSES else 9))
    if not panels:
        return None
    ngroups = max(len({(r["op"], tuple(r["shape"])) for r in rows if r["dtype"] == dt and r["pass"] == ps})
                  for _, dt, ps in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(10, 0.8 * ngroups + 2), 3.8 * len(panels)),
                             squeeze=False)
    impl_rank = {i: k for k, i in enumerate(IMPL_COLORS)}
    for ax, (e2e, dt, ps) in zip(axes[:, 0], panels):
        sub = [r for r in rows if r["dtype"] == dt and r["pass"] == ps]
        groups = []
        for r in sub:
            g = (r["op"], tuple(r["shape"]))
            if g not in groups:
                groups.append(g)
        impls = sorted({r["impl"] for r in sub}, key=lambda i: impl_rank.get(i, 99))
        width = 0.8 / max(len(impls), 1) if not e2e else 0.15
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for gi, g in enumerate(groups):
                for r in sub:
                    if r["impl"] == impl and (r["op"], tuple(r["shape"])) == g:
                        xs.append(gi + (k - (len(impls) - 1) / 2) * width)
                        ys.append(r["ratio_bn"])
            bars = ax.bar(xs, ys, width, label=impl, color=IMPL_COLORS.get(impl))
            if e2e:
                ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(groups)))
        if e2e:
            ax.set_xlim(-1.0, len(groups))
            ax.set_ylim(0, max(r["ratio_bn"] for r in sub) * 1.15)
            ax.set_xticklabels([f"ResNet-50 step, input {_fmt_shape(s)}" for _, s in groups], fontsize=8)
            ax.set_ylabel("step time / BN model")
        else:
            ax.set_yscale("log")
            ax.set_xticklabels([f"{OP_LABEL.get(o, o)}\n{s[0]}x{s[1]}\n{s[2]}x{s[3]}" for o, s in groups],
                               fontsize=7)
            ax.set_ylabel("time / nn.BatchNorm2d")
        ax.set_title(f"{head.get('device', '')}   {dt}   {ps}", fontsize=9)
        ax.legend(fontsize=7, ncol=len(impls), loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(records, json_path=None, md_path=None, png_path=None) -> dict:
    written = {}
    for path in (json_path, md_path, png_path):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if json_path:
        with open(json_path, "w") as f:     # one record per line: diffs stay readable
            f.write("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
        written["json"] = json_path
    if md_path:
        with open(md_path, "w") as f:
            f.write(render_markdown(records))
        written["md"] = md_path
    if png_path and plot_ratios(records, png_path):
        written["png"] = png_path
    return written


# ---------------------------------------------------------------------------------------------
# command line

def _parse_shapes(text: str | None, device: str, quick: bool) -> list[tuple]:
    if not text:
        return suite_shapes(device, quick)
    out = []
    for item in text.split(","):
        item = item.strip()
        if item in ("resnet50", "cifar"):
            out += suite_shapes(device, quick, families=(item,), targets=False)
        else:
            out.append(tuple(int(v) for v in item.lower().split("x")))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when present)")
    p.add_argument("--dtype", default=None,
                   help="comma list of float32,bfloat16,float16 (default: float32,bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--ops", default=",".join(OPS),
                   help=f"comma list of {','.join(OPS)} (BatchNorm always runs; BatchNorm2d+ReLU with any +relu op)")
    p.add_argument("--impls", default=None, help="comma list to restrict implementations (e.g. nk,eager)")
    p.add_argument("--shapes", default=None,
                   help="comma list of resnet50, cifar or NxCxHxW (default: both families; CPU uses smaller batches)")
    p.add_argument("--passes", default=",".join(PASSES), help="comma list of fwd,fwd+bwd")
    p.add_argument("--quick", action="store_true", help="one ResNet-50 and one CIFAR shape, shorter timing")
    p.add_argument("--e2e", action="store_true", help="also time one ResNet-50 training step per variant")
    p.add_argument("--e2e-only", action="store_true", help="only the end-to-end step")
    p.add_argument("--e2e-rep-ms", type=float, default=None,
                   help="end-to-end timing per variant in ms (default 1500 GPU, 1000 CPU)")
    p.add_argument("--e2e-variants", default=",".join(E2E_VARIANTS), help=f"comma list of {','.join(E2E_VARIANTS)}")
    p.add_argument("--no-plot", action="store_true", help="no PNG plot")
    p.add_argument("--e2e-size", default=None, metavar="BATCHxRES",
                   help="end-to-end batch and resolution (default: 64x224 GPU, 4x128 CPU; --quick 32x224, 2x96)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--rep-ms", type=float, default=None,
                   help="timing per measurement in ms (GPU: do_bench's rep; CPU: budget; default 100/400 GPU, 250/1000 CPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the records as JSON")
    p.add_argument("--md", default=None, metavar="PATH", help="write the Markdown table")
    p.add_argument("--png", default=None, metavar="PATH",
                   help="ratio plot (default: next to --md or --json, else ./normkernels-bench.png)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads(N) first")
    p.add_argument("--write-results", default=None, metavar="DIR",
                   help="write DIR/<device>.json, .md and .png (<device>: e.g. cpu-2core, nvidia-h100-80gb-hbm3)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore", message=".*does not support code generation for complex.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    dnames = (args.dtype or ("float32,bfloat16" if device == "cuda" else "float32")).split(",")
    dtypes = [DTYPES[d.strip()] for d in dnames]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        print(f"unknown ops {bad}; choose from {OPS}", file=sys.stderr)
        return 2
    passes = [p.strip() for p in args.passes.split(",")]
    impl_filter = set(args.impls.split(",")) if args.impls else None
    shapes = [] if args.e2e_only else _parse_shapes(args.shapes, device, args.quick)

    if any(o.endswith("+relu") for o in ops) and "bn+relu" not in ops:
        ops.append("bn+relu")                       # the reference of the x BN+ReLU column
    jobs = []  # (shape, dtype, op, impl); BatchNorm (and BatchNorm2d+ReLU) first for every tensor
    for shape in shapes:
        for dt in dtypes:
            jobs.append((shape, dt, "bn", "torch"))
            for op in sorted(ops, key=lambda o: o != "bn+relu"):
                if op == "bn":
                    continue
                for impl in IMPLS[op]:
                    if impl_filter is None or impl in impl_filter or (op, impl) == ("bn+relu", "torch+relu"):
                        jobs.append((shape, dt, op, impl))
    e2e = args.e2e or args.e2e_only
    variants = [v.strip() for v in args.e2e_variants.split(",") if v.strip()]
    if any(v not in E2E_VARIANTS for v in variants):
        print(f"unknown end-to-end variants {variants}; choose from {E2E_VARIANTS}", file=sys.stderr)
        return 2
    total = len(jobs) + (len(variants) * len(dtypes) if e2e else 0)

    try:
        from tqdm import tqdm
        bar = tqdm(total=total + 1, disable=args.no_progress, desc="bench", file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        bar = None
    if bar is not None:
        bar.set_postfix_str("copy bandwidth")
    allocator = steady_cpu_allocator() if device == "cpu" else None
    copy_gbps = copy_bandwidth(device, args.quick)
    if bar is not None:
        bar.update(1)
    records = [header(device, copy_gbps, argv)]
    if allocator:
        records[0]["cpu_allocator"] = allocator
    if args.write_results:
        stem = os.path.join(args.write_results, device_tag(device))
        args.json, args.md = args.json or stem + ".json", args.md or stem + ".md"

    def checkpoint(*_):
        # the JSON and the table so far, after every measurement: a run stopped by a timeout
        # (gpu-check's stages) still leaves its results
        if args.json or args.md:
            _add_ratios(records)
            write_outputs(records, args.json, args.md, None)
    checkpoint()
    inputs_key, inputs = None, None
    for shape, dt, op, impl in jobs:
        if bar is not None:
            bar.set_postfix_str(f"{OP_LABEL[op]}/{impl} {_fmt_shape(shape)} {str(dt)[6:]}")
        if inputs_key != (shape, dt):
            inputs = None
            gc.collect()
            nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            inputs = make_inputs(shape, device, dt, _pool_size(nbytes, device))
            inputs_key = (shape, dt)
        records += measure(op, impl, shape, dt, device, passes, args.quick, copy_gbps, inputs,
                           memory=not args.no_memory, rep_ms=args.rep_ms)
        checkpoint()
        if bar is not None:
            bar.update(1)
    inputs = None
    if e2e:
        batch, res = e2e_config(device, args.quick, args.e2e_size)
        for dt in dtypes:
            if bar is not None:
                bar.set_postfix_str(f"resnet50 step {str(dt)[6:]}")
            run_e2e(device, dt, args.quick, variants=variants, batch=batch, resolution=res, progress=bar,
                    memory=not args.no_memory, on_record=lambda rec: (records.append(rec), checkpoint()),
                    rep_ms=args.e2e_rep_ms)
    if bar is not None:
        bar.close()
    _add_ratios(records)
    records[0]["loadavg_end"] = _loadavg()

    png = args.png
    if png is None and not args.no_plot:
        stem = args.md or args.json
        png = (os.path.splitext(stem)[0] + ".png") if stem else "normkernels-bench.png"
    if args.no_plot:
        png = None
    written = write_outputs(records, args.json, args.md, png)
    print(render_markdown(records))
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
