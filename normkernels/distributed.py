"""Synchronized batch statistics over torch.distributed, like nn.SyncBatchNorm.

In training, with an initialized process group of more than one process, the Sync layers
combine their per-channel partial sums over the group: ONE collective in the forward (an
all_gather of one packed buffer: Chan rows for L2BN, shifted Parseval sums for SBN and BN+SBN)
and ONE in the backward (an all_reduce of one packed buffer of gradient sums). Per-sample work
(L2BN's sample norms, the elementwise passes) stays local. The result on P processes equals the
single-process result on the concatenated batch: outputs, input gradients and running
statistics; each process returns its LOCAL share of the parameter gradients (DDP then averages,
as with nn.SyncBatchNorm). Uneven and empty (N = 0) local batches are allowed: an empty process
still joins both collectives and returns an empty output and zero parameter gradients.
Eval mode (running statistics) does no collective.

The math is the single-process code in normkernels/ops (``sync=`` argument of the internal
implementation functions); this module only provides the reducer and the modules.

    model = normkernels.distributed.convert_sync(model)        # before wrapping in DDP
    model = torch.nn.parallel.DistributedDataParallel(model)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import _backend
from . import functional as F_nk
from .modules import BatchNormSBN2d, L2BatchNorm2d, SpectralBatchNorm2d, _RunningStatsMixin
from .ops import l2bn as _l2bn
from .ops import sbn as _sbn

__all__ = ["Reducer", "SyncL2BatchNorm2d", "SyncSpectralBatchNorm2d", "SyncBatchNormSBN2d", "convert_sync"]


class Reducer:
    """The two collectives the synchronized layers use, over one process group (None = WORLD).

    gather(t) -> (P, *t.shape): one all_gather of t (every process passes the same shape).
    all_reduce(t) -> the sum of t over the processes: one all_reduce (t is not modified).
    """

    def __init__(self, process_group=None):
        self.group = process_group
        self.size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.group)
        return torch.stack(parts)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t, group=self.group)
        return t


def reducer_for(process_group=None):
    """A Reducer when torch.distributed is initialized and the group has more than one process,
    else None (the layer then runs exactly as its single-process parent)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if process_group is not None and process_group == dist.GroupMember.NON_GROUP_MEMBER:
        return None
    if dist.get_world_size(process_group) <= 1:
        return None
    return Reducer(process_group)


# --------------------------------------------------------------------------- validation
def _check_input(x, ranks, layer):
    """functional.check_input, except that an empty batch (N = 0) is allowed: in a synchronized
    group only the GLOBAL batch must have more than one value per channel."""
    probe = x
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 0:
        probe = torch.empty((1,) + tuple(x.shape[1:]), dtype=x.dtype, device="meta")
    F_nk.check_input(probe, ranks, layer)


def _check_global_count(count: int, x, layer: str) -> None:
    if count <= 1:
        raise ValueError(f"{layer}: expected more than 1 value per channel when training over the process "
                         f"group, got {count} (local input of shape {tuple(x.shape)})")


# --------------------------------------------------------------------------- autograd functions
class _L2BNSync(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, l2_eps, rescale, backend, sync, info):
        y, f = _l2bn._forward_impl(x, weight, bias, None, None, eps, l2_eps, rescale, backend, sync=sync)
        ctx.save_for_backward(x, weight, f["smean_acc"], f["sm2_acc"], f["mu"], f["var"])
        ctx.args = (eps, l2_eps, rescale, backend, sync, f["n"], bias is not None)
        acc = f["acc"]
        info["count"] = f["n"] * f["s"]
        mean, var = f["mu"].to(acc, copy=True), f["var"].to(acc, copy=True)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, smean, sm2, mu, var = ctx.saved_tensors
        eps, l2_eps, rescale, backend, sync, n_all, has_bias = ctx.args
        if dy is None:
            dy = torch.zeros_like(x)
        dx, dw, db = _l2bn._backward_impl(dy, x, weight, mu, var, smean, sm2, eps, l2_eps, rescale, backend,
                                          training=True, count=n_all, sync=sync)
        return (dx, dw if weight is not None else None, db if has_bias else None,
                None, None, None, None, None, None)


class _SBNSync(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, backend, sync, info):
        y, m, v, saved = _sbn._sbn_forward_impl(x, weight, bias, None, None, eps, backend, sync=sync)
        ctx.save_for_backward(x, weight, saved)
        ctx.args = (backend, sync, bias.dtype if bias is not None else None)
        info["n"] = int(round(saved[0, 5].item()))
        ctx.mark_non_differentiable(m, v)
        return y, m, v

    @staticmethod
    def backward(ctx, dy, _dm, _dv):
        x, weight, saved = ctx.saved_tensors
        backend, sync, bdt = ctx.args
        if dy is None:
            dy = torch.zeros_like(x)
        dx, dw, db = _sbn._sbn_backward_impl(dy, x, weight, saved, True, backend, sync=sync)
        return (dx, dw if weight is not None else None, db.to(bdt) if bdt is not None else None, None, None, None,
                None)


class _BNSBNSync(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_w, bn_b, sbn_w, sbn_b, bn_eps, sbn_eps, backend, sync, info):
        y, bm, bv, sm, sv, saved = _sbn._bnsbn_forward_impl(x, bn_w, bn_b, None, None, sbn_w, sbn_b, None, None,
                                                            bn_eps, sbn_eps, backend, sync=sync)
        ctx.save_for_backward(x, bn_w, sbn_w, saved)
        ctx.args = (backend, sync, bn_b.dtype if bn_b is not None else None,
                    sbn_b.dtype if sbn_b is not None else None)
        info["n"] = int(round(saved[0, _sbn._BS_SYNC["Nall"]].item()))
        ctx.mark_non_differentiable(bm, bv, sm, sv)
        return y, bm, bv, sm, sv

    @staticmethod
    def backward(ctx, dy, *_unused):
        x, bn_w, sbn_w, saved = ctx.saved_tensors
        backend, sync, bdt, sdt = ctx.args
        if dy is None:
            dy = torch.zeros_like(x)
        dx, dgb, dbb, dgs, dbs = _sbn._bnsbn_backward_impl(dy, x, bn_w, sbn_w, saved, True, backend, sync=sync)
        return (dx, dgb if bn_w is not None else None, dbb.to(bdt) if bdt is not None else None,
                dgs if sbn_w is not None else None, dbs.to(sdt) if sdt is not None else None,
                None, None, None, None, None)


# --------------------------------------------------------------------------- modules
class _SyncMixin:
    def _sync(self):
        """The reducer when this forward must synchronize (training, group of > 1), else None."""
        return reducer_for(self.process_group) if self.training else None


class SyncL2BatchNorm2d(_SyncMixin, L2BatchNorm2d):
    """L2BatchNorm2d whose training statistics are computed over a process group (None = WORLD)."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, input):
        sync = self._sync()
        if sync is None:
            return super().forward(input)
        layer = type(self).__name__
        _check_input(input, self._ranks, layer)
        training, running_mean, running_var, factor = self._stats_plan()
        F_nk.check_channel_tensors(input, layer, weight=self.weight, bias=self.bias, running_mean=running_mean,
                                   running_var=running_var)
        be = _backend.resolve("l2bn", self.backend, input)
        info = {}
        y, mean, var = _L2BNSync.apply(input, self.weight, self.bias, float(self.eps), float(self.l2_eps),
                                       bool(self.rescale), be, sync, info)
        count = info["count"]
        _check_global_count(count, input, layer)
        if running_mean is not None:
            F_nk.update_running_stats(running_mean, running_var, mean, var, factor, count)
        self._count_batch()
        return y


def _check_algorithm(algorithm: str) -> str:
    algo = F_nk.resolve_algorithm(algorithm)
    if algo == "fft":
        raise ValueError(
            "SyncSpectralBatchNorm2d: synchronized statistics are implemented for algorithm='parseval' "
            "(the same math without an FFT, the default 'auto'); use algorithm='parseval' instead of 'fft'")
    return algo


class SyncSpectralBatchNorm2d(_SyncMixin, SpectralBatchNorm2d):
    """SpectralBatchNorm2d whose training statistics are computed over a process group (None =
    WORLD). Only algorithm "parseval"/"auto" (the same math as "fft") can be synchronized."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        _check_algorithm(self.algorithm)
        self.process_group = process_group

    def forward(self, input):
        sync = self._sync()
        if sync is None:
            return super().forward(input)
        layer = type(self).__name__
        _check_input(input, (4,), layer)
        training, running_mean, running_var, factor = self._stats_plan()
        F_nk.check_channel_tensors(input, layer, weight=self.weight, bias=self.bias, running_mean=running_mean,
                                   running_var=running_var)
        _check_algorithm(self.algorithm)
        be = _backend.resolve("sbn", self.backend, input)
        info = {}
        y, m, v = _SBNSync.apply(input, self.weight, self.bias, float(self.eps), be, sync, info)
        count = info["n"] * input.shape[2] * (input.shape[3] // 2 + 1)
        _check_global_count(count, input, layer)
        if running_mean is not None:
            F_nk.update_running_stats(running_mean, running_var, _sbn._to_complex(m.detach()), v.detach(),
                                      factor, count)
        self._count_batch()
        return y


class SyncBatchNormSBN2d(_SyncMixin, BatchNormSBN2d):
    """BatchNormSBN2d whose training statistics (BN's and SBN's) are computed over a process group
    (None = WORLD)."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, input):
        sync = self._sync()
        if sync is None:
            return super().forward(input)
        layer = type(self).__name__
        bn, sbn = self.bn, self.sbn
        _check_input(input, (4,), layer)
        bn_training, bn_rm, bn_rv, bn_factor = _RunningStatsMixin._stats_plan(bn)
        sbn_training, sbn_rm, sbn_rv, sbn_factor = sbn._stats_plan()
        if bn_training != sbn_training:
            raise ValueError(f"{layer}: bn and sbn must both be in training or both in eval mode")
        F_nk.check_channel_tensors(input, layer, bn_weight=bn.weight, bn_bias=bn.bias, sbn_weight=sbn.weight,
                                   sbn_bias=sbn.bias, bn_running_mean=bn_rm, bn_running_var=bn_rv,
                                   sbn_running_mean=sbn_rm, sbn_running_var=sbn_rv)
        be = _backend.resolve("sbn", self.backend, input)
        info = {}
        y, bm, bv, sm, sv = _BNSBNSync.apply(input, bn.weight, bn.bias, sbn.weight, sbn.bias,
                                             float(bn.eps), float(sbn.eps), be, sync, info)
        n_all = info["n"]
        h, w = input.shape[2], input.shape[3]
        bn_count, sbn_count = n_all * h * w, n_all * h * (w // 2 + 1)
        _check_global_count(min(bn_count, sbn_count), input, layer)
        if bn_rm is not None:
            F_nk.update_running_stats(bn_rm, bn_rv, bm.detach(), bv.detach(), bn_factor, bn_count)
        if sbn_rm is not None:
            F_nk.update_running_stats(sbn_rm, sbn_rv, _sbn._to_complex(sm.detach()), sv.detach(), sbn_factor,
                                      sbn_count)
        _RunningStatsMixin._count_batch(bn)
        sbn._count_batch()
        return y


# --------------------------------------------------------------------------- conversion
_SYNC_OF = {L2BatchNorm2d: SyncL2BatchNorm2d, SpectralBatchNorm2d: SyncSpectralBatchNorm2d,
            BatchNormSBN2d: SyncBatchNormSBN2d}


def _to_sync(module: nn.Module, process_group) -> nn.Module:
    cls = _SYNC_OF[type(module)]
    new = cls.__new__(cls)
    # same parameters, buffers, sub-modules, hooks and settings (the containers are copied)
    new.__dict__.update({k: (type(v)(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    new.process_group = process_group
    if cls is SyncSpectralBatchNorm2d:
        _check_algorithm(new.algorithm)
    return new


def convert_sync(module: nn.Module, process_group=None) -> nn.Module:
    """Swap every L2BatchNorm2d, SpectralBatchNorm2d and BatchNormSBN2d in ``module`` for its Sync
    version, sharing the parameters and buffers (like nn.SyncBatchNorm.convert_sync_batchnorm).
    Returns the converted model (a new top-level object when ``module`` itself is such a layer).
    A SpectralBatchNorm2d with algorithm="fft" raises ValueError (use "parseval": same math)."""
    if type(module) in _SYNC_OF:
        return _to_sync(module, process_group)
    for name, child in module.named_children():
        new = convert_sync(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
