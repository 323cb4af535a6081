"""Which implementations are usable, and which one a call gets.

Backends:
  "cuda"   - the C++/CUDA extension's CUDA kernels (L2BN).
  "cpp"    - the C++ extension's CPU kernels (L2BN, SBN, BN+SBN).
  "triton" - Triton kernels (SBN, BN+SBN) on CUDA tensors, or on CPU tensors under
             TRITON_INTERPRET=1 (slow; for testing the kernels without a GPU).
  "torch"  - the pure-PyTorch fallback: works on any device, and is what torch.compile sees best.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "cuda", "cpp", "triton", "torch")

# Which non-fallback backends each op family has.
_NATIVE = {"l2bn": ("cuda", "cpp"), "sbn": ("triton", "cpp")}


def _probe_extension() -> tuple[bool, bool]:
    try:
        import normkernels._C  # noqa: F401  (registers the C++ ops)
    except ImportError:
        return False, False
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("normkernels::l2bn_forward", "CUDA")
    return True, has_cuda


def _register_triton() -> bool:
    """The Triton host functions of SBN and BN+SBN become the CUDA kernels of the C++ ops
    (normkernels.triton.sbn.register_kernels; a schema mismatch raises)."""
    if not (_EXTENSION and importlib.util.find_spec("triton") is not None):
        return False
    try:
        from .triton import sbn as triton_sbn
    except ImportError as e:  # a triton install that does not import: no Triton backend, said once
        warnings.warn(f"normkernels: backend 'triton' is unavailable (importing triton failed: {e})")
        return False
    triton_sbn.register_kernels("cuda")  # a schema mismatch raises: never a kernel of another contract
    return True


# Probed once at import, so that backend choice is plain constants to torch.compile.
_EXTENSION, _EXTENSION_CUDA = _probe_extension()
_TRITON = _register_triton()
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def extension_loaded() -> bool:
    """True when normkernels._C (the C++ extension) imported."""
    return _EXTENSION


def extension_has_cuda() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _EXTENSION_CUDA


def triton_available() -> bool:
    return _TRITON


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1 at import: Triton kernels can then run (slowly) on CPU tensors."""
    return _TRITON_INTERPRET


def triton_on_cpu() -> bool:
    """The SBN ops' CPU kernels are the Triton host functions (normkernels.triton.sbn.on_cpu(),
    under TRITON_INTERPRET=1: the tests' way of running a GPU call's path on the CPU)."""
    if not (_TRITON and _TRITON_INTERPRET):
        return False
    from .triton import sbn as triton_sbn
    return triton_sbn.registered_on_cpu()


def backends() -> dict[str, bool]:
    """Which backends can run here: {"cuda", "cpp", "triton", "torch"} -> bool."""
    gpu = torch.cuda.is_available()
    return {
        "cuda": extension_has_cuda() and gpu,
        "cpp": extension_loaded(),
        "triton": triton_available() and (gpu or triton_on_cpu()),
        "torch": True,
    }


def _usable(backend: str, x: torch.Tensor) -> str | None:
    """None when `backend` can run on x, else why not."""
    dev = x.device.type
    if backend == "torch":
        return None
    if backend == "cpp":
        if not extension_loaded():
            return "the C++ extension normkernels._C is not built (pip install --no-build-isolation -e .)"
        return None if dev == "cpu" else f"backend 'cpp' runs on CPU tensors, got a {dev} tensor (use 'cuda')"
    if backend == "cuda":
        if dev != "cuda":
            return f"backend 'cuda' needs a CUDA tensor, got a {dev} tensor"
        if not extension_has_cuda():
            return "normkernels._C was built without CUDA kernels (rebuild with a CUDA torch or NORMKERNELS_FORCE_CUDA=1)"
        return None
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if dev == "cuda" or (dev == "cpu" and triton_on_cpu()):
            return None
        return (f"backend 'triton' needs a CUDA tensor, got a {dev} tensor (CPU tensors only inside "
                "normkernels.triton.sbn.on_cpu() under TRITON_INTERPRET=1)")
    raise AssertionError(backend)


def resolve(family: str, backend: str, x: torch.Tensor) -> str:
    """Turn the user's backend choice into the concrete backend for this op family and input."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    native = _NATIVE[family]
    if backend == "auto":
        for candidate in native:
            # The Triton interpreter is a test vehicle, never an automatic choice.
            if candidate == "triton" and x.device.type != "cuda":
                continue
            if _usable(candidate, x) is None:
                return candidate
        return "torch"
    if backend != "torch" and backend not in native:
        raise ValueError(f"{family} has no {backend!r} backend; choose from {('auto',) + native + ('torch',)}")
    why = _usable(backend, x)
    if why is not None:
        raise RuntimeError(f"backend {backend!r} is not usable: {why}")
    return backend
