"""Decompositions of the eval forward ops into plain aten ops (torch.export, ONNX; issue #17).

In eval every layer is an elementwise map with per-channel coefficients (DESIGN.md section 7):

  L2BN     y = act(k_c (x / r_n - mu_c) + beta_c)          r_n = max(||x_n||, l2_eps) (/ sqrt(D))
  SBN      y = act(a_c x + [h == 0] ([w == 0] u_c + v_c Pi0[w]))          (DESIGN.md section 2)
  BN+SBN   the same with x replaced by BN's affine p_c x + q_c

so ``torch.export.export(model.eval(), ...).run_decompositions()`` can give only aten ops, and the
saved program runs where normkernels is not installed.

Mechanism: a kernel for the tracer of an export, ``op.py_impl(ProxyTorchDispatchMode)``: where the
tracer meets one of these ops during the post-dispatch retrace of run_decompositions() (any table,
the ONNX exporter's too) and the call is an eval call (statistics given), it traces the formula
instead of recording the op; everywhere else it records the op as usual. Why this one:
  * torch.export.export's own graph is traced pre-dispatch (mode.pre_dispatch), where the op is
    recorded, so the exported program keeps normkernels' ops like any custom op; only
    run_decompositions() turns them into aten ops.
  * It holds under every grad mode (the tracer sees the op under torch.inference_mode() too,
    where autograd keys are skipped), and nothing else changes: the Python dispatcher that
    consults it is active only while tracing (eager never sees it, the C++ dispatch table is
    untouched), and torch.compile's tracer (not exporting) records the op as before.
  * A CompositeImplicitAutograd kernel (the route for custom ops that export's default table
    knows) does not work for ops with device kernels: torch 2.13 applies a custom op's CIA
    kernel only where autograd would have (no kernel for the device), and inductor then finds
    the op in its decomposition table and refuses to fall back to it ("both a fallback and a
    decomp for same op"): torch.compile breaks. register_decomposition into torch._decomp's
    table reaches only the ONNX exporter, not run_decompositions()' default table. A kernel at
    the autograd keys works but misses inference_mode.
  * Training calls (mean None) are recorded as the op (a batch statistic is no eval formula;
    a training-mode export keeps the ops).
  * Switching the modules' eval path to these formulas while exporting would also work, but no
    exported graph could then keep the ops, and every entry point (modules, functional, the ops
    called directly) would need the switch. To keep them here: ``with keep_ops(): ...``.

The formulas compute in the accumulation dtype (float32 for float16/bfloat16/float32 inputs,
float64 for float64), not the oracle's float64 finalize: deployment runtimes (TensorRT, CoreML,
many ONNX execution providers) lack float64. SBN's running mean reaches the ops as its real
(C, 2) [re, im] view and is read with real indexing only (ONNX has no complex tensors). The
returned statistics and ``saved`` have the ops' shapes and dtypes; ``saved`` is read only by the
backward, so in an inference graph it is dead code that export eliminates.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode

from . import l2bn as _l2bn
from . import sbn as _sbn
from .sbn_oracle import fft_scale
from ._act import act_forward

__all__ = ["l2bn_eval", "sbn_family_eval", "pi_row", "keep_ops", "DECOMPOSED_OPS", "register"]


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _vec(t: Optional[Tensor], default: float, like: Tensor) -> Tensor:
    """A (C,) parameter in like's dtype, or the constant default where it is absent."""
    return torch.full_like(like, default) if t is None else t.to(like.dtype)


def _chan(t: Tensor, ndim: int) -> Tensor:
    """(C,) -> broadcastable against (N, C, *spatial)."""
    return t.view((1, -1) + (1,) * (ndim - 2))


# --------------------------------------------------------------------------------------- L2BN
def l2bn_eval(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
              var: Tensor, eps: float, l2_eps: float, rescale: bool, act: str, act_param: float
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """normkernels::l2bn_forward with given statistics, in aten ops: (y, mean, var, saved).

    The per-sample scale is the oracle's (l2bn.py stats_pass_torch and _sample_scale: the norm
    from per-row means and centered sums, clamped at l2_eps), then BN's affine with the running
    statistics, pre = x_coef (x - center) + offset as the kernels apply it."""
    n, c = x.shape[0], x.shape[1]
    acc = _acc(x)
    xa = x.to(acc)
    s = math.prod(x.shape[2:])
    center, m2 = _l2bn.stats_pass_torch(x)                   # (N, C) acc each
    r, inv_r, nrm = _l2bn._sample_scale(center, m2, s, l2_eps, rescale)
    mu, v = mean.to(acc), var.to(acc)
    inv_s = torch.rsqrt(v + eps)
    k = inv_s * _vec(weight, 1.0, inv_s)
    cen = center * inv_r[:, None] - mu                       # (N, C): mean of u_n minus mu
    x_coef = k * inv_r[:, None]
    offset = k * cen + _vec(bias, 0.0, inv_s)
    nd = x.dim()
    view = (n, c) + (1,) * (nd - 2)
    pre = (xa - center.view(view)) * x_coef.view(view) + offset.view(view)
    y = act_forward(pre, act, act_param).to(x.dtype)
    n_all = torch.full((1,), n, dtype=acc, device=x.device)
    saved = torch.cat([center.reshape(-1), m2.reshape(-1), x_coef.reshape(-1), offset.reshape(-1),
                       cen.reshape(-1), r, nrm, inv_s, n_all])
    return y, mu.clone(), v.clone(), saved


# --------------------------------------------------------------------------------------- SBN
def pi_row(W: int, dtype: torch.dtype, device) -> Tensor:
    """Pi[0, :] = irfft2(1j * ones(H, W//2 + 1), s=(H, W))[0, :], in aten ops: irfft drops the
    imaginary part of the self-conjugate columns l = 0 and l = W/2 and doubles the others, so
    Pi[0, w] = -(2/W) sum_{l=1}^{(W-1)//2} sin(2 pi (l w mod W) / W). Built from arange, not
    from a tensor constant (a decomposition cannot add constants to an exported program); the
    integer mod keeps sin's argument below 2 pi, so float32 gives ~1e-7.
    (ops/sbn_oracle.py row_consts derives the same row with torch.fft; the tests compare them.)"""
    L = (W - 1) // 2
    w = torch.arange(W, device=device)
    if L == 0:
        return torch.zeros(W, dtype=dtype, device=device)
    lw = (torch.arange(1, L + 1, device=device)[:, None] * w[None, :]) % W
    return torch.sin(lw.to(dtype) * (2.0 * math.pi / W)).sum(0) * (-2.0 / W)


def _sbn_terms(a: Tensor, u: Tensor, v: Tensor, x: Tensor) -> Tensor:
    """The additive row-0 pattern of SBN, (C, W) -> (1, C, 1, W) to add to row h = 0:
    [w == 0] u + v Pi0[w] (Pr is the delta at (0, 0))."""
    W = x.shape[3]
    pi = pi_row(W, a.dtype, x.device)
    delta = (torch.arange(W, device=x.device) == 0).to(a.dtype)
    return (u[:, None] * delta + v[:, None] * pi)[None, :, None, :]


def _sbn_apply(xa: Tensor, scale: Tensor, shift: Tensor, row0: Tensor) -> Tensor:
    """scale_c x + shift_c, plus row0 on row h = 0 (concatenated, not written in place: the
    graph stays free of index_put / scatter)."""
    pre = xa * _chan(scale, 4) + _chan(shift, 4)
    return torch.cat([pre[:, :, :1, :] + row0, pre[:, :, 1:, :]], dim=2)


def _sbn_coefs(x: Tensor, weight, bias, mean: Tensor, var: Tensor, eps: float, fft_norm: str,
               acc: torch.dtype):
    """SBN's eval coefficients from running statistics stored in the fft_norm scale (ops/sbn_oracle.py
    docstring: the m-normalized layer is the "backward" formulas with gamma h, beta h, eps/f^2,
    h = 1/f): a = gamma / sqrt(var_m + eps), u = (beta - a Re mu_m)/f, v = -a Im mu_m / f.
    Returns (a, u, v, mr, mi, s) with mr, mi, s in the "backward" scale (saved's columns)."""
    H, W = x.shape[2], x.shape[3]
    f = fft_scale(fft_norm, H, W)
    m = mean.to(acc)
    vm = var.to(acc)
    a = _vec(weight, 1.0, vm) * torch.rsqrt(vm + eps)
    u = (_vec(bias, 0.0, vm) - a * m[:, 0]) / f
    v = -a * m[:, 1] / f
    return a, u, v, m[:, 0] / f, m[:, 1] / f, torch.sqrt(vm + eps) / f


def sbn_family_eval(x: Tensor, bn: bool, bn_weight, bn_bias, bn_mean, bn_var, sbn_weight, sbn_bias,
                    sbn_mean: Tensor, sbn_var: Tensor, bn_eps: float, sbn_eps: float, fft_norm: str,
                    act: str, act_param: float):
    """normkernels::sbn_forward with given statistics, in aten ops: BN's affine z = p x + q (the
    identity with the BN stage off), then SBN of z, folded into one scale and shift:
    y = act(a p x + a q + row-0 pattern). Returns (y, bn_mean, bn_var, sbn_mean, sbn_var,
    saved (C, 26) float64: the columns the eval oracle fills, the batch sums zero)."""
    acc = _acc(x)
    a, u, v, mr, mi, s = _sbn_coefs(x, sbn_weight, sbn_bias, sbn_mean, sbn_var, sbn_eps, fft_norm, acc)
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    if bn:
        mb, vb = bn_mean.to(acc), bn_var.to(acc)
        sd = torch.sqrt(vb + bn_eps)
        p = _vec(bn_weight, 1.0, vb) / sd
        kz = _vec(bn_bias, 0.0, vb)        # saved as the eval oracle lays it out: shift = BN's mean
        scale, shift = a * p, a * (kz - p * mb)
        bn_out = (bn_mean.to(acc, copy=True), bn_var.to(acc, copy=True))
    else:
        mb, sd, p, kz = zero, one, one, zero
        scale, shift = a, zero
        bn_out = (x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc))
    y = act_forward(_sbn_apply(x.to(acc), scale, shift, _sbn_terms(a, u, v, x)), act, act_param).to(x.dtype)
    b = a * kz
    count = one * x.shape[0]
    head = torch.stack([mb, a * p, b, u + b, v, p, sd, kz, mr, mi, s, a, mb, count], 1)
    batch_sums = torch.zeros((x.shape[1], 12), dtype=acc, device=x.device)
    saved = torch.cat([head, batch_sums], 1).to(torch.float64)
    return (y,) + bn_out + (sbn_mean.to(acc, copy=True), sbn_var.to(acc, copy=True), saved)


def _fft_eval(x, weight, bias, mean, var, eps, fft_norm, backend):
    """normkernels::sbn_fft_forward (the literal path; no activation) in eval: the same layer."""
    y, _, _, m, v, _ = sbn_family_eval(x, False, None, None, None, None, weight, bias, mean, var, 0.0, eps,
                                       fft_norm, "identity", 0.0)
    return y, m, v


# --------------------------------------------------------------------------------------- registration
_KEEP = [False]


@contextlib.contextmanager
def keep_ops():
    """Within it, exports keep normkernels' ops (for a runtime that has these kernels, e.g. an
    AOTInductor build linking normkernels._C): run_decompositions() leaves them as they are."""
    _KEEP.append(True)
    try:
        yield
    finally:
        _KEEP.pop()


def _tracer_kernel(op, formula, stat_arg: int):
    """The op's kernel for ProxyTorchDispatchMode (called with the mode popped, as its
    __torch_dispatch__ would be): the formula traced by that mode in an eval call of a
    post-dispatch export trace, else the mode's own handling (record the op)."""
    def kernel(mode, *args, **kwargs):
        if (not kwargs and args[stat_arg] is not None and not _KEEP[-1] and not mode.pre_dispatch
                and torch.compiler.is_exporting()):
            with mode:
                return formula(*args)
        return mode.__torch_dispatch__(op, (), args, kwargs)
    kernel.__name__ = f"{formula.__name__}_when_exporting"
    return kernel


DECOMPOSED_OPS: list = []


def register() -> None:
    """Attach the decompositions to every forward op that exists (idempotent). Each op's
    statistics argument (L2BN's mean, SBN's mean) is None in training."""
    o = torch.ops.normkernels
    table = [("torch_l2bn_forward", l2bn_eval, 3), ("torch_sbn_forward", sbn_family_eval, 8),
             ("sbn_fft_forward", _fft_eval, 3)]
    if _l2bn._EXT:
        table.append(("l2bn_forward", l2bn_eval, 3))
    if _sbn._HAS_C:
        table.append(("sbn_forward", sbn_family_eval, 8))
    for name, formula, stat_arg in table:
        op = getattr(o, name).default
        if op in DECOMPOSED_OPS:
            continue
        op.py_impl(ProxyTorchDispatchMode)(_tracer_kernel(op, formula, stat_arg))
        DECOMPOSED_OPS.append(op)


register()
