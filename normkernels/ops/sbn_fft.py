"""The literal FFT path of SBN (``algorithm="fft"``): rfft2 -> normalize the spectrum -> irfft2,
with torch.fft's ``norm``, as the custom ops ``normkernels::sbn_fft_forward`` / ``sbn_fft_backward``
(FFTs inside an op: torch.compile cannot trace torch.fft's complex views on CPU). The spectral
passes run as Triton kernels on CUDA (normkernels/triton/sbn.py), as torch ops elsewhere. It is the
paper's definition computed literally: the cross-check of the Parseval ops."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from .sbn_oracle import acc_dtype as _acc, fft_scale, fill as _fill, like as _like, stat as _stat

_OPT = Optional[Tensor]


def grad_to(g: Tensor, p: _OPT, needed: bool):
    """A parameter's gradient in the parameter's dtype, or None where it is not wanted."""
    if not needed or p is None:
        return None
    return g if g.dtype == p.dtype else g.to(p.dtype)


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
    return ((dx if need[0] else None), grad_to(dw, w, need[1]), grad_to(db, b, need[2])
            ) + (None,) * 5


torch.library.register_autograd("normkernels::sbn_fft_forward", _fft_bwd, setup_context=_fft_setup)
