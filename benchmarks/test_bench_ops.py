"""Per-layer benchmarks: every op x implementation x shape x dtype x pass (see conftest.py)."""
from __future__ import annotations

import pytest
import torch

import bench


def test_layer(benchmark, timed, case, device, quick, copy_gbps, bench_inputs, baseline_ms):
    op, impl, shape, dtype_name, pass_ = case
    dtype = bench.DTYPES[dtype_name]
    try:
        fn, params = bench.build(op, impl, shape[1], device, dtype)
    except Exception as e:                      # a backend or layer missing on this machine
        pytest.skip("unavailable: " + bench._error(e))
    xs, dys = bench_inputs(shape, dtype)
    run = bench.make_runner(fn, params, xs, dys, pass_)
    run()                                        # compile / autotune outside the timing
    benchmark.group = f"{pass_} {bench._fmt_shape(shape)} {dtype_name}"
    ms = timed(run)
    nbytes = xs[0].numel() * xs[0].element_size()
    gbps = bench.TRAFFIC[pass_] * nbytes / (ms * 1e-3) / 1e9
    bn_ms = baseline_ms(shape, dtype, pass_)
    benchmark.extra_info.update(op=op, impl=impl, shape=list(shape), dtype=dtype_name, **{"pass": pass_},
                                ms=ms, ratio_bn=ms / bn_ms, gbps=gbps, pct_copy=100 * gbps / copy_gbps,
                                copy_gbps=copy_gbps)
