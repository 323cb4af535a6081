"""nk.fuse_norm_act (#13.3): norm-then-activation pairs become the NormAct layers. The fused model
computes what the unfused one does (float64: outputs, all gradients, running statistics), keeps
its Parameter objects and state_dict keys, fuses exactly the pairs it can (not the post-add
activations of residual blocks), and refuses, before changing anything, what it cannot trace.

torchvision and timm come from tests/model_zoo.py (installed by `make setup`; never skipped)."""
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import normkernels as nk
import normkernels.distributed as nkd
from model_zoo import import_timm, import_torchvision

tv = import_torchvision()
timm = import_timm()

NK_NORMS = [nk.L2BatchNorm2d, nk.SpectralBatchNorm2d, nk.BatchNormSBN2d]
NORM_ACT = (nk.L2BatchNormAct2d, nk.SpectralBatchNormAct2d, nk.BatchNormSBNAct2d)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def images(seed=0, size=32):
    return rand(2, 3, size, size, seed=seed)


# ---------------------------------------------------------------- the models

class Functional(nn.Module):
    """Norms followed by activations written as functions, and one whose output also feeds a
    residual (not fusable)."""

    def __init__(self):
        super().__init__()
        norms = [nk.L2BatchNorm2d, nk.SpectralBatchNorm2d, nk.BatchNormSBN2d, nk.L2BatchNorm2d,
                 nk.SpectralBatchNorm2d, nk.BatchNormSBN2d, nk.L2BatchNorm2d]
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(len(norms)))
        self.norms = nn.ModuleList(norm(4) for norm in norms)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        c, n = self.convs, self.norms
        x = F.relu(n[0](c[0](x)), inplace=True)
        x = F.leaky_relu(n[1](c[1](x)), 0.1)
        x = F.silu(n[2](c[2](x)))
        x = torch.relu(n[3](c[3](x)))
        x = n[4](c[4](x)).relu_()
        x = F.leaky_relu(n[5](c[5](x)), negative_slope=0.3, inplace=True)
        y = n[6](c[6](x))
        x = F.relu(y) + y  # y has two users: not fused
        return self.fc(x.mean((2, 3)))


def sequential():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nk.L2BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, padding=1), nk.SpectralBatchNorm2d(4), nn.LeakyReLU(0.2),
        nn.Conv2d(4, 4, 3, padding=1), nk.BatchNormSBN2d(4), nn.SiLU(),
        nn.Conv2d(4, 4, 3, padding=1), nk.L2BatchNorm2d(4),  # nothing after it to fuse
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def conv_norm_act():
    return nn.Sequential(tv.ops.Conv2dNormActivation(3, 4, norm_layer=nk.SpectralBatchNorm2d, activation_layer=nn.SiLU),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def tv_resnet(depth, norm_layer=nk.L2BatchNorm2d, sbn=False):
    def make():
        model = getattr(tv.models, f"resnet{depth}")(num_classes=3, norm_layer=norm_layer)
        return nk.insert_sbn(model) if sbn else model
    return make


def resnet_names(blocks, norms_per_block):
    return ["bn1"] + [f"layer{stage}.{b}.bn{i}" for stage, n in enumerate(blocks, 1) for b in range(n)
                      for i in range(1, norms_per_block + 1)]


R18 = resnet_names((2, 2, 2, 2), 1)  # the stem and each BasicBlock's bn1 (bn2 is added to the shortcut)
R50 = resnet_names((3, 4, 6, 3), 2)  # the stem and each Bottleneck's bn1, bn2 (bn3 is added)
CASES = {  # name: (factory, the fused layers, image size: 16 keeps the resnet50 runs short)
    "tv_resnet18_l2bn": (tv_resnet(18), R18, 32),
    "tv_resnet18_l2bn_sbn": (tv_resnet(18, sbn=True), R18, 32),  # NormThenSBN2d(L2BN, SBN) in layer3/4
    "tv_resnet18_bn_sbn": (tv_resnet(18, nn.BatchNorm2d, sbn=True), [n for n in R18 if n[:6] in ("layer3", "layer4")],
                           32),
    "tv_resnet50_l2bn": (tv_resnet(50), R50, 16),
    "tv_resnet50_l2bn_sbn": (tv_resnet(50, sbn=True), R50, 16),
    "timm_resnet18_sbn": (lambda: timm.create_model("resnet18", num_classes=3, norm_layer=nk.SpectralBatchNorm2d), R18,
                          32),
    "sequential": (sequential, ["1", "4", "7"], 32),
    "conv_norm_act": (conv_norm_act, ["0.1"], 32),  # torchvision's nn.Sequential subclass
    "functional": (Functional, [f"norms.{i}" for i in range(6)], 32),
}


def make(case, seed=0):
    torch.manual_seed(seed)
    return CASES[case][0]().double()


def fuse(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a successful fusion says nothing
        return nk.fuse_norm_act(model, **kwargs)


def train_step(model, x, dy, lr=0.1):
    """forward (running statistics), backward; returns the output, the input's gradient and the
    parameters' gradients by name, then takes an SGD step."""
    model.train()
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(dy)
    grads = {k: p.grad for k, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return out, x.grad, grads


def perturb(model, seed):
    """Every state tensor (parameters, running statistics, counts) set to seeded random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():  # views of the model's tensors
            if t.is_floating_point() or t.is_complex():
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            else:
                t.fill_(int(torch.randint(1, 100, (), generator=g)))
    return model


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------- equivalence, counts, state

@pytest.mark.parametrize("case", CASES)
def test_fused_model_computes_what_the_unfused_one_does(case):
    ref = make(case)
    fused, names = fuse(copy.deepcopy(ref), report=True)
    assert names == CASES[case][1]
    assert sum(isinstance(m, NORM_ACT) for m in fused.modules()) == len(names)
    size = CASES[case][2]
    x, dy = images(size=size), rand(2, 3, seed=1)
    out_r, dx_r, grads_r = train_step(ref, x, dy)
    out_f, dx_f, grads_f = train_step(fused, x, dy)
    torch.testing.assert_close(out_f, out_r)
    torch.testing.assert_close(dx_f, dx_r)
    assert grads_f.keys() == grads_r.keys()
    for k in grads_r:
        torch.testing.assert_close(grads_f[k], grads_r[k], msg=k)
    buffers_r = dict(ref.named_buffers())
    for k, b in fused.named_buffers():  # running statistics after the step
        torch.testing.assert_close(b, buffers_r[k], msg=k)
    ref.eval()
    fused.eval()
    torch.testing.assert_close(fused(images(2, size)), ref(images(2, size)))  # eval, after the SGD step


@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trips_strictly_both_ways(case):
    unfused = perturb(make(case), 1)
    fused = fuse(make(case))
    assert list(fused.state_dict()) == list(unfused.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FreshStateWarning either
        fused.load_state_dict(unfused.state_dict())  # strict
        assert_same_state(fused, unfused)
        unfused.load_state_dict(perturb(fused, 2).state_dict())
        assert_same_state(unfused, fused)


def test_fused_layers_hold_the_same_parameters_and_buffers():
    model = make("tv_resnet18_l2bn_sbn")
    params, buffers = list(model.parameters()), list(model.buffers())
    opt = torch.optim.SGD(params, lr=0.1)
    fused = fuse(model)
    assert [id(p) for p in fused.parameters()] == [id(p) for p in params]
    assert [id(b) for b in fused.buffers()] == [id(b) for b in buffers]
    weight = fused.layer4[1].bn1.sbn.weight.detach().clone()
    fused(images()).sum().backward()
    opt.step()  # the optimizer built on the unfused model trains the fused one
    assert not torch.equal(fused.layer4[1].bn1.sbn.weight, weight)


def test_torchvision_blocks_keep_the_relu_after_the_add():
    ref = make("tv_resnet18_l2bn")
    fused = fuse(copy.deepcopy(ref))
    # the stem's relu is called once: swapped in place, the model keeps its class
    assert isinstance(fused, tv.models.ResNet) and type(fused.relu) is nn.Identity
    assert type(fused.bn1) is nk.L2BatchNormAct2d and fused.bn1._act_desc == "ReLU (fused)"
    for stage in (fused.layer1, fused.layer4):
        for block in stage:
            # self.relu is called again after the residual add: the block's forward is rewritten
            assert isinstance(block, fx.GraphModule)
            assert type(block.bn1) is nk.L2BatchNormAct2d
            assert type(block.bn2) is nk.L2BatchNorm2d and type(block.relu) is nn.ReLU
            calls = [n.target for n in block.graph.nodes if n.op == "call_module"]
            assert calls.count("relu") == 1 and calls.index("relu") > calls.index("bn2")
            assert block.stride == block.conv1.stride[0]  # plain attributes carried over
    assert type(fused.layer4[0].downsample[1]) is nk.L2BatchNorm2d


def test_timm_resnet_is_fused_in_place():
    ref = make("timm_resnet18_sbn")
    model = copy.deepcopy(ref)
    fused = fuse(model)
    assert fused is model and not any(isinstance(m, fx.GraphModule) for m in fused.modules())
    assert type(fused.act1) is nn.Identity and type(fused.bn1) is nk.SpectralBatchNormAct2d
    for block in fused.layer2:
        assert type(block.act1) is nn.Identity and type(block.act2) is nn.ReLU
        assert type(block.bn1) is nk.SpectralBatchNormAct2d and type(block.bn2) is nk.SpectralBatchNorm2d
    ref.eval()
    fused.eval()
    torch.testing.assert_close(fused.forward_features(images()), ref.forward_features(images()))  # methods kept


def test_timm_resnet_with_dropout_in_its_head():
    """The root's forward depends on the training mode (F.dropout(training=self.training)); its
    stem pair is fused in place, which holds in both modes."""
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", num_classes=3, norm_layer=nk.L2BatchNorm2d, drop_rate=0.5).double()
    fused, names = fuse(copy.deepcopy(ref), report=True)
    assert names == R18
    for mode in (True, False):
        ref.train(mode)
        fused.train(mode)
        torch.manual_seed(1)
        out_r = ref(images())
        torch.manual_seed(1)
        torch.testing.assert_close(fused(images()), out_r)


def test_sync_forms_become_the_sync_norm_act_layers():
    ref = nn.Sequential(nkd.SyncL2BatchNorm2d(3), nn.ReLU(), nkd.SyncSpectralBatchNorm2d(3), nn.LeakyReLU(0.3),
                        nkd.SyncBatchNormSBN2d(3), nn.SiLU()).double()
    for m in ref[::2]:
        m.process_group = "group"  # kept as it is (not used without torch.distributed)
    fused = fuse(copy.deepcopy(ref))
    assert [type(m) for m in fused] == [nkd.SyncL2BatchNormAct2d, nn.Identity, nkd.SyncSpectralBatchNormAct2d,
                                        nn.Identity, nkd.SyncBatchNormSBNAct2d, nn.Identity]
    assert [m.process_group for m in fused[::2]] == ["group"] * 3
    assert fused[2]._negative_slope == 0.3
    torch.testing.assert_close(fused(images()), ref(images()))


def test_deepcopy_and_pickle_keep_the_fused_model():
    fused = fuse(make("tv_resnet18_l2bn")).eval()
    out = fused(images())
    for copied in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert list(copied.state_dict()) == list(fused.state_dict())
        assert type(copied.layer2[0].bn1) is nk.L2BatchNormAct2d
        torch.testing.assert_close(copied(images()), out, rtol=0, atol=0)


def test_frozen_layers_stay_frozen():
    model = sequential().double()
    nk.freeze(model)
    model.eval()  # (in training mode the frozen norms are in eval mode, their activations not: no fusion)
    fused = fuse(model)
    fused.train()
    assert type(fused[1]) is nk.L2BatchNormAct2d and not fused[1].training and not fused[1].weight.requires_grad
    nk.unfreeze(fused)
    fused.train()
    assert fused[1].training and fused[1].weight.requires_grad


# ---------------------------------------------------------------- the kink

class Block(nn.Module):
    def __init__(self, norm, act):
        super().__init__()
        self.conv, self.norm, self.act = nn.Conv2d(3, 4, 3, padding=1), norm, act

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class FunctionalBlock(Block):
    def forward(self, x):
        y = self.norm(self.conv(x))
        return F.leaky_relu(y, self.act.negative_slope) if isinstance(self.act, nn.LeakyReLU) else F.relu(y)


@pytest.mark.parametrize("form", ["sequential", "module", "function"])
@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.2)], ids=["relu", "leaky_relu"])
@pytest.mark.parametrize("norm_cls", NK_NORMS, ids=lambda c: c.__name__)
def test_the_kink_gets_the_unfused_gradient(norm_cls, act, form):
    """Where the norm's output is exactly 0 (channels 0, 1: zero weight and bias), relu'(0) = 0
    and leaky_relu'(0) = negative_slope, as in the unfused pair."""
    torch.manual_seed(0)
    norm = norm_cls(4)
    prefix = "sbn_" if norm_cls is nk.BatchNormSBN2d else ""  # the last affine step before the act
    with torch.no_grad():
        getattr(norm, prefix + "weight")[:2] = 0
        getattr(norm, prefix + "bias")[:2] = 0
    if form == "sequential":
        ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm, copy.deepcopy(act))
    else:
        ref = (Block if form == "module" else FunctionalBlock)(norm, copy.deepcopy(act))
    ref = ref.double()
    fused, names = fuse(copy.deepcopy(ref), report=True)
    assert names == ["1" if form == "sequential" else "norm"]
    assert isinstance(fused, fx.GraphModule) == (form == "function")
    x, dy = rand(2, 3, 6, 6), rand(2, 4, 6, 6, seed=1)
    conv = ref[0] if form == "sequential" else ref.conv
    ref.train()
    assert (norm(conv(x))[:, :2] == 0).all()  # the inputs are on the kink
    out_r, dx_r, grads_r = train_step(ref, x, dy)
    out_f, dx_f, grads_f = train_step(fused, x, dy)
    torch.testing.assert_close(out_f, out_r)
    torch.testing.assert_close(dx_f, dx_r)
    for k in grads_r:
        torch.testing.assert_close(grads_f[k], grads_r[k], msg=k)
    kink_grad = grads_r[("1." if form == "sequential" else "norm.") + prefix + "weight"][:2]
    assert (kink_grad == 0).all() if isinstance(act, nn.ReLU) else (kink_grad != 0).all()


# ---------------------------------------------------------------- what is not fused

class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 3, 1), nk.L2BatchNorm2d(3), nn.ReLU()

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.act(y) + y  # the norm's output has two users


class OnlyInTraining(Residual):
    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.act(y) if self.training else y


def hooked():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nk.L2BatchNorm2d(3), nn.ReLU())
    model[1].register_forward_hook(lambda m, i, o: None)  # would see the activated output
    return model


def mixed_modes():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nk.SpectralBatchNorm2d(3), nn.ReLU())
    model[1].eval()
    return model


NOTHING = {
    "torch_bn": lambda: tv.models.resnet18(num_classes=3),  # torch's BatchNorm: convert it first
    "residual": Residual,
    "only_in_training": OnlyInTraining,
    "no_activation": lambda: nn.Sequential(nn.Conv2d(3, 3, 1), nk.BatchNormSBN2d(3), nn.Conv2d(3, 3, 1)),
    "hooked": hooked,
    "mixed_modes": mixed_modes,
}


@pytest.mark.parametrize("case", NOTHING)
def test_a_model_with_nothing_to_fuse_is_returned_unchanged(case):
    torch.manual_seed(0)
    model = NOTHING[case]().double()
    before = copy.deepcopy(model)
    kinds = [(name, type(m)) for name, m in model.named_modules()]
    with pytest.warns(UserWarning, match="nothing to fuse"):
        result, names = nk.fuse_norm_act(model, report=True)
    assert result is model and names == []
    assert [(name, type(m)) for name, m in model.named_modules()] == kinds
    assert_same_state(model, before)
    model.eval()
    before.eval()
    torch.testing.assert_close(model(images()), before(images()), rtol=0, atol=0)


def test_fusing_twice_fuses_nothing_more():
    fused = fuse(make("tv_resnet18_l2bn"))
    with pytest.warns(UserWarning, match="nothing to fuse"):
        again = nk.fuse_norm_act(fused)
    assert again is fused


# ---------------------------------------------------------------- what cannot be traced

class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 1), nk.L2BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        if y.sum() > 0:  # control flow on data: torch.fx cannot trace it
            y = y * 2
        return y


class TrainingBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nk.L2BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))  # a function: fusing it rewrites this forward
        return y * 2 if self.training else y


def partly_untraceable(owner_cls):
    torch.manual_seed(0)
    return nn.Sequential(owner_cls(), nn.Sequential(nn.Conv2d(4, 4, 1), nk.L2BatchNorm2d(4), nn.ReLU())).double()


@pytest.mark.parametrize("owner_cls, reason", [(DataDependent, "cannot trace"),
                                               (TrainingBranch, "depends on the training mode")])
def test_what_cannot_be_rewritten_raises_and_changes_nothing(owner_cls, reason):
    model = partly_untraceable(owner_cls)
    kinds = [(name, type(m)) for name, m in model.named_modules()]
    with pytest.raises(RuntimeError, match=rf"called by 0 \({owner_cls.__name__}\): .*{reason}.*Nothing was changed"):
        nk.fuse_norm_act(model)
    assert [(name, type(m)) for name, m in model.named_modules()] == kinds  # not even the Sequential pair


@pytest.mark.parametrize("owner_cls", [DataDependent, TrainingBranch])
def test_strict_false_fuses_the_rest(owner_cls):
    ref = partly_untraceable(owner_cls)
    model = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match=rf"left unfused .*0 \({owner_cls.__name__}\)"):
        fused, names = nk.fuse_norm_act(model, strict=False, report=True)
    assert fused is model and names == ["1.1"]
    assert type(model[0].bn) is nk.L2BatchNorm2d and type(model[1][1]) is nk.L2BatchNormAct2d
    for mode in (True, False):
        ref.train(mode)
        model.train(mode)
        torch.testing.assert_close(model(images()), ref(images()))
