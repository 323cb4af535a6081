"""The one place Triton kernels are launched from.

Every launcher in normkernels/triton calls ``launch(kernel, grid, *args, num_warps=..., **constexprs)``
instead of ``kernel[grid](...)``. That lets tests/test_triton_compile.py record, for real shapes,
exactly the specialisations the launchers produce (``recording()``: nothing runs, the calls are
collected) and compile each one ahead of time for sm_90 without a GPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

__all__ = ["Launch", "launch", "recording"]


@dataclass
class Launch:
    """One recorded launch: the kernel, its runtime arguments, constexprs and launch options."""
    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int | None = None


_RECORD: list | None = None


@contextlib.contextmanager
def recording():
    """Collect launches instead of running them: ``with recording() as calls: launcher(...)``.
    Tensors may be on the meta device (only dtypes, shapes and strides are looked at)."""
    global _RECORD
    prev, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = prev


def launch(kernel, grid, *args, num_warps: int = 4, num_stages: int | None = None, **constexprs):
    grid = tuple(int(g) for g in grid)
    if _RECORD is not None:
        _RECORD.append(Launch(kernel, grid, args, constexprs, num_warps, num_stages))
        return
    opts = {"num_warps": num_warps}
    if num_stages is not None:
        opts["num_stages"] = num_stages
    kernel[grid](*args, **constexprs, **opts)
