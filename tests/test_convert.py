"""Model surgery (normkernels.convert): converted models compute what their state says, keep
their checkpoint keys, and report what is fresh; recalibrate and freeze see every norm layer."""
import copy
import warnings

import pytest
import torch
from torch import nn

import normkernels as nk


def rand(*shape, seed=0, mean=0.0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * std + mean


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


def trained(model, steps=3, seed=0):
    """A model whose BN layers hold trained statistics (inputs far from mean 0, var 1)."""
    model.train()
    with torch.no_grad():
        for s in range(steps):
            model(rand(8, 3, 8, 8, seed=seed + s, mean=2.0, std=3.0))
    return model


def batches(n=4, seed=100):
    return [rand(8, 3, 8, 8, seed=seed + i, mean=2.0, std=3.0) for i in range(n)]


# ---------------------------------------------------------------- #12.1 convert_bn_to_l2bn

def test_convert_bn_to_l2bn_resets_trained_statistics_and_says_so():
    model = trained(TinyResNet())
    weight = model.layer3[1].weight
    with pytest.warns(nk.FreshStateWarning, match="wrong scale") as record:
        nk.convert_bn_to_l2bn(model)
    new = model.layer3[1]
    assert isinstance(new, nk.L2BatchNorm2d) and new.weight is weight  # parameters kept
    assert (new.running_mean == 0).all() and (new.running_var == 1).all() and new.num_batches_tracked == 0
    assert "layer3.1.running_var" in record[0].message.keys and "bn1.running_mean" in record[0].message.keys
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert isinstance(nk.convert_bn_to_l2bn(nn.BatchNorm1d(3)), nk.L2BatchNorm1d)


def test_surgery_on_a_fresh_model_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nk.convert_bn_to_l2bn(TinyResNet())
        nk.insert_sbn(TinyResNet(), stages=(3, 4))


def test_converted_model_with_batches_has_l2bn_statistics_and_a_working_eval():
    model = trained(TinyResNet())
    nk.convert_bn_to_l2bn(model, batches=batches())
    l2bn = model.layer3[1]
    assert 0 < l2bn.running_var.max() < 1e-2  # the statistics of l2-normalized samples (~1/(C*H*W))
    model.eval()
    out = model(rand(16, 3, 8, 8, seed=7, mean=2.0, std=3.0))
    # BN's statistics kept (the bug) made every output the same: std over the batch ~1e-8
    assert out.std(0).min() > 1e-3


def test_bn_checkpoint_loaded_after_conversion_keeps_l2bn_statistics():
    bn_model = trained(TinyResNet())
    model = nk.convert_bn_to_l2bn(TinyResNet(), batches=batches())
    before = model.layer4[1].running_var.clone()
    with pytest.warns(nk.FreshStateWarning, match="wrong scale"):
        model.load_state_dict(bn_model.state_dict())
    torch.testing.assert_close(model.layer4[1].running_var, before)
    torch.testing.assert_close(model.layer4[1].weight, bn_model.layer4[1].weight)


def test_convert_bn_to_l2bn_on_sync_batchnorm_keeps_it_synchronized():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4))
    nk.convert_bn_to_l2bn(model)
    from normkernels.distributed import SyncL2BatchNorm2d

    assert type(model[1]) is SyncL2BatchNorm2d


# ---------------------------------------------------------------- #12.4 insert_sbn and keys

def plain_keys(model):
    return set(model.state_dict())


SBN_SUFFIXES = ("sbn_weight", "sbn_bias", "sbn_running_mean", "sbn_running_var", "sbn_num_batches_tracked")


@pytest.mark.parametrize("form", ["fused", "unfused", "fuse_unfuse", "unfuse_fuse"])
def test_insert_sbn_keeps_checkpoint_keys(form):
    plain = trained(TinyResNet())
    model = copy.deepcopy(plain)
    with pytest.warns(nk.FreshStateWarning, match="SBN state") as record:
        nk.insert_sbn(model, stages=(3, 4), fuse=form != "unfused")
    if form == "fuse_unfuse":
        nk.fuse_bn_sbn(nk.unfuse_bn_sbn(model))
    elif form == "unfuse_fuse":
        nk.unfuse_bn_sbn(model)
    keys = set(model.state_dict())
    fresh = {f"{layer}.{s}" for layer in ("layer3.1", "layer4.1") for s in SBN_SUFFIXES}
    assert keys == plain_keys(plain) | fresh
    assert set(record[0].message.keys) == fresh
    # a plain-BN checkpoint loads strictly; SBN's state keeps its initial values (and is reported)
    with pytest.warns(nk.FreshStateWarning):
        model.load_state_dict(plain.state_dict())
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_insert_sbn_stages_and_fuse_round_trip():
    model = TinyResNet()
    nk.insert_sbn(model, stages=(4,))
    assert isinstance(model.layer4[1], nk.BatchNormSBN2d) and type(model.layer3[1]) is nn.BatchNorm2d
    assert type(model.bn1) is nn.BatchNorm2d
    x = torch.randn(4, 3, 8, 8)
    fused_out = model(x)
    nk.unfuse_bn_sbn(model)
    assert isinstance(model.layer4[1], nk.NormThenSBN2d)
    torch.testing.assert_close(model.eval()(x), nk.fuse_bn_sbn(model).eval()(x))
    assert fused_out.shape == (4, 2)
    with pytest.raises(ValueError, match="no stage 'layer9'"):
        nk.insert_sbn(TinyResNet(), stages=(9,))


def test_surgery_never_adds_a_second_sbn():
    model = nk.insert_sbn(TinyResNet(), stages=(4,))
    nk.convert_bn_to_l2bn(model)
    nk.insert_sbn(model, stages=(4,))
    assert isinstance(model.layer4[1], nk.BatchNormSBN2d)  # BN+SBN stays whole, no second SBN
    assert isinstance(model.layer3[1], nk.L2BatchNorm2d)
    unfused = nk.insert_sbn(TinyResNet(), stages=(4,), fuse=False)
    nk.insert_sbn(unfused, stages=(4,))
    assert type(unfused.layer4[1].norm) is nn.BatchNorm2d


def test_insert_sbn_after_l2bn():
    """#12.6: insert_sbn on a model already converted to L2BN."""
    model = nk.convert_bn_to_l2bn(TinyResNet())
    nk.insert_sbn(model, stages=(4,))
    pair = model.layer4[1]
    assert isinstance(pair, nk.NormThenSBN2d) and isinstance(pair.norm, nk.L2BatchNorm2d)
    x = rand(4, 3, 8, 8, seed=3)
    inner = model.layer4[0](model.layer3(model.bn1(model.conv1(x))))
    torch.testing.assert_close(pair(inner), pair.sbn(pair.norm(inner)))
    assert {"layer4.1.running_var", "layer4.1.sbn_running_var"} <= set(model.state_dict())


# ---------------------------------------------------------------- #12.6 recalibrate, freeze

def mixed_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nk.L2BatchNorm2d(4),
                         nk.BatchNormSBN2d(4), nn.Conv2d(4, 4, 1), nk.SpectralBatchNorm2d(4))


def test_recalibrate_matches_update_bn_and_covers_nk_layers():
    model = trained(mixed_model())
    reference = copy.deepcopy(model)
    data = batches(3)
    nk.recalibrate(model, [(x, 0) for x in data])  # (input, target) pairs: the input is fed
    torch.optim.swa_utils.update_bn(data, reference)  # sees torch's BatchNorm2d only
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    # the nk layers: the cumulative average over the batches, as one fresh layer per batch sees it
    l2bn = nk.L2BatchNorm2d(4, momentum=None)
    with torch.no_grad():
        for x in data:
            l2bn(model[2](model[1](model[0](x))))
    torch.testing.assert_close(model[3].running_var, l2bn.running_var)
    assert model[4].sbn_num_batches_tracked.item() == 3 and model[6].num_batches_tracked.item() == 3
    assert model[4].momentum == 0.1 and model[4].sbn_momentum == 0.1 and model.training


def test_recalibrate_with_no_batches_restores_the_statistics():
    model = trained(mixed_model())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="yielded nothing"):
        nk.recalibrate(model, [])
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_freeze_every_norm_layer():
    model = trained(mixed_model())
    keys = list(model.state_dict())
    nk.freeze(model)
    model.train()
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nk.modules._NormBase))]
    assert len(norms) == 4 and not any(m.training for m in norms)
    assert not any(p.requires_grad for m in norms for p in m.parameters())
    assert model[0].weight.requires_grad and model[0].training
    before = copy.deepcopy(model.state_dict())
    model(rand(4, 3, 8, 8, seed=5))
    for k, v in before.items():  # running statistics are used, not updated
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model).train()
    assert not twin[4].training  # freezing survives a copy
    nk.recalibrate(model, batches(1))  # frozen layers are left alone
    torch.testing.assert_close(model[3].running_var, before["3.running_var"])
    nk.unfreeze(model).train()
    assert all(m.training for m in norms) and all(p.requires_grad for m in norms for p in m.parameters())
