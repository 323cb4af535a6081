"""Build (or load from its cache) the CPU-emulated CUDA kernels: csrc/cuda/*.cu compiled as host
C++ under tools/cuda_emu/cuda_emu.h, registered for CPU tensors as torch.ops.normkernels_cuda_emu
with the schemas of the normkernels ops (csrc/l2bn.cpp, csrc/running_stats.cpp are compiled into
it with NORMKERNELS_LIBRARY=normkernels_cuda_emu).

The build lives in build/cuda_emu of the checkout (ninja rebuilds what a changed source or
header touches). -O0: the run time is the emulated threads' hand-overs, not arithmetic, and an
unoptimized build both compiles fastest and keeps every __shared__ access a memory access.
"""
import os
import time

import torch
import torch.utils.cpp_extension as ce

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCES = [os.path.join(HERE, f) for f in ("cuda_emu.cpp", "emu_ops.cpp", "l2bn_cuda_emu.cpp",
                                           "running_stats_cuda_emu.cpp")]
SOURCES += [os.path.join(ROOT, "csrc", f) for f in ("common.cpp", "l2bn.cpp", "running_stats.cpp")]


def _clear_stale_lock(path, age_s=1800):
    """torch's build lock is a bare file: a build killed mid-way (Ctrl-C, a timeout) leaves it,
    and every later build would wait for it forever. A lock older than any build is stale."""
    try:
        if time.time() - os.path.getmtime(path) > age_s:
            os.remove(path)
    except FileNotFoundError:
        pass


def load(verbose=False):
    """Loads the library (once per process) and returns torch.ops.normkernels_cuda_emu."""
    if not hasattr(torch.ops.normkernels_cuda_emu, "emu_set_device"):
        build_dir = os.path.join(ROOT, "build", "cuda_emu")
        os.makedirs(build_dir, exist_ok=True)
        _clear_stale_lock(os.path.join(build_dir, "lock"))
        ce.load(name="normkernels_cuda_emu", sources=SOURCES, build_directory=build_dir,
                extra_cflags=["-O0", "-DNORMKERNELS_CUDA_EMULATION",
                              "-DNORMKERNELS_LIBRARY=normkernels_cuda_emu", "-Wno-unknown-pragmas",
                              "-fvisibility=hidden"],
                extra_include_paths=[HERE], is_python_module=False, verbose=verbose)
    return torch.ops.normkernels_cuda_emu
