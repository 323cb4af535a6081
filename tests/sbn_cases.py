"""Inputs and checks shared by the SBN family's tests (test_sbn_family.py, test_sbn_family_ops.py,
test_sbn_triton.py). Every tensor is made on the test's device; references run in float64 on it."""
import os

import pytest
import torch

import normkernels.ops.sbn as S

F64 = torch.float64
CI = bool(os.environ.get("CI"))
# relative error bounds against the float64 literal, per input dtype
TOL = {torch.float64: 1e-11, torch.float32: 1e-5, torch.float16: 6e-3, torch.bfloat16: 4e-2}


def native(device) -> str:
    """The backend that runs the dispatcher ops on `device`: the C++ kernels on CPU, the Triton
    kernels (registered onto the same schemas) on CUDA."""
    return "cpp" if device.type == "cpu" else "triton"


def require_native(device) -> None:
    """The dispatcher ops must exist: under CI a missing extension fails, elsewhere it skips."""
    if not S._HAS_C:
        if CI:
            pytest.fail("the C++ extension normkernels._C is not built")
        pytest.skip("the C++ extension normkernels._C is not built (under CI this fails)")


def resolve(backend: str, device) -> str:
    """"native" -> the device's dispatcher backend (checked to exist); others as given."""
    if backend == "native":
        require_native(device)
        return native(device)
    return backend


def gen(device, seed=0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def make_x(shape, dtype, device, g, shift=0.0, layout="contiguous") -> torch.Tensor:
    """x = randn + shift rounded to dtype, in the given layout ("contiguous", "channels_last", or
    "strided": every other column of a wider tensor, a non-dense view)."""
    if layout == "strided":
        wide = torch.randn(tuple(shape[:3]) + (2 * shape[3],), generator=g, device=device, dtype=F64)
        return (wide + shift).to(dtype)[..., ::2]
    x = (torch.randn(shape, generator=g, device=device, dtype=F64) + shift).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def make_params(C, device, g, dtype=torch.float32):
    w = (torch.rand(C, generator=g, device=device, dtype=F64) + 0.5).to(dtype)
    b = torch.randn(C, generator=g, device=device, dtype=F64).to(dtype)
    return w, b


def leaf(t):
    """A fresh leaf requiring grad (None stays None)."""
    return None if t is None else t.detach().clone().requires_grad_()


def grads(outputs, inputs, dy):
    """Gradients of (outputs * dy).sum() w.r.t. the inputs that are not None."""
    present = [t for t in inputs if t is not None]
    got = torch.autograd.grad(outputs, present, dy, allow_unused=False)
    it = iter(got)
    return [None if t is None else next(it) for t in inputs]


def check(name, got, ref, tol, floor=0.0):
    """max |got - ref| <= tol * max(max |ref|, floor); floor > 0 for quantities that can be
    structurally ~0 (a bias gradient whose pixels the activation masks), where the float64
    reference is itself only rounding noise."""
    assert got.shape == ref.shape, (name, tuple(got.shape), tuple(ref.shape))
    got = got.detach().to(device=ref.device, dtype=ref.dtype)
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, floor, 1e-30)
    err = (got - ref).abs().max().item() / scale if ref.numel() else 0.0
    assert err < tol, (name, err)


def expected_format(x) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
