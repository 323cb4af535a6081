"""Representation diagnostics: what a layer's activations look like, measured with forward hooks.

Per hooked layer, over a bounded subsample of inputs, batch by batch:

- feature-map norms: mean and max over samples of the per-sample L2 norm (the whole flattened
  (C, H, W) activation of one sample), and the max |activation|;
- sparsity: fraction of exact zeros, and channel sparsity = fraction of (sample, channel) maps
  that are entirely zero (meaningful on post-ReLU outputs: hook the ReLU or a block ending in one);
- clustering against class labels, on globally average-pooled features (N, C): silhouette score
  with cosine distance, and the NMI between k-means clusters (k = number of classes) and labels;
- frequency-energy distribution: for each channel, the mean over samples of the 2-D power
  spectrum |fft2(x - spatial mean)|^2, then its Shannon entropy normalized by log(#bins) (the DC bin
  is excluded because the spatial mean is removed). ~0: energy in one or two frequencies (a pure
  sinusoid), ~1: energy spread evenly (white noise). The layer value is the mean over channels.

Memory: running sums only (a (C, H, W) float64 power-spectrum accumulator per layer), plus at most
``max_rows`` pooled feature rows per layer for the clustering metrics; at most ``max_samples``
samples are looked at.

Two ways in:

    with RepresentationProbe(model, ["stage1.0", "stage2.0"], max_samples=1024) as probe:
        for x, y in loader:
            probe(x, y)                 # model(x) under no_grad, labels attached
            if probe.done:
                break
    stats = probe.results()             # {layer name: {metric: value}}

or ``diagnose(model, loader, layers, mode="eval")``. Hooks are removed when the ``with`` block is
left, also on an exception. The metric functions (``feature_norms``, ``sparsity``,
``channel_sparsity``, ``pooled_features``, ``silhouette``, ``kmeans_nmi``, ``spectral_entropy``)
work on plain tensors.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "METRICS",
    "feature_norms",
    "sparsity",
    "channel_sparsity",
    "pooled_features",
    "power_spectrum",
    "spectral_entropy",
    "spectral_entropy_from_power",
    "silhouette",
    "kmeans_nmi",
    "RepresentationProbe",
    "diagnose",
]

#: keys of the per-layer result dictionaries, in report order
METRICS = (
    "norm_mean",
    "norm_max",
    "absmax",
    "sparsity",
    "channel_sparsity",
    "silhouette",
    "nmi",
    "spectral_entropy",
)


# ----------------------------------------------------------------------------- metric functions


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, Mapping):
        for o in out.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def feature_norms(x: torch.Tensor) -> Dict[str, float]:
    """Per-sample L2 norms of ``x`` (dim 0 = samples): ``{"norm_mean", "norm_max", "absmax"}``."""
    x = x.detach()
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError("feature_norms needs at least one sample along dim 0")
    n = x.reshape(x.shape[0], -1).double().norm(dim=1)
    return {
        "norm_mean": n.mean().item(),
        "norm_max": n.max().item(),
        "absmax": x.abs().max().item() if x.numel() else 0.0,
    }


def sparsity(x: torch.Tensor) -> float:
    """Fraction of entries that are exactly zero."""
    x = x.detach()
    if x.numel() == 0:
        return float("nan")
    return (x == 0).sum().item() / x.numel()


def _maps(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, L); (N, C) -> (N, C, 1)."""
    if x.dim() < 2:
        raise ValueError(f"expected (N, C, ...) activations, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], x.shape[1], -1)


def channel_sparsity(x: torch.Tensor) -> float:
    """Fraction of (sample, channel) maps of ``x`` (N, C, ...) that are entirely zero."""
    m = _maps(x.detach())
    if m.shape[0] * m.shape[1] == 0:
        return float("nan")
    return (m == 0).all(dim=-1).sum().item() / (m.shape[0] * m.shape[1])


def pooled_features(x: torch.Tensor) -> torch.Tensor:
    """Global average pool over everything after dim 1: (N, C, ...) -> (N, C)."""
    return _maps(x.detach()).mean(dim=-1)


def power_spectrum(x: torch.Tensor, remove_mean: bool = True) -> torch.Tensor:
    """Sum over samples of |fft2(map)|^2 for each channel of ``x`` (N, C, H, W) -> (C, H, W) float64.

    With ``remove_mean`` every map's spatial mean is subtracted first (the DC bin becomes 0)."""
    if x.dim() != 4:
        raise ValueError(f"power_spectrum needs (N, C, H, W), got shape {tuple(x.shape)}")
    dt = torch.float32 if x.device.type == "mps" else torch.float64
    x = x.detach().to(dt)
    if remove_mean:
        x = x - x.mean(dim=(-2, -1), keepdim=True)
    return torch.fft.fft2(x).abs().square().sum(dim=0)


def spectral_entropy_from_power(power: torch.Tensor, remove_mean: bool = True) -> torch.Tensor:
    """Normalized Shannon entropy (in [0, 1]) of each channel's power spectrum ``power`` (C, H, W).

    The DC bin is left out when ``remove_mean`` (it carries no energy then). Channels with no energy,
    or with fewer than two bins, give NaN."""
    c = power.shape[0]
    p = power.reshape(c, -1).double()
    if remove_mean:
        p = p[:, 1:]  # flat index 0 is (0, 0): DC
    bins = p.shape[1]
    if bins < 2:
        return torch.full((c,), float("nan"), dtype=torch.float64, device=power.device)
    total = p.sum(dim=1, keepdim=True)
    q = p / total.clamp_min(1e-300)
    h = -(q * torch.log(q.clamp_min(1e-300))).sum(dim=1) / math.log(bins)
    # no energy (all-zero or constant maps: after mean removal only rounding residue is left)
    dead = total.squeeze(1) <= 1e-20
    return torch.where(dead, torch.full_like(h, float("nan")), h.clamp(0.0, 1.0))


def spectral_entropy(x: torch.Tensor, remove_mean: bool = True, reduce: bool = True):
    """Normalized spectral entropy of the mean power spectrum of each channel of ``x`` (N, C, H, W).

    ``reduce=True`` returns the mean over channels (NaN channels ignored) as a float, otherwise the
    per-channel tensor (C,)."""
    h = spectral_entropy_from_power(power_spectrum(x, remove_mean), remove_mean)
    return _nanmean(h) if reduce else h


def _nanmean(t: torch.Tensor) -> float:
    ok = ~torch.isnan(t)
    return t[ok].mean().item() if ok.any() else float("nan")


def _as_numpy_2d(features):
    import numpy as np

    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (n_samples, n_features), got shape {f.shape}")
    return f


def _as_labels(labels):
    import numpy as np

    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels).reshape(-1)


def silhouette(features, labels, metric: str = "cosine") -> float:
    """Silhouette score of ``features`` (n, d) grouped by ``labels`` (n,), cosine distance by default.

    1 = tight, well separated classes; ~0 = overlapping; NaN when it is undefined (fewer than two
    classes, or every sample its own class)."""
    from sklearn.metrics import silhouette_score

    f, y = _as_numpy_2d(features), _as_labels(labels)
    if len(f) != len(y):
        raise ValueError(f"{len(f)} feature rows but {len(y)} labels")
    n_classes = len(set(y.tolist()))
    if n_classes < 2 or n_classes > len(y) - 1:
        return float("nan")
    return float(silhouette_score(f, y, metric=metric))


def kmeans_nmi(
    features, labels, n_clusters: Optional[int] = None, seed: int = 0, n_init: int = 4,
    normalize: bool = True,
) -> float:
    """Normalized mutual information between k-means clusters of ``features`` and ``labels``.

    k defaults to the number of distinct labels. With ``normalize`` the rows are L2-normalized first
    (the cosine geometry the silhouette uses). Deterministic given ``seed``."""
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    f, y = _as_numpy_2d(features), _as_labels(labels)
    if len(f) != len(y):
        raise ValueError(f"{len(f)} feature rows but {len(y)} labels")
    k = n_clusters if n_clusters is not None else len(set(y.tolist()))
    if k < 2 or len(f) < k:
        return float("nan")
    if normalize:
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on degenerate (e.g. dead) features
        pred = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(f)
    return float(normalized_mutual_info_score(y, pred))


# ----------------------------------------------------------------------------- accumulation


class _LayerAccumulator:
    """Running sums for one layer (see module docstring)."""

    def __init__(self, name: str, max_samples: int, max_rows: int, spectrum: bool):
        self.name = name
        self.max_samples = max_samples
        self.max_rows = max_rows
        self.spectrum = spectrum
        self.n = 0
        self.shape: Optional[Tuple[int, ...]] = None
        self.norm_sum = 0.0
        self.norm_max = 0.0
        self.absmax = 0.0
        self.zeros = 0
        self.numel = 0
        self.zero_maps = 0
        self.maps = 0
        self.power: Optional[torch.Tensor] = None
        self.rows: List[torch.Tensor] = []
        self.row_labels: List[torch.Tensor] = []
        self.n_rows = 0
        self.unlabeled_batches = 0

    @property
    def full(self) -> bool:
        return self.n >= self.max_samples

    def update(self, out: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        if self.full:
            return
        x = out.detach()
        if x.dim() < 2:
            raise ValueError(f"layer {self.name!r}: expected (N, C, ...) output, got {tuple(x.shape)}")
        shape = tuple(x.shape[1:])
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            raise ValueError(
                f"layer {self.name!r} produced shape {shape} after {self.shape}: a module called "
                "several times per forward with different shapes cannot be hooked as one layer; "
                "hook the modules that wrap each call instead"
            )
        take = min(x.shape[0], self.max_samples - self.n)
        x = x[:take]
        if labels is not None:
            labels = labels[:take]
        if take == 0:
            return
        self.n += take
        norms = x.reshape(take, -1).double().norm(dim=1)
        self.norm_sum += norms.sum().item()
        self.norm_max = max(self.norm_max, norms.max().item())
        self.absmax = max(self.absmax, x.abs().max().item())
        self.zeros += (x == 0).sum().item()
        self.numel += x.numel()
        m = _maps(x)
        self.zero_maps += (m == 0).all(dim=-1).sum().item()
        self.maps += m.shape[0] * m.shape[1]
        if self.spectrum and x.dim() == 4:
            p = power_spectrum(x)
            self.power = p if self.power is None else self.power + p
        if labels is None:
            self.unlabeled_batches += 1
        elif self.n_rows < self.max_rows:
            r = min(take, self.max_rows - self.n_rows)
            self.rows.append(pooled_features(x[:r]).float().cpu())
            self.row_labels.append(labels[:r].detach().cpu())
            self.n_rows += r

    def result(self, clustering: bool, seed: int) -> Dict[str, object]:
        nan = float("nan")
        res: Dict[str, object] = {
            "samples": self.n,
            "shape": self.shape,
            "norm_mean": self.norm_sum / self.n if self.n else nan,
            "norm_max": self.norm_max if self.n else nan,
            "absmax": self.absmax if self.n else nan,
            "sparsity": self.zeros / self.numel if self.numel else nan,
            "channel_sparsity": self.zero_maps / self.maps if self.maps else nan,
            "silhouette": nan,
            "nmi": nan,
            "spectral_entropy": nan,
            "clustering_rows": self.n_rows,
        }
        if self.power is not None:
            res["spectral_entropy"] = _nanmean(spectral_entropy_from_power(self.power))
        if clustering and self.n_rows:
            f = torch.cat(self.rows)
            y = torch.cat(self.row_labels)
            res["silhouette"] = silhouette(f, y)
            res["nmi"] = kmeans_nmi(f, y, seed=seed)
        return res


LayerSpec = Union[None, str, nn.Module, Sequence[Union[str, nn.Module]], Mapping[str, nn.Module]]


def _resolve_layers(model: nn.Module, layers: LayerSpec) -> List[Tuple[str, nn.Module]]:
    if layers is None:
        getter = getattr(model, "diagnostic_layers", None)
        if getter is None:
            raise ValueError(
                "no layers given and the model has no diagnostic_layers(); pass module names "
                "(as in model.named_modules()) or modules"
            )
        layers = getter() if callable(getter) else getter
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    if isinstance(layers, Mapping):
        return [(str(k), v) for k, v in layers.items()]
    named = dict(model.named_modules())
    by_id = {id(m): n for n, m in model.named_modules()}
    out = []
    for item in layers:
        if isinstance(item, str):
            if item not in named:
                raise KeyError(f"model has no submodule named {item!r}")
            out.append((item, named[item]))
        elif isinstance(item, nn.Module):
            out.append((by_id.get(id(item), type(item).__name__ + f"@{id(item):x}"), item))
        else:
            raise TypeError(f"layers must be names or modules, got {type(item).__name__}")
    if not out:
        raise ValueError("no layers to hook")
    return out


class RepresentationProbe:
    """Forward hooks on chosen layers collecting the diagnostics of the module docstring.

    ``layers``: names from ``model.named_modules()``, modules, a ``{name: module}`` mapping, or
    None for ``model.diagnostic_layers()``. ``max_samples`` caps the samples seen per layer,
    ``max_rows`` the pooled rows kept for silhouette / k-means (those are O(rows^2) and O(rows)).
    Labels: ``probe(x, y)`` runs the model with ``y`` attached; with direct ``model(x)`` calls, set
    ``probe.labels = y`` first (batches without labels count for everything but clustering).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = None,
        *,
        max_samples: int = 2048,
        max_rows: int = 1024,
        spectrum: bool = True,
        clustering: bool = True,
        seed: int = 0,
    ):
        if max_samples < 1 or max_rows < 0:
            raise ValueError("max_samples must be >= 1 and max_rows >= 0")
        self.model = model
        self.layers = _resolve_layers(model, layers)
        self.max_samples = int(max_samples)
        self.max_rows = int(max_rows)
        self.clustering = clustering
        self.seed = seed
        self.labels: Optional[torch.Tensor] = None
        self._acc = {
            name: _LayerAccumulator(name, self.max_samples, self.max_rows, spectrum)
            for name, _ in self.layers
        }
        self._handles: list = []

    # hooks ---------------------------------------------------------------------------------
    def _hook(self, name: str):
        acc = self._acc[name]

        def hook(module, inputs, output):
            t = _first_tensor(output)
            if t is None:
                return
            labels = self.labels
            if labels is not None:
                labels = torch.as_tensor(labels)
                if labels.shape[0] != t.shape[0]:
                    raise ValueError(
                        f"layer {name!r}: batch of {t.shape[0]} but {labels.shape[0]} labels set"
                    )
            with torch.no_grad():
                acc.update(t, labels)

        return hook

    def attach(self) -> "RepresentationProbe":
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "RepresentationProbe":
        return self.attach()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.detach()
        self.labels = None
        return False

    # driving -------------------------------------------------------------------------------
    @property
    def samples_seen(self) -> int:
        return min(a.n for a in self._acc.values())

    @property
    def done(self) -> bool:
        return all(a.full for a in self._acc.values())

    def __call__(self, x: torch.Tensor, labels=None):
        """Run ``model(x)`` under no_grad with ``labels`` attached, on at most the samples still
        needed; returns the model output (None when nothing more is needed)."""
        remaining = self.max_samples - self.samples_seen
        if remaining <= 0:
            return None
        x = x[:remaining]
        self.labels = None if labels is None else torch.as_tensor(labels)[:remaining]
        try:
            with torch.no_grad():
                return self.model(x)
        finally:
            self.labels = None

    def results(self) -> Dict[str, Dict[str, object]]:
        """``{layer: {"samples", "shape", "norm_mean", "norm_max", "absmax", "sparsity",
        "channel_sparsity", "silhouette", "nmi", "spectral_entropy", "clustering_rows"}}``;
        metrics that could not be computed are NaN."""
        return {name: self._acc[name].result(self.clustering, self.seed) for name, _ in self.layers}


def diagnose(
    model: nn.Module,
    batches: Iterable,
    layers: LayerSpec = None,
    *,
    mode: Optional[str] = "eval",
    device: Union[None, str, torch.device] = None,
    **probe_kwargs,
) -> Dict[str, Dict[str, object]]:
    """Run ``model`` over ``batches`` (``x`` or ``(x, y)`` items) with a probe; return its results.

    ``mode="eval"``: normalization layers use their running statistics. ``mode="train"``: batch
    statistics (what a freshly initialized network computes); buffers (running statistics) are
    restored afterwards, so the model is left as it was. ``mode=None`` keeps the current mode.
    The model's train/eval flags are restored in any case."""
    if mode not in (None, "eval", "train"):
        raise ValueError(f"mode must be 'eval', 'train' or None, got {mode!r}")
    flags = {m: m.training for m in model.modules()}
    saved = None
    if mode == "train":
        saved = {k: v.detach().clone() for k, v in model.named_buffers()}
    try:
        if mode is not None:
            model.train(mode == "train")
        with RepresentationProbe(model, layers, **probe_kwargs) as probe:
            for item in batches:
                if isinstance(item, (tuple, list)):
                    x, y = item[0], (item[1] if len(item) > 1 else None)
                else:
                    x, y = item, None
                if device is not None:
                    x = x.to(device)
                probe(x, y)
                if probe.done:
                    break
        return probe.results()
    finally:
        for m, t in flags.items():
            m.training = t
        if saved is not None:
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(saved[k])
