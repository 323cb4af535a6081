"""Model surgery: swap BN for L2BN, insert SBN after the BN layers of chosen ResNet stages,
fuse/unfuse BN+SBN pairs, re-estimate running statistics (recalibrate) and freeze norm layers.

Each surgery function changes the model in place and returns it (or the replacement, when the
model itself is the layer being replaced). None leaves a model computing something other than
its state says: state whose meaning changed is reset (or re-estimated), state that is new starts
at its initial values, and a FreshStateWarning (``.keys``: the state_dict keys) reports both.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import (BatchNormSBN2d, BatchNormSBNAct2d, FreshStateWarning, L2BatchNorm1d, L2BatchNorm2d,
                      L2BatchNormAct2d, NormThenSBN2d, SpectralBatchNorm2d, _is_trained, _NormAct, _NormBase)

__all__ = ["convert_bn_to_l2bn", "insert_sbn", "fuse_bn_sbn", "unfuse_bn_sbn", "recalibrate", "freeze", "unfreeze"]

_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def _replace(module: nn.Module, swap: Callable[[nn.Module, str], nn.Module | None], prefix: str = "",
             enter: Callable[[nn.Module], bool] = lambda m: True) -> nn.Module:
    """Depth-first: every module for which swap(module, its qualified name) returns a module is
    replaced by it; modules for which enter() is False are not looked into."""
    new = swap(module, prefix)
    if new is not None:
        return new
    if not enter(module):
        return module
    for name, child in list(module.named_children()):
        replaced = _replace(child, swap, f"{prefix}{name}.", enter)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def _share_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give dst src's Parameter objects and buffers (optimizers holding them keep working)."""
    for name in ("weight", "bias") + _RUNNING:
        if getattr(src, name, None) is not None:
            setattr(dst, name, getattr(src, name))
    dst.train(src.training)
    return dst


def _factory(m: nn.Module) -> dict:
    p = m.weight if getattr(m, "weight", None) is not None else getattr(m, "running_mean", None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def _timm_norm_act(m: nn.Module) -> str | None:
    """'local' / 'sync' for timm's BatchNormAct2d / SyncBatchNormAct (without importing timm)."""
    for cls in type(m).__mro__:
        if cls.__module__.startswith("timm."):
            if cls.__name__ == "BatchNormAct2d":
                return "local"
            if cls.__name__ == "SyncBatchNormAct":
                return "sync"
    return None


def _is_sync_bn(m: nn.Module) -> bool:
    from .distributed import SyncBatchNorm as GlooSyncBatchNorm

    return isinstance(m, (nn.SyncBatchNorm, GlooSyncBatchNorm))


def _warn_fresh(what: str, keys: list[str], advice: str) -> None:
    """One FreshStateWarning for a whole conversion: the layers, then the keys' names in each."""
    if keys:
        layers = list(dict.fromkeys(k.rsplit(".", 1)[0] if "." in k else "" for k in keys))
        names = list(dict.fromkeys(k.rsplit(".", 1)[-1] for k in keys))
        shown = ", ".join(layers[:8]) + (f", ... ({len(layers)} layers)" if len(layers) > 8 else "")
        warnings.warn(FreshStateWarning(f"{what} ({', '.join(names)}) in {shown}. {advice}", keys), stacklevel=3)


# ------------------------------------------------------------------------------------ BN -> L2BN

def convert_bn_to_l2bn(model: nn.Module, rescale: bool = False, backend: str = "auto",
                       batches: Iterable | None = None) -> nn.Module:
    """Replace every BatchNorm layer by the matching L2BN layer, keeping its Parameter objects
    (weight, bias) and settings:

        nn.BatchNorm1d -> L2BatchNorm1d,  nn.BatchNorm2d -> L2BatchNorm2d,
        nn.SyncBatchNorm (and normkernels.distributed.SyncBatchNorm) -> SyncL2BatchNorm2d (same
            process group; conv nets' 4-d inputs),
        timm's BatchNormAct2d -> L2BatchNormAct2d, timm's SyncBatchNormAct -> SyncL2BatchNormAct2d
            (the same act and drop modules).
    Other BatchNorm classes (BatchNorm3d, ...) and the nk layers are left as they are.

    The running statistics change meaning (L2BN's are those of the l2-normalized samples, about
    1/(C*H*W) the variance of x), so BN's are never kept: with ``batches`` (as for recalibrate)
    they are re-estimated on them; otherwise they are reset (mean 0, var 1, count 0) and, where
    the BN had trained statistics, a FreshStateWarning lists the reset keys (train, or call
    nk.recalibrate(model, batches), before using eval mode).
    """
    from . import distributed as nkd

    reset: list[str] = []

    def swap(m, name):
        kind = _timm_norm_act(m)
        if kind is not None:
            new = L2BatchNormAct2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, apply_act=False,
                                   rescale=rescale, backend=backend, device="meta")
            new._set_act(m.act, m.drop)
            if kind == "sync":
                new = nkd._to_sync(new, m.process_group)
        elif type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) or _is_sync_bn(m):
            cls = L2BatchNorm1d if type(m) is nn.BatchNorm1d else L2BatchNorm2d
            new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, rescale=rescale,
                      backend=backend, device="meta")
            if _is_sync_bn(m):
                new = nkd._to_sync(new, m.process_group)
        else:
            return None
        _share_state(m, new)
        if _is_trained(m):
            reset.extend(name + k for k in _RUNNING if getattr(m, k, None) is not None)
        new.reset_running_stats()
        return new

    model = _replace(model, swap)
    if batches is not None:
        recalibrate(model, batches)
    else:
        _warn_fresh("convert_bn_to_l2bn: BatchNorm's running statistics are at the wrong scale for L2BN and were "
                    "reset", reset, "Train, or re-estimate them with nk.recalibrate(model, batches), before eval.")
    return model


# ------------------------------------------------------------------------------------ SBN

def _stage(model: nn.Module, stage) -> nn.Module:
    name = f"layer{stage}" if isinstance(stage, int) else stage
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = [n for n, _ in model.named_children()]
        raise ValueError(f"model has no stage {name!r}; its children are {children}") from None


def insert_sbn(model: nn.Module, stages: Iterable = (3, 4), fuse: bool = True, **sbn_kwargs) -> nn.Module:
    """Put a SpectralBatchNorm2d right after every normalization layer of the given stages.

    stages: ints name torchvision/timm ResNet stages (3 -> model.layer3); strings name any
    submodule. The paper's settings: stages=(3, 4) ("SBN34", CIFAR) and stages=(4,) ("SBN4",
    ImageNet). sbn_kwargs: SpectralBatchNorm2d's (eps, momentum, fft_norm, backend, ...).

        nn.BatchNorm2d     -> BatchNormSBN2d (fuse=True) or NormThenSBN2d(bn, sbn) (fuse=False)
        nn.SyncBatchNorm / normkernels.distributed.SyncBatchNorm -> SyncBatchNormSBN2d (fused)
        timm's BatchNormAct2d -> BatchNormSBNAct2d (SBN between the norm and its activation)
        L2BatchNorm2d (and its Sync form) -> NormThenSBN2d(l2bn, sbn) (no fused form)
    Layers that already have an SBN after them are left alone.

    State: the norm's keys do not change (layer4.0.bn1.weight stays layer4.0.bn1.weight in
    every form), so checkpoints of the plain model load strictly; SBN's is new, under
    <layer>.sbn_*, and where it sits beside trained statistics a FreshStateWarning lists those
    keys (loading a plain checkpoint later reports them too).
    """
    from . import distributed as nkd

    targets = {(f"layer{s}" if isinstance(s, int) else s): _stage(model, s) for s in stages}
    fresh: list[str] = []

    def make_sbn(m, sync):
        sbn = SpectralBatchNorm2d(m.num_features, affine=m.affine, track_running_stats=m.track_running_stats,
                                  **_factory(m), **sbn_kwargs)
        sbn.train(m.training)
        return nkd._to_sync(sbn, m.process_group) if sync else sbn

    def swap(m, name):
        kind = _timm_norm_act(m)
        if type(m) is nn.BatchNorm2d or _is_sync_bn(m) or kind is not None:
            sbn = make_sbn(m, False)
            if kind is not None:
                bn = _share_state(m, nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine,
                                                    m.track_running_stats, device="meta"))
                new = BatchNormSBNAct2d.from_modules(bn, sbn, apply_act=False)
                new._set_act(m.act, m.drop)
                new = nkd._to_sync(new, m.process_group) if kind == "sync" else new
            elif _is_sync_bn(m):
                bn = _share_state(m, nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine,
                                                    m.track_running_stats, device="meta"))
                new = nkd._to_sync(BatchNormSBN2d.from_modules(bn, sbn), m.process_group)
            else:
                new = BatchNormSBN2d.from_modules(m, sbn) if fuse else NormThenSBN2d(m, sbn)
        elif isinstance(m, L2BatchNorm2d) and not isinstance(m, _NormAct):
            new = NormThenSBN2d(m, make_sbn(m, isinstance(m, nkd._Sync)))
        else:
            return None
        if _is_trained(m):  # fresh SBN state beside trained state: say so (a fresh model is all fresh)
            fresh.extend(name + "sbn_" + k for k in ("weight", "bias") + _RUNNING
                         if getattr(sbn_of(new), k, None) is not None)
        return new

    def sbn_of(new):
        return new.sbn if isinstance(new, NormThenSBN2d) else _SBNState(new)

    def enter(m):  # never a second SBN: not into pairs that already have one
        return not isinstance(m, (NormThenSBN2d, BatchNormSBN2d))

    for base, stage in targets.items():
        for name, child in list(stage.named_children()):
            setattr(stage, name, _replace(child, swap, f"{base}.{name}.", enter))
    _warn_fresh("insert_sbn: SBN state freshly initialised", fresh,
                "Checkpoints of the plain model load strictly (SBN's keys keep these initial values).")
    return model


class _SBNState:
    """A fused layer's SBN state under SpectralBatchNorm2d's names."""

    def __init__(self, layer):
        self._layer = layer

    def __getattr__(self, name):
        return getattr(self._layer, "sbn_" + name)


def fuse_bn_sbn(model: nn.Module) -> nn.Module:
    """Turn every NormThenSBN2d(nn.BatchNorm2d, SpectralBatchNorm2d) (and legacy
    nn.Sequential(nn.BatchNorm2d, SpectralBatchNorm2d)) into a BatchNormSBN2d with the same state
    (state_dict keys unchanged for NormThenSBN2d)."""

    def swap(m, name):
        if isinstance(m, NormThenSBN2d) and type(m.norm) is nn.BatchNorm2d and type(m.sbn) is SpectralBatchNorm2d:
            return BatchNormSBN2d.from_modules(m.norm, m.sbn)
        if (isinstance(m, nn.Sequential) and len(m) == 2 and type(m[0]) is nn.BatchNorm2d
                and type(m[1]) is SpectralBatchNorm2d):
            return BatchNormSBN2d.from_modules(m[0], m[1])
        return None

    return _replace(model, swap)


def unfuse_bn_sbn(model: nn.Module) -> nn.Module:
    """Turn every BatchNormSBN2d back into NormThenSBN2d(bn, sbn) (same state, same keys).
    Synchronized and norm+act fused layers stay fused."""
    return _replace(model, lambda m, name: m.to_modules() if type(m) is BatchNormSBN2d else None)


# ------------------------------------------------------------------------------------ statistics

def _norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every layer with running statistics: nk's and torch's (any _BatchNorm, timm's too)."""
    return [m for m in model.modules() if isinstance(m, (_NormBase, _BatchNorm))
            and m.track_running_stats and m.running_mean is not None]


def _momenta(m):
    return ("momentum", "sbn_momentum") if isinstance(m, BatchNormSBN2d) else ("momentum",)


def recalibrate(model: nn.Module, batches: Iterable, device=None) -> nn.Module:
    """Re-estimate the running statistics of every normalization layer, nk's and torch's, like
    torch.optim.swa_utils.update_bn (which sees only torch's): each layer's statistics are reset
    and replaced by the cumulative average over ``batches`` (momentum None during the pass),
    with the model in training mode under torch.no_grad(); each module's mode and each layer's
    momentum are restored afterwards. Frozen layers (nk.freeze) are left alone.

    batches: an iterable of inputs, or of (input, ...) tuples/lists (the first element is fed),
    moved to ``device`` if given. If it yields nothing, or the model raises, the previous
    statistics are restored. Returns the model."""
    layers = [m for m in _norm_layers(model) if not _is_frozen(m)]
    saved = {m: {k: getattr(m, k).clone() for k in _state_names(m)} for m in layers}
    momenta = {m: {k: getattr(m, k) for k in _momenta(m)} for m in layers}
    modes = {m: m.training for m in model.modules()}
    count = 0
    try:
        for m in layers:
            m.reset_running_stats()
            for k in _momenta(m):
                setattr(m, k, None)
        model.train()
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, (list, tuple)):
                    batch = batch[0]
                if device is not None:
                    batch = batch.to(device)
                model(batch)
                count += 1
        if count == 0:
            raise ValueError("recalibrate: batches yielded nothing (running statistics left as they were)")
    except BaseException:
        with torch.no_grad():
            for m, state in saved.items():
                for k, v in state.items():
                    getattr(m, k).copy_(v)
        raise
    finally:
        for m, ms in momenta.items():
            for k, v in ms.items():
                setattr(m, k, v)
        for m, mode in modes.items():
            m.training = mode
    return model


def _state_names(m) -> list[str]:
    prefixes = getattr(m, "_state_prefixes", ("",))
    return [p + k for p in prefixes for k in _RUNNING if getattr(m, p + k, None) is not None]


# ------------------------------------------------------------------------------------ freeze

def _frozen_train(module: nn.Module, mode: bool = True) -> nn.Module:
    """A frozen layer's train(): it (and its act/drop modules) stays in eval mode."""
    return nn.Module.train(module, False)


def _is_frozen(m: nn.Module) -> bool:
    return "train" in m.__dict__


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every normalization layer (nk's, torch's _BatchNorm layers, timm's BatchNormAct2d),
    like timm's freeze_batch_norm_2d / torchvision's FrozenBatchNorm2d but without changing
    classes or state_dict keys: its parameters stop requiring gradients and it always
    normalizes with its running statistics, whatever model.train() says. unfreeze() undoes it.
    Returns the model."""
    for m in _norm_layers(model):
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
        m.train = functools.partial(_frozen_train, m)  # instance attribute: survives model.train()
        nn.Module.train(m, False)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo freeze(): parameters require gradients again and the layers follow model.train()."""
    for m in model.modules():
        if _is_frozen(m) and isinstance(m, (_NormBase, _BatchNorm)):
            del m.__dict__["train"]
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    return model
