"""C++ CPU SBN pass ops (csrc/sbn.cpp, csrc/cpu/sbn_cpu.cpp) against the torch passes of
normkernels/ops/sbn.py (the definition of the four passes) and against those passes evaluated
in float64. Error bounds are scaled by the same pass evaluated on absolute values (|t|, |dy|,
|coef|, |P|), i.e. by the magnitude of the terms that are summed."""

import os

import pytest
import torch

import normkernels.ops.sbn as S

# The test command (make test) always builds the extension: skip only on a pure-PyTorch install,
# never under CI (where a missing build must fail).
pytestmark = pytest.mark.skipif(not S._CPP_SBN and not os.environ.get("CI"),
                                reason="C++ extension with the SBN ops not built")

F64 = torch.float64
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(3, 5, 4, 8), (2, 3, 5, 7), (2, 3, 4, 1), (2, 3, 1, 6), (4, 1, 3, 5), (2, 70, 3, 4)]


def ops():
    return torch.ops.normkernels


def _acc(dtype):
    return F64 if dtype == F64 else torch.float32


def _eps(dtype):
    return torch.finfo(dtype).eps


def make(shape, dtype, gen, shift=1000.0, channels_last=False):
    x = (torch.randn(shape, generator=gen, dtype=F64) + shift).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def consts(x):
    acc = _acc(x.dtype)
    PD, PP = S._row_consts(x.shape[3], x.device, acc)
    K = S._shift(x).to(acc)
    return acc, K, PD, PP


def coefs(C, K, k, gen, acc):
    cf = torch.randn(C, k, generator=gen, dtype=F64)
    cf[:, 0] = K.to(F64)
    return cf.to(acc)


def check_sums(got, same, ref64, mag, acc):
    """got: C++ result, same: torch pass in the same dtype, ref64: torch pass in float64,
    mag: torch pass on absolute values (float64)."""
    assert got.dtype == acc and got.shape == ref64.shape
    tol = (1e-12 if acc == F64 else 2e-5) * mag + 1e-30
    assert bool(((got.to(F64) - ref64).abs() <= tol).all()), (got, ref64)
    assert bool(((got.to(F64) - same.to(F64)).abs() <= 2 * tol).all())


def check_out(got, same, ref64, mag, x, W, acc):
    assert got.dtype == x.dtype and got.shape == x.shape
    assert got.stride() == torch.empty_like(x).stride()
    out_eps = _eps(x.dtype)
    tol = 2 * out_eps * ref64.abs() + (4 * W + 8) * _eps(acc) * mag + 1e-300
    assert bool(((got.to(F64) - ref64).abs() <= tol).all())
    # the torch pass rounds the same value: at most one rounding of the output dtype apart
    assert bool(((got.to(F64) - same.to(F64)).abs() <= 2 * tol).all())


def stats_case(x, gen):
    acc, K, PD, PP = consts(x)
    got = ops().sbn_stats(x, K, PD)
    same = S._torch_stats(x, K, PD)
    t64 = x.to(F64)
    ref = S._torch_stats(t64, K.to(F64), PD.to(F64))
    mag = S._torch_stats((t64 - K.to(F64).view(1, -1, 1, 1)).abs(), torch.zeros_like(K, dtype=F64),
                         PD.to(F64).abs())
    check_sums(got, same, ref, mag, acc)


def grad_case(x, dy, gen):
    acc, K, PD, PP = consts(x)
    got = ops().sbn_grad_stats(dy, x, K, PP)
    same = S._torch_grad_stats(dy, x, K, PP)
    ref = S._torch_grad_stats(dy.to(F64), x.to(F64), K.to(F64), PP.to(F64))
    t = (x.to(F64) - K.to(F64).view(1, -1, 1, 1)).abs()
    mag = S._torch_grad_stats(dy.to(F64).abs(), t, torch.zeros_like(K, dtype=F64),
                              PP.to(F64).abs())
    check_sums(got, same, ref, mag, acc)


def fwd_case(x, gen):
    acc, K, PD, PP = consts(x)
    C, W = x.shape[1], x.shape[3]
    cf = coefs(C, K, 5, gen, acc)
    got = ops().sbn_forward_apply(x, cf, PP)
    same = S._torch_forward_apply(x, cf, PP)
    ref = S._torch_forward_apply(x.to(F64), cf.to(F64), PP.to(F64))
    t = (x.to(F64) - K.to(F64).view(1, -1, 1, 1)).abs()
    ca = cf.to(F64).abs()
    ca[:, 0] = 0
    mag = S._torch_forward_apply(t, ca, PP.to(F64).abs()) + ca[:, 2].view(1, -1, 1, 1)
    check_out(got, same, ref, mag, x, W, acc)


def bwd_case(x, dy, gen, need_row):
    acc, K, PD, PP = consts(x)
    C, W = x.shape[1], x.shape[3]
    cf = coefs(C, K, 8, gen, acc)
    got = ops().sbn_backward_apply(dy, x, cf, PD, need_row)
    same = S._torch_backward_apply(dy, x, cf, PD, need_row)
    ref = S._torch_backward_apply(dy.to(F64), x.to(F64), cf.to(F64), PD.to(F64), need_row)
    t = (x.to(F64) - K.to(F64).view(1, -1, 1, 1)).abs()
    ca = cf.to(F64).abs()
    ca[:, 0] = 0
    # absolute values: the alternating sum A is bounded by the row sum of |t| (sgn -> 1)
    tt = t.clone()
    mag = S._torch_backward_apply(dy.to(F64).abs(), tt, ca, PD.to(F64).abs(), False)
    if need_row:
        mag = mag + (ca[:, 3] + ca[:, 4]).view(1, -1, 1, 1) * t.sum(3, keepdim=True)
    check_out(got, same, ref, mag, x, W, acc)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_passes_match_torch(dtype, channels_last):
    gen = torch.Generator().manual_seed(1 + DTYPES.index(dtype) + 10 * channels_last)
    for shape in SHAPES:
        for shift in (0.0, 1000.0):
            x = make(shape, dtype, gen, shift, channels_last)
            dy = make(shape, dtype, gen, 0.0, channels_last)
            stats_case(x, gen)
            grad_case(x, dy, gen)
            fwd_case(x, gen)
            bwd_case(x, dy, gen, True)
            bwd_case(x, dy, gen, False)


def test_large_mean_stats_are_stable():
    """float32, x = 1000 + randn: the shifted sums give the batch statistics of SBN to ~1e-5."""
    gen = torch.Generator().manual_seed(7)
    for cl in (False, True):
        x = make((4, 6, 8, 10), torch.float32, gen, 1000.0, cl)
        acc, K, PD, PP = consts(x)
        N, C, H, W = x.shape
        got = S.spectral_stats_from_sums(ops().sbn_stats(x, K, PD), K.to(F64), N, H, W)
        X = torch.fft.rfft2(x.to(F64))
        mu = X.mean((0, 2, 3))
        var = (X - mu.view(1, -1, 1, 1)).abs().pow(2).mean((0, 2, 3))
        torch.testing.assert_close(got[0], mu.real, rtol=1e-6, atol=1e-3)
        torch.testing.assert_close(got[1], mu.imag, rtol=1e-6, atol=1e-3)
        torch.testing.assert_close(got[2], var, rtol=1e-4, atol=1e-4)


def test_mixed_and_other_layouts():
    gen = torch.Generator().manual_seed(3)
    base = make((3, 6, 5, 9), torch.float32, gen, 1000.0)
    dyb = make((3, 6, 5, 9), torch.float32, gen, 0.0)
    cl = torch.channels_last
    cases = [
        (base, dyb.contiguous(memory_format=cl)),                  # NCHW x, channels_last dy
        (base.contiguous(memory_format=cl), dyb),                  # channels_last x, NCHW dy
        (base[:, :, :, 1:8], dyb[:, :, :, 1:8]),                   # non-contiguous views
        (base.permute(0, 1, 3, 2), dyb.permute(0, 1, 3, 2)),       # dense, other layout
        (base.transpose(0, 1), dyb.transpose(0, 1)),               # dense, N and C swapped
    ]
    for x, dy in cases:
        stats_case(x, gen)
        grad_case(x, dy, gen)
        fwd_case(x, gen)
        bwd_case(x, dy, gen, True)
    # dy in another dtype is cast to x's dtype
    x = base.to(torch.float16)
    acc, K, PD, PP = consts(x)
    torch.testing.assert_close(ops().sbn_grad_stats(dyb, x, K, PP),
                               ops().sbn_grad_stats(dyb.to(torch.float16), x, K, PP))


def test_empty_batch():
    x = torch.randn(0, 4, 3, 6)
    acc, K, PD, PP = consts(x)
    assert torch.equal(ops().sbn_stats(x, K, PD), torch.zeros(4, 6))
    assert torch.equal(ops().sbn_grad_stats(x, x, K, PP), torch.zeros(4, 4))
    assert ops().sbn_forward_apply(x, torch.zeros(4, 5), PP).shape == x.shape
    assert ops().sbn_backward_apply(x, x, torch.zeros(4, 8), PD, True).shape == x.shape


def test_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(5)
    old = torch.get_num_threads()
    try:
        for cl in (False, True):
            x = make((6, 130, 9, 12), torch.float32, gen, 3.0, cl)
            dy = make((6, 130, 9, 12), torch.float32, gen, 0.0, cl)
            acc, K, PD, PP = consts(x)
            cf = coefs(x.shape[1], K, 8, gen, acc)
            outs = []
            for n in (1, max(2, old)):
                torch.set_num_threads(n)
                outs.append((ops().sbn_stats(x, K, PD), ops().sbn_grad_stats(dy, x, K, PP),
                             ops().sbn_backward_apply(dy, x, cf, PD, True)))
            for a, b in zip(*outs):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(old)


def test_bad_arguments():
    x = torch.randn(2, 3, 4, 5)
    acc, K, PD, PP = consts(x)
    with pytest.raises(ValueError):
        ops().sbn_stats(x[0], K, PD)
    with pytest.raises(ValueError):
        ops().sbn_stats(x, K[:2], PD)
    with pytest.raises(ValueError):
        ops().sbn_stats(x, K, PD[:, :4])
    with pytest.raises(ValueError):
        ops().sbn_forward_apply(x, torch.zeros(3, 4), PP)
    with pytest.raises(ValueError):
        ops().sbn_backward_apply(x[:1], x, torch.zeros(3, 8), PD, True)
    with pytest.raises(TypeError):
        ops().sbn_stats(x.to(torch.int32), K, PD)


def test_opcheck():
    gen = torch.Generator().manual_seed(11)
    for dtype, cl in [(torch.float32, False), (torch.float32, True), (torch.float64, False),
                      (torch.bfloat16, True)]:
        x = make((2, 3, 4, 5), dtype, gen, 2.0, cl)
        dy = make((2, 3, 4, 5), dtype, gen, 0.0, cl)
        acc, K, PD, PP = consts(x)
        c5 = coefs(3, K, 5, gen, acc)
        c8 = coefs(3, K, 8, gen, acc)
        torch.library.opcheck(ops().sbn_stats.default, (x, K, PD))
        torch.library.opcheck(ops().sbn_grad_stats.default, (dy, x, K, PP))
        torch.library.opcheck(ops().sbn_forward_apply.default, (x, c5, PP))
        torch.library.opcheck(ops().sbn_backward_apply.default, (dy, x, c8, PD, True))
        torch.library.opcheck(ops().sbn_backward_apply.default, (dy, x, c8, PD, False))
