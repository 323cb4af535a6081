"""nn.Modules: parameters, buffers and running statistics, with nn.BatchNorm2d's conventions
(train/eval, momentum=None as a cumulative average, affine, track_running_stats, state_dict,
extra_repr). The math lives in normkernels.functional and the ops below it."""
from __future__ import annotations

import torch
from torch import nn

from . import functional as F_nk

__all__ = ["L2BatchNorm1d", "L2BatchNorm2d", "SpectralBatchNorm2d", "BatchNormSBN2d"]


class _RunningStatsMixin:
    """The running-statistics bookkeeping that nn.BatchNorm does in its forward, split so that
    num_batches_tracked only moves after the op has succeeded."""

    def _stats_plan(self):
        """(training, running_mean or None, running_var or None, momentum factor)."""
        use_batch_stats = self.training or self.running_mean is None
        tracked = self.training and self.track_running_stats and self.running_mean is not None
        factor = 0.0
        if tracked:
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked.item() + 1)
            else:
                factor = self.momentum
        # Buffers are read in eval and updated in tracked training; otherwise not touched.
        use_buffers = tracked or not self.training
        running = (self.running_mean, self.running_var) if use_buffers else (None, None)
        return use_batch_stats, running[0], running[1], factor

    def _count_batch(self):
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)


class _NormBase(_RunningStatsMixin, nn.Module):
    _version = 2
    _complex_mean = False

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            real = dtype or torch.get_default_dtype()
            mean_dtype = torch.promote_types(real, torch.complex64) if self._complex_mean else real
            self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=mean_dtype))
            self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=real))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the complex running mean to a real dtype (dropping its
        # imaginary part) and .double() would leave it complex64. Convert its two parts like a
        # real buffer instead, then rejoin them at the matching complex precision.
        if not self._complex_mean or self.running_mean is None:
            return super()._apply(fn, recurse)
        buffers = self._buffers
        order = list(buffers)
        mean = buffers.pop("running_mean")
        try:
            super()._apply(fn, recurse)
        finally:
            rest = dict(buffers)
            buffers.clear()
            buffers.update({k: mean if k == "running_mean" else rest[k] for k in order})
        re, im = fn(mean.real.contiguous()), fn(mean.imag.contiguous())
        cplx = torch.promote_types(re.dtype, torch.complex64)
        buffers["running_mean"] = torch.complex(re.to(cplx.to_real()), im.to(cplx.to_real()))
        return self

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
            "track_running_stats={track_running_stats}".format(**self.__dict__)
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints without num_batches_tracked (as nn.BatchNorm accepts) start counting at 0.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.num_batches_tracked.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class _L2BatchNorm(_NormBase):
    _ranks: tuple[int, ...] = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 l2_eps=1e-12, rescale=False, backend="auto", device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.l2_eps = l2_eps
        self.rescale = rescale
        self.backend = backend

    def forward(self, input):
        F_nk.check_input(input, self._ranks, type(self).__name__)
        training, running_mean, running_var, factor = self._stats_plan()
        y = F_nk.l2_batch_norm(input, running_mean, running_var, self.weight, self.bias, training, factor,
                               self.eps, self.l2_eps, self.rescale, self.backend)
        self._count_batch()
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", l2_eps={self.l2_eps}, rescale={self.rescale}, backend={self.backend!r}"


class L2BatchNorm1d(_L2BatchNorm):
    """L2BN for (N, C) or (N, C, L) inputs: each sample's whole vector is l2-normalized, then BN."""

    _ranks = (2, 3)


class L2BatchNorm2d(_L2BatchNorm):
    """L2BN for (N, C, H, W) inputs: each sample's whole (C, H, W) map is l2-normalized, then BN."""

    _ranks = (4,)


class SpectralBatchNorm2d(_NormBase):
    """Batch norm in the frequency domain (Cakaj et al. 2023). running_mean is complex.

    algorithm: "auto"/"parseval" (exact, FFT-free) or "fft" (literal rfft2 path).
    The unbiased running variance uses n = N*H*(W//2+1) reduced coefficients.
    """

    _complex_mean = True

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 algorithm="auto", backend="auto", device=None, dtype=None):
        F_nk.resolve_algorithm(algorithm)  # reject a bad name at construction
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.algorithm = algorithm
        self.backend = backend

    def forward(self, input):
        training, running_mean, running_var, factor = self._stats_plan()
        y = F_nk.spectral_batch_norm(input, running_mean, running_var, self.weight, self.bias, training, factor,
                                     self.eps, self.algorithm, self.backend)
        self._count_batch()
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", algorithm={self.algorithm!r}, backend={self.backend!r}"


class BatchNormSBN2d(nn.Module):
    """nn.BatchNorm2d followed by SpectralBatchNorm2d as one fused layer.

    Holds the two layers as sub-modules `bn` and `sbn` (their parameters, buffers and state_dict
    keys), but runs them as one statistics pass and one elementwise pass.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 sbn_eps=1e-5, sbn_momentum=0.1, backend="auto", device=None, dtype=None):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.sbn = SpectralBatchNorm2d(num_features, sbn_eps, sbn_momentum, affine, track_running_stats,
                                       backend=backend, device=device, dtype=dtype)
        self.backend = backend

    @property
    def num_features(self) -> int:
        return self.bn.num_features

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, sbn: SpectralBatchNorm2d | None = None) -> "BatchNormSBN2d":
        """Fuse an existing BN (and optionally an existing SBN) into one layer, sharing their state."""
        if sbn is None:
            p = bn.weight if bn.weight is not None else bn.running_mean
            sbn = SpectralBatchNorm2d(bn.num_features, affine=bn.affine, track_running_stats=bn.track_running_stats,
                                      device=p.device if p is not None else None,
                                      dtype=p.dtype if p is not None else None)
        if bn.num_features != sbn.num_features:
            raise ValueError(f"BN has {bn.num_features} features but SBN has {sbn.num_features}")
        if bn.track_running_stats != sbn.track_running_stats or bn.affine != sbn.affine:
            raise ValueError("BN and SBN must agree on affine and track_running_stats to be fused")
        layer = cls(bn.num_features, affine=bn.affine, track_running_stats=bn.track_running_stats,
                    backend=sbn.backend)
        layer.bn, layer.sbn = bn, sbn
        layer.train(bn.training)
        return layer

    def to_modules(self) -> nn.Sequential:
        """The unfused equivalent: nn.Sequential(bn, sbn), sharing this layer's state."""
        return nn.Sequential(self.bn, self.sbn)

    def forward(self, input):
        bn, sbn = self.bn, self.sbn
        bn_training, bn_rm, bn_rv, bn_factor = _RunningStatsMixin._stats_plan(bn)
        sbn_training, sbn_rm, sbn_rv, sbn_factor = sbn._stats_plan()
        if bn_training != sbn_training:  # from_modules guarantees equal settings, modes may differ
            raise ValueError("BatchNormSBN2d: bn and sbn must both be in training or both in eval mode")
        y = F_nk.batch_norm_sbn(input, bn_rm, bn_rv, sbn_rm, sbn_rv, bn.weight, bn.bias, sbn.weight, sbn.bias,
                                bn_training, bn_factor, sbn_factor, bn.eps, sbn.eps, self.backend)
        _RunningStatsMixin._count_batch(bn)
        sbn._count_batch()
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, backend={self.backend!r}"
