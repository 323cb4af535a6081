"""nn.Modules: parameters, buffers and running statistics, with nn.BatchNorm2d's conventions
(train/eval, momentum=None as a cumulative average, affine, track_running_stats, state_dict,
extra_repr). The math lives in normkernels.functional and the ops below it; a module's forward
only picks training/eval and the buffers, then makes one functional call (it is on the hot path).

State names: every layer keeps nn.BatchNorm's names for the state a BatchNorm would have
(weight, bias, running_mean, running_var, num_batches_tracked at the top level), so checkpoints
of the plain-BN model load into the converted one. BatchNormSBN2d adds SBN's state under sbn_*
names; it has no sub-module, so no framework helper can swap a part of it unseen.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import _backend
from . import functional as F_nk

__all__ = [
    "L2BatchNorm1d", "L2BatchNorm2d", "SpectralBatchNorm2d", "BatchNormSBN2d", "NormThenSBN2d",
    "L2BatchNormAct2d", "SpectralBatchNormAct2d", "BatchNormSBNAct2d", "FreshStateWarning",
]

_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# each stage's running buffers by its prefix ("" BN's or the layer's own, "sbn_" BN+SBN's SBN stage)
_RUNNING_KEYS = {p: tuple(p + n for n in ("running_mean", "running_var", "num_batches_tracked")) for p in ("", "sbn_")}


class FreshStateWarning(UserWarning):
    """Part of a model's state was freshly initialised or reset instead of kept or loaded.

    ``keys`` lists the state_dict keys concerned (their values are the layer's defaults: weight 1,
    bias 0, running mean 0, running variance 1, num_batches_tracked 0)."""

    def __init__(self, message: str, keys=()):
        super().__init__(message)
        self.keys = tuple(keys)


def _check_backend(backend: str, family: str, layer: str) -> None:
    """Reject a backend name at construction (the functional layer resolves it per input)."""
    if backend not in _backend.BACKENDS:
        raise ValueError(f"{layer}: backend must be one of {_backend.BACKENDS}, got {backend!r}")
    native = _backend._NATIVE[family]
    if backend not in ("auto", "torch") and backend not in native:
        raise ValueError(f"{layer}: {family} has no {backend!r} backend; choose from {('auto',) + native + ('torch',)}")


def _is_trained(module, prefix: str = "") -> bool:
    """Whether a layer's running statistics hold anything but their initial values."""
    mean = getattr(module, prefix + "running_mean", None)
    if mean is None:
        return False
    count = getattr(module, prefix + "num_batches_tracked", None)
    return bool((count is not None and count.item() > 0) or mean.count_nonzero().item()
                or (getattr(module, prefix + "running_var") != 1).any().item())


def _spectral_stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of SBN's running statistics for a module of `dtype`: float64 for float64,
    else float32 (a complex mean is at least complex64: there is no complex bfloat16, and
    complex32 lacks most ops). BN's and L2BN's statistics follow the module's dtype as
    nn.BatchNorm's do."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.fx.wrap
def _layer_call(layer: nn.Module, input):
    """One call of a layer, as torch.fx records it: a leaf call_function on the layer (like
    torchvision's wrapped ops), so that tracing never looks inside it, a traced model still
    follows the layer's train()/eval() at run time, and fx conv+BN folding never mistakes the
    layer for BatchNorm."""
    return layer._forward(input)


class _NormBase(nn.Module):
    """BatchNorm's parameters and buffers (one set, or two for BN+SBN: prefixes "" and "sbn_")."""

    # 3: BatchNormSBN2d's flat state (was bn.* / sbn.*); L2BN checkpoints told apart from BN's (2)
    _version = 3
    _complex_buffers: tuple[str, ...] = ()  # complex running means (SBN's spectral mean)
    _state_prefixes: tuple[str, ...] = ("",)
    # the activation passed to the functional layer (the NormAct layers set them per instance)
    _activation = None
    _negative_slope = 0.01
    _unfused = False  # NormAct layers whose activation/drop module runs after the layer

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        for prefix in self._state_prefixes:
            self._register_state(prefix, device, dtype)
        self.reset_parameters()

    def _register_state(self, prefix, device, dtype):
        n = self.num_features
        if self.affine:
            self.register_parameter(prefix + "weight", nn.Parameter(torch.empty(n, device=device, dtype=dtype)))
            self.register_parameter(prefix + "bias", nn.Parameter(torch.empty(n, device=device, dtype=dtype)))
        else:
            self.register_parameter(prefix + "weight", None)
            self.register_parameter(prefix + "bias", None)
        if self.track_running_stats:
            real = dtype or torch.get_default_dtype()
            spectral = prefix + "running_mean" in self._complex_buffers
            if spectral:
                real = _spectral_stat_dtype(real)
            mean_dtype = torch.promote_types(real, torch.complex64) if spectral else real
            self.register_buffer(prefix + "running_mean", torch.zeros(n, device=device, dtype=mean_dtype))
            self.register_buffer(prefix + "running_var", torch.ones(n, device=device, dtype=real))
            self.register_buffer(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(prefix + name, None)

    def _apply(self, fn, recurse=True):
        # SBN's statistics (a complex mean and its variance) are cast apart from the rest:
        # Module.to(dtype) would drop a complex mean's imaginary part and .double() would leave
        # it complex64, and there is no complex bfloat16. Each part goes through fn like a real
        # buffer, at the dtype rule of _spectral_stat_dtype, from its full-precision value.
        held_names = [p + k for p in self._state_prefixes if p + "running_mean" in self._complex_buffers
                      for k in ("running_mean", "running_var") if self._buffers.get(p + k) is not None]
        if not held_names:
            return super()._apply(fn, recurse)
        buffers = self._buffers
        order = list(buffers)
        held = {n: buffers.pop(n) for n in held_names}
        try:
            super()._apply(fn, recurse)
        finally:
            rest = dict(buffers)
            buffers.clear()
            buffers.update({k: held[k] if k in held else rest[k] for k in order})

        def cast(part):
            moved = fn(part.contiguous())
            real = _spectral_stat_dtype(moved.dtype)
            return moved if moved.dtype == real else part.to(device=moved.device, dtype=real)

        for name, t in held.items():
            buffers[name] = torch.complex(cast(t.real), cast(t.imag)) if t.is_complex() else cast(t)
        return self

    def forward(self, input):
        return _layer_call(self, input)

    def _forward(self, input):  # the layer's computation: its family's functional entry
        return self._family(input)

    def _family(self, input, reducer=None, layer=None):  # each layer's own (over reducer's group if given)
        raise NotImplementedError

    def _running(self, prefix: str = ""):
        """(running_mean, running_var, num_batches_tracked) of one stage as a call uses them:
        None in training without tracked statistics (batch statistics, nothing updated)."""
        if self.training and not self.track_running_stats:
            return None, None, None
        mean, var, count = _RUNNING_KEYS[prefix]
        buffers = self._buffers  # (direct: nn.Module.__getattr__ per name costs a layer call microseconds)
        return buffers[mean], buffers[var], buffers[count]

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            for prefix in self._state_prefixes:
                getattr(self, prefix + "running_mean").zero_()
                getattr(self, prefix + "running_var").fill_(1)
                getattr(self, prefix + "num_batches_tracked").zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            for prefix in self._state_prefixes:
                nn.init.ones_(getattr(self, prefix + "weight"))
                nn.init.zeros_(getattr(self, prefix + "bias"))

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
            "track_running_stats={track_running_stats}".format(**self.__dict__)
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints without num_batches_tracked (as nn.BatchNorm accepts) start counting at 0.
        if self.track_running_stats:
            for p in self._state_prefixes:
                key = prefix + p + "num_batches_tracked"
                if key not in state_dict and prefix + p + "running_mean" in state_dict:
                    state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.num_batches_tracked.device)
            self._keep_spectral_stats_of_real_checkpoints(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _keep_spectral_stats_of_real_checkpoints(self, state_dict, prefix) -> None:
        """A real running mean where this layer's is complex comes from a BatchNorm (a plain-BN
        checkpoint loaded where BN became SBN): its statistics are of x, not of the spectrum
        (copied in, the eval output would be ~8x too large at 8x8). The layer keeps its own
        and a FreshStateWarning names them."""
        keys = []
        for name in self._complex_buffers:
            mean = state_dict.get(prefix + name)
            if mean is not None and not mean.is_complex():
                group = name[: -len("running_mean")]
                for k in ("running_mean", "running_var", "num_batches_tracked"):
                    if prefix + group + k in state_dict:
                        state_dict[prefix + group + k] = getattr(self, group + k).detach()
                        keys.append(prefix + group + k)
        if keys:
            warnings.warn(FreshStateWarning(
                f"{type(self).__name__} '{prefix[:-1]}': the checkpoint's running statistics are BatchNorm's "
                f"(a real running_mean), not of the spectrum; kept the layer's own: {', '.join(keys)}. "
                f"Re-estimate them with nk.recalibrate(model, batches) before eval.", keys), stacklevel=5)


# ------------------------------------------------------------------------------------ L2BN

_COMMON_ARGS = """
    Args:
        num_features: C, the number of channels.
        eps: added to the variance before its square root (default 1e-5).
        momentum: running-statistics update factor (default 0.1); None for a cumulative average.
        affine: learnable per-channel weight (gamma) and bias (beta) (default True).
        track_running_stats: keep running_mean / running_var / num_batches_tracked and use them
            in eval mode (default True); False uses the batch statistics in both modes."""

_DEVICE_ARGS = """
        backend: "auto" (default: the fastest usable kernel for the input's device and dtype,
            falling back to pure PyTorch), "cpp", "cuda", "triton" or "torch"; a name the layer
            has no kernel for is rejected here.
        device, dtype: of the parameters and buffers."""


class _L2BatchNorm(_NormBase):
    _ranks: tuple[int, ...] = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 l2_eps=1e-12, rescale=False, backend="auto", device=None, dtype=None):
        _check_backend(backend, "l2bn", type(self).__name__)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.l2_eps = l2_eps
        self.rescale = rescale
        self.backend = backend

    def _family(self, input, reducer=None, layer=None):
        """L2BN (functional.l2bn_family), over reducer's group if given."""
        if not isinstance(input, torch.Tensor) or input.dim() not in self._ranks:
            F_nk.check_input(input, self._ranks, type(self).__name__)
        mean, var, count = self._running()
        return F_nk.l2bn_family(input, mean, var, self.weight, self.bias, self.training or mean is None, self.momentum,
                                self.eps, self.l2_eps, self.rescale, self.backend, count, self._activation,
                                self._negative_slope, ranks=self._ranks, reducer=reducer, layer=layer)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint of nn.BatchNorm (state_dict version 2) has the same keys, but its running
        # statistics are of x, not of the l2-normalized samples (~1/(C*H*W) the variance): loaded
        # here they would make eval outputs nearly constant. Keep this layer's own instead.
        version = local_metadata.get("version")
        if version is not None and version < 3 and self.track_running_stats:
            keys = [prefix + n for n in ("running_mean", "running_var", "num_batches_tracked") if prefix + n in state_dict]
            for key in keys:
                state_dict[key] = getattr(self, key[len(prefix):])
            if keys:
                warnings.warn(FreshStateWarning(
                    f"{type(self).__name__} '{prefix[:-1]}': the checkpoint's running statistics are BatchNorm's "
                    f"(state_dict version {version}), at the wrong scale for L2BN; kept the layer's own: "
                    f"{', '.join(keys)}. Re-estimate them with nk.recalibrate(model, batches) before eval.", keys),
                    stacklevel=4)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", l2_eps={self.l2_eps}, rescale={self.rescale}, backend={self.backend!r}"


_L2_ARGS = """
        l2_eps: lower bound of each sample's l2 norm (default 1e-12, F.normalize's).
        rescale: multiply the l2-normalized sample by sqrt(C*H*W) (unit RMS instead of unit
            norm), so that eps acts as in plain BatchNorm (default False: the paper's L2BN)."""


class L2BatchNorm1d(_L2BatchNorm):
    _ranks = (2, 3)


class L2BatchNorm2d(_L2BatchNorm):
    _ranks = (4,)


L2BatchNorm1d.__doc__ = """L2BN (Wang et al., arXiv 2207.02625) for (N, C) or (N, C, L) inputs: each
    sample's whole vector x[n] is l2-normalized, u = x[n] / max(||x[n]||, l2_eps), then batch
    norm over (N, L) per channel. In eval mode the l2 step still runs (it is per sample).
""" + _COMMON_ARGS + _L2_ARGS + _DEVICE_ARGS + """

    Shape: input (N, C) or (N, C, L); output the same shape, dtype and memory format.
    Running statistics are those of u (not of x): nn.BatchNorm's do not carry over.
    """

L2BatchNorm2d.__doc__ = """L2BN (Wang et al., arXiv 2207.02625) for (N, C, H, W) inputs: each sample's
    whole (C, H, W) map is l2-normalized, u = x[n] / max(||x[n]||, l2_eps), then batch norm over
    (N, H, W) per channel. In eval mode the l2 step still runs (it is per sample).
""" + _COMMON_ARGS + _L2_ARGS + _DEVICE_ARGS + """

    Shape: input (N, C, H, W); output the same shape, dtype and memory format (NCHW or
    channels_last). Running statistics are those of u (not of x): nn.BatchNorm2d's do not carry
    over (convert_bn_to_l2bn resets or re-estimates them).
    """


# ------------------------------------------------------------------------------------ SBN

_SBN_SCALE = """
    Output scale: with fft_norm="backward" (the paper's unnormalized rfft2, the default) a
    unit-variance spectrum comes back through irfft2 with spatial variance ~1/(H*W): outputs
    are about 1/sqrt(H*W) of BatchNorm's. fft_norm="ortho" gives BatchNorm's scale and
    "forward" about sqrt(H*W) times it (torch.fft's meanings of norm=). The running statistics
    are those of the fft_norm-normalized spectrum."""


class SpectralBatchNorm2d(_NormBase):
    _complex_buffers = ("running_mean",)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 algorithm="auto", fft_norm="backward", backend="auto", device=None, dtype=None):
        F_nk.resolve_algorithm(algorithm)  # reject bad names at construction
        F_nk.check_fft_norm(fft_norm)
        _check_backend(backend, "sbn", type(self).__name__)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.algorithm = algorithm
        self.fft_norm = fft_norm
        self.backend = backend

    def _family(self, input, reducer=None, layer=None):
        """SBN (functional.spectral_family with the BN stage off), over reducer's group if given."""
        mean, var, count = self._running()
        return F_nk.spectral_family(input, False, None, None, mean, var, None, None, self.weight, self.bias,
                                    self.training or mean is None, None, self.momentum, 0.0, self.eps, self.backend,
                                    self.fft_norm, None, count, self._activation, self._negative_slope,
                                    algorithm=self.algorithm, reducer=reducer, layer=layer)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", algorithm={self.algorithm!r}, fft_norm={self.fft_norm!r}, "
                f"backend={self.backend!r}")


_SBN_ARGS = """
        algorithm: "auto" / "parseval" (exact, FFT-free: one statistics pass and one
            elementwise pass) or "fft" (the literal rfft2 -> normalize -> irfft2 path).
        fft_norm: "backward" (default, the paper), "ortho" or "forward": torch.fft's norm= of the
            spectrum that is normalized (see Output scale)."""

SpectralBatchNorm2d.__doc__ = """Spectral batch norm (Cakaj et al., IJCNN 2023): batch norm of the rfft2
    spectrum X of each channel (complex mean, one variance of |X - mean|^2, real affine), then
    irfft2. running_mean is complex (C,). The unbiased running variance uses the number of
    reduced coefficients n = N*H*(W//2+1).
""" + _COMMON_ARGS + _SBN_ARGS + _DEVICE_ARGS + """

    Shape: input (N, C, H, W); output the same shape, dtype and memory format.
""" + _SBN_SCALE + "\n    "


# ------------------------------------------------------------------------------------ BN+SBN


class BatchNormSBN2d(_NormBase):
    _complex_buffers = ("sbn_running_mean",)
    _state_prefixes = ("", "sbn_")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 sbn_eps=1e-5, sbn_momentum=0.1, fft_norm="backward", backend="auto", device=None, dtype=None):
        F_nk.check_fft_norm(fft_norm)
        _check_backend(backend, "sbn", type(self).__name__)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.sbn_eps = sbn_eps
        self.sbn_momentum = sbn_momentum
        self.fft_norm = fft_norm
        self.backend = backend

    def _family(self, input, reducer=None, layer=None):
        """BN then SBN (functional.spectral_family), over reducer's group if given."""
        bn_state, sbn_state = self._running(), self._running("sbn_")
        return F_nk.spectral_family(input, True, bn_state[0], bn_state[1], sbn_state[0], sbn_state[1], self.weight,
                                    self.bias, self.sbn_weight, self.sbn_bias, self.training or bn_state[0] is None,
                                    self.momentum, self.sbn_momentum, self.eps, self.sbn_eps, self.backend,
                                    self.fft_norm, bn_state[2], sbn_state[2], self._activation,
                                    self._negative_slope, reducer=reducer, layer=layer)

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, sbn: SpectralBatchNorm2d | None = None, **kwargs) -> "BatchNormSBN2d":
        """One fused layer holding bn's and sbn's Parameter objects and buffers (an optimizer
        holding them keeps working). Without sbn, SBN's state is fresh."""
        p = bn.weight if bn.weight is not None else bn.running_mean
        factory = {} if p is None else {"device": p.device, "dtype": p.dtype}
        if sbn is None:
            sbn = SpectralBatchNorm2d(bn.num_features, affine=bn.affine, track_running_stats=bn.track_running_stats,
                                      **factory)
        if bn.num_features != sbn.num_features:
            raise ValueError(f"BN has {bn.num_features} features but SBN has {sbn.num_features}")
        if bn.track_running_stats != sbn.track_running_stats or bn.affine != sbn.affine:
            raise ValueError("BN and SBN must agree on affine and track_running_stats to be fused")
        layer = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    track_running_stats=bn.track_running_stats, sbn_eps=sbn.eps, sbn_momentum=sbn.momentum,
                    fft_norm=sbn.fft_norm, backend=sbn.backend, device="meta", **kwargs)
        for name in _STATE:
            if getattr(bn, name, None) is not None:
                setattr(layer, name, getattr(bn, name))
            if getattr(sbn, name, None) is not None:
                setattr(layer, "sbn_" + name, getattr(sbn, name))
        layer.train(bn.training)
        return layer

    def to_modules(self) -> "NormThenSBN2d":
        """The unfused equivalent NormThenSBN2d(nn.BatchNorm2d, SpectralBatchNorm2d), sharing this
        layer's Parameter objects and buffers; its state_dict keys are this layer's."""
        bn = nn.BatchNorm2d(self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats,
                            device="meta")
        sbn = SpectralBatchNorm2d(self.num_features, self.sbn_eps, self.sbn_momentum, self.affine,
                                  self.track_running_stats, fft_norm=self.fft_norm, backend=self.backend, device="meta")
        for name in _STATE:
            if getattr(self, name) is not None:
                setattr(bn, name, getattr(self, name))
            if getattr(self, "sbn_" + name) is not None:
                setattr(sbn, name, getattr(self, "sbn_" + name))
        pair = NormThenSBN2d(bn, sbn)
        pair.train(self.training)
        return pair

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Before version 3 the layer held sub-modules bn and sbn: bn.weight -> weight, sbn.x -> sbn_x.
        for old in [k for k in state_dict if k.startswith((prefix + "bn.", prefix + "sbn."))]:
            rest = old[len(prefix):]
            state_dict[prefix + (rest[3:] if rest.startswith("bn.") else "sbn_" + rest[4:])] = state_dict.pop(old)
        _fill_missing_sbn_state(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", sbn_eps={self.sbn_eps}, sbn_momentum={self.sbn_momentum}, "
                f"fft_norm={self.fft_norm!r}, backend={self.backend!r}")


BatchNormSBN2d.__doc__ = """nn.BatchNorm2d followed by SpectralBatchNorm2d as one fused layer (one
    statistics pass, one elementwise pass): the paper's "BN + SBN" placement.

    State: BatchNorm's under BatchNorm's names (weight, bias, running_mean, running_var,
    num_batches_tracked), so a plain-BN checkpoint loads into it (strictly: SBN's state then
    keeps its initial values, and a FreshStateWarning lists those keys); SBN's under sbn_*
    names (sbn_weight, sbn_bias, sbn_running_mean (complex), sbn_running_var,
    sbn_num_batches_tracked). .weight is BN's gamma (zero_init_residual / zero_init_last zero it,
    which zeroes the layer's output as for BN). No sub-modules.
""" + _COMMON_ARGS.replace("eps: added", "eps: BN's, added").replace("momentum: running", "momentum: BN's running") + """
        sbn_eps, sbn_momentum: SBN's eps and momentum (defaults 1e-5, 0.1).
        fft_norm: "backward" (default, the paper), "ortho" or "forward": torch.fft's norm= of the
            spectrum that SBN normalizes (see Output scale).""" + _DEVICE_ARGS + """

    Shape: input (N, C, H, W); output the same shape, dtype and memory format.
""" + _SBN_SCALE + "\n    "


def _fill_missing_sbn_state(layer, state_dict, prefix) -> None:
    """A plain-BN checkpoint (BN's keys, none of SBN's) loads strictly: SBN's state keeps the
    layer's current values, and a FreshStateWarning names those keys."""
    if any(k.startswith(prefix + "sbn_") for k in state_dict):
        return
    if not any(prefix + n in state_dict for n in ("weight", "running_mean")):
        return  # not a BN checkpoint either: the usual missing-key errors apply
    keys = []
    for name in _STATE:
        tensor = getattr(layer, "sbn_" + name, None)
        if tensor is not None:
            state_dict[prefix + "sbn_" + name] = tensor.detach()
            keys.append(prefix + "sbn_" + name)
    if keys:
        where = prefix[:-1] or type(layer).__name__
        warnings.warn(FreshStateWarning(
            f"'{where}': the checkpoint has BatchNorm's state but no SBN state; SBN keeps its current "
            f"(initial) values: {', '.join(keys)}", keys), stacklevel=5)


class NormThenSBN2d(nn.Module):
    """A normalization layer followed by a SpectralBatchNorm2d, as two sub-modules ``norm`` and
    ``sbn`` (insert_sbn(fuse=False), unfuse_bn_sbn, and SBN after a norm with no fused form
    such as L2BatchNorm2d). forward(x) = sbn(norm(x)).

    Its state_dict keys are those of the fused BatchNormSBN2d: the norm's own keys at the top
    level (weight, bias, running_mean, ...) and SBN's under sbn_* (sbn_weight, ...), so
    checkpoints move between the fused and unfused forms and plain-norm checkpoints load (SBN's
    state then keeps its initial values, with a FreshStateWarning). named_parameters() keeps the
    module paths (norm.weight, sbn.weight).

    Shape: input (N, C, H, W); output the same shape.
    """

    _version = 1

    def __init__(self, norm: nn.Module, sbn: SpectralBatchNorm2d):
        super().__init__()
        self.norm = norm
        self.sbn = sbn
        self._register_state_dict_hook(_flat_keys)
        self._register_load_state_dict_pre_hook(_nested_keys, with_module=True)

    def forward(self, input):
        return self.sbn(self.norm(input))


def _flat_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest.startswith("norm."):
            state_dict[prefix + rest[5:]] = state_dict.pop(key)
        elif rest.startswith("sbn."):
            state_dict[prefix + "sbn_" + rest[4:]] = state_dict.pop(key)
    return state_dict


def _nested_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    _fill_missing_sbn_state(_SBNView(module.sbn), state_dict, prefix)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest.startswith(("norm.", "sbn.")):
            continue
        state_dict[prefix + ("sbn." + rest[4:] if rest.startswith("sbn_") else "norm." + rest)] = state_dict.pop(key)


class _SBNView:
    """sbn's state under the fused layer's sbn_* names (for _fill_missing_sbn_state)."""

    def __init__(self, sbn):
        self._sbn = sbn

    def __getattr__(self, name):
        return getattr(self._sbn, name[4:]) if name.startswith("sbn_") else getattr(self._sbn, name)


# ------------------------------------------------------------------------------------ norm + act

_FUSED_ACTS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu", nn.Identity: None}
_ACT_NAMES = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "leakyrelu": nn.LeakyReLU, "silu": nn.SiLU,
              "swish": nn.SiLU, "identity": nn.Identity, "": nn.Identity}


def _make_act(apply_act, act_layer, act_kwargs, inplace):
    """The activation module timm's BatchNormAct2d would build (None for none)."""
    if not apply_act or act_layer is None:
        return None
    if isinstance(act_layer, str):
        cls = _ACT_NAMES.get(act_layer.lower())
        if cls is None:
            try:  # timm's names (gelu, hard_swish, ...) where timm is installed
                from timm.layers import get_act_layer
            except ImportError:
                raise ValueError(f"unknown act_layer {act_layer!r}; pass a module class, or one of "
                                 f"{sorted(_ACT_NAMES)}") from None
            cls = get_act_layer(act_layer)
        act_layer = cls
    kwargs = dict(act_kwargs or {})
    try:
        return act_layer(inplace=inplace, **kwargs)
    except TypeError:  # activations without an inplace argument (as timm's create_act_layer)
        return act_layer(**kwargs)


class _NormAct:
    """timm's BatchNormAct2d interface on an nk layer: norm, then (drop, then) activation.

    ReLU, LeakyReLU (any slope), SiLU and Identity are passed to the functional layer as its
    ``activation=`` (fused into the kernels' elementwise pass); any other activation, or any
    drop_layer, runs as a module after the layer (timm's order: drop, then act), and extra_repr
    says so. State: the layer's own (no parameters in act/drop), so BatchNormAct2d checkpoints
    load like BatchNorm2d's."""

    def _set_act(self, act: nn.Module | None, drop: nn.Module | None) -> None:
        drop = None if isinstance(drop, nn.Identity) else drop
        act = None if type(act) is nn.Identity else act
        fused = drop is None and (act is None or type(act) in _FUSED_ACTS)
        if fused:
            self._activation = None if act is None else _FUSED_ACTS[type(act)]
            self._negative_slope = float(act.negative_slope) if isinstance(act, nn.LeakyReLU) else 0.01
            self._act_desc = "identity" if act is None else f"{type(act).__name__} (fused)"
            act = None
        else:
            self._activation, self._negative_slope = None, 0.01
            self._act_desc = f"{type(act).__name__ if act is not None else 'none'} (unfused: run after the layer)"
        self._unfused = not fused
        self.act = act if act is not None else nn.Identity()
        self.drop = drop if drop is not None else nn.Identity()

    def _init_act(self, apply_act, act_layer, act_kwargs, inplace, drop_layer):
        self._set_act(_make_act(apply_act, act_layer, act_kwargs, inplace),
                      drop_layer() if drop_layer is not None else None)

    def _forward(self, input):
        y = super()._forward(input)
        if self._unfused:
            y = self.act(self.drop(y))
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self._act_desc}"


_ACT_ARGS = """
    timm's BatchNormAct2d arguments:
        apply_act: apply the activation (default True).
        act_layer: the activation's module class (default nn.ReLU) or a name ("relu",
            "leaky_relu", "silu"/"swish", "identity"; timm's other names where timm is installed).
        act_kwargs: keyword arguments of act_layer (e.g. {"negative_slope": 0.2}).
        inplace: passed to act_layer where it accepts it (irrelevant when fused).
        drop_layer: a module class applied between the norm and the activation (e.g. DropBlock);
            it makes the activation unfused.
    ReLU, LeakyReLU, SiLU and Identity are fused (the layer's ``activation=``); other
    activations run after the layer, and extra_repr says "unfused"."""


class L2BatchNormAct2d(_NormAct, L2BatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
                 act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None, device=None, dtype=None, *,
                 l2_eps=1e-12, rescale=False, backend="auto"):
        L2BatchNorm2d.__init__(self, num_features, eps, momentum, affine, track_running_stats, l2_eps, rescale, backend,
                               device, dtype)
        self._init_act(apply_act, act_layer, act_kwargs, inplace, drop_layer)


class SpectralBatchNormAct2d(_NormAct, SpectralBatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
                 act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None, device=None, dtype=None, *,
                 algorithm="auto", fft_norm="backward", backend="auto"):
        SpectralBatchNorm2d.__init__(self, num_features, eps, momentum, affine, track_running_stats, algorithm,
                                     fft_norm, backend, device, dtype)
        self._init_act(apply_act, act_layer, act_kwargs, inplace, drop_layer)


class BatchNormSBNAct2d(_NormAct, BatchNormSBN2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
                 act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None, device=None, dtype=None, *,
                 sbn_eps=1e-5, sbn_momentum=0.1, fft_norm="backward", backend="auto"):
        BatchNormSBN2d.__init__(self, num_features, eps, momentum, affine, track_running_stats, sbn_eps, sbn_momentum,
                                fft_norm, backend, device, dtype)
        self._init_act(apply_act, act_layer, act_kwargs, inplace, drop_layer)


L2BatchNormAct2d.__doc__ = "L2BatchNorm2d followed by an activation, with timm's BatchNormAct2d signature.\n" + (
    L2BatchNorm2d.__doc__.split("\n", 1)[1] + _ACT_ARGS + "\n    Own arguments (keyword): l2_eps, rescale, backend.\n    ")
SpectralBatchNormAct2d.__doc__ = ("SpectralBatchNorm2d followed by an activation, with timm's BatchNormAct2d "
                                  "signature.\n" + SpectralBatchNorm2d.__doc__.split("\n", 1)[1] + _ACT_ARGS
                                  + "\n    Own arguments (keyword): algorithm, fft_norm, backend.\n    ")
BatchNormSBNAct2d.__doc__ = ("BatchNormSBN2d followed by an activation, with timm's BatchNormAct2d signature.\n"
                             + BatchNormSBN2d.__doc__.split("\n", 1)[1] + _ACT_ARGS
                             + "\n    Own arguments (keyword): sbn_eps, sbn_momentum, fft_norm, backend.\n    ")
