"""The nn.Modules: nn.BatchNorm2d's conventions, running statistics, state_dict, bad input."""
import copy

import pytest
import torch
from torch import nn

import normkernels as nk
from references import bn_sbn_reference, l2bn_reference, sbn_reference


def rand(*shape, seed=0, dtype=torch.float64, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) + mean


def randomize_affine(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# ---------------------------------------------------------------- running statistics vs reference

def reference_running(step_stats, momentum, count):
    """Expected (running_mean, running_var) after a sequence of (batch_mean, biased_var) steps."""
    mean, var = step_stats[0][0] * 0, torch.ones_like(step_stats[0][1])
    for k, (m, v) in enumerate(step_stats, start=1):
        f = 1.0 / k if momentum is None else momentum
        mean = (1 - f) * mean + f * m
        var = (1 - f) * var + f * v * count / (count - 1)
    return mean, var


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_l2bn2d_train_then_eval_matches_reference(momentum, backend):
    layer = randomize_affine(nk.L2BatchNorm2d(3, momentum=momentum, backend=backend).double())
    xs = [rand(4, 3, 5, 6, seed=s) for s in range(3)]
    stats = []
    for x in xs:
        y = layer(x)
        u = nn.functional.normalize(x.flatten(1)).view_as(x)
        stats.append((u.mean((0, 2, 3)), u.var((0, 2, 3), unbiased=False)))
        torch.testing.assert_close(y, l2bn_reference(x, layer.weight, layer.bias), rtol=1e-9, atol=1e-9)
    rm, rv = reference_running(stats, momentum, 4 * 5 * 6)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)
    assert layer.num_batches_tracked.item() == 3
    layer.eval()
    x = rand(2, 3, 5, 6, seed=9)
    expected = l2bn_reference(x, layer.weight, layer.bias, layer.running_mean, layer.running_var, training=False)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 7)])
def test_l2bn1d(shape):
    layer = randomize_affine(nk.L2BatchNorm1d(4).double())
    x = rand(*shape, seed=3)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    expected = l2bn_reference(x, layer.weight, layer.bias, rm, rv, training=True)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)


def test_l2bn_rescale_matches_reference():
    layer = nk.L2BatchNorm2d(4, rescale=True, eps=1e-3).double()
    x = rand(3, 4, 8, 8, seed=4)
    torch.testing.assert_close(layer(x), l2bn_reference(x, None, None, rescale=True, eps=1e-3) * 1.0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sbn_train_then_eval_matches_reference(momentum):
    layer = randomize_affine(nk.SpectralBatchNorm2d(3, momentum=momentum).double())
    assert layer.running_mean.dtype == torch.complex128
    stats = []
    for s in range(2):
        x = rand(4, 3, 6, 5, seed=s)
        y = layer(x)
        expected, mean, var = sbn_reference(x, layer.weight, layer.bias)
        stats.append((mean, var))
        torch.testing.assert_close(y, expected)
    rm, rv = reference_running(stats, momentum, 4 * 6 * (5 // 2 + 1))
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)
    layer.eval()
    x = rand(2, 3, 6, 5, seed=7)
    expected, _, _ = sbn_reference(x, layer.weight, layer.bias, layer.running_mean, layer.running_var)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("algorithm", ["parseval", "fft"])
def test_sbn_algorithms_agree(algorithm):
    layer = randomize_affine(nk.SpectralBatchNorm2d(2, algorithm=algorithm).double())
    x = rand(3, 2, 4, 6, seed=5)
    torch.testing.assert_close(layer(x), sbn_reference(x, layer.weight, layer.bias)[0])


def test_bn_sbn_matches_two_modules_and_reference():
    fused = randomize_affine(nk.BatchNormSBN2d(3).double())
    pair = copy.deepcopy(fused).to_modules()
    assert isinstance(pair, nk.NormThenSBN2d) and type(pair.norm) is nn.BatchNorm2d
    x = rand(4, 3, 6, 6, seed=2, mean=5.0)
    y_ref = bn_sbn_reference(x, fused.weight, fused.bias, fused.sbn_weight, fused.sbn_bias)[0]
    torch.testing.assert_close(fused(x), y_ref)
    torch.testing.assert_close(pair(x), y_ref)
    fused_state, pair_state = fused.state_dict(), pair.state_dict()
    assert sorted(fused_state) == sorted(pair_state)  # the unfused form has the fused layer's keys
    for k in fused_state:
        torch.testing.assert_close(pair_state[k], fused_state[k], msg=k)
    fused.eval(), pair.eval()
    torch.testing.assert_close(fused(x), pair(x))
    assert fused.num_batches_tracked.item() == 1 and fused.sbn_num_batches_tracked.item() == 1


# ---------------------------------------------------------------- BatchNormSBN2d's state (#12.2-4)

BN_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
SBN_KEYS = ["sbn_" + k for k in BN_KEYS]


def test_bn_sbn_state_is_flat_with_bn_names():
    layer = nk.BatchNormSBN2d(4)
    assert not list(layer.children())  # nothing a framework converter could swap unseen
    assert sorted(layer.state_dict()) == sorted(BN_KEYS + SBN_KEYS)
    assert layer.weight.shape == (4,) and layer.sbn_running_mean.is_complex()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in layer.modules())


def test_plain_bn_checkpoint_loads_strictly_and_reports_fresh_sbn_keys():
    bn = randomize_affine(nn.BatchNorm2d(4).double())
    bn(rand(5, 4, 6, 6, seed=3, mean=2.0))
    layer = nk.BatchNormSBN2d(4).double()
    with pytest.warns(nk.FreshStateWarning) as record:
        result = layer.load_state_dict(bn.state_dict())  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert set(record[0].message.keys) == set(SBN_KEYS)
    for k in BN_KEYS:
        torch.testing.assert_close(getattr(layer, k), getattr(bn, k), rtol=0, atol=0)
    assert layer.sbn_num_batches_tracked.item() == 0 and (layer.sbn_weight == 1).all()


def test_bn_sbn_checkpoint_with_partial_sbn_state_is_an_error():
    state = nk.BatchNormSBN2d(4).state_dict()
    del state["sbn_running_var"]
    with pytest.raises(RuntimeError, match="sbn_running_var"):
        nk.BatchNormSBN2d(4).load_state_dict(state)


def test_old_nested_bn_sbn_checkpoint_loads():
    """Checkpoints of the layer before its state was flattened (bn.*, sbn.* keys) still load."""
    new = randomize_affine(nk.BatchNormSBN2d(3).double())
    new(rand(4, 3, 6, 6, seed=4))
    old = {("bn." + k if not k.startswith("sbn_") else "sbn." + k[4:]): v for k, v in new.state_dict().items()}
    fresh = nk.BatchNormSBN2d(3).double()
    fresh.load_state_dict(old)
    for k, v in new.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, msg=k)


def test_l2bn_keeps_its_statistics_when_loading_batchnorm_ones():
    """BatchNorm's statistics (state_dict version 2) are of x, not of the l2-normalized samples."""
    bn = nn.BatchNorm2d(3)
    bn(rand(8, 3, 5, 5, seed=5, dtype=torch.float32, mean=3.0))
    l2bn = nk.L2BatchNorm2d(3)
    with pytest.warns(nk.FreshStateWarning, match="wrong scale"):
        l2bn.load_state_dict(bn.state_dict())
    assert (l2bn.running_mean == 0).all() and (l2bn.running_var == 1).all()
    torch.testing.assert_close(l2bn.weight, bn.weight)
    own = nk.L2BatchNorm2d(3)
    own(rand(8, 3, 5, 5, seed=6, dtype=torch.float32))
    l2bn.load_state_dict(own.state_dict())  # an L2BN checkpoint (version 3) loads as it is
    torch.testing.assert_close(l2bn.running_var, own.running_var)


# ---------------------------------------------------------------- fft_norm (#12.9)
# These compare with torch.fft's own norm= (the literal definition per mode).

@pytest.mark.parametrize("fft_norm", ["backward", "ortho", "forward"])
@pytest.mark.parametrize("algorithm", ["parseval", "fft"])
def test_sbn_fft_norm_matches_torch_fft(fft_norm, algorithm):
    layer = randomize_affine(nk.SpectralBatchNorm2d(3, eps=1e-3, algorithm=algorithm, fft_norm=fft_norm).double())
    x = rand(4, 3, 6, 5, seed=10, mean=1.0)
    y_ref, mean, var = sbn_reference(x, layer.weight, layer.bias, eps=1e-3, fft_norm=fft_norm)
    torch.testing.assert_close(layer(x), y_ref)
    rm, rv = reference_running([(mean, var)], 0.1, 4 * 6 * 3)
    torch.testing.assert_close(layer.running_mean, rm)  # statistics of the normalized spectrum
    torch.testing.assert_close(layer.running_var, rv)
    layer.eval()
    x2 = rand(2, 3, 6, 5, seed=11)
    expected = sbn_reference(x2, layer.weight, layer.bias, layer.running_mean, layer.running_var, 1e-3, fft_norm)[0]
    torch.testing.assert_close(layer(x2), expected)


@pytest.mark.parametrize("fft_norm", ["ortho", "forward"])
def test_bn_sbn_fft_norm_matches_torch_fft(fft_norm):
    layer = randomize_affine(nk.BatchNormSBN2d(3, fft_norm=fft_norm).double())
    x = rand(4, 3, 6, 6, seed=12, mean=2.0)
    z = nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True)
    torch.testing.assert_close(layer(x), sbn_reference(z, layer.sbn_weight, layer.sbn_bias, eps=1e-5, fft_norm=fft_norm)[0])


def test_sbn_ortho_has_batchnorm_scale():
    x = rand(8, 3, 16, 16, seed=13, dtype=torch.float32)
    paper = nk.SpectralBatchNorm2d(3)(x).std().item()
    ortho = nk.SpectralBatchNorm2d(3, fft_norm="ortho")(x).std().item()
    assert abs(ortho - 1) < 0.1 and paper < 0.1  # ~1/sqrt(H*W) = 1/16 of BN's with the paper's scaling


def test_fft_norm_rejected_at_construction():
    for cls in (nk.SpectralBatchNorm2d, nk.BatchNormSBN2d):
        with pytest.raises(ValueError, match="fft_norm must be one of"):
            cls(3, fft_norm="unitary")
    assert "fft_norm='ortho'" in repr(nk.SpectralBatchNorm2d(3, fft_norm="ortho"))


# ---------------------------------------------------------------- nn.BatchNorm conventions

LAYERS = {
    "l2bn2d": lambda **kw: nk.L2BatchNorm2d(3, **kw),
    "sbn": lambda **kw: nk.SpectralBatchNorm2d(3, **kw),
    "bnsbn": lambda **kw: nk.BatchNormSBN2d(3, **kw),
}


def buffers_of(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("name", LAYERS)
def test_state_dict_round_trip(name):
    a = randomize_affine(LAYERS[name]().double())
    a(rand(4, 3, 6, 6, seed=1))
    b = LAYERS[name]().double()
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = rand(2, 3, 6, 6, seed=2)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("name", LAYERS)
def test_no_running_stats_uses_batch_stats_in_eval(name):
    layer = LAYERS[name](track_running_stats=False).double().eval()
    assert not list(layer.buffers())
    x = rand(4, 3, 6, 6, seed=3)
    torch.testing.assert_close(layer(x), layer.train()(x))


@pytest.mark.parametrize("name", LAYERS)
def test_affine_false_has_no_parameters(name):
    layer = LAYERS[name](affine=False)
    assert not list(layer.parameters())
    y = layer(rand(4, 3, 6, 6, seed=4, dtype=torch.float32))
    assert torch.isfinite(y).all()


def test_extra_repr():
    assert "l2_eps=1e-12, rescale=False" in repr(nk.L2BatchNorm2d(8))
    assert "8, eps=1e-05, momentum=0.1, affine=True" in repr(nk.SpectralBatchNorm2d(8))
    assert "algorithm='auto'" in repr(nk.SpectralBatchNorm2d(8))
    assert "BatchNormSBN2d(8, eps=1e-05" in repr(nk.BatchNormSBN2d(8))
    assert "sbn_eps=1e-05, sbn_momentum=0.1, fft_norm='backward'" in repr(nk.BatchNormSBN2d(8))


@pytest.mark.parametrize("name", LAYERS)
def test_channels_last_kept(name):
    layer = LAYERS[name]()
    x = rand(4, 3, 6, 6, seed=5, dtype=torch.float32).to(memory_format=torch.channels_last)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, LAYERS[name]()(x.contiguous()), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bad input

BAD_INPUTS = [
    ("rank", lambda: rand(4, 3, 6, dtype=torch.float32), ValueError, "3-d input"),
    ("channels", lambda: rand(4, 5, 6, 6, dtype=torch.float32), ValueError, "channels"),
    ("batch of one", lambda: rand(1, 3, 1, 1, dtype=torch.float32), ValueError, "more than 1 value"),
    ("integer", lambda: torch.ones(4, 3, 6, 6, dtype=torch.int64), TypeError, "int64"),
    ("complex", lambda: torch.ones(4, 3, 6, 6, dtype=torch.complex64), TypeError, "complex64"),
]


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("case,make,error,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_and_leaves_buffers(name, case, make, error, message):
    layer = LAYERS[name]()
    layer(rand(4, 3, 6, 6, seed=6, dtype=torch.float32))
    before = buffers_of(layer)
    with pytest.raises(error, match=message):
        layer(make())
    after = buffers_of(layer)
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)


def test_l2bn1d_rejects_4d_and_2d_rejects_3d():
    with pytest.raises(ValueError, match="4-d"):
        nk.L2BatchNorm1d(3)(rand(4, 3, 2, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="3-d"):
        nk.L2BatchNorm2d(3)(rand(4, 3, 2, dtype=torch.float32))


def test_batch_of_one_is_fine_in_eval():
    layer = nk.L2BatchNorm2d(3).eval()
    assert torch.isfinite(layer(rand(1, 3, 1, 1, dtype=torch.float32))).all()


@pytest.mark.parametrize("make", [
    lambda b: nk.L2BatchNorm1d(3, backend=b), lambda b: nk.L2BatchNorm2d(3, backend=b),
    lambda b: nk.SpectralBatchNorm2d(3, backend=b), lambda b: nk.BatchNormSBN2d(3, backend=b),
    lambda b: nk.L2BatchNormAct2d(3, backend=b)])
def test_bad_backend_rejected_at_construction(make):
    with pytest.raises(ValueError, match="backend must be one of"):
        make("bogus")


def test_backend_errors_name_the_problem():
    x = rand(4, 3, 6, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        nk.L2BatchNorm2d(3, backend="fastest")(x)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA tensor"):
            nk.L2BatchNorm2d(3, backend="cuda")(x)
    with pytest.raises(ValueError, match="no 'cuda' backend"):
        nk.SpectralBatchNorm2d(3, backend="cuda")
    with pytest.raises(ValueError, match="no 'triton' backend"):
        nk.L2BatchNorm2d(3, backend="triton")
    with pytest.raises(ValueError, match="algorithm"):
        nk.SpectralBatchNorm2d(3, algorithm="dft")


def test_backends_reports_torch():
    b = nk.backends()
    assert set(b) == {"cuda", "cpp", "triton", "torch"} and b["torch"]


def test_compiled_model_matches_eager():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nk.L2BatchNorm2d(4, backend="torch"), nn.ReLU(),
                          nk.BatchNormSBN2d(4, backend="torch"), nk.SpectralBatchNorm2d(4, backend="torch"),
                          nk.L2BatchNormAct2d(4, act_layer=nn.SiLU, backend="torch"))
    x = torch.randn(4, 3, 8, 8)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    y, yc = model(x), compiled(x)
    torch.testing.assert_close(yc, y, rtol=1e-4, atol=1e-4)
    yc.square().sum().backward()
    y.square().sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(twin[1].running_var, model[1].running_var)


@pytest.mark.parametrize("convert,mean_dtype", [
    (lambda m: m.double(), torch.complex128),
    (lambda m: m.to(torch.float16), torch.complex64),
    (lambda m: m.half().float(), torch.complex64),
])
def test_sbn_dtype_conversion_keeps_complex_running_mean(convert, mean_dtype):
    layer = nk.SpectralBatchNorm2d(3)
    layer(rand(4, 3, 6, 6, seed=8, dtype=torch.float32) * 3)
    before = layer.running_mean.clone()
    assert before.imag.abs().max() > 0
    convert(layer)
    assert layer.running_mean.dtype == mean_dtype
    assert list(layer.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    torch.testing.assert_close(layer.running_mean.to(torch.complex64), before, rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------- norm + activation (#12.7, #13.1)

ACT_LAYERS = {
    "l2bn": lambda **kw: nk.L2BatchNormAct2d(3, **kw),
    "sbn": lambda **kw: nk.SpectralBatchNormAct2d(3, **kw),
    "bnsbn": lambda **kw: nk.BatchNormSBNAct2d(3, **kw),
}
PLAIN = {"l2bn": nk.L2BatchNorm2d, "sbn": nk.SpectralBatchNorm2d, "bnsbn": nk.BatchNormSBN2d}


class TwiceGELU(nn.Module):  # an activation no kernel fuses
    def __init__(self, inplace=False):
        super().__init__()

    def forward(self, x):
        return 2 * nn.functional.gelu(x)


@pytest.mark.parametrize("name", ACT_LAYERS)
@pytest.mark.parametrize("act_layer,act_kwargs,fused", [
    (nn.ReLU, None, True), (nn.LeakyReLU, {"negative_slope": 0.2}, True), (nn.SiLU, None, True),
    ("swish", None, True), (TwiceGELU, None, False)])
def test_norm_act_equals_layer_then_activation(name, act_layer, act_kwargs, fused):
    layer = randomize_affine(ACT_LAYERS[name](act_layer=act_layer, act_kwargs=act_kwargs).double())
    plain = randomize_affine(PLAIN[name](3).double())
    act = (act_layer if not isinstance(act_layer, str) else nn.SiLU)(**(act_kwargs or {}))
    x = rand(4, 3, 6, 6, seed=20)
    torch.testing.assert_close(layer(x), act(plain(x)))
    torch.testing.assert_close(layer.running_var, plain.running_var)
    assert ("(fused)" in repr(layer)) == fused and ("unfused" in repr(layer)) == (not fused)
    assert list(layer.state_dict()) == list(plain.state_dict())


def test_norm_act_has_timms_signature():
    layer = nk.L2BatchNormAct2d(3, 1e-3, 0.2, True, True, apply_act=False, act_layer=nn.ReLU, act_kwargs=None,
                                inplace=True, drop_layer=None, device="cpu", dtype=torch.float64, rescale=True)
    assert layer.eps == 1e-3 and layer.rescale and layer.weight.dtype == torch.float64
    x = rand(4, 3, 5, 5, seed=21)
    torch.testing.assert_close(layer(x), nk.L2BatchNorm2d(3, 1e-3, 0.2, rescale=True).double()(x))
    dropped = nk.SpectralBatchNormAct2d(3, drop_layer=nn.Identity, act_layer=nn.SiLU)
    assert "(fused)" in repr(dropped)  # an Identity drop changes nothing
    with_drop = nk.SpectralBatchNormAct2d(3, drop_layer=lambda: nn.Dropout(0.5), act_layer=nn.SiLU)
    assert "unfused" in repr(with_drop) and isinstance(with_drop.drop, nn.Dropout)


# ---------------------------------------------------------------- docstrings (#12.10)

DOCUMENTED = ["L2BatchNorm1d", "L2BatchNorm2d", "SpectralBatchNorm2d", "BatchNormSBN2d", "L2BatchNormAct2d",
              "SpectralBatchNormAct2d", "BatchNormSBNAct2d"]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_docstring_lists_every_argument_and_the_shape(name):
    import inspect

    cls = getattr(nk, name)
    doc = cls.__doc__
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    missing = [p for p in params if p not in doc]
    assert not missing, f"{cls.__name__}'s docstring does not mention {missing}"
    assert "Shape:" in doc and "(N, C" in doc
    if "Spectral" in cls.__name__ or "SBN" in cls.__name__:
        assert "1/sqrt(H*W)" in doc and '"ortho"' in doc  # the output scale
