"""normkernels::running_stats_update_ (csrc/running_stats.cpp) and its torch fallback
(normkernels/ops/running_stats.py), on every device present."""
import os

import pytest
import torch

from normkernels.ops import running_stats as R


def _op(device):
    if not R._EXT:
        if os.environ.get("CI"):
            pytest.fail("C++ extension normkernels._C not built under CI")
        pytest.skip("C++ extension not built")
    if device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "normkernels::running_stats_update_", "CUDA"):
        pytest.fail("normkernels._C was built without its CUDA kernels on a CUDA machine")
    return torch.ops.normkernels.running_stats_update_


def _buffers(device, dtype, c=5, complex_=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    rm = torch.randn(c, 2 if complex_ else 1, generator=g, device=device).to(dtype).squeeze(-1)
    if complex_:
        rm = torch.view_as_complex(rm.float().contiguous()).to(torch.complex128 if dtype == torch.float64
                                                               else torch.complex64)
    rv = (torch.rand(c, generator=g, device=device) + 0.5).to(dtype)
    bm = torch.randn((c, 2) if complex_ else (c,), generator=g, device=device)
    bv = torch.rand(c, generator=g, device=device) + 0.5
    return rm, rv, bm, bv


def _expected(rm, rv, n, bm, bv, momentum, unbias):
    """float64 formula: f = momentum, or 1 / n (n after the increment)."""
    f = momentum if momentum >= 0 else 1.0 / n
    rmr = torch.view_as_real(rm) if rm.is_complex() else rm
    return (1 - f) * rmr.double() + f * bm.double(), (1 - f) * rv.double() + f * unbias * bv.double()


# complex buffers exist as complex64 / complex128 only
BUFFERS = [(torch.float32, False), (torch.float16, False), (torch.bfloat16, False), (torch.float64, False),
           (torch.float32, True), (torch.float64, True)]


@pytest.mark.parametrize("dtype,complex_", BUFFERS, ids=lambda v: str(v))
@pytest.mark.parametrize("momentum", [0.1, -1.0], ids=["momentum", "cumulative"])
def test_update_matches_formula_and_fallback(device, dtype, momentum, complex_):
    op = _op(device)
    rm, rv, bm, bv = _buffers(device, dtype, complex_=complex_)
    nbt = torch.tensor(4, device=device)
    a = [rm.clone(), rv.clone(), nbt.clone()]
    b = [rm.clone(), rv.clone(), nbt.clone()]
    op(a[0], a[1], a[2], bm, bv, momentum, 1.25)
    R.running_stats_update_torch(b[0], b[1], b[2], bm, bv, momentum, 1.25)
    assert a[2].item() == 5 and b[2].item() == 5
    em, ev = _expected(rm, rv, 5, bm, bv, momentum, 1.25)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    for got in (a, b):
        gm = torch.view_as_real(got[0]) if got[0].is_complex() else got[0]
        assert got[0].dtype == rm.dtype and got[1].dtype == rv.dtype
        torch.testing.assert_close(gm.double(), em, rtol=tol, atol=tol)
        torch.testing.assert_close(got[1].double(), ev, rtol=tol, atol=tol)
    # C++ and fallback: the same arithmetic
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_cumulative_average_over_steps(device):
    """momentum < 0: after k updates the buffers hold the plain average of the k batches."""
    op = _op(device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    nbt = torch.tensor(0, device=device)
    batches = [(torch.randn(3, device=device), torch.rand(3, device=device)) for _ in range(4)]
    for bm, bv in batches:
        op(rm, rv, nbt, bm, bv, -1.0, 1.0)
    assert nbt.item() == 4
    torch.testing.assert_close(rm, torch.stack([b[0] for b in batches]).mean(0))
    torch.testing.assert_close(rv, torch.stack([b[1] for b in batches]).mean(0))


def test_without_num_batches_tracked(device):
    op = _op(device)
    rm, rv, bm, bv = _buffers(device, torch.float32)
    em, ev = _expected(rm, rv, 1, bm, bv, 0.3, 2.0)
    op(rm, rv, None, bm, bv, 0.3, 2.0)
    torch.testing.assert_close(rm.double(), em)
    torch.testing.assert_close(rv.double(), ev)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        op(rm, rv, None, bm, bv, -1.0, 1.0)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        R.running_stats_update_torch(rm, rv, None, bm, bv, -1.0, 1.0)
    with pytest.raises(ValueError, match="batch_mean"):
        op(rm, rv, None, bm[:-1], bv, 0.1, 1.0)


def test_opcheck_and_compile(device):
    op = _op(device)
    rm, rv, bm, bv = _buffers(device, torch.float32)
    nbt = torch.tensor(2, device=device)
    torch.library.opcheck(op.default, (rm, rv, nbt, bm, bv, 0.1, 1.0))
    torch.library.opcheck(op.default, (rm, rv, nbt, bm, bv, -1.0, 1.0))
    torch._dynamo.reset()

    def step(rm, rv, nbt, bm, bv):
        op(rm, rv, nbt, bm, bv, 0.1, 1.5)

    a = [rm.clone(), rv.clone(), nbt.clone()]
    b = [rm.clone(), rv.clone(), nbt.clone()]
    torch.compile(step, fullgraph=True, backend="aot_eager")(*a, bm, bv)
    step(*b, bm, bv)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
