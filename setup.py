"""Build normkernels and its C++/CUDA extension normkernels._C.

Install with `pip install --no-build-isolation .` (or `-e .`) so the build uses the torch already
installed: the extension must be compiled against the torch it will run with, and an isolated
build environment has no torch (pip would fetch another one, gigabytes, of another build). A
build without torch stops at once with a message that says so; making an sdist needs no torch.

The extension is always built from csrc/*.cpp + csrc/cpu/*.cpp + csrc/autograd/*.cpp;
csrc/cuda/*.cu are added when
torch was built with CUDA and a CUDA toolkit is found (CUDA_HOME), or when forced:

    NORMKERNELS_FORCE_CUDA=1   build the CUDA kernels even without a visible GPU/CUDA torch
                               check (needs nvcc + a CUDA torch; like torchvision's FORCE_CUDA)
    NORMKERNELS_NO_CUDA=1      never build the CUDA kernels (CPU-only extension)
    NORMKERNELS_NO_EXT=1       skip the extension entirely (pure-PyTorch install)
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The commands that compile the extension (the others, sdist and metadata, need no torch).
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist", "bdist_egg", "install", "develop",
                   "editable_wheel"}
NO_TORCH = """normkernels: cannot build the C++ extension: torch is not importable in this build
environment. pip builds in an isolated environment without your torch; build against the
installed torch instead:

    pip install --no-build-isolation .            (or: pip install --no-build-isolation -e .)
    python -m build --wheel --no-isolation

(torch>=2.11 must be installed first; NORMKERNELS_NO_EXT=1 builds a pure-PyTorch package.)"""


def _version():
    """normkernels/version.py's __version__, read as text (importing the package needs torch)."""
    with open(os.path.join(ROOT, "normkernels", "version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _env_flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _set_cuda_home_from_nvcc():
    """Where CUDA_HOME and CUDA_PATH are unset, torch.utils.cpp_extension takes the directory above
    the `nvcc` on PATH as CUDA_HOME. Where that nvcc is a wrapper script or a link outside the
    toolkit (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc), that directory has
    no CUDA headers or libcudart and the CUDA build fails at the link ("cannot find -lcudart").
    Then ask nvcc where its toolkit is (its --dryrun prints TOP) and set CUDA_HOME to it. Must run
    before torch.utils.cpp_extension is imported (it reads CUDA_HOME once, at import)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None or os.path.exists(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include",
                                                   "cuda_runtime.h")):
        return
    try:
        proc = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return
    m = re.search(r"^#\$ TOP=(.+)$", proc.stdout + proc.stderr, re.M)
    if m:
        top = os.path.realpath(m.group(1).strip())
        if os.path.exists(os.path.join(top, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = top


def _ext_modules():
    if _env_flag("NORMKERNELS_NO_EXT"):
        return [], {}
    try:
        import torch
    except ImportError:
        if _BUILD_COMMANDS.intersection(sys.argv[1:]):
            raise SystemExit(NO_TORCH) from None
        return [], {}  # sdist / metadata only
    if not _env_flag("NORMKERNELS_NO_CUDA"):
        _set_cuda_home_from_nvcc()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp") + rel("csrc/autograd/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu")
    if _env_flag("NORMKERNELS_NO_CUDA"):
        use_cuda = False
    elif _env_flag("NORMKERNELS_FORCE_CUDA"):
        use_cuda = True
    else:
        use_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    use_cuda = use_cuda and bool(cuda_sources)

    cxx_flags = ["-O3"]  # the C++ standard flag comes from torch.utils.cpp_extension
    if os.name != "nt":
        cxx_flags += ["-fopenmp"]
    define_macros = []
    extra_link_args = ["-fopenmp"] if os.name != "nt" else []
    if use_cuda:
        define_macros.append(("WITH_CUDA", None))
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension(
            "normkernels._C",
            sources + cuda_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link_args,
        )
    else:
        ext = CppExtension(
            "normkernels._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _ext_modules()

setup(
    name="normkernels",
    version=_version(),
    description="Fused normalization layers for convolutional networks (L2BN, SBN, BN+SBN)",
    packages=find_packages(include=["normkernels", "normkernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "test": ["pytest", "expecttest", "onnx", "onnxscript", "onnxruntime", "build"],
        "bench": ["pytest-benchmark", "matplotlib", "tqdm"],
        "study": ["scikit-learn", "matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["normkernels=normkernels.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
