"""L2BN ops (normkernels/ops/l2bn.py, csrc/l2bn*.cpp, csrc/cuda/l2bn_cuda.cu) on every device
present (the `device` fixture: cpu, and cuda when there is a GPU).

backend "native" is the dispatcher op (C++ on CPU, CUDA on a GPU), "torch" the oracle. Everything
is checked against the float64 literal (tests/references.py l2bn_reference, then the activation),
and the compiled pieces against the oracle's pieces with the same inputs. Native cases fail (never
skip) under CI when the extension is missing.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from normkernels.ops import l2bn as L
from references import l2bn_reference
from cpu_isa import outputs_per_isa

ACTS = ["identity", "relu", "leaky_relu", "silu"]
SLOPE = 0.1


# --------------------------------------------------------------------------- helpers
def _need_native(device):
    if not L._EXT:
        if os.environ.get("CI"):
            pytest.fail("C++ extension normkernels._C not built under CI")
        pytest.skip("C++ extension not built")
    if device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "normkernels::l2bn_forward", "CUDA"):
        pytest.fail("normkernels._C was built without its CUDA kernels on a CUDA machine")
    return torch.ops.normkernels


def _backend(name, device):
    if name == "native":
        _need_native(device)
        return "cuda" if device.type == "cuda" else "cpp"
    return "torch"


BACKENDS = ["native", "torch"]


def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, device, seed, dtype=torch.float32):
    return torch.randn(shape, generator=_gen(device, seed), device=device, dtype=dtype)


def _pieces(backend):
    return L._pieces(backend)


def _act_ref(y, act):
    return {"identity": lambda t: t, "relu": F.relu, "silu": F.silu,
            "leaky_relu": lambda t: F.leaky_relu(t, SLOPE)}[act](y)


def reference(x, w, b, mean, var, rescale=False, act="identity"):
    """float64 literal: (y, batch_mean, batch_var)."""
    x = x.double()
    u = F.normalize(x.flatten(1), dim=1, eps=1e-12).view_as(x)
    if rescale:
        u = u * x[0].numel() ** 0.5
    dims = [0] + list(range(2, x.dim()))
    training = mean is None
    y = l2bn_reference(x, w, b, None if training else mean.double(), None if training else var.double(),
                       training=training, rescale=rescale)
    stats = (u.mean(dims), u.var(dims, unbiased=False)) if training else (mean.double(), var.double())
    return (_act_ref(y, act),) + stats


def _close(a, r, rtol, atol, what):
    a = a.detach().double()
    assert a.shape == r.shape, what
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - r).abs()
    bound = atol + rtol * r.abs()
    assert (err <= bound).all(), f"{what}: max abs err {err.max().item():.3e}, max ref {r.abs().max().item():.3e}"


def run_case(x, backend, *, affine=True, eval_mode=False, rescale=False, act="identity", seed=0,
             rtol=1e-4, atol=1e-4, weight=None, bias=None):
    """Forward, batch statistics and gradients (x, weight, bias) against the float64 literal."""
    device, C = x.device, x.shape[1]
    pdt = torch.float64 if x.dtype == torch.float64 else torch.float32  # parameters' dtype
    w = (torch.rand(C, generator=_gen(device, seed + 1), device=device, dtype=pdt) + 0.5) if affine else None
    b = _randn(C, device, seed + 2, pdt) if affine else None
    if weight is not None:
        w, b = weight, bias
    mean = var = None
    if eval_mode:  # statistics of the right scale: those of u on another draw
        xr = _randn(x.shape, device, seed + 3, torch.float64) + x.double().mean()
        _, mean, var = reference(xr, None, None, None, None, rescale=rescale)
        mean, var = mean.to(pdt), var.to(pdt)
    xin = x.detach().clone().requires_grad_()
    win = w.clone().requires_grad_() if w is not None else None
    bin_ = b.clone().requires_grad_() if b is not None else None
    y, bm, bv, _ = L.l2_batch_norm(xin, win, bin_, mean, var, 1e-5, 1e-12, rescale, act, SLOPE, backend)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert bm.dtype == acc and bv.dtype == acc and bm.shape == (C,)
    assert not bm.requires_grad and not bv.requires_grad

    xd = x.detach().double().requires_grad_()
    wd = w.double().requires_grad_() if w is not None else None
    bd = b.double().requires_grad_() if b is not None else None
    yr, bmr, bvr = reference(xd, wd, bd, mean, var, rescale=rescale, act=act)
    _close(y, yr, rtol, atol, "y")
    _close(bm, bmr, rtol, atol * 1e-2 + 1e-6 * bmr.abs().max().item(), "batch_mean")
    _close(bv, bvr, max(rtol, 1e-4), 1e-7 * bvr.abs().max().item(), "batch_var")

    gy = _randn(x.shape, device, seed + 4)
    ins = [t for t in (xin, win, bin_) if t is not None]
    refs = [t for t in (xd, wd, bd) if t is not None]
    grads = torch.autograd.grad(y, ins, gy.to(y.dtype))
    grads_r = torch.autograd.grad(yr, refs, gy.double())
    for name, ga, gr in zip(["dx", "dweight", "dbias"], grads, grads_r):
        # gradients are sums: atol scales with the largest reference magnitude
        _close(ga, gr, rtol, atol * max(1.0, gr.abs().max().item()), name)
    return y, grads


def _misaligned(shape, device, dtype):
    """x whose data starts one element past a 16-byte boundary (offset taken after the cast)."""
    n = 1
    for s in shape:
        n *= s
    base = (_randn((n + 1,), device, 99) * 3 + 50).to(dtype)
    return base[1:].view(shape)


# --------------------------------------------------------------------------- exactness
CASES = {
    "odd": dict(shape=(4, 3, 5, 7)),
    "hw1": dict(shape=(3, 5, 1, 1)),
    "c1": dict(shape=(6, 1, 4, 4)),
    "nc": dict(shape=(7, 4)),
    "ncl": dict(shape=(3, 4, 9)),
    "ncdhw": dict(shape=(2, 3, 3, 4, 5)),
    "long_rows": dict(shape=(2, 3, 37, 41)),
    "split_rows": dict(shape=(1, 2, 150, 160)),
    "wide": dict(shape=(2, 160, 3, 3), channels_last=True),
    "rescale": dict(shape=(4, 3, 5, 7), rescale=True),
    "eval": dict(shape=(4, 3, 5, 7), eval_mode=True),
    "eval_nc": dict(shape=(7, 4), eval_mode=True, affine=False),
    "affine_none": dict(shape=(4, 3, 6, 5), affine=False),
    "large_mean": dict(shape=(5, 3, 6, 5), offset=1000.0, rtol=2e-4, atol=5e-4),
    "large_mean_cl": dict(shape=(5, 3, 6, 5), offset=1000.0, channels_last=True, rescale=True,
                          rtol=2e-4, atol=5e-4),
    "large_mean_ncl": dict(shape=(4, 2, 33), offset=1000.0, rtol=2e-4, atol=5e-4),
    "channels_last": dict(shape=(4, 3, 5, 7), channels_last=True),
    "channels_last_eval": dict(shape=(3, 8, 4, 4), channels_last=True, eval_mode=True),
    "nsc_3d": dict(shape=(3, 4, 9), transpose=True),
    "f16": dict(shape=(4, 3, 6, 5), dtype=torch.float16, rtol=2e-2, atol=2e-2),
    "bf16_cl": dict(shape=(4, 8, 6, 5), dtype=torch.bfloat16, channels_last=True, rtol=1e-1, atol=1e-1),
    "f16_misaligned": dict(shape=(3, 5, 47), dtype=torch.float16, misaligned=True, rtol=2e-2, atol=2e-2),
    "f32_misaligned": dict(shape=(3, 5, 67), misaligned=True),
    "f64": dict(shape=(3, 4, 5, 5), dtype=torch.float64, rtol=1e-10, atol=1e-10),
}


def _make_x(case, device, seed=0):
    shape, dtype = case["shape"], case.get("dtype", torch.float32)
    if case.get("misaligned"):
        x = _misaligned(shape, device, dtype)
        assert x.storage_offset() == 1
        return x
    x = (_randn(shape, device, seed) + case.get("offset", 0.0)).to(dtype)
    if case.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    if case.get("transpose"):  # (N, C, L) with strides (L*C, 1, C)
        n, c, l = shape
        x = _randn((n, l, c), device, seed).to(dtype).transpose(1, 2)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_against_literal(device, backend, name):
    case = CASES[name]
    be = _backend(backend, device)
    x = _make_x(case, device)
    kw = {k: case[k] for k in ("affine", "eval_mode", "rescale", "rtol", "atol") if k in case}
    y, (dx, *_) = run_case(x, be, **kw)
    if case.get("channels_last"):
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(device, backend):
    be = _backend(backend, device)
    base = _randn((4, 6, 10, 9), device, 9)
    for x in [base[:, ::2, 1:8, ::2],                              # strided slice
              base.transpose(2, 3),                                # dense, neither NCHW nor NHWC
              _randn((8, 5), device, 10)[::2]]:                    # strided (N, C)
        assert not x.is_contiguous()
        y, _ = run_case(x, be)
        assert y.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rescale", [False, True])
def test_zero_norm_samples(device, backend, rescale):
    """Samples whose norm is 0 (clamped to l2_eps, as F.normalize) match the literal too."""
    be = _backend(backend, device)
    for x in [_randn((4, 3, 5, 5), device, 13), _randn((4, 3, 5, 5), device, 14)
              .contiguous(memory_format=torch.channels_last)]:
        x[1] = 0.0
        run_case(x, be, rescale=rescale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_activation_vs_layer_then_act(device, backend, act, layout):
    be = _backend(backend, device)
    x = _randn((4, 5, 6, 7), device, 21, torch.float64)
    if layout == "nsc":
        x = x.contiguous(memory_format=torch.channels_last)
    run_case(x, be, act=act, rtol=1e-10, atol=1e-10)
    run_case(x, be, act=act, eval_mode=True, rescale=True, rtol=1e-10, atol=1e-10)
    run_case(x.float(), be, act=act)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_activation_kink(device, backend, act):
    """pre exactly 0 (weight = bias = 0 in one channel): the fused gradient equals the unfused
    pair's (relu'(0) = 0, leaky_relu'(0) = negative_slope)."""
    be = _backend(backend, device)
    for x in [_randn((3, 4, 5, 6), device, 31, torch.float64),
              _randn((3, 4, 5, 6), device, 32, torch.float64).contiguous(memory_format=torch.channels_last)]:
        w = torch.rand(4, generator=_gen(device, 33), device=device, dtype=torch.float64) + 0.5
        b = _randn(4, device, 34, torch.float64)
        w[1] = 0.0
        b[1] = 0.0
        y, _ = run_case(x, be, act=act, weight=w, bias=b, rtol=1e-10, atol=1e-10)
        assert (y[:, 1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval", "rescale", "silu", "leaky_relu_eval"])
def test_gradcheck_float64(device, backend, mode):
    be = _backend(backend, device)
    act = {"silu": "silu", "leaky_relu_eval": "leaky_relu"}.get(mode, "identity")
    for shape in [(3, 2, 3, 2), (4, 3)]:
        C = shape[1]
        x = _randn(shape, device, 17, torch.float64).requires_grad_()
        w = (torch.rand(C, generator=_gen(device, 18), device=device, dtype=torch.float64) + 0.5).requires_grad_()
        b = _randn(C, device, 19, torch.float64).requires_grad_()
        mean = var = None
        if mode in ("eval", "leaky_relu_eval"):
            mean = _randn(C, device, 20, torch.float64) * 0.1
            var = torch.rand(C, generator=_gen(device, 21), device=device, dtype=torch.float64) + 0.5
        rescale = mode == "rescale"
        fn = lambda x, w, b: L.l2_batch_norm(x, w, b, mean, var, 1e-5, 1e-12, rescale, act, SLOPE, be)[0]
        assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)
        if x.dim() == 4:
            xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
            assert torch.autograd.gradcheck(fn, (xc, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_partial_gradients(device):
    """Gradients only for the inputs that need them (here not bias); statistics outputs carry no
    gradient (a loss of them and 0 * y gives zero dx)."""
    _need_native(device)
    be = _backend("native", device)
    x = _randn((3, 4, 5), device, 40).requires_grad_()
    w = torch.ones(4, device=device, requires_grad=True)
    b = torch.zeros(4, device=device)
    y, bm, bv, _ = L.l2_batch_norm(x, w, b, None, None, 1e-5, 1e-12, False, "relu", 0.0, be)
    (gw,) = torch.autograd.grad(y.sum(), (w,))
    assert gw.shape == (4,)
    y, bm, bv, _ = L.l2_batch_norm(x, w, b, None, None, 1e-5, 1e-12, False, "identity", 0.0, be)
    gx, gw = torch.autograd.grad(bm.sum() + (y * 0).sum(), (x, w), allow_unused=True)
    assert torch.equal(gx, torch.zeros_like(gx))


# --------------------------------------------------------------------------- pieces: compiled vs torch
def _finish_inputs(device, dtype, seed, n=4, c=3, s=(5, 6), zero_sample=False, channels_last=False):
    x = (_randn((n, c) + s, device, seed) * 2 + 0.5).to(dtype)
    if zero_sample:
        x[1] = 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(c, generator=_gen(device, seed + 1), device=device) + 0.5
    b = _randn(c, device, seed + 2)
    return x, w, b


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["train", "eval", "affine_none", "rescale", "zero_norm", "silu_cl"])
def test_compiled_pieces_match_torch_pieces(device, dtype, mode):
    """Same inputs into the compiled and the torch finalize (stats, rows, sums): same outputs."""
    ops = _need_native(device)
    x, w, b = _finish_inputs(device, dtype, 50, zero_sample=mode == "zero_norm",
                             channels_last=mode == "silu_cl")
    act = "silu" if mode == "silu_cl" else "identity"
    if mode == "affine_none":
        w = b = None
    rescale = mode == "rescale"
    mean = var = None
    if mode == "eval":
        mean, var = _randn(3, device, 51) * 0.1, torch.rand(3, generator=_gen(device, 52), device=device) + 0.5
    tol = _tol(dtype)
    stats, rows = ops.l2bn_stats(x, 1e-12, rescale)
    stats_t, rows_t = L.stats_torch(x, 1e-12, rescale)
    torch.testing.assert_close(stats, stats_t, **(tol if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)))
    # the finalize from the SAME stats
    rows_all = None if mode == "eval" else rows_t[None]
    torch.testing.assert_close(rows, rows_t, rtol=1e-4 if dtype != torch.float64 else 1e-12, atol=1e-6)
    args = (w, b, mean, var, 1e-5, 1e-12, rescale, act, SLOPE)
    out = ops.l2bn_finish(x, stats_t, rows_all, *args)
    ref = L.finish_torch(x, stats_t, rows_all, *args)
    for name, a, r in zip(["y", "batch_mean", "batch_var", "saved"], out, ref):
        torch.testing.assert_close(a, r, **(tol if name != "y" or dtype != torch.float16 else dict(rtol=1e-3, atol=1e-3)),
                                   msg=name)
    saved = ref[3]
    dy = _randn(x.shape, device, 53).to(dtype)
    sums, grows = ops.l2bn_grad_stats(dy, x, saved, act, SLOPE)
    sums_t, grows_t = L.grad_stats_torch(dy, x, saved, act, SLOPE)
    torch.testing.assert_close(sums, sums_t, rtol=1e-4 if dtype != torch.float64 else 1e-12, atol=1e-4)
    training = mode != "eval"
    g_all = grows_t if training else None
    out = ops.l2bn_grad_finish(dy, x, w, saved, sums_t, grows_t, g_all, act, SLOPE)
    ref = L.grad_finish_torch(dy, x, w, saved, sums_t, grows_t, g_all, act, SLOPE)
    for name, a, r in zip(["dx", "dweight", "dbias"], out, ref):
        torch.testing.assert_close(a, r, **(tol if name != "dx" or dtype != torch.float16 else dict(rtol=1e-3, atol=1e-3)),
                                   msg=name)


@pytest.mark.parametrize("channels_last", [False, True])
def test_top_level_ops_are_their_pieces(device, channels_last):
    """l2bn_forward / l2bn_backward equal the composition of the pieces bitwise."""
    ops = _need_native(device)
    x, w, b = _finish_inputs(device, torch.float32, 60, channels_last=channels_last)
    dy = _randn(x.shape, device, 61).contiguous(memory_format=torch.channels_last if channels_last
                                                  else torch.contiguous_format)
    for mean, var in [(None, None), (_randn(3, device, 62) * 0.1, torch.rand(3, device=device) + 0.5)]:
        fused = ops.l2bn_forward(x, w, b, mean, var, 1e-5, 1e-12, True, "silu", SLOPE)
        stats, rows = ops.l2bn_stats(x, 1e-12, True)
        piece = ops.l2bn_finish(x, stats, rows[None] if mean is None else None, w, b, mean, var, 1e-5,
                                1e-12, True, "silu", SLOPE)
        for a, r in zip(fused, piece):
            assert torch.equal(a, r)
        training = mean is None
        saved = fused[3]
        fused_b = ops.l2bn_backward(dy, x, w, saved, training, "silu", SLOPE)
        sums, grows = ops.l2bn_grad_stats(dy, x, saved, "silu", SLOPE)
        piece_b = ops.l2bn_grad_finish(dy, x, w, saved, sums, grows, grows if training else None, "silu", SLOPE)
        for a, r in zip(fused_b, piece_b):
            assert torch.equal(a, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["identity", "leaky_relu"])
def test_group_rows_equal_concatenated_batch(device, backend, act):
    """A synchronized group of P = 3 processes (the second one empty, N = 0): the pieces on the
    gathered / summed rows equal the single-process op on the concatenated batch."""
    be = _backend(backend, device)
    stats_op, finish_op, grad_stats_op, grad_finish_op = _pieces(be)
    x = _randn((5, 3, 4, 6), device, 70, torch.float64) + 2
    dy = _randn(x.shape, device, 71, torch.float64)
    w = torch.rand(3, generator=_gen(device, 72), device=device, dtype=torch.float64) + 0.5
    b = _randn(3, device, 73, torch.float64)
    parts = [slice(0, 2), slice(2, 2), slice(2, 5)]
    xs, dys = [x[p] for p in parts], [dy[p] for p in parts]
    assert xs[1].shape[0] == 0
    eps, l2_eps, rescale = 1e-5, 1e-12, True
    stats = [stats_op(xp, l2_eps, rescale) for xp in xs]
    rows_all = torch.stack([r for _, r in stats])
    outs = [finish_op(xp, st, rows_all, w, b, None, None, eps, l2_eps, rescale, act, SLOPE)
            for xp, (st, _) in zip(xs, stats)]
    gstats = [grad_stats_op(dp, xp, o[3], act, SLOPE) for dp, xp, o in zip(dys, xs, outs)]
    grows_all = sum(g for _, g in gstats)
    grads = [grad_finish_op(dp, xp, w, o[3], s, g, grows_all, act, SLOPE)
             for dp, xp, o, (s, g) in zip(dys, xs, outs, gstats)]

    y_ref, bm_ref, bv_ref, saved = L.torch_l2bn_forward(x, w, b, None, None, eps, l2_eps, rescale, act, SLOPE)
    dx_ref, dw_ref, db_ref = L.torch_l2bn_backward(dy, x, w, saved, True, act, SLOPE)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([o[0] for o in outs]), y_ref, **tol)
    for o in outs:
        torch.testing.assert_close(o[1], bm_ref, **tol)
        torch.testing.assert_close(o[2], bv_ref, **tol)
        assert L.split_saved(o[3], o[0].shape[0], 3)["n_all"].item() == 5
    torch.testing.assert_close(torch.cat([g[0] for g in grads]), dx_ref, **tol)
    torch.testing.assert_close(sum(g[1] for g in grads), dw_ref, **tol)  # local shares add up
    torch.testing.assert_close(sum(g[2] for g in grads), db_ref, **tol)
    assert torch.equal(grads[1][1], torch.zeros_like(dw_ref))


class _TwinReducer:
    """Stands in for normkernels.distributed.Reducer: two processes holding the same batch."""
    rank, size = 0, 2

    def gather(self, t):
        return torch.stack([t, t])

    def all_reduce(self, t):
        return t * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2bn_sync(device, backend):
    be = _backend(backend, device)
    x = _randn((3, 4, 5, 5), device, 80, torch.float64)
    w = (torch.rand(4, generator=_gen(device, 81), device=device, dtype=torch.float64) + 0.5).requires_grad_()
    b = _randn(4, device, 82, torch.float64).requires_grad_()
    dy = _randn(x.shape, device, 83, torch.float64)
    xs = x.clone().requires_grad_()
    y, bm, bv, count = L.l2bn_sync(xs, w, b, 1e-5, 1e-12, False, "relu", 0.0, be, _TwinReducer())
    gx, gw, gb = torch.autograd.grad(y, (xs, w, b), dy)
    assert count == 2 * 3 * 25
    x2 = torch.cat([x, x]).requires_grad_()
    y2, bm2, bv2, _ = L.l2_batch_norm(x2, w, b, None, None, 1e-5, 1e-12, False, "relu", 0.0, be)
    gx2, gw2, gb2 = torch.autograd.grad(y2, (x2, w, b), torch.cat([dy, dy]))
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, y2[:3], **tol)
    torch.testing.assert_close(bm, bm2, **tol)
    torch.testing.assert_close(bv, bv2, **tol)
    torch.testing.assert_close(gx, gx2[:3], **tol)
    torch.testing.assert_close(gw * 2, gw2, **tol)
    torch.testing.assert_close(gb * 2, gb2, **tol)


# --------------------------------------------------------------------------- the statistics pass
@pytest.mark.parametrize("layout", ["ncs", "nsc", "nsc3d", "strided", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_stats_pass_matches_torch(device, layout, dtype):
    ops = _need_native(device)
    if layout == "ncs":
        x = (_randn((3, 5, 7, 9), device, 90) * 3 + 50).to(dtype)
    elif layout == "nsc":
        x = (_randn((3, 70, 5, 7), device, 90) * 3 + 50).to(dtype).contiguous(memory_format=torch.channels_last)
    elif layout == "nsc3d":
        x = (_randn((3, 40, 36), device, 90) * 3 + 50).to(dtype).transpose(1, 2)
    elif layout == "strided":
        x = (_randn((3, 10, 7, 9), device, 90) * 3 + 50).to(dtype)[:, ::2]
    else:
        x = _misaligned((3, 5, 4097), device, dtype)
    m, m2 = ops.l2bn_sample_stats(x)
    mr, m2r = L.stats_pass_torch(x)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert m.dtype == acc and m.shape == x.shape[:2]
    torch.testing.assert_close(m, mr, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(m2, m2r, rtol=1e-4, atol=1e-3)


def test_stats_pass_large_mean_float32(device):
    ops = _need_native(device)
    for x in [1000 + _randn((2, 3, 3000), device, 91),
              (1000 + _randn((2, 3, 50, 60), device, 92)).contiguous(memory_format=torch.channels_last),
              1000 + _randn((1, 2, 300, 300), device, 93)]:
        m, m2 = ops.l2bn_sample_stats(x)
        xd = x.double().flatten(2)
        torch.testing.assert_close(m.double(), xd.mean(2), rtol=1e-6, atol=0)
        torch.testing.assert_close(m2.double(), xd.var(2, unbiased=False) * xd.shape[2], rtol=1e-4, atol=0)


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("channels_last", [False, True])
def test_deterministic(device, channels_last):
    """Two runs give bitwise equal results; on CPU also with 1 and 2 threads."""
    ops = _need_native(device)
    x = _randn((4, 64, 24, 24), device, 100)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = _randn(x.shape, device, 101).contiguous(memory_format=torch.channels_last if channels_last
                                                   else torch.contiguous_format)
    w = torch.rand(64, device=device) + 0.5

    def run():
        out = ops.l2bn_forward(x, w, None, None, None, 1e-5, 1e-12, False, "relu", 0.0)
        return out + ops.l2bn_backward(dy, x, w, out[3], True, "relu", 0.0)

    first = run()
    threads = torch.get_num_threads()
    try:
        for n in ([1, 2] if device.type == "cpu" else [threads]):
            torch.set_num_threads(n)
            for a, r in zip(run(), first):
                assert torch.equal(a, r)
    finally:
        torch.set_num_threads(threads)


_ISA_SCRIPT = r"""
import sys, torch
import normkernels.ops.l2bn as L
torch.manual_seed(0)
o, out = torch.ops.normkernels, []
cases = [((3, 10, 7, 7), torch.contiguous_format, torch.float32, "silu"),       # S % 8 tails
         ((2, 9, 40), torch.contiguous_format, torch.float32, "relu"),          # 16-lane bulk + 8
         ((2, 12, 30, 33), torch.contiguous_format, torch.float64, "silu"),     # double lanes
         ((2, 9, 5, 6), torch.channels_last, torch.float32, "leaky_relu"),      # NSC, grouped
         ((2, 40, 3, 5), torch.channels_last, torch.float32, "silu"),           # NSC, 8-channel blocks
         ((2, 16, 4, 4), torch.contiguous_format, torch.bfloat16, "relu"),
         ((3, 8, 6, 6), torch.contiguous_format, torch.float16, "silu")]
for shape, fmt, dtype, act in cases:
    # wide values: SiLU's exp meets both ends of its range
    x = (torch.randn(shape) * 3 + 2).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    C = shape[1]
    w, b = torch.rand(C) * 40 + 0.5, torch.randn(C) * 30
    f = o.l2bn_forward(x, w, b, None, None, 1e-5, 1e-12, True, act, 0.1)
    e = o.l2bn_forward(x, w, b, f[1] + 0.5, f[2] * 2, 1e-5, 1e-12, False, act, 0.1)
    stats, rows = o.l2bn_stats(x, 1e-12, False)
    fin = o.l2bn_finish(x, stats, rows[None], w, b, None, None, 1e-5, 1e-12, False, act, 0.1)
    sums, grows = o.l2bn_grad_stats(dy, x, fin[3], act, 0.1)
    out += [*f, *e, *o.l2bn_backward(dy, x, w, f[3], True, act, 0.1),
            *o.l2bn_backward(dy, x, w, e[3], False, act, 0.1), stats, rows, *fin, sums, grows,
            *o.l2bn_grad_finish(dy, x, w, fin[3], sums, grows, grows, act, 0.1),
            *o.l2bn_sample_stats(x)]
torch.save(out, sys.argv[1])
"""


def test_baseline_and_avx2_builds_agree_bitwise(tmp_path):
    """The CPU kernels are compiled twice (baseline ISA and AVX2, chosen at run time;
    NORMKERNELS_CPU_ISA=baseline forces the baseline); their lanes do the same IEEE operations in
    the same order as the scalar code, so the two builds agree bit for bit (and the baseline build
    is as correct as the one the other tests check)."""
    _need_native(torch.device("cpu"))
    results = outputs_per_isa(_ISA_SCRIPT, tmp_path)
    for a, r in zip(*results):
        assert torch.equal(a, r)


# --------------------------------------------------------------------------- opcheck / compile
def test_opcheck_every_op(device):
    ops = _need_native(device)
    for x, eval_mode in [(_randn((3, 4, 5, 6), device, 110), False),
                         (_randn((3, 4, 5, 6), device, 111).contiguous(memory_format=torch.channels_last), False),
                         (_randn((5, 4), device, 112), True)]:
        C = x.shape[1]
        w = (torch.rand(C, device=device) + 0.5).requires_grad_()
        b = _randn(C, device, 113).requires_grad_()
        mean = _randn(C, device, 114) * 0.1 if eval_mode else None
        var = torch.rand(C, device=device) + 0.5 if eval_mode else None
        xr = x.clone().requires_grad_()
        torch.library.opcheck(ops.l2bn_forward.default, (xr, w, b, mean, var, 1e-5, 1e-12, False, "leaky_relu", SLOPE))
        torch.library.opcheck(ops.l2bn_forward.default, (x, None, None, mean, var, 1e-5, 1e-12, True, "identity", 0.0))
        y, bm, bv, saved = ops.l2bn_forward(x, w.detach(), b.detach(), mean, var, 1e-5, 1e-12, False, "silu", 0.0)
        dy = _randn(x.shape, device, 115)
        torch.library.opcheck(ops.l2bn_backward.default, (dy, x, w.detach(), saved, not eval_mode, "silu", 0.0))
        stats, rows = ops.l2bn_stats(x, 1e-12, False)
        torch.library.opcheck(ops.l2bn_stats.default, (x, 1e-12, False))
        torch.library.opcheck(ops.l2bn_finish.default, (x, stats, rows[None], w.detach(), None, None, None, 1e-5,
                                                        1e-12, False, "relu", 0.0))
        sums, grows = ops.l2bn_grad_stats(dy, x, saved, "silu", 0.0)
        torch.library.opcheck(ops.l2bn_grad_stats.default, (dy, x, saved, "silu", 0.0))
        torch.library.opcheck(ops.l2bn_grad_finish.default, (dy, x, w.detach(), saved, sums, grows, grows, "silu", 0.0))
        torch.library.opcheck(ops.l2bn_sample_stats.default, (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    be = _backend(backend, device)
    torch._dynamo.reset()

    def f(x, w, b):
        y, bm, bv, _ = L.l2_batch_norm(x, w, b, None, None, 1e-5, 1e-12, False, "relu", 0.0, be)
        return (y * 2).sum() + bm.sum() + bv.sum(), y

    x = _randn((4, 3, 5, 6), device, 120).requires_grad_()
    w = (torch.rand(3, device=device) + 0.5).requires_grad_()
    b = _randn(3, device, 121).requires_grad_()
    cf = torch.compile(f, fullgraph=True, backend="inductor" if backend == "native" else "aot_eager")
    loss_c, y_c = cf(x, w, b)
    loss_e, y_e = f(x, w, b)
    torch.testing.assert_close(y_c, y_e)
    for a, r in zip(torch.autograd.grad(loss_c, (x, w, b)), torch.autograd.grad(loss_e, (x, w, b))):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bad input
def test_bad_arguments(device):
    ops = _need_native(device)
    x = _randn((3, 4, 5), device, 130)
    with pytest.raises(ValueError, match="act"):
        ops.l2bn_forward(x, None, None, None, None, 1e-5, 1e-12, False, "gelu", 0.0)
    with pytest.raises(ValueError, match="both"):
        ops.l2bn_forward(x, None, None, torch.zeros(4, device=device), None, 1e-5, 1e-12, False, "identity", 0.0)
    with pytest.raises(ValueError, match="weight"):
        ops.l2bn_forward(x, torch.ones(3, device=device), None, None, None, 1e-5, 1e-12, False, "identity", 0.0)
    with pytest.raises(TypeError):
        ops.l2bn_forward(x.long(), None, None, None, None, 1e-5, 1e-12, False, "identity", 0.0)
    _, _, _, saved = ops.l2bn_forward(x, None, None, None, None, 1e-5, 1e-12, False, "identity", 0.0)
    with pytest.raises(ValueError, match="saved"):
        ops.l2bn_backward(x, x, None, saved[:-1], True, "identity", 0.0)
    with pytest.raises(ValueError, match="rows_all"):
        ops.l2bn_finish(x, torch.zeros(2, 3, 4, device=device), torch.zeros(3, 4, device=device, dtype=torch.float64),
                        None, None, None, None, 1e-5, 1e-12, False, "identity", 0.0)
    with pytest.raises(ValueError):
        L.l2_batch_norm(x, None, None, None, None, 1e-5, 1e-12, False, "identity", 0.0, "nope")
