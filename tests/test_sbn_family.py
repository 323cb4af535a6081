"""The SBN family (BN+SBN; SBN is it with the BN stage off) on every path of the test's device
against the float64 literal of tests/references.py (sbn_reference: rfft2 -> complex mean, modulus
variance -> normalize, affine -> irfft2 with torch.fft's norm; bn_sbn_reference: F.batch_norm
first), followed by the activation: outputs, batch statistics, the input gradient and every
parameter gradient.

Paths: the family's op (normkernels.ops.sbn.forward) on the device's dispatcher ops ("native": the
C++ kernels on CPU, Triton on CUDA) and on the torch oracle; for SBN also the literal "fft" path."""
import pytest
import torch
import torch.nn.functional as F

import normkernels.functional as F_nk
from normkernels.ops import _act
from normkernels.ops import sbn as S
from normkernels.ops import sbn_fft
from references import bn_sbn_reference, sbn_reference
from sbn_cases import F64, TOL, check, expected_format, gen, grads, leaf, make_params, make_x, resolve

BN_EPS, SBN_EPS = 1e-5, 2e-5
STAGE = {False: "sbn", True: "bnsbn"}
# (bn, algorithm, backend): the literal FFT path is SBN's alone
PATHS = [(False, "parseval", "native"), (False, "parseval", "torch"), (False, "fft", "native"),
         (True, "parseval", "native"), (True, "parseval", "torch")]
PATH_IDS = [f"{STAGE[bn]}-{a}-{b}" for bn, a, b in PATHS]
BACKENDS = [(bn, b) for bn in (False, True) for b in ("native", "torch")]
BACKEND_IDS = [f"{STAGE[bn]}-{b}" for bn, b in BACKENDS]


def run(x, bn, params, stats, algorithm, backend, fft_norm="backward", act="identity", slope=0.1):
    """params = (bn_weight, bn_bias, sbn_weight, sbn_bias), stats = (bn_mean, bn_var, sbn_mean,
    sbn_var) or None (training) -> (y, bn_mean, bn_var, sbn_mean (C, 2), sbn_var)."""
    bm, bv, sm, sv = stats if stats is not None else (None,) * 4
    if sm is not None and sm.is_complex():
        sm = torch.view_as_real(sm)
    if algorithm == "fft":
        y, m, v = sbn_fft.sbn_fft_forward(x, params[2], params[3], sm, sv, SBN_EPS, fft_norm, backend)
        return _act.act_forward(y, act, slope), None, None, m, v
    return S.forward(x, bn, params[0], params[1], bm, bv, params[2], params[3], sm, sv, BN_EPS, SBN_EPS, fft_norm,
                     act, slope, backend)[:5]


def eval_stats(bn, C, device, g, fft_norm, HW, shift=0.0):
    """Plausible running statistics, float32: BN's (C,) (of data around `shift`; None with the BN
    stage off), SBN's in fft_norm's scale ((C, 2) mean)."""
    f2 = {"backward": 1.0, "ortho": 1.0 / HW, "forward": 1.0 / HW ** 2}[fft_norm]
    bm = torch.randn(C, generator=g, device=device, dtype=F64) * 0.2 + shift
    bv = torch.rand(C, generator=g, device=device, dtype=F64) + 0.5
    sm = torch.randn(C, 2, generator=g, device=device, dtype=F64) * (2 * f2 ** 0.5)
    sv = (torch.rand(C, generator=g, device=device, dtype=F64) * 3 + 0.5) * HW * f2
    if not bn:
        return None, None, sm.float(), sv.float()
    return tuple(t.float() for t in (bm, bv, sm, sv))


def reference(x, bn, params, stats, fft_norm, act, slope):
    """The float64 literal -> (y, bn_mean, bn_var, sbn_mean (complex), sbn_var)."""
    if bn:
        y, *st = bn_sbn_reference(x, *params, stats, BN_EPS, SBN_EPS, fft_norm)
    else:
        sm, sv = (None, None) if stats is None else stats[2:]
        y, m, v = sbn_reference(x, params[2], params[3], sm, sv, SBN_EPS, fft_norm)
        st = [None, None, m, v]
    return [_act.act_forward(y, act, slope)] + st


def compare(device, bn, algorithm, backend, shape, dtype=torch.float32, fft_norm="backward", act="identity",
            slope=0.1, shift=0.0, affine=(True, True), train=True, layout="contiguous", seed=0, tol=None):
    """The path against the literal on the same (rounded) values: y, the batch statistics, dx and
    the parameter gradients."""
    backend = resolve(backend, device)
    g = gen(device, seed)
    N, C, H, W = shape
    x = make_x(shape, dtype, device, g, shift, layout)
    pdt = F64 if dtype == F64 else torch.float32
    bw, bb = make_params(C, device, g, pdt) if affine[0] and bn else (None, None)
    sw, sb = make_params(C, device, g, pdt) if affine[1] else (None, None)
    stats = None if train else eval_stats(bn, C, device, g, fft_norm, H * W, shift)
    dy = torch.randn(shape, generator=g, device=device, dtype=F64).to(dtype)
    tol = tol or TOL[dtype]

    ins = [leaf(t) for t in (x, bw, bb, sw, sb)]
    y, bm, bv, sm, sv = run(ins[0], bn, ins[1:], stats, algorithm, backend, fft_norm, act, slope)
    got = grads(y, ins, dy)

    acc = F64 if dtype == F64 else torch.float32
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=expected_format(x))
    assert sm.shape == (C, 2) and sv.shape == (C,)
    if algorithm == "parseval":
        assert bm.shape == bv.shape == ((C,) if bn else (0,))  # no BN stage, no BN statistics
    outs = [t for t in (bm, bv, sm, sv) if t is not None]
    assert all(t.dtype == acc and not t.requires_grad for t in outs)

    refs = [leaf(None if t is None else t.to(F64)) for t in (x, bw, bb, sw, sb)]
    rstats = None
    if stats is not None:
        rstats = (None if stats[0] is None else stats[0].double(), None if stats[1] is None else stats[1].double(),
                  torch.view_as_complex(stats[2].double().contiguous()), stats[3].double())
    yr, *stat_ref = reference(refs[0], bn, refs[1:], rstats, fft_norm, act, slope)
    ref = grads(yr, refs, dy.to(F64))

    check("y", y, yr, tol)
    for name, a, r in zip(("bn_mean", "bn_var", "sbn_mean", "sbn_var"), (bm, bv, sm, sv), stat_ref):
        if r is None:
            continue
        if r.is_complex():
            a = torch.view_as_complex(a.to(F64).contiguous())
        check(name, a, r.detach(), tol)
    for i, name in enumerate(("dx", "dbn_weight", "dbn_bias", "dsbn_weight", "dsbn_bias")):
        if ins[i] is None:
            continue
        assert got[i].dtype == ins[i].dtype
        check(name, got[i], ref[i], tol, floor=0.0 if i == 0 else 1.0)
    if stats is not None:  # eval returns the statistics it used
        for a, s in zip((bm, bv, sm, sv), stats):
            if s is not None:
                assert torch.equal(a.to(s.dtype), s)


CASES = {
    "even_W": dict(shape=(4, 3, 6, 8)),
    "odd_W": dict(shape=(3, 4, 5, 7)),
    "no_affine": dict(shape=(3, 4, 5, 7), affine=(False, False)),
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


@pytest.mark.parametrize("bn,algorithm,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_literal(device, bn, algorithm, backend, case):
    compare(device, bn, algorithm, backend, **CASES[case])


@pytest.mark.parametrize("bn,algorithm,backend", PATHS, ids=PATH_IDS)
def test_H_W_1_training(device, bn, algorithm, backend):
    """1x1 maps: with the BN stage, SBN normalizes the same N values BN just normalized (its input
    gradient is ~eps-sized): outputs and statistics still match, gradients to an absolute bound."""
    compare(device, bn, algorithm, backend, (6, 3, 1, 1), dtype=F64, tol=1e-7 if bn else None)


@pytest.mark.parametrize("bn,algorithm,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("fft_norm", ["backward", "ortho", "forward"])
@pytest.mark.parametrize("train", [True, False])
def test_fft_norm_modes(device, bn, algorithm, backend, fft_norm, train):
    compare(device, bn, algorithm, backend, (3, 3, 5, 6), fft_norm=fft_norm, train=train)
    compare(device, bn, algorithm, backend, (2, 2, 4, 4), fft_norm=fft_norm, train=train, layout="channels_last",
            seed=1)


@pytest.mark.parametrize("bn,algorithm,backend", PATHS, ids=PATH_IDS)
def test_ortho_has_batchnorm_scale(device, bn, algorithm, backend):
    """'ortho' gives zero-mean data BatchNorm's unit spread; the paper's 'backward' 1/sqrt(HW) of it."""
    x = make_x((8, 4, 8, 8), torch.float32, device, gen(device)) * 3  # zero-mean: the DC bin is not special
    none = (None,) * 4
    y_o = run(x, bn, none, None, algorithm, resolve(backend, device), "ortho")[0]
    y_b = run(x, bn, none, None, algorithm, resolve(backend, device), "backward")[0]
    assert 0.9 < y_o.std().item() < 1.1
    torch.testing.assert_close(y_b * 8.0, y_o, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bn,algorithm,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("train", [True, False])
def test_activation_matches_layer_then_act(device, bn, algorithm, backend, act, train):
    compare(device, bn, algorithm, backend, (3, 3, 5, 6), dtype=F64, act=act, slope=0.2, train=train,
            fft_norm="ortho")
    compare(device, bn, algorithm, backend, (3, 4, 4, 7), act=act, train=train, seed=2, layout="channels_last")


@pytest.mark.parametrize("bn,backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("act,fn", [("relu", F.relu), ("leaky_relu", lambda t: F.leaky_relu(t, 0.3))])
def test_kink_gets_the_unfused_gradient(device, bn, backend, act, fn):
    """pre exactly 0 (eval; BN's mean 0, no biases, SBN mean 0; zero inputs): the fused layer's
    gradients equal those of the same layer followed by torch's activation (relu'(0) = 0,
    leaky_relu'(0) = slope)."""
    backend = resolve(backend, device)
    g = gen(device)
    C = 3
    x = make_x((2, C, 4, 5), torch.float32, device, g)
    x[:, :, 1:3, ::2] = 0.0
    x[:, :, 0, 0] = 0.0
    bw, _ = make_params(C, device, g)
    sw, _ = make_params(C, device, g)
    stats = (torch.zeros(C, device=device) if bn else None,
             torch.rand(C, generator=g, device=device) + 0.5 if bn else None,
             torch.zeros(C, 2, device=device), torch.rand(C, generator=g, device=device) + 1.0)
    dy = torch.randn(x.shape, generator=g, device=device)
    outs = []
    for fused in (True, False):
        ins = [leaf(x), leaf(bw) if bn else None, None, leaf(sw), None]
        y = run(ins[0], bn, ins[1:], stats, "parseval", backend, act=act if fused else "identity", slope=0.3)[0]
        if not fused:
            assert bool((y[x == 0] == 0).all())
            y = fn(y)
        outs.append([y] + [t for t in grads(y, ins, dy) if t is not None])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bn,backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("train", [True, False])
def test_gradcheck(device, bn, backend, train):
    backend = resolve(backend, device)
    g = gen(device, 3)
    x = make_x((2, 3, 4, 5), F64, device, g).requires_grad_()
    params = [t.double().requires_grad_() for t in make_params(3, device, g) + make_params(3, device, g)]
    if not bn:
        params = params[2:]
    stats = None
    if not train:
        stats = tuple(None if t is None else t.double() for t in eval_stats(bn, 3, device, g, "ortho", 20))

    def f(x, *p):
        full = p if bn else (None, None) + p
        return run(x, bn, full, stats, "parseval", backend, "ortho", "silu")[0]

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


@pytest.mark.parametrize("fft_norm", ["backward", "ortho"])
@pytest.mark.parametrize("train", [True, False])
def test_parseval_equals_fft_in_float64(device, fft_norm, train):
    backend = resolve("native", device)
    g = gen(device, 4)
    x = make_x((3, 4, 6, 7), F64, device, g) * 2 + 5
    w, b = (t.double() for t in make_params(4, device, g))
    stats = None
    if not train:
        stats = tuple(None if t is None else t.double() for t in eval_stats(False, 4, device, g, fft_norm, 42))
    dy = torch.randn(x.shape, generator=g, device=device, dtype=F64)
    res = []
    for algorithm in ("parseval", "fft"):
        xx, ww, bb = leaf(x), leaf(w), leaf(b)
        y, _, _, m, v = run(xx, False, (None, None, ww, bb), stats, algorithm, backend, fft_norm, "leaky_relu")
        res.append([y, m, v] + grads(y, (xx, ww, bb), dy))
    for a, r in zip(*res):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("bn", [False, True], ids=["sbn", "bnsbn"])
def test_eval_accepts_the_complex_running_mean(device, bn):
    backend = resolve("native", device)
    g = gen(device, 5)
    x = make_x((2, 3, 4, 5), torch.float32, device, g)
    bm, bv, sm, sv = eval_stats(bn, 3, device, g, "backward", 20)
    none = (None,) * 4
    a = run(x, bn, none, (bm, bv, sm, sv), "parseval", backend)[0]
    b = run(x, bn, none, (bm, bv, torch.view_as_complex(sm.contiguous()), sv), "parseval", backend)[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_bad_arguments_raise_clear_errors(device, backend):
    """functional is where the family's inputs are validated (the ops below it trust them)."""
    backend = resolve(backend, device)
    x = make_x((2, 3, 4, 5), torch.float32, device, gen(device))
    z = torch.zeros(3, device=device)
    zc = torch.zeros(3, device=device, dtype=torch.complex64)
    sbn, bnsbn = F_nk.spectral_batch_norm, F_nk.batch_norm_sbn
    for call in (lambda **kw: sbn(x, None, None, training=True, backend=backend, **kw),
                 lambda **kw: bnsbn(x, None, None, None, None, training=True, backend=backend, **kw)):
        with pytest.raises(ValueError, match="fft_norm"):
            call(fft_norm="unitary")
        with pytest.raises(ValueError, match="activation"):
            call(activation="gelu")
    with pytest.raises(ValueError, match="running_mean and running_var"):
        sbn(x, zc, None, training=True, backend=backend)
    with pytest.raises(ValueError, match="shape"):
        sbn(x, None, None, torch.ones(4, device=device), training=True, backend=backend)
    with pytest.raises(ValueError, match="algorithm"):
        sbn(x, None, None, training=True, algorithm="dft", backend=backend)
    with pytest.raises(ValueError, match="given together"):
        bnsbn(x, z, z + 1, None, None, training=False, backend=backend)
    with pytest.raises(ValueError, match="shape"):
        bnsbn(x, None, None, None, None, None, None, torch.ones(2, device=device), training=True, backend=backend)
    with pytest.raises(TypeError, match="complex"):
        bnsbn(x, z, z + 1, z, z + 1, training=False, backend=backend)
    assert bnsbn(x, z, z + 1, zc, z + 1, training=False, backend=backend).shape == x.shape


def test_triton_on_cpu_goes_through_the_op(monkeypatch):
    """backend 'triton' calls the family's dispatcher op (whose CUDA kernel is the Triton host
    function, or its CPU kernel inside normkernels.triton.sbn.on_cpu()) and returns its outputs."""
    calls = []

    def forward(*args):
        calls.append(args)
        x = args[0]
        C = x.shape[1]
        return x * 2, x.new_zeros(0), x.new_zeros(0), x.new_zeros(C, 2), x.new_ones(C), x.new_zeros(C, 26)

    monkeypatch.setattr(S, "_NATIVE", (forward,) + S._NATIVE[1:])
    x = torch.randn(2, 3, 4, 5)
    y, _, _, m, v = run(x, False, (None,) * 4, None, "parseval", "triton", "ortho", "relu", 0.5)
    assert torch.equal(y, x * 2) and m.shape == (3, 2) and v.shape == (3,)
    assert len(calls) == 1 and calls[0][1] is False and calls[0][12:] == ("ortho", "relu", 0.5)
