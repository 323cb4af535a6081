"""SBN op (normkernels/ops/sbn.py), pure-PyTorch backend: both algorithms against the literal
float64 definition (rfft2 -> complex mean -> modulus variance -> normalize/affine -> irfft2)."""

import os

import pytest
import torch

from references import max_rel_error as rel
from references import sbn_reference as literal_sbn
from normkernels.ops import sbn as S

EPS = 1e-5






def make(shape, dtype, gen, shift=0.0, affine=True, scale=1.0):
    C = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)
    if not affine:
        return x, None, None
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(torch.float32)
    b = torch.randn(C, generator=gen, dtype=torch.float64).to(torch.float32)
    return x, w, b


def run_and_compare(shape, algorithm, backend, dtype=torch.float32, shift=0.0, affine=True,
                    eval_stats=False, tol=2e-5, seed=0, channels_last=False, device="cpu"):
    """The op on `device` against the float64 literal definition on the same (rounded) values."""
    gen = torch.Generator().manual_seed(seed)
    x, w, b = make(shape, dtype, gen, shift, affine)
    C = shape[1]
    mean = var = None
    if eval_stats:
        mean = torch.randn(C, generator=gen, dtype=torch.complex64) * 3
        var = torch.rand(C, generator=gen) * 5 + 0.5
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    xd = x.to(device)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    xx = xd.clone().requires_grad_()
    ww = w.to(device, copy=True).requires_grad_() if affine else None
    bb = b.to(device, copy=True).requires_grad_() if affine else None
    md = None if mean is None else mean.to(device)
    vd = None if var is None else var.to(device)
    y, bm, bv = S.spectral_batch_norm(xx, ww, bb, md, vd, EPS, algorithm, backend)
    assert y.dtype == x.dtype and y.shape == x.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    stat_real = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert bm.dtype == stat_real.to_complex() and bv.dtype == stat_real and bm.shape == (C,)
    (y.double() * dy.to(device)).sum().backward()

    # reference on exactly the same (rounded) input values, in float64
    xr = x.double().contiguous().requires_grad_()
    wr = w.double().requires_grad_() if affine else None
    br = b.double().requires_grad_() if affine else None
    yr, mr, vr = literal_sbn(xr, wr, br,
                             None if mean is None else mean.to(torch.complex128),
                             None if var is None else var.double())
    (yr * dy).sum().backward()

    assert rel(y, yr) < tol, ("y", rel(y, yr))
    assert rel(bm, mr.detach()) < tol, ("mean", rel(bm, mr.detach()))
    assert rel(bv, vr.detach()) < tol, ("var", rel(bv, vr.detach()))
    assert rel(xx.grad, xr.grad) < tol, ("dx", rel(xx.grad, xr.grad))
    if affine:
        assert ww.grad.dtype == ww.dtype and bb.grad.dtype == bb.dtype
        assert rel(ww.grad, wr.grad) < tol, ("dw", rel(ww.grad, wr.grad))
        assert rel(bb.grad, br.grad) < tol, ("db", rel(bb.grad, br.grad))
    if eval_stats:
        assert torch.equal(bm.cpu(), mean) and torch.equal(bv.cpu(), var)


# (algorithm, backend): the Parseval path with the torch and C++ passes, the literal FFT path.
PATHS = [("parseval", "torch"),
         pytest.param("parseval", "cpp", marks=pytest.mark.skipif(not S._CPP_SBN and not os.environ.get("CI"), reason="extension not built")),
         ("fft", "torch")]

SHAPES = [
    (3, 2, 4, 6),    # H, W even
    (2, 3, 5, 7),    # H, W odd
    (2, 2, 6, 5),    # non-square, W odd
    (2, 2, 3, 8),    # non-square, W even
    (3, 1, 4, 4),    # C = 1
    (2, 2, 1, 5),    # H = 1
    (3, 2, 4, 1),    # W = 1
    (3, 2, 3, 2),    # W = 2 (Pr and the mean's constant cancel at (0, 0))
    (4, 2, 1, 1),    # H = W = 1
]


@pytest.mark.parametrize("algorithm,backend", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_train_matches_literal(shape, algorithm, backend):
    run_and_compare(shape, algorithm, backend)


@pytest.mark.parametrize("algorithm,backend", PATHS)
@pytest.mark.parametrize("shape", [(3, 2, 4, 6), (2, 3, 5, 7), (3, 2, 4, 1), (2, 2, 1, 5),
                                   (3, 2, 3, 2)])
def test_large_mean_float32(shape, algorithm, backend):
    # x = 1000 + randn in float32 must match the float64 reference on the same values
    run_and_compare(shape, algorithm, backend, shift=1000.0, tol=2e-5, seed=1)


@pytest.mark.parametrize("algorithm,backend", PATHS)
@pytest.mark.parametrize("shape", [(3, 2, 4, 6), (2, 3, 5, 7)])
def test_eval_given_stats(shape, algorithm, backend):
    run_and_compare(shape, algorithm, backend, eval_stats=True, seed=2)


@pytest.mark.parametrize("algorithm,backend", PATHS)
@pytest.mark.parametrize("eval_stats", [False, True])
def test_affine_none(algorithm, backend, eval_stats):
    run_and_compare((3, 2, 4, 5), algorithm, backend, affine=False, eval_stats=eval_stats, seed=3)


@pytest.mark.parametrize("algorithm,backend", PATHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_half_dtypes(algorithm, backend, dtype, tol):
    run_and_compare((3, 2, 4, 6), algorithm, backend, dtype=dtype, tol=tol, seed=4)


@pytest.mark.parametrize("algorithm,backend", PATHS)
def test_channels_last(algorithm, backend):
    run_and_compare((2, 3, 4, 5), algorithm, backend, channels_last=True, seed=5)


@pytest.mark.parametrize("algorithm", ["parseval", "fft"])
def test_strided_view_and_expanded_grad(algorithm):
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(3, 4, 5, 12, generator=gen, dtype=torch.float64).requires_grad_()
    x = base[:, 1:3, :, ::2]             # non-contiguous view goes into the op
    assert not x.is_contiguous()
    w = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(2, generator=gen, dtype=torch.float64)
    y, _, _ = S.spectral_batch_norm(x, w, b, None, None, EPS, algorithm, "torch")
    y.sum().backward()                   # expanded (stride 0) dy
    xr = x.detach().clone().requires_grad_()
    yr, _, _ = literal_sbn(xr, w, b)
    yr.sum().backward()
    assert rel(y, yr) < 1e-12
    assert (base.grad[:, 1:3, :, ::2] - xr.grad).abs().max() < 1e-10
    assert base.grad[:, 0].abs().max() == 0 and base.grad[:, :, :, 1::2].abs().max() == 0


def test_parseval_equals_fft_float64():
    gen = torch.Generator().manual_seed(7)
    x, w, b = make((2, 3, 6, 7), torch.float64, gen)
    y1 = S.spectral_batch_norm(x, w.double(), b.double(), None, None, EPS, "parseval", "torch")
    y2 = S.spectral_batch_norm(x, w.double(), b.double(), None, None, EPS, "fft", "torch")
    for a, r in zip(y1, y2):
        assert rel(a, r.to(a.dtype)) < 1e-6
    assert rel(y1[0], y2[0]) < 1e-12


@pytest.mark.parametrize("algorithm,backend", PATHS)
@pytest.mark.parametrize("shape", [(2, 2, 3, 4), (2, 1, 3, 3), (3, 1, 1, 2)])
@pytest.mark.parametrize("eval_stats", [False, True])
def test_gradcheck_float64(algorithm, backend, shape, eval_stats):
    gen = torch.Generator().manual_seed(8)
    C = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(C, generator=gen, dtype=torch.float64).requires_grad_()
    mean = torch.randn(C, generator=gen, dtype=torch.complex64) if eval_stats else None
    var = torch.rand(C, generator=gen) + 0.5 if eval_stats else None

    def f(x, w, b):
        return S.spectral_batch_norm(x, w, b, mean, var, EPS, algorithm, backend)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_row_constants_match_definitions():
    for W in [1, 2, 5, 6, 9]:
        H = 3
        Wr = W // 2 + 1
        PD, PP = S._row_consts(W, torch.device("cpu"), torch.float64)
        ones = torch.ones(H, Wr, dtype=torch.complex128)
        Pr = torch.fft.irfft2(ones, s=(H, W))
        Pi = torch.fft.irfft2(1j * ones, s=(H, W))
        assert torch.allclose(PP[0], Pr[0], atol=1e-14) and torch.allclose(PP[1], Pi[0], atol=1e-14)
        assert Pr[1:].abs().max() < 1e-14 and Pi[1:].abs().max() < 1e-14
        w = torch.arange(W, dtype=torch.float64)
        l = torch.arange(Wr, dtype=torch.float64)
        D = torch.exp(-2j * torch.pi * l[:, None] * w[None, :] / W).sum(0)
        assert torch.allclose(PD[0], D.real, atol=1e-12) and torch.allclose(PD[1], D.imag, atol=1e-12)


def test_stats_from_sums_is_exact_for_shift():
    # the shifted finalize gives the same statistics whatever K is
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 4, 6, generator=gen, dtype=torch.float64) + 50
    PD, _ = S._row_consts(6, x.device, torch.float64)
    outs = []
    for K in [torch.zeros(3, dtype=torch.float64), x[0, :, 0, 0], torch.full((3,), -7.5, dtype=torch.float64)]:
        sums = S._torch_stats(x, K, PD)
        outs.append(torch.stack(S.spectral_stats_from_sums(sums, K, 2, 4, 6)))
    _, m, v = literal_sbn(x, None, None)
    ref = torch.stack([m.real, m.imag, v])
    for o in outs:
        assert rel(o, ref) < 1e-12


def test_invalid_arguments():
    x = torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError):
        S.spectral_batch_norm(x, None, None, None, None, EPS, "dct", "torch")
    with pytest.raises(ValueError):
        S.spectral_batch_norm(x, None, None, torch.zeros(2, dtype=torch.complex64), None, EPS,
                              "parseval", "torch")
    with pytest.raises(ValueError):
        S.spectral_batch_norm(x[0], None, None, None, None, EPS, "parseval", "torch")
    with pytest.raises(ValueError):
        S.spectral_batch_norm(x, None, None, None, None, EPS, "parseval", "gpu")
    with pytest.raises(TypeError):
        S.spectral_batch_norm(x.to(torch.int32), None, None, None, None, EPS, "parseval", "torch")


@pytest.mark.parametrize("eval_stats", [False, True])
def test_opcheck(eval_stats):
    gen = torch.Generator().manual_seed(10)
    x, w, b = make((2, 3, 4, 5), torch.float32, gen)
    mean = torch.randn(3, 2, generator=gen) if eval_stats else None
    var = torch.rand(3, generator=gen) + 0.5 if eval_stats else None
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    torch.library.opcheck(S.sbn_forward, (x, w, b, mean, var, EPS, "torch"))
    torch.library.opcheck(S.sbn_forward, (x, None, None, mean, var, EPS, "torch"))
    torch.library.opcheck(S.sbn_fft_forward, (x, w, b, mean, var, EPS, "torch"))
    xd = x.detach()
    _, m, v, saved = S.sbn_forward(xd, w.detach(), b.detach(), mean, var, EPS, "torch")
    dy = torch.randn(xd.shape, generator=gen)
    torch.library.opcheck(S.sbn_backward, (dy, xd, w.detach(), saved, not eval_stats, "torch"))
    torch.library.opcheck(S.sbn_fft_backward,
                          (dy, xd, w.detach(), m, v, EPS, not eval_stats, "torch"))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(11)
    x, w, b = make((2, 3, 4, 5), torch.float32, gen)
    mean = torch.randn(3, generator=gen, dtype=torch.complex64)
    var = torch.rand(3, generator=gen) + 0.5

    def fn(x, w, b):
        y1, m1, v1 = S.spectral_batch_norm(x, w, b, None, None, EPS, "parseval", "torch")
        y2, m2, v2 = S.spectral_batch_norm(x, w, b, None, None, EPS, "fft", "torch")
        y3, _, _ = S.spectral_batch_norm(x, w, b, mean, var, EPS, "parseval", "torch")
        return (y1 * y2).sum() + (y3 * y3).sum(), m1, v1

    cf = torch.compile(fn, fullgraph=True, backend="inductor")
    outs = []
    for f in (cf, fn):
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        loss, m, v = f(xx, ww, bb)
        loss.backward()
        outs.append((loss.detach(), m, v, xx.grad, ww.grad, bb.grad))
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
