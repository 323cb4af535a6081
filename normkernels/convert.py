"""Model surgery: swap BN for L2BN, insert SBN after the BN layers of chosen ResNet stages, and
fuse/unfuse BN+SBN pairs. Each function changes the model in place and returns it (or the
replacement, when the model itself is the layer being replaced)."""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from .modules import BatchNormSBN2d, L2BatchNorm1d, L2BatchNorm2d, SpectralBatchNorm2d

__all__ = ["convert_bn_to_l2bn", "insert_sbn", "fuse_bn_sbn", "unfuse_bn_sbn"]


def _replace(module: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Depth-first: every module for which swap() returns a module is replaced by it. Fused
    BatchNormSBN2d layers are replaced whole or not at all, never entered."""
    new = swap(module)
    if new is not None:
        return new
    if isinstance(module, BatchNormSBN2d):  # a fused unit: its inner BN is not a separate layer
        return module
    for name, child in module.named_children():
        replaced = _replace(child, swap)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def _share_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give dst src's Parameter objects and buffers (optimizers holding them keep working)."""
    for name in ("weight", "bias"):
        if getattr(src, name, None) is not None:
            setattr(dst, name, getattr(src, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(src, name, None) is not None:
            setattr(dst, name, getattr(src, name))
    dst.train(src.training)
    return dst


def convert_bn_to_l2bn(model: nn.Module, rescale: bool = False, backend: str = "auto") -> nn.Module:
    """Replace every nn.BatchNorm1d/2d by L2BatchNorm1d/2d with the same parameters and buffers."""

    def swap(m):
        if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
            cls = L2BatchNorm2d if isinstance(m, nn.BatchNorm2d) else L2BatchNorm1d
            new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, rescale=rescale,
                      backend=backend)
            return _share_state(m, new)
        return None

    return _replace(model, swap)


def _stage(model: nn.Module, stage) -> nn.Module:
    name = f"layer{stage}" if isinstance(stage, int) else stage
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = [n for n, _ in model.named_children()]
        raise ValueError(f"model has no stage {name!r}; its children are {children}") from None


def insert_sbn(model: nn.Module, stages: Iterable = (3, 4), fuse: bool = True, **sbn_kwargs) -> nn.Module:
    """Put a SpectralBatchNorm2d right after every nn.BatchNorm2d of the given stages.

    stages: ints name torchvision ResNet stages (3 -> model.layer3); strings name any submodule.
    The paper's settings: stages=(3, 4) ("SBN34", CIFAR) and stages=(4,) ("SBN4", ImageNet).
    fuse=True makes each pair one BatchNormSBN2d; fuse=False an nn.Sequential(bn, sbn).
    """
    targets = [_stage(model, s) for s in stages]

    def swap(m):
        if type(m) is nn.BatchNorm2d:
            p = m.weight if m.weight is not None else m.running_mean
            sbn = SpectralBatchNorm2d(m.num_features, affine=m.affine, track_running_stats=m.track_running_stats,
                                      device=None if p is None else p.device, dtype=None if p is None else p.dtype,
                                      **sbn_kwargs)
            sbn.train(m.training)
            return BatchNormSBN2d.from_modules(m, sbn) if fuse else nn.Sequential(m, sbn)
        return None

    for stage in targets:
        for name, child in list(stage.named_children()):
            setattr(stage, name, _replace(child, swap))
    return model


def fuse_bn_sbn(model: nn.Module) -> nn.Module:
    """Turn every nn.Sequential(nn.BatchNorm2d, SpectralBatchNorm2d) into a BatchNormSBN2d."""

    def swap(m):
        if (isinstance(m, nn.Sequential) and len(m) == 2 and type(m[0]) is nn.BatchNorm2d
                and isinstance(m[1], SpectralBatchNorm2d)):
            return BatchNormSBN2d.from_modules(m[0], m[1])
        return None

    return _replace(model, swap)


def unfuse_bn_sbn(model: nn.Module) -> nn.Module:
    """Turn every BatchNormSBN2d back into nn.Sequential(bn, sbn) (same state)."""
    return _replace(model, lambda m: m.to_modules() if isinstance(m, BatchNormSBN2d) else None)
