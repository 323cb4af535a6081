"""L2BN op: l2-normalize each sample (the whole flattened (C, *spatial) vector), then batch norm.

Layout of the work (DESIGN.md section 3, written in centered / Chan form):

  passes (heavy, one read of the tensor each), viewing x as (N, C, S):
    l2bn_sample_stats(x)               -> mean[n,c], m2[n,c]  (centered sum of squares over S)
    l2bn_backward_sums(dy, x, center)  -> pc[n,c] = sum_s dy*(x-center), q[n,c] = sum_s dy
    l2bn_apply(x, center, a, b, dy?, d?) -> a*(x-center) + b (+ d*dy)     (per-(n,c) a, b, d)
  implemented by the C++/CUDA extension (torch.ops.normkernels.*, backend "cpp"/"cuda") or by
  the torch fallbacks below (backend "torch");

  finalize (O(N*C) torch ops, shared by every backend): _sample_norms, _channel_stats,
  _forward_coefs, _backward_coefs.

Top-level custom ops normkernels::l2bn_forward / normkernels::l2bn_backward carry fake kernels
and autograd; forward saves only x and (N, C) statistics.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["l2_batch_norm"]

try:  # registers torch.ops.normkernels.l2bn_{sample_stats,backward_sums,apply}
    import normkernels._C  # noqa: F401

    _EXT = hasattr(torch.ops.normkernels, "l2bn_sample_stats")
except ImportError:  # pure-PyTorch install: only backend "torch" works
    _EXT = False


# --------------------------------------------------------------------------- layout helpers
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    """Mirror of make_view() in csrc/l2bn.cpp: "ncs", "nsc", or None (kernel copies to NCS)."""
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


def _nc(x: Tensor) -> tuple[int, int, int]:
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    return n, c, s


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """(N, C) -> (N, C, 1, ...) to broadcast against x."""
    return t.view(t.shape + (1,) * (x.dim() - 2))


# --------------------------------------------------------------------------- torch fallbacks
def _torch_sample_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    n, c, s = _nc(x)
    xa = x.reshape(n, c, s).to(_acc_dtype(x.dtype))
    mean = xa.mean(dim=2)
    m2 = (xa - mean.unsqueeze(2)).square().sum(dim=2)
    return mean, m2


def _torch_backward_sums(dy: Tensor, x: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    n, c, s = _nc(x)
    acc = _acc_dtype(x.dtype)
    xa = x.reshape(n, c, s).to(acc)
    da = dy.reshape(n, c, s).to(acc)
    pc = (da * (xa - center.to(acc).unsqueeze(2))).sum(dim=2)
    q = da.sum(dim=2)
    return pc, q


def _torch_apply(x: Tensor, center: Tensor, x_coef: Tensor, offset: Tensor,
                 dy: Optional[Tensor] = None, dy_coef: Optional[Tensor] = None) -> Tensor:
    acc = _acc_dtype(x.dtype)
    val = _bcast(x_coef.to(acc), x) * (x.to(acc) - _bcast(center.to(acc), x)) + _bcast(offset.to(acc), x)
    if dy is not None:
        val = val + _bcast(dy_coef.to(acc), x) * dy.to(acc)
    out = _out_like(x)
    out.copy_(val)
    return out


def _passes(backend: str):
    if backend in ("cpp", "cuda"):
        if not _EXT:
            raise RuntimeError(
                f"l2_batch_norm backend {backend!r} needs the C++ extension normkernels._C, which is "
                "not built (pip install --no-build-isolation -e .); use backend='torch'")
        ops = torch.ops.normkernels
        return ops.l2bn_sample_stats, ops.l2bn_backward_sums, ops.l2bn_apply
    if backend == "torch":
        return _torch_sample_stats, _torch_backward_sums, _torch_apply
    raise ValueError(f"l2_batch_norm: backend must be 'cpp', 'cuda' or 'torch', got {backend!r}")


# --------------------------------------------------------------------------- fake kernels of the C++ passes
if _EXT:
    @torch.library.register_fake("normkernels::l2bn_sample_stats")
    def _(x):
        n, c = x.shape[0], x.shape[1]
        acc = _acc_dtype(x.dtype)
        return x.new_empty((n, c), dtype=acc), x.new_empty((n, c), dtype=acc)

    @torch.library.register_fake("normkernels::l2bn_backward_sums")
    def _(dy, x, center):
        n, c = x.shape[0], x.shape[1]
        acc = _acc_dtype(x.dtype)
        return x.new_empty((n, c), dtype=acc), x.new_empty((n, c), dtype=acc)

    @torch.library.register_fake("normkernels::l2bn_apply")
    def _(x, center, x_coef, offset, dy=None, dy_coef=None):
        return _out_like(x)


# --------------------------------------------------------------------------- finalize (shared)
def _fin_dtype(acc: torch.dtype, device: torch.device) -> torch.dtype:
    # O(N*C) math: float64 where the device has it (cheap, removes finalize rounding).
    return torch.float64 if device.type in ("cpu", "cuda") else acc


def _sample_norms(smean: Tensor, sm2: Tensor, s: int, l2_eps: float, rescale: bool):
    """Per-sample ||x_n||, r_n = max(||x_n||, l2_eps) / scale (u = x / r), unclamped mask."""
    c = smean.shape[1]
    nrm = (sm2 + s * smean.square()).sum(dim=1).clamp_min(0).sqrt()
    scale = math.sqrt(c * s) if rescale else 1.0
    r = nrm.clamp_min(l2_eps) / scale
    unclamped = nrm >= l2_eps  # F.normalize's clamp_min passes the gradient where norm >= eps
    return nrm, r, unclamped


def _channel_stats(um: Tensor, sm2: Tensor, r: Tensor, s: int, sync=None) -> tuple[Tensor, Tensor, int]:
    """Channel mean / biased variance of u from per-(n,c) means um = mean/r and M2 (Chan), and the
    number of samples they cover.

    The local batch gives one row (count, mean, M2) per channel; the rows of all processes
    (``sync.gather``, normkernels.distributed) or the single local row (sync=None) are combined
    with Chan's formula. An empty local batch contributes count 0.
    """
    n = um.shape[0]
    cnt = float(n * s)
    mu_l = um.sum(dim=0) / max(n, 1)
    m2_l = (sm2 / r.square().unsqueeze(1)).sum(dim=0) + s * (um - mu_l).square().sum(dim=0)
    rows = torch.stack([torch.full_like(mu_l, cnt), mu_l, m2_l])  # (3, C)
    rows = rows.unsqueeze(0) if sync is None else sync.gather(rows).to(rows.dtype)
    counts, means, m2s = rows.unbind(1)  # each (P, C)
    total = counts.sum(dim=0)
    mu = (counts * means).sum(dim=0) / total
    m2 = m2s.sum(dim=0) + (counts * (means - mu).square()).sum(dim=0)
    n_all = int(round(total[0].item() / s)) if sync is not None else n
    return mu, m2 / total, n_all


def _finalize(x: Tensor, smean: Tensor, sm2: Tensor, weight, mean, var, eps, l2_eps, rescale, sync=None):
    """Sample norms, channel statistics (batch ones when mean is None, over every process of
    ``sync``) and the per-channel scale. f["n"] is the (global) number of samples."""
    n, c, s = _nc(x)
    fd = _fin_dtype(smean.dtype, smean.device)
    smean, sm2 = smean.to(fd), sm2.to(fd)
    nrm, r, unclamped = _sample_norms(smean, sm2, s, l2_eps, rescale)
    um = smean / r.unsqueeze(1)
    if mean is None:
        mu, v, n = _channel_stats(um, sm2, r, s, sync)
    else:
        mu, v = mean.to(fd), var.to(fd)
    inv_s = (v + eps).rsqrt()
    k = inv_s if weight is None else inv_s * weight.to(fd)
    return dict(n=n, c=c, s=s, fd=fd, smean=smean, sm2=sm2, nrm=nrm, r=r,
                unclamped=unclamped, um=um, mu=mu, var=v, inv_s=inv_s, k=k)


def _forward_coefs(f, bias):
    """y = x_coef*(x - mean_nc) + offset  with  x_coef = k/r,  offset = k*(mean_nc/r - mu) + beta."""
    x_coef = f["k"] / f["r"].unsqueeze(1)
    offset = f["k"] * (f["um"] - f["mu"])
    if bias is not None:
        offset = offset + bias.to(f["fd"])
    return x_coef, offset


def _backward_coefs(f, pc: Tensor, q: Tensor, training: bool, sync=None):
    """dx = dy_coef*dy + x_coef*(x - mean_nc) + offset, plus dweight, dbias (per channel).

    G[n,c] = sum_s dy*(u - mu) = pc/r + (mean_nc/r - mu)*q;  dgamma = sum_n G / s;  dbeta = sum_n q.
    du = k*dy + alpha*(x - mean_nc) + beta'   (training: alpha, beta' from BN's batch-stat terms)
    dx = (du - t*x)/r,  t = (x_n . du_n)/||x_n||^2 (0 where the norm was clamped).
    With ``sync`` the batch-statistic terms A, B use the sums over every process (one packed
    all_reduce of [sum_n q, sum_n G]; f["n"] is then the global sample count) while the returned
    dweight, dbias stay this process's contribution.
    """
    fd = f["fd"]
    pc, q = pc.to(fd), q.to(fd)
    r = f["r"].unsqueeze(1)
    k, inv_s, um, mu, s = f["k"], f["inv_s"], f["um"], f["mu"], f["s"]
    cen = um - mu
    G = pc / r + cen * q
    dbias = q.sum(dim=0)
    dxhat = G.sum(dim=0) * inv_s  # sum dy * xhat = dgamma
    if training:
        m = f["n"] * s
        if sync is None:
            sq, sg = dbias, G.sum(dim=0)
        else:
            sq, sg = sync.all_reduce(torch.stack([dbias, G.sum(dim=0)])).to(fd).unbind(0)
        A = sq / m
        B = sg * inv_s / m
        alpha = (-k * B * inv_s) / r
        beta = -k * A - k * B * inv_s * cen
    else:
        alpha = torch.zeros_like(cen)
        beta = torch.zeros_like(cen)
    sdu = k * q + s * beta  # sum_s du
    dot = (k * pc + alpha * f["sm2"] + f["smean"] * sdu).sum(dim=1)  # sum x*du per sample
    nrm = f["nrm"]
    t = torch.where(f["unclamped"], dot / torch.where(f["unclamped"], nrm, torch.ones_like(nrm)).square(),
                    torch.zeros_like(dot)).unsqueeze(1)
    dy_coef = (k / r).expand_as(cen)
    x_coef = (alpha - t) / r
    offset = (beta - t * f["smean"]) / r
    return dy_coef, x_coef, offset, dxhat, dbias


# --------------------------------------------------------------------------- implementations
def _forward_impl(x, weight, bias, mean, var, eps, l2_eps, rescale, backend, sync=None):
    """Passes + finalize of the forward. Returns (y, f) where f is _finalize's dict plus the
    accumulation dtype "acc" and the pass outputs "smean_acc", "sm2_acc" (what the backward needs).
    ``sync`` (normkernels.distributed) makes the batch statistics global over its processes."""
    stats, _, apply = _passes(backend)
    smean, sm2 = stats(x)
    f = _finalize(x, smean, sm2, weight, mean, var, eps, l2_eps, rescale, sync)
    x_coef, offset = _forward_coefs(f, bias)
    acc = smean.dtype
    y = apply(x, smean, x_coef.to(acc), offset.to(acc))
    f.update(acc=acc, smean_acc=smean, sm2_acc=sm2)
    return y, f


def _backward_impl(dy, x, weight, mean, var, sample_mean, sample_m2, eps, l2_eps, rescale, backend,
                   training: bool, count=None, sync=None):
    """(dx, dweight, dbias). mean/var None: recompute the batch statistics from the saved sample
    statistics; given with training=True (the synchronized path): they are the global batch
    statistics over ``count`` samples, and ``sync`` all-reduces the backward sums."""
    _, sums, apply = _passes(backend)
    acc = sample_mean.dtype
    f = _finalize(x, sample_mean, sample_m2, weight, mean, var, eps, l2_eps, rescale)
    if count is not None:
        f["n"] = count
    pc, q = sums(dy, x, sample_mean)
    dy_coef, x_coef, offset, dweight, dbias = _backward_coefs(f, pc, q, training, sync)
    dx = apply(x, sample_mean, x_coef.to(acc), offset.to(acc), dy, dy_coef.to(acc))
    wdt = weight.dtype if weight is not None else torch.float32
    return dx, dweight.to(wdt), dbias.to(wdt)


# --------------------------------------------------------------------------- top-level custom ops
def _check_backend(backend: str) -> None:
    if backend not in ("cpp", "cuda", "torch"):
        raise ValueError(f"l2_batch_norm: backend must be 'cpp', 'cuda' or 'torch', got {backend!r}")


@torch.library.custom_op("normkernels::l2bn_forward", mutates_args=())
def l2bn_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
                 var: Optional[Tensor], eps: float, l2_eps: float, rescale: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, batch_mean (C,), batch_var (C,), sample_mean (N,C), sample_m2 (N,C)), statistics in
    the accumulation dtype (float64 for float64 x, else float32)."""
    _check_backend(backend)
    y, f = _forward_impl(x, weight, bias, mean, var, eps, l2_eps, rescale, backend)
    acc = f["acc"]
    return y, f["mu"].to(acc, copy=True), f["var"].to(acc, copy=True), f["smean_acc"], f["sm2_acc"]


@l2bn_forward.register_fake
def _(x, weight, bias, mean, var, eps, l2_eps, rescale, backend):
    n, c = x.shape[0], x.shape[1]
    acc = _acc_dtype(x.dtype)
    return (_out_like(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc),
            x.new_empty((n, c), dtype=acc), x.new_empty((n, c), dtype=acc))


@torch.library.custom_op("normkernels::l2bn_backward", mutates_args=())
def l2bn_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Optional[Tensor],
                  var: Optional[Tensor], sample_mean: Tensor, sample_m2: Tensor, eps: float,
                  l2_eps: float, rescale: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dweight (C,), dbias (C,)); mean/var None means training (batch statistics)."""
    _check_backend(backend)
    return _backward_impl(dy, x, weight, mean, var, sample_mean, sample_m2, eps, l2_eps, rescale, backend,
                          training=mean is None)


@l2bn_backward.register_fake
def _(dy, x, weight, mean, var, sample_mean, sample_m2, eps, l2_eps, rescale, backend):
    c = x.shape[1]
    wdt = weight.dtype if weight is not None else torch.float32
    return _out_like(x), x.new_empty((c,), dtype=wdt), x.new_empty((c,), dtype=wdt)


def _setup_context(ctx, inputs, output):
    x, weight, bias, mean, var, eps, l2_eps, rescale, backend = inputs
    _, _, _, smean, sm2 = output
    ctx.save_for_backward(x, weight, mean, var, smean, sm2)
    ctx.has_bias = bias is not None
    ctx.args = (eps, l2_eps, rescale, backend)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, gy, *_unused):
    x, weight, mean, var, smean, sm2 = ctx.saved_tensors
    eps, l2_eps, rescale, backend = ctx.args
    if gy is None:
        gy = torch.zeros_like(x)
    dx, dw, db = l2bn_backward(gy, x, weight, mean, var, smean, sm2, eps, l2_eps, rescale, backend)
    return (dx if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            db if ctx.has_bias and ctx.needs_input_grad[2] else None,
            None, None, None, None, None, None)


l2bn_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- entry point
def l2_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
                  var: Optional[Tensor], eps: float, l2_eps: float, rescale: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """L2BN forward (pure: no running buffers). Returns (y, batch_mean, batch_var).

    mean/var None: normalize with the batch statistics of u = x_n / max(||x_n||, l2_eps)
    (* sqrt(D) if rescale); given: normalize with them. Statistics are float32 (float64 for
    float64 x).
    backend: "cpp" or "cuda" (C++ extension passes) or "torch" (torch-op passes).
    """
    _check_backend(backend)
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError("l2_batch_norm: x must be a tensor of shape (N, C, *spatial)")
    if not x.is_floating_point():
        raise TypeError(f"l2_batch_norm: x must be floating point, got {x.dtype}")
    if (mean is None) != (var is None):
        raise ValueError("l2_batch_norm: mean and var must both be given or both be None")
    y, bmean, bvar, _, _ = l2bn_forward(x, weight, bias, mean, var, float(eps), float(l2_eps),
                                        bool(rescale), backend)
    return y, bmean, bvar
