"""Build normkernels and its C++/CUDA extension normkernels._C.

Install with `pip install --no-build-isolation -e .` so the build uses the torch already
installed (an isolated build would fetch torch again).

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

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _ext_modules():
    if _env_flag("NORMKERNELS_NO_EXT"):
        return [], {}
    import torch
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
    version="0.1.0",
    description="Fused normalization layers for convolutional networks (L2BN, SBN, BN+SBN)",
    packages=find_packages(include=["normkernels", "normkernels.*"]),
    python_requires=">=3.10",
    install_requires=["numpy"],
    extras_require={
        "test": ["pytest", "expecttest"],
        "bench": ["pytest-benchmark", "matplotlib", "tqdm"],
        "study": ["scikit-learn", "matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["normkernels=normkernels.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
