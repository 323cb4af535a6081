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


def _shift(x: Tensor, dtype: torch.dtype = _F64) -> Tensor:
    """Per-channel shift K_c = x[0, c, 0, 0] as a (C,) tensor in ``dtype`` (any value works; one
    sample of the channel keeps t = x - K small for data with a large mean). An empty batch (a
    process of a synchronized group with no samples) gets K = 0; it contributes nothing."""
    if x.numel() == 0:
        return torch.zeros(x.shape[1], dtype=dtype, device=x.device)
    # x[0, :, 0, 0] as one strided view (one op instead of three selects)
    # (a contiguous copy: the passes and the finalize's cat want contiguous operands)
    return x.as_strided((x.shape[1],), (x.stride(1),), x.storage_offset()).to(dtype, copy=True)


def _cols(t: Tensor) -> tuple[Tensor, ...]:
    """(C, k) -> k (C, 1) column views (one split: the finalize works on (C, 1) columns so that
    (C,) parameters broadcast after one .view(-1, 1) and results concatenate with one cat)."""
    return t.split([1] * t.shape[1], 1)    # split_with_sizes: one view op per column


def _col(t: Optional[Tensor]):
    """A (C,) parameter as a (C, 1) column, used as is in float64 arithmetic (type promotion
    computes in float64 exactly); None stays None (the caller uses a python scalar)."""
    return None if t is None else t.view(-1, 1)


def _index_cols(t: Tensor, *cols: int) -> Tensor:
    """Columns of a (C, k) tensor as a contiguous (C, len(cols)) copy: one index_select with a
    cached index (a cat of column views would take the per-input slow path)."""
    key = ("index", cols, str(t.device))
    idx = _CONST_CACHE.get(key)
    if idx is None:
        idx = _CONST_CACHE[key] = torch.tensor(cols, dtype=torch.long, device=t.device)
    return t.index_select(1, idx)


def _out(col: Tensor, dtype: torch.dtype) -> Tensor:
    """A (C, 1) float64 column -> a fresh contiguous (C,) output in ``dtype``."""
    return col.view(-1).to(dtype, copy=True)



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


def _spectral_stats(S1, S2, SR, SA, SDr, SDi, K, N: int, H: int, W: int):
    """The shifted-sums -> (Re mu, Im mu, var) formula of the module docstring, elementwise on
    columns of any (matching) shape, float64."""
    Wr = W // 2 + 1
    M = N * H * Wr
    mr_t = SDr * (H / M)
    mi_t = SDi * (H / M)
    E = torch.add(S2 * (H * W / (2 * M)), SR, alpha=H / (2 * M))
    if W % 2 == 0:
        E = torch.add(E, SA, alpha=H / (2 * M))
    var_t = E - torch.addcmul(mr_t * mr_t, mi_t, mi_t)
    d = K * float(H * W)                                 # DC coefficient of the constant K
    mr = torch.add(mr_t, K, alpha=W / Wr)             # mu = mu_t + cK, cK = K*W/Wr
    # var = var_t + (N d (d - cK) + 2 d (S1 - N Re mu_t)) / M
    inner = torch.add(torch.add(d, K, alpha=-W / Wr) * float(N), torch.add(S1, mr_t, alpha=-N),
                      alpha=2.0)
    var = torch.addcmul(var_t, d, inner, value=1.0 / M)
    return mr, mi_t, var.clamp_min(0.0)


def spectral_stats_from_sums(sums: Tensor, K: Tensor, N: int, H: int, W: int
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """Shifted sums of t = z - K (columns S1, S2, SR, SA, SD_re, SD_im) -> (Re mu, Im mu, var)
    of SBN on z, exactly (see module docstring); (C,) outputs for a (C,) K."""
    return _spectral_stats(*sums.to(_F64).unbind(1), K.to(_F64), N, H, W)


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


def _sbn_grad_core(Sdy, G0, G1, gz, Kz, mr, mi, s, a, N: int, H: int, W: int, training: bool):
    """SBN backward on z given the gradient sums Sdy = sum dy, G0, G1 (row-0 sums against Pr,
    Pi) and gz = sum dy*(z - Kz) (float64 columns). Returns dgamma, dbeta and, when training,
    kE, u, v, cst (else None) with
    dz = a*dy + kE*(HW*(z-Kz) + H*R + [even] H*A*(-1)^w) + cst + [h==0]*(u ReD + v ImD)."""
    Ga = torch.addcmul(torch.addcmul(torch.addcmul(gz, Kz, Sdy), mr, G0, value=-1.0),
                       mi, G1, value=-1.0)
    dgamma = Ga / s
    if not training:
        return dgamma, G0, None, None, None, None
    M = N * H * (W // 2 + 1)
    # dvar = -Ga*a/(2 s^2) = -dgamma*(a/s)/2,  kE = dvar/M
    kE = torch.mul(dgamma, a / s) * (-0.5 / M)
    # u = (H/M) kr = (H/M)(-a G0 - 2 Re mu dvar) = -(H/M) a G0 - 2 H Re mu kE;  v likewise
    u = torch.addcmul(mr * kE * (-2.0 * H), a, G0, value=-H / M)
    v = torch.addcmul(mi * kE * (-2.0 * H), a, G1, value=-H / M)
    cst = Kz * kE * (2.0 * H * W)
    return dgamma, G0, kE, u, v, cst


# ----------------------------------------------------------------------------------------------
# Parseval SBN: implementations
# ----------------------------------------------------------------------------------------------


def _batch_sums(x, passes, K, PD, sync):
    """The statistics pass on t = x - K, combined over the process group when ``sync`` is given.
    Returns (sums float64 (C, 6), the shift as a float64 column (C, 1) — the common one under
    sync —, N over the group, this process's sums at that shift or None)."""
    N, _, H, W = x.shape
    sums, local, N_all = passes.stats(x, K, PD), None, N
    if sync is not None:
        sums, K, N_all, local = combine_shifted_sums(sums, K, N, H, W, sync)
    return sums.to(_F64), K.view(-1, 1).to(_F64), N_all, local   # K: a contiguous column


def _sbn_forward_impl(x, weight, bias, mean, var, eps, backend, sync=None):
    """``sync`` (normkernels.distributed, training only): statistics over every process; the
    saved tensor then gets a 6th column, the whole batch's N."""
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    passes = _Passes(x, backend)
    PD, PP = _row_consts(W, x.device, acc)
    K = _shift(x, acc)
    N_all = N
    if mean is None:
        sums, K, N_all, _ = _batch_sums(x, passes, K, PD, sync)
        mr, mi, bvar = _spectral_stats(*_cols(sums), K, N_all, H, W)
    else:
        mr, mi, bvar, K = _cols(torch.cat([mean, var.view(-1, 1),
                                           K.view(-1, 1)], 1).to(_F64))
    s = torch.sqrt(bvar + eps)
    a = s.reciprocal() if weight is None else _col(weight) / s
    # y = a*(x-K) + a*K + [h==0]*((beta - a Re mu) Pr + (-a Im mu) Pi); the pass takes
    # u = b + (beta - a Re mu) for the Pr = 1 position (cancellation done here in float64)
    u = a * (K - mr) if bias is None else torch.addcmul(_col(bias), a, K - mr)
    coef = torch.cat([K, a, a * K, u, torch.mul(a, mi).neg_()], 1)
    y = passes.forward_apply(x, coef, PP)
    cols = [K, mr, mi, s, a] + ([] if sync is None else [torch.full_like(K, float(N_all))])
    saved = torch.cat(cols, 1)
    return y, torch.cat([mr, mi], 1).to(acc), _out(bvar, acc), saved


def _sbn_backward_impl(dy, x, weight, saved, training, backend, sync=None):
    """``sync``: the dx coefficients use the gradient sums of every process (one all_reduce)
    and the whole batch's N (saved's 6th column); dgamma, dbeta stay this process's share."""
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    passes = _Passes(x, backend)
    PD, PP = _row_consts(W, x.device, acc)
    K, mr, mi, s, a = _cols(saved.to(_F64))[:5]
    gs = passes.grad_stats(dy, x, K.view(-1).to(acc), PP).to(_F64)
    gs_all, N_all = gs, N
    if sync is not None:
        gs_all, N_all = sync.all_reduce(gs).to(_F64), int(round(saved[0, 5].item()))
    Sdy, Gt, G0, G1 = _cols(gs_all)
    dgamma, dbeta, kE, u, v, cst = _sbn_grad_core(Sdy, G0, G1, Gt, K, mr, mi, s, a,
                                                  N_all, H, W, training)
    if sync is not None:
        Sdy, Gt, G0, G1 = _cols(gs)
        dgamma, dbeta = _sbn_grad_core(Sdy, G0, G1, Gt, K, mr, mi, s, a, N, H, W, False)[:2]
    if training:
        kEH = kE * float(H)
        coef = torch.cat([_index_cols(saved, 0, 4), kEH * float(W), kEH, kEH if W % 2 == 0 else kEH * 0.0, cst, u, v], 1)
    else:
        coef = torch.cat([_index_cols(saved, 0, 4), a.new_zeros((C, 6))], 1)
    dx = passes.backward_apply(dy, x, coef, PD, training)
    pdt = weight.dtype if weight is not None else acc
    return dx, _out(dgamma, pdt), _out(dbeta, pdt)



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
    K = _shift(x, acc)
    N_all = N
    local = None
    if bn_mean is None:
        sums, K, N_all, local = _batch_sums(x, passes, K, PD, sync)
        S1, S2, SR, SA, SD0, SD1 = _cols(sums)
        nb = float(N_all * H * W)
        m_t = S1 / nb
        vbn = torch.addcmul(S2 / nb, m_t, m_t, value=-1.0).clamp_min(0.0)
        mbn = K + m_t
        sd = torch.sqrt(vbn + bn_eps)
        p = sd.reciprocal() if bn_w is None else _col(bn_w) / sd
        # z = p*t + Kz, t = x - K
        Kz = (p * m_t).neg_() if bn_b is None else torch.addcmul(_col(bn_b), p, m_t, value=-1.0)
        p2 = p * p
        mr, mi, svar = _spectral_stats(p * S1, p2 * S2, p2 * SR, p2 * SA, p * SD0, p * SD1, Kz,
                                       N_all, H, W)
    else:
        mbn, vbn, mr, mi, svar, K = _cols(torch.cat(
            [bn_mean.view(-1, 1), bn_var.view(-1, 1), sbn_mean, sbn_var.view(-1, 1),
             K.view(-1, 1)], 1).to(_F64))
        sums = x.new_zeros((C, 6), dtype=_F64)
        sd = torch.sqrt(vbn + bn_eps)
        p = sd.reciprocal() if bn_w is None else _col(bn_w) / sd
        Kz = p * (K - mbn) if bn_b is None else torch.addcmul(_col(bn_b), p, K - mbn)
    s = torch.sqrt(svar + sbn_eps)
    a = s.reciprocal() if sbn_w is None else _col(sbn_w) / s
    u = a * (Kz - mr) if sbn_b is None else torch.addcmul(_col(sbn_b), a, Kz - mr)
    coef = torch.cat([K, a * p, a * Kz, u, torch.mul(a, mi).neg_()], 1)
    y = passes.forward_apply(x, coef, PP)
    cols = [K, p, sd, Kz, mr, mi, s, a, sums, mbn]
    if local is not None:
        cols += [local, torch.full_like(K, float(N_all))]
    saved = torch.cat(cols, 1)
    return (y, _out(mbn, acc), _out(vbn, acc), torch.cat([mr, mi], 1).to(acc), _out(svar, acc),
            saved)


def _bn_grad_sums(S1, S2, SR, SA, SD0, SD1, Sdy, Gt, a, p, kE, cst_z, u_z, v_z, N, H, W):
    """Sums of dz and of dz*t over a batch of N samples with statistics-pass sums S1..SD1 and
    gradient sums Sdy, Gt, where
    dz = a dy + kE p (HW t + H R_t + [even] H A_t (-1)^w) + cst_z + [h==0] (u_z Re D + v_z Im D)
    (sum_w D(w) = W: the row-0 term sums to N*W*u_z)."""
    kEp = kE * p
    sdz = torch.add(torch.addcmul(a * Sdy, kEp, S1, value=2.0 * H * W), cst_z,
                    alpha=float(N * H * W))
    sdz = torch.add(sdz, u_z, alpha=float(N * W))
    E = torch.add(S2 * float(H * W), SR, alpha=float(H))
    if W % 2 == 0:
        E = torch.add(E, SA, alpha=float(H))
    sdzt = torch.addcmul(torch.addcmul(torch.addcmul(torch.addcmul(
        a * Gt, kEp, E), cst_z, S1), u_z, SD0), v_z, SD1)
    return sdz, sdzt


def _bnsbn_backward_impl(dy, x, bn_w, sbn_w, saved, training, backend, sync=None):
    """``sync``: dx uses the gradient sums of every process (one all_reduce) and the whole
    batch's sums saved by the forward; the parameter gradients are this process's share."""
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    passes = _Passes(x, backend)
    PD, PP = _row_consts(W, x.device, acc)
    sv = _cols(saved.to(_F64))
    K, p, sd, Kz, mr, mi, s, a = sv[:8]
    S = sv[_BS["S1"]:_BS["SD1"] + 1]
    gs = passes.grad_stats(dy, x, K.view(-1).to(acc), PP).to(_F64)
    gs_all, N_all = gs, N
    if sync is not None:
        gs_all, N_all = sync.all_reduce(gs).to(_F64), int(round(saved[0, _BS_SYNC["Nall"]].item()))
    Sdy, Gt, G0, G1 = _cols(gs_all)
    dgs, dbs, kE, u_z, v_z, cst_z = _sbn_grad_core(Sdy, G0, G1, p * Gt, Kz, mr, mi, s, a,
                                                   N_all, H, W, training)
    if sync is not None:
        lSdy, lGt, lG0, lG1 = _cols(gs)
        dgs, dbs = _sbn_grad_core(lSdy, lG0, lG1, p * lGt, Kz, mr, mi, s, a, N, H, W, False)[:2]
    nb = float(N_all * H * W)
    if training:
        sdz, sdzt = _bn_grad_sums(*S, Sdy, Gt, a, p, kE, cst_z, u_z, v_z, N_all, H, W)
        m_t = S[0] / nb
        dbb = sdz
        dgb = torch.addcmul(sdzt, m_t, sdz, value=-1.0) / sd
        kb = p * dgb / (sd * nb)
        pkEH = p * p * kE * float(H)
        c_cst = torch.addcmul(torch.add(p * cst_z, p * sdz, alpha=-1.0 / nb), kb, m_t)
        coef = torch.cat([_index_cols(saved, 0), p * a, pkEH * float(W) - kb, pkEH,
                          pkEH if W % 2 == 0 else pkEH * 0.0, c_cst, p * u_z, p * v_z], 1)
        if sync is not None:  # this process's share of the BN parameter gradients
            L = sv[_BS_SYNC["L1"]:_BS_SYNC["LD1"] + 1]
            sdz, sdzt = _bn_grad_sums(*L, lSdy, lGt, a, p, kE, cst_z, u_z, v_z, N, H, W)
            dbb = sdz
            dgb = torch.addcmul(sdzt, m_t, sdz, value=-1.0) / sd
    else:
        dbb = a * Sdy
        dgb = a * torch.addcmul(Gt, K - sv[_BS["mbn"]], Sdy) / sd
        coef = torch.cat([_index_cols(saved, 0), p * a, a.new_zeros((C, 6))], 1)
    dx = passes.backward_apply(dy, x, coef, PD, training)
    bdt = bn_w.dtype if bn_w is not None else acc
    sdt = sbn_w.dtype if sbn_w is not None else acc
    return dx, _out(dgb, bdt), _out(dbb, bdt), _out(dgs, sdt), _out(dbs, sdt)



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
