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
    x = rand(4, 3, 6, 6, seed=2, mean=5.0)
    torch.testing.assert_close(fused(x), pair(x))
    for a, b in zip(fused.state_dict().values(), pair.state_dict().values()):
        torch.testing.assert_close(a, b)
    y_ref = bn_sbn_reference(x, fused.bn.weight, fused.bn.bias, fused.sbn.weight, fused.sbn.bias)[0]
    fused.eval(), pair.eval()
    torch.testing.assert_close(fused(x), pair(x))
    assert fused.bn.num_batches_tracked.item() == 1 and fused.sbn.num_batches_tracked.item() == 1
    assert set(fused.state_dict()) >= {"bn.weight", "bn.running_mean", "sbn.running_mean", "sbn.weight"}
    assert torch.isfinite(y_ref).all()


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
    assert "BatchNorm2d(8" in repr(nk.BatchNormSBN2d(8))


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


def test_backend_errors_name_the_problem():
    x = rand(4, 3, 6, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        nk.L2BatchNorm2d(3, backend="fastest")(x)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA tensor"):
            nk.L2BatchNorm2d(3, backend="cuda")(x)
    with pytest.raises(ValueError, match="no 'cuda' backend"):
        nk.SpectralBatchNorm2d(3, backend="cuda")(x)
    with pytest.raises(ValueError, match="no 'triton' backend"):
        nk.L2BatchNorm2d(3, backend="triton")(x)
    with pytest.raises(ValueError, match="algorithm"):
        nk.SpectralBatchNorm2d(3, algorithm="dft")


def test_backends_reports_torch():
    b = nk.backends()
    assert set(b) == {"cuda", "cpp", "triton", "torch"} and b["torch"]


# ---------------------------------------------------------------- model surgery

class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.layer3 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = self.layer4(self.layer3(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_convert_bn_to_l2bn_keeps_state():
    model = TinyResNet()
    model(torch.randn(4, 3, 8, 8))
    bn = model.layer3[1]
    weight, running_mean = bn.weight, bn.running_mean.clone()
    nk.convert_bn_to_l2bn(model)
    new = model.layer3[1]
    assert isinstance(new, nk.L2BatchNorm2d) and new.weight is weight
    torch.testing.assert_close(new.running_mean, running_mean)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert isinstance(nk.convert_bn_to_l2bn(nn.BatchNorm1d(3)), nk.L2BatchNorm1d)


def test_insert_sbn_stages_and_fuse_round_trip():
    model = TinyResNet()
    nk.insert_sbn(model, stages=(4,))
    assert isinstance(model.layer4[1], nk.BatchNormSBN2d) and type(model.layer3[1]) is nn.BatchNorm2d
    assert type(model.bn1) is nn.BatchNorm2d
    x = torch.randn(4, 3, 8, 8)
    fused_out = model(x)
    nk.unfuse_bn_sbn(model)
    assert isinstance(model.layer4[1], nn.Sequential)
    torch.testing.assert_close(model.eval()(x), nk.fuse_bn_sbn(model).eval()(x))
    assert fused_out.shape == (4, 2)
    with pytest.raises(ValueError, match="no stage 'layer9'"):
        nk.insert_sbn(TinyResNet(), stages=(9,))


def test_surgery_leaves_fused_layers_whole():
    model = nk.insert_sbn(TinyResNet(), stages=(4,))
    nk.convert_bn_to_l2bn(model)
    nk.insert_sbn(model, stages=(4,))
    fused = model.layer4[1]
    assert isinstance(fused, nk.BatchNormSBN2d) and type(fused.bn) is nn.BatchNorm2d
    assert isinstance(model.layer3[1], nk.L2BatchNorm2d)


def test_compiled_model_matches_eager():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nk.L2BatchNorm2d(4, backend="torch"), nn.ReLU(),
                          nk.BatchNormSBN2d(4, backend="torch"), nk.SpectralBatchNorm2d(4, backend="torch"))
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


def resnets():
    from normkernels.models import resnet_cifar

    yield "normkernels.models.resnet_cifar(18)", resnet_cifar(18, num_classes=10)
    try:  # the real thing too, where torchvision is installed (the GPU machine has it)
        import torchvision
    except ImportError:
        return
    yield "torchvision.models.resnet18", torchvision.models.resnet18(num_classes=10)


@pytest.mark.parametrize("stages", [(4,), (3, 4)])
def test_insert_sbn_on_resnet(stages):
    for name, model in resnets():
        bns = {s: sum(type(m) is nn.BatchNorm2d for m in getattr(model, f"layer{s}").modules()) for s in (3, 4)}
        nk.insert_sbn(model, stages=stages)
        fused = {s: sum(isinstance(m, nk.BatchNormSBN2d) for m in getattr(model, f"layer{s}").modules())
                 for s in (3, 4)}
        assert fused == {s: bns[s] if s in stages else 0 for s in (3, 4)}, name
        assert not any(isinstance(m, nk.BatchNormSBN2d) for m in model.layer2.modules()), name
        out = model(torch.randn(2, 3, 32, 32))
        out.sum().backward()
        assert out.shape == (2, 10) and torch.isfinite(out).all(), name


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
