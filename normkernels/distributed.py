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

The math is the ops' own: each layer's functional entry with a reducer (functional.l2bn_family,
functional.spectral_family -> normkernels/ops/l2bn.py l2bn_sync, normkernels/ops/sbn.py) runs the
single-process pieces on the gathered rows; this module provides the reducer, the modules and
convert_sync.

    model = normkernels.distributed.convert_sync(model)        # before wrapping in DDP
    model = torch.nn.parallel.DistributedDataParallel(model)

convert_sync converts the whole model: every nk layer into its Sync form, and torch's
BatchNorm1d/2d/3d (and timm's BatchNormAct2d) into nn.SyncBatchNorm (timm's SyncBatchNormAct)
when the group's backend is NCCL, else into SyncBatchNorm / SyncBatchNormAct2d below (the same
math on any device and backend: nn.SyncBatchNorm runs only on GPUs, and DDP refuses it in CPU
modules). No model is left half-synchronized: torch's
nn.SyncBatchNorm.convert_sync_batchnorm and timm's convert_sync_batchnorm convert the nk layers
too (normkernels wraps them when imported; see normkernels/_frameworks.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import functional as F_nk
from .modules import (BatchNormSBN2d, BatchNormSBNAct2d, L2BatchNorm1d, L2BatchNorm2d, L2BatchNormAct2d,
                      SpectralBatchNorm2d, SpectralBatchNormAct2d)

__all__ = ["Reducer", "SyncL2BatchNorm1d", "SyncL2BatchNorm2d", "SyncSpectralBatchNorm2d", "SyncBatchNormSBN2d",
           "SyncL2BatchNormAct2d", "SyncSpectralBatchNormAct2d", "SyncBatchNormSBNAct2d", "SyncBatchNorm",
           "SyncBatchNormAct2d", "convert_sync"]


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


class _Agreed:
    """A reducer whose gather also carries what this process computes (the layer kind and, for
    the spectral layers, the map size) in the same collective: processes that disagree would mix
    statistics of different meanings, so every process raises instead (all see the same rows)."""

    _KINDS = {"l2bn": 1.0, "sbn": 2.0, "bnsbn": 3.0}

    def __init__(self, reducer, layer: str, kind: str, *sizes: int):
        self.reducer, self.layer = reducer, layer
        self.key = (self._KINDS[kind],) + tuple(float(s) for s in sizes)
        self.rank, self.size = reducer.rank, reducer.size

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        k = len(self.key)
        rows = self.reducer.gather(torch.cat([t.reshape(-1), t.new_tensor(self.key)]))
        keys = rows[:, -k:]
        if not bool((keys == keys[:1]).all()):
            kinds = {v: n for n, v in self._KINDS.items()}
            seen = [(kinds.get(r[0], "?"),) + tuple(int(v) for v in r[1:]) for r in keys.tolist()]
            raise RuntimeError(f"{self.layer}: the processes of the group run different layers or map sizes "
                               f"at this synchronized call: {seen} (layer kind, H, W per process); "
                               "SBN statistics only combine over maps of one size")
        return rows[:, :-k].reshape((rows.shape[0],) + tuple(t.shape))

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.reducer.all_reduce(t)


# --------------------------------------------------------------------------- autograd functions
class _BatchNormSync(torch.autograd.Function):
    """Plain BatchNorm over a process group on any device (nn.SyncBatchNorm's kernels are GPU-only):
    one all_gather of (count, mean, M2) rows combined with Chan's formula, one all_reduce of the
    gradient sums (sum dy, sum dy * xhat)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, reducer):
        c = x.shape[1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        dims = [0] + list(range(2, x.dim()))
        xa = x.to(acc)
        n = x.numel() // c
        if n > 0:
            var_l, mean_l = torch.var_mean(xa, dims, correction=0)
        else:  # an empty local batch still joins both collectives
            var_l = mean_l = torch.zeros(c, dtype=acc, device=x.device)
        rows = reducer.gather(torch.stack([torch.full_like(mean_l, n), mean_l, var_l * n]))  # (P, 3, C)
        counts, means, m2s = rows.unbind(1)
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        var = (m2s + counts * (means - mean) ** 2).sum(0) / total
        invstd = torch.rsqrt(var + eps)
        shape = [1, c] + [1] * (x.dim() - 2)
        scale = invstd if weight is None else invstd * weight.to(acc)
        shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
        y = (xa * scale.view(shape) + shift.view(shape)).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd, total)
        ctx.reducer, ctx.has_bias = reducer, bias is not None
        count = int(counts[:, 0].sum().item())
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x, weight, mean, invstd, total = ctx.saved_tensors
        c = x.shape[1]
        acc = mean.dtype
        dims = [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        dy_a = torch.zeros(x.shape, dtype=acc, device=x.device) if dy is None else dy.to(acc)
        xhat = (x.to(acc) - mean.view(shape)) * invstd.view(shape)
        local = torch.stack([dy_a.sum(dims), (dy_a * xhat).sum(dims)])
        sums = ctx.reducer.all_reduce(local)
        k = invstd if weight is None else invstd * weight.to(acc)
        dx = k.view(shape) * (dy_a - (sums[0] / total).view(shape) - xhat * (sums[1] / total).view(shape))
        dweight = local[1].to(weight.dtype) if weight is not None else None
        dbias = local[0].to(weight.dtype if weight is not None else acc) if ctx.has_bias else None
        return dx.to(x.dtype), dweight, dbias, None, None


# --------------------------------------------------------------------------- the synchronized ops
# The nk layers' math lives with their ops (one gather forward, one all_reduce backward, over the
# same pieces as the single-process ops); plain BatchNorm's is here.



def batch_norm_sync(x, weight, bias, eps, reducer):
    """Plain BatchNorm over the group -> (y, batch_mean, batch_var (biased), count)."""
    return _BatchNormSync.apply(x, weight, bias, eps, reducer)


# --------------------------------------------------------------------------- modules
def _tracked(layer, prefix=""):
    mean = getattr(layer, prefix + "running_mean")
    return mean is not None and layer.track_running_stats



def _l2bn_forward(layer, input, reducer):
    """L2BN's synchronized training forward: the layer's own functional call
    (functional.l2bn_family) with the group's reducer."""
    name = type(layer).__name__
    return layer._family(input, _Agreed(reducer, name, "l2bn"), name)


def _spectral_forward(layer, input, reducer):
    """The SBN family's synchronized training forward: the layer's own functional call
    (functional.spectral_family) with the group's reducer."""
    name = type(layer).__name__
    if isinstance(layer, SpectralBatchNorm2d):
        _check_algorithm(layer.algorithm)
    kind = "bnsbn" if isinstance(layer, BatchNormSBN2d) else "sbn"
    return layer._family(input, _Agreed(reducer, name, kind, *getattr(input, "shape", ())[2:]), name)


def _batch_norm_forward(layer, input, reducer):
    if input.dim() < 2:
        raise ValueError(f"{type(layer).__name__}: expected an (N, C, ...) input, got shape {tuple(input.shape)}")
    tracked = _tracked(layer)
    y, mean, var, count = batch_norm_sync(input, layer.weight, layer.bias, float(layer.eps), reducer)
    F_nk.check_group_count(count, input, type(layer).__name__)
    if tracked:
        F_nk.update_running_stats(layer.running_mean, layer.running_var, mean.detach(), var.detach(), layer.momentum,
                                  count, layer.num_batches_tracked)
    return y


class _Sync:
    """First base of every Sync layer: in training, with torch.distributed initialized and a
    group of more than one process (process_group, None = WORLD), the statistics are the
    group's; otherwise the layer runs exactly as its parent."""

    _sync_forward = None  # the family's synchronized training forward(layer, input, reducer)

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _forward(self, input):
        reducer = reducer_for(self.process_group) if self.training else None
        if reducer is None:
            return super()._forward(input)
        y = self._sync_forward(input, reducer)
        if self._unfused:  # NormAct layers whose activation / drop runs as a module
            y = self.act(self.drop(y))
        return y


def _check_algorithm(algorithm: str) -> str:
    algo = F_nk.resolve_algorithm(algorithm)
    if algo == "fft":
        raise ValueError(
            "SyncSpectralBatchNorm2d: synchronized statistics are implemented for algorithm='parseval' "
            "(the same math without an FFT, the default 'auto'); use algorithm='parseval' instead of 'fft'")
    return algo


class SyncL2BatchNorm1d(_Sync, L2BatchNorm1d):
    """L2BatchNorm1d with its training statistics over a process group (None = WORLD)."""
    _sync_forward = _l2bn_forward


class SyncL2BatchNorm2d(_Sync, L2BatchNorm2d):
    """L2BatchNorm2d with its training statistics over a process group (None = WORLD)."""
    _sync_forward = _l2bn_forward


class SyncSpectralBatchNorm2d(_Sync, SpectralBatchNorm2d):
    """SpectralBatchNorm2d with its training statistics over a process group (None = WORLD).
    Only algorithm "parseval"/"auto" (the same math as "fft") can be synchronized."""
    _sync_forward = _spectral_forward

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_algorithm(self.algorithm)


class SyncBatchNormSBN2d(_Sync, BatchNormSBN2d):
    """BatchNormSBN2d with its training statistics (BN's and SBN's) over a process group."""
    _sync_forward = _spectral_forward


class SyncL2BatchNormAct2d(_Sync, L2BatchNormAct2d):
    """L2BatchNormAct2d with its training statistics over a process group (None = WORLD)."""
    _sync_forward = _l2bn_forward


class SyncSpectralBatchNormAct2d(_Sync, SpectralBatchNormAct2d):
    """SpectralBatchNormAct2d with its training statistics over a process group (parseval only)."""
    _sync_forward = _spectral_forward

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_algorithm(self.algorithm)


class SyncBatchNormSBNAct2d(_Sync, BatchNormSBNAct2d):
    """BatchNormSBNAct2d with its training statistics over a process group (None = WORLD)."""
    _sync_forward = _spectral_forward


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """nn.BatchNorm1d/2d/3d with its training statistics over a process group, like
    nn.SyncBatchNorm, on any device and backend (gloo on CPUs too): nn.SyncBatchNorm runs only
    on GPUs. convert_sync makes torch's BatchNorm layers into it where the group's backend is
    not NCCL. One all_gather forward, one all_reduce backward; empty local batches are allowed.

    Args: nn.BatchNorm2d's (num_features, eps, momentum, affine, track_running_stats, device,
    dtype) and process_group (None = WORLD). Shape: input (N, C, *), output the same."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected an (N, C, ...) input, got a {input.dim()}-d input")

    def forward(self, input):
        reducer = reducer_for(self.process_group) if self.training else None
        if reducer is None:
            return super().forward(input)
        return _batch_norm_forward(self, input, reducer)


class SyncBatchNormAct2d(SyncBatchNorm):
    """timm's BatchNormAct2d (norm, then drop, then act) synchronized on any backend: what
    convert_sync makes of it where timm's SyncBatchNormAct (GPU only) cannot run."""

    def forward(self, input):
        return self.act(self.drop(super().forward(input)))


# --------------------------------------------------------------------------- conversion
_SYNC_OF = {L2BatchNorm1d: SyncL2BatchNorm1d, L2BatchNorm2d: SyncL2BatchNorm2d,
            SpectralBatchNorm2d: SyncSpectralBatchNorm2d, BatchNormSBN2d: SyncBatchNormSBN2d,
            L2BatchNormAct2d: SyncL2BatchNormAct2d, SpectralBatchNormAct2d: SyncSpectralBatchNormAct2d,
            BatchNormSBNAct2d: SyncBatchNormSBNAct2d}
_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _retype(module: nn.Module, cls, process_group) -> nn.Module:
    """A cls object with module's parameters, buffers, sub-modules, hooks and settings."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (type(v)(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    new.process_group = process_group
    if isinstance(new, (SyncSpectralBatchNorm2d, SyncSpectralBatchNormAct2d)):
        _check_algorithm(new.algorithm)
    return new


def _to_sync(module: nn.Module, process_group) -> nn.Module:
    """The Sync form of an nk layer (same state)."""
    return _retype(module, _SYNC_OF[type(module)], process_group)


def _is_synchronized(m: nn.Module) -> bool:
    return isinstance(m, (_Sync, nn.SyncBatchNorm, SyncBatchNorm))


def _uses_nccl(process_group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_backend(process_group) == "nccl"


def _timm_batch_norm_act(m: nn.Module) -> bool:
    return any(c.__name__ == "BatchNormAct2d" and c.__module__.startswith("timm.") for c in type(m).__mro__)


def convert_nk_layers(module: nn.Module, process_group=None) -> nn.Module:
    """Only the nk layers of ``module`` into their Sync forms (what torch's and timm's converters
    add to their own work, see _frameworks.py)."""
    if type(module) in _SYNC_OF:
        return _to_sync(module, process_group)
    for name, child in module.named_children():
        new = convert_nk_layers(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module


def convert_sync(module: nn.Module, process_group=None) -> nn.Module:
    """Synchronize every normalization layer of ``module`` over ``process_group`` (None = WORLD),
    sharing parameters and buffers (like nn.SyncBatchNorm.convert_sync_batchnorm); call it
    before wrapping the model in DDP. Returns the converted model (a new top-level object when
    ``module`` itself is such a layer).

        L2BatchNorm1d/2d, SpectralBatchNorm2d, BatchNormSBN2d and their NormAct forms -> Sync*
        nn.BatchNorm1d/2d/3d -> nn.SyncBatchNorm with an NCCL group, else SyncBatchNorm (this
            module's: the same math on any device; nn.SyncBatchNorm runs only on GPUs)
        timm's BatchNormAct2d -> timm's SyncBatchNormAct with NCCL, else SyncBatchNormAct2d
    Layers already synchronized are kept. Raises ValueError for SpectralBatchNorm2d with
    algorithm="fft" (use "parseval": same math), and TypeError for any other _BatchNorm subclass
    (its forward is unknown: converting it could change what it computes)."""
    if type(module) in _SYNC_OF:
        return _to_sync(module, process_group)
    if _is_synchronized(module):
        return module
    if _timm_batch_norm_act(module):
        if _uses_nccl(process_group):
            import importlib

            return importlib.import_module("timm.layers.norm_act").convert_sync_batchnorm(module, process_group)
        return _retype(module, SyncBatchNormAct2d, process_group)
    if type(module) in _TORCH_BN:
        if _uses_nccl(process_group):
            return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
        return _retype(module, SyncBatchNorm, process_group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"convert_sync: do not know how to synchronize {type(module).__name__} (a BatchNorm "
                        f"subclass with its own forward); convert it yourself or replace it")
    for name, child in module.named_children():
        new = convert_sync(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
