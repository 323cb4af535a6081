"""The SBN family's Triton kernels (normkernels/triton/sbn.py and sbn_kernels.py: BN+SBN, and SBN as
BN+SBN with the BN stage off, bn=False), run eagerly: on CPU tensors
under TRITON_INTERPRET=1 (set by conftest.py; small shapes, the interpreter is slow), on CUDA
tensors when there is a GPU. Never through torch.compile or opcheck (not under the interpreter).

Everything is compared with the float64 literal definition of tests/references.py (rfft2 with
norm=fft_norm -> complex mean, modulus variance -> normalize, affine -> irfft2; BN first for
BN+SBN), followed by the activation in torch ops, gradients by autograd through that literal."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from normkernels.ops._act import act_forward as torch_act  # noqa: E402
from normkernels.triton import launch as L  # noqa: E402
from normkernels.triton import sbn as K  # noqa: E402
from references import bn_sbn_reference, sbn_reference  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OPS = torch.ops.normkernels


@pytest.fixture(scope="module", autouse=True)
def triton_kernels_on_this_device():
    """Every call below goes down the path of a CUDA call: the C++ op and its C++ autograd, then
    the Triton host functions, registered as the CUDA kernels (normkernels/_backend.py) and, on a
    machine without a GPU, as the CPU kernels for this module (run by the interpreter)."""
    if DEV.type == "cuda":
        yield
        return
    with K.on_cpu():
        yield
F64 = torch.float64
SLOPE = 0.2


def rel(a, ref, floor=1e-6):
    """max |a - ref| / max |ref| (max |ref| at least ``floor``: some gradients are exactly 0,
    e.g. BN's bias behind SBN at H = W = 1, whose reference is rounding noise)."""
    a = a.detach().to(device=ref.device, dtype=ref.dtype)
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(floor)).item()


TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def make_x(shape, dtype, layout="nchw", shift=0.0, seed=0):
    """layout: "nchw", "channels_last", or "strided" (a view with no standard layout: H and C
    swapped in memory and a W step of 2)."""
    gen = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    if layout == "strided":
        base = (torch.randn(N, H, C, 2 * W, generator=gen, dtype=F64) + shift).to(DEV, dtype)
        return base.permute(0, 2, 1, 3)[..., ::2]
    x = (torch.randn(shape, generator=gen, dtype=F64) + shift).to(DEV, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def params(C, dtype, seed, n=2):
    gen = torch.Generator().manual_seed(100 + seed)
    out = []
    for _ in range(n):
        out.append((torch.rand(C, generator=gen, dtype=F64) + 0.5).to(DEV, dtype))
        out.append(torch.randn(C, generator=gen, dtype=F64).to(DEV, dtype))
    return out


def pdtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ------------------------------------------------------------------------------------------
# one forward + backward case against the literal
# ------------------------------------------------------------------------------------------


def run_sbn(shape, dtype=torch.float32, layout="nchw", train=True, affine=True,
            norm="backward", act="identity", shift=0.0, seed=0, tol=None, dy_layout=None):
    tol = tol or TOL[dtype]
    C = shape[1]
    x = make_x(shape, dtype, layout, shift, seed).requires_grad_()
    w, b = params(C, pdtype(dtype), seed, 1) if affine else (None, None)
    if affine:
        w.requires_grad_()
        b.requires_grad_()
    gen = torch.Generator().manual_seed(200 + seed)
    mean = var = None
    if not train:
        hw = shape[2] * shape[3]
        scale = {"backward": 1.0, "ortho": hw ** -0.5, "forward": 1.0 / hw}[norm]
        mean = (torch.randn(C, 2, generator=gen, dtype=F64) * scale * 3).to(DEV, torch.float32)
        var = ((torch.rand(C, generator=gen, dtype=F64) + 0.5) * hw * scale ** 2).to(DEV, torch.float32)
    y, bm, bv, sm, sv, saved = OPS.sbn_forward(x, False, None, None, None, None, w, b, mean, var,
                                               1e-5, 1e-5, norm, act, SLOPE)
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()
    assert saved.shape == (C, 26) and saved.dtype == F64
    acc = F64 if dtype == F64 else torch.float32
    assert bm.shape == (0,) and bm.dtype == acc and bv.shape == (0,) and bv.dtype == acc
    assert sm.shape == (C, 2) and sm.dtype == acc and sv.shape == (C,) and sv.dtype == acc
    dy = torch.randn(shape, generator=gen, dtype=F64).to(DEV, dtype)
    if dy_layout == "expanded":
        dy = torch.randn(1, C, 1, 1, generator=gen, dtype=F64).to(DEV, dtype).expand(shape)
    y.backward(dy)

    x64 = x.detach().to(F64).requires_grad_()
    w64 = w.detach().to(F64).requires_grad_() if affine else None
    b64 = b.detach().to(F64).requires_grad_() if affine else None
    m64 = None if train else torch.view_as_complex(mean.to(F64).contiguous())
    v64 = None if train else var.to(F64)
    ref, rm, rv = sbn_reference(x64, w64, b64, m64, v64, 1e-5, fft_norm=norm)
    ref = torch_act(ref, act, SLOPE)
    ref.backward(dy.to(F64))
    assert rel(y, ref) < tol, rel(y, ref)
    assert rel(sm, torch.view_as_real(rm)) < tol
    assert rel(sv, rv) < tol
    assert rel(x.grad, x64.grad) < 20 * tol, rel(x.grad, x64.grad)
    if affine:
        assert rel(w.grad, w64.grad) < 20 * tol, rel(w.grad, w64.grad)
        assert rel(b.grad, b64.grad) < 20 * tol, rel(b.grad, b64.grad)
    return y, x.grad


def run_bnsbn(shape, dtype=torch.float32, layout="nchw", train=True, affine=True,
              norm="backward", act="identity", shift=0.0, seed=0, tol=None):
    tol = tol or TOL[dtype]
    C = shape[1]
    x = make_x(shape, dtype, layout, shift, seed).requires_grad_()
    ps = params(C, pdtype(dtype), seed, 2) if affine else [None] * 4
    for p in ps:
        if p is not None:
            p.requires_grad_()
    bw, bb, sw, sb = ps
    gen = torch.Generator().manual_seed(300 + seed)
    stats = [None] * 4
    if not train:
        hw = shape[2] * shape[3]
        scale = {"backward": 1.0, "ortho": hw ** -0.5, "forward": 1.0 / hw}[norm]
        stats = [(torch.randn(C, generator=gen, dtype=F64) + shift).to(DEV),
                 (torch.rand(C, generator=gen, dtype=F64) + 0.5).to(DEV),
                 (torch.randn(C, 2, generator=gen, dtype=F64) * scale).to(DEV),
                 ((torch.rand(C, generator=gen, dtype=F64) + 0.5) * hw * scale ** 2).to(DEV)]
    out = OPS.sbn_forward(x, True, bw, bb, stats[0], stats[1], sw, sb, stats[2], stats[3], 1e-5,
                          1e-5, norm, act, SLOPE)
    y, bm, bv, sm, sv, saved = out
    assert saved.shape == (C, 26) and y.dtype == dtype
    dy = torch.randn(shape, generator=gen, dtype=F64).to(DEV, dtype)
    y.backward(dy)

    x64 = x.detach().to(F64).requires_grad_()
    p64 = [p.detach().to(F64).requires_grad_() if p is not None else None for p in ps]
    st64 = None if train else (stats[0], stats[1], torch.view_as_complex(stats[2].contiguous()),
                               stats[3])
    ref, rbm, rbv, rsm, rsv = bn_sbn_reference(x64, *p64, stats=st64, fft_norm=norm)
    ref = torch_act(ref, act, SLOPE)
    ref.backward(dy.to(F64))
    assert rel(y, ref) < tol, rel(y, ref)
    for got, want in ((bm, rbm), (bv, rbv), (sm, torch.view_as_real(rsm)), (sv, rsv)):
        assert rel(got, want) < tol, rel(got, want)
    assert rel(x.grad, x64.grad) < 20 * tol, rel(x.grad, x64.grad)
    for p, q in zip(ps, p64):
        if p is not None:
            assert rel(p.grad, q.grad) < 20 * tol, rel(p.grad, q.grad)
    return y, x.grad


# ------------------------------------------------------------------------------------------
# coverage: shapes, modes, dtypes, layouts
# ------------------------------------------------------------------------------------------

SHAPES = [(3, 2, 4, 6), (2, 3, 5, 7), (4, 2, 1, 1), (3, 1, 4, 5), (2, 2, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("run", [run_sbn, run_bnsbn], ids=["sbn", "bnsbn"])
def test_train_float64_matches_literal(run, shape):
    run(shape, F64)


@pytest.mark.parametrize("run", [run_sbn, run_bnsbn], ids=["sbn", "bnsbn"])
@pytest.mark.parametrize("norm", K.FFT_NORMS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fft_norm_modes(run, norm, train):
    run((2, 3, 4, 5), F64, train=train, norm=norm, seed=1)


@pytest.mark.parametrize("run", [run_sbn, run_bnsbn], ids=["sbn", "bnsbn"])
def test_eval_affine_none_float32(run):
    run((3, 2, 4, 6), torch.float32, train=False, affine=False, seed=2)
    run((3, 2, 4, 6), torch.float32, train=True, affine=False, seed=3)


@pytest.mark.parametrize("run", [run_sbn, run_bnsbn], ids=["sbn", "bnsbn"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_large_mean_float32(run, train):
    """x = 1000 + randn in float32 (eval: BN's mean ~1000 too) as exact as unit data: the
    passes work on x - K with K a sample of the channel (training) or BN's mean (eval)."""
    run((3, 2, 4, 6), torch.float32, train=train, shift=1000.0, seed=4, tol=2e-6)


@pytest.mark.parametrize("run", [run_sbn, run_bnsbn], ids=["sbn", "bnsbn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types(run, dtype):
    run((2, 3, 4, 6), dtype, seed=5)
    run((2, 5, 3, 4), dtype, layout="channels_last", act="silu", seed=5)


@pytest.mark.parametrize("run", [run_sbn, run_bnsbn], ids=["sbn", "bnsbn"])
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(run, layout):
    run((2, 3, 4, 5), torch.float32, layout=layout, seed=6)
    run((3, 4, 3, 6), torch.float32, layout=layout, act="relu", seed=7)


def test_expanded_dy_and_channels_last_eval():
    run_sbn((2, 3, 4, 5), torch.float32, dy_layout="expanded", seed=8)
    run_sbn((2, 3, 4, 5), torch.float32, layout="channels_last", train=False, seed=9)


# ------------------------------------------------------------------------------------------
# activations: fused vs layer-then-activation (float64), and the kink
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("run", [run_sbn, run_bnsbn], ids=["sbn", "bnsbn"])
def test_activation_matches_layer_then_activation(run, act):
    run((3, 2, 4, 6), F64, act=act, seed=10)
    run((2, 3, 3, 5), F64, act=act, train=False, norm="ortho", seed=11)


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_kink_gradient_is_torchs(act):
    """Eval with bias 0, mean 0: pre = a*x exactly, so x = 0 gives pre = 0 exactly; the fused
    gradient there must be torch's (relu'(0) = 0, leaky_relu'(0) = slope)."""
    C = 2
    x = torch.randn(2, C, 3, 4, dtype=F64, device=DEV)
    x[:, :, 1, 1] = 0.0
    x[0, :, 0, 2] = 0.0
    x.requires_grad_()
    mean = torch.zeros(C, 2, dtype=F64, device=DEV)
    var = torch.ones(C, dtype=F64, device=DEV)
    y, *_ = OPS.sbn_forward(x, False, None, None, None, None, None, None, mean, var, 1e-5, 1e-5,
                            "backward", act, SLOPE)
    pre = x.detach() / math.sqrt(1.0 + 1e-5)
    assert torch.equal(y.detach()[x.detach() == 0], torch.zeros_like(pre[x.detach() == 0]))
    y.backward(torch.ones_like(y))
    p = pre.clone().requires_grad_()
    (F.relu(p) if act == "relu" else F.leaky_relu(p, SLOPE)).backward(torch.ones_like(p))
    torch.testing.assert_close(x.grad, p.grad / math.sqrt(1.0 + 1e-5), rtol=1e-12, atol=1e-14)
    at0 = x.detach() == 0
    expect = 0.0 if act == "relu" else SLOPE / math.sqrt(1.0 + 1e-5)
    assert torch.allclose(x.grad[at0], torch.full_like(x.grad[at0], expect))


# ------------------------------------------------------------------------------------------
# gradcheck (float64) through the interpreted autograd wrappers
# ------------------------------------------------------------------------------------------


def test_gradcheck_sbn():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 2, 3, 4, generator=gen, dtype=F64).to(DEV).requires_grad_()
    w = (torch.rand(2, generator=gen, dtype=F64) + 0.5).to(DEV).requires_grad_()
    b = torch.randn(2, generator=gen, dtype=F64).to(DEV).requires_grad_()
    f = lambda x, w, b: OPS.sbn_forward(x, False, None, None, None, None, w, b, None, None, 1e-5,
                                        1e-5, "ortho", "silu", SLOPE)[0]
    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=True)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradcheck_bnsbn(train):
    gen = torch.Generator().manual_seed(13)
    C = 2
    x = torch.randn(2, C, 3, 5, generator=gen, dtype=F64).to(DEV).requires_grad_()
    ps = [(torch.rand(C, generator=gen, dtype=F64) + 0.5).to(DEV).requires_grad_()
          for _ in range(4)]
    stats = [None] * 4 if train else [torch.randn(C, dtype=F64, device=DEV),
                                      torch.rand(C, dtype=F64, device=DEV) + 0.5,
                                      torch.randn(C, 2, dtype=F64, device=DEV),
                                      torch.rand(C, dtype=F64, device=DEV) + 5]

    def f(x, bw, bb, sw, sb):
        return OPS.sbn_forward(x, True, bw, bb, stats[0], stats[1], sw, sb, stats[2], stats[3],
                                   1e-5, 1e-5, "forward", "leaky_relu", SLOPE)[0]

    assert torch.autograd.gradcheck(f, (x, *ps), fast_mode=True)


# ------------------------------------------------------------------------------------------
# chunking, tiled rows, determinism
# ------------------------------------------------------------------------------------------


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 elements, rows tiled from 4 columns on, as many chunks as possible."""
    monkeypatch.setattr(K, "TILE", 16)
    monkeypatch.setattr(K, "MAX_BW", 4)
    monkeypatch.setattr(K, "MIN_TILES_PER_CHUNK", 1)
    monkeypatch.setattr(K, "PROGRAMS_PER_SM", 64)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_many_chunks_and_tiled_rows(small_tiles, layout):
    # H = 6, 8 with tiles of 4 rows (1 channels_last): tiles without a row h = 0, tiles across
    # two samples; W = 7 and 6 in tiles of 4 columns
    x = make_x((3, 2, 6, 7), torch.float32, layout)
    plan = K._Plan(x)
    assert plan.n_chunks > 2 and plan.BW < 7 and plan.BR < 6
    run_sbn((3, 2, 6, 7), torch.float32, layout=layout, seed=14)
    run_bnsbn((2, 2, 8, 6), torch.float32, layout=layout, act="silu", seed=15)


def test_deterministic(small_tiles, monkeypatch):
    monkeypatch.setattr(K, "TILE", 32)
    x = make_x((6, 2, 4, 6), torch.float32, seed=16)
    dy = make_x((6, 2, 4, 6), torch.float32, seed=17)
    assert K._Plan(x).n_chunks > 2
    a = K.sbn_forward(x, False, *[None] * 8, 1e-5, 1e-5, "backward", "relu", 0.0)
    b = K.sbn_forward(x, False, *[None] * 8, 1e-5, 1e-5, "backward", "relu", 0.0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # every program of a channel computes the finalize itself: bit-identical coefficients
    ga = K.sbn_backward(dy, x, K.sbn_forward(x, True, *[None] * 8, 1e-5, 1e-5, "ortho", "silu",
                                             0.0)[5], True, True, "ortho", "silu", 0.0)
    gb = K.sbn_backward(dy, x, K.sbn_forward(x, True, *[None] * 8, 1e-5, 1e-5, "ortho", "silu",
                                             0.0)[5], True, True, "ortho", "silu", 0.0)
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))


# ------------------------------------------------------------------------------------------
# the synchronized pieces: a group of P = 3 processes (one empty) = the whole batch
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bn", [False, True], ids=["sbn", "bnsbn"])
def test_group_pieces_equal_whole_batch(bn):
    gen = torch.Generator().manual_seed(18)
    shape = (5, 3, 4, 6)
    x = (torch.randn(shape, generator=gen, dtype=F64) * 2 + 7).to(DEV)
    dy = torch.randn(shape, generator=gen, dtype=F64).to(DEV)
    C = shape[1]
    ps = params(C, F64, 18, 2)
    if not bn:
        ps[0] = ps[1] = None
    parts = [x[:2], x[2:2], x[2:]]            # process 1 has no samples
    dys = [dy[:2], dy[2:2], dy[2:]]
    rows_all = torch.stack([K.sbn_stats(p) for p in parts])
    assert rows_all.shape == (3, C, 8) and rows_all[1].abs().sum() == 0
    assert torch.equal(rows_all[0, :, 0], torch.full((C,), 2.0, dtype=F64, device=DEV))
    act, norm = "silu", "ortho"
    whole = K.sbn_forward(x, bn, ps[0], ps[1], None, None, ps[2], ps[3], None, None, 1e-5, 1e-5,
                          norm, act, SLOPE)
    outs = [K.sbn_finish(p, rows_all, r, bn, *ps, 1e-5, 1e-5, norm, act, SLOPE)
            for r, p in enumerate(parts)]
    torch.testing.assert_close(torch.cat([o[0] for o in outs]), whole[0], rtol=1e-12, atol=1e-12)
    for k in range(1, len(whole) - 1):      # the statistics: the whole batch's on every process
        for o in outs:
            torch.testing.assert_close(o[k], whole[k], rtol=1e-12, atol=1e-12)
    gs = [K.sbn_grad_stats(d, p, o[-1], act, SLOPE) for d, p, o in zip(dys, parts, outs)]
    g_all = gs[0] + gs[1] + gs[2]
    grads = [K.sbn_grad_finish(d, p, o[-1], g, g_all, bn, True, norm, act, SLOPE)
             for d, p, o, g in zip(dys, parts, outs, gs)]
    ref = K.sbn_backward(dy, x, whole[-1], bn, True, norm, act, SLOPE)
    torch.testing.assert_close(torch.cat([g[0] for g in grads]), ref[0], rtol=1e-10, atol=1e-12)
    for k in range(1, len(ref)):             # parameter gradients: the shares sum to the whole
        torch.testing.assert_close(sum(g[k] for g in grads), ref[k], rtol=1e-10, atol=1e-12)
    assert all(g[k].abs().max() == 0 for g in grads[1:2] for k in range(1, len(ref)) if g[k].numel())
    assert all(g[k].shape == ((C,) if bn else (0,)) for g in grads for k in (1, 2))


# ------------------------------------------------------------------------------------------
# the literal FFT path's spectral kernels
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", K.FFT_NORMS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fft_spectral_kernels(norm, train):
    gen = torch.Generator().manual_seed(19)
    N, C, H, W = 3, 2, 4, 6
    x = (torch.randn(N, C, H, W, generator=gen, dtype=F64) + 2).to(DEV).requires_grad_()
    w = (torch.rand(C, generator=gen, dtype=F64) + 0.5).to(DEV).requires_grad_()
    b = torch.randn(C, generator=gen, dtype=F64).to(DEV).requires_grad_()
    dy = torch.randn(N, C, H, W, generator=gen, dtype=F64).to(DEV)
    mean = var = None
    if not train:
        mean = torch.randn(C, generator=gen, dtype=torch.complex128).to(DEV)
        var = (torch.rand(C, generator=gen, dtype=F64) + 1).to(DEV)
    ref, rm, rv = sbn_reference(x, w, b, mean, var, 1e-5, fft_norm=norm)
    ref.backward(dy)
    X = torch.view_as_real(torch.fft.rfft2(x.detach(), norm=norm)).contiguous()
    stats = None if train else torch.cat([torch.view_as_real(mean), var[:, None]], 1)
    Yr, st = K.sbn_fft_spectral_forward(X, w.detach(), b.detach(), stats, 1e-5)
    y = torch.fft.irfft2(torch.view_as_complex(Yr), s=(H, W), norm=norm)
    assert rel(y, ref) < 1e-12
    assert rel(st, torch.cat([torch.view_as_real(rm), rv[:, None]], 1)) < 1e-12
    G = torch.view_as_real(torch.fft.rfft2(dy, norm=norm)).contiguous()
    O, grads = K.sbn_fft_spectral_backward(G, X, w.detach(), st, 1e-5, W, train, norm)
    dx = torch.fft.irfft2(torch.view_as_complex(O), s=(H, W), norm=norm)
    assert rel(dx, x.grad) < 1e-10
    assert rel(grads[:, 0], w.grad) < 1e-10 and rel(grads[:, 1], b.grad) < 1e-10


# ------------------------------------------------------------------------------------------
# host side: launches per call (recorded on meta tensors), errors, registration
# ------------------------------------------------------------------------------------------


def _record(fn, *args):
    with L.recording() as calls:
        out = fn(*args)
    return [c.kernel.fn.__name__ for c in calls], out


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_launches_per_call_on_meta_tensors(layout):
    """ResNet-50 layer-4 shape on the meta device (no data, no sync possible): training forward
    and backward are 2 launches each (a pass, then finalize + apply), eval forward 1, the same
    with the BN stage on or off; the synchronized pieces: 2 for the sums, 1 for each finish."""
    x = torch.empty(64, 2048, 7, 7, device="meta", dtype=torch.bfloat16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    C = x.shape[1]
    w = torch.empty(C, device="meta")
    m2, v = torch.empty(C, 2, device="meta"), torch.empty(C, device="meta")
    g = torch.empty(C, 4, device="meta", dtype=F64)
    for bn in (False, True):
        bw, bm = (w, v) if bn else (None, None)
        names, out = _record(K.sbn_forward, x, bn, bw, bw, None, None, w, w, None, None, 1e-5,
                             1e-5, "backward", "relu", 0.0)
        assert names == ["_stats_kernel", "_forward_kernel"]
        assert out[0].device.type == "meta" and out[5].shape == (C, 26)
        assert out[1].shape == ((C,) if bn else (0,))
        names, _ = _record(K.sbn_forward, x, bn, bw, bw, bm, bm, w, w, m2, v, 1e-5, 1e-5, "ortho",
                           "silu", 0.0)
        assert names == ["_forward_kernel"]
        for training in (True, False):
            names, grads = _record(K.sbn_backward, x, x, out[5], bn, training, "forward",
                                   "leaky_relu", 0.1)
            assert names == ["_grad_stats_kernel", "_backward_kernel"]
            assert grads[1].shape == ((C,) if bn else (0,)) and grads[3].shape == (C,)
        rows = torch.empty(3, C, 8, device="meta", dtype=F64)
        assert _record(K.sbn_finish, x, rows, 1, bn, bw, bw, w, w, 1e-5, 1e-5, "backward",
                       "identity", 0.0)[0] == ["_forward_kernel"]
        assert _record(K.sbn_grad_finish, x, x, out[5], g, g, bn, True, "backward", "identity",
                       0.0)[0] == ["_backward_kernel"]
    assert _record(K.sbn_stats, x)[0] == ["_stats_kernel", "_rows_kernel"]
    assert _record(K.sbn_grad_stats, x, x, out[5], "relu", 0.0)[0] == ["_grad_stats_kernel",
                                                                       "_rows_kernel"]


def test_operands_out_of_bounds_are_refused():
    """Inputs are validated in normkernels/functional.py; the host functions only refuse what
    would launch a kernel out of bounds or on another device."""
    x = torch.randn(2, 3, 4, 5, device=DEV)
    with pytest.raises(RuntimeError, match="sbn_weight must be"):
        K.sbn_forward(x, False, None, None, None, None, torch.ones(4, device=DEV), None, None,
                      None, 1e-5, 1e-5, "backward", "relu", 0.0)
    with pytest.raises(RuntimeError, match="x must be"):
        K.sbn_stats(x[0])
    with pytest.raises(RuntimeError, match="rows_all must be"):
        K.sbn_finish(x, torch.zeros(1, 2, 8, dtype=F64, device=DEV), 0, False, None, None, None,
                     None, 1e-5, 1e-5, "backward", "relu", 0.0)
    with pytest.raises(RuntimeError, match="saved must be"):
        K.sbn_backward(x, x, torch.zeros(3, 10, dtype=F64, device=DEV), False, True, "backward",
                       "relu", 0.0)
    with pytest.raises(RuntimeError, match="dy must be"):
        K.sbn_grad_stats(x[:1], x, torch.zeros(3, 26, dtype=F64, device=DEV), "relu", 0.0)


# The op schemas of csrc/sbn.cpp, as the dispatcher has them (for a scratch namespace below).
SCHEMAS = {name: str(getattr(OPS, name).default._schema).split("::", 1)[1][len(name):] for name in K.IMPL}


def test_register_kernels_onto_the_op_schemas():
    """The op schemas of csrc/sbn.cpp (SCHEMAS) in a scratch namespace: every host function
    registers onto its schema and runs through the dispatcher (registered for CPU here, where the
    interpreter can run it); a schema with other arguments, or none, raises."""
    ns = "nk_triton_test"
    lib = torch.library.Library(ns, "FRAGMENT")
    for name, sig in SCHEMAS.items():
        lib.define(name + sig)
    try:
        reg = K.register_kernels("cpu", namespace=ns)
        assert K.register_kernels("cpu", namespace=ns) is reg   # idempotent
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::sbn_forward", "CPU")
        x = make_x((2, 3, 4, 5), torch.float32, seed=20)
        ops = getattr(torch.ops, ns)
        out = ops.sbn_forward(x, False, *[None] * 8, 1e-5, 1e-5, "ortho", "relu", 0.0)
        direct = K.sbn_forward(x, False, *[None] * 8, 1e-5, 1e-5, "ortho", "relu", 0.0)
        assert torch.equal(out[0], direct[0]) and torch.equal(out[5], direct[5])
        rows = ops.sbn_stats(x)[None]
        out = ops.sbn_finish(x, rows, 0, True, None, None, None, None, 1e-5, 1e-5, "backward",
                             "identity", 0.0)
        assert out[5].shape == (3, 26) and out[1].shape == (3,)
    finally:
        K._LIBRARIES.pop((ns, "cpu"), None)
        del lib
    for ns, schema in (("nk_triton_other", "sbn_backward(Tensor dy) -> Tensor"), ("nk_triton_none", None)):
        other = torch.library.Library(ns, "FRAGMENT")
        for name, sig in SCHEMAS.items():
            if name != "sbn_backward":
                other.define(name + sig)
        if schema:
            other.define(schema)
        with pytest.raises(RuntimeError, match="sbn_backward"):
            K.register_kernels("cpu", namespace=ns)
        assert (ns, "cpu") not in K._LIBRARIES
        del other


@pytest.mark.skipif(DEV.type == "cuda", reason="the CPU registration is the no-GPU stand-in")
def test_on_cpu_replaces_the_cpu_kernels_and_restores_them():
    """Inside on_cpu() (this module) the ops' CPU kernels are the Triton host functions; after
    it, the C++ ones again, and backend 'triton' refuses CPU tensors."""
    import normkernels as nk
    from normkernels import _backend
    dump = lambda: torch._C._dispatch_dump("normkernels::sbn_forward")
    assert "triton" in dump().split("CPU:")[1].splitlines()[0] and _backend.backends()["triton"]
    lib = K._LIBRARIES.pop(("normkernels", "cpu"))
    lib._destroy()
    try:
        assert "sbn_cpu.cpp" in dump().split("CPU:")[1].splitlines()[0]
        with pytest.raises(RuntimeError, match="on_cpu"):
            nk.SpectralBatchNorm2d(3, backend="triton")(torch.randn(2, 3, 4, 4))
    finally:
        K._LIBRARIES[("normkernels", "cpu")] = K.register_kernels("cpu")


def test_row_consts_are_the_oracles():
    """The kernels' row constants, computed on the device (closed forms: no host copy), against
    the oracle's torch.fft derivation (normkernels/ops/sbn_oracle.py row_consts)."""
    from normkernels.ops import sbn_oracle
    for W in range(1, 70):
        got = K._row_consts(W, DEV, F64)
        want = sbn_oracle.row_consts(W, DEV)
        assert got.device.type == DEV.type and (got - want).abs().max() <= 1e-14 * W * W, W
