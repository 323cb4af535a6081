"""pytest-benchmark suite for normkernels (its own run; `pytest tests/` never collects it).

    python -m pytest benchmarks/ --benchmark-only                      # all ops, shapes, dtypes
    python -m pytest benchmarks/ --benchmark-only --nk-quick           # one ResNet-50 + one CIFAR shape
    python -m pytest benchmarks/ --benchmark-only --nk-ops sbn,bnsbn --nk-dtypes bfloat16

Options (all optional): --nk-device cuda|cpu|auto, --nk-dtypes float32,bfloat16,
--nk-ops bn,l2bn,sbn,bnsbn, --nk-impls nk,eager,..., --nk-shapes resnet50,cifar,NxCxHxW,
--nk-passes fwd,fwd+bwd, --nk-quick. The cases and the timing primitives are benchmarks/bench.py's,
so the suite and `python benchmarks/bench.py` measure the same thing.
"""
from __future__ import annotations

import gc
import math
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)  # bench.py

import bench  # noqa: E402

DEFAULTS = {"--nk-device": "auto", "--nk-dtypes": None, "--nk-ops": ",".join(bench.OPS), "--nk-impls": None,
            "--nk-shapes": None, "--nk-passes": ",".join(bench.PASSES), "--nk-quick": False}


def _opt(config, name):
    """The option's value; its default when this conftest was not loaded early enough to add it
    (a bare `pytest` from the repository root)."""
    try:
        return config.getoption(name)
    except ValueError:
        return DEFAULTS[name]


def pytest_collection_modifyitems(config, items):
    """Benchmarks run only when asked for by path (python -m pytest benchmarks/ ...)."""
    asked = any(os.path.abspath(str(a).split("::")[0]).startswith(HERE) for a in config.args)
    if not asked:
        skip = pytest.mark.skip(reason="benchmarks run with: python -m pytest benchmarks/ --benchmark-only")
        for item in items:
            if str(item.fspath).startswith(HERE):
                item.add_marker(skip)


def pytest_sessionstart(session):
    # Same CPU allocator setting as the bench command: timings of kernels, not of page faults.
    bench.steady_cpu_allocator()


def pytest_addoption(parser):
    g = parser.getgroup("normkernels", "normkernels benchmark selection")
    g.addoption("--nk-device", default=DEFAULTS["--nk-device"], help="cuda, cpu or auto")
    g.addoption("--nk-dtypes", default=None, help="default: float32,bfloat16 on GPU, float32 on CPU")
    g.addoption("--nk-ops", default=DEFAULTS["--nk-ops"])
    g.addoption("--nk-impls", default=None, help="restrict implementations, e.g. nk,eager")
    g.addoption("--nk-shapes", default=None, help="resnet50, cifar or NxCxHxW, comma separated")
    g.addoption("--nk-passes", default=DEFAULTS["--nk-passes"])
    g.addoption("--nk-quick", action="store_true", help="one shape per family, shorter timing")


def _device(config) -> str:
    d = _opt(config, "--nk-device")
    return ("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d


def _dtypes(config) -> list[str]:
    d = _opt(config, "--nk-dtypes")
    return (d or ("float32,bfloat16" if _device(config) == "cuda" else "float32")).split(",")


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device, quick = _device(config), _opt(config, "--nk-quick")
    if "case" in metafunc.fixturenames:
        shapes = bench._parse_shapes(_opt(config, "--nk-shapes"), device, quick)
        ops = _opt(config, "--nk-ops").split(",")
        impls = _opt(config, "--nk-impls")
        impls = set(impls.split(",")) if impls else None
        cases, ids = [], []
        for shape in shapes:
            for dt in _dtypes(config):
                for ps in _opt(config, "--nk-passes").split(","):
                    for op in bench.OPS:
                        if op not in ops:
                            continue
                        for impl in bench.IMPLS[op]:
                            if impls is None or impl in impls or op == "bn":
                                cases.append((op, impl, shape, dt, ps))
                                ids.append(f"{op}-{impl}-{bench._fmt_shape(shape)}-{dt}-{ps}")
        metafunc.parametrize("case", cases, ids=ids)
    if "e2e_case" in metafunc.fixturenames:
        cases = [(v, dt) for dt in _dtypes(config) for v in bench.E2E_VARIANTS]
        metafunc.parametrize("e2e_case", cases, ids=[f"{v}-{dt}" for v, dt in cases])


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def quick(pytestconfig) -> bool:
    return _opt(pytestconfig, "--nk-quick")


@pytest.fixture(scope="session")
def copy_gbps(device, quick) -> float:
    return bench.copy_bandwidth(device, quick)


@pytest.fixture(scope="session")
def bench_inputs(device):
    """inputs(shape, dtype) -> (xs, dys): a rotation pool, kept for one (shape, dtype) at a time."""
    held = {}

    def get(shape, dtype):
        key = (tuple(shape), dtype)
        if key not in held:
            held.clear()
            gc.collect()
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            held[key] = bench.make_inputs(shape, device, dtype, bench._pool_size(nbytes, device))
        return held[key]
    return get


@pytest.fixture(scope="session")
def baseline_ms(device, quick, bench_inputs):
    """ms of nn.BatchNorm2d on the same tensor and pass (measured once per session)."""
    cache = {}

    def get(shape, dtype, pass_):
        key = (tuple(shape), dtype, pass_)
        if key not in cache:
            fn, params = bench.build("bn", "torch", shape[1], device, dtype)
            xs, dys = bench_inputs(shape, dtype)
            run = bench.make_runner(fn, params, xs, dys, pass_)
            run()
            cache[key] = bench.time_ms(run, device, quick)
        return cache[key]
    return get


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def timed(benchmark, device, quick):
    """timed(run, budget_s=None) -> median ms, recorded by pytest-benchmark (see _pedantic)."""
    return lambda run, budget_s=None: _pedantic(benchmark, run, device, quick, budget_s)


def _pedantic(benchmark, run, device, quick, budget_s=None):
    """benchmark.pedantic with a device sync after each call and a round count fitted to a budget.

    Returns the median ms: triton.testing.do_bench on CUDA (the number the tables use), the
    pytest-benchmark median on CPU."""
    import time

    def synced():
        run()
        sync(device)

    synced()
    t0 = time.perf_counter()
    synced()
    one = max(time.perf_counter() - t0, 1e-6)
    budget = budget_s if budget_s is not None else (0.3 if quick else 1.0)
    rounds = int(min(200, max(5, budget / one)))
    benchmark.pedantic(synced, rounds=rounds, warmup_rounds=1, iterations=1)
    if device == "cuda":
        return bench.time_ms(run, device, quick)
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None)
    return inner.median * 1e3 if inner is not None else bench.time_ms(run, device, quick)
