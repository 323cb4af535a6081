"""How normkernels plugs into torch's and timm's model helpers, which look for BatchNorm classes.

* Synchronization: nn.SyncBatchNorm.convert_sync_batchnorm and timm's convert_sync_batchnorm
  convert only BatchNorm layers; run alone on a model with nk layers they would leave it
  half-synchronized (torch's layers synchronized, nk's local: silently wrong statistics under
  DDP). normkernels wraps both so that they convert the nk layers too (into their
  normkernels.distributed Sync forms, same process group): torch's when normkernels is
  imported, timm's as soon as timm.layers is imported (or at once if it already is).
* timm's freeze_batch_norm_2d / unfreeze_batch_norm_2d also nk.freeze / nk.unfreeze the nk
  layers.
* timm's norm_layer=: get_norm_act_layer maps a norm class to its norm+act class by name;
  normkernels adds its own (L2BatchNorm2d -> L2BatchNormAct2d, SpectralBatchNorm2d ->
  SpectralBatchNormAct2d, BatchNormSBN2d -> BatchNormSBNAct2d), so that
  timm.create_model(name, norm_layer=nk.L2BatchNorm2d) works for models built on BatchNormAct2d
  (EfficientNet, ...) as it does for those built on plain norm layers (ResNet).

Nothing here imports timm: its hooks run when timm itself is imported.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import threading
import warnings

from torch import nn

_TIMM_MODULES = ("timm.layers.norm_act", "timm.layers.create_norm_act")
_state = threading.local()


def _outermost(original, after):
    """original(...), then after(result, *args) once per top-level call: the converters recurse
    through their own (wrapped) names, and only the outermost call adds the nk layers."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if getattr(_state, "depth", 0):
            return original(*args, **kwargs)
        _state.depth = 1
        try:
            result = original(*args, **kwargs)
        finally:
            _state.depth = 0
        return after(result, *args, **kwargs)

    wrapper._normkernels = True
    return wrapper


def _sync_nk(result, module, process_group=None):
    from .distributed import convert_nk_layers

    return convert_nk_layers(result, process_group)


def _freeze_nk(result, module):
    from .convert import freeze

    return freeze(result)


def _unfreeze_nk(result, module):
    from .convert import unfreeze

    return unfreeze(result)


def _install_torch() -> None:
    current = nn.SyncBatchNorm.__dict__["convert_sync_batchnorm"].__func__
    if getattr(current, "_normkernels", False):
        return
    wrapped = _outermost(lambda module, process_group=None: current(nn.SyncBatchNorm, module, process_group),
                         _sync_nk)

    def convert_sync_batchnorm(cls, module, process_group=None):
        return wrapped(module, process_group)

    functools.update_wrapper(convert_sync_batchnorm, current)
    convert_sync_batchnorm._normkernels = True
    nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(convert_sync_batchnorm)


def _install_timm_norm_act(mod) -> None:
    for name, after in (("convert_sync_batchnorm", _sync_nk), ("freeze_batch_norm_2d", _freeze_nk),
                        ("unfreeze_batch_norm_2d", _unfreeze_nk)):
        fn = getattr(mod, name, None)
        if fn is not None and not getattr(fn, "_normkernels", False):
            setattr(mod, name, _outermost(fn, after))
            layers = sys.modules.get("timm.layers")
            if layers is not None and getattr(layers, name, None) is fn:  # timm.layers already bound it
                setattr(layers, name, getattr(mod, name))


def _install_timm_create_norm_act(mod) -> None:
    from . import modules as m

    if not hasattr(mod, "_NORM_TO_NORM_ACT_MAP"):  # timm before its class -> norm+act map: nothing to add to
        return
    pairs = {m.L2BatchNorm2d: m.L2BatchNormAct2d, m.SpectralBatchNorm2d: m.SpectralBatchNormAct2d,
             m.BatchNormSBN2d: m.BatchNormSBNAct2d}
    for norm, norm_act in pairs.items():
        mod._NORM_TO_NORM_ACT_MAP[norm.__name__.lower()] = norm_act
        mod._NORM_ACT_TYPES.add(norm_act)
        mod._NORM_ACT_REQUIRES_ARG.add(norm_act)  # timm then passes the model's act_layer


_INSTALLERS = {"timm.layers.norm_act": _install_timm_norm_act,
               "timm.layers.create_norm_act": _install_timm_create_norm_act}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs an installer right after timm's module executes (before timm.layers binds its names)."""

    def find_spec(self, fullname, path, target=None):
        installer = _INSTALLERS.get(fullname)
        if installer is None or getattr(_state, "finding", False):
            return None
        _state.finding = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            _state.finding = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _run(installer, module)

        spec.loader.exec_module = exec_module
        return spec


def _run(installer, module) -> None:
    try:
        installer(module)
    except Exception as e:  # a timm whose internals differ must still import
        warnings.warn(f"normkernels could not add its layers to {module.__name__} ({type(e).__name__}: {e}); "
                      f"timm's helpers will not see them", RuntimeWarning, stacklevel=2)


def install() -> None:
    """Idempotent: called by normkernels/__init__.py."""
    _install_torch()
    for name, installer in _INSTALLERS.items():
        if name in sys.modules:
            _run(installer, sys.modules[name])
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
