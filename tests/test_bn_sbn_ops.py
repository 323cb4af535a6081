"""BN followed by SBN, fused (normkernels.ops.sbn.batch_norm_sbn), against float64
F.batch_norm followed by the literal SBN (rfft2 -> complex mean -> modulus variance ->
normalize/affine -> irfft2). Backends "torch" and "triton" (interpreter on CPU)."""

import os

import pytest
import torch
import torch.nn.functional as F

from references import bn_sbn_reference
from references import max_rel_error as rel
from normkernels.ops import sbn as S

EPS_BN, EPS_SBN = 1e-5, 1e-5


def _triton_ok():
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


BACKENDS = ["torch",
            pytest.param("cpp", marks=pytest.mark.skipif(not S._CPP_SBN and not os.environ.get("CI"), reason="extension not built")),
            pytest.param("triton", marks=pytest.mark.skipif(
                not _triton_ok(), reason="triton needs a GPU or TRITON_INTERPRET=1"))]


def reference(x, gb, bb, gs, bs, stats=None):
    return bn_sbn_reference(x, gb, bb, gs, bs, stats, EPS_BN, EPS_SBN)




def run(shape, backend, dtype=torch.float32, shift=0.0, scale=1.0, affine=True,
        eval_stats=False, tol=2e-5, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)
    params = [torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen),
              torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)]
    if not affine:
        params = [None] * 4
    stats = None
    if eval_stats:
        stats = (torch.randn(C, generator=gen) + shift, torch.rand(C, generator=gen) * scale ** 2 + 0.5,
                 torch.randn(C, generator=gen, dtype=torch.complex64) * 3,
                 torch.rand(C, generator=gen) * 5 + 0.5)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    xx = x.clone()
    if channels_last:
        xx = xx.contiguous(memory_format=torch.channels_last)
    xx.requires_grad_()
    pp = [None if p is None else p.clone().requires_grad_() for p in params]
    st = (None,) * 4 if stats is None else stats
    y, bm, bv, sm, sv = S.batch_norm_sbn(xx, pp[0], pp[1], st[0], st[1], pp[2], pp[3], st[2],
                                         st[3], EPS_BN, EPS_SBN, backend)
    assert y.dtype == x.dtype and y.shape == x.shape
    stat_real = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert bm.dtype == stat_real and bv.dtype == stat_real
    assert sm.dtype == stat_real.to_complex() and sv.dtype == stat_real
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    (y.double() * dy).sum().backward()

    xr = x.double().requires_grad_()
    pr = [None if p is None else p.double().requires_grad_() for p in params]
    sr = None if stats is None else (stats[0].double(), stats[1].double(),
                                     stats[2].to(torch.complex128), stats[3].double())
    yr, bmr, bvr, smr, svr = reference(xr, *pr, stats=sr)
    (yr * dy).sum().backward()
    checks = [("y", y, yr), ("bn_mean", bm, bmr.detach()), ("bn_var", bv, bvr.detach()),
              ("sbn_mean", sm, smr.detach()), ("sbn_var", sv, svr.detach()),
              ("dx", xx.grad, xr.grad)]
    if affine:
        checks += [(f"d{n}", p.grad, q.grad) for n, p, q in
                   zip(("bn_w", "bn_b", "sbn_w", "sbn_b"), pp, pr)]
    for name, a, r in checks:
        assert rel(a, r) < tol, (name, rel(a, r))


SHAPES = [(3, 2, 4, 6), (2, 3, 5, 7), (2, 1, 6, 5), (2, 2, 1, 5), (3, 2, 4, 1), (3, 2, 3, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_train_matches_reference(shape, backend):
    run(shape, backend, scale=2.0, shift=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 2, 4, 6), (2, 2, 5, 7), (3, 2, 3, 2)])
def test_large_mean_float32(shape, backend):
    run(shape, backend, shift=1000.0, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [0.0, 1000.0])
def test_eval_given_stats(backend, shift):
    run((3, 2, 4, 5), backend, eval_stats=True, shift=shift, seed=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eval_stats", [False, True])
def test_affine_none(backend, eval_stats):
    run((3, 2, 4, 5), backend, affine=False, eval_stats=eval_stats, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_half_dtypes(backend, dtype, tol):
    run((3, 2, 4, 6), backend, dtype=dtype, tol=tol, seed=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last(backend):
    run((2, 3, 4, 5), backend, channels_last=True, seed=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eval_stats", [False, True])
def test_gradcheck_float64(backend, eval_stats):
    gen = torch.Generator().manual_seed(6)
    shape = (2, 2, 3, 4) if backend == "torch" else (2, 2, 2, 3)
    C = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
    ps = [(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
          for _ in range(4)]
    st = (None,) * 4
    if eval_stats:
        st = (torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5,
              torch.randn(C, generator=gen, dtype=torch.complex64), torch.rand(C, generator=gen) + 0.5)

    def f(x, gb, bb, gs, bs):
        return S.batch_norm_sbn(x, gb, bb, st[0], st[1], gs, bs, st[2], st[3], EPS_BN, EPS_SBN,
                                backend)[0]

    assert torch.autograd.gradcheck(f, (x, *ps))


def test_matches_separate_bn_then_sbn_ops():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, 6, generator=gen, dtype=torch.float64) * 3 + 2
    gb, bb, gs, bs = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5 for _ in range(4))
    y, *_ = S.batch_norm_sbn(x, gb, bb, None, None, gs, bs, None, None, EPS_BN, EPS_SBN, "torch")
    z = F.batch_norm(x, None, None, gb, bb, True, 0.0, EPS_BN)
    y2, *_ = S.spectral_batch_norm(z, gs, bs, None, None, EPS_SBN, "parseval", "torch")
    assert rel(y, y2) < 1e-12


def test_invalid_arguments():
    x = torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError):
        S.batch_norm_sbn(x, None, None, torch.zeros(2), None, None, None, None, None,
                         EPS_BN, EPS_SBN, "torch")


@pytest.mark.parametrize("eval_stats", [False, True])
def test_opcheck(eval_stats):
    gen = torch.Generator().manual_seed(8)
    C = 3
    x = torch.randn(2, C, 4, 5, generator=gen)
    ps = [torch.rand(C, generator=gen) + 0.5 for _ in range(4)]
    st = (None,) * 4
    if eval_stats:
        st = (torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5,
              torch.randn(C, 2, generator=gen), torch.rand(C, generator=gen) + 0.5)
    args = (x.requires_grad_(), ps[0].requires_grad_(), ps[1], st[0], st[1],
            ps[2].requires_grad_(), ps[3], st[2], st[3], EPS_BN, EPS_SBN, "torch")
    torch.library.opcheck(S.bnsbn_forward, args)
    torch.library.opcheck(S.bnsbn_forward, (x, None, None, st[0], st[1], None, None, st[2],
                                            st[3], EPS_BN, EPS_SBN, "torch"))
    out = S.bnsbn_forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    dy = torch.randn(x.shape, generator=gen)
    torch.library.opcheck(S.bnsbn_backward, (dy, x.detach(), ps[0].detach(), ps[2].detach(),
                                             out[5], not eval_stats, "torch"))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(9)
    C = 3
    x = torch.randn(2, C, 4, 5, generator=gen) + 10
    ps = [torch.rand(C, generator=gen) + 0.5 for _ in range(4)]

    def fn(x, gb, bb, gs, bs):
        y, bm, bv, sm, sv = S.batch_norm_sbn(x, gb, bb, None, None, gs, bs, None, None,
                                             EPS_BN, EPS_SBN, "torch")
        return (y * y.flip(-1)).sum(), bm, bv, sm, sv

    cf = torch.compile(fn, fullgraph=True)
    outs = []
    for f in (cf, fn):
        args = [t.clone().requires_grad_() for t in (x, *ps)]
        loss, *stats = f(*args)
        loss.backward()
        outs.append([loss.detach(), *stats, *(a.grad for a in args)])
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
