"""normkernels.diagnostics: each metric on inputs with known answers, and the hook machinery."""
import math

import pytest
import torch
from torch import nn

from normkernels import diagnostics as D


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- plain metrics


def test_feature_norms_known_values():
    x = torch.zeros(2, 1, 2, 2)
    x[0] = 1.0                                     # ||x0|| = sqrt(4) = 2
    x[1, 0] = torch.tensor([[3.0, 0.0], [0.0, -4.0]])  # ||x1|| = 5, max |.| = 4
    r = D.feature_norms(x)
    assert r["norm_mean"] == pytest.approx(3.5)
    assert r["norm_max"] == pytest.approx(5.0)
    assert r["absmax"] == pytest.approx(4.0)


def test_sparsity_and_channel_sparsity_known_values():
    x = torch.rand(4, 5, 3, 3, generator=_gen()) + 0.1   # strictly positive
    x[:, 1] = 0          # channel 1 dead in every sample: 4 maps
    x[:, 3] = 0          # channel 3 too: 4 maps
    x[2, 0] = 0          # one more map
    x[0, 4, 1, 1] = 0    # a single zero: counts for sparsity, not for channel sparsity
    assert D.channel_sparsity(x) == pytest.approx(9 / 20)
    assert D.sparsity(x) == pytest.approx((9 * 9 + 1) / x.numel())
    assert D.sparsity(torch.ones(3, 3)) == 0.0
    assert D.channel_sparsity(torch.zeros(2, 3, 4)) == 1.0
    # (N, C) input: every entry is its own "map"
    assert D.channel_sparsity(torch.tensor([[0.0, 1.0], [0.0, 0.0]])) == pytest.approx(3 / 4)


def test_pooled_features_is_spatial_mean():
    x = torch.randn(3, 4, 5, 6, generator=_gen(1))
    torch.testing.assert_close(D.pooled_features(x), x.mean(dim=(2, 3)))
    torch.testing.assert_close(D.pooled_features(x[:, :, 0]), x[:, :, 0].mean(dim=2))


def _clusters(n_per=30, k=4, dim=16, noise=0.01, seed=0):
    g = _gen(seed)
    centers = torch.eye(dim)[:k] * 5.0               # orthogonal directions: cosine distance 1
    labels = torch.arange(k).repeat_interleave(n_per)
    f = centers[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return f, labels


def test_separated_clusters_silhouette_and_nmi_near_one():
    f, y = _clusters()
    assert D.silhouette(f, y) > 0.97
    assert D.kmeans_nmi(f, y) == pytest.approx(1.0)
    # label names do not matter for NMI
    assert D.kmeans_nmi(f, (y + 7) * 3) == pytest.approx(1.0)


def test_random_labels_give_low_silhouette_and_nmi():
    f, _ = _clusters(noise=1.0)
    y = torch.randint(0, 4, (len(f),), generator=_gen(3))
    assert D.silhouette(f, y) < 0.1
    assert D.kmeans_nmi(f, y) < 0.2


def test_clustering_degenerate_cases_are_nan():
    f, _ = _clusters(n_per=5)
    assert math.isnan(D.silhouette(f, torch.zeros(len(f))))   # one class
    assert math.isnan(D.kmeans_nmi(f, torch.zeros(len(f))))
    with pytest.raises(ValueError):
        D.silhouette(f, torch.zeros(len(f) - 1))


def test_pure_sinusoid_has_low_spectral_entropy_white_noise_high():
    H = W = 16
    w = torch.arange(W, dtype=torch.float64)
    phase = torch.rand(8, 3, 1, 1, generator=_gen(4), dtype=torch.float64) * 2 * math.pi
    sinus = torch.cos(2 * math.pi * 3 * w / W + phase).expand(8, 3, H, W) + 2.0  # + DC offset
    h_sin = D.spectral_entropy(sinus)
    # energy in exactly two bins, (0, 3) and (0, W-3), out of H*W - 1 (DC excluded)
    assert h_sin == pytest.approx(math.log(2) / math.log(H * W - 1), abs=1e-9)
    noise = torch.randn(256, 3, H, W, generator=_gen(5))
    h_noise = D.spectral_entropy(noise)
    assert h_noise > 0.97
    assert h_sin < 0.2
    per_channel = D.spectral_entropy(noise, reduce=False)
    assert per_channel.shape == (3,)


def test_spectral_entropy_uniform_power_is_one_and_dead_channels_nan():
    p = torch.ones(2, 4, 4, dtype=torch.float64)
    p[1] = 0
    h = D.spectral_entropy_from_power(p)
    assert h[0].item() == pytest.approx(1.0)
    assert math.isnan(h[1].item())
    # constant maps carry no energy once the mean is removed
    assert math.isnan(D.spectral_entropy(torch.full((2, 1, 4, 4), 3.0)))


# ----------------------------------------------------------------------------- probe / hooks


class _Net(nn.Module):
    """Identity layers, so a hooked output is exactly a known tensor."""

    def __init__(self):
        super().__init__()
        self.a = nn.Identity()
        self.b = nn.ReLU()

    def forward(self, x):
        return self.b(self.a(x))


def _data(n=40, seed=6):
    g = _gen(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 6, 8, 8, generator=g) * 0.3
    x[torch.arange(n), y] += 3.0                   # class-dependent channel: separable when pooled
    x[::5, 2] = 0.0                                # some all-zero maps
    return x, y


def test_probe_accumulates_batches_like_one_big_tensor():
    x, y = _data()
    model = _Net()
    with D.RepresentationProbe(model, ["a", "b"], max_samples=1000, max_rows=1000) as probe:
        for xb, yb in zip(x.split(7), y.split(7)):   # uneven batches
            probe(xb, yb)
    res = probe.results()
    assert list(res) == ["a", "b"]
    for name, t in (("a", x), ("b", torch.relu(x))):
        r = res[name]
        assert r["samples"] == len(x) and r["shape"] == (6, 8, 8)
        fn = D.feature_norms(t)
        for k in ("norm_mean", "norm_max", "absmax"):
            assert r[k] == pytest.approx(fn[k], rel=1e-6)
        assert r["sparsity"] == pytest.approx(D.sparsity(t))
        assert r["channel_sparsity"] == pytest.approx(D.channel_sparsity(t))
        assert r["spectral_entropy"] == pytest.approx(D.spectral_entropy(t), rel=1e-9)
        pooled = D.pooled_features(t)
        assert r["silhouette"] == pytest.approx(D.silhouette(pooled, y), abs=1e-5)
        assert r["nmi"] == pytest.approx(D.kmeans_nmi(pooled, y), abs=1e-9)
    assert res["b"]["sparsity"] > 0.4             # ReLU of zero-mean noise
    assert res["b"]["nmi"] > 0.9


def test_probe_caps_samples_and_rows():
    x, y = _data()
    model = _Net()
    calls = []
    model.a.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    with D.RepresentationProbe(model, ["a"], max_samples=10, max_rows=6) as probe:
        for xb, yb in zip(x.split(4), y.split(4)):
            probe(xb, yb)
            if probe.done:
                break
    r = probe.results()["a"]
    assert calls == [4, 4, 2]                     # the model only ran on the samples needed
    assert r["samples"] == 10 and r["clustering_rows"] == 6
    assert r["norm_mean"] == pytest.approx(D.feature_norms(x[:10])["norm_mean"], rel=1e-6)
    assert r["silhouette"] == pytest.approx(D.silhouette(D.pooled_features(x[:6]), y[:6]), abs=1e-5)


def test_probe_manual_labels_and_unlabeled_batches():
    x, y = _data()
    model = _Net()
    with D.RepresentationProbe(model, [model.b]) as probe:   # a module object works too
        model(x[:20])                             # no labels: no clustering rows
        probe.labels = y[20:]
        model(x[20:])
        probe.labels = y[:3]
        with pytest.raises(ValueError, match="labels"):
            model(x[:5])
    r = probe.results()["b"]
    assert r["samples"] == 40 and r["clustering_rows"] == 20


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_on_exit_and_on_exception():
    model = _Net()
    with D.RepresentationProbe(model, ["a", "b"]) as probe:
        assert _hook_count(model) == 2 and probe.attached
    assert _hook_count(model) == 0 and not probe.attached
    with pytest.raises(RuntimeError, match="boom"):
        with D.RepresentationProbe(model, ["a", "b"]):
            assert _hook_count(model) == 2
            raise RuntimeError("boom")
    assert _hook_count(model) == 0
    # an exception raised from inside a hook also leaves no hooks behind
    with pytest.raises(ValueError):
        with D.RepresentationProbe(model, ["a"]) as probe:
            probe.labels = torch.zeros(3)
            model(torch.randn(5, 2, 4, 4))
    assert _hook_count(model) == 0


def test_bad_layer_names_and_reused_module_with_new_shape():
    model = _Net()
    with pytest.raises(KeyError):
        D.RepresentationProbe(model, ["nope"])
    with pytest.raises(ValueError, match="diagnostic_layers"):
        D.RepresentationProbe(model)
    with D.RepresentationProbe(model, ["a"]) as probe:
        probe(torch.randn(2, 3, 4, 4))
        with pytest.raises(ValueError, match="shape"):
            probe(torch.randn(2, 3, 5, 5))


def test_diagnose_train_mode_restores_buffers_and_flags():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 1, 8, 8) * 3 + 1
    y = torch.arange(16) % 2
    res_train = D.diagnose(model, [(x[:8], y[:8]), (x[8:], y[8:])], ["2"], mode="train")
    assert not model.training and not model[1].training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # batch statistics in train mode: the BN output is standardized, so ReLU zeros about half
    assert 0.3 < res_train["2"]["sparsity"] < 0.7
    assert _hook_count(model) == 0
    res_eval = D.diagnose(model, [x], ["2"], mode="eval")
    assert res_eval["2"]["samples"] == 16 and math.isnan(res_eval["2"]["silhouette"])
