"""The layers inside the real torchvision and timm model code (#12.2, 3, 4, 6, 7).

torchvision and timm are installed by `make setup` (tests/model_zoo.py imports them on any torch
build); these tests never skip."""
import copy

import pytest
import torch
from torch import nn

import normkernels as nk
import normkernels.distributed as nkd
from model_zoo import import_timm, import_torchvision

tv = import_torchvision()
timm = import_timm()
NK_LAYERS = [nk.L2BatchNorm2d, nk.SpectralBatchNorm2d, nk.BatchNormSBN2d]
pytestmark = pytest.mark.filterwarnings("ignore::normkernels.FreshStateWarning")


def images(n=2, seed=0, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def norm_kinds(model):
    return {type(m) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm,
                                                               nk.modules._NormBase))}


def runs(model):
    out = model(images())
    out.sum().backward()
    assert torch.isfinite(out).all()
    return out


def test_torchvision_zero_init_residual_with_bn_sbn():
    """#12.3: resnet18(zero_init_residual=True, norm_layer=nk.BatchNormSBN2d) used to raise."""
    model = tv.models.resnet18(num_classes=3, zero_init_residual=True, norm_layer=nk.BatchNormSBN2d)
    assert all((block.bn2.weight == 0).all() for layer in (model.layer1, model.layer4) for block in layer)
    runs(model)


def test_timm_zero_init_last_with_bn_sbn():
    """#12.3: timm's zero_init_last used to skip BatchNormSBN2d silently."""
    model = timm.create_model("resnet18", num_classes=3, norm_layer=nk.BatchNormSBN2d, zero_init_last=True)
    assert all((block.bn2.weight == 0).all() for block in model.layer4)
    runs(model)


@pytest.mark.parametrize("norm_layer", NK_LAYERS, ids=lambda c: c.__name__)
def test_timm_efficientnet_takes_nk_layers(norm_layer):
    """#12.7: create_model('efficientnet_b0', norm_layer=nk.L2BatchNorm2d) used to assert
    "No equivalent norm_act layer"."""
    model = timm.create_model("efficientnet_b0", num_classes=3, norm_layer=norm_layer)
    norm_act = {nk.L2BatchNorm2d: nk.L2BatchNormAct2d, nk.SpectralBatchNorm2d: nk.SpectralBatchNormAct2d,
                nk.BatchNormSBN2d: nk.BatchNormSBNAct2d}[norm_layer]
    assert norm_kinds(model) == {norm_act}  # no torch BatchNorm left
    acts = {layer._act_desc for layer in model.modules() if isinstance(layer, norm_act)}
    assert acts == {"SiLU (fused)", "identity"}  # the model's own act_layer, fused; apply_act=False
    runs(model)


@pytest.mark.parametrize("norm_layer", NK_LAYERS, ids=lambda c: c.__name__)
def test_timm_resnet_takes_nk_layers(norm_layer):
    model = timm.create_model("resnet18", num_classes=3, norm_layer=norm_layer)
    assert norm_kinds(model) == {norm_layer}
    runs(model)


def test_plain_efficientnet_checkpoint_loads_into_the_bn_sbn_model():
    plain = timm.create_model("efficientnet_b0", num_classes=3)
    plain.train()(images(4))  # statistics that are not the initial ones
    model = timm.create_model("efficientnet_b0", num_classes=3, norm_layer=nk.BatchNormSBN2d)
    with pytest.warns(nk.FreshStateWarning, match="no SBN state"):
        model.load_state_dict(plain.state_dict())  # strict
    state = model.state_dict()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("fuse", [True, False])
def test_insert_sbn_keeps_torchvision_checkpoint_keys(fuse):
    """#12.4: strict loading of a plain-BN checkpoint into the SBN4 model used to fail, and
    strict=False left 40 layer4 tensors at their initial values."""
    plain = tv.models.resnet18(num_classes=3)
    plain.train()(images(4))
    model = nk.insert_sbn(copy.deepcopy(tv.models.resnet18(num_classes=3)), stages=(4,), fuse=fuse)
    model.load_state_dict(plain.state_dict())
    state = model.state_dict()
    layer4 = [k for k in plain.state_dict() if k.startswith("layer4.")]
    assert sum(".bn" in k or "downsample.1" in k for k in layer4) == 25  # 5 BN layers' state
    for k in layer4:
        torch.testing.assert_close(state[k], plain.state_dict()[k], rtol=0, atol=0, msg=k)
    runs(model)


def test_timm_freeze_batch_norm_2d_freezes_nk_layers():
    """#12.6: timm's freeze_batch_norm_2d used to crash on BatchNormSBN2d
    ('FrozenBatchNorm2d' object has no attribute 'track_running_stats') and skip the nk layers."""
    model = nk.insert_sbn(timm.create_model("resnet18", num_classes=3, norm_layer=nn.BatchNorm2d), stages=(4,))
    model.layer3[0].bn1 = nk.L2BatchNorm2d(256)
    model = timm.layers.freeze_batch_norm_2d(model)
    model.train()
    nk_layers = [m for m in model.modules() if isinstance(m, nk.modules._NormBase)]
    assert len(nk_layers) == 6  # layer4's 5 BN+SBN and the L2BN
    assert not any(m.training or any(p.requires_grad for p in m.parameters()) for m in nk_layers)
    assert type(model.layer1[0].bn1).__name__ == "FrozenBatchNorm2d"  # torch's BN: timm's own freezing
    model = timm.layers.unfreeze_batch_norm_2d(model)
    assert all(p.requires_grad for m in nk_layers for p in m.parameters())


def test_timm_convert_sync_batchnorm_synchronizes_nk_layers():
    """#12.2: timm's converter must not leave a model half-synchronized."""
    model = nk.insert_sbn(timm.create_model("resnet18", num_classes=3), stages=(4,))
    model = timm.layers.convert_sync_batchnorm(model)
    assert norm_kinds(model) == {nn.SyncBatchNorm, nkd.SyncBatchNormSBN2d}
    effnet = timm.layers.convert_sync_batchnorm(timm.create_model("efficientnet_b0", norm_layer=nk.L2BatchNorm2d))
    assert norm_kinds(effnet) == {nkd.SyncL2BatchNormAct2d}


def test_convert_bn_to_l2bn_on_timm_batch_norm_act():
    """#12.6: convert_bn_to_l2bn used to skip timm's BatchNormAct2d."""
    model = timm.create_model("efficientnet_b0", num_classes=3)
    model.train()(images(4))
    nk.convert_bn_to_l2bn(model, batches=[images(8, seed=s) for s in range(2)])
    assert norm_kinds(model) == {nk.L2BatchNormAct2d}
    assert {m._act_desc for m in model.modules() if isinstance(m, nk.L2BatchNormAct2d)} == {"SiLU (fused)",
                                                                                          "identity"}
    model.eval()
    out = model(images(8, seed=9))
    assert out.std(0).min() > 1e-4  # statistics at L2BN's scale: outputs depend on the input


@pytest.mark.parametrize("stages", [(4,), (3, 4)])
def test_insert_sbn_on_resnets(stages):
    from normkernels.models import resnet_cifar

    for name, model in [("resnet_cifar(18)", resnet_cifar(18, num_classes=10)),
                        ("torchvision resnet18", tv.models.resnet18(num_classes=10))]:
        bns = {s: sum(type(m) is nn.BatchNorm2d for m in getattr(model, f"layer{s}").modules()) for s in (3, 4)}
        nk.insert_sbn(model, stages=stages)
        fused = {s: sum(isinstance(m, nk.BatchNormSBN2d) for m in getattr(model, f"layer{s}").modules())
                 for s in (3, 4)}
        assert fused == {s: bns[s] if s in stages else 0 for s in (3, 4)}, name
        assert not any(isinstance(m, nk.BatchNormSBN2d) for m in model.layer2.modules()), name
        out = model(images())
        out.sum().backward()
        assert out.shape == (2, 10) and torch.isfinite(out).all(), name
