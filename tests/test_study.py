"""normkernels.models and normkernels.study (quick mode end to end on a tiny budget)."""
import csv
import os

import pytest
import torch
from torch import nn

import normkernels as nk
from normkernels import models, study

from model_zoo import import_torchvision


# ----------------------------------------------------------------------------- models


def _classes(model):
    return [type(m) for m in model.modules()]


def test_small_cnn_uses_the_requested_normalization():
    x = torch.randn(4, 1, 16, 16)
    for norm in models.NORMS:
        for block in ("plain", "resnet"):
            m = models.SmallCNN(10, 1, norm=norm, block=block)
            assert m(x).shape == (4, 10)
            names = dict(m.named_modules())
            assert all(n in names for n in m.diagnostic_layers())
    bn_sbn = models.SmallCNN(norm="bn_sbn")
    assert isinstance(bn_sbn.stem.norm, nn.BatchNorm2d)
    assert isinstance(bn_sbn.stages[0][0].norm, nn.BatchNorm2d)
    for stage in bn_sbn.stages[1:]:                        # SBN only in the later stages
        for blk in stage:
            assert isinstance(blk.norm, nk.BatchNormSBN2d)
    l2 = models.SmallCNN(norm="l2bn")
    assert sum(isinstance(m, nk.L2BatchNorm2d) for m in l2.modules()) == 7
    none = models.SmallCNN(norm="none")
    assert not any("Norm" in c.__name__ for c in _classes(none))
    assert none.stem.conv.bias is not None and l2.stem.conv.bias is None
    with pytest.raises(ValueError):
        models.SmallCNN(norm="layernorm")


def test_torchvision_compatible_resnets():
    # parameter counts of torchvision's resnet50 / resnet18
    assert sum(p.numel() for p in models.resnet50().parameters()) == 25_557_032
    assert sum(p.numel() for p in models.resnet18().parameters()) == 11_689_512
    keys = models.resnet50(num_classes=7).state_dict().keys()
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.1.weight",
              "layer4.2.bn3.bias", "layer3.5.conv2.weight", "fc.weight"):
        assert k in keys
    m = models.resnet_cifar(18, num_classes=10)
    assert isinstance(m.maxpool, nn.Identity) and m.conv1.kernel_size == (3, 3)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError):
        models.resnet_cifar(20)
    m = models.resnet18(num_classes=5, norm_layer=models.norm_factory("l2bn"))
    assert isinstance(m.layer2[0].bn1, nk.L2BatchNorm2d)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_resnet_state_dict_matches_torchvision():
    tv = import_torchvision()  # installed by `make setup`: never skipped
    for ours, theirs in ((models.resnet50(), tv.models.resnet50()),
                         (models.resnet18(), tv.models.resnet18())):
        a, b = ours.state_dict(), theirs.state_dict()
        assert list(a) == list(b)
        assert all(a[k].shape == b[k].shape for k in a)


# ----------------------------------------------------------------------------- study


def test_load_data_shapes_and_split():
    xtr, ytr, xte, yte = study.load_data(16)
    assert xtr.shape == (1437, 1, 16, 16) and xte.shape == (360, 1, 16, 16)
    assert abs(xtr.mean().item()) < 1e-4 and abs(xtr.std().item() - 1) < 1e-3
    assert set(yte.tolist()) == set(range(10))


def test_study_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "res"
    rc = study.main(["--quick", "--out", str(out), "--seeds", "0", "--epochs", "1",
                     "--no-progress"])
    assert rc == 0
    for f in ("summary.md", "runs.csv", "layers.csv", "accuracy.png", "norm_by_depth.png",
              "sparsity_by_layer.png", "silhouette_by_layer.png", "spectral_entropy.png"):
        p = out / f
        assert p.is_file() and p.stat().st_size > 0, f
    for f in ("accuracy.png", "norm_by_depth.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "summary.md").read_text()
    acc_table = md.split("## Test accuracy")[1].split("##")[0]
    for label in ("| BN |", "| BN+SBN |", "| L2BN |", "| none |"):
        assert label in acc_table
    assert "nk.BatchNormSBN2d" in md and "nk.L2BatchNorm2d" in md
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert sorted(r["norm"] for r in runs) == sorted(models.NORMS)
    for r in runs:
        assert 0.0 <= float(r["test_acc"]) <= 1.0
    layers = list(csv.DictReader(open(out / "layers.csv")))
    assert len(layers) == 4 * 2 * 7                       # norms x phases x blocks
    bn_init = [r for r in layers if r["norm"] == "bn" and r["phase"] == "init"]
    for r in bn_init:                                     # BN + ReLU at init: about half zeros
        assert 0.3 < float(r["sparsity"]) < 0.7
        assert int(r["samples"]) == 360
    assert "BN+SBN" in capsys.readouterr().out


def test_study_is_deterministic_given_seed(tmp_path):
    kw = dict(seeds=[3], epochs=1, norms=["bn"], progress=False, log=None)
    a = study.run_study(str(tmp_path / "a"), **kw)
    b = study.run_study(str(tmp_path / "b"), **kw)
    for ra, rb in zip(a["runs"], b["runs"]):
        assert ra["test_acc"] == rb["test_acc"] and ra["train_loss"] == rb["train_loss"]
    for la, lb in zip(a["layers"], b["layers"]):
        for k in ("norm_mean", "sparsity", "silhouette", "nmi", "spectral_entropy"):
            assert la[k] == lb[k]
    c = study.run_study(str(tmp_path / "c"), **dict(kw, seeds=[4]))
    assert c["runs"][0]["train_loss"] != a["runs"][0]["train_loss"]


def test_study_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        study.main(["--norms", "bn,groupnorm", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            study.main(["--device", "cuda", "--out", str(tmp_path)])
