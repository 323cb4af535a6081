"""The CUDA implementation of the SBN and BN+SBN ops in Triton: host functions, one per op
(kernels: normkernels/triton/sbn_kernels.py; math and GPU design notes in its docstring).

What is here
------------
* The host functions of the ops of csrc/sbn.cpp, one per op, with exactly the C++ schemas'
  arguments (``IMPL``: name -> function; ``register_kernels()`` registers them as the CUDA
  kernels of ``normkernels::<name>``, raising on a schema mismatch). Autograd is the ops' own
  (csrc/autograd): under TRITON_INTERPRET=1, ``on_cpu()`` makes these functions the ops' CPU
  kernels, so tests run a CUDA call's whole path on CPU tensors.
* The literal FFT path's spectral passes (``sbn_fft_spectral_forward`` / ``_backward``).

Every launch goes through ``normkernels.triton.launch.launch`` and every host function runs on
meta tensors (no .item(), no data-dependent host logic), so tests can enumerate the kernels'
specialisations for real shapes without a GPU.

Launches per call (the running-statistics update is its own op: one more launch per buffer set):
  *_forward training: statistics pass, finalize, apply (3); eval: finalize, apply (2);
  *_backward (training or eval): gradient sums, finalize, apply (3);
  the synchronized pieces: sbn_stats and sbn_grad_stats: pass + reduction of the partials (2),
  *_finish and *_grad_finish: finalize + apply (2); an empty local batch skips its passes.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from normkernels.ops._act import ACTS
from normkernels.triton.launch import launch, multiprocessor_count
from normkernels.triton.sbn_kernels import (
    BNSBN_SAVED,
    FFT_NORMS,
    SBN_SAVED,
    _NCOEF,
    _NG,
    _NS,
    _bnsbn_bwd_finalize_kernel,
    _bnsbn_finalize_kernel,
    _fft_apply_kernel,
    _fft_grad_apply_kernel,
    _fft_grad_stats_kernel,
    _fft_stats_kernel,
    _rows_kernel,
    _sbn_bwd_apply_kernel,
    _sbn_bwd_finalize_kernel,
    _sbn_finalize_kernel,
    _sbn_fwd_apply_kernel,
    _sbn_grad_stats_kernel,
    _sbn_stats_kernel,
)

__all__ = [
    "sbn_stats", "sbn_finish", "sbn_forward", "sbn_grad_stats", "sbn_grad_finish", "sbn_backward",
    "bnsbn_finish", "bnsbn_forward", "bnsbn_grad_finish", "bnsbn_backward", "IMPL",
    "register_kernels", "on_cpu", "registered_on_cpu", "sbn_fft_spectral_forward",
    "sbn_fft_spectral_backward", "FFT_NORMS", "SBN_SAVED", "BNSBN_SAVED",
]

# ----------------------------------------------------------------------------------------------
# host: validation, constants, tiling
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACT_CODE = {name: i for i, name in enumerate(ACTS)}
_CONSTS: dict = {}

# Tuning knobs (tests shrink them to reach several chunks and tiled rows on small inputs).
PROGRAMS_PER_SM = 8          # statistics/apply programs aimed at per multiprocessor
MIN_TILES_PER_CHUNK = 4      # a chunk is at least this many tiles of rows
MAX_BW = 1024                # longest row held in one tile; longer rows are tiled
TILE = 2048                  # elements per tile (float64: half as many, the same registers)
FINALIZE_BLOCK = 128         # channels per finalize program


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _fail(op: str, msg: str, exc=ValueError):
    raise exc(f"normkernels::{op} (triton): {msg}")


def _check_x(op: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        _fail(op, "x must be a Tensor", TypeError)
    if x.dim() != 4:
        _fail(op, f"expected a 4d input (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        _fail(op, f"x must be float16, bfloat16, float32 or float64, got {x.dtype}", TypeError)
    if x.shape[2] < 1 or x.shape[3] < 1:
        _fail(op, f"H and W must be at least 1, got shape {tuple(x.shape)}")
    if x.shape[0] * x.shape[2] >= 2 ** 31:
        _fail(op, f"N*H must be below 2^31, got shape {tuple(x.shape)}")


def _check_t(op: str, name: str, t, x, shape, dtype=None, optional=True) -> None:
    if t is None:
        if not optional:
            _fail(op, f"{name} is required")
        return
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a Tensor", TypeError)
    if tuple(t.shape) != tuple(shape):
        _fail(op, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        _fail(op, f"{name} is on {t.device}, x on {x.device}")
    if dtype is not None and t.dtype != dtype:
        _fail(op, f"{name} must be {dtype}, got {t.dtype}", TypeError)
    if dtype is None and not t.is_floating_point():
        _fail(op, f"{name} must be floating point, got {t.dtype}", TypeError)


def _check_act(op: str, act: str) -> None:
    if act not in _ACT_CODE:
        _fail(op, f"act must be one of {ACTS}, got {act!r}")


def _check_mode(op: str, fft_norm: str, act: str) -> None:
    if fft_norm not in FFT_NORMS:
        _fail(op, f"fft_norm must be one of {FFT_NORMS}, got {fft_norm!r}")
    _check_act(op, act)


def _check_dy(op: str, dy, x) -> None:
    _check_t(op, "dy", dy, x, x.shape, optional=False)


def _norm_factors(fft_norm: str, H: int, W: int) -> tuple[float, float, float, float]:
    """(f, f^2, h, h^2): f the forward transform's scale under fft_norm, h = 1/f."""
    hw = float(H * W)
    if fft_norm == "ortho":
        return 1.0 / math.sqrt(hw), 1.0 / hw, math.sqrt(hw), hw
    if fft_norm == "forward":
        return 1.0 / hw, 1.0 / (hw * hw), hw, hw * hw
    return 1.0, 1.0, 1.0, 1.0


def _row_consts(W: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(3, W) [Re D, Im D, Pi[0, :]] in ``dtype`` on ``device``, cached: D(w) = sum_{l < Wr}
    exp(-2 pi i l w / W) (the DFT of the indicator of l < Wr), Pi[0, :] = irfft(1j * ones(Wr), W)
    = -(2/W) sum_{0 < l < W/2} sin(2 pi l w / W) (irfft drops the imaginary parts of the bins l = 0
    and l = W/2). Pr[0, :] = irfft(ones) = delta_w0 is used as such by the kernels. Computed on
    the device itself (no copy from pageable host memory: a first call may run inside CUDA graph
    capture); tests/test_sbn_triton.py checks them against the oracle's torch.fft derivation."""
    key = (W, str(device), dtype)
    hit = _CONSTS.get(key)
    if hit is None:
        Wr = W // 2 + 1
        lw = torch.outer(torch.arange(W, device=device), torch.arange(Wr, device=device)) % W
        angle = (2 * math.pi / W) * lw.to(torch.float64)                          # (W, Wr), in [0, 2 pi)
        re_d, im_d = angle.cos().sum(1), -angle.sin().sum(1)
        inner = angle[:, 1:(W + 1) // 2]                                         # 0 < l < W/2
        pi = -(2.0 / W) * inner.sin().sum(1)
        hit = torch.stack([re_d, im_d, pi]).to(dtype).contiguous()
        _CONSTS[key] = hit
    return hit


def _sm_count(device: torch.device) -> int:
    """Multiprocessors: cached per device by normkernels/triton/launch.py (which reports the
    recording target's count for meta tensors); the interpreter (CPU tensors) runs a few
    programs."""
    if device.type == "cpu":
        return 1
    return multiprocessor_count(device)


def _guard(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _layout(t: torch.Tensor) -> int:
    if t.is_contiguous():
        return 1
    if t.is_contiguous(memory_format=torch.channels_last):
        return 2
    return 0


def _strides(t: torch.Tensor, layout: int) -> tuple:
    # LAYOUT 1/2 compute offsets from sizes; 0s keep the unused arguments out of the signature
    return tuple(t.stride()) if layout == 0 else (0, 0, 0, 0)


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """x's dtype and memory format: channels_last stays, anything else becomes contiguous."""
    fmt = torch.channels_last if _layout(x) == 2 else torch.contiguous_format
    return torch.empty_like(x, memory_format=fmt)


def _tile_elems(dtype: torch.dtype) -> int:
    """Elements per tile: TILE for float32 accumulation, TILE // 2 for float64, so that a tile
    takes the same registers (8 warps: 8 values a thread, 4 in float64; float64 tiles of 8 values
    a thread spilled at some shapes)."""
    return TILE if _acc(dtype) != torch.float64 else max(1, TILE // 2)


def _max_offset(*ts) -> int:
    return max(sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) for t in ts)


class _Plan:
    """Tile and grid of the passes over one tensor shape/layout."""

    def __init__(self, x: torch.Tensor, *others: torch.Tensor):
        N, C, H, W = x.shape
        self.C, self.H, self.W, self.NH = C, H, W, N * H
        sw = x.stride(3) if W > 1 else float("inf")
        sc = x.stride(1) if C > 1 else float("inf")
        cmajor = sc < sw              # channels_last-like: tiles run along C
        tile = _tile_elems(x.dtype)
        bw = min(triton.next_power_of_2(W), MAX_BW)
        if cmajor:                    # >= 8 channels a row segment, a whole row if it fits
            # at most 256 bytes of channels: 64 (32 in float64; 64 float64 channels took ~15
            # registers more a thread, and ptxas 12.9 spilled rather than give them)
            max_bc = 32 if x.element_size() == 8 else 64
            bc = min(triton.next_power_of_2(C), max_bc, max(8, tile // bw))
            bw = min(bw, max(1, tile // bc))
        else:
            bc = 1
        br = max(1, min(tile // (bw * bc), triton.next_power_of_2(max(self.NH, 1))))
        self.BR, self.BW, self.BC = br, bw, bc
        # channels a thread holds along C: 16-bit data would take 8 (one 16-byte load), and every
        # per-channel coefficient then takes 8 registers; 4 (8-byte loads) halves that
        self.VEC = 4 if cmajor and x.element_size() == 2 else bc
        self.c_blocks = triton.cdiv(C, bc)
        target = PROGRAMS_PER_SM * _sm_count(x.device)
        want = max(1, triton.cdiv(target, self.c_blocks))
        max_chunks = max(1, triton.cdiv(self.NH, br * MIN_TILES_PER_CHUNK))
        n_chunks = min(want, max_chunks)
        rows = triton.cdiv(triton.cdiv(max(self.NH, 1), n_chunks), br) * br
        self.rows = rows
        self.n_chunks = triton.cdiv(self.NH, rows)
        self.grid = (self.c_blocks, self.n_chunks)
        self.idx64 = _max_offset(x, *others) >= 2 ** 31
        self.num_warps = 8 if br * bw * bc >= max(tile, 1024) else 4
        self.acc_tl = _acc_tl(x.dtype)

    def consts(self, x):
        return dict(H=self.H, W=self.W, IDX64=self.idx64, ACC=self.acc_tl, BR=self.BR,
                    BW=self.BW, BC=self.BC, VEC=self.VEC)


_PLANS: dict = {}


def _plan(x: torch.Tensor, *others: torch.Tensor) -> _Plan:
    """_Plan(x, *others), cached per shape, strides, dtype, device (and the tuning knobs)."""
    key = (tuple(x.shape), x.stride(), tuple(o.stride() for o in others), x.dtype, x.device,
           TILE, MAX_BW, MIN_TILES_PER_CHUNK, PROGRAMS_PER_SM)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(x, *others)
    return plan


def _fin_grid(C: int):
    block = max(16, min(FINALIZE_BLOCK, triton.next_power_of_2(max(C, 1))))
    return (triton.cdiv(C, block),), block


# ----------------------------------------------------------------------------------------------
# host: passes
# ----------------------------------------------------------------------------------------------


def _stats_pass(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-chunk partials (n_chunks, 7, C) float64 of this process's statistics."""
    plan = _plan(x)
    C = x.shape[1]
    # (one row at least: no null pointer handed to a launch)
    part = torch.empty((max(plan.n_chunks, 1), _NS, C), dtype=torch.float64, device=x.device)
    if plan.n_chunks > 0 and C > 0:
        lx = _layout(x)
        cst = _row_consts(plan.W, x.device, _acc(x.dtype))
        launch(_sbn_stats_kernel, plan.grid, x, cst, part, C, plan.NH, plan.rows,
               *_strides(x, lx), X_LAYOUT=lx, num_warps=plan.num_warps, **plan.consts(x))
    return part, plan.n_chunks


def _forward_apply(x: torch.Tensor, saved: torch.Tensor, act: str, act_param: float
                   ) -> torch.Tensor:
    y = _empty_like(x)
    if x.numel() == 0:
        return y
    plan = _plan(x, y)
    lx = _layout(x)
    cst = _row_consts(plan.W, x.device, _acc(x.dtype))
    launch(_sbn_fwd_apply_kernel, plan.grid, x, y, saved, cst, plan.C, plan.NH, plan.rows,
           saved.shape[1], float(act_param), _ACT_CODE[act], *_strides(x, lx), X_LAYOUT=lx,
           Y_LAYOUT=_layout(y), num_warps=plan.num_warps, **plan.consts(x))
    return y


def _grad_pass(dy: torch.Tensor, x: torch.Tensor, saved: torch.Tensor, act: str,
               act_param: float) -> tuple[torch.Tensor, int]:
    plan = _plan(x, dy)
    C = x.shape[1]
    part = torch.empty((max(plan.n_chunks, 1), _NG, C), dtype=torch.float64, device=x.device)
    if plan.n_chunks > 0 and C > 0:
        lx, ld = _layout(x), _layout(dy)
        cst = _row_consts(plan.W, x.device, _acc(x.dtype))
        launch(_sbn_grad_stats_kernel, plan.grid, dy, x, saved, cst, part, C, plan.NH, plan.rows,
               saved.shape[1], float(act_param), _ACT_CODE[act], *_strides(x, lx),
               *_strides(dy, ld), X_LAYOUT=lx, DY_LAYOUT=ld, num_warps=plan.num_warps,
               **plan.consts(x))
    return part, plan.n_chunks


def _backward_apply(dy, x, saved, coef, training: bool, act: str, act_param: float):
    dx = _empty_like(x)
    if x.numel() == 0:
        return dx
    plan = _plan(x, dy, dx)
    lx, ld = _layout(x), _layout(dy)
    cst = _row_consts(plan.W, x.device, _acc(x.dtype))
    launch(_sbn_bwd_apply_kernel, plan.grid, dy, x, dx, saved, coef, cst, plan.C, plan.NH,
           plan.rows, saved.shape[1], float(act_param), _ACT_CODE[act], *_strides(x, lx),
           *_strides(dy, ld), X_LAYOUT=lx, DY_LAYOUT=ld, DX_LAYOUT=_layout(dx),
           TRAINING=bool(training), num_warps=plan.num_warps, **plan.consts(x))
    return dx


def _reduce_rows(part: torch.Tensor, n_chunks: int, C: int, N: int, stats: bool) -> torch.Tensor:
    out = torch.empty((C, 8 if stats else 4), dtype=torch.float64, device=part.device)
    if C > 0:
        grid, block = _fin_grid(C)
        launch(_rows_kernel, grid, part, out, n_chunks, C, float(N), STATS=stats, BLOCK=block,
               num_warps=4)
    return out


def _opt(t):
    return None if t is None else t.contiguous()


# ----------------------------------------------------------------------------------------------
# host: SBN ops
# ----------------------------------------------------------------------------------------------


def _sbn_finalize(x, src, n_src, rank, weight, bias, mean, var, eps, fft_norm, src_kind):
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    dev = x.device
    f, f2, hf, hf2 = _norm_factors(fft_norm, H, W)
    out_mean = torch.empty((C, 2), dtype=acc, device=dev)
    out_var = torch.empty((C,), dtype=acc, device=dev)
    saved = torch.empty((C, len(SBN_SAVED)), dtype=torch.float64, device=dev)
    if C > 0:
        grid, block = _fin_grid(C)
        dummy = saved
        weight, bias, mean, var = _opt(weight), _opt(bias), _opt(mean), _opt(var)
        launch(_sbn_finalize_kernel, grid, src if src is not None else dummy,
               weight if weight is not None else dummy, bias if bias is not None else dummy,
               mean if mean is not None else dummy, var if var is not None else dummy,
               out_mean, out_var, saved, C, n_src, rank, float(N), float(eps) * hf2, f, f2, hf,
               hf2, H, W, SRC=src_kind, HAS_W=weight is not None, HAS_B=bias is not None,
               BLOCK=block, num_warps=4)
    return out_mean, out_var, saved


def sbn_stats(x):
    """rows (C, 8) float64 = [N, K, S1, S2, SR, SA, SD0, SD1] of this process's batch."""
    _check_x("sbn_stats", x)
    with _guard(x):
        part, n_chunks = _stats_pass(x)
        return _reduce_rows(part, n_chunks, x.shape[1], x.shape[0], True)


def _check_rows(op, rows_all, x):
    if not isinstance(rows_all, torch.Tensor) or rows_all.dim() != 3 or rows_all.shape[0] < 1 \
            or tuple(rows_all.shape[1:]) != (x.shape[1], 8):
        _fail(op, f"rows_all must be (P, C, 8) with P >= 1, C = {x.shape[1]}, got "
                  f"{tuple(getattr(rows_all, 'shape', ()))}")
    _check_t(op, "rows_all", rows_all, x, rows_all.shape, torch.float64)


def sbn_finish(x, rows_all, weight, bias, eps, fft_norm, act, act_param):
    """Statistics of the group from every process's rows, coefficients, apply:
    (y, batch_mean (C, 2), batch_var (C,), saved (C, 10))."""
    op = "sbn_finish"
    _check_x(op, x)
    C = x.shape[1]
    _check_rows(op, rows_all, x)
    _check_t(op, "weight", weight, x, (C,))
    _check_t(op, "bias", bias, x, (C,))
    _check_mode(op, fft_norm, act)
    with _guard(x):
        mean, var, saved = _sbn_finalize(x, rows_all.contiguous(), rows_all.shape[0], 0, weight,
                                         bias, None, None, eps, fft_norm, 1)
        y = _forward_apply(x, saved, act, act_param)
    return y, mean, var, saved


def sbn_forward(x, weight, bias, mean, var, eps, fft_norm, act, act_param):
    """Training (mean, var None): statistics pass, finalize, apply. Eval: finalize from mean
    (C, 2) / var (C,) (the fft_norm scale), apply. Returns (y, batch_mean (C, 2) acc,
    batch_var (C,) acc, saved (C, 10) float64)."""
    op = "sbn_forward"
    _check_x(op, x)
    C = x.shape[1]
    _check_t(op, "weight", weight, x, (C,))
    _check_t(op, "bias", bias, x, (C,))
    _check_mode(op, fft_norm, act)
    if (mean is None) != (var is None):
        _fail(op, "mean and var must both be given (eval) or both be None (training)")
    _check_t(op, "mean", mean, x, (C, 2))
    _check_t(op, "var", var, x, (C,))
    with _guard(x):
        if mean is None:
            part, n_chunks = _stats_pass(x)
            bm, bv, saved = _sbn_finalize(x, part, n_chunks, 0, weight, bias, None, None, eps,
                                          fft_norm, 0)
        else:
            bm, bv, saved = _sbn_finalize(x, None, 0, 0, weight, bias, mean, var, eps, fft_norm,
                                          2)
        y = _forward_apply(x, saved, act, act_param)
    return y, bm, bv, saved


def _check_saved(op, saved, x, cols):
    _check_t(op, "saved", saved, x, (x.shape[1], cols), torch.float64, optional=False)


def sbn_grad_stats(dy, x, saved, act, act_param):
    """gsums (C, 4) float64 = [sum g, sum g t, sum_n g[n,0,0], sum_{n,w} g[n,0,w] Pi[w]],
    g = act'(pre) dy, t = x - K; reads saved[:, :5] only (SBN and BN+SBN)."""
    op = "sbn_grad_stats"
    _check_x(op, x)
    _check_dy(op, dy, x)
    if not isinstance(saved, torch.Tensor) or saved.dim() != 2 or saved.shape[1] < 5:
        _fail(op, "saved must be (C, k >= 5) float64")
    _check_saved(op, saved, x, saved.shape[1])
    _check_act(op, act)
    with _guard(x):
        part, n_chunks = _grad_pass(dy, x, saved.contiguous(), act, act_param)
        return _reduce_rows(part, n_chunks, x.shape[1], x.shape[0], False)


def _sbn_bwd(dy, x, saved, src, all_sums, n_chunks, training, fft_norm, act, act_param,
             src_kind):
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    hf = _norm_factors(fft_norm, H, W)[2]
    coef = torch.empty((C, _NCOEF), dtype=torch.float64, device=x.device)
    dw = torch.empty((C,), dtype=acc, device=x.device)
    db = torch.empty((C,), dtype=acc, device=x.device)
    if C > 0:
        grid, block = _fin_grid(C)
        launch(_sbn_bwd_finalize_kernel, grid, src, all_sums if all_sums is not None else src,
               saved, coef, dw, db, C, n_chunks, hf, H, W, SRC=src_kind,
               TRAINING=bool(training), BLOCK=block, num_warps=4)
    dx = _backward_apply(dy, x, saved, coef, training, act, act_param)
    return dx, dw, db


def _check_gsums(op, g, x, name):
    _check_t(op, name, g, x, (x.shape[1], 4), torch.float64, optional=False)


def sbn_grad_finish(dy, x, saved, gsums_local, gsums_all, training, fft_norm, act, act_param):
    """(dx, dweight (C,) acc, dbias (C,) acc): dx from the group's gradient sums gsums_all,
    dweight/dbias this process's share (gsums_local)."""
    op = "sbn_grad_finish"
    _check_x(op, x)
    _check_dy(op, dy, x)
    _check_saved(op, saved, x, len(SBN_SAVED))
    _check_gsums(op, gsums_local, x, "gsums_local")
    _check_gsums(op, gsums_all, x, "gsums_all")
    _check_mode(op, fft_norm, act)
    with _guard(x):
        return _sbn_bwd(dy, x, saved.contiguous(), gsums_local.contiguous(),
                        gsums_all.contiguous(), 0, training, fft_norm, act, act_param, 1)


def sbn_backward(dy, x, saved, training, fft_norm, act, act_param):
    """Gradient sums, backward finalize, apply: (dx, dweight (C,) acc, dbias (C,) acc)."""
    op = "sbn_backward"
    _check_x(op, x)
    _check_dy(op, dy, x)
    _check_saved(op, saved, x, len(SBN_SAVED))
    _check_mode(op, fft_norm, act)
    saved = saved.contiguous()
    with _guard(x):
        part, n_chunks = _grad_pass(dy, x, saved, act, act_param)
        return _sbn_bwd(dy, x, saved, part, None, n_chunks, training, fft_norm, act, act_param, 0)


# ----------------------------------------------------------------------------------------------
# host: BN+SBN ops
# ----------------------------------------------------------------------------------------------


def _bnsbn_finalize(x, src, n_src, rank, bn_w, bn_b, sbn_w, sbn_b, bn_mean, bn_var, sbn_mean,
                    sbn_var, bn_eps, sbn_eps, fft_norm, src_kind):
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    dev = x.device
    f, f2, hf, hf2 = _norm_factors(fft_norm, H, W)
    outs = (torch.empty((C,), dtype=acc, device=dev), torch.empty((C,), dtype=acc, device=dev),
            torch.empty((C, 2), dtype=acc, device=dev), torch.empty((C,), dtype=acc, device=dev))
    saved = torch.empty((C, len(BNSBN_SAVED)), dtype=torch.float64, device=dev)
    if C > 0:
        grid, block = _fin_grid(C)
        ins = [_opt(t) for t in (bn_w, bn_b, sbn_w, sbn_b, bn_mean, bn_var, sbn_mean, sbn_var)]
        launch(_bnsbn_finalize_kernel, grid, src if src is not None else saved,
               *[t if t is not None else saved for t in ins], *outs, saved, C, n_src, rank,
               float(N), float(bn_eps), float(sbn_eps) * hf2, f, f2, hf, hf2, H, W,
               SRC=src_kind, HAS_BW=bn_w is not None, HAS_BB=bn_b is not None,
               HAS_SW=sbn_w is not None, HAS_SB=sbn_b is not None, ACC=_acc_tl(x.dtype),
               BLOCK=block, num_warps=4)
    return (*outs, saved)


def _check_bnsbn_params(op, x, bn_w, bn_b, sbn_w, sbn_b):
    C = x.shape[1]
    for name, t in (("bn_weight", bn_w), ("bn_bias", bn_b), ("sbn_weight", sbn_w),
                    ("sbn_bias", sbn_b)):
        _check_t(op, name, t, x, (C,))


def bnsbn_finish(x, rows_all, rank, bn_weight, bn_bias, sbn_weight, sbn_bias, bn_eps, sbn_eps,
                 fft_norm, act, act_param):
    """BN+SBN from every process's rows (rank: this process's row):
    (y, bn_mean, bn_var, sbn_mean (C, 2), sbn_var, saved (C, 26))."""
    op = "bnsbn_finish"
    _check_x(op, x)
    _check_rows(op, rows_all, x)
    if not 0 <= int(rank) < rows_all.shape[0]:
        _fail(op, f"rank {rank} is not a row of rows_all (P = {rows_all.shape[0]})")
    _check_bnsbn_params(op, x, bn_weight, bn_bias, sbn_weight, sbn_bias)
    _check_mode(op, fft_norm, act)
    with _guard(x):
        *stats, saved = _bnsbn_finalize(x, rows_all.contiguous(), rows_all.shape[0], int(rank),
                                        bn_weight, bn_bias, sbn_weight, sbn_bias, None, None,
                                        None, None, bn_eps, sbn_eps, fft_norm, 1)
        y = _forward_apply(x, saved, act, act_param)
    return (y, *stats, saved)


def bnsbn_forward(x, bn_weight, bn_bias, bn_mean, bn_var, sbn_weight, sbn_bias, sbn_mean,
                  sbn_var, bn_eps, sbn_eps, fft_norm, act, act_param):
    """BN then SBN in one statistics pass, one finalize and one apply (training), or finalize +
    apply from the four given statistics (eval; SBN's in the fft_norm scale). Returns
    (y, bn_mean, bn_var, sbn_mean (C, 2), sbn_var, saved (C, 26))."""
    op = "bnsbn_forward"
    _check_x(op, x)
    C = x.shape[1]
    _check_bnsbn_params(op, x, bn_weight, bn_bias, sbn_weight, sbn_bias)
    _check_mode(op, fft_norm, act)
    given = [t is not None for t in (bn_mean, bn_var, sbn_mean, sbn_var)]
    if any(given) and not all(given):
        _fail(op, "bn_mean, bn_var, sbn_mean, sbn_var must all be given (eval) or all be None")
    for name, t, shape in (("bn_mean", bn_mean, (C,)), ("bn_var", bn_var, (C,)),
                           ("sbn_mean", sbn_mean, (C, 2)), ("sbn_var", sbn_var, (C,))):
        _check_t(op, name, t, x, shape)
    with _guard(x):
        if bn_mean is None:
            part, n_chunks = _stats_pass(x)
            *stats, saved = _bnsbn_finalize(x, part, n_chunks, 0, bn_weight, bn_bias, sbn_weight,
                                            sbn_bias, None, None, None, None, bn_eps, sbn_eps,
                                            fft_norm, 0)
        else:
            *stats, saved = _bnsbn_finalize(x, None, 0, 0, bn_weight, bn_bias, sbn_weight,
                                            sbn_bias, bn_mean, bn_var, sbn_mean, sbn_var, bn_eps,
                                            sbn_eps, fft_norm, 2)
        y = _forward_apply(x, saved, act, act_param)
    return (y, *stats, saved)


def _bnsbn_bwd(dy, x, saved, src, all_sums, n_chunks, training, fft_norm, act, act_param,
               src_kind):
    N, C, H, W = x.shape
    acc = _acc(x.dtype)
    hf = _norm_factors(fft_norm, H, W)[2]
    coef = torch.empty((C, _NCOEF), dtype=torch.float64, device=x.device)
    grads = [torch.empty((C,), dtype=acc, device=x.device) for _ in range(4)]
    if C > 0:
        grid, block = _fin_grid(C)
        launch(_bnsbn_bwd_finalize_kernel, grid, src, all_sums if all_sums is not None else src,
               saved, coef, *grads, C, n_chunks, float(N), hf, H, W, SRC=src_kind,
               TRAINING=bool(training), BLOCK=block, num_warps=4)
    dx = _backward_apply(dy, x, saved, coef, training, act, act_param)
    return (dx, *grads)


def bnsbn_grad_finish(dy, x, saved, gsums_local, gsums_all, training, fft_norm, act, act_param):
    """(dx, dbn_weight, dbn_bias, dsbn_weight, dsbn_bias), (C,) acc each: dx from the group's
    sums, the parameter gradients this process's share."""
    op = "bnsbn_grad_finish"
    _check_x(op, x)
    _check_dy(op, dy, x)
    _check_saved(op, saved, x, len(BNSBN_SAVED))
    _check_gsums(op, gsums_local, x, "gsums_local")
    _check_gsums(op, gsums_all, x, "gsums_all")
    _check_mode(op, fft_norm, act)
    with _guard(x):
        return _bnsbn_bwd(dy, x, saved.contiguous(), gsums_local.contiguous(),
                          gsums_all.contiguous(), 0, training, fft_norm, act, act_param, 1)


def bnsbn_backward(dy, x, saved, training, fft_norm, act, act_param):
    """Gradient sums, backward finalize, apply: (dx, dbn_weight, dbn_bias, dsbn_weight,
    dsbn_bias), (C,) acc each."""
    op = "bnsbn_backward"
    _check_x(op, x)
    _check_dy(op, dy, x)
    _check_saved(op, saved, x, len(BNSBN_SAVED))
    _check_mode(op, fft_norm, act)
    saved = saved.contiguous()
    with _guard(x):
        part, n_chunks = _grad_pass(dy, x, saved, act, act_param)
        return _bnsbn_bwd(dy, x, saved, part, None, n_chunks, training, fft_norm, act, act_param,
                          0)


IMPL = {
    "sbn_stats": sbn_stats, "sbn_finish": sbn_finish, "sbn_forward": sbn_forward,
    "sbn_grad_stats": sbn_grad_stats, "sbn_grad_finish": sbn_grad_finish,
    "sbn_backward": sbn_backward, "bnsbn_finish": bnsbn_finish, "bnsbn_forward": bnsbn_forward,
    "bnsbn_grad_finish": bnsbn_grad_finish, "bnsbn_backward": bnsbn_backward,
}


# ----------------------------------------------------------------------------------------------
# registration as the CUDA kernels of the C++ schemas
# ----------------------------------------------------------------------------------------------

_LIBRARIES: dict = {}  # (namespace, device type) -> the torch.library.Library holding the kernels


def register_kernels(device_type: str = "cuda", namespace: str = "normkernels"):
    """Register every host function of IMPL as the ``device_type`` kernel of
    ``<namespace>::<name>``, onto the op schemas of csrc/sbn.cpp. A missing schema, or one whose
    arguments are not the function's, raises (a GPU call must never fall through to a kernel of
    another contract). Idempotent; returns the torch.library.Library that holds the kernels.

    normkernels/_backend.py registers them for "cuda" at import. For "cpu" (only with
    TRITON_INTERPRET=1) they replace the C++ CPU kernels, so that a CPU test runs the very path of
    a CUDA call: the C++ op and its C++ autograd, then these host functions, then the kernels in
    the interpreter (``on_cpu()``)."""
    import inspect
    key = (namespace, device_type)
    if key in _LIBRARIES:
        return _LIBRARIES[key]
    ns = getattr(torch.ops, namespace)
    lib = torch.library.Library(namespace, "IMPL")
    try:
        for name, fn in IMPL.items():
            try:
                schema = getattr(ns, name).default._schema
            except (AttributeError, RuntimeError):
                raise RuntimeError(f"register_kernels: {namespace}::{name} has no schema (is normkernels._C "
                                   "built?)") from None
            want, have = [a.name for a in schema.arguments], list(inspect.signature(fn).parameters)
            if want != have:
                raise RuntimeError(f"register_kernels: {namespace}::{name} takes ({', '.join(want)}) but its "
                                   f"Triton host function takes ({', '.join(have)})")
            lib.impl(name, fn, {"cuda": "CUDA", "cpu": "CPU"}[device_type])
    except BaseException:
        lib._destroy()
        raise
    _LIBRARIES[key] = lib
    return lib


@contextlib.contextmanager
def on_cpu(namespace: str = "normkernels"):
    """Within: the ops' CPU kernels are these host functions, run by the Triton interpreter
    (TRITON_INTERPRET=1), and backend "triton" takes CPU tensors; after: the C++ kernels again."""
    import os
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)")
    import warnings
    with warnings.catch_warnings():  # replacing the C++ CPU kernels is the point here
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
        lib = register_kernels("cpu", namespace)
    try:
        yield lib
    finally:
        _LIBRARIES.pop((namespace, "cpu"), None)
        lib._destroy()


def registered_on_cpu(namespace: str = "normkernels") -> bool:
    return (namespace, "cpu") in _LIBRARIES


class _FFTPlan:
    def __init__(self, Xr: torch.Tensor):
        N, C, H, Wr, _ = Xr.shape
        self.N, self.C, self.H, self.J2 = N, C, H, 2 * Wr
        # float64: half the elements of _tile_elems on 4 warps (the same 4 values a thread): the
        # 8-warp apply kept one 64-bit value in local memory under triton 3.6 / ptxas 12.8
        tile = _tile_elems(Xr.dtype) // (2 if Xr.dtype == torch.float64 else 1)
        bj = max(2, min(triton.next_power_of_2(self.J2), MAX_BW))   # even: re, im pairs
        bh = min(triton.next_power_of_2(H), max(1, tile // bj))
        bn = max(1, min(triton.next_power_of_2(max(N, 1)), tile // (bj * bh)))
        self.BN, self.BH, self.BJ = bn, bh, bj
        target = PROGRAMS_PER_SM * _sm_count(Xr.device)
        n_chunks = max(1, min(triton.cdiv(target, max(C, 1)), triton.cdiv(max(N, 1), bn)))
        self.n_per_chunk = triton.cdiv(triton.cdiv(max(N, 1), n_chunks), bn) * bn
        self.n_chunks = triton.cdiv(N, self.n_per_chunk)
        self.grid = (C, self.n_chunks)
        self.idx64 = Xr.numel() >= 2 ** 31
        self.num_warps = 8 if bn * bh * bj >= max(tile, 1024) else 4

    def consts(self, dtype):
        return dict(H=self.H, J2=self.J2, IDX64=self.idx64, ACC=_acc_tl(dtype), BN=self.BN,
                    BH=self.BH, BJ=self.BJ)


def _check_spectrum(op: str, t, name: str, like=None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 5 or t.shape[-1] != 2 \
            or t.dtype not in (torch.float32, torch.float64) or not t.is_contiguous():
        _fail(op, f"{name} must be a contiguous float32/float64 (N, C, H, Wr, 2) real view of a "
                  f"half spectrum, got {getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
    if like is not None and (t.shape != like.shape or t.dtype != like.dtype
                             or t.device != like.device):
        _fail(op, f"{name} must match Xr's shape, dtype and device")


def sbn_fft_spectral_forward(Xr, weight, bias, stats, eps):
    """Xr: contiguous (N, C, H, Wr, 2) real view of X = rfft2(x, norm=fft_norm) (fp32/fp64).
    Returns (Yr, stats (C, 3) = [Re mu, Im mu, var] in Xr's dtype), Y = gamma (X - mu) /
    sqrt(var + eps) + beta, y = irfft2(Y, s=(H, W), norm=fft_norm); the statistics are those of
    the fft_norm-scaled spectrum. stats given (eval) are used instead of batch statistics."""
    op = "sbn_fft_forward"
    _check_spectrum(op, Xr, "Xr")
    N, C, H, Wr, _ = Xr.shape
    for name, t in (("weight", weight), ("bias", bias)):
        _check_t(op, name, t, Xr, (C,))
    _check_t(op, "stats", stats, Xr, (C, 3))
    acc = Xr.dtype
    train = stats is None
    with _guard(Xr):
        st = torch.empty((C, 3), device=Xr.device, dtype=acc) if train else stats.to(acc).contiguous()
        Y = torch.empty_like(Xr)
        if Xr.numel() == 0:
            return Y, st
        plan = _FFTPlan(Xr)
        part = torch.empty((max(plan.n_chunks, 1), 3, C), dtype=torch.float64, device=Xr.device)
        if train:
            launch(_fft_stats_kernel, plan.grid, Xr, part, C, N, plan.n_per_chunk,
                   num_warps=plan.num_warps, **plan.consts(acc))
        weight, bias = _opt(weight), _opt(bias)
        launch(_fft_apply_kernel, plan.grid, Xr, Y, part, st,
               weight if weight is not None else st, bias if bias is not None else st, C, N,
               plan.n_chunks, plan.n_per_chunk, 1.0 / max(N * H * Wr, 1), float(eps),
               TRAIN=train, HAS_W=weight is not None, HAS_B=bias is not None,
               num_warps=plan.num_warps, **plan.consts(acc))
    return Y, st


def sbn_fft_spectral_backward(Gr, Xr, weight, stats, eps, W, training, fft_norm="backward"):
    """Gr, Xr: contiguous real views of rfft2(dy, norm=fft_norm) and rfft2(x, norm=fft_norm);
    stats (C, 3) the forward's. Returns (O, grads (C, 2) = [dgamma, dbeta]) with
    dx = irfft2(O, s=(H, W), norm=fft_norm)."""
    op = "sbn_fft_backward"
    _check_spectrum(op, Xr, "Xr")
    _check_spectrum(op, Gr, "Gr", like=Xr)
    N, C, H, Wr, _ = Xr.shape
    if Wr != int(W) // 2 + 1:
        _fail(op, f"W = {W} does not match the half spectrum's Wr = {Wr}")
    if fft_norm not in FFT_NORMS:
        _fail(op, f"fft_norm must be one of {FFT_NORMS}, got {fft_norm!r}")
    _check_t(op, "weight", weight, Xr, (C,))
    _check_t(op, "stats", stats, Xr, (C, 3), optional=False)
    acc = Xr.dtype
    f2 = _norm_factors(fft_norm, H, int(W))[1]
    r = 1.0 / (H * int(W) * f2)
    with _guard(Xr):
        O = torch.empty_like(Xr)
        grads = torch.empty((C, 2), device=Xr.device, dtype=acc)
        st = stats.to(acc).contiguous()
        if Xr.numel() == 0:
            return O, grads.zero_()
        plan = _FFTPlan(Xr)
        part = torch.empty((max(plan.n_chunks, 1), 3, C), dtype=torch.float64, device=Xr.device)
        launch(_fft_grad_stats_kernel, plan.grid, Gr, Xr, part, st, C, N, plan.n_per_chunk, r,
               float(eps), W=int(W), num_warps=plan.num_warps, **plan.consts(acc))
        weight = _opt(weight)
        launch(_fft_grad_apply_kernel, plan.grid, Gr, Xr, O, part, st,
               weight if weight is not None else st, grads, C, N, plan.n_chunks,
               plan.n_per_chunk, 1.0 / max(N * H * Wr, 1), r, 1.0 / r, float(eps), W=int(W),
               TRAIN=bool(training), HAS_W=weight is not None, num_warps=plan.num_warps,
               **plan.consts(acc))
    return O, grads
