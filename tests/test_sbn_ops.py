"""SBN (the SBN family's op with the BN stage off, normkernels.ops.sbn.forward) on every path of the test's device against the
float64 torch.fft literal (tests/references.py sbn_reference: rfft2 -> complex mean, modulus
variance -> normalize, affine -> irfft2, with torch.fft's norm), followed by the activation.

Paths: "parseval" on the device's dispatcher ops ("native": the C++ kernels on CPU, Triton on
CUDA) and on the torch oracle, and the literal "fft" path."""
import pytest
import torch
import torch.nn.functional as F

from normkernels.ops import _act
import normkernels.functional as F_nk
from normkernels.ops import sbn as S
from normkernels.ops import sbn_fft
from references import sbn_reference
from sbn_cases import (F64, TOL, check, expected_format, gen, grads, leaf, make_params, make_x,
                       resolve)

EPS = 1e-5
PATHS = [("parseval", "native"), ("parseval", "torch"), ("fft", "native")]


def run(x, w, b, mean, var, algorithm, backend, fft_norm="backward", act="identity", slope=0.1):
    """-> (y, batch_mean (C, 2), batch_var): the family's op with the BN stage off, or the FFT path."""
    if mean is not None and mean.is_complex():
        mean = torch.view_as_real(mean)
    if algorithm == "fft":
        y, m, v = sbn_fft.sbn_fft_forward(x, w, b, mean, var, EPS, fft_norm, backend)
        return _act.act_forward(y, act, slope), m, v
    y, bm, bv, m, v, _ = S.forward(x, False, None, None, None, None, w, b, mean, var, 0.0, EPS, fft_norm, act,
                                   slope, backend)
    assert bm.shape == bv.shape == (0,)  # no BN stage, no BN statistics
    return y, m, v


def literal(x, w, b, mean, var, fft_norm="backward", act="identity", slope=0.1):
    """The float64 reference: the literal layer, then the activation (stats: complex mean)."""
    y, m, v = sbn_reference(x, w, b, mean, var, EPS, fft_norm)
    return _act.act_forward(y, act, slope), m, v


def eval_stats(C, device, g, fft_norm, HW):
    """Plausible running statistics in fft_norm's scale: (mean (C, 2) float32, var (C,))."""
    f2 = {"backward": 1.0, "ortho": 1.0 / HW, "forward": 1.0 / HW ** 2}[fft_norm]
    mean = torch.randn(C, 2, generator=g, device=device, dtype=F64) * (3 * f2 ** 0.5)
    var = (torch.rand(C, generator=g, device=device, dtype=F64) * 5 + 0.5) * HW * f2
    return mean.float(), var.float()


def compare(device, algorithm, backend, shape, dtype=torch.float32, fft_norm="backward",
            act="identity", slope=0.1, shift=0.0, affine=True, train=True, layout="contiguous",
            seed=0, tol=None):
    """The op against the literal on the same (rounded) values: y, batch statistics, dx, dw, db."""
    backend = resolve(backend, device)
    g = gen(device, seed)
    N, C, H, W = shape
    x = make_x(shape, dtype, device, g, shift, layout)
    pdt = F64 if dtype == F64 else torch.float32
    w, b = make_params(C, device, g, pdt) if affine else (None, None)
    mean = var = None
    if not train:
        mean, var = eval_stats(C, device, g, fft_norm, H * W)
    dy = torch.randn(shape, generator=g, device=device, dtype=F64).to(dtype)
    tol = tol or TOL[dtype]

    xx, ww, bb = leaf(x), leaf(w), leaf(b)
    y, bm, bv = run(xx, ww, bb, mean, var, algorithm, backend, fft_norm, act, slope)
    got = grads(y, (xx, ww, bb), dy)

    acc = F64 if dtype == F64 else torch.float32
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=expected_format(x))
    assert bm.shape == (C, 2) and bm.dtype == acc and bv.shape == (C,) and bv.dtype == acc
    assert not bm.requires_grad and not bv.requires_grad

    xr, wr, br = leaf(x.to(F64)), leaf(None if w is None else w.to(F64)), leaf(None if b is None else b.to(F64))
    mr = None if mean is None else torch.view_as_complex(mean.to(F64).contiguous())
    yr, m_ref, v_ref = literal(xr, wr, br, mr, None if var is None else var.to(F64), fft_norm, act,
                               slope)
    ref = grads(yr, (xr, wr, br), dy.to(F64))

    check("y", y, yr, tol)
    check("mean", torch.view_as_complex(bm.to(F64).contiguous()), m_ref.detach(), tol)
    check("var", bv, v_ref.detach(), tol)
    check("dx", got[0], ref[0], tol)
    if affine:
        assert got[1].dtype == w.dtype and got[2].dtype == b.dtype
        check("dweight", got[1], ref[1], tol, floor=1.0)
        check("dbias", got[2], ref[2], tol, floor=1.0)
    if not train:  # eval returns the statistics it used
        assert torch.equal(bm.to(mean.dtype), mean) and torch.equal(bv.to(var.dtype), var)


CASES = {
    "even_W": dict(shape=(4, 3, 6, 8)),
    "odd_W_no_affine": dict(shape=(3, 4, 5, 7), affine=False),
    "eval": dict(shape=(4, 3, 6, 8), train=False),
    "large_mean": dict(shape=(3, 2, 5, 6), shift=1000.0),
    "channels_last": dict(shape=(3, 5, 4, 6), layout="channels_last"),
    "strided_view": dict(shape=(3, 3, 5, 6), layout="strided"),
    "H_W_1": dict(shape=(6, 3, 1, 1)),
    "C_1": dict(shape=(4, 1, 3, 5)),
    "C_10": dict(shape=(3, 10, 5, 6)),     # a full block of 8 channels (the transposed kernels)
    "map_8x8": dict(shape=(3, 10, 8, 8)),   # rows of one 8-vector (the width-8 backward)
    "map_7x7": dict(shape=(2, 9, 7, 7)),    # small maps read as overlapping 8-vectors
    "large_map": dict(shape=(2, 3, 64, 70), layout="channels_last"),
    "large_map_nchw": dict(shape=(2, 3, 65, 67)),   # maps above kTMax: the row kernels
    "W_2": dict(shape=(3, 2, 4, 2)),
    "float64": dict(shape=(3, 3, 5, 6), dtype=F64),
    "float16": dict(shape=(4, 3, 4, 6), dtype=torch.float16),
    "bfloat16_eval": dict(shape=(4, 3, 4, 6), dtype=torch.bfloat16, train=False),
}


@pytest.mark.parametrize("algorithm,backend", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_literal(device, algorithm, backend, case):
    compare(device, algorithm, backend, **CASES[case])


@pytest.mark.parametrize("algorithm,backend", PATHS)
@pytest.mark.parametrize("fft_norm", ["backward", "ortho", "forward"])
@pytest.mark.parametrize("train", [True, False])
def test_fft_norm_modes(device, algorithm, backend, fft_norm, train):
    compare(device, algorithm, backend, (3, 3, 5, 6), fft_norm=fft_norm, train=train)
    compare(device, algorithm, backend, (2, 2, 4, 4), fft_norm=fft_norm, train=train,
            layout="channels_last", seed=1)


@pytest.mark.parametrize("algorithm,backend", PATHS)
def test_ortho_has_batchnorm_scale(device, algorithm, backend):
    """'ortho' gives zero-mean data BatchNorm's unit spread; the paper's 'backward' 1/sqrt(HW) of it."""
    x = make_x((8, 4, 8, 8), torch.float32, device, gen(device)) * 3  # zero-mean: the DC bin is not special
    y_o = run(x, None, None, None, None, algorithm, resolve(backend, device), "ortho")[0]
    y_b = run(x, None, None, None, None, algorithm, resolve(backend, device), "backward")[0]
    assert 0.9 < y_o.std().item() < 1.1
    torch.testing.assert_close(y_b * 8.0, y_o, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm,backend", PATHS)
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("train", [True, False])
def test_activation_matches_layer_then_act(device, algorithm, backend, act, train):
    compare(device, algorithm, backend, (3, 3, 5, 6), dtype=F64, act=act, slope=0.2, train=train,
            fft_norm="ortho")
    compare(device, algorithm, backend, (3, 4, 4, 7), act=act, train=train, seed=2,
            layout="channels_last")


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("act,fn", [("relu", F.relu), ("leaky_relu", lambda t: F.leaky_relu(t, 0.3))])
def test_kink_gets_the_unfused_gradient(device, backend, act, fn):
    """pre exactly 0 (eval, zero mean, no bias, zero inputs): the fused layer's gradients equal
    those of the same layer followed by torch's activation (relu'(0) = 0, leaky_relu'(0) = slope)."""
    backend = resolve(backend, device)
    g = gen(device)
    C = 3
    x = make_x((2, C, 4, 5), torch.float32, device, g)
    x[:, :, 1:3, ::2] = 0.0
    x[:, :, 0, 0] = 0.0
    w = make_params(C, device, g)[0]
    mean = torch.zeros(C, 2, device=device)
    var = torch.rand(C, generator=g, device=device) + 1.0
    dy = torch.randn(x.shape, generator=g, device=device)
    outs = []
    for fused in (True, False):
        xx, ww = leaf(x), leaf(w)
        y = run(xx, ww, None, mean, var, "parseval", backend, act=act if fused else "identity",
                slope=0.3)[0]
        if not fused:
            assert bool((y == 0).any()) and bool((y[x == 0] == 0).all())
            y = fn(y)
        outs.append([y] + grads(y, (xx, ww), dy))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("train", [True, False])
def test_gradcheck(device, backend, train):
    backend = resolve(backend, device)
    g = gen(device, 3)
    x = make_x((2, 3, 4, 5), F64, device, g).requires_grad_()
    w, b = (t.double().requires_grad_() for t in make_params(3, device, g))
    stats = (None, None) if train else tuple(t.double() for t in eval_stats(3, device, g, "ortho", 20))

    def f(x, w, b):
        return run(x, w, b, *stats, "parseval", backend, "ortho", "silu")[0]

    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=True)


@pytest.mark.parametrize("fft_norm", ["backward", "ortho"])
@pytest.mark.parametrize("train", [True, False])
def test_parseval_equals_fft_in_float64(device, fft_norm, train):
    backend = resolve("native", device)
    g = gen(device, 4)
    x = make_x((3, 4, 6, 7), F64, device, g) * 2 + 5
    w, b = (t.double() for t in make_params(4, device, g))
    stats = (None, None) if train else tuple(t.double() for t in eval_stats(4, device, g, fft_norm, 42))
    dy = torch.randn(x.shape, generator=g, device=device, dtype=F64)
    res = []
    for algorithm in ("parseval", "fft"):
        xx, ww, bb = leaf(x), leaf(w), leaf(b)
        y, m, v = run(xx, ww, bb, *stats, algorithm, backend, fft_norm, "leaky_relu")
        res.append([y, m, v] + grads(y, (xx, ww, bb), dy))
    for a, r in zip(*res):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)


def test_eval_accepts_the_complex_running_mean(device):
    backend = resolve("native", device)
    g = gen(device, 5)
    x = make_x((2, 3, 4, 5), torch.float32, device, g)
    mean, var = eval_stats(3, device, g, "backward", 20)
    a = run(x, None, None, mean, var, "parseval", backend)[0]
    b = run(x, None, None, torch.view_as_complex(mean.contiguous()), var, "parseval", backend)[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_bad_arguments_raise_clear_errors(device, backend):
    """functional is where the family's inputs are validated (the ops below it trust them)."""
    backend = resolve(backend, device)
    x = make_x((2, 3, 4, 5), torch.float32, device, gen(device))
    sbn = F_nk.spectral_batch_norm
    with pytest.raises(ValueError, match="fft_norm"):
        sbn(x, None, None, training=True, backend=backend, fft_norm="unitary")
    with pytest.raises(ValueError, match="activation"):
        sbn(x, None, None, training=True, backend=backend, activation="gelu")
    with pytest.raises(ValueError, match="running_mean and running_var"):
        sbn(x, torch.zeros(3, device=device, dtype=torch.complex64), None, training=True, backend=backend)
    with pytest.raises(ValueError, match="shape"):
        sbn(x, None, None, torch.ones(4, device=device), training=True, backend=backend)
    with pytest.raises(ValueError, match="algorithm"):
        sbn(x, None, None, training=True, algorithm="dft", backend=backend)


def test_triton_on_cpu_goes_through_the_op(monkeypatch):
    """backend 'triton' calls the family's dispatcher op (whose CUDA kernel is the Triton host
    function, or its CPU kernel inside normkernels.triton.sbn.on_cpu()) with the BN stage off,
    and returns its outputs."""
    calls = []

    def forward(*args):
        calls.append(args)
        x = args[0]
        C = x.shape[1]
        return x * 2, x.new_zeros(0), x.new_zeros(0), x.new_zeros(C, 2), x.new_ones(C), x.new_zeros(C, 26)

    monkeypatch.setattr(S, "_NATIVE", (forward,) + S._NATIVE[1:])
    x = torch.randn(2, 3, 4, 5)
    y, m, v = run(x, None, None, None, None, "parseval", "triton", "ortho", "relu", 0.5)
    assert torch.equal(y, x * 2) and m.shape == (3, 2) and v.shape == (3,)
    assert len(calls) == 1 and calls[0][1] is False and calls[0][12:] == ("ortho", "relu", 0.5)
