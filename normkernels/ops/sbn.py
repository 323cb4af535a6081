"""Spectral Batch Norm (SBN, Parseval identity) and BN+SBN: the Python side of csrc/sbn.cpp.

The ops and their contracts (argument lists, the column layouts of ``rows``, ``saved`` and the
gradient sums, fft_norm, the activation) are documented once, in csrc/sbn.cpp. This module has:

* the fake kernels of the C++ ops (when normkernels._C is loaded);
* the torch oracle: python functions with exactly the contracts of the C++ pieces
  (``torch_sbn_stats``, ``torch_sbn_finish``, ``torch_sbn_grad_stats``, ``torch_sbn_grad_finish``,
  ``torch_bnsbn_finish``, ``torch_bnsbn_grad_finish``) and the custom ops built from them,
  ``normkernels::torch_sbn_forward`` / ``torch_sbn_backward`` / ``torch_bnsbn_forward`` /
  ``torch_bnsbn_backward`` (register_autograd): backend "torch", the fallback, and what the tests
  compare the compiled finalize against, piece by piece;
* the literal FFT path, ``normkernels::sbn_fft_forward`` / ``sbn_fft_backward`` (rfft2 ->
  normalize -> irfft2 with torch.fft's ``norm``; Triton spectral kernels on CUDA);
* the entries ``spectral_batch_norm`` and ``batch_norm_sbn`` (normkernels/functional.py calls
  them) and the synchronized training functions ``sbn_sync`` / ``bnsbn_sync``
  (normkernels/distributed.py).

The math (docs/DESIGN.md section 2; the C++ of csrc/sbn_finalize.h is the same formulas)
----------------------------------------------------------------------------------
Per channel, X = rfft2(x) (N, H, Wr), Wr = W//2 + 1, M = N H Wr; D(w) = sum_{l<Wr} exp(-2 pi i l w/W);
Pr = irfft2(ones), Pi = irfft2(1j ones) are zero off row 0 and Pr[0, :] = delta_w0. Parseval:
    mu  = (H/M) sum_{n,w} x[n, 0, w] D(w),    var = (H W sum x^2 + H sum R^2 + [W even] H sum A^2)/(2M) - |mu|^2
    y   = a x + (beta - a Re mu) Pr - a Im mu Pi,   a = gamma / sqrt(var + eps)
with row sums R = sum_w x and alternating sums A = sum_w (-1)^w x. The statistics pass works on
t = x - K (K = x[0, c, 0, 0]) so that x = 1000 + randn in float32 keeps its digits:
    mu_t = (H/M) SD,  var_t = (H W S2 + H SR + [W even] H SA)/(2M) - |mu_t|^2,
    mu = mu_t + K W/Wr,  var = var_t + (N d (d - cK) + 2 d (S1 - N Re mu_t))/M,  d = K H W, cK = K W/Wr.
Several processes' sums are combined exactly by moving each to a common shift (t' = t + delta):
    S1' = S1 + n delta, S2' = S2 + 2 delta S1 + n delta^2, SR' = SR + 2 W delta S1 + N H W^2 delta^2,
    SA' = SA, SD0' = SD0 + delta N W, SD1' = SD1 (n = N H W).
Backward (g = act'(pre) dy; Sdy = sum g, Gt = sum g t, G0 / G1 = row-0 sums against Pr / Pi):
    Ga = Gt + K Sdy - Re mu G0 - Im mu G1,  dgamma = Ga/s,  dbeta = G0,
    kE = -dgamma (a/s)/(2M),  u = -(H/M) a G0 - 2 H Re mu kE,  v = -(H/M) a G1 - 2 H Im mu kE,
    dx = a g + kE (H W t + H R_t + [W even] H A_t (-1)^w) + 2 K H W kE + [h == 0](u Re D + v Im D).
BN then SBN: z = p (x - K) + Kz per channel, so the SBN sums of z are those of x scaled
(S1 p, S2 p^2, SR p^2, SA p^2, SD p); one statistics pass and one apply pass serve both layers.
fft_norm m (f = 1, 1/sqrt(HW), 1/(HW), h = 1/f): the m-normalized layer is the formulas above
with gamma_eff = h gamma, beta_eff = h beta, eps_eff = eps/f^2; statistics are reported in the m
scale (f mu, f^2 var) and the parameter gradients are h times the formulas'.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

import torch
from torch import Tensor

from . import _act

__all__ = ["spectral_batch_norm", "batch_norm_sbn", "sbn_sync", "bnsbn_sync",
           "torch_sbn_stats", "torch_sbn_finish", "torch_sbn_grad_stats", "torch_sbn_grad_finish",
           "torch_bnsbn_finish", "torch_bnsbn_grad_finish", "FFT_NORMS", "SBN_SAVED",
           "BNSBN_SAVED"]

_F64 = torch.float64
_OPT = Optional[Tensor]
from .sbn_layout import BNSBN_SAVED, FFT_NORMS, SBN_SAVED  # noqa: E402  (the column layouts)

try:  # registers torch.ops.normkernels.sbn_* (csrc/sbn.cpp)
    import normkernels._C  # noqa: F401

    _HAS_C = hasattr(torch.ops.normkernels, "sbn_forward")
except ImportError:  # pure-PyTorch install: backend "torch" only
    _HAS_C = False


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return _F64 if dtype == _F64 else torch.float32


def _out_format(x: Tensor) -> torch.memory_format:
    """The memory format of y / dx: x's when contiguous or channels_last, else contiguous (the
    C++ kernels' rule, csrc/common.cpp make_view)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _like(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_out_format(x))


def _stat(x: Tensor, *shape: int) -> Tensor:
    return x.new_empty(shape, dtype=_acc(x.dtype))


def _check_x(x: Tensor, op: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: expected x of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: expected a floating point x, got {x.dtype}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{op}: expected H > 0 and W > 0, got shape {tuple(x.shape)}")


def _check_channels(x: Tensor, op: str, **params) -> None:
    """(C,) parameters / statistics ((C, 2) for a spectral mean) of x's C, on x's device."""
    C = x.shape[1]
    for name, t in params.items():
        if t is None:
            continue
        shape = (C, 2) if name.endswith("mean") and name != "bn_mean" else (C,)
        if tuple(t.shape) != shape or t.device != x.device:
            raise ValueError(f"{op}: {name} must have shape {shape} on {x.device}, got "
                             f"{tuple(t.shape)} on {t.device}")


def _check_modes(fft_norm: str, act: str, op: str) -> None:
    if fft_norm not in FFT_NORMS:
        raise ValueError(f"{op}: fft_norm must be one of {FFT_NORMS}, got {fft_norm!r}")
    _act.check_act(act, op)


def fft_scale(fft_norm: str, H: int, W: int) -> float:
    """f: the scale of torch.fft's forward transform under ``norm=fft_norm``."""
    if fft_norm == "backward":
        return 1.0
    if fft_norm == "ortho":
        return 1.0 / math.sqrt(H * W)
    if fft_norm == "forward":
        return 1.0 / (H * W)
    raise ValueError(f"fft_norm must be one of {FFT_NORMS}, got {fft_norm!r}")


_CONSTS: dict = {}


def row_consts(W: int, device) -> Tensor:
    """(3, W) float64 [Re D, Im D, Pi[0, :]] computed with torch.fft (the oracle's independent
    derivation of the C++ closed forms): D(w) = sum_{l<Wr} exp(-2 pi i l w / W) = fft of the
    indicator of l < Wr, Pi[0, :] = irfft(1j * ones(Wr), n=W). Cached per (W, device)."""
    key = (W, str(device))
    hit = _CONSTS.get(key)
    if hit is None:
        Wr = W // 2 + 1
        ind = torch.zeros(W, dtype=torch.complex128)
        ind[:Wr] = 1.0
        D = torch.fft.fft(ind)
        pi = torch.fft.irfft(1j * torch.ones(Wr, dtype=torch.complex128), n=W)
        hit = _CONSTS[key] = torch.stack([D.real, D.imag, pi]).to(device).contiguous()
    return hit


def _alternating(W: int, device, dtype) -> Tensor:
    return 1.0 - 2.0 * (torch.arange(W, device=device) % 2).to(dtype)


def _col(t: Optional[Tensor], default: float, like: Tensor) -> Tensor:
    """A (C,) parameter as float64 (default where absent)."""
    return torch.full_like(like, default) if t is None else t.to(_F64)


def _to_complex(m: Tensor) -> Tensor:
    """(C, 2) [re, im] -> complex (complex64 for float32, complex128 for float64)."""
    return torch.view_as_complex(m.contiguous())


# ----------------------------------------------------------------------------------------------
# the torch oracle: the finalize formulas (float64, vectorized over channels)
# ----------------------------------------------------------------------------------------------


def _combine(rows_all: Tensor, H: int, W: int, rank: int):
    """rows_all (P, C, 8) -> (the group's sums (C, 6) and process ``rank``'s, both at the shift of
    the first process with N > 0, that shift K (C,), the group's N (C,))."""
    rows_all = rows_all.to(_F64)
    Nr, Kr = rows_all[..., 0], rows_all[..., 1]
    first = (Nr > 0).to(torch.int64).argmax(0)        # first process with samples (0 if none)
    K = Kr.gather(0, first.view(1, -1)).view(-1)
    d = Kr - K
    S1, S2, SR, SA, SD0, SD1 = rows_all[..., 2:].unbind(-1)
    n = Nr * (H * W)
    moved = torch.stack([S1 + n * d, S2 + 2.0 * d * S1 + n * d * d,
                         SR + 2.0 * W * d * S1 + n * W * d * d, SA, SD0 + d * Nr * W, SD1], -1)
    return moved.sum(0), moved[rank], K, Nr.sum(0)


def _spectral(sums: Tensor, K: Tensor, N: Tensor, H: int, W: int):
    """Shifted sums of t = z - K (C, 6) -> (Re mu, Im mu, var) of SBN on z ("backward" scale)."""
    S1, S2, SR, SA, SD0, SD1 = sums.unbind(1)
    Wr = W // 2 + 1
    M = N * (H * Wr)
    mr_t, mi_t = SD0 * H / M, SD1 * H / M
    E = H * W * S2 + H * SR
    if W % 2 == 0:
        E = E + H * SA
    var_t = E / (2.0 * M) - (mr_t * mr_t + mi_t * mi_t)
    d, cK = K * (H * W), K * (W / Wr)
    var = var_t + (N * d * (d - cK) + 2.0 * d * (S1 - N * mr_t)) / M
    return mr_t + cK, mi_t, var.clamp_min(0.0)


def _sbn_coefs(Kz, mr, mi, var, gamma, beta, eps, f):
    """-> (cx, b, u, v, s, a) of SBN on z with shift Kz (csrc/sbn_finalize.h sbn_coef)."""
    h = 1.0 / f
    s = torch.sqrt(var + eps / (f * f))
    a = h * _col(gamma, 1.0, s) / s
    return a, a * Kz, h * _col(beta, 0.0, s) + a * (Kz - mr), -a * mi, s, a


def _grad_core(gs: Tensor, p, Kz, mr, mi, s, a, N, H: int, W: int, training: bool):
    """Gradient sums (C, 4) -> (dgamma_eff, dbeta_eff, kE, u, v, cst) (sbn_grad_core); the sums
    of g t are scaled by p (BN+SBN: z - Kz = p t; p = 1 for SBN)."""
    Sdy, Gt, G0, G1 = gs.to(_F64).unbind(1)
    Ga = p * Gt + Kz * Sdy - mr * G0 - mi * G1
    dgamma = Ga / s
    if not training:
        z = torch.zeros_like(dgamma)
        return dgamma, G0, z, z, z, z
    M = N * (H * (W // 2 + 1))
    kE = -0.5 * dgamma * (a / s) / M
    u = -(H / M) * a * G0 - 2.0 * H * mr * kE
    v = -(H / M) * a * G1 - 2.0 * H * mi * kE
    return dgamma, G0, kE, u, v, 2.0 * H * W * Kz * kE


def _sbn_back_coef(a, kE, cst, u, v, H: int, W: int):
    kEH = kE * H
    return torch.stack([a, kEH * W, kEH, kEH if W % 2 == 0 else torch.zeros_like(kEH), cst, u, v],
                       1)


def _bn_grad_sums(S: Tensor, Sdy, Gt, a, p, kE, cst, u, v, N, H: int, W: int):
    """sum dz and sum dz t of BN+SBN over a batch with sums S (C, 6) (bn_grad_sums)."""
    S1, S2, SR, SA, SD0, SD1 = S.unbind(1)
    kEp = kE * p
    sdz = a * Sdy + 2.0 * H * W * kEp * S1 + N * (H * W) * cst + N * W * u
    E = H * W * S2 + H * SR
    if W % 2 == 0:
        E = E + H * SA
    return sdz, a * Gt + kEp * E + cst * S1 + u * SD0 + v * SD1


# ----------------------------------------------------------------------------------------------
# the torch oracle: the passes (in acc, like the kernels; sums in float64)
# ----------------------------------------------------------------------------------------------


def _pre(x: Tensor, coef: Tensor):
    """(pre, t) in acc for the forward-apply coefficients coef (C, >= 5) = [K, cx, b, u, v]."""
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    cf = coef[:, :5].to(_F64)
    K, cx, b, u, v = cf.unbind(1)
    pi = row_consts(W, x.device)[2]
    T0 = b[:, None] + v[:, None] * pi[None, :]                  # (C, W) row-0 offsets
    T0[:, 0] = u + v * pi[0]
    add = b.to(acc).view(1, C, 1, 1).expand(1, C, H, W).clone()
    add[:, :, 0, :] = T0.to(acc)
    t = x.to(acc) - K.to(acc).view(1, C, 1, 1)
    return cx.to(acc).view(1, C, 1, 1) * t + add, t


def _fill(x: Tensor, val: Tensor) -> Tensor:
    return _like(x).copy_(val)


def _apply(x: Tensor, coef: Tensor, act: str, act_param: float) -> Tensor:
    if x.numel() == 0:
        return _like(x)
    pre, _ = _pre(x, coef)
    return _fill(x, _act.act_forward(pre, act, act_param))


def _apply_backward(dy, x, coef, bcoef: Tensor, act, act_param, need_row: bool) -> Tensor:
    """dx = c_dy g + c_t t + cst [+ c_R R + c_A A (-1)^w] + [h == 0](u Re D + v Im D)."""
    if x.numel() == 0:
        return _like(x)
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    pre, t = _pre(x, coef)
    g = _act.act_backward(pre, dy.to(acc), act, act_param)
    c_dy, c_t, c_R, c_A, cst = (bcoef[:, i].to(acc).view(1, C, 1, 1) for i in range(5))
    out = c_dy * g + c_t * t + cst
    if need_row:
        sgn = _alternating(W, x.device, acc)
        out = out + c_R * t.sum(3, keepdim=True) + c_A * (t * sgn).sum(3, keepdim=True) * sgn
    cs = row_consts(W, x.device)
    T1 = bcoef[:, 5:6].to(_F64) * cs[0] + bcoef[:, 6:7].to(_F64) * cs[1]    # (C, W)
    out[:, :, 0, :] += T1.to(acc)
    return _fill(x, out)


def torch_sbn_stats(x: Tensor) -> Tensor:
    """sbn_stats (csrc/sbn.cpp): rows (C, 8) float64 [N, K, S1, S2, SR, SA, SD0, SD1]."""
    _check_x(x, "torch_sbn_stats")
    N, C, H, W = x.shape
    rows = torch.zeros((C, 8), dtype=_F64, device=x.device)
    rows[:, 0] = N
    if x.numel() == 0:
        return rows
    acc = _acc(x.dtype)
    K = x[0, :, 0, 0].to(acc)
    t = (x.to(acc) - K.view(1, C, 1, 1)).to(_F64)
    cs = row_consts(W, x.device)
    rows[:, 1] = K.to(_F64)
    rows[:, 2] = t.sum((0, 2, 3))
    rows[:, 3] = t.square().sum((0, 2, 3))
    rows[:, 4] = t.sum(3).square().sum((0, 2))
    if W % 2 == 0:
        rows[:, 5] = (t * _alternating(W, x.device, _F64)).sum(3).square().sum((0, 2))
    t0 = t[:, :, 0, :]
    rows[:, 6] = (t0 * cs[0]).sum((0, 2))
    rows[:, 7] = (t0 * cs[1]).sum((0, 2))
    return rows


def _check_rows(rows_all: Tensor, C: int, op: str) -> None:
    if rows_all.dim() != 3 or rows_all.shape[1:] != (C, 8) or rows_all.dtype != _F64:
        raise ValueError(f"{op}: rows_all must be float64 of shape (P, {C}, 8), got "
                         f"{rows_all.dtype} {tuple(rows_all.shape)}")


def _group(rows_all: Tensor, H: int, W: int, rank: int, op: str):
    sums, local, K, N = _combine(rows_all, H, W, rank)
    if not bool((N > 0).all()):
        raise ValueError(f"{op}: the batch (over every process) has no samples")
    return sums, local, K, N


def torch_sbn_finish(x: Tensor, rows_all: Tensor, weight: _OPT, bias: _OPT, eps: float,
                     fft_norm: str, act: str, act_param: float):
    """sbn_finish (csrc/sbn.cpp) -> (y, batch_mean (C, 2), batch_var (C,), saved (C, 10))."""
    op = "torch_sbn_finish"
    _check_x(x, op)
    _check_modes(fft_norm, act, op)
    _check_channels(x, op, weight=weight, bias=bias)
    N, C, H, W = x.shape
    _check_rows(rows_all, C, op)
    sums, _, K, Nall = _group(rows_all, H, W, 0, op)
    mr, mi, var = _spectral(sums, K, Nall, H, W)
    f = fft_scale(fft_norm, H, W)
    cx, b, u, v, s, a = _sbn_coefs(K, mr, mi, var, weight, bias, eps, f)
    saved = torch.stack([K, cx, b, u, v, mr, mi, s, a, Nall], 1)
    acc = _acc(x.dtype)
    return (_apply(x, saved, act, act_param), torch.stack([f * mr, f * mi], 1).to(acc),
            (f * f * var).to(acc), saved)


def _torch_sbn_eval(x, weight, bias, mean, var, eps, fft_norm, act, act_param):
    N, C, H, W = x.shape
    f = fft_scale(fft_norm, H, W)
    m = mean.to(_F64)
    mr, mi, vb = m[:, 0] / f, m[:, 1] / f, var.to(_F64) / (f * f)
    K = torch.zeros_like(vb)
    cx, b, u, v, s, a = _sbn_coefs(K, mr, mi, vb, weight, bias, eps, f)
    saved = torch.stack([K, cx, b, u, v, mr, mi, s, a, torch.full_like(K, float(N))], 1)
    acc = _acc(x.dtype)
    return (_apply(x, saved, act, act_param), mean.to(acc, copy=True), var.to(acc, copy=True),
            saved)


def torch_sbn_grad_stats(dy: Tensor, x: Tensor, saved: Tensor, act: str, act_param: float
                         ) -> Tensor:
    """sbn_grad_stats (csrc/sbn.cpp): (C, 4) float64 [sum g, sum g t, G0, G1]."""
    _check_x(x, "torch_sbn_grad_stats")
    N, C, H, W = x.shape
    gs = torch.zeros((C, 4), dtype=_F64, device=x.device)
    if x.numel() == 0:
        return gs
    pre, t = _pre(x, saved)
    g = _act.act_backward(pre, dy.to(_acc(x.dtype)), act, act_param).to(_F64)
    t = t.to(_F64)
    gs[:, 0] = g.sum((0, 2, 3))
    gs[:, 1] = (g * t).sum((0, 2, 3))
    gs[:, 2] = g[:, :, 0, 0].sum(0)
    gs[:, 3] = (g[:, :, 0, :] * row_consts(W, x.device)[2]).sum((0, 2))
    return gs


def torch_sbn_grad_finish(dy: Tensor, x: Tensor, saved: Tensor, gsums_local: Tensor,
                          gsums_all: Tensor, training: bool, fft_norm: str, act: str,
                          act_param: float):
    """sbn_grad_finish (csrc/sbn.cpp) -> (dx, dweight, dbias)."""
    op = "torch_sbn_grad_finish"
    _check_x(x, op)
    _check_modes(fft_norm, act, op)
    N, C, H, W = x.shape
    K, cx, b, u, v, mr, mi, s, a, Nall = saved.to(_F64).unbind(1)
    one = torch.ones_like(K)
    dg, db, kE, uu, vv, cst = _grad_core(gsums_all, one, K, mr, mi, s, a, Nall, H, W, training)
    dg_l, db_l = _grad_core(gsums_local, one, K, mr, mi, s, a, Nall, H, W, False)[:2]
    h = 1.0 / fft_scale(fft_norm, H, W)
    dx = _apply_backward(dy, x, saved, _sbn_back_coef(a, kE, cst, uu, vv, H, W), act, act_param,
                         training)
    acc = _acc(x.dtype)
    return dx, (h * dg_l).to(acc), (h * db_l).to(acc)


def torch_bnsbn_finish(x: Tensor, rows_all: Tensor, rank: int, bn_weight: _OPT, bn_bias: _OPT,
                       sbn_weight: _OPT, sbn_bias: _OPT, bn_eps: float, sbn_eps: float,
                       fft_norm: str, act: str, act_param: float):
    """bnsbn_finish (csrc/sbn.cpp) -> (y, bn_mean, bn_var, sbn_mean (C, 2), sbn_var, saved)."""
    op = "torch_bnsbn_finish"
    _check_x(x, op)
    _check_modes(fft_norm, act, op)
    _check_channels(x, op, bn_weight=bn_weight, bn_bias=bn_bias, sbn_weight=sbn_weight,
                    sbn_bias=sbn_bias)
    N, C, H, W = x.shape
    _check_rows(rows_all, C, op)
    if not 0 <= rank < rows_all.shape[0]:
        raise ValueError(f"{op}: rank must be in [0, {rows_all.shape[0]}), got {rank}")
    sums, local, K, Nall = _group(rows_all, H, W, rank, op)
    nb = Nall * (H * W)
    m_t = sums[:, 0] / nb
    vbn = (sums[:, 1] / nb - m_t * m_t).clamp_min(0.0)
    sd = torch.sqrt(vbn + bn_eps)
    p = _col(bn_weight, 1.0, sd) / sd
    Kz = _col(bn_bias, 0.0, sd) - p * m_t
    scale = torch.stack([p, p * p, p * p, p * p, p, p], 1)
    mr, mi, svar = _spectral(sums * scale, Kz, Nall, H, W)
    f = fft_scale(fft_norm, H, W)
    saved = _bnsbn_saved(K, p, sd, Kz, mr, mi, svar, K + m_t, Nall, sums, local, sbn_weight,
                         sbn_bias, sbn_eps, f)
    acc = _acc(x.dtype)
    return (_apply(x, saved, act, act_param), (K + m_t).to(acc), vbn.to(acc),
            torch.stack([f * mr, f * mi], 1).to(acc), (f * f * svar).to(acc), saved)


def _bnsbn_saved(K, p, sd, Kz, mr, mi, svar, mbn, Nall, sums, local, sbn_w, sbn_b, sbn_eps, f):
    cx, b, u, v, s, a = _sbn_coefs(Kz, mr, mi, svar, sbn_w, sbn_b, sbn_eps, f)
    return torch.cat([torch.stack([K, cx * p, b, u, v, p, sd, Kz, mr, mi, s, a, mbn, Nall], 1),
                      sums, local], 1)


def _torch_bnsbn_eval(x, bn_w, bn_b, bn_mean, bn_var, sbn_w, sbn_b, sbn_mean, sbn_var, bn_eps,
                      sbn_eps, fft_norm, act, act_param):
    N, C, H, W = x.shape
    f = fft_scale(fft_norm, H, W)
    mbn, vbn = bn_mean.to(_F64), bn_var.to(_F64)
    K = bn_mean.to(_acc(x.dtype)).to(_F64)      # the shift: BN's mean in the passes' dtype
    sd = torch.sqrt(vbn + bn_eps)
    p = _col(bn_w, 1.0, sd) / sd
    Kz = _col(bn_b, 0.0, sd) + p * (K - mbn)
    sm = sbn_mean.to(_F64)
    zero = torch.zeros((C, 6), dtype=_F64, device=x.device)
    saved = _bnsbn_saved(K, p, sd, Kz, sm[:, 0] / f, sm[:, 1] / f,
                         sbn_var.to(_F64) / (f * f), mbn, torch.full_like(sd, float(N)), zero,
                         zero, sbn_w, sbn_b, sbn_eps, f)
    acc = _acc(x.dtype)
    return (_apply(x, saved, act, act_param), bn_mean.to(acc, copy=True),
            bn_var.to(acc, copy=True), sbn_mean.to(acc, copy=True), sbn_var.to(acc, copy=True),
            saved)


def torch_bnsbn_grad_finish(dy: Tensor, x: Tensor, saved: Tensor, gsums_local: Tensor,
                            gsums_all: Tensor, training: bool, fft_norm: str, act: str,
                            act_param: float):
    """bnsbn_grad_finish (csrc/sbn.cpp) -> (dx, dbn_weight, dbn_bias, dsbn_weight, dsbn_bias)."""
    op = "torch_bnsbn_grad_finish"
    _check_x(x, op)
    _check_modes(fft_norm, act, op)
    N, C, H, W = x.shape
    sv = saved.to(_F64)
    K, _, _, _, _, p, sd, Kz, mr, mi, s, a, mbn, Nall = sv[:, :14].unbind(1)
    S, L = sv[:, 14:20], sv[:, 20:26]
    dgs, dbs, kE, u, v, cst = _grad_core(gsums_all, p, Kz, mr, mi, s, a, Nall, H, W, training)
    dgs_l, dbs_l = _grad_core(gsums_local, p, Kz, mr, mi, s, a, Nall, H, W, False)[:2]
    ga, gl = gsums_all.to(_F64), gsums_local.to(_F64)
    if training:
        sdz, sdzt = _bn_grad_sums(S, ga[:, 0], ga[:, 1], a, p, kE, cst, u, v, Nall, H, W)
        nb = Nall * (H * W)
        m_t = S[:, 0] / nb
        dgb_all = (sdzt - m_t * sdz) / sd
        kb = p * dgb_all / (sd * nb)
        pkEH = p * p * kE * H
        bcoef = torch.stack([p * a, pkEH * W - kb, pkEH,
                             pkEH if W % 2 == 0 else torch.zeros_like(pkEH),
                             p * cst - p * sdz / nb + kb * m_t, p * u, p * v], 1)
        sdz_l, sdzt_l = _bn_grad_sums(L, gl[:, 0], gl[:, 1], a, p, kE, cst, u, v, float(N), H, W)
        dbb, dgb = sdz_l, (sdzt_l - m_t * sdz_l) / sd
    else:
        z = torch.zeros_like(p)
        bcoef = torch.stack([p * a, z, z, z, z, z, z], 1)
        dbb = a * gl[:, 0]
        dgb = a * (gl[:, 1] + (K - mbn) * gl[:, 0]) / sd
    dx = _apply_backward(dy, x, saved, bcoef, act, act_param, training)
    h = 1.0 / fft_scale(fft_norm, H, W)
    acc = _acc(x.dtype)
    return dx, dgb.to(acc), dbb.to(acc), (h * dgs_l).to(acc), (h * dbs_l).to(acc)


# ----------------------------------------------------------------------------------------------
# fake kernels of the C++ ops
# ----------------------------------------------------------------------------------------------


def _fake_sbn_fwd(x, *_):
    C = x.shape[1]
    return _like(x), _stat(x, C, 2), _stat(x, C), x.new_empty((C, 10), dtype=_F64)


def _fake_bnsbn_fwd(x, *_):
    C = x.shape[1]
    return (_like(x), _stat(x, C), _stat(x, C), _stat(x, C, 2), _stat(x, C),
            x.new_empty((C, 26), dtype=_F64))


def _fake_sbn_bwd(dy, x, *_):
    C = x.shape[1]
    return _like(x), _stat(x, C), _stat(x, C)


def _fake_bnsbn_bwd(dy, x, *_):
    C = x.shape[1]
    return (_like(x),) + tuple(_stat(x, C) for _ in range(4))


def _fake_stats(x):
    return x.new_empty((x.shape[1], 8), dtype=_F64)


def _fake_grad_stats(dy, x, saved, act, act_param):
    return x.new_empty((x.shape[1], 4), dtype=_F64)


if _HAS_C:
    for _name, _fake in (("sbn_stats", _fake_stats), ("sbn_finish", _fake_sbn_fwd),
                         ("sbn_forward", _fake_sbn_fwd), ("sbn_grad_stats", _fake_grad_stats),
                         ("sbn_grad_finish", _fake_sbn_bwd), ("sbn_backward", _fake_sbn_bwd),
                         ("bnsbn_finish", _fake_bnsbn_fwd), ("bnsbn_forward", _fake_bnsbn_fwd),
                         ("bnsbn_grad_finish", _fake_bnsbn_bwd),
                         ("bnsbn_backward", _fake_bnsbn_bwd)):
        torch.library.register_fake(f"normkernels::{_name}", _fake)


# ----------------------------------------------------------------------------------------------
# the torch oracle as custom ops (backend "torch")
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("normkernels::torch_sbn_forward", mutates_args=())
def torch_sbn_forward(x: Tensor, weight: _OPT, bias: _OPT, mean: _OPT, var: _OPT, eps: float,
                      fft_norm: str, act: str, act_param: float
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sbn_forward (csrc/sbn.cpp) in torch ops."""
    op = "torch_sbn_forward"
    _check_x(x, op)
    _check_modes(fft_norm, act, op)
    if (mean is None) != (var is None):
        raise ValueError(f"{op}: mean and var must both be given (eval) or both be None")
    _check_channels(x, op, weight=weight, bias=bias, mean=mean, var=var)
    if mean is None:
        return torch_sbn_finish(x, torch_sbn_stats(x)[None], weight, bias, eps, fft_norm, act,
                                act_param)
    return _torch_sbn_eval(x, weight, bias, mean, var, eps, fft_norm, act, act_param)


torch_sbn_forward.register_fake(_fake_sbn_fwd)


@torch.library.custom_op("normkernels::torch_sbn_backward", mutates_args=())
def torch_sbn_backward(dy: Tensor, x: Tensor, saved: Tensor, training: bool, fft_norm: str,
                       act: str, act_param: float) -> tuple[Tensor, Tensor, Tensor]:
    """sbn_backward (csrc/sbn.cpp) in torch ops."""
    gs = torch_sbn_grad_stats(dy, x, saved, act, act_param)
    return torch_sbn_grad_finish(dy, x, saved, gs, gs, training, fft_norm, act, act_param)


torch_sbn_backward.register_fake(_fake_sbn_bwd)


def _grad_to(g: Tensor, p: _OPT, needed: bool):
    if not needed or p is None:
        return None
    return g if g.dtype == p.dtype else g.to(p.dtype)


def _sbn_setup(ctx, inputs, output):
    x, weight, bias, mean, var, eps, fft_norm, act, act_param = inputs
    ctx.save_for_backward(x, output[3])
    ctx.mark_non_differentiable(*output[1:])
    ctx.cfg = (mean is None, fft_norm, act, act_param)
    ctx.params = (weight, bias)


def _sbn_bwd(ctx, dy, *_):
    x, saved = ctx.saved_tensors
    dx, dw, db = torch_sbn_backward(dy, x, saved, *ctx.cfg)
    need = ctx.needs_input_grad
    w, b = ctx.params
    return ((dx if need[0] else None), _grad_to(dw, w, need[1]), _grad_to(db, b, need[2])
            ) + (None,) * 6


torch.library.register_autograd("normkernels::torch_sbn_forward", _sbn_bwd,
                                setup_context=_sbn_setup)


@torch.library.custom_op("normkernels::torch_bnsbn_forward", mutates_args=())
def torch_bnsbn_forward(x: Tensor, bn_weight: _OPT, bn_bias: _OPT, bn_mean: _OPT, bn_var: _OPT,
                        sbn_weight: _OPT, sbn_bias: _OPT, sbn_mean: _OPT, sbn_var: _OPT,
                        bn_eps: float, sbn_eps: float, fft_norm: str, act: str, act_param: float
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """bnsbn_forward (csrc/sbn.cpp) in torch ops."""
    op = "torch_bnsbn_forward"
    _check_x(x, op)
    _check_modes(fft_norm, act, op)
    stats = (bn_mean, bn_var, sbn_mean, sbn_var)
    if any(t is None for t in stats) and not all(t is None for t in stats):
        raise ValueError(f"{op}: bn_mean, bn_var, sbn_mean, sbn_var must all be given (eval) or "
                         "all be None")
    _check_channels(x, op, bn_weight=bn_weight, bn_bias=bn_bias, bn_mean=bn_mean, bn_var=bn_var,
                    sbn_weight=sbn_weight, sbn_bias=sbn_bias, sbn_mean=sbn_mean, sbn_var=sbn_var)
    if bn_mean is None:
        return torch_bnsbn_finish(x, torch_sbn_stats(x)[None], 0, bn_weight, bn_bias, sbn_weight,
                                  sbn_bias, bn_eps, sbn_eps, fft_norm, act, act_param)
    return _torch_bnsbn_eval(x, bn_weight, bn_bias, bn_mean, bn_var, sbn_weight, sbn_bias,
                             sbn_mean, sbn_var, bn_eps, sbn_eps, fft_norm, act, act_param)


torch_bnsbn_forward.register_fake(_fake_bnsbn_fwd)


@torch.library.custom_op("normkernels::torch_bnsbn_backward", mutates_args=())
def torch_bnsbn_backward(dy: Tensor, x: Tensor, saved: Tensor, training: bool, fft_norm: str,
                         act: str, act_param: float
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """bnsbn_backward (csrc/sbn.cpp) in torch ops."""
    gs = torch_sbn_grad_stats(dy, x, saved, act, act_param)
    return torch_bnsbn_grad_finish(dy, x, saved, gs, gs, training, fft_norm, act, act_param)


torch_bnsbn_backward.register_fake(_fake_bnsbn_bwd)


def _bnsbn_setup(ctx, inputs, output):
    (x, bn_w, bn_b, bn_mean, _bv, sbn_w, sbn_b, _sm, _sv, _be, _se, fft_norm, act,
     act_param) = inputs
    ctx.save_for_backward(x, output[5])
    ctx.mark_non_differentiable(*output[1:])
    ctx.cfg = (bn_mean is None, fft_norm, act, act_param)
    ctx.params = (bn_w, bn_b, sbn_w, sbn_b)


def _bnsbn_bwd(ctx, dy, *_):
    x, saved = ctx.saved_tensors
    dx, dgb, dbb, dgs, dbs = torch_bnsbn_backward(dy, x, saved, *ctx.cfg)
    need = ctx.needs_input_grad
    bw, bb, sw, sb = ctx.params
    return ((dx if need[0] else None), _grad_to(dgb, bw, need[1]), _grad_to(dbb, bb, need[2]),
            None, None, _grad_to(dgs, sw, need[5]), _grad_to(dbs, sb, need[6])) + (None,) * 7


torch.library.register_autograd("normkernels::torch_bnsbn_forward", _bnsbn_bwd,
                                setup_context=_bnsbn_setup)


# ----------------------------------------------------------------------------------------------
# Triton (normkernels/triton/sbn.py): the literal FFT path's spectral passes (the parseval ops'
# Triton kernels are registered onto the ops by normkernels/_backend.py)
# ----------------------------------------------------------------------------------------------

_TRITON_MOD = None


def _triton_sbn():
    """normkernels.triton.sbn, or None when triton is missing."""
    global _TRITON_MOD
    if _TRITON_MOD is None:
        _TRITON_MOD = False
        if importlib.util.find_spec("triton") is not None:
            try:
                _TRITON_MOD = importlib.import_module("normkernels.triton.sbn")
            except ImportError:
                pass
    return _TRITON_MOD or None


# ----------------------------------------------------------------------------------------------
# the literal FFT path (algorithm="fft"): rfft2 -> normalize the spectrum -> irfft2
# ----------------------------------------------------------------------------------------------


def _col_factor(H: int, W: int, device, dtype) -> Tensor:
    """c_l = 1 for the self-conjugate columns (l = 0, l = W/2), else 2: with r = 1/(H W f^2) the
    adjoint of irfft2_m is r c_l rfft2_m and the adjoint of rfft2_m is irfft2_m(. / (r c_l))."""
    Wr = W // 2 + 1
    c = torch.full((Wr,), 2.0, dtype=dtype, device=device)
    c[0] = 1.0
    if W % 2 == 0:
        c[-1] = 1.0
    return c


def _use_triton_fft(x: Tensor, backend: str) -> bool:
    return (backend == "triton" and x.numel() > 0 and
            (x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1") and
            getattr(_triton_sbn(), "sbn_fft_spectral_forward", None) is not None)


@torch.library.custom_op("normkernels::sbn_fft_forward", mutates_args=())
def sbn_fft_forward(x: Tensor, weight: _OPT, bias: _OPT, mean: _OPT, var: _OPT, eps: float,
                    fft_norm: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Literal SBN: X = rfft2(x, norm=fft_norm), per-channel complex mean and modulus variance of
    X (or the given ones), Y = gamma (X - mu)/sqrt(var + eps) + beta, y = irfft2(Y, norm=fft_norm).
    Returns (y, mean (C, 2) acc, var (C,) acc), statistics in the fft_norm scale."""
    op = "sbn_fft_forward"
    _check_x(x, op)
    _check_modes(fft_norm, "identity", op)
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    X = torch.fft.rfft2(x.to(acc), norm=fft_norm)
    if _use_triton_fft(x, backend):
        stats = None if mean is None else torch.cat([mean.to(acc), var.to(acc)[:, None]], 1)
        Yr, st = _triton_sbn().sbn_fft_spectral_forward(torch.view_as_real(X).contiguous(),
                                                        weight, bias, stats, eps)
        Y = torch.view_as_complex(Yr)
        # copies: with C = 1 both slices are already contiguous views of st, and the outputs
        # of a custom op may not alias each other
        m, bvar = st[:, :2].clone(), st[:, 2].clone()
    else:
        if mean is None:
            mu = X.mean((0, 2, 3))
            bvar = (X - mu.view(1, -1, 1, 1)).abs().square().mean((0, 2, 3))
        else:
            mu = torch.complex(mean[:, 0].to(acc), mean[:, 1].to(acc))
            bvar = var.to(acc)
        a = (weight.to(acc) if weight is not None else 1.0) / torch.sqrt(bvar + eps)
        Y = a.view(1, -1, 1, 1) * (X - mu.view(1, -1, 1, 1))
        if bias is not None:
            Y = Y + bias.to(acc).view(1, -1, 1, 1)
        m = torch.view_as_real(mu).to(acc, copy=True)
        bvar = bvar.to(acc, copy=True)
    y = torch.fft.irfft2(Y, s=(H, W), norm=fft_norm)
    return _fill(x, y), m, bvar


@sbn_fft_forward.register_fake
def _(x, weight, bias, mean, var, eps, fft_norm, backend):
    C = x.shape[1]
    return _like(x), _stat(x, C, 2), _stat(x, C)


@torch.library.custom_op("normkernels::sbn_fft_backward", mutates_args=())
def sbn_fft_backward(dy: Tensor, x: Tensor, weight: _OPT, mean: Tensor, var: Tensor, eps: float,
                     fft_norm: str, training: bool, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of sbn_fft_forward given its statistics: (dx, dweight (C,) acc, dbias (C,) acc)."""
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    X = torch.fft.rfft2(x.to(acc), norm=fft_norm)
    G = torch.fft.rfft2(dy.to(acc), norm=fft_norm)
    if _use_triton_fft(x, backend):
        stats = torch.cat([mean.to(acc), var.to(acc)[:, None]], 1)
        Or, grads = _triton_sbn().sbn_fft_spectral_backward(
            torch.view_as_real(G).contiguous(), torch.view_as_real(X).contiguous(), weight,
            stats, eps, W, training, fft_norm)
        O = torch.view_as_complex(Or)
        dgamma, dbeta = grads[:, 0], grads[:, 1]
    else:
        M = N * H * (W // 2 + 1)
        f = fft_scale(fft_norm, H, W)
        rcl = _col_factor(H, W, x.device, acc) / (H * W * f * f)
        mu = torch.complex(mean[:, 0].to(acc), mean[:, 1].to(acc)).view(1, -1, 1, 1)
        s = torch.sqrt(var.to(acc) + eps).view(1, -1, 1, 1)
        a = (weight.to(acc).view(1, -1, 1, 1) if weight is not None else 1.0) / s
        dY = G * rcl
        Xh = (X - mu) / s
        dbeta = dY.real.sum((0, 2, 3))
        dgamma = (dY.real * Xh.real + dY.imag * Xh.imag).sum((0, 2, 3))
        if training:
            dX = a * (dY - dY.mean((0, 2, 3), keepdim=True) - Xh * (dgamma.view(1, -1, 1, 1) / M))
        else:
            dX = a * dY
        O = dX / rcl
    dx = _fill(x, torch.fft.irfft2(O, s=(H, W), norm=fft_norm))
    return dx, dgamma.to(acc, copy=True), dbeta.to(acc, copy=True)


@sbn_fft_backward.register_fake
def _(dy, x, weight, mean, var, eps, fft_norm, training, backend):
    C = x.shape[1]
    return _like(x), _stat(x, C), _stat(x, C)


def _fft_setup(ctx, inputs, output):
    x, weight, bias, mean, var, eps, fft_norm, backend = inputs
    ctx.save_for_backward(x, output[1], output[2])
    ctx.mark_non_differentiable(*output[1:])
    ctx.cfg = (eps, fft_norm, mean is None, backend)
    ctx.params = (weight, bias)


def _fft_bwd(ctx, dy, *_):
    x, m, v = ctx.saved_tensors
    w, b = ctx.params
    eps, fft_norm, training, backend = ctx.cfg
    dx, dw, db = sbn_fft_backward(dy, x, w, m, v, eps, fft_norm, training, backend)
    need = ctx.needs_input_grad
    return ((dx if need[0] else None), _grad_to(dw, w, need[1]), _grad_to(db, b, need[2])
            ) + (None,) * 5


torch.library.register_autograd("normkernels::sbn_fft_forward", _fft_bwd, setup_context=_fft_setup)


# ----------------------------------------------------------------------------------------------
# entries (normkernels/functional.py)
# ----------------------------------------------------------------------------------------------

if _HAS_C:
    _SBN_FORWARD = torch.ops.normkernels.sbn_forward.default
    _BNSBN_FORWARD = torch.ops.normkernels.bnsbn_forward.default
_TORCH_SBN_FORWARD = torch.ops.normkernels.torch_sbn_forward.default
_TORCH_BNSBN_FORWARD = torch.ops.normkernels.torch_bnsbn_forward.default


def _native(backend: str, op):
    """The dispatcher op of a concrete backend: "cpp" (CPU) or "triton" (CUDA, or CPU tensors
    inside normkernels.triton.sbn.on_cpu()) run the same op, whose kernel the device picks."""
    if not _HAS_C:
        raise RuntimeError(f"backend {backend!r} needs the C++ extension normkernels._C, which is "
                           "not built (pip install --no-build-isolation -e .); use backend 'torch'")
    return op


def spectral_batch_norm(x: Tensor, weight: _OPT, bias: _OPT, mean: _OPT, var: _OPT, eps: float,
                        algorithm: str, fft_norm: str, act: str, act_param: float, backend: str
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """SBN of x (N, C, H, W), then act. mean (C, 2) real (or complex (C,)) and var (C,) given:
    eval with them; None: training with this batch's statistics. backend is concrete ("cpp",
    "cuda", "triton", "torch"); algorithm "parseval" or "fft" (the literal path; its activation is
    applied after it in torch). Returns (y, batch_mean (C, 2) real, batch_var (C,)), statistics in
    the fft_norm scale."""
    if mean is not None and mean.is_complex():
        mean = torch.view_as_real(mean)
    if algorithm == "parseval":
        if backend == "torch":
            fwd = _TORCH_SBN_FORWARD
        else:
            fwd = _native(backend, _SBN_FORWARD if _HAS_C else None)
        y, m, v, _ = fwd(x, weight, bias, mean, var, eps, fft_norm, act, act_param)
        return y, m, v
    if algorithm == "fft":
        _act.check_act(act, "spectral_batch_norm")
        y, m, v = sbn_fft_forward(x, weight, bias, mean, var, eps, fft_norm, backend)
        return _act.act_forward(y, act, act_param), m, v
    raise ValueError(f"algorithm must be 'parseval' or 'fft', got {algorithm!r}")


def batch_norm_sbn(x: Tensor, bn_weight: _OPT, bn_bias: _OPT, bn_mean: _OPT, bn_var: _OPT,
                   sbn_weight: _OPT, sbn_bias: _OPT, sbn_mean: _OPT, sbn_var: _OPT,
                   bn_eps: float, sbn_eps: float, fft_norm: str, act: str, act_param: float,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BN then SBN, fused, then act. Statistics all given (eval; sbn_mean (C, 2) real or complex
    (C,)) or all None (training). Returns (y, bn_mean, bn_var (biased), sbn_mean (C, 2) real,
    sbn_var)."""
    if sbn_mean is not None and sbn_mean.is_complex():
        sbn_mean = torch.view_as_real(sbn_mean)
    if backend == "torch":
        fwd = _TORCH_BNSBN_FORWARD
    else:
        fwd = _native(backend, _BNSBN_FORWARD if _HAS_C else None)
    y, bm, bv, sm, sv, _ = fwd(x, bn_weight, bn_bias, bn_mean, bn_var, sbn_weight, sbn_bias,
                               sbn_mean, sbn_var, bn_eps, sbn_eps, fft_norm, act, act_param)
    return y, bm, bv, sm, sv


# ----------------------------------------------------------------------------------------------
# synchronized training (normkernels/distributed.py): one gather forward, one all_reduce backward
# ----------------------------------------------------------------------------------------------


class _Pieces:
    """The piece ops of one backend (csrc/sbn.cpp contracts)."""

    def __init__(self, stats, finish, grad_stats, grad_finish, bn_finish, bn_grad_finish):
        self.stats, self.finish = stats, finish
        self.grad_stats, self.grad_finish = grad_stats, grad_finish
        self.bn_finish, self.bn_grad_finish = bn_finish, bn_grad_finish


_TORCH_PIECES = _Pieces(torch_sbn_stats, torch_sbn_finish, torch_sbn_grad_stats,
                        torch_sbn_grad_finish, torch_bnsbn_finish, torch_bnsbn_grad_finish)
if _HAS_C:
    _o = torch.ops.normkernels
    _OP_PIECES = _Pieces(_o.sbn_stats.default, _o.sbn_finish.default, _o.sbn_grad_stats.default,
                         _o.sbn_grad_finish.default, _o.bnsbn_finish.default,
                         _o.bnsbn_grad_finish.default)


def _pieces(backend: str) -> _Pieces:
    if backend == "torch":
        return _TORCH_PIECES
    if not _HAS_C:
        raise RuntimeError(f"backend {backend!r} needs the C++ extension normkernels._C")
    return _OP_PIECES


def _count(rows_all: Tensor) -> int:
    """The group's number of samples (the rows' N column; N is the same for every channel)."""
    return int(round(float(rows_all[:, 0, 0].sum().item()))) if rows_all.shape[1] else 0


class _SbnSync(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, fft_norm, act, act_param, pieces, reducer, info):
        rows_all = reducer.gather(pieces.stats(x))
        y, m, v, saved = pieces.finish(x, rows_all, weight, bias, eps, fft_norm, act, act_param)
        info["n"] = _count(rows_all)
        ctx.save_for_backward(x, saved)
        ctx.cfg = (fft_norm, act, act_param, pieces, reducer)
        ctx.params = (weight, bias)
        ctx.mark_non_differentiable(m, v)
        ctx.set_materialize_grads(False)
        return y, m, v

    @staticmethod
    def backward(ctx, dy, *_):
        if dy is None:
            return (None,) * 10
        x, saved = ctx.saved_tensors
        fft_norm, act, act_param, pieces, reducer = ctx.cfg
        gl = pieces.grad_stats(dy, x, saved, act, act_param)
        ga = reducer.all_reduce(gl)
        dx, dw, db = pieces.grad_finish(dy, x, saved, gl, ga, True, fft_norm, act, act_param)
        need = ctx.needs_input_grad
        w, b = ctx.params
        return ((dx if need[0] else None), _grad_to(dw, w, need[1]), _grad_to(db, b, need[2])
                ) + (None,) * 7


def sbn_sync(x: Tensor, weight: _OPT, bias: _OPT, eps: float, fft_norm: str, act: str,
             act_param: float, backend: str, reducer):
    """Synchronized SBN training forward over reducer's group (normkernels.distributed.Reducer:
    .gather(t) -> (P, *t.shape), .all_reduce(t) -> sum, .rank, .size). Returns (y, batch_mean
    (C, 2), batch_var, count): the group's statistics and its number of spectral coefficients per
    channel (N_all H (W//2 + 1)). An empty local batch joins both collectives."""
    info: dict = {}
    y, m, v = _SbnSync.apply(x, weight, bias, float(eps), fft_norm, act, float(act_param),
                             _pieces(backend), reducer, info)
    return y, m, v, info["n"] * x.shape[2] * (x.shape[3] // 2 + 1)


class _BnSbnSync(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_w, bn_b, sbn_w, sbn_b, bn_eps, sbn_eps, fft_norm, act, act_param,
                pieces, reducer, info):
        rows_all = reducer.gather(pieces.stats(x))
        y, bm, bv, sm, sv, saved = pieces.bn_finish(x, rows_all, reducer.rank, bn_w, bn_b, sbn_w,
                                                    sbn_b, bn_eps, sbn_eps, fft_norm, act,
                                                    act_param)
        info["n"] = _count(rows_all)
        ctx.save_for_backward(x, saved)
        ctx.cfg = (fft_norm, act, act_param, pieces, reducer)
        ctx.params = (bn_w, bn_b, sbn_w, sbn_b)
        ctx.mark_non_differentiable(bm, bv, sm, sv)
        ctx.set_materialize_grads(False)
        return y, bm, bv, sm, sv

    @staticmethod
    def backward(ctx, dy, *_):
        if dy is None:
            return (None,) * 13
        x, saved = ctx.saved_tensors
        fft_norm, act, act_param, pieces, reducer = ctx.cfg
        gl = pieces.grad_stats(dy, x, saved, act, act_param)
        ga = reducer.all_reduce(gl)
        dx, dgb, dbb, dgs, dbs = pieces.bn_grad_finish(dy, x, saved, gl, ga, True, fft_norm, act,
                                                       act_param)
        need = ctx.needs_input_grad
        bw, bb, sw, sb = ctx.params
        return ((dx if need[0] else None), _grad_to(dgb, bw, need[1]), _grad_to(dbb, bb, need[2]),
                _grad_to(dgs, sw, need[3]), _grad_to(dbs, sb, need[4])) + (None,) * 8


def bnsbn_sync(x: Tensor, bn_w: _OPT, bn_b: _OPT, sbn_w: _OPT, sbn_b: _OPT, bn_eps: float,
               sbn_eps: float, fft_norm: str, act: str, act_param: float, backend: str, reducer):
    """Synchronized BN+SBN training forward (see sbn_sync). Returns (y, bn_mean, bn_var,
    sbn_mean (C, 2), sbn_var, bn_count = N_all H W, sbn_count = N_all H (W//2 + 1))."""
    info: dict = {}
    y, bm, bv, sm, sv = _BnSbnSync.apply(x, bn_w, bn_b, sbn_w, sbn_b, float(bn_eps),
                                         float(sbn_eps), fft_norm, act, float(act_param),
                                         _pieces(backend), reducer, info)
    n, H, W = info["n"], x.shape[2], x.shape[3]
    return y, bm, bv, sm, sv, n * H * W, n * H * (W // 2 + 1)
