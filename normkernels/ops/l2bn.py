"""L2BN op: l2-normalize each sample (the whole flattened (C, *spatial) vector), then batch norm.

Layout of the work (DESIGN.md section 3, written in centered / Chan form):

  passes (heavy, one read of the tensor each), viewing x as (N, C, S):
    l2bn_sample_stats(x)               -> mean[n,c], m2[n,c]  (centered sum of squares over S)
    l2bn_backward_sums(dy, x, center)  -> pc[n,c] = sum_s dy*(x-center), q[n,c] = sum_s dy
    l2bn_apply(x, center, a, b, dy?, d?) -> a*(x-center) + b (+ d*dy)     (per-(n,c) a, b, d)
  implemented by the C++/CUDA extension (torch.ops.normkernels.*, backend "cpp"/"cuda") or by
  the torch fallbacks below (backend "torch");

  finalize (O(N*C) torch ops, shared by every backend): _finalize, _channel_stats,
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
# Written for few ops (each is a Python dispatch on CPU and a kernel launch on GPU): the (N, C)
# pass outputs are converted to the finalize dtype once, at the top of _finalize /
# _backward_coefs; weight, bias and eval mean are only ever used together with a finalize-dtype
# operand, so type promotion computes in float64 without a separate conversion; the (N, C)
# coefficients handed to the apply pass are written straight into accumulation-dtype buffers
# (out=); eval mode (alpha = beta' = 0) skips the batch-statistic terms instead of adding zeros;
# sync=None skips the (identity) Chan combination of the single local row.
def _fin_dtype(acc: torch.dtype, device: torch.device) -> torch.dtype:
    # O(N*C) math: float64 where the device has it (cheap, removes finalize rounding).
    return torch.float64 if device.type in ("cpu", "cuda") else acc


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _channel_stats(um: Tensor, sm2: Tensor, r: Tensor, s: int, sync=None):
    """Channel mean / biased variance of u from per-(n,c) means um = mean/r (N, C), M2 sm2 (N, C) and
    r (N, 1) (Chan), the number of samples they cover, and cen = um - mean (N, C).

    The local batch gives one row (count, mean, M2) per channel; the rows of all processes
    (``sync.gather``, normkernels.distributed) are combined with Chan's formula; with sync=None the
    single local row is the result (Chan's combination of one row is that row). An empty local
    batch contributes count 0.
    """
    n = um.shape[0]
    mu = um.sum(dim=0) / max(n, 1)
    cen = um - mu
    m2 = torch.addcmul(sm2 / r.square(), cen, cen, value=s).sum(dim=0)  # sum_n M2/r^2 + s*(um - mu)^2
    if sync is None:
        return mu, m2 / (n * s), n, cen
    rows = torch.stack([torch.full_like(mu, float(n * s)), mu, m2])  # (3, C)
    counts, means, m2s = sync.gather(rows).to(rows.dtype).unbind(1)  # each (P, C)
    total = counts.sum(dim=0)
    mu = (counts * means).sum(dim=0) / total
    m2 = m2s.sum(dim=0) + (counts * (means - mu).square()).sum(dim=0)
    n_all = int(round(total[0].item() / s))
    return mu, m2 / total, n_all, um - mu


def _finalize(x: Tensor, smean: Tensor, sm2: Tensor, weight, mean, var, eps, l2_eps, rescale, sync=None):
    """Sample norms, channel statistics (batch ones when mean is None, over every process of
    ``sync``) and the per-channel scale. f["n"] is the (global) number of samples.

    Shapes: per-sample nrm2, nrm, r (N, 1); smean, sm2, um, cen (N, C) and inv_s, k (C,) in the
    finalize dtype fd; mu, var (C,): fd batch statistics, or the given mean/var unconverted (eval).
    nrm needs no clamp_min(0): nrm2 is a sum of M2 >= 0 and squares."""
    n, c, s = _nc(x)
    fd = _fin_dtype(smean.dtype, smean.device)
    smean, sm2 = _as(smean, fd), _as(sm2, fd)
    nrm2 = torch.addcmul(sm2, smean, smean, value=s).sum(dim=1, keepdim=True)  # ||x_n||^2
    nrm = nrm2.sqrt()
    r = nrm.clamp_min(l2_eps)  # u = x / r
    if rescale:
        r = r / math.sqrt(c * s)
    um = smean / r
    if mean is None:
        mu, v, n, cen = _channel_stats(um, sm2, r, s, sync)
        vf = v
    else:
        mu, v = mean, var
        cen = um - mean
        vf = _as(var, fd)
    inv_s = (vf + eps).rsqrt()
    k = inv_s if weight is None else inv_s * weight
    return dict(n=n, c=c, s=s, fd=fd, smean=smean, sm2=sm2, nrm2=nrm2, nrm=nrm, r=r, l2_eps=l2_eps,
                um=um, cen=cen, mu=mu, var=v, inv_s=inv_s, k=k)


def _nc_out(f, acc: torch.dtype) -> Tensor:
    """Empty (N, C) buffer in the accumulation dtype for an out= coefficient."""
    return torch.empty((f["smean"].shape[0], f["c"]), dtype=acc, device=f["smean"].device)


def _forward_coefs(f, bias, acc: torch.dtype):
    """y = x_coef*(x - mean_nc) + offset  with  x_coef = k/r,  offset = k*(mean_nc/r - mu) + beta.
    Returned in the accumulation dtype ``acc``."""
    x_coef = torch.div(f["k"], f["r"], out=_nc_out(f, acc))
    if bias is None:
        offset = torch.mul(f["k"], f["cen"], out=_nc_out(f, acc))
    else:
        offset = torch.addcmul(bias, f["k"], f["cen"], out=_nc_out(f, acc))
    return x_coef, offset


def _backward_coefs(f, pc: Tensor, q: Tensor, training: bool, acc: torch.dtype, sync=None):
    """dx = dy_coef*dy + x_coef*(x - mean_nc) + offset (coefficients in ``acc``), plus dweight,
    dbias (per channel, finalize dtype).

    G[n,c] = sum_s dy*(u - mu) = pc/r + (mean_nc/r - mu)*q;  dgamma = sum_n G / s;  dbeta = sum_n q.
    du = k*dy + alpha*(x - mean_nc) + beta'   (training: alpha, beta' from BN's batch-stat terms)
    dx = (du - t*x)/r,  t = (x_n . du_n)/||x_n||^2 (0 where the norm was clamped).
    With ``sync`` the batch-statistic terms A, B use the sums over every process (one packed
    all_reduce of [sum_n q, sum_n G]; f["n"] is then the global sample count) while the returned
    dweight, dbias stay this process's contribution.
    """
    fd, r, k, inv_s, cen, s = f["fd"], f["r"], f["k"], f["inv_s"], f["cen"], f["s"]
    smean, sm2 = f["smean"], f["sm2"]
    pc, q = _as(pc, fd), _as(q, fd)
    G = torch.addcmul(pc / r, cen, q)
    dbias = q.sum(dim=0)
    sg = G.sum(dim=0)
    dxhat = sg * inv_s  # sum dy * xhat = dgamma
    kq = k * q
    kpc = k * pc
    if training:
        if sync is None:
            sq, sgi = dbias, dxhat
        else:
            sq, sg = sync.all_reduce(torch.stack([dbias, sg])).to(fd).unbind(0)
            sgi = sg * inv_s
        km = k * (-1.0 / (f["n"] * s))
        a = km * inv_s * sgi  # -k*B*inv_s, B = sum G * inv_s / m
        alpha = a / r  # (N, C)
        beta = torch.addcmul(km * sq, a, cen)  # -k*A - k*B*inv_s*cen
        sdu = torch.add(kq, beta, alpha=s)  # sum_s du
        dot = torch.addcmul(torch.addcmul(kpc, alpha, sm2), smean, sdu)
    else:  # alpha = beta' = 0
        dot = torch.addcmul(kpc, smean, kq)
    dot = dot.sum(dim=1, keepdim=True)  # sum x*du per sample
    # t = dot/||x_n||^2 where the norm was not clamped (F.normalize's clamp_min passes the gradient
    # where norm >= eps), 0 elsewhere (dot / inf).
    t = dot / torch.where(f["nrm"] >= f["l2_eps"], f["nrm2"], math.inf)
    dy_coef = torch.div(k, r, out=_nc_out(f, acc))
    if training:
        x_coef = torch.div(alpha - t, r, out=_nc_out(f, acc))
        offset = torch.div(torch.addcmul(beta, t, smean, value=-1), r, out=_nc_out(f, acc))
    else:
        tr = t.neg() / r  # (N, 1): x_coef = -t/r, offset = -t*mean_nc/r
        x_coef = _nc_out(f, acc).copy_(tr)
        offset = torch.mul(tr, smean, out=_nc_out(f, acc))
    return dy_coef, x_coef, offset, dxhat, dbias


# --------------------------------------------------------------------------- implementations
def _forward_impl(x, weight, bias, mean, var, eps, l2_eps, rescale, backend, sync=None):
    """Passes + finalize of the forward. Returns (y, f) where f is _finalize's dict plus the
    accumulation dtype "acc" and the pass outputs "smean_acc", "sm2_acc" (what the backward needs).
    ``sync`` (normkernels.distributed) makes the batch statistics global over its processes."""
    stats, _, apply = _passes(backend)
    smean, sm2 = stats(x)
    f = _finalize(x, smean, sm2, weight, mean, var, eps, l2_eps, rescale, sync)
    acc = smean.dtype
    x_coef, offset = _forward_coefs(f, bias, acc)
    y = apply(x, smean, x_coef, offset)
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
    dy_coef, x_coef, offset, dweight, dbias = _backward_coefs(f, pc, q, training, acc, sync)
    dx = apply(x, sample_mean, x_coef, offset, dy, dy_coef)
    wdt = weight.dtype if weight is not None else torch.float32
    return dx, _as(dweight, wdt), _as(dbias, wdt)


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
