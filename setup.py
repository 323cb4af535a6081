"""Build normkernels and its C++/CUDA extension normkernels._C.

Install with `pip install --no-build-isolation -e .` so the build uses the torch already
installed (an isolated build would fetch torch again).
"""
from setuptools import find_packages, setup

# EXT_MODULES_PLACEHOLDER (the extension build is defined below)
ext_modules = []
cmdclass = {}

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
)
