"""BN then SBN, fused (the SBN family's op with the BN stage on, normkernels.ops.sbn.forward), on every backend of the test's device
against the float64 literal (tests/references.py bn_sbn_reference: F.batch_norm, then rfft2 ->
complex mean, modulus variance -> normalize, affine -> irfft2 with torch.fft's norm), followed by
the activation. Backends: "native" (the C++ kernels on CPU, Triton on CUDA) and the torch oracle."""
import pytest
import torch
import torch.nn.functional as F

from normkernels.ops import _act
import normkernels.functional as F_nk
from normkernels.ops import sbn as S
from references import bn_sbn_reference
from sbn_cases import F64, TOL, check, expected_format, gen, grads, leaf, make_params, make_x, resolve

BN_EPS, SBN_EPS = 1e-5, 2e-5


def run(x, bw, bb, sw, sb, stats, backend, fft_norm="backward", act="identity", slope=0.1):
    bm, bv, sm, sv = stats if stats is not None else (None,) * 4
    if sm is not None and sm.is_complex():
        sm = torch.view_as_real(sm)
    return S.forward(x, True, bw, bb, bm, bv, sw, sb, sm, sv, BN_EPS, SBN_EPS, fft_norm, act, slope,
                     backend)[:5]


def eval_stats(C, device, g, fft_norm, HW, shift=0.0):
    """Plausible running statistics: BN's (C,) (of data around `shift`), SBN's in fft_norm's
    scale ((C, 2) mean)."""
    f2 = {"backward": 1.0, "ortho": 1.0 / HW, "forward": 1.0 / HW ** 2}[fft_norm]
    bm = torch.randn(C, generator=g, device=device, dtype=F64) * 0.2 + shift
    bv = torch.rand(C, generator=g, device=device, dtype=F64) + 0.5
    sm = torch.randn(C, 2, generator=g, device=device, dtype=F64) * (2 * f2 ** 0.5)
    sv = (torch.rand(C, generator=g, device=device, dtype=F64) + 0.5) * HW * f2
    return tuple(t.float() for t in (bm, bv, sm, sv))


def compare(device, backend, shape, dtype=torch.float32, fft_norm="backward", act="identity",
            slope=0.1, shift=0.0, affine=(True, True), train=True, layout="contiguous", seed=0,
            tol=None):
    """The op against the literal on the same (rounded) values: y, both layers' batch statistics,
    dx and the four parameter gradients."""
    backend = resolve(backend, device)
    g = gen(device, seed)
    N, C, H, W = shape
    x = make_x(shape, dtype, device, g, shift, layout)
    pdt = F64 if dtype == F64 else torch.float32
    bw, bb = make_params(C, device, g, pdt) if affine[0] else (None, None)
    sw, sb = make_params(C, device, g, pdt) if affine[1] else (None, None)
    stats = None if train else eval_stats(C, device, g, fft_norm, H * W, shift)
    dy = torch.randn(shape, generator=g, device=device, dtype=F64).to(dtype)
    tol = tol or TOL[dtype]

    ins = [leaf(t) for t in (x, bw, bb, sw, sb)]
    y, bm, bv, sm, sv = run(*ins, stats, backend, fft_norm, act, slope)
    got = grads(y, ins, dy)

    acc = F64 if dtype == F64 else torch.float32
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=expected_format(x))
    assert sm.shape == (C, 2) and bm.shape == bv.shape == sv.shape == (C,)
    assert all(t.dtype == acc and not t.requires_grad for t in (bm, bv, sm, sv))

    refs = [leaf(None if t is None else t.to(F64)) for t in (x, bw, bb, sw, sb)]
    rstats = None
    if stats is not None:
        rstats = (stats[0].double(), stats[1].double(),
                  torch.view_as_complex(stats[2].double().contiguous()), stats[3].double())
    yr, *stat_ref = bn_sbn_reference(*refs, rstats, BN_EPS, SBN_EPS, fft_norm)
    yr = _act.act_forward(yr, act, slope)
    ref = grads(yr, refs, dy.to(F64))

    check("y", y, yr, tol)
    for name, a, r in zip(("bn_mean", "bn_var", "sbn_mean", "sbn_var"), (bm, bv, sm, sv), stat_ref):
        if r.is_complex():
            a = torch.view_as_complex(a.to(F64).contiguous())
        check(name, a, r.detach(), tol)
    names = ("dx", "dbn_weight", "dbn_bias", "dsbn_weight", "dsbn_bias")
    for i, name in enumerate(names):
        if ins[i] is None:
            continue
        assert got[i].dtype == ins[i].dtype
        check(name, got[i], ref[i], tol, floor=0.0 if i == 0 else 1.0)
    if stats is not None:
        for a, s in zip((bm, bv, sm, sv), stats):
            assert torch.equal(a.to(s.dtype), s)


CASES = {
    "even_W": dict(shape=(4, 3, 6, 8)),
    "odd_W": dict(shape=(3, 4, 5, 7)),
    "no_bn_affine": dict(shape=(3, 3, 4, 6), affine=(False, True)),
    "no_sbn_affine": dict(shape=(3, 3, 5, 5), affine=(True, False)),
    "eval": dict(shape=(4, 3, 6, 8), train=False),
    "large_mean": dict(shape=(3, 2, 5, 6), shift=1000.0),
    "large_mean_eval": dict(shape=(3, 2, 5, 6), shift=1000.0, train=False),
    "channels_last": dict(shape=(3, 5, 4, 6), layout="channels_last"),
    "strided_view": dict(shape=(3, 3, 5, 6), layout="strided"),
    "H_W_1_eval": dict(shape=(6, 3, 1, 1), train=False),
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


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_literal(device, backend, case):
    compare(device, backend, **CASES[case])


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_H_W_1_training(device, backend):
    """1x1 maps: SBN then normalizes the same N values BN just normalized (its input gradient is
    ~eps-sized); outputs and statistics still match, and gradients to an absolute bound."""
    compare(device, backend, (6, 3, 1, 1), dtype=F64, tol=1e-7)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("fft_norm", ["backward", "ortho", "forward"])
@pytest.mark.parametrize("train", [True, False])
def test_fft_norm_modes(device, backend, fft_norm, train):
    compare(device, backend, (3, 3, 5, 6), fft_norm=fft_norm, train=train)
    compare(device, backend, (2, 2, 4, 4), fft_norm=fft_norm, train=train, layout="channels_last",
            seed=1)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("train", [True, False])
def test_activation_matches_layer_then_act(device, backend, act, train):
    compare(device, backend, (3, 3, 5, 6), dtype=F64, act=act, slope=0.2, train=train,
            fft_norm="ortho")
    compare(device, backend, (3, 4, 4, 7), act=act, train=train, seed=2, layout="channels_last")


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("act,fn", [("relu", F.relu), ("leaky_relu", lambda t: F.leaky_relu(t, 0.3))])
def test_kink_gets_the_unfused_gradient(device, backend, act, fn):
    """pre exactly 0 (eval; BN's mean 0, var 1 - eps, no biases, SBN mean 0; zero inputs): the
    fused layer's gradients equal those of the same layer followed by torch's activation."""
    backend = resolve(backend, device)
    g = gen(device)
    C = 3
    x = make_x((2, C, 4, 5), torch.float32, device, g)
    x[:, :, 1:3, ::2] = 0.0
    x[:, :, 0, 0] = 0.0
    bw, _ = make_params(C, device, g)
    sw, _ = make_params(C, device, g)
    stats = (torch.zeros(C, device=device), torch.rand(C, generator=g, device=device) + 0.5,
             torch.zeros(C, 2, device=device), torch.rand(C, generator=g, device=device) + 1.0)
    dy = torch.randn(x.shape, generator=g, device=device)
    outs = []
    for fused in (True, False):
        ins = [leaf(x), leaf(bw), None, leaf(sw), None]
        y = run(*ins, stats, backend, act=act if fused else "identity", slope=0.3)[0]
        if not fused:
            assert bool((y[x == 0] == 0).all())
            y = fn(y)
        outs.append([y] + [t for t in grads(y, ins, dy) if t is not None])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("train", [True, False])
def test_gradcheck(device, backend, train):
    backend = resolve(backend, device)
    g = gen(device, 3)
    x = make_x((2, 3, 4, 5), F64, device, g).requires_grad_()
    params = [t.double().requires_grad_() for t in make_params(3, device, g) + make_params(3, device, g)]
    stats = None if train else tuple(t.double() for t in eval_stats(3, device, g, "ortho", 20))

    def f(x, bw, bb, sw, sb):
        return run(x, bw, bb, sw, sb, stats, backend, "ortho", "silu")[0]

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


def test_eval_accepts_the_complex_running_mean(device):
    backend = resolve("native", device)
    g = gen(device, 5)
    x = make_x((2, 3, 4, 5), torch.float32, device, g)
    bm, bv, sm, sv = eval_stats(3, device, g, "backward", 20)
    a = run(x, None, None, None, None, (bm, bv, sm, sv), backend)[0]
    b = run(x, None, None, None, None, (bm, bv, torch.view_as_complex(sm.contiguous()), sv), backend)[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_bad_arguments_raise_clear_errors(device, backend):
    """functional is where the family's inputs are validated (the ops below it trust them)."""
    backend = resolve(backend, device)
    x = make_x((2, 3, 4, 5), torch.float32, device, gen(device))
    z = torch.zeros(3, device=device)
    zc = torch.zeros(3, device=device, dtype=torch.complex64)
    fn = F_nk.batch_norm_sbn
    with pytest.raises(ValueError, match="fft_norm"):
        fn(x, None, None, None, None, training=True, backend=backend, fft_norm="unitary")
    with pytest.raises(ValueError, match="activation"):
        fn(x, None, None, None, None, training=True, backend=backend, activation="gelu")
    with pytest.raises(ValueError, match="given together"):
        fn(x, z, z + 1, None, None, training=False, backend=backend)
    with pytest.raises(ValueError, match="shape"):
        fn(x, None, None, None, None, None, None, torch.ones(2, device=device), training=True, backend=backend)
    with pytest.raises(TypeError, match="complex"):
        fn(x, z, z + 1, z, z + 1, training=False, backend=backend)
    assert fn(x, z, z + 1, zc, z + 1, training=False, backend=backend).shape == x.shape
