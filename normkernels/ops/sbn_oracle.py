"""The torch oracle of the SBN family's ops: python functions with exactly the contracts of
csrc/sbn.cpp (argument lists, the column layouts of normkernels/ops/sbn_layout.py), in float64
per channel and in acc (float32, or float64 for float64 inputs) over the tensor, like the
kernels. Backend "torch" runs them (normkernels/ops/sbn.py makes custom ops of them), the tests
compare the C++ and Triton pieces against them, and the export decompositions reuse their eval
formulas. BN+SBN is the family's op; SBN is it with the BN stage off (bn=False: z = x).

The math (docs/DESIGN.md section 2; csrc/sbn_finalize.h has the same formulas in C++)
-------------------------------------------------------------------------------------
Per channel, X = rfft2(x) (N, H, Wr), Wr = W//2 + 1, M = N H Wr; D(w) = sum_{l<Wr} exp(-2 pi i l w/W);
Pr = irfft2(ones), Pi = irfft2(1j ones) are zero off row 0 and Pr[0, :] = delta_w0. Parseval:
    mu  = (H/M) sum_{n,w} x[n, 0, w] D(w),    var = (H W sum x^2 + H sum R^2 + [W even] H sum A^2)/(2M) - |mu|^2
    y   = a x + (beta - a Re mu) Pr - a Im mu Pi,   a = gamma / sqrt(var + eps)
with row sums R = sum_w x and alternating sums A = sum_w (-1)^w x. The statistics pass works on
t = x - K (K = x[0, c, 0, 0], the shift) so that x = 1000 + randn in float32 keeps its digits:
    mu_t = (H/M) SD,  var_t = (H W S2 + H SR + [W even] H SA)/(2M) - |mu_t|^2,
    mu = mu_t + K W/Wr,  var = var_t + (N d (d - cK) + 2 d (S1 - N Re mu_t))/M,  d = K H W, cK = K W/Wr.
Several processes' sums are combined exactly by moving each to a common shift (t' = t + delta):
    S1' = S1 + n delta, S2' = S2 + 2 delta S1 + n delta^2, SR' = SR + 2 W delta S1 + N H W^2 delta^2,
    SA' = SA, SD0' = SD0 + delta N W, SD1' = SD1 (n = N H W).
The BN stage: z = p (x - K) + Kz per channel (p = 1, Kz = K with the stage off), so the SBN sums
of z are those of t scaled (S1 p, S2 p^2, SR p^2, SA p^2, SD p): one statistics pass and one
apply pass serve both stages.
Backward (g = act'(pre) dy; Sdy = sum g, Gt = sum g t, G0 / G1 = row-0 sums against Pr / Pi):
    Ga = p Gt + Kz Sdy - Re mu G0 - Im mu G1,  dgamma = Ga/s,  dbeta = G0,
    kE = -dgamma (a/s)/(2M),  u = -(H/M) a G0 - 2 H Re mu kE,  v = -(H/M) a G1 - 2 H Im mu kE,
    dz = a g + kE (H W (z-Kz) + H R + [W even] H A (-1)^w) + 2 Kz H W kE + [h == 0](u Re D + v Im D),
and with the BN stage in training dx = p (dz - mean(dz) - xhat mean(dz xhat)) as in BatchNorm.
fft_norm m (f = 1, 1/sqrt(HW), 1/(HW), h = 1/f): the m-normalized layer is the formulas above
with gamma_eff = h gamma, beta_eff = h beta, eps_eff = eps/f^2; statistics are reported in the m
scale (f mu, f^2 var) and the parameter gradients are h times the formulas'.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _act
from .sbn_layout import COL, GSUM, ROW, SUMS

__all__ = ["torch_sbn_stats", "torch_sbn_finish", "torch_sbn_eval", "torch_sbn_grad_stats",
           "torch_sbn_grad_finish", "fft_scale", "row_consts"]

F64 = torch.float64
OPT = Optional[Tensor]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else torch.float32


def out_format(x: Tensor) -> torch.memory_format:
    """The memory format of y / dx: x's when contiguous or channels_last, else contiguous (the
    C++ kernels' rule, csrc/common.cpp make_view)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def like(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_format(x))


def stat(x: Tensor, *shape: int) -> Tensor:
    return x.new_empty(shape, dtype=acc_dtype(x.dtype))


def fill(x: Tensor, val: Tensor) -> Tensor:
    return like(x).copy_(val)


def fft_scale(fft_norm: str, H: int, W: int) -> float:
    """f: the scale of torch.fft's forward transform under ``norm=fft_norm``."""
    if fft_norm == "backward":
        return 1.0
    if fft_norm == "ortho":
        return 1.0 / math.sqrt(H * W)
    if fft_norm == "forward":
        return 1.0 / (H * W)
    raise ValueError(f"fft_norm must be 'backward', 'ortho' or 'forward', got {fft_norm!r}")


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


def _col(t: OPT, default: float, like_t: Tensor) -> Tensor:
    """A (C,) parameter as float64 (default where absent)."""
    return torch.full_like(like_t, default) if t is None else t.to(F64)


# ----------------------------------------------------------------------------------------------
# the finalize formulas (float64, vectorized over channels)
# ----------------------------------------------------------------------------------------------


def _combine(rows_all: Tensor, H: int, W: int, rank: int):
    """rows_all (P, C, 8) -> (the group's sums (C, 6) and process ``rank``'s, both at the shift of
    the first process with samples, that shift (C,), the group's sample count (C,))."""
    rows_all = rows_all.to(F64)
    count, shift = rows_all[..., ROW["count"]], rows_all[..., ROW["shift"]]
    first = (count > 0).to(torch.int64).argmax(0)        # first process with samples (0 if none)
    K = shift.gather(0, first.view(1, -1)).view(-1)
    d = shift - K
    S1, S2, SR, SA, SD0, SD1 = rows_all[..., ROW["sum_t"]:].unbind(-1)
    n = count * (H * W)
    moved = torch.stack([S1 + n * d, S2 + 2.0 * d * S1 + n * d * d,
                         SR + 2.0 * W * d * S1 + n * W * d * d, SA, SD0 + d * count * W, SD1], -1)
    return moved.sum(0), moved[rank], K, count.sum(0)


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


def _saved(K, p, sd, Kz, mr, mi, var, mbn, N, sums, local, gamma, beta, eps, f):
    """The (C, 26) saved tensor (sbn_layout.SAVED) of the SBN stage on z = p (x - K) + Kz with
    statistics (mr, mi, var) in the "backward" scale (csrc/sbn_finalize.h sbn_coef)."""
    h = 1.0 / f
    s = torch.sqrt(var + eps / (f * f))
    a = h * _col(gamma, 1.0, s) / s
    cols = [K, a * p, a * Kz, h * _col(beta, 0.0, s) + a * (Kz - mr), -a * mi,
            p, sd, Kz, mr, mi, s, a, mbn, N]
    return torch.cat([torch.stack(cols, 1), sums, local], 1)


def _grad_core(gs: Tensor, p, Kz, mr, mi, s, a, N, H: int, W: int, training: bool):
    """Gradient sums (C, 4) -> (dgamma_eff, dbeta_eff, kE, u, v, cst) (sbn_grad_core); the sums
    of g t are scaled by p (z - Kz = p t)."""
    Sdy, Gt, G0, G1 = gs.to(F64).unbind(1)
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


def _bn_grad_sums(S: Tensor, Sdy, Gt, a, p, kE, cst, u, v, N, H: int, W: int):
    """sum dz and sum dz t over a batch with sums S (C, 6) (bn_grad_sums)."""
    S1, S2, SR, SA, SD0, SD1 = S.unbind(1)
    kEp = kE * p
    sdz = a * Sdy + 2.0 * H * W * kEp * S1 + N * (H * W) * cst + N * W * u
    E = H * W * S2 + H * SR
    if W % 2 == 0:
        E = E + H * SA
    return sdz, a * Gt + kEp * E + cst * S1 + u * SD0 + v * SD1


# ----------------------------------------------------------------------------------------------
# the passes (in acc, like the kernels; sums in float64)
# ----------------------------------------------------------------------------------------------


def _pre(x: Tensor, saved: Tensor):
    """(pre, t) in acc from the apply columns saved[:, :5] = [shift, x_scale, offset, pr_coef,
    pi_coef]."""
    N, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    shift, x_scale, offset, pr_coef, pi_coef = saved[:, :5].to(F64).unbind(1)
    pi = row_consts(W, x.device)[2]
    row0 = offset[:, None] + pi_coef[:, None] * pi[None, :]                  # (C, W) row-0 offsets
    row0[:, 0] = pr_coef + pi_coef * pi[0]
    add = offset.to(acc).view(1, C, 1, 1).expand(1, C, H, W).clone()
    add[:, :, 0, :] = row0.to(acc)
    t = x.to(acc) - shift.to(acc).view(1, C, 1, 1)
    return x_scale.to(acc).view(1, C, 1, 1) * t + add, t


def _apply(x: Tensor, saved: Tensor, act: str, act_param: float) -> Tensor:
    if x.numel() == 0:
        return like(x)
    pre, _ = _pre(x, saved)
    return fill(x, _act.act_forward(pre, act, act_param))


def _apply_backward(dy, x, saved, bcoef: Tensor, act, act_param, need_row: bool) -> Tensor:
    """dx = c_dy g + c_t t + cst [+ c_R R + c_A A (-1)^w] + [h == 0](u Re D + v Im D)."""
    if x.numel() == 0:
        return like(x)
    N, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    pre, t = _pre(x, saved)
    g = _act.act_backward(pre, dy.to(acc), act, act_param)
    c_dy, c_t, c_R, c_A, cst = (bcoef[:, i].to(acc).view(1, C, 1, 1) for i in range(5))
    out = c_dy * g + c_t * t + cst
    if need_row:
        sgn = _alternating(W, x.device, acc)
        out = out + c_R * t.sum(3, keepdim=True) + c_A * (t * sgn).sum(3, keepdim=True) * sgn
    cs = row_consts(W, x.device)
    row0 = bcoef[:, 5:6].to(F64) * cs[0] + bcoef[:, 6:7].to(F64) * cs[1]    # (C, W)
    out[:, :, 0, :] += row0.to(acc)
    return fill(x, out)


# ----------------------------------------------------------------------------------------------
# the ops' contracts (csrc/sbn.cpp)
# ----------------------------------------------------------------------------------------------


def torch_sbn_stats(x: Tensor) -> Tensor:
    """sbn_stats: rows (C, 8) float64 (sbn_layout.ROWS)."""
    N, C, H, W = x.shape
    rows = torch.zeros((C, len(ROW)), dtype=F64, device=x.device)
    rows[:, ROW["count"]] = N
    if x.numel() == 0:
        return rows
    acc = acc_dtype(x.dtype)
    shift = x[0, :, 0, 0].to(acc)
    t = (x.to(acc) - shift.view(1, C, 1, 1)).to(F64)
    cs = row_consts(W, x.device)
    rows[:, ROW["shift"]] = shift.to(F64)
    rows[:, ROW["sum_t"]] = t.sum((0, 2, 3))
    rows[:, ROW["sum_t2"]] = t.square().sum((0, 2, 3))
    rows[:, ROW["sum_row2"]] = t.sum(3).square().sum((0, 2))
    if W % 2 == 0:
        rows[:, ROW["sum_alt2"]] = (t * _alternating(W, x.device, F64)).sum(3).square().sum((0, 2))
    t0 = t[:, :, 0, :]
    rows[:, ROW["sum_d_re"]] = (t0 * cs[0]).sum((0, 2))
    rows[:, ROW["sum_d_im"]] = (t0 * cs[1]).sum((0, 2))
    return rows


def _no_bn(x: Tensor) -> tuple[Tensor, Tensor]:
    """BN's outputs with the BN stage off: empty (0,) tensors in acc."""
    return stat(x, 0), stat(x, 0)


def torch_sbn_finish(x: Tensor, rows_all: Tensor, rank: int, bn: bool, bn_weight: OPT,
                     bn_bias: OPT, sbn_weight: OPT, sbn_bias: OPT, bn_eps: float, sbn_eps: float,
                     fft_norm: str, act: str, act_param: float):
    """sbn_finish -> (y, bn_mean, bn_var, sbn_mean (C, 2), sbn_var, saved (C, 26))."""
    N, C, H, W = x.shape
    sums, local, K, Nall = _combine(rows_all, H, W, rank)
    if not bool((Nall > 0).all()):
        raise ValueError("sbn_finish: the batch (over every process) has no samples")
    if bn:
        nb = Nall * (H * W)
        m_t = sums[:, 0] / nb
        vbn = (sums[:, 1] / nb - m_t * m_t).clamp_min(0.0)
        sd = torch.sqrt(vbn + bn_eps)
        p = _col(bn_weight, 1.0, sd) / sd
        Kz, mbn = _col(bn_bias, 0.0, sd) - p * m_t, K + m_t
        mr, mi, var = _spectral(sums * torch.stack([p, p * p, p * p, p * p, p, p], 1), Kz, Nall, H, W)
    else:
        p = sd = torch.ones_like(K)
        Kz = mbn = K
        mr, mi, var = _spectral(sums, K, Nall, H, W)
    f = fft_scale(fft_norm, H, W)
    saved = _saved(K, p, sd, Kz, mr, mi, var, mbn, Nall, sums, local, sbn_weight, sbn_bias, sbn_eps, f)
    acc = acc_dtype(x.dtype)
    bn_mean, bn_var = (mbn.to(acc), vbn.to(acc)) if bn else _no_bn(x)
    return (_apply(x, saved, act, act_param), bn_mean, bn_var,
            torch.stack([f * mr, f * mi], 1).to(acc), (f * f * var).to(acc), saved)


def torch_sbn_eval(x: Tensor, bn: bool, bn_weight: OPT, bn_bias: OPT, bn_mean: OPT, bn_var: OPT,
                   sbn_weight: OPT, sbn_bias: OPT, sbn_mean: Tensor, sbn_var: Tensor, bn_eps: float,
                   sbn_eps: float, fft_norm: str, act: str, act_param: float):
    """sbn_forward with given statistics (m-scale; sbn_mean (C, 2) [re, im]) -> as sbn_finish.
    The shift is BN's mean rounded to acc (BN stage on), so that z = p (x - K) + Kz has no
    cancellation for data with a large mean, or 0."""
    N, C, H, W = x.shape
    f = fft_scale(fft_norm, H, W)
    acc = acc_dtype(x.dtype)
    sm, svar = sbn_mean.to(F64), sbn_var.to(F64)
    if bn:
        mbn, vbn = bn_mean.to(F64), bn_var.to(F64)
        K = bn_mean.to(acc).to(F64)
        sd = torch.sqrt(vbn + bn_eps)
        p = _col(bn_weight, 1.0, sd) / sd
        Kz = _col(bn_bias, 0.0, sd) + p * (K - mbn)
        bn_out = bn_mean.to(acc, copy=True), bn_var.to(acc, copy=True)
    else:
        K = Kz = mbn = torch.zeros_like(svar)
        p = sd = torch.ones_like(svar)
        bn_out = _no_bn(x)
    zero = torch.zeros((C, len(SUMS)), dtype=F64, device=x.device)
    saved = _saved(K, p, sd, Kz, sm[:, 0] / f, sm[:, 1] / f, svar / (f * f), mbn,
                   torch.full_like(sd, float(N)), zero, zero, sbn_weight, sbn_bias, sbn_eps, f)
    return ((_apply(x, saved, act, act_param),) + bn_out
            + (sbn_mean.to(acc, copy=True), sbn_var.to(acc, copy=True), saved))


def torch_sbn_grad_stats(dy: Tensor, x: Tensor, saved: Tensor, act: str, act_param: float) -> Tensor:
    """sbn_grad_stats: (C, 4) float64 (sbn_layout.GSUMS)."""
    N, C, H, W = x.shape
    gs = torch.zeros((C, len(GSUM)), dtype=F64, device=x.device)
    if x.numel() == 0:
        return gs
    pre, t = _pre(x, saved)
    g = _act.act_backward(pre, dy.to(acc_dtype(x.dtype)), act, act_param).to(F64)
    t = t.to(F64)
    gs[:, GSUM["sum_g"]] = g.sum((0, 2, 3))
    gs[:, GSUM["sum_gt"]] = (g * t).sum((0, 2, 3))
    gs[:, GSUM["sum_g_pr"]] = g[:, :, 0, 0].sum(0)
    gs[:, GSUM["sum_g_pi"]] = (g[:, :, 0, :] * row_consts(W, x.device)[2]).sum((0, 2))
    return gs


def torch_sbn_grad_finish(dy: Tensor, x: Tensor, saved: Tensor, gsums_local: Tensor,
                          gsums_all: Tensor, bn: bool, training: bool, fft_norm: str, act: str,
                          act_param: float):
    """sbn_grad_finish -> (dx, dbn_weight, dbn_bias, dsbn_weight, dsbn_bias)."""
    N, C, H, W = x.shape
    sv = saved.to(F64)
    K, p, sd, Kz, mr, mi, s, a, mbn, Nall = (sv[:, COL[n]] for n in (
        "shift", "bn_scale", "bn_std", "z_shift", "mean_re", "mean_im", "sbn_std", "sbn_scale", "bn_mean",
        "count"))
    S = sv[:, COL["sum_t"]:COL["sum_t"] + len(SUMS)]
    L = sv[:, COL["local_sum_t"]:COL["local_sum_t"] + len(SUMS)]
    dgs, dbs, kE, u, v, cst = _grad_core(gsums_all, p, Kz, mr, mi, s, a, Nall, H, W, training)
    dgs_l, dbs_l = _grad_core(gsums_local, p, Kz, mr, mi, s, a, Nall, H, W, False)[:2]
    ga, gl = gsums_all.to(F64), gsums_local.to(F64)
    pkEH = p * p * kE * H
    # dx = p dz, minus BatchNorm's batch terms when the BN stage uses the batch's statistics
    bcoef = [p * a, pkEH * W, pkEH, pkEH if W % 2 == 0 else torch.zeros_like(pkEH), p * cst, p * u, p * v]
    acc = acc_dtype(x.dtype)
    if bn and training:
        sdz, sdzt = _bn_grad_sums(S, ga[:, 0], ga[:, 1], a, p, kE, cst, u, v, Nall, H, W)
        nb = Nall * (H * W)
        m_t = S[:, 0] / nb
        kb = p * ((sdzt - m_t * sdz) / sd) / (sd * nb)
        bcoef[1] = bcoef[1] - kb
        bcoef[4] = bcoef[4] - p * sdz / nb + kb * m_t
        sdz_l, sdzt_l = _bn_grad_sums(L, gl[:, 0], gl[:, 1], a, p, kE, cst, u, v, float(N), H, W)
        bn_grads = ((sdzt_l - m_t * sdz_l) / sd).to(acc), sdz_l.to(acc)
    elif bn:
        bn_grads = (a * (gl[:, 1] + (K - mbn) * gl[:, 0]) / sd).to(acc), (a * gl[:, 0]).to(acc)
    else:
        bn_grads = _no_bn(x)
    dx = _apply_backward(dy, x, saved, torch.stack(bcoef, 1), act, act_param, training)
    h = 1.0 / fft_scale(fft_norm, H, W)
    return (dx,) + bn_grads + ((h * dgs_l).to(acc), (h * dbs_l).to(acc))
