"""Packaging (issue #17): the sdist carries every source and header; `python -m build
--no-isolation` makes a wheel from it; in a fresh venv that has only torch, `pip install` of the
sdist (pip's isolated build, which has no torch) stops at once with a message naming
--no-build-isolation, and the wheel installs, imports with its C++ extension and runs a layer
from another directory.

Cost: the extension compiles once per checkout (about 5 CPU-minutes, ninja with MAX_JOBS=2): the
sdist is unpacked at a fixed place under build/packaging-test/ (git-ignored) whose build/
directory persists, so a rerun compiles only what changed since (ninja compares the sources'
mtimes, which the sdist keeps). The venv takes torch from pip's local wheel cache
(torch==<the running version>, the same build the wheel is compiled against). Every step has a
timeout.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from normkernels.version import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "build", "packaging-test")
SDIST_NAME = f"normkernels-{__version__}"


def _run(cmd, timeout, cwd=None, env=None, check=True):
    env = {k: v for k, v in (env or os.environ).items() if k != "PYTHONPATH"}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    proc.elapsed = time.monotonic() - t0
    if check:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# What .gitignore keeps out of a checkout: build products, and an egg-info whose SOURCES.txt
# setuptools would merge into the sdist's file list (hiding a MANIFEST.in that misses files).
_NOT_SOURCES = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                      ".pytest_cache", ".benchmarks", "study_results",
                                      "bench_results", ".venv")


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """python -m build --sdist --no-isolation of a clean copy of the checkout."""
    src = tmp_path_factory.mktemp("checkout") / "normkernels"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCES)
    out = tmp_path_factory.mktemp("sdist")
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(src)],
         timeout=300)
    path = out / f"{SDIST_NAME}.tar.gz"  # the version of normkernels/version.py, through setup.py
    assert path.exists(), os.listdir(out)
    return path


def _repo_files(pattern):
    return {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
            if os.path.isfile(p) and "__pycache__" not in p}


def test_sdist_carries_every_source_and_header(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = set()
    for ext in ("h", "cuh", "cpp", "cu"):
        want |= _repo_files(f"csrc/**/*.{ext}")
    want |= _repo_files("normkernels/**/*.py") | _repo_files("tests/*.py")
    want |= {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md"}
    assert any(n.endswith(".h") for n in want) and any(n.endswith(".cu") for n in want)
    assert sorted(want - names) == []


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory):
    """python -m build --wheel --no-isolation in the unpacked sdist (its build/ kept between runs:
    the module docstring)."""
    src = os.path.join(CACHE, SDIST_NAME)
    os.makedirs(src, exist_ok=True)
    # Only the compiled objects (build/temp.*) stay: the previous sources go (a removed file
    # must not be built) and so do build/lib.* and build/bdist.* (a removed module must not ship).
    for base, keep in ((src, "build"), (os.path.join(src, "build"), "temp.")):
        for entry in os.listdir(base) if os.path.isdir(base) else ():
            if not entry.startswith(keep):
                p = os.path.join(base, entry)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(CACHE, filter="data")
        else:
            tar.extractall(CACHE)
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), "."],
         cwd=src, env=env, timeout=1200)
    (whl,) = out.glob(f"normkernels-{__version__}-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv (no system site-packages) with torch of the running version only."""
    d = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", str(d)], timeout=120)
    py = str(d / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"], timeout=600)
    return py


def test_isolated_pip_install_stops_at_once_naming_no_build_isolation(venv, sdist):
    proc = _run([venv, "-m", "pip", "install", str(sdist)], timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "--no-build-isolation" in out and "torch is not importable" in out, out[-2000:]
    assert proc.elapsed < 120  # no compiler ran


_SMOKE = """
import os, sys
import torch, normkernels as nk
assert os.path.dirname(nk.__file__).startswith(sys.prefix), nk.__file__
assert nk.backends()["cpp"], "the wheel's C++ extension did not load"
for layer, shape in ((nk.L2BatchNorm2d(4), (3, 4, 5, 6)), (nk.BatchNormSBNAct2d(4), (3, 4, 8, 8))):
    x = torch.randn(shape, requires_grad=True)
    layer(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    layer.eval()(x)
print(nk.__version__)
"""


def test_wheel_installs_into_a_fresh_venv_and_runs_elsewhere(venv, wheel, tmp_path):
    _run([venv, "-m", "pip", "install", "-q", str(wheel)], timeout=300)
    proc = _run([venv, "-c", _SMOKE], cwd=tmp_path, timeout=120)  # not the repo: no local import
    assert proc.stdout.strip() == __version__
