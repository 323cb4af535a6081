"""L2BN op (normkernels/ops/l2bn.py + the C++ passes) against float64 references.

Reference: F.batch_norm(F.normalize(x.flatten(1)).view_as(x) [* sqrt(D) if rescale], ...) in
float64 through autograd. Both backends: "cpp" (C++ extension passes) and "torch" (torch-op
passes); the "cpp" cases fail (not skip) under CI=1 when the extension is not built.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from normkernels.ops import l2bn as L

BACKENDS = [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(not L._EXT and not os.environ.get("CI"),
                                                 reason="C++ extension not built")),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def reference(x, weight, bias, mean, var, eps=1e-5, l2_eps=1e-12, rescale=False):
    """float64 literal definition: returns (y, batch_mean, batch_var)."""
    x = x.double()
    u = F.normalize(x.flatten(1), dim=1, eps=l2_eps).view_as(x)
    if rescale:
        u = u * math.sqrt(x[0].numel())
    dims = [0] + list(range(2, x.dim()))
    bm = u.mean(dims)
    bv = u.var(dims, unbiased=False)
    training = mean is None
    y = F.batch_norm(u, None if training else mean.double(), None if training else var.double(),
                     None if weight is None else weight.double(), None if bias is None else bias.double(),
                     training=training, eps=eps)
    return y, (bm if training else mean.double()), (bv if training else var.double())


def _close(a, r, rtol, atol, what):
    a = a.double()
    err = (a - r).abs()
    bound = atol + rtol * r.abs()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    assert (err <= bound).all(), f"{what}: max abs err {err.max().item():.3e}, max ref {r.abs().max().item():.3e}"


def run_case(x, backend, *, affine=True, eval_mode=False, rescale=False, dtype=None, seed=0,
             rtol=1e-4, atol=1e-4, grad_scale_atol=True):
    """Forward, batch stats and grads (x, weight, bias) vs the float64 reference."""
    g = _gen(seed + 1)
    C = x.shape[1]
    w = (torch.rand(C, generator=g) + 0.5) if affine else None
    b = torch.randn(C, generator=g) if affine else None
    mean = var = None
    if eval_mode:
        # running stats of the right scale: those of u on another batch-like draw
        xr = torch.randn(x.shape, generator=g, dtype=torch.float64) + x.double().mean()
        _, mean, var = reference(xr, None, None, None, None, rescale=rescale)
        mean, var = mean.float(), var.float()
    xin = x.detach().clone().requires_grad_()
    win = w.clone().requires_grad_() if affine else None
    bin_ = b.clone().requires_grad_() if affine else None
    y, bm, bv = L.l2_batch_norm(xin, win, bin_, mean, var, 1e-5, 1e-12, rescale, backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    stat_real = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert bm.dtype == stat_real and bv.dtype == stat_real and bm.shape == (C,)
    assert not bm.requires_grad and not bv.requires_grad

    xd = x.detach().double().requires_grad_()
    wd = w.double().requires_grad_() if affine else None
    bd = b.double().requires_grad_() if affine else None
    yr, bmr, bvr = reference(xd, wd, bd, mean, var, rescale=rescale)
    _close(y, yr, rtol, atol, "y")
    _close(bm, bmr, rtol, atol * 1e-2 + 1e-6 * bmr.abs().max().item(), "batch_mean")
    _close(bv, bvr, max(rtol, 1e-4), 1e-7 * bvr.abs().max().item(), "batch_var")

    gy = torch.randn(x.shape, generator=g)
    ins = [xin] + ([win, bin_] if affine else [])
    refs = [xd] + ([wd, bd] if affine else [])
    grads = torch.autograd.grad(y, ins, gy.to(y.dtype))
    grads_r = torch.autograd.grad(yr, refs, gy.double())
    for name, ga, gr in zip(["dx", "dweight", "dbias"], grads, grads_r):
        assert ga.shape == gr.shape
        # gradients are sums: scale atol with the largest reference magnitude of that gradient
        _close(ga, gr, rtol, atol * max(1.0, gr.abs().max().item()), name)
    return y, grads


SHAPES = [
    (4, 3, 5, 7),      # odd sizes
    (3, 5, 1, 1),      # H = W = 1
    (6, 1, 4, 4),      # C = 1
    (7, 4),            # (N, C)
    (3, 4, 9),         # (N, C, L)
    (2, 3, 37, 41),    # several chunks per row
    (2, 160, 3, 3),    # more channels than one CPU channel block (NSC path)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rescale", [False, True])
def test_train_float32(backend, shape, rescale):
    x = torch.randn(shape, generator=_gen(hash(shape) % 1000))
    run_case(x, backend, rescale=rescale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (7, 4), (3, 4, 9)], ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_eval_and_affine_none(backend, shape, affine):
    x = torch.randn(shape, generator=_gen(3))
    run_case(x, backend, eval_mode=True, affine=affine)
    run_case(x, backend, eval_mode=False, affine=affine)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 3, 6, 5), (6, 4), (4, 2, 33)], ids=str)
@pytest.mark.parametrize("rescale", [False, True])
def test_large_mean_float32(backend, shape, rescale):
    # x = 1000 + randn: the naive E[x^2] - E[x]^2 path loses everything in float32.
    x = 1000.0 + torch.randn(shape, generator=_gen(11))
    run_case(x, backend, rescale=rescale, rtol=2e-4, atol=5e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)], ids=["f16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_types(backend, dtype, tol, channels_last):
    # tolerance: the input is rounded to dtype first (reference uses the rounded input), the
    # output is rounded to dtype (rel. 2^-11 f16, 2^-8 bf16) and dx is computed from rounded dy.
    x = torch.randn(4, 3, 6, 5, generator=_gen(5)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, _ = run_case(x, backend, rtol=tol, atol=tol)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (2, 160, 3, 3), (3, 5, 1, 1)], ids=str)
def test_channels_last(backend, shape):
    x = torch.randn(shape, generator=_gen(7)).contiguous(memory_format=torch.channels_last)
    y, (dx, _, _) = run_case(x, backend, rescale=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert dx.shape == x.shape
    x = (1000 + torch.randn(shape, generator=_gen(8))).contiguous(memory_format=torch.channels_last)
    run_case(x, backend, rtol=2e-4, atol=5e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_views(backend):
    g = _gen(9)
    base = torch.randn(4, 6, 10, 9, generator=g)
    for x in [base[:, ::2, 1:8, ::2],                         # strided slice
              base.transpose(2, 3),                           # dense but neither NCHW nor NHWC
              torch.randn(3, 9, 5, generator=g).transpose(1, 2),  # (N, C, L) with strides (L*C, 1, C)
              torch.randn(8, 5, generator=g)[::2]]:           # strided (N, C)
        assert not x.is_contiguous()
        run_case(x, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rescale", [False, True])
def test_zero_sample(backend, rescale):
    x = torch.randn(4, 3, 5, 5, generator=_gen(13))
    x[1] = 0.0
    xin = x.clone().requires_grad_()
    w = torch.rand(3, generator=_gen(1)).add(0.5).requires_grad_()
    b = torch.randn(3, generator=_gen(2)).requires_grad_()
    y, bm, bv = L.l2_batch_norm(xin, w, b, None, None, 1e-5, 1e-12, rescale, backend)
    gx, gw, gb = torch.autograd.grad(y, (xin, w, b), torch.randn(x.shape, generator=_gen(3)))
    for t in (y, bm, bv, gx, gw, gb):
        assert torch.isfinite(t).all()
    # the zero sample matches the literal reference too (F.normalize clamps the norm)
    run_case(x, backend, rescale=rescale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eval_mode", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
def test_gradcheck_float64(backend, eval_mode, rescale):
    g = _gen(17)
    for shape in [(3, 2, 3, 2), (4, 3)]:
        C = shape[1]
        x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
        b = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
        mean = var = None
        if eval_mode:
            mean = torch.randn(C, generator=g, dtype=torch.float64) * 0.1
            var = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
        fn = lambda x, w, b: L.l2_batch_norm(x, w, b, mean, var, 1e-5, 1e-12, rescale, backend)[0]
        assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)
        xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_() if x.dim() == 4 else x
        assert torch.autograd.gradcheck(fn, (xc, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_backends_agree():
    if not L._EXT:
        pytest.skip("C++ extension not built")
    x = torch.randn(5, 7, 6, 6, generator=_gen(21))
    w = torch.rand(7, generator=_gen(22)) + 0.5
    b = torch.randn(7, generator=_gen(23))
    outs = [L.l2_batch_norm(x, w, b, None, None, 1e-5, 1e-12, False, be) for be in ("cpp", "torch")]
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- pass ops directly
def _passes_or_skip():
    if not L._EXT:
        if os.environ.get("CI"):
            pytest.fail("C++ extension normkernels._C not built under CI")
        pytest.skip("C++ extension not built")
    return torch.ops.normkernels


@pytest.mark.parametrize("layout", ["ncs", "nsc", "nsc3d", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_cpp_passes_match_torch_passes(layout, dtype):
    ops = _passes_or_skip()
    g = _gen(31)
    if layout == "ncs":
        x = torch.randn(3, 5, 7, 9, generator=g)
    elif layout == "nsc":
        x = torch.randn(3, 5, 7, 9, generator=g).contiguous(memory_format=torch.channels_last)
    elif layout == "nsc3d":
        x = torch.randn(3, 40, 5, generator=g).transpose(1, 2)
    else:
        x = torch.randn(3, 10, 7, 9, generator=g)[:, ::2]
    x = (x * 3 + 50).to(dtype)
    dy = torch.randn(x.shape, generator=g).to(dtype)  # contiguous: kernels must match x's layout
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else dict(rtol=1e-4, atol=1e-3)
    m, m2 = ops.l2bn_sample_stats(x)
    mr, m2r = L._torch_sample_stats(x)
    assert m.dtype == acc and m.shape == x.shape[:2]
    torch.testing.assert_close(m, mr, **tol)
    torch.testing.assert_close(m2, m2r, rtol=1e-4, atol=1e-3)
    pc, q = ops.l2bn_backward_sums(dy, x, m)
    pcr, qr = L._torch_backward_sums(dy, x, m)
    torch.testing.assert_close(pc, pcr, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(q, qr, rtol=1e-4, atol=1e-3)
    a = torch.randn(x.shape[:2], generator=g, dtype=acc)
    b = torch.randn(x.shape[:2], generator=g, dtype=acc)
    d = torch.randn(x.shape[:2], generator=g, dtype=acc)
    for args in [(x, m, a, b), (x, m, a, b, dy, d)]:
        out = ops.l2bn_apply(*args)
        ref = L._torch_apply(*args)
        assert out.dtype == x.dtype and out.stride() == ref.stride()
        torch.testing.assert_close(out, ref, rtol=1e-5 if dtype != torch.bfloat16 else 1e-2,
                                   atol=1e-5 if dtype in (torch.float32, torch.float64) else 1e-2)
    if layout == "nsc":
        assert ops.l2bn_apply(x, m, a, b).is_contiguous(memory_format=torch.channels_last)


def test_sample_stats_large_mean_float32():
    ops = _passes_or_skip()
    for x in [1000 + torch.randn(2, 3, 3000, generator=_gen(41)),
              (1000 + torch.randn(2, 3, 50, 60, generator=_gen(42))).contiguous(memory_format=torch.channels_last)]:
        m, m2 = ops.l2bn_sample_stats(x)
        xd = x.double().flatten(2)
        torch.testing.assert_close(m.double(), xd.mean(2), rtol=1e-6, atol=0)  # a few float32 ulps
        torch.testing.assert_close(m2.double(), xd.var(2, unbiased=False) * xd.shape[2], rtol=1e-4, atol=0)


def test_pass_ops_opcheck():
    ops = _passes_or_skip()
    g = _gen(51)
    for x in [torch.randn(3, 4, 5, 6, generator=g),
              torch.randn(3, 4, 5, 6, generator=g).contiguous(memory_format=torch.channels_last),
              torch.randn(5, 3, generator=g)]:
        nc = x.shape[:2]
        m = torch.randn(nc, generator=g)
        a, b, d = (torch.randn(nc, generator=g) for _ in range(3))
        dy = torch.randn(x.shape, generator=g)
        torch.library.opcheck(ops.l2bn_sample_stats.default, (x,))
        torch.library.opcheck(ops.l2bn_backward_sums.default, (dy, x, m))
        torch.library.opcheck(ops.l2bn_apply.default, (x, m, a, b))
        torch.library.opcheck(ops.l2bn_apply.default, (x, m, a, b, dy, d))


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_level_opcheck(backend):
    g = _gen(61)
    for x, eval_mode in [(torch.randn(3, 4, 5, 6, generator=g), False),
                         (torch.randn(3, 4, 5, 6, generator=g).contiguous(memory_format=torch.channels_last), False),
                         (torch.randn(5, 3, generator=g), True)]:
        C = x.shape[1]
        w = torch.rand(C, generator=g).add(0.5).requires_grad_()
        b = torch.randn(C, generator=g, requires_grad=True)
        mean = torch.randn(C, generator=g) * 0.1 if eval_mode else None
        var = torch.rand(C, generator=g) + 0.5 if eval_mode else None
        xr = x.clone().requires_grad_()
        torch.library.opcheck(torch.ops.normkernels.l2bn_forward.default,
                              (xr, w, b, mean, var, 1e-5, 1e-12, False, backend))
        torch.library.opcheck(torch.ops.normkernels.l2bn_forward.default,
                              (x, None, None, mean, var, 1e-5, 1e-12, True, backend))
        y, _, _, sm, sm2 = torch.ops.normkernels.l2bn_forward(x, w.detach(), b.detach(), mean, var,
                                                              1e-5, 1e-12, False, backend)
        dy = torch.randn(x.shape, generator=g)
        torch.library.opcheck(torch.ops.normkernels.l2bn_backward.default,
                              (dy, x, w.detach(), mean, var, sm, sm2, 1e-5, 1e-12, False, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compile_backend", ["eager", "inductor"])
def test_torch_compile(backend, compile_backend):
    torch._dynamo.reset()

    def f(x, w, b):
        y, bm, bv = L.l2_batch_norm(x, w, b, None, None, 1e-5, 1e-12, False, backend)
        return (y * 2).sum() + bm.sum() + bv.sum(), y

    g = _gen(71)
    x = torch.randn(4, 3, 5, 6, generator=g, requires_grad=True)
    w = torch.rand(3, generator=g).add(0.5).requires_grad_()
    b = torch.randn(3, generator=g, requires_grad=True)
    cf = torch.compile(f, fullgraph=True, backend=compile_backend)
    loss_c, y_c = cf(x, w, b)
    loss_e, y_e = f(x, w, b)
    torch.testing.assert_close(y_c, y_e)
    gc = torch.autograd.grad(loss_c, (x, w, b))
    ge = torch.autograd.grad(loss_e, (x, w, b))
    for a, r in zip(gc, ge):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    x = torch.randn(3, 4, 5)
    with pytest.raises(ValueError):
        L.l2_batch_norm(x, None, None, None, None, 1e-5, 1e-12, False, "nope")
    with pytest.raises(ValueError):
        L.l2_batch_norm(x, None, None, torch.zeros(4), None, 1e-5, 1e-12, False, "torch")
    with pytest.raises(TypeError):
        L.l2_batch_norm(x.long(), None, None, None, None, 1e-5, 1e-12, False, "torch")


class _TwinReducer:
    """Stands in for normkernels.distributed.Reducer: two processes holding the same batch."""

    def gather(self, t):
        return torch.stack([t, t])

    def all_reduce(self, t):
        return t * 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rescale", [False, True])
def test_sync_path_equals_concatenated_batch(backend, rescale):
    """The sync= code path of the internal implementation (Chan combination of gathered rows,
    all-reduced backward sums) equals the single-process path on the concatenated batch."""
    x = torch.randn(3, 4, 5, 5, generator=_gen(31), dtype=torch.float64) + 3
    dy = torch.randn(x.shape, generator=_gen(32), dtype=torch.float64)
    w = torch.rand(4, generator=_gen(33), dtype=torch.float64) + 0.5
    b = torch.randn(4, generator=_gen(34), dtype=torch.float64)
    args = (1e-5, 1e-12, rescale, backend)
    y, f = L._forward_impl(x, w, b, None, None, *args, sync=_TwinReducer())
    dx, dw, db = L._backward_impl(dy, x, w, f["mu"], f["var"], f["smean_acc"], f["sm2_acc"], *args,
                                  training=True, count=f["n"], sync=_TwinReducer())
    x2, dy2 = torch.cat([x, x]), torch.cat([dy, dy])
    y2, f2 = L._forward_impl(x2, w, b, None, None, *args)
    dx2, dw2, db2 = L._backward_impl(dy2, x2, w, None, None, f2["smean_acc"], f2["sm2_acc"], *args,
                                     training=True)
    assert f["n"] == 6
    torch.testing.assert_close(f["mu"], f2["mu"])
    torch.testing.assert_close(f["var"], f2["var"])
    torch.testing.assert_close(y, y2[:3])
    torch.testing.assert_close(dx, dx2[:3])
    torch.testing.assert_close(dw * 2, dw2)  # each process returns its local share
    torch.testing.assert_close(db * 2, db2)
