"""Spectral Batch Norm (SBN) and BN+SBN ops (DESIGN.md section 2).

Layout of this module
---------------------
* constants: D(w) = sum_{l<Wr} exp(-2 pi i l w / W) and the row-0 patterns Pr[0,:], Pi[0,:]
  (Pr = irfft2(ones), Pi = irfft2(1j*ones) are zero off row 0), cached per (W, device, dtype).
* passes:    ``_passes_torch`` / ``_passes_triton`` -- the four heavy passes over the tensor
             (statistics, forward apply, gradient statistics, backward apply); same interface.
* finalize:  partial sums -> statistics -> per-channel coefficients, forward and backward, in
             float64 torch ops.  The ONLY place these formulas exist; every backend uses them.
* ops:       normkernels::sbn_forward / sbn_backward (Parseval), sbn_fft_forward /
             sbn_fft_backward (literal rfft2 path), bnsbn_forward / bnsbn_backward (BN then SBN).
             CPU kernel = torch passes; the Triton passes run when backend == "triton" on CUDA
             tensors (or on CPU tensors under TRITON_INTERPRET=1, for tests).
* entry points: ``spectral_batch_norm`` and ``batch_norm_sbn`` (signatures fixed by the contract).

Shifted sums (stability for x = 1000 + randn)
---------------------------------------------
The statistics pass works on t = x - K with a per-channel constant K = x[0, c, 0, 0]:
    S1 = sum t, S2 = sum t^2, SR = sum R_t^2, SA = sum A_t^2, SD = sum_{n,w} t[n,0,w] D(w).
With M = N*H*Wr, d = K*H*W (DC coefficient of the constant K) and cK = K*W/Wr (= d*N/M):
    mu_t  = (H/M) * SD
    var_t = (H*W*S2 + H*SR + [W even]*H*SA) / (2M) - |mu_t|^2
    mu    = mu_t + cK                                    (the constant only moves the DC bin)
    var   = var_t + ( N*d*(d - cK) + 2*d*(S1 - N*Re mu_t) ) / M
The forward output is y = a*(x - K) + a*K + [h==0]*((beta - a Re mu) Pr[w] - a Im mu Pi[w]);
Pr[0, :] = delta_w0, so at (0, 0) the constant is a*(K - Re mu) + beta, formed in float64.
Backward, with Sdy = sum dy, Gt = sum dy*t, G0 = sum_row0 dy*Pr, G1 = sum_row0 dy*Pi:
    Ga = Gt + K*Sdy - Re mu*G0 - Im mu*G1,  dgamma = Ga/s,  dbeta = G0
    dvar = -Ga*a/(2 s^2),  kE = dvar/M,  kr = -a*G0 - 2 Re mu dvar,  ki = -a*G1 - 2 Im mu dvar
    dx = a*dy + kE*(H*W*t + H*R_t + [W even]*H*A_t*(-1)^w) + 2*K*H*W*kE
         + [h==0]*(H/M)*(kr Re D(w) + ki Im D(w))
(x = t + K: H*W*x + H*R_x + H*A_x*(-1)^w = same in t + 2*K*H*W, since sum_w (-1)^w = 0.)
"""


import os
from typing import Optional

import torch
from torch import Tensor

__all__ = ["spectral_batch_norm", "batch_norm_sbn"]

_F64 = torch.float64
_BACKENDS = ("cuda", "cpp", "triton", "torch")

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_TRITON_MOD = None


def _triton_kernels():
    global _TRITON_MOD
    if _TRITON_MOD is None:
        try:
            from normkernels.triton import sbn_kernels
            _TRITON_MOD = sbn_kernels
        except Exception:  # triton missing or broken: torch passes are used
            _TRITON_MOD = False
    return _TRITON_MOD or None


def _use_triton(x: Tensor, backend: str) -> bool:
    if backend != "triton" or x.numel() == 0:  # an empty (synchronized) batch: torch passes
        return False
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return False
    return _triton_kernels() is not None


_CONST_CACHE: dict = {}


def _row_consts(W: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(PD, PP), each (2, W): PD = [Re D, Im D], PP = [Pr[0, :], Pi[0, :]] with
    D(w) = sum_{l<Wr} exp(-2 pi i l w/W) (= fft of the indicator of l < Wr),
    Pr[0, :] = irfft(ones(Wr), n=W), Pi[0, :] = irfft(1j*ones(Wr), n=W); rows h > 0 are 0."""
    key = (W, str(device), dtype)
    hit = _CONST_CACHE.get(key)
    if hit is None:
        Wr = W // 2 + 1
        ind = torch.zeros(W, dtype=_F64)
        ind[:Wr] = 1.0
        D = torch.fft.fft(ind.to(torch.complex128))
        ones = torch.ones(Wr, dtype=torch.complex128)
        pr = torch.fft.irfft(ones, n=W)
        pi = torch.fft.irfft(1j * ones, n=W)
        PD = torch.stack([D.real, D.imag]).to(device=device, dtype=dtype).contiguous()
        PP = torch.stack([pr, pi]).to(device=device, dtype=dtype).contiguous()
        hit = (PD, PP)
        _CONST_CACHE[key] = hit
    return hit


def _shift(x: Tensor) -> Tensor:
    """Per-channel shift K_c = x[0, c, 0, 0] in float64 (any value works; one sample of the
    channel keeps t = x - K small for data with a large mean). An empty batch (a process of a
    synchronized group with no samples) gets K = 0; it contributes nothing."""
    if x.shape[0] == 0:
        return torch.zeros(x.shape[1], dtype=_F64, device=x.device)
    return x[0, :, 0, 0].to(_F64)


def _vec(t: Optional[Tensor], C: int, fill: float, device) -> Tensor:
    if t is None:
        return torch.full((C,), fill, dtype=_F64, device=device)
    return t.to(_F64)


# ----------------------------------------------------------------------------------------------
# the heavy passes: torch fallback (same interface as normkernels.triton.sbn_kernels)
# ----------------------------------------------------------------------------------------------


def _sgn(W: int, device, dtype) -> Tensor:
    return 1.0 - 2.0 * (torch.arange(W, device=device) % 2).to(dtype)


def _torch_stats(x: Tensor, K: Tensor, P: Tensor) -> Tensor:
    acc = _acc(x.dtype)
    t = x.to(acc) - K.to(acc).view(1, -1, 1, 1)
    R = t.sum(3)
    A = (t * _sgn(x.shape[3], x.device, acc)).sum(3)
    t0 = t[:, :, 0, :]
    return torch.stack([
        t.sum((0, 2, 3)), (t * t).sum((0, 2, 3)), (R * R).sum((0, 2)), (A * A).sum((0, 2)),
        (t0 * P[0]).sum((0, 2)), (t0 * P[1]).sum((0, 2))], dim=1)


def _torch_grad_stats(dy: Tensor, x: Tensor, K: Tensor, P: Tensor) -> Tensor:
    acc = _acc(x.dtype)
    t = x.to(acc) - K.to(acc).view(1, -1, 1, 1)
    g = dy.to(acc)
    g0 = g[:, :, 0, :]
    return torch.stack([g.sum((0, 2, 3)), (g * t).sum((0, 2, 3)),
                        (g0 * P[0]).sum((0, 2)), (g0 * P[1]).sum((0, 2))], dim=1)


def _torch_forward_apply(x: Tensor, coef: Tensor, P: Tensor) -> Tensor:
    acc = _acc(x.dtype)
    cf = coef.to(acc)
    K, cx, b, u, v = (cf[:, i].view(1, -1, 1, 1) for i in range(5))
    y = cx * (x.to(acc) - K)
    # row 0: b is replaced by u where P[0] = 1 (P[0] = Pr[0, :] = delta_w0)
    row = b[..., 0] * (1.0 - P[0]) + u[..., 0] * P[0] + v[..., 0] * P[1]   # (1, C, W)
    y = torch.cat([y[:, :, :1, :] + row.unsqueeze(2), y[:, :, 1:, :] + b], dim=2)
    return torch.empty_like(x).copy_(y)


def _torch_backward_apply(dy: Tensor, x: Tensor, coef: Tensor, P: Tensor,
                          need_row: bool) -> Tensor:
    acc = _acc(x.dtype)
    cf = coef.to(acc)
    K, c_dy, c_t, c_R, c_A, cst, u, v = (cf[:, i].view(1, -1, 1, 1) for i in range(8))
    t = x.to(acc) - K
    out = c_dy * dy.to(acc) + c_t * t + cst
    if need_row:
        sgn = _sgn(x.shape[3], x.device, acc)
        R = t.sum(3, keepdim=True)
        A = (t * sgn).sum(3, keepdim=True)
        out = out + c_R * R + c_A * A * sgn
    row = u[..., 0] * P[0] + v[..., 0] * P[1]
    out = torch.cat([out[:, :, :1, :] + row.unsqueeze(2), out[:, :, 1:, :]], dim=2)
    return torch.empty_like(x).copy_(out)


# C++ CPU passes (csrc/cpu/sbn_cpu.cpp): present when the extension is built; fake kernels
# so that opcheck / torch.compile see through them.
try:
    import normkernels._C  # noqa: F401  (registers torch.ops.normkernels.*)

    _CPP_SBN = hasattr(torch.ops.normkernels, "sbn_stats")
except ImportError:
    _CPP_SBN = False


if _CPP_SBN:
    @torch.library.register_fake("normkernels::sbn_stats")
    def _(x: Tensor, K: Tensor, P: Tensor) -> Tensor:
        return x.new_empty((x.shape[1], 6), dtype=_acc(x.dtype))

    @torch.library.register_fake("normkernels::sbn_grad_stats")
    def _(dy: Tensor, x: Tensor, K: Tensor, P: Tensor) -> Tensor:
        return x.new_empty((x.shape[1], 4), dtype=_acc(x.dtype))

    @torch.library.register_fake("normkernels::sbn_forward_apply")
    def _(x: Tensor, coef: Tensor, P: Tensor) -> Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("normkernels::sbn_backward_apply")
    def _(dy: Tensor, x: Tensor, coef: Tensor, P: Tensor, need_row: bool) -> Tensor:
        return torch.empty_like(x)


class _Passes:
    """The four heavy passes of one backend: Triton kernels, C++ CPU kernels, or torch ops."""

    def __init__(self, x: Tensor, backend: str):
        if _use_triton(x, backend):
            k = _triton_kernels()
            self.stats, self.grad_stats = k.sbn_stats, k.sbn_grad_stats
            self.forward_apply, self.backward_apply = k.sbn_forward_apply, k.sbn_backward_apply
        elif backend == "cpp" and _CPP_SBN and x.device.type == "cpu":
            o = torch.ops.normkernels
            self.stats, self.grad_stats = o.sbn_stats, o.sbn_grad_stats
            self.forward_apply, self.backward_apply = o.sbn_forward_apply, o.sbn_backward_apply
        else:
            self.stats, self.grad_stats = _torch_stats, _torch_grad_stats
            self.forward_apply, self.backward_apply = _torch_forward_apply, _torch_backward_apply


# ----------------------------------------------------------------------------------------------
# finalize (float64 torch ops; shared by every backend)
# ----------------------------------------------------------------------------------------------


def spectral_stats_from_sums(sums: Tensor, K: Tensor, N: int, H: int, W: int
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """Shifted sums of t = z - K (columns S1, S2, SR, SA, SD_re, SD_im) -> (Re mu, Im mu, var)
    of SBN on z, exactly (see module docstring)."""
    sums = sums.to(_F64)
    Wr = W // 2 + 1
    M = N * H * Wr
    even = 1.0 if W % 2 == 0 else 0.0
    S1, S2, SR, SA, SDr, SDi = sums.unbind(1)
    mr_t = (H / M) * SDr
    mi_t = (H / M) * SDi
    var_t = (H * W * S2 + H * SR + even * H * SA) / (2 * M) - (mr_t * mr_t + mi_t * mi_t)
    d = K * (H * W)
    cK = K * (W / Wr)
    mr = mr_t + cK
    var = var_t + (N * d * (d - cK) + 2.0 * d * (S1 - N * mr_t)) / M
    return mr, mi_t, var.clamp_min(0.0)


def combine_shifted_sums(sums: Tensor, K: Tensor, N: int, H: int, W: int, sync=None
                         ) -> tuple[Tensor, Tensor, int, Tensor]:
    """Statistics-pass sums of every process of ``sync`` (normkernels.distributed; None: this
    process only) -> (sums of the whole batch, their common shift K*, the whole batch's N, this
    process's sums re-centered to K*).

    One all_gather of the packed rows [N_r, K_r, sums_r]. Each process's shift K_r differs, so
    its sums are moved to K* (that of the first process with N_r > 0) exactly: with
    t' = t + delta, delta = K_r - K*, n = N_r*H*W,
        S1' = S1 + n delta,   S2' = S2 + 2 delta S1 + n delta^2,
        SR' = SR + 2 W delta S1 + N_r H W^2 delta^2,   SA' = SA  (W even; unused for odd W),
        SD' = SD + delta N_r sum_w D(w) = SD + delta N_r [W, 0].
    """
    sums = sums.to(_F64)
    C = sums.shape[0]
    row = torch.cat([torch.full((C, 1), float(N), dtype=_F64, device=sums.device),
                     K.to(_F64)[:, None], sums], dim=1)                      # (C, 8)
    rows = row.unsqueeze(0) if sync is None else sync.gather(row).to(_F64)  # (P, C, 8)
    Nr = rows[:, :, 0]
    first = int(torch.nonzero(Nr[:, 0] > 0)[0, 0]) if bool((Nr[:, 0] > 0).any()) else 0
    Ks = rows[first, :, 1]
    delta = rows[:, :, 1] - Ks                                              # (P, C)
    S1, S2, SR, SA, SDr, SDi = rows[:, :, 2:].unbind(2)
    n = Nr * (H * W)
    moved = torch.stack([S1 + n * delta,
                         S2 + 2.0 * delta * S1 + n * delta * delta,
                         SR + 2.0 * W * delta * S1 + Nr * (H * W * W) * delta * delta,
                         SA,
                         SDr + delta * Nr * W,
                         SDi], dim=2)                                       # (P, C, 6)
    local = moved[0] if sync is None else moved[sync.rank]
    return moved.sum(0), Ks, int(round(Nr[:, 0].sum().item())), local


def _sbn_grad_core(gs: Tensor, Kz: Tensor, mr: Tensor, mi: Tensor, s: Tensor, a: Tensor,
                   N: int, H: int, W: int, training: bool, gz: Tensor):
    """SBN backward on z given gradient sums gs = [Sdy, *, G0, G1] and gz = sum dy*(z - Kz).
    Returns dgamma, dbeta, kE, u, v, cst with
    dz = a*dy + kE*(HW*(z-Kz) + H*R + [even] H*A*(-1)^w) + cst + [h==0]*(u ReD + v ImD)."""
    Wr = W // 2 + 1
    M = N * H * Wr
    Sdy, _, G0, G1 = gs.to(_F64).unbind(1)
    Ga = gz + Kz * Sdy - mr * G0 - mi * G1
    dgamma = Ga / s
    dbeta = G0
    if not training:
        zero = torch.zeros_like(a)
        return dgamma, dbeta, zero, zero, zero, zero
    dvar = -Ga * a / (2.0 * s * s)
    kE = dvar / M
    kr = -a * G0 - 2.0 * mr * dvar
    ki = -a * G1 - 2.0 * mi * dvar
    u = (H / M) * kr
    v = (H / M) * ki
    cst = 2.0 * Kz * (H * W) * kE
    return dgamma, dbeta, kE, u, v, cst


# ----------------------------------------------------------------------------------------------
# Parseval SBN: implementations
# ----------------------------------------------------------------------------------------------


def _sbn_forward_impl(x, weight, bias, mean, var, eps, backend, sync=None):
    """``sync`` (normkernels.distributed, training only): statistics over every process; the
    saved tensor then gets a 6th column, the whole batch's N."""
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    passes = _Passes(x, backend)
    PD, PP = _row_consts(W, x.device, acc)
    K = _shift(x)
    N_all = N
    if mean is None:
        sums = passes.stats(x, K.to(acc), PD)
        if sync is not None:
            sums, K, N_all, _ = combine_shifted_sums(sums, K, N, H, W, sync)
        mr, mi, bvar = spectral_stats_from_sums(sums, K, N_all, H, W)
    else:
        m = mean.to(_F64)
        mr, mi, bvar = m[:, 0], m[:, 1], var.to(_F64)
    s = torch.sqrt(bvar + eps)
    a = _vec(weight, C, 1.0, x.device) / s
    beta = _vec(bias, C, 0.0, x.device)
    # y = a*(x-K) + a*K + [h==0]*((beta - a Re mu) Pr + (-a Im mu) Pi); the pass takes
    # u = b + (beta - a Re mu) for the Pr = 1 position (cancellation done here in float64)
    coef = torch.stack([K, a, a * K, a * (K - mr) + beta, -a * mi], dim=1)
    y = passes.forward_apply(x, coef.to(acc), PP)
    cols = [K, mr, mi, s, a] + ([] if sync is None else [torch.full_like(K, float(N_all))])
    saved = torch.stack(cols, dim=1)
    return y, torch.stack([mr, mi], 1).to(acc), bvar.to(acc).clone(), saved


def _sbn_backward_impl(dy, x, weight, saved, training, backend, sync=None):
    """``sync``: the dx coefficients use the gradient sums of every process (one all_reduce)
    and the whole batch's N (saved's 6th column); dgamma, dbeta stay this process's share."""
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    passes = _Passes(x, backend)
    PD, PP = _row_consts(W, x.device, acc)
    K, mr, mi, s, a = saved.to(_F64).unbind(1)[:5]
    gs = passes.grad_stats(dy, x, K.to(acc), PP).to(_F64)
    gs_all, N_all = gs, N
    if sync is not None:
        gs_all, N_all = sync.all_reduce(gs).to(_F64), int(round(saved[0, 5].item()))
    dgamma, dbeta, kE, u, v, cst = _sbn_grad_core(gs_all, K, mr, mi, s, a, N_all, H, W,
                                                  training, gs_all[:, 1])
    if sync is not None:
        dgamma, dbeta = _sbn_grad_core(gs, K, mr, mi, s, a, N, H, W, False, gs[:, 1])[:2]
    even = 1.0 if W % 2 == 0 else 0.0
    coef = torch.stack([K, a, kE * (H * W), kE * H, kE * (H * even), cst, u, v], dim=1)
    dx = passes.backward_apply(dy, x, coef.to(acc), PD, training)
    pdt = weight.dtype if weight is not None else acc
    return dx, dgamma.to(pdt).clone(), dbeta.to(pdt).clone()


# ----------------------------------------------------------------------------------------------
# FFT (literal) SBN: implementations
# ----------------------------------------------------------------------------------------------


def _col_factor(H: int, W: int, device, dtype) -> Tensor:
    """c_l = 1 for the self-conjugate columns (l = 0, l = W/2), else 2: the adjoint of
    irfft2 is rfft2 * c_l/(H*W), the adjoint of rfft2 is H*W*irfft2(. / c_l)."""
    Wr = W // 2 + 1
    c = torch.full((Wr,), 2.0, dtype=dtype, device=device)
    c[0] = 1.0
    if W % 2 == 0:
        c[-1] = 1.0
    return c


def _fft_forward_impl(x, weight, bias, mean, var, eps, backend):
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    X = torch.fft.rfft2(x.to(acc))
    if _use_triton(x, backend):
        k = _triton_kernels()
        stats = None if mean is None else torch.cat([mean.to(acc), var.to(acc)[:, None]], 1)
        Yr, st = k.sbn_fft_spectral_forward(torch.view_as_real(X).contiguous(), weight, bias,
                                            stats, eps)
        Y = torch.view_as_complex(Yr)
        mr, mi, bvar = st[:, 0], st[:, 1], st[:, 2]
        mu = torch.complex(mr, mi)
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
    y = torch.fft.irfft2(Y, s=(H, W))
    out = torch.empty_like(x).copy_(y)
    return out, torch.view_as_real(mu).clone().to(acc), bvar.to(acc).clone()


def _fft_backward_impl(dy, x, weight, mean, var, eps, training, backend):
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    Wr = W // 2 + 1
    M = N * H * Wr
    X = torch.fft.rfft2(x.to(acc))
    G = torch.fft.rfft2(dy.to(acc))
    if _use_triton(x, backend):
        k = _triton_kernels()
        stats = torch.cat([mean.to(acc), var.to(acc)[:, None]], 1)
        Or, grads = k.sbn_fft_spectral_backward(
            torch.view_as_real(G).contiguous(), torch.view_as_real(X).contiguous(), weight,
            stats, eps, W, training)
        O = torch.view_as_complex(Or)
        dgamma, dbeta = grads[:, 0], grads[:, 1]
    else:
        cl = _col_factor(H, W, x.device, acc)
        mu = torch.complex(mean[:, 0].to(acc), mean[:, 1].to(acc)).view(1, -1, 1, 1)
        s = torch.sqrt(var.to(acc) + eps).view(1, -1, 1, 1)
        a = (weight.to(acc).view(1, -1, 1, 1) if weight is not None else 1.0) / s
        dY = G * (cl / (H * W))
        Xh = (X - mu) / s
        dbeta = dY.real.sum((0, 2, 3))
        dgamma = (dY.real * Xh.real + dY.imag * Xh.imag).sum((0, 2, 3))
        if training:
            dX = a * (dY - dY.mean((0, 2, 3), keepdim=True) - Xh * (dgamma.view(1, -1, 1, 1) / M))
        else:
            dX = a * dY
        O = dX * ((H * W) / cl)
    dx = torch.empty_like(x).copy_(torch.fft.irfft2(O, s=(H, W)))
    pdt = weight.dtype if weight is not None else acc
    return dx, dgamma.to(pdt).clone(), dbeta.to(pdt).clone()


# ----------------------------------------------------------------------------------------------
# BN + SBN fused: implementations
# ----------------------------------------------------------------------------------------------
# saved columns
_BS = dict(K=0, p=1, sd=2, Kz=3, mr=4, mi=5, s=6, a=7, S1=8, S2=9, SR=10, SA=11, SD0=12,
           SD1=13, mbn=14)
# synchronized training appends this process's own sums (re-centered to K) and the whole N
_BS_SYNC = dict(L1=15, L2=16, LR=17, LA=18, LD0=19, LD1=20, Nall=21)


def _bnsbn_forward_impl(x, bn_w, bn_b, bn_mean, bn_var, sbn_w, sbn_b, sbn_mean, sbn_var,
                        bn_eps, sbn_eps, backend, sync=None):
    """``sync`` (training only): BN and SBN statistics over every process; saved gets the
    columns of _BS_SYNC (this process's sums, for its share of the BN parameter gradients)."""
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    dev = x.device
    passes = _Passes(x, backend)
    PD, PP = _row_consts(W, dev, acc)
    K = _shift(x)
    gb, bb = _vec(bn_w, C, 1.0, dev), _vec(bn_b, C, 0.0, dev)
    gs_, bs_ = _vec(sbn_w, C, 1.0, dev), _vec(sbn_b, C, 0.0, dev)
    N_all = N
    local = None
    if bn_mean is None:
        sums = passes.stats(x, K.to(acc), PD).to(_F64)
        if sync is not None:
            sums, K, N_all, local = combine_shifted_sums(sums, K, N, H, W, sync)
        nb = N_all * H * W
        m_t = sums[:, 0] / nb
        vbn = (sums[:, 1] / nb - m_t * m_t).clamp_min(0.0)
        mbn = K + m_t
        sd = torch.sqrt(vbn + bn_eps)
        p = gb / sd
        Kz = bb - p * m_t                       # z = p*t + Kz, t = x - K
        scale = torch.stack([p, p * p, p * p, p * p, p, p], dim=1)
        mr, mi, svar = spectral_stats_from_sums(sums * scale, Kz, N_all, H, W)
    else:
        sums = torch.zeros((C, 6), dtype=_F64, device=dev)
        mbn, vbn = bn_mean.to(_F64), bn_var.to(_F64)
        sd = torch.sqrt(vbn + bn_eps)
        p = gb / sd
        Kz = p * (K - mbn) + bb
        m = sbn_mean.to(_F64)
        mr, mi, svar = m[:, 0], m[:, 1], sbn_var.to(_F64)
    s = torch.sqrt(svar + sbn_eps)
    a = gs_ / s
    coef = torch.stack([K, a * p, a * Kz, a * (Kz - mr) + bs_, -a * mi], dim=1)
    y = passes.forward_apply(x, coef.to(acc), PP)
    saved = torch.cat([torch.stack([K, p, sd, Kz, mr, mi, s, a], 1), sums, mbn[:, None]], 1)
    if local is not None:
        saved = torch.cat([saved, local, torch.full_like(K, float(N_all))[:, None]], 1)
    return (y, mbn.to(acc).clone(), vbn.to(acc).clone(), torch.stack([mr, mi], 1).to(acc),
            svar.to(acc).clone(), saved)


def _bn_grad_sums(S, Sdy, Gt, a, p, kE, cst_z, u_z, v_z, PDs, N, H, W):
    """Sums of dz and of dz*t over a batch of N samples with statistics-pass sums S (6 columns)
    and gradient sums Sdy, Gt, where
    dz = a dy + kE p (HW t + H R_t + [even] H A_t (-1)^w) + cst_z + [h==0] (u_z Re D + v_z Im D)."""
    S1, S2, SR, SA, SD0, SD1 = S.unbind(1)
    even = 1.0 if W % 2 == 0 else 0.0
    sdz = a * Sdy + kE * p * (2 * H * W) * S1 + cst_z * (N * H * W) + N * (u_z * PDs[0] + v_z * PDs[1])
    sdzt = (a * Gt + kE * p * (H * W * S2 + H * SR + even * H * SA) + cst_z * S1
            + u_z * SD0 + v_z * SD1)
    return sdz, sdzt


def _bnsbn_backward_impl(dy, x, bn_w, sbn_w, saved, training, backend, sync=None):
    """``sync``: dx uses the gradient sums of every process (one all_reduce) and the whole
    batch's sums saved by the forward; the parameter gradients are this process's share."""
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    passes = _Passes(x, backend)
    PD, PP = _row_consts(W, x.device, acc)
    sv = saved.to(_F64)
    col = {k: sv[:, i] for k, i in _BS.items()}
    K, p, sd, Kz, mr, mi, s, a = (col[k] for k in ("K", "p", "sd", "Kz", "mr", "mi", "s", "a"))
    gs = passes.grad_stats(dy, x, K.to(acc), PP).to(_F64)
    gs_all, N_all = gs, N
    if sync is not None:
        gs_all, N_all = sync.all_reduce(gs).to(_F64), int(round(sv[0, _BS_SYNC["Nall"]].item()))
    Sdy, Gt = gs_all[:, 0], gs_all[:, 1]
    dgs, dbs, kE, u_z, v_z, cst_z = _sbn_grad_core(gs_all, Kz, mr, mi, s, a, N_all, H, W,
                                                   training, p * Gt)
    if sync is not None:
        dgs, dbs = _sbn_grad_core(gs, Kz, mr, mi, s, a, N, H, W, False, p * gs[:, 1])[:2]
    nb = N_all * H * W
    even = 1.0 if W % 2 == 0 else 0.0
    zero = torch.zeros_like(p)
    if training:
        PDs = PD.to(_F64).sum(1)                       # [sum_w Re D, sum_w Im D] = [W, 0]
        S = sv[:, _BS["S1"]:_BS["SD1"] + 1]
        sdz, sdzt = _bn_grad_sums(S, Sdy, Gt, a, p, kE, cst_z, u_z, v_z, PDs, N_all, H, W)
        m_t = S[:, 0] / nb
        dbb = sdz
        dgb = (sdzt - m_t * sdz) / sd
        kb = p * dgb / (sd * nb)
        coef = torch.stack([K, p * a, p * p * kE * (H * W) - kb, p * p * kE * H,
                            p * p * kE * (H * even), p * cst_z - p * sdz / nb + kb * m_t,
                            p * u_z, p * v_z], dim=1)
        if sync is not None:  # this process's share of the BN parameter gradients
            L = sv[:, _BS_SYNC["L1"]:_BS_SYNC["LD1"] + 1]
            sdz, sdzt = _bn_grad_sums(L, gs[:, 0], gs[:, 1], a, p, kE, cst_z, u_z, v_z, PDs,
                                      N, H, W)
            dbb = sdz
            dgb = (sdzt - m_t * sdz) / sd
    else:
        dbb = a * Sdy
        dgb = a * (Gt + (K - col["mbn"]) * Sdy) / sd
        coef = torch.stack([K, p * a, zero, zero, zero, zero, zero, zero], dim=1)
    dx = passes.backward_apply(dy, x, coef.to(acc), PD, training)
    bdt = bn_w.dtype if bn_w is not None else acc
    sdt = sbn_w.dtype if sbn_w is not None else acc
    return (dx, dgb.to(bdt).clone(), dbb.to(bdt).clone(), dgs.to(sdt).clone(),
            dbs.to(sdt).clone())


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------

_OPT = Optional[Tensor]


def _stat_fake(x: Tensor, C: int, *shape):
    return x.new_empty((C, *shape), dtype=_acc(x.dtype))


@torch.library.custom_op("normkernels::sbn_forward", mutates_args=())
def sbn_forward(x: Tensor, weight: _OPT, bias: _OPT, mean: _OPT, var: _OPT, eps: float,
                backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Parseval SBN forward. mean: (C, 2) [re, im] or None. Returns (y, mean (C,2), var (C,),
    saved (C, 5) float64 for the backward)."""
    return _sbn_forward_impl(x, weight, bias, mean, var, eps, backend)


@sbn_forward.register_fake
def _(x, weight, bias, mean, var, eps, backend):
    C = x.shape[1]
    return (torch.empty_like(x), _stat_fake(x, C, 2), _stat_fake(x, C),
            x.new_empty((C, 5), dtype=_F64))


@torch.library.custom_op("normkernels::sbn_backward", mutates_args=())
def sbn_backward(dy: Tensor, x: Tensor, weight: _OPT, saved: Tensor, training: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _sbn_backward_impl(dy, x, weight, saved, training, backend)


def _pgrad_fake(x, w, C):
    dt = w.dtype if w is not None else _acc(x.dtype)
    return x.new_empty((C,), dtype=dt)


@sbn_backward.register_fake
def _(dy, x, weight, saved, training, backend):
    C = x.shape[1]
    return torch.empty_like(x), _pgrad_fake(x, weight, C), _pgrad_fake(x, weight, C)


def _sbn_setup(ctx, inputs, output):
    x, weight, bias, mean, var, eps, backend = inputs
    ctx.save_for_backward(x, weight, output[3])
    ctx.training = mean is None
    ctx.backend = backend
    ctx.has = (weight is not None, bias is not None)
    ctx.bdt = bias.dtype if bias is not None else None


def _sbn_bwd(ctx, dy, dmean, dvar, dsaved):
    x, weight, saved = ctx.saved_tensors
    dx, dw, db = sbn_backward(dy, x, weight, saved, ctx.training, ctx.backend)
    return (dx, dw if ctx.has[0] else None, db.to(ctx.bdt) if ctx.has[1] else None,
            None, None, None, None)


torch.library.register_autograd("normkernels::sbn_forward", _sbn_bwd, setup_context=_sbn_setup)


@torch.library.custom_op("normkernels::sbn_fft_forward", mutates_args=())
def sbn_fft_forward(x: Tensor, weight: _OPT, bias: _OPT, mean: _OPT, var: _OPT, eps: float,
                    backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Literal SBN: rfft2 -> per-channel complex mean / modulus variance + affine -> irfft2."""
    return _fft_forward_impl(x, weight, bias, mean, var, eps, backend)


@sbn_fft_forward.register_fake
def _(x, weight, bias, mean, var, eps, backend):
    C = x.shape[1]
    return torch.empty_like(x), _stat_fake(x, C, 2), _stat_fake(x, C)


@torch.library.custom_op("normkernels::sbn_fft_backward", mutates_args=())
def sbn_fft_backward(dy: Tensor, x: Tensor, weight: _OPT, mean: Tensor, var: Tensor,
                     eps: float, training: bool, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor]:
    return _fft_backward_impl(dy, x, weight, mean, var, eps, training, backend)


@sbn_fft_backward.register_fake
def _(dy, x, weight, mean, var, eps, training, backend):
    C = x.shape[1]
    return torch.empty_like(x), _pgrad_fake(x, weight, C), _pgrad_fake(x, weight, C)


def _fft_setup(ctx, inputs, output):
    x, weight, bias, mean, var, eps, backend = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.training = mean is None
    ctx.eps = eps
    ctx.backend = backend
    ctx.has = (weight is not None, bias is not None)
    ctx.bdt = bias.dtype if bias is not None else None


def _fft_bwd(ctx, dy, dmean, dvar):
    x, weight, m, v = ctx.saved_tensors
    dx, dw, db = sbn_fft_backward(dy, x, weight, m, v, ctx.eps, ctx.training, ctx.backend)
    return (dx, dw if ctx.has[0] else None, db.to(ctx.bdt) if ctx.has[1] else None,
            None, None, None, None)


torch.library.register_autograd("normkernels::sbn_fft_forward", _fft_bwd,
                                setup_context=_fft_setup)


@torch.library.custom_op("normkernels::bnsbn_forward", mutates_args=())
def bnsbn_forward(x: Tensor, bn_weight: _OPT, bn_bias: _OPT, bn_mean: _OPT, bn_var: _OPT,
                  sbn_weight: _OPT, sbn_bias: _OPT, sbn_mean: _OPT, sbn_var: _OPT,
                  bn_eps: float, sbn_eps: float, backend: str
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BN then SBN in one statistics pass + one elementwise pass. Returns (y, bn_mean, bn_var,
    sbn_mean (C,2), sbn_var, saved (C, 15) float64)."""
    return _bnsbn_forward_impl(x, bn_weight, bn_bias, bn_mean, bn_var, sbn_weight, sbn_bias,
                               sbn_mean, sbn_var, bn_eps, sbn_eps, backend)


@bnsbn_forward.register_fake
def _(x, bn_weight, bn_bias, bn_mean, bn_var, sbn_weight, sbn_bias, sbn_mean, sbn_var,
      bn_eps, sbn_eps, backend):
    C = x.shape[1]
    return (torch.empty_like(x), _stat_fake(x, C), _stat_fake(x, C), _stat_fake(x, C, 2),
            _stat_fake(x, C), x.new_empty((C, len(_BS)), dtype=_F64))


@torch.library.custom_op("normkernels::bnsbn_backward", mutates_args=())
def bnsbn_backward(dy: Tensor, x: Tensor, bn_weight: _OPT, sbn_weight: _OPT, saved: Tensor,
                   training: bool, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _bnsbn_backward_impl(dy, x, bn_weight, sbn_weight, saved, training, backend)


@bnsbn_backward.register_fake
def _(dy, x, bn_weight, sbn_weight, saved, training, backend):
    C = x.shape[1]
    return (torch.empty_like(x), _pgrad_fake(x, bn_weight, C), _pgrad_fake(x, bn_weight, C),
            _pgrad_fake(x, sbn_weight, C), _pgrad_fake(x, sbn_weight, C))


def _bnsbn_setup(ctx, inputs, output):
    (x, bn_w, bn_b, bn_mean, bn_var, sbn_w, sbn_b, sbn_mean, sbn_var, bn_eps, sbn_eps,
     backend) = inputs
    ctx.save_for_backward(x, bn_w, sbn_w, output[5])
    ctx.training = bn_mean is None
    ctx.backend = backend
    ctx.has = (bn_w is not None, bn_b is not None, sbn_w is not None, sbn_b is not None)
    ctx.dts = (bn_b.dtype if bn_b is not None else None,
               sbn_b.dtype if sbn_b is not None else None)


def _bnsbn_bwd(ctx, dy, *unused):
    x, bn_w, sbn_w, saved = ctx.saved_tensors
    dx, dgb, dbb, dgs, dbs = bnsbn_backward(dy, x, bn_w, sbn_w, saved, ctx.training,
                                            ctx.backend)
    h = ctx.has
    return (dx, dgb if h[0] else None, dbb.to(ctx.dts[0]) if h[1] else None, None, None,
            dgs if h[2] else None, dbs.to(ctx.dts[1]) if h[3] else None, None, None,
            None, None, None)


torch.library.register_autograd("normkernels::bnsbn_forward", _bnsbn_bwd,
                                setup_context=_bnsbn_setup)


# ----------------------------------------------------------------------------------------------
# entry points (contract)
# ----------------------------------------------------------------------------------------------


def _check_common(x: Tensor, backend: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError("x must be a Tensor")
    if x.dim() != 4:
        raise ValueError(f"expected a 4d input (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating point input, got {x.dtype}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _mean_ri(mean: Optional[Tensor]) -> Optional[Tensor]:
    if mean is None:
        return None
    return torch.view_as_real(mean) if mean.is_complex() else mean


def _to_complex(m_ri: Tensor) -> Tensor:
    """(C, 2) [re, im] in the accumulation dtype -> complex64 (complex128 for float64 inputs)."""
    return torch.view_as_complex(m_ri.contiguous())


def spectral_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        mean: Optional[Tensor], var: Optional[Tensor], eps: float,
                        algorithm: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """SBN of x (N, C, H, W). Returns (y, batch_mean complex64 (C,), batch_var float32 (C,));
    with mean/var given (eval) those are used and returned."""
    _check_common(x, backend)
    if (mean is None) != (var is None):
        raise ValueError("mean and var must both be given or both be None")
    if algorithm == "parseval":
        y, m, v, _ = sbn_forward(x, weight, bias, _mean_ri(mean), var, float(eps), backend)
    elif algorithm == "fft":
        y, m, v = sbn_fft_forward(x, weight, bias, _mean_ri(mean), var, float(eps), backend)
    else:
        raise ValueError(f"algorithm must be 'parseval' or 'fft', got {algorithm!r}")
    return y, _to_complex(m.detach()), v.detach()


def batch_norm_sbn(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                   bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
                   sbn_weight: Optional[Tensor], sbn_bias: Optional[Tensor],
                   sbn_mean: Optional[Tensor], sbn_var: Optional[Tensor], bn_eps: float,
                   sbn_eps: float, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BN then SBN, fused. Returns (y, bn_batch_mean, bn_batch_var (biased, float32),
    sbn_batch_mean complex64, sbn_batch_var float32)."""
    _check_common(x, backend)
    given = [t is not None for t in (bn_mean, bn_var, sbn_mean, sbn_var)]
    if any(given) and not all(given):
        raise ValueError("bn_mean, bn_var, sbn_mean, sbn_var must all be given or all be None")
    y, bm, bv, sm, sv, _ = bnsbn_forward(x, bn_weight, bn_bias, bn_mean, bn_var, sbn_weight,
                                         sbn_bias, _mean_ri(sbn_mean), sbn_var, float(bn_eps),
                                         float(sbn_eps), backend)
    return y, bm.detach(), bv.detach(), _to_complex(sm.detach()), sv.detach()
