"""End to end: one ResNet-50 training step (forward, backward, SGD) per normalization variant:
plain BN, BN+SBN in stage 4, BN+SBN in stages 3-4, every BN swapped for L2BN."""
from __future__ import annotations

import pytest

import bench

_bn_ms = {}


def test_resnet50_step(benchmark, timed, e2e_case, device, quick):
    variant, dtype_name = e2e_case
    dtype = bench.DTYPES[dtype_name]
    batch, res = bench.e2e_config(device, quick)
    try:
        step, source = bench.e2e_step(variant, device, dtype, batch, res)
    except Exception as e:
        pytest.skip("unavailable: " + bench._error(e))
    step()
    benchmark.group = f"resnet50 step {batch}x3x{res}x{res} {dtype_name}"
    ms = timed(step, budget_s=2.0 if device == "cpu" else 1.0)
    if variant == "bn":
        _bn_ms[dtype_name] = ms
    benchmark.extra_info.update(variant=variant, model=source, batch=batch, resolution=res, dtype=dtype_name,
                                ms=ms, ratio_bn=ms / _bn_ms[dtype_name] if dtype_name in _bn_ms else None)
