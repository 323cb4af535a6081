"""L2BN op: l2-normalize each sample (the whole flattened (C, *spatial) vector), then batch norm,
then an optional activation (docs/DESIGN.md section 3, issue #13).

One dispatcher op per direction, everything in compiled code (csrc/l2bn.cpp documents the
schemas and the layouts of ``stats``, ``rows``, ``saved`` and ``sums``; csrc/l2bn_finalize.h the
math):

  normkernels::l2bn_forward(x, weight, bias, mean, var, eps, l2_eps, rescale, act, act_param)
      -> (y, batch_mean, batch_var, saved)                         (C++ autograd kernel)
  normkernels::l2bn_backward(dy, x, weight, saved, training, act, act_param) -> (dx, dw, db)
  pieces of the synchronized path: l2bn_stats, l2bn_finish, l2bn_grad_stats, l2bn_grad_finish.

This module holds
  * the fake kernels of those C++ ops (registered only when normkernels._C is built);
  * the torch ORACLE: python functions with exactly the contracts of the C++ pieces
    (stats_torch, finish_torch, grad_stats_torch, grad_finish_torch) and the custom ops
    normkernels::torch_l2bn_forward / torch_l2bn_backward built from them (backend "torch",
    also the fallback where no kernel can run);
  * the entry ``l2_batch_norm`` called by normkernels/functional.py and ``l2bn_sync`` called by
    normkernels/distributed.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._act import act_backward, act_forward, check_act

__all__ = ["l2_batch_norm", "l2bn_sync", "saved_numel", "split_saved"]

try:  # registers torch.ops.normkernels.l2bn_*
    import normkernels._C  # noqa: F401

    _EXT = hasattr(torch.ops.normkernels, "l2bn_forward")
except ImportError:  # pure-PyTorch install: only backend "torch" works
    _EXT = False


# --------------------------------------------------------------------------- layouts
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fin_dtype(device: torch.device, acc: torch.dtype) -> torch.dtype:
    """The finalize computes in float64 (where the device has it)."""
    return torch.float64 if device.type in ("cpu", "cuda") else acc


def _is_nsc_3d(x: Tensor) -> bool:
    n, c, l = x.shape
    if c != 1 and x.stride(1) != 1:
        return False
    if l != 1 and x.stride(2) != c:
        return False
    if n != 1 and x.stride(0) != c * l:
        return False
    return True


def _kernel_layout(x: Tensor) -> Optional[str]:
    """Mirror of make_view() in csrc/common.cpp: "ncs", "nsc", or None (kernel copies to NCS)."""
    if x.is_contiguous():
        return "ncs"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "nsc"
    if x.dim() == 3 and _is_nsc_3d(x):
        return "nsc"
    return None


def _out_like(x: Tensor) -> Tensor:
    """Empty output with the strides the kernels produce (x's layout, or contiguous)."""
    if _kernel_layout(x) is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.empty_like(x)


def saved_numel(n, c):
    """Length of ``saved`` (csrc/l2bn_finalize.h SavedLayout)."""
    return 5 * n * c + 2 * n + c + 1


def split_saved(saved: Tensor, n: int, c: int) -> dict:
    """Views of the parts of ``saved``: center, m2, x_coef, offset, cen (N, C); r, nrm (N,);
    inv_s (C,); n_all (1,)."""
    nc = n * c
    planes = saved[: 5 * nc].view(5, n, c)
    return dict(center=planes[0], m2=planes[1], x_coef=planes[2], offset=planes[3], cen=planes[4],
                r=saved[5 * nc: 5 * nc + n], nrm=saved[5 * nc + n: 5 * nc + 2 * n],
                inv_s=saved[5 * nc + 2 * n: 5 * nc + 2 * n + c], n_all=saved[5 * nc + 2 * n + c:])


def _ncs(x: Tensor) -> Tensor:
    n, c = x.shape[0], x.shape[1]
    return x.reshape(n, c, math.prod(x.shape[2:]))


# --------------------------------------------------------------------------- fake kernels (C++ ops)
if _EXT:
    def _fake_forward_outputs(x):
        n, c = x.shape[0], x.shape[1]
        acc = _acc_dtype(x.dtype)
        return (_out_like(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc),
                x.new_empty((saved_numel(n, c),), dtype=acc))

    def _fake_backward_outputs(x):
        c = x.shape[1]
        acc = _acc_dtype(x.dtype)
        return _out_like(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)

    @torch.library.register_fake("normkernels::l2bn_forward")
    def _(x, weight, bias, mean, var, eps, l2_eps, rescale, act, act_param):
        return _fake_forward_outputs(x)

    @torch.library.register_fake("normkernels::l2bn_backward")
    def _(dy, x, weight, saved, training, act, act_param):
        return _fake_backward_outputs(x)

    @torch.library.register_fake("normkernels::l2bn_stats")
    def _(x, l2_eps, rescale):
        n, c = x.shape[0], x.shape[1]
        return (x.new_empty((2, n, c), dtype=_acc_dtype(x.dtype)),
                x.new_empty((3, c), dtype=torch.float64))

    @torch.library.register_fake("normkernels::l2bn_finish")
    def _(x, stats, rows_all, weight, bias, mean, var, eps, l2_eps, rescale, act, act_param):
        return _fake_forward_outputs(x)

    @torch.library.register_fake("normkernels::l2bn_grad_stats")
    def _(dy, x, saved, act, act_param):
        n, c = x.shape[0], x.shape[1]
        return (x.new_empty((2, n, c), dtype=_acc_dtype(x.dtype)),
                x.new_empty((2, c), dtype=torch.float64))

    @torch.library.register_fake("normkernels::l2bn_grad_finish")
    def _(dy, x, weight, saved, sums, rows, rows_all, act, act_param):
        return _fake_backward_outputs(x)

    @torch.library.register_fake("normkernels::l2bn_sample_stats")
    def _(x):
        n, c = x.shape[0], x.shape[1]
        acc = _acc_dtype(x.dtype)
        return x.new_empty((n, c), dtype=acc), x.new_empty((n, c), dtype=acc)


# --------------------------------------------------------------------------- torch oracle: passes
def stats_pass_torch(x: Tensor) -> tuple[Tensor, Tensor]:
    """The statistics pass (oracle of l2bn_sample_stats): per-row mean and centered sum of squares
    of x seen as (N, C, S), in the accumulation dtype."""
    xa = _ncs(x).to(_acc_dtype(x.dtype))
    if xa.shape[2] == 0:
        z = xa.new_zeros(xa.shape[:2])
        return z, z.clone()
    mean = xa.mean(dim=2)
    return mean, (xa - mean.unsqueeze(2)).square().sum(dim=2)


def _pre(xa: Tensor, p: dict) -> Tensor:
    """pre = x_coef (x - center) + offset in acc (x as (N, C, S)): what the apply writes before
    the activation and what every backward pass recomputes."""
    return (xa - p["center"].unsqueeze(2)) * p["x_coef"].unsqueeze(2) + p["offset"].unsqueeze(2)


def _write_like(x: Tensor, val: Tensor) -> Tensor:
    out = _out_like(x)
    out.copy_(val.view(x.shape))
    return out


# --------------------------------------------------------------------------- torch oracle: finalize
def _sample_scale(m: Tensor, m2: Tensor, s: int, l2_eps: float, rescale: bool):
    """(r, inv_r, nrm): sample scale, its inverse and the norm (+inf where clamped), (N,) each."""
    c = m.shape[1]
    nrm = (m2 + s * m * m).sum(dim=1).sqrt()
    clamped = nrm < l2_eps  # a NaN norm propagates (F.normalize), never counts as clamped
    sqrt_d = math.sqrt(c * s) if rescale else 1.0
    r = torch.where(clamped, torch.full_like(nrm, l2_eps), nrm) / sqrt_d
    return r, 1.0 / r, torch.where(clamped, torch.full_like(nrm, math.inf), nrm)


def _local_rows(m: Tensor, m2: Tensor, inv_r: Tensor, s: int) -> Tensor:
    """(3, C) [count, mean, M2] of u over this batch (two passes over n)."""
    n = m.shape[0]
    um = m * inv_r[:, None]
    mean = um.sum(dim=0) / n if n > 0 else um.new_zeros(um.shape[1])
    m2u = (m2 * inv_r[:, None].square() + s * (um - mean).square()).sum(dim=0)
    return torch.stack([torch.full_like(mean, float(n * s)), mean, m2u])


def _chan_combine(rows_all: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's combination of the (P, 3, C) rows in order -> (count, mean, M2)."""
    n, mean, m2 = torch.zeros_like(rows_all[0])  # (C,) each
    for nb, mb, m2b in rows_all.unbind(0):
        tot = n + nb
        w = torch.where(nb > 0, nb / tot.clamp_min(1e-300), torch.zeros_like(nb))
        delta = mb - mean
        mean = mean + delta * w
        m2 = m2 + torch.where(nb > 0, m2b + delta * delta * n * w, torch.zeros_like(m2b))
        n = tot
    return n, mean, m2


def stats_torch(x: Tensor, l2_eps: float, rescale: bool) -> tuple[Tensor, Tensor]:
    """Oracle of l2bn_stats: (stats (2, N, C) acc, rows (3, C) float64)."""
    m, m2 = stats_pass_torch(x)
    fd = _fin_dtype(x.device, m.dtype)
    s = _ncs(x).shape[2]
    _, inv_r, _ = _sample_scale(m.to(fd), m2.to(fd), s, l2_eps, rescale)
    return torch.stack([m, m2]), _local_rows(m.to(fd), m2.to(fd), inv_r, s)


def finish_torch(x: Tensor, stats: Tensor, rows_all: Optional[Tensor], weight: Optional[Tensor],
                 bias: Optional[Tensor], mean: Optional[Tensor], var: Optional[Tensor], eps: float,
                 l2_eps: float, rescale: bool, act: str, act_param: float):
    """Oracle of l2bn_finish: (y, batch_mean, batch_var, saved)."""
    check_act(act, "l2bn_finish")
    if (mean is None) != (var is None) or (mean is not None and rows_all is not None):
        raise ValueError("l2bn_finish: give rows_all, or mean and var, or neither")
    xa = _ncs(x).to(_acc_dtype(x.dtype))
    n, c, s = xa.shape
    acc = xa.dtype
    fd = _fin_dtype(x.device, acc)
    m, m2 = stats[0], stats[1]
    md, m2d = m.to(fd), m2.to(fd)
    r, inv_r, nrm = _sample_scale(md, m2d, s, l2_eps, rescale)
    if mean is not None:
        mu, v, n_all = mean.to(fd), var.to(fd), float(n)
    else:
        if rows_all is None:
            rows_all = _local_rows(md, m2d, inv_r, s)[None]
        cnt, mu, m2u = _chan_combine(rows_all.to(fd))
        v = m2u / cnt
        n_all = cnt[:1] / s if s > 0 else cnt[:1]
    inv_s = (v + eps).rsqrt()
    k = inv_s if weight is None else inv_s * weight.to(fd)
    beta = 0.0 if bias is None else bias.to(fd)
    cen = md * inv_r[:, None] - mu
    x_coef = k * inv_r[:, None]
    offset = k * cen + beta
    n_all_t = torch.as_tensor(n_all, dtype=fd, device=x.device).reshape(1)
    saved = torch.cat([m.reshape(-1), m2.reshape(-1), x_coef.to(acc).reshape(-1),
                       offset.to(acc).reshape(-1), cen.to(acc).reshape(-1), r.to(acc), nrm.to(acc),
                       inv_s.to(acc), n_all_t.to(acc)])
    p = split_saved(saved, n, c)
    y = _write_like(x, act_forward(_pre(xa, p), act, act_param))
    return y, mu.to(acc, copy=True), v.to(acc, copy=True), saved


def grad_stats_torch(dy: Tensor, x: Tensor, saved: Tensor, act: str, act_param: float):
    """Oracle of l2bn_grad_stats: (sums (2, N, C) acc = [Q, P], rows (2, C) float64)."""
    xa = _ncs(x).to(_acc_dtype(x.dtype))
    n, c, _ = xa.shape
    p = split_saved(saved, n, c)
    g = act_backward(_pre(xa, p), _ncs(dy).to(xa.dtype), act, act_param)
    q = g.sum(dim=2)
    pp = (g * (xa - p["center"].unsqueeze(2))).sum(dim=2)
    fd = _fin_dtype(x.device, xa.dtype)
    inv_r = 1.0 / p["r"].to(fd)
    gsum = pp.to(fd) * inv_r[:, None] + p["cen"].to(fd) * q.to(fd)
    return torch.stack([q, pp]), torch.stack([q.to(fd).sum(dim=0), gsum.sum(dim=0)])


def grad_finish_torch(dy: Tensor, x: Tensor, weight: Optional[Tensor], saved: Tensor, sums: Tensor,
                      rows: Tensor, rows_all: Optional[Tensor], act: str, act_param: float):
    """Oracle of l2bn_grad_finish: (dx, dweight, dbias); rows_all None: eval (no batch terms)."""
    xa = _ncs(x).to(_acc_dtype(x.dtype))
    n, c, s = xa.shape
    acc = xa.dtype
    fd = _fin_dtype(x.device, acc)
    p = split_saved(saved, n, c)
    inv_s = p["inv_s"].to(fd)
    inv_r = (1.0 / p["r"].to(fd))[:, None]
    k = inv_s if weight is None else inv_s * weight.to(fd)
    dbias = rows[0].to(acc, copy=True)
    dweight = (rows[1] * inv_s).to(acc)
    if rows_all is not None:
        km = -k / (p["n_all"].to(fd) * s)
        alpha, beta0 = km * inv_s * inv_s * rows_all[1], km * rows_all[0]
    else:
        alpha = beta0 = torch.zeros_like(k)
    q, pp = sums[0].to(fd), sums[1].to(fd)
    m, m2, cen = p["center"].to(fd), p["m2"].to(fd), p["cen"].to(fd)
    dot = (k * (pp + m * q) + alpha * m2 * inv_r + (alpha * cen + beta0) * s * m).sum(dim=1)
    t = (dot / p["nrm"].to(fd).square())[:, None]
    dxc = ((alpha * inv_r - t) * inv_r).to(acc)
    dxo = ((alpha * cen + beta0 - t * m) * inv_r).to(acc)
    g = act_backward(_pre(xa, p), _ncs(dy).to(acc), act, act_param)
    xcen = xa - p["center"].unsqueeze(2)
    dx = g * p["x_coef"].unsqueeze(2) + xcen * dxc.unsqueeze(2) + dxo.unsqueeze(2)
    return _write_like(x, dx), dweight, dbias


# --------------------------------------------------------------------------- torch oracle: custom ops
@torch.library.custom_op("normkernels::torch_l2bn_forward", mutates_args=())
def torch_l2bn_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       mean: Optional[Tensor], var: Optional[Tensor], eps: float, l2_eps: float,
                       rescale: bool, act: str, act_param: float
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The oracle of normkernels::l2bn_forward (same contract): l2bn_finish(l2bn_stats(x))."""
    stats, rows = stats_torch(x, l2_eps, rescale)
    return finish_torch(x, stats, rows[None] if mean is None else None, weight, bias, mean, var,
                        eps, l2_eps, rescale, act, act_param)


@torch_l2bn_forward.register_fake
def _(x, weight, bias, mean, var, eps, l2_eps, rescale, act, act_param):
    n, c = x.shape[0], x.shape[1]
    acc = _acc_dtype(x.dtype)
    return (_out_like(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc),
            x.new_empty((saved_numel(n, c),), dtype=acc))


@torch.library.custom_op("normkernels::torch_l2bn_backward", mutates_args=())
def torch_l2bn_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], saved: Tensor,
                        training: bool, act: str, act_param: float) -> tuple[Tensor, Tensor, Tensor]:
    """The oracle of normkernels::l2bn_backward (same contract)."""
    sums, rows = grad_stats_torch(dy, x, saved, act, act_param)
    return grad_finish_torch(dy, x, weight, saved, sums, rows, rows if training else None, act,
                             act_param)


@torch_l2bn_backward.register_fake
def _(dy, x, weight, saved, training, act, act_param):
    c = x.shape[1]
    acc = _acc_dtype(x.dtype)
    return _out_like(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


def _setup_context(ctx, inputs, output):
    x, weight, bias, mean, var, eps, l2_eps, rescale, act, act_param = inputs
    ctx.save_for_backward(x, weight, output[3])
    ctx.args = (mean is None, bias is not None, act, act_param)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, dy, *_unused):
    x, weight, saved = ctx.saved_tensors
    training, has_bias, act, act_param = ctx.args
    if dy is None:
        return (None,) * 10
    dx, dw, db = torch_l2bn_backward(dy, x, weight, saved, training, act, act_param)
    return (dx if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            db if has_bias and ctx.needs_input_grad[2] else None) + (None,) * 7


torch_l2bn_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- entry points
def _no_extension(backend: str):
    raise RuntimeError(
        f"l2_batch_norm backend {backend!r} needs the C++ extension normkernels._C, which is not "
        "built (pip install --no-build-isolation -e .); use backend='torch'")


_FORWARD_OPS = {"torch": torch.ops.normkernels.torch_l2bn_forward.default}
if _EXT:
    _FORWARD_OPS["cpp"] = _FORWARD_OPS["cuda"] = torch.ops.normkernels.l2bn_forward.default


def l2_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
                  var: Optional[Tensor], eps: float, l2_eps: float, rescale: bool, act: str,
                  act_param: float, backend: str, reducer=None) -> tuple[Tensor, Tensor, Tensor, int]:
    """L2BN (+ activation) forward, pure (no running buffers): (y, batch_mean, batch_var, count),
    count = the values per channel the statistics cover. With a reducer (training only) the
    statistics are its group's (l2bn_sync).

    mean/var None: batch statistics of u = x_n / max(||x_n||, l2_eps) (* sqrt(D) if rescale);
    given: eval with them. Statistics in the accumulation dtype (float64 for float64 x, else
    float32). act in ("identity", "relu", "leaky_relu", "silu"), act_param = negative slope.
    backend (already resolved): "cpp" / "cuda" -> normkernels::l2bn_forward, "torch" -> the
    oracle op. The caller (functional.py) has validated the arguments.
    """
    if reducer is not None:
        return l2bn_sync(x, weight, bias, eps, l2_eps, rescale, act, act_param, backend, reducer)
    op = _FORWARD_OPS.get(backend)
    if op is None:
        if backend in ("cpp", "cuda"):
            _no_extension(backend)
        raise ValueError(f"l2_batch_norm: backend must be 'cpp', 'cuda' or 'torch', got {backend!r}")
    y, batch_mean, batch_var, _ = op(x, weight, bias, mean, var, eps, l2_eps, rescale, act, act_param)
    return y, batch_mean, batch_var, x.numel() // x.shape[1]


def _pieces(backend: str):
    """(stats, finish, grad_stats, grad_finish) of a backend."""
    if backend in ("cpp", "cuda"):
        if not _EXT:
            _no_extension(backend)
        o = torch.ops.normkernels
        return o.l2bn_stats, o.l2bn_finish, o.l2bn_grad_stats, o.l2bn_grad_finish
    if backend == "torch":
        return stats_torch, finish_torch, grad_stats_torch, grad_finish_torch
    raise ValueError(f"l2bn_sync: backend must be 'cpp', 'cuda' or 'torch', got {backend!r}")


class _L2BNSync(torch.autograd.Function):
    """Training over a process group: one gather of the (3, C) rows in the forward, one
    all_reduce of the (2, C) grad rows in the backward; every process joins both, an empty one
    (N = 0) too."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, l2_eps, rescale, act, act_param, backend, reducer, info):
        stats, finish, _, _ = _pieces(backend)
        st, rows = stats(x, l2_eps, rescale)
        rows_all = reducer.gather(rows)
        y, bmean, bvar, saved = finish(x, st, rows_all, weight, bias, None, None, eps, l2_eps,
                                       rescale, act, act_param)
        info["count"] = int(round(float(rows_all[:, 0, 0].sum())))
        ctx.save_for_backward(x, weight, saved)
        ctx.args = (bias is not None, act, act_param, backend, reducer)
        ctx.mark_non_differentiable(bmean, bvar)
        return y, bmean, bvar

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, saved = ctx.saved_tensors
        has_bias, act, act_param, backend, reducer = ctx.args
        _, _, grad_stats, grad_finish = _pieces(backend)
        if dy is None:  # the collective must still run on every process
            dy = torch.zeros_like(x)
        sums, rows = grad_stats(dy, x, saved, act, act_param)
        rows_all = reducer.all_reduce(rows)
        dx, dw, db = grad_finish(dy, x, weight, saved, sums, rows, rows_all, act, act_param)
        return (dx, dw if weight is not None else None, db if has_bias else None) + (None,) * 8


def l2bn_sync(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, l2_eps: float,
              rescale: bool, act: str, act_param: float, backend: str, reducer
              ) -> tuple[Tensor, Tensor, Tensor, int]:
    """Synchronized training forward: (y, batch_mean, batch_var, count), count = values per
    channel over the group (for the unbiased running variance). reducer: .gather(t) -> (P, *t.shape),
    .all_reduce(t) -> sum over processes (normkernels.distributed.Reducer)."""
    info = {}
    y, bmean, bvar = _L2BNSync.apply(x, weight, bias, eps, l2_eps, rescale, act, act_param, backend,
                                     reducer, info)
    return y, bmean, bvar, info["count"]
