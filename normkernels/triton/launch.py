"""The one place Triton kernels are launched from, and the recording of those launches.

Every launcher in normkernels/triton calls ``launch(kernel, grid, *args, num_warps=..., **constexprs)``
instead of ``kernel[grid](...)``. That lets tests record, for real shapes, exactly the
specialisations the launchers produce (``recording()``: nothing runs, the calls are collected);
tools/triton_aot.py compiles each one ahead of time for sm_90 without a GPU
(tests/test_triton_compile.py).

Under ``recording()`` a launcher is called with meta-device tensors (dtype, shape, strides and
storage offset are all a launch looks at), so nothing is allocated and no GPU is needed. A launch
that bypasses ``launch()`` (``kernel[grid](...)``, ``@triton.heuristics``, ``@triton.autotune``:
every config) is recorded too, by intercepting ``JITFunction.run`` (and the interpreter's
``InterpretedFunction.run``, so launches can be counted under TRITON_INTERPRET=1) for the duration.

A launcher that sizes its grid from the multiprocessor count must take it from
``multiprocessor_count(device)``: it is cached per device (no per-call property query) and, for
the meta tensors of a recording, reports the recording target's count (an H200's 132).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

__all__ = ["Launch", "launch", "recording", "multiprocessor_count", "RECORDING_SM_COUNT"]

RECORDING_SM_COUNT = 132   # an H200 (the GPU machine): what meta tensors report while recording


@dataclass
class Launch:
    """One recorded launch: the kernel, its runtime arguments, constexprs and launch options."""
    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int | None = None
    options: dict = field(default_factory=dict)   # other launch options (num_ctas, maxnreg, ...)
    where: str = ""                               # what the recorder was doing (set by the caller)

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", type(self.kernel).__name__)


_RECORD: list | None = None
_SM_COUNT: dict = {}


def multiprocessor_count(device) -> int:
    """Streaming multiprocessors of ``device`` (a torch.device or tensor's device), cached per
    device. Meta tensors (recording()) report RECORDING_SM_COUNT."""
    import torch
    device = torch.device(device)
    if device.type == "meta":
        return RECORDING_SM_COUNT
    if device.type != "cuda":
        raise ValueError(f"multiprocessor_count: {device} is not a CUDA device")
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def _resolve_grid(grid, named: dict) -> tuple:
    if callable(grid):
        grid = grid(named)
    return tuple(int(g) for g in grid)


def _param_names(kernel) -> list:
    if hasattr(kernel, "params"):                       # JITFunction
        return [p.name for p in kernel.params]
    return list(getattr(kernel, "arg_names", []))       # InterpretedFunction (TRITON_INTERPRET=1)


def _record_jit_run(kernel, args, kwargs, grid):
    """Split a JIT call's keyword arguments into constexprs (kernel parameters) and options."""
    names = _param_names(kernel)
    constexprs = {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    num_warps = options.pop("num_warps", 4)
    num_stages = options.pop("num_stages", None)
    named = dict(zip(names, args), **constexprs)
    _RECORD.append(Launch(kernel, _resolve_grid(grid, named), tuple(args), constexprs, num_warps,
                          num_stages, options))


@contextlib.contextmanager
def recording():
    """Collect launches instead of running them: ``with recording() as calls: launcher(...)``.
    Tensors may be on the meta device (only dtypes, shapes, strides and offsets are looked at).
    Launches that bypass launch() (kernel[grid](...), heuristics, autotune) are recorded too."""
    global _RECORD
    prev, _RECORD = _RECORD, []
    patches = []
    try:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:       # no triton: only launch() can be called, and it records
        JITFunction = None
    if JITFunction is not None:
        def jit_run(self, *args, grid, warmup=False, **kwargs):
            _record_jit_run(self, args, kwargs, grid)

        def autotune_run(self, *args, **kwargs):
            # every config the autotuner could pick is a specialisation compiled on the GPU
            for config in self.configs:
                self.fn.run(*args, **kwargs, **config.all_kwargs())

        patches = [(cls, "run", cls.__dict__["run"]) for cls in (JITFunction, InterpretedFunction, Autotuner)]
        JITFunction.run = InterpretedFunction.run = jit_run
        Autotuner.run = autotune_run
    try:
        yield _RECORD
    finally:
        for cls, name, orig in patches:
            setattr(cls, name, orig)
        _RECORD = prev


def launch(kernel, grid, *args, num_warps: int = 4, num_stages: int | None = None, **constexprs):
    if _RECORD is not None:
        named = dict(zip(_param_names(kernel), args), **constexprs)
        _RECORD.append(Launch(kernel, _resolve_grid(grid, named), args, constexprs, num_warps,
                              num_stages))
        return
    grid = tuple(int(g) for g in grid)
    opts = {"num_warps": num_warps}
    if num_stages is not None:
        opts["num_stages"] = num_stages
    kernel[grid](*args, **constexprs, **opts)
