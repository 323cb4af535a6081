"""The running-statistics update of every layer: normkernels::running_stats_update_ (C++/CUDA,
csrc/running_stats.cpp has the schema and semantics) and a torch fallback with the same semantics,
used when the extension is not built.

    running_stats_update(running_mean, running_var, num_batches_tracked, batch_mean, batch_var,
                         momentum, unbias)
      num_batches_tracked (int64, optional) += 1 first;
      f = momentum, or 1 / num_batches_tracked for momentum < 0 (momentum=None: cumulative average,
      read on the device: no host sync);
      running_mean = (1 - f) running_mean + f batch_mean
      running_var  = (1 - f) running_var + (f unbias) batch_var
    A complex running_mean is updated as its real view (batch_mean (C, 2) [re, im]). Arithmetic in
    float32 (float64 when any operand is float64), written in the buffers' dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["running_stats_update", "running_stats_update_torch"]

try:
    import normkernels._C  # noqa: F401

    _EXT = hasattr(torch.ops.normkernels, "running_stats_update_")
except ImportError:
    _EXT = False

if _EXT:
    _UPDATE_OP = torch.ops.normkernels.running_stats_update_.default   # bound once: called every step

    @torch.library.register_fake("normkernels::running_stats_update_")
    def _(running_mean, running_var, num_batches_tracked, batch_mean, batch_var, momentum, unbias):
        return None


def running_stats_update_torch(running_mean: Tensor, running_var: Tensor,
                               num_batches_tracked: Optional[Tensor], batch_mean: Tensor,
                               batch_var: Tensor, momentum: float, unbias: float) -> None:
    """The torch fallback (same semantics as the C++ op)."""
    with torch.no_grad():
        mean = torch.view_as_real(running_mean) if running_mean.is_complex() else running_mean
        f64 = torch.float64 in (mean.dtype, running_var.dtype, batch_mean.dtype, batch_var.dtype)
        ct = torch.float64 if f64 else torch.float32
        if momentum < 0 and num_batches_tracked is None:
            raise ValueError("running_stats_update: momentum < 0 (cumulative average, momentum=None) "
                             "needs num_batches_tracked")
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum >= 0:
            f = torch.full((), momentum, dtype=ct, device=running_var.device)   # no host copy
        else:
            f = 1.0 / num_batches_tracked.to(ct)
        one_minus_f = 1.0 - f
        fu = f * unbias
        mean.copy_(one_minus_f * mean.to(ct) + f * batch_mean.to(ct))
        running_var.copy_(one_minus_f * running_var.to(ct) + fu * batch_var.to(ct))


def running_stats_update(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Optional[Tensor], batch_mean: Tensor,
                         batch_var: Tensor, momentum: float, unbias: float) -> None:
    """The update: the C++ op where the extension has a kernel for the buffers' device, else the
    torch fallback."""
    # Under torch.compile the update is plain aten ops (inductor fuses them into one kernel):
    # inductor cannot functionalize a custom op that mutates a complex tensor ("auto_functionalized_v2
    # was not removed"), and a symbolic batch size in the op's float `unbias` would be frozen at
    # its first value under dynamic=True (a silently wrong running variance).
    if torch.compiler.is_compiling():
        running_stats_update_torch(running_mean, running_var, num_batches_tracked, batch_mean,
                                   batch_var, momentum, unbias)
    elif _EXT and running_var.device.type in ("cpu", "cuda"):
        _UPDATE_OP(running_mean, running_var, num_batches_tracked, batch_mean, batch_var, momentum, unbias)
    else:
        running_stats_update_torch(running_mean, running_var, num_batches_tracked, batch_mean,
                                   batch_var, momentum, unbias)
