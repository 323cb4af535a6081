"""torchvision and timm for the integration tests, on any torch build.

torchvision's wheel for torch 2.13 is a CUDA build: on the CPU torch its C extension does not
load, and importing torchvision then fails in its fake-kernel registrations ("operator
torchvision::nms does not exist"). Its model code is pure Python and needs none of its ops, so
where the extension did not load, the two op schemas those registrations need are defined
(schemas only, no kernels) and the import retried. Where the extension loads (a matching
build, e.g. the GPU machine's torchvision), nothing is defined.

Both packages are required (make setup installs them): a missing one fails the tests that use
it with an ImportError naming the install line, never skips them.
"""
from __future__ import annotations

import sys

import torch

INSTALL = "pip install --no-deps torchvision==0.28.0 timm==1.0.31  (what `make setup` does)"
_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None  # the torch.library.Library holding the schemas (its definitions live as long as it)


def _forget_torchvision():
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision():
    global _library
    try:
        import torchvision
    except ModuleNotFoundError as e:
        raise ImportError(f"the integration tests need torchvision: {INSTALL}") from e
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        _forget_torchvision()
        _library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _library.define(schema)
        import torchvision
    return torchvision


def import_timm():
    import_torchvision()  # timm imports torchvision
    try:
        import timm
    except ModuleNotFoundError as e:
        raise ImportError(f"the integration tests need timm: {INSTALL}") from e
    return timm
