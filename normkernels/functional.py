"""Functional forms of the layers: validate the input, pick a backend, call the layer's op, and
update the running statistics once the op has succeeded (a failed call leaves the buffers
untouched).

Every check here is cheap host work (it runs at every layer call); the op then does the whole
layer in one dispatcher call per direction (normkernels/ops)."""
from __future__ import annotations

import torch

from . import _backend
from .ops import l2bn as _l2bn
from .ops import running_stats as _rs
from .ops import _act
from .ops import sbn as _sbn
from .ops import sbn_fft as _sbn_fft

__all__ = ["l2_batch_norm", "spectral_batch_norm", "batch_norm_sbn"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ALGORITHMS = ("auto", "parseval", "fft")
ACTIVATIONS = (None, "identity", "relu", "leaky_relu", "silu")
from .ops.sbn_layout import FFT_NORMS  # noqa: E402
_SHAPES = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)"}
# the per-channel arguments' names in the layers' signatures (BN+SBN: SBN's, then BN's)
_CHANNEL_NAMES = ("weight", "bias", "running_mean", "running_var")
_BN_SBN_CHANNEL_NAMES = tuple("sbn_" + n for n in _CHANNEL_NAMES) + tuple("bn_" + n for n in _CHANNEL_NAMES)


def check_input(x, ranks: tuple[int, ...], layer: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() not in ranks:
        want = " or ".join(_SHAPES[r] for r in ranks)
        raise ValueError(f"{layer}: expected a {want} input, got a {x.dim()}-d input of shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{layer}: expected a float16, bfloat16, float32 or float64 input, got {x.dtype}")
    if x.numel() == 0 and x.shape[0] != 0:  # an empty batch (N = 0) is BatchNorm's no-op: empty_batch()
        raise ValueError(f"{layer}: got an empty input of shape {tuple(x.shape)}")


def check_channel_tensors(x, layer: str, names: tuple[str, ...], tensors: tuple) -> None:
    """Per-channel parameters/buffers (named by names) must have shape (C,) and live on x's device."""
    shape, dev = x.shape[1:2], x.device  # one comparison each per tensor: this runs every call
    for name, t in zip(names, tensors):
        if t is not None and (t.shape != shape or t.device != dev):
            if t.shape != shape:
                raise ValueError(f"{layer}: {name} has shape {tuple(t.shape)} but the input has C={x.shape[1]} channels")
            raise ValueError(f"{layer}: {name} is on {t.device} but the input is on {dev}")


def check_batch_stats(count: int, x, layer: str) -> None:
    """BatchNorm's rule: batch statistics need more than one value per channel."""
    if count <= 1:
        raise ValueError(
            f"{layer}: expected more than 1 value per channel when training, got input of shape {tuple(x.shape)}"
        )


def check_group_count(count: int, x, layer: str) -> None:
    """check_batch_stats over a process group: only the group's batch needs more than one value."""
    if count <= 1:
        raise ValueError(f"{layer}: expected more than 1 value per channel when training over the process group, "
                         f"got {count} (local input of shape {tuple(x.shape)})")


def check_running(running_mean, running_var, training: bool, layer: str) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{layer}: pass both running_mean and running_var, or neither")
    if running_mean is None:
        if not training:
            raise ValueError(f"{layer}: running_mean and running_var are required when training=False")
        return
    if running_mean.requires_grad or running_var.requires_grad:  # as F.batch_norm refuses them
        raise RuntimeError(f"{layer}: running_mean and running_var are statistics, not parameters: "
                           "they cannot have requires_grad=True")
    mean_dtype = running_mean.dtype  # a complex mean's parts: float32 (complex64) or float64
    if mean_dtype in (torch.complex64, torch.complex128):
        mean_dtype = torch.float32 if mean_dtype == torch.complex64 else torch.float64
    if training and mean_dtype != running_var.dtype:
        raise TypeError(f"{layer}: running_mean ({running_mean.dtype}) and running_var ({running_var.dtype}) "
                        "must have the same precision (a complex mean: complex64 with float32, complex128 "
                        "with float64)")


def empty_batch(input, counters) -> torch.Tensor:
    """N = 0 in training or eval, as nn.BatchNorm does: an empty output (still part of the
    autograd graph), the running statistics untouched and each given batch counter + 1."""
    for count in counters:
        if count is not None:
            count.add_(1)
    return input.clone()


def check_momentum(momentum, num_batches_tracked, layer: str) -> None:
    """momentum=None (the cumulative average) needs the batch counter."""
    if momentum is None and num_batches_tracked is None:
        raise ValueError(f"{layer}: momentum=None (cumulative average) needs num_batches_tracked")


def check_activation(activation, layer: str = "normkernels") -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{layer}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return "identity" if activation is None else activation


def check_fft_norm(fft_norm, layer: str = "spectral_batch_norm") -> str:
    if fft_norm not in FFT_NORMS:
        raise ValueError(f"{layer}: fft_norm must be one of {FFT_NORMS} (torch.fft's norm), got {fft_norm!r}")
    return fft_norm


def update_running_stats(running_mean, running_var, batch_mean, batch_var, momentum, count: int,
                         num_batches_tracked=None) -> None:
    """running <- (1 - f) * running + f * batch, with the unbiased batch variance (count values per
    channel); f = momentum, or 1 / num_batches_tracked after its increment for momentum=None (the
    cumulative average, read on the device). One op (normkernels::running_stats_update_); a complex
    running mean takes its batch mean as (C, 2) [re, im]."""
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    _rs.running_stats_update(running_mean, running_var, num_batches_tracked, batch_mean, batch_var,
                             -1.0 if momentum is None else float(momentum), count / (count - 1))


def resolve_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return "parseval" if algorithm == "auto" else algorithm


def spectral_count(x) -> int:
    """Number of half-spectrum coefficients per channel: N * H * (W // 2 + 1)."""
    n, _, h, w = x.shape
    return n * h * (w // 2 + 1)


def _as_real(mean):
    """SBN's complex running mean as the (C, 2) [re, im] view the ops take."""
    return None if mean is None else torch.view_as_real(mean)


@torch.fx.wrap  # torch.fx records a layer call as one leaf call, never traces into it
def l2_batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    l2_eps: float = 1e-12,
    rescale: bool = False,
    backend: str = "auto",
    *,
    num_batches_tracked=None,
    activation: str | None = None,
    negative_slope: float = 0.01,
):
    """L2BN: l2-normalize each sample's whole feature vector, then batch norm (then an activation).

    Arguments follow F.batch_norm. input: (N, C), (N, C, L) or (N, C, H, W). rescale=True
    multiplies the normalized sample by sqrt(C*H*W) (unit RMS instead of unit norm). In training
    with running buffers they are updated (momentum=None: cumulative average over
    num_batches_tracked, which is incremented when given). activation: None, "relu",
    "leaky_relu" (negative_slope) or "silu", fused into the elementwise pass.
    """
    return l2bn_family(input, running_mean, running_var, weight, bias, training, momentum, eps, l2_eps, rescale,
                       backend, num_batches_tracked, activation, negative_slope)


def l2bn_family(input, running_mean, running_var, weight, bias, training: bool, momentum, eps: float, l2_eps: float,
                rescale: bool, backend: str, num_batches_tracked, activation, negative_slope: float, *,
                ranks: tuple[int, ...] = (2, 3, 4), reducer=None, layer: str | None = None):
    """L2BN's one entry (l2_batch_norm, the L2BN modules, and with a reducer their synchronized
    forms: normkernels/distributed.py): validates, runs the op (or its synchronized pieces over
    the reducer's group), then updates the running statistics."""
    layer = layer or "l2_batch_norm"
    check_input(input, ranks, layer)
    check_channel_tensors(input, layer, _CHANNEL_NAMES, (weight, bias, running_mean, running_var))
    check_running(running_mean, running_var, training, layer)
    act = check_activation(activation, layer)
    update = training and running_mean is not None
    if update:
        check_momentum(momentum, num_batches_tracked, layer)
    if reducer is None:
        if input.shape[0] == 0:
            return empty_batch(input, (num_batches_tracked,) if update else ())
        if training:
            check_batch_stats(input.numel() // input.shape[1], input, layer)
    be = _backend.resolve("l2bn", backend, input)
    mean, var = (None, None) if training else (running_mean, running_var)
    y, batch_mean, batch_var, count = _l2bn.l2_batch_norm(input, weight, bias, mean, var, float(eps), float(l2_eps),
                                                          bool(rescale), act, float(negative_slope), be, reducer)
    if reducer is not None:
        check_group_count(count, input, layer)
    if update:
        update_running_stats(running_mean, running_var, batch_mean, batch_var, momentum, count, num_batches_tracked)
    return y


@torch.fx.wrap  # torch.fx records a layer call as one leaf call, never traces into it
def spectral_batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    algorithm: str = "auto",
    backend: str = "auto",
    *,
    fft_norm: str = "backward",
    num_batches_tracked=None,
    activation: str | None = None,
    negative_slope: float = 0.01,
):
    """SBN: batch norm of the rfft2 spectrum (complex mean, modulus variance, real affine), then
    irfft2 (then an activation).

    input: (N, C, H, W). running_mean is complex (C,), running_var real (C,), both statistics of
    the spectrum normalized as fft_norm says (torch.fft's norm: "backward" = the paper, whose
    output is ~1/sqrt(H*W) of BatchNorm's scale; "ortho" gives BatchNorm's scale; "forward").
    algorithm "auto"/"parseval" computes it without an FFT; "fft" is the literal rfft2 path.
    """
    return spectral_family(input, False, None, None, running_mean, running_var, None, None, weight, bias, training,
                           None, momentum, 0.0, eps, backend, fft_norm, None, num_batches_tracked, activation,
                           negative_slope, algorithm=algorithm)


@torch.fx.wrap  # torch.fx records a layer call as one leaf call, never traces into it
def batch_norm_sbn(
    input,
    bn_running_mean,
    bn_running_var,
    sbn_running_mean,
    sbn_running_var,
    bn_weight=None,
    bn_bias=None,
    sbn_weight=None,
    sbn_bias=None,
    training: bool = False,
    bn_momentum: float | None = 0.1,
    sbn_momentum: float | None = 0.1,
    bn_eps: float = 1e-5,
    sbn_eps: float = 1e-5,
    backend: str = "auto",
    *,
    fft_norm: str = "backward",
    bn_num_batches_tracked=None,
    sbn_num_batches_tracked=None,
    activation: str | None = None,
    negative_slope: float = 0.01,
):
    """BatchNorm followed by SpectralBatchNorm (then an activation), fused: one statistics pass
    and one elementwise pass. The BN and SBN arguments mean what they mean in F.batch_norm and
    spectral_batch_norm."""
    return spectral_family(input, True, bn_running_mean, bn_running_var, sbn_running_mean, sbn_running_var,
                           bn_weight, bn_bias, sbn_weight, sbn_bias, training, bn_momentum, sbn_momentum, bn_eps,
                           sbn_eps, backend, fft_norm, bn_num_batches_tracked, sbn_num_batches_tracked, activation,
                           negative_slope)


def spectral_family(input, bn: bool, bn_running_mean, bn_running_var, sbn_running_mean, sbn_running_var,
                    bn_weight, bn_bias, sbn_weight, sbn_bias, training: bool, bn_momentum, sbn_momentum,
                    bn_eps: float, sbn_eps: float, backend: str, fft_norm: str, bn_num_batches_tracked,
                    sbn_num_batches_tracked, activation, negative_slope: float, *, algorithm: str = "parseval",
                    reducer=None, layer: str | None = None):
    """The SBN family's one entry: BN then SBN (bn=True, batch_norm_sbn), or SBN alone (bn=False,
    spectral_batch_norm: the BN arguments are None). Validates, runs the family's op (or, with a
    reducer, its synchronized pieces over the reducer's group: normkernels/distributed.py), then
    updates the running statistics."""
    layer = layer or ("batch_norm_sbn" if bn else "spectral_batch_norm")
    sp = "sbn_" if bn else ""  # the SBN arguments' names in this layer's signature
    check_input(input, (4,), layer)
    check_channel_tensors(input, layer, _BN_SBN_CHANNEL_NAMES if bn else _CHANNEL_NAMES,  # (bn off: SBN's only)
                          (sbn_weight, sbn_bias, sbn_running_mean, sbn_running_var, bn_weight, bn_bias,
                           bn_running_mean, bn_running_var))
    if bn:
        check_running(bn_running_mean, bn_running_var, training, layer)
        if (bn_running_mean is None) != (sbn_running_mean is None):
            raise ValueError(f"{layer}: the BN and SBN running statistics must be given together")
    check_running(sbn_running_mean, sbn_running_var, training, layer)
    if sbn_running_mean is not None and not sbn_running_mean.is_complex():
        raise TypeError(f"{layer}: {sp}running_mean must be complex (the spectral mean), got {sbn_running_mean.dtype}")
    act = check_activation(activation, layer)
    check_fft_norm(fft_norm, layer)
    algo = resolve_algorithm(algorithm)
    update = training and sbn_running_mean is not None
    if update:
        if bn:
            check_momentum(bn_momentum, bn_num_batches_tracked, layer)
        check_momentum(sbn_momentum, sbn_num_batches_tracked, layer)
    counters = (bn_num_batches_tracked, sbn_num_batches_tracked) if update else ()
    if reducer is None:
        if input.shape[0] == 0:
            return empty_batch(input, counters)
        if training:
            check_batch_stats(spectral_count(input), input, layer)
    be = _backend.resolve("sbn", backend, input)
    if training:
        stats = (None, None, None, None)
    else:
        stats = (bn_running_mean, bn_running_var, _as_real(sbn_running_mean), sbn_running_var)
    if algo == "fft":
        if bn or reducer is not None:
            raise ValueError(f"{layer}: algorithm='fft' (the literal path) is SpectralBatchNorm2d's alone, without "
                             "synchronized statistics; use algorithm='parseval' (the same math, the default 'auto')")
        y, sbn_mean, sbn_var = _sbn_fft.sbn_fft_forward(input, sbn_weight, sbn_bias, stats[2], stats[3],
                                                        float(sbn_eps), fft_norm, be)
        y, bn_mean, bn_var, samples = _act.act_forward(y, act, float(negative_slope)), None, None, input.shape[0]
    else:
        y, bn_mean, bn_var, sbn_mean, sbn_var, samples = _sbn.forward(
            input, bn, bn_weight, bn_bias, stats[0], stats[1], sbn_weight, sbn_bias, stats[2], stats[3],
            float(bn_eps), float(sbn_eps), fft_norm, act, float(negative_slope), be, reducer)
    h, w = input.shape[2], input.shape[3]
    if reducer is not None:
        check_group_count(samples * h * (w // 2 + 1), input, layer)
    if update:
        if bn:
            update_running_stats(bn_running_mean, bn_running_var, bn_mean, bn_var, bn_momentum, samples * h * w,
                                 bn_num_batches_tracked)
        update_running_stats(sbn_running_mean, sbn_running_var, sbn_mean, sbn_var, sbn_momentum,
                             samples * h * (w // 2 + 1), sbn_num_batches_tracked)
    return y
