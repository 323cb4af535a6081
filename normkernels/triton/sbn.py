"""The CUDA implementation of the SBN family's ops in Triton: host functions, one per op
(kernels: normkernels/triton/sbn_kernels.py; math and GPU design notes in its docstring).

What is here
------------
* The host functions of the ops of csrc/sbn.cpp, one per op, with exactly the C++ schemas'
  arguments (``IMPL``: name -> function; ``register_kernels()`` registers them as the CUDA
  kernels of ``normkernels::<name>``, raising on a schema mismatch). BN+SBN is the op; SBN is it
  with the BN stage off (``bn=False``: BN's outputs are empty (0,) tensors). Autograd is the ops'
  own (csrc/autograd): under TRITON_INTERPRET=1, ``on_cpu()`` makes these functions the ops' CPU
  kernels, so tests run a CUDA call's whole path on CPU tensors.
* The literal FFT path's spectral passes (``sbn_fft_spectral_forward`` / ``_backward``).

Inputs are validated once, in normkernels/functional.py; here only what would otherwise launch a
kernel that reads or writes out of bounds, or on another device, is checked (``_operands``).
Every launch goes through ``normkernels.triton.launch.launch`` and every host function runs on
meta tensors (no .item(), no data-dependent host logic), so tests can enumerate the kernels'
specialisations for real shapes without a GPU.

Launches per call (the running-statistics update is its own op: one more launch per buffer set).
The finalize (statistics, coefficients) runs in the prologue of the apply kernel's programs:
  sbn_forward training: statistics pass, finalize + apply (2); eval: finalize + apply (1);
  sbn_backward (training or eval): gradient sums pass, finalize + apply (2);
  the synchronized pieces: sbn_stats and sbn_grad_stats: pass + reduction of the partials (2),
  sbn_finish and sbn_grad_finish: finalize + apply (1); an empty local batch skips its passes
  (its finish still launches, for the statistics and its share of the parameter gradients).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from normkernels.ops._act import ACTS
from normkernels.ops.sbn_layout import FFT_NORMS, GSUMS, ROWS, SAVED
from normkernels.triton.launch import launch, multiprocessor_count
from normkernels.triton.sbn_kernels import (
    _NG,
    _NS,
    _backward_kernel,
    _fft_apply_kernel,
    _fft_grad_apply_kernel,
    _fft_grad_stats_kernel,
    _fft_stats_kernel,
    _forward_kernel,
    _grad_stats_kernel,
    _rows_kernel,
    _stats_kernel,
)

__all__ = [
    "sbn_stats", "sbn_finish", "sbn_forward", "sbn_grad_stats", "sbn_grad_finish", "sbn_backward",
    "IMPL", "register_kernels", "on_cpu", "registered_on_cpu", "sbn_fft_spectral_forward",
    "sbn_fft_spectral_backward", "FFT_NORMS",
]

# ----------------------------------------------------------------------------------------------
# host: constants, tiling
# ----------------------------------------------------------------------------------------------

_ACT_CODE = {name: i for i, name in enumerate(ACTS)}
_CONSTS: dict = {}

# where the statistics of a finalize come from (the kernels' SRC)
_FROM_PARTIALS, _FROM_GROUP, _GIVEN = 0, 1, 2

# Tuning knobs (tests shrink them to reach several chunks and tiled rows on small inputs).
PROGRAMS_PER_SM = 8          # statistics/apply programs aimed at per multiprocessor
MIN_TILES_PER_CHUNK = 4      # a chunk is at least this many tiles of rows
MAX_BW = 1024                # longest row held in one tile; longer rows are tiled
TILE = 2048                  # elements per tile (float64: half as many, the same registers)
FINALIZE_BLOCK = 128         # channels per program of the partials' reduction


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _operands(x: torch.Tensor, *named) -> None:
    """The minimal internal assertion (inputs are validated in normkernels/functional.py): x is
    (N, C, H, W) and each (name, tensor, shape) given (not None) has that shape and x's device,
    so that no launch reads out of bounds or on another device."""
    if x.dim() != 4:
        raise RuntimeError(f"normkernels (triton): x must be (N, C, H, W), got {tuple(x.shape)}")
    for name, t, shape in named:
        if t is not None and (t.shape != shape or t.device != x.device):
            raise RuntimeError(f"normkernels (triton): {name} must be {tuple(shape)} on {x.device}, "
                               f"got {tuple(t.shape)} on {t.device}")


def _scales(fft_norm: str, H: int, W: int) -> tuple[float, float]:
    """(f, h): f the forward transform's scale under fft_norm, h = 1/f."""
    hw = float(H * W)
    if fft_norm == "ortho":
        return 1.0 / math.sqrt(hw), math.sqrt(hw)
    if fft_norm == "forward":
        return 1.0 / hw, hw
    return 1.0, 1.0


def _row_consts(W: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(3, W) [Re D, Im D, Pi[0, :]] in ``dtype`` on ``device``, cached: D(w) = sum_{l < Wr}
    exp(-2 pi i l w / W) (the DFT of the indicator of l < Wr), Pi[0, :] = irfft(1j * ones(Wr), W)
    = -(2/W) sum_{0 < l < W/2} sin(2 pi l w / W) (irfft drops the imaginary parts of the bins l = 0
    and l = W/2). Pr[0, :] = irfft(ones) = delta_w0 is used as such by the kernels. Computed on
    the device itself (no copy from pageable host memory: a first call may run inside CUDA graph
    capture); tests/test_sbn_triton.py checks them against the oracle's torch.fft derivation."""
    key = (W, device, dtype)
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
        # the finalize + apply kernels: every channel's programs, at least one (an empty batch)
        self.grid_at_least_one = (self.c_blocks, max(self.n_chunks, 1))
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


# ----------------------------------------------------------------------------------------------
# host: passes
# ----------------------------------------------------------------------------------------------


def _stats_pass(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-chunk partials (n_chunks, 7, C) float64 of this process's statistics."""
    plan = _plan(x)
    C = x.shape[1]
    # (one row at least: no null pointer handed to a launch)
    partials = torch.empty((max(plan.n_chunks, 1), _NS, C), dtype=torch.float64, device=x.device)
    if plan.n_chunks > 0 and C > 0:
        layout = _layout(x)
        launch(_stats_kernel, plan.grid, x, _row_consts(plan.W, x.device, _acc(x.dtype)),
               partials, C, plan.NH, plan.rows, *_strides(x, layout), X_LAYOUT=layout,
               num_warps=plan.num_warps, **plan.consts(x))
    return partials, plan.n_chunks


def _grad_pass(dy, x, saved, act: str, act_param: float) -> tuple[torch.Tensor, int]:
    """Per-chunk partials (n_chunks, 4, C) float64 of this process's gradient sums."""
    plan = _plan(x, dy)
    C = x.shape[1]
    partials = torch.empty((max(plan.n_chunks, 1), _NG, C), dtype=torch.float64, device=x.device)
    if plan.n_chunks > 0 and C > 0:
        x_layout, dy_layout = _layout(x), _layout(dy)
        launch(_grad_stats_kernel, plan.grid, dy, x, saved,
               _row_consts(plan.W, x.device, _acc(x.dtype)), partials, C, plan.NH, plan.rows,
               float(act_param), _ACT_CODE[act], *_strides(x, x_layout),
               *_strides(dy, dy_layout), X_LAYOUT=x_layout, DY_LAYOUT=dy_layout,
               num_warps=plan.num_warps, **plan.consts(x))
    return partials, plan.n_chunks


def _reduce_partials(partials: torch.Tensor, n_chunks: int, x: torch.Tensor, stats: bool):
    """This process's partials reduced to its rows (C, 8) (stats) or gradient sums (C, 4)."""
    C = x.shape[1]
    out = torch.empty((C, len(ROWS) if stats else len(GSUMS)), dtype=torch.float64,
                      device=x.device)
    if C > 0:
        block = max(16, min(FINALIZE_BLOCK, triton.next_power_of_2(C)))
        launch(_rows_kernel, (triton.cdiv(C, block),), partials, out, n_chunks, C,
               float(x.shape[0]), STATS=stats, BLOCK=block, num_warps=4)
    return out


def _forward(x, kind, source, n_source, rank, bn, bn_weight, bn_bias, sbn_weight, sbn_bias,
             given_stats, bn_eps, sbn_eps, fft_norm, act, act_param):
    """One launch: the finalize in the prologue of the apply, its statistics from ``source``
    (kind _FROM_PARTIALS: this process's partials over ``n_source`` chunks; _FROM_GROUP: every
    process's rows, ``n_source`` processes, this one ``rank``) or, kind _GIVEN (eval), from
    ``given_stats`` = (bn_mean, bn_var, sbn_mean, sbn_var). Returns (y, bn_mean, bn_var,
    sbn_mean, sbn_var, saved)."""
    N, C, H, W = x.shape
    acc, device = _acc(x.dtype), x.device
    y = _empty_like(x)
    bn_mean = torch.empty((C if bn else 0,), dtype=acc, device=device)
    bn_var = torch.empty((C if bn else 0,), dtype=acc, device=device)
    sbn_mean = torch.empty((C, 2), dtype=acc, device=device)
    sbn_var = torch.empty((C,), dtype=acc, device=device)
    saved = torch.empty((C, len(SAVED)), dtype=torch.float64, device=device)
    if C > 0:
        plan = _plan(x, y)
        f, hf = _scales(fft_norm, H, W)
        inputs = [saved if t is None else t.contiguous()          # (None: an unread stand-in)
                  for t in (source, bn_weight, bn_bias, sbn_weight, sbn_bias, *given_stats)]
        x_layout = _layout(x)
        empty = N == 0          # the prologue only (and no null pointer handed to a launch)
        launch(_forward_kernel, plan.grid_at_least_one, saved if empty else x,
               saved if empty else y, _row_consts(W, device, acc), *inputs,
               bn_mean if bn else saved, bn_var if bn else saved, sbn_mean, sbn_var, saved,
               C, plan.NH, plan.rows, n_source, rank, float(N), float(bn_eps),
               float(sbn_eps) * hf * hf, f, hf, float(act_param), _ACT_CODE[act],
               *_strides(x, x_layout), X_LAYOUT=1 if empty else x_layout,
               Y_LAYOUT=1 if empty else _layout(y), SRC=kind, BN=bool(bn),
               HAS_BW=bn_weight is not None, HAS_BB=bn_bias is not None,
               HAS_SW=sbn_weight is not None, HAS_SB=sbn_bias is not None,
               num_warps=plan.num_warps, **plan.consts(x))
    return y, bn_mean, bn_var, sbn_mean, sbn_var, saved


def _backward(dy, x, saved, kind, local_sums, group_sums, n_source, bn, training, fft_norm, act,
              act_param):
    """One launch: the backward finalize in the prologue of the apply; the gradient sums from
    this process's partials over ``n_source`` chunks (kind _FROM_PARTIALS, ``group_sums`` None)
    or from gsums_local / gsums_all (kind _FROM_GROUP). Returns (dx, dbn_weight, dbn_bias,
    dsbn_weight, dsbn_bias)."""
    N, C, H, W = x.shape
    acc, device = _acc(x.dtype), x.device
    dx = _empty_like(x)
    grads = [torch.empty((C if bn else 0,), dtype=acc, device=device) for _ in range(2)]
    grads += [torch.empty((C,), dtype=acc, device=device) for _ in range(2)]
    if C > 0:
        plan = _plan(x, dy, dx)
        x_layout, dy_layout = _layout(x), _layout(dy)
        empty = N == 0          # the prologue only (and no null pointer handed to a launch)
        launch(_backward_kernel, plan.grid_at_least_one, saved if empty else dy,
               saved if empty else x, saved if empty else dx, saved,
               _row_consts(W, device, acc), local_sums,
               local_sums if group_sums is None else group_sums,
               *[g if bn else saved for g in grads[:2]], *grads[2:], C, plan.NH, plan.rows,
               n_source, float(N), _scales(fft_norm, H, W)[1], float(act_param),
               _ACT_CODE[act], *_strides(x, x_layout), *_strides(dy, dy_layout),
               X_LAYOUT=1 if empty else x_layout, DY_LAYOUT=1 if empty else dy_layout,
               DX_LAYOUT=1 if empty else _layout(dx), SRC=kind, BN=bool(bn),
               TRAINING=bool(training), num_warps=_backward_warps(plan, x, training),
               **plan.consts(x))
    return (dx, *grads)


def _backward_warps(plan: _Plan, x: torch.Tensor, training: bool) -> int:
    """The training backward apply in float64 holds ~11 float64 coefficients a channel besides
    its finalize: on 8 warps ptxas capped it at 64-128 registers and kept a value or a mask in
    local memory (some inside the element loop); the same tile on 4 warps (8 values a thread)
    gets the registers it needs."""
    if training and _acc(x.dtype) == torch.float64:
        return min(plan.num_warps, 4)
    return plan.num_warps


# ----------------------------------------------------------------------------------------------
# host: the ops (csrc/sbn.cpp), one function each, the schemas' arguments
# ----------------------------------------------------------------------------------------------


def _params(x, bn_weight, bn_bias, sbn_weight, sbn_bias):
    C = x.shape[1]
    return (("bn_weight", bn_weight, (C,)), ("bn_bias", bn_bias, (C,)),
            ("sbn_weight", sbn_weight, (C,)), ("sbn_bias", sbn_bias, (C,)))


def sbn_stats(x):
    """rows (C, 8) float64 = [N, K, S1, S2, SR, SA, SD0, SD1] of this process's batch."""
    _operands(x)
    with _guard(x):
        partials, n_chunks = _stats_pass(x)
        return _reduce_partials(partials, n_chunks, x, stats=True)


def sbn_finish(x, rows_all, rank, bn, bn_weight, bn_bias, sbn_weight, sbn_bias, bn_eps, sbn_eps,
               fft_norm, act, act_param):
    """The group's statistics from every process's rows (rank: this process's row), the
    coefficients and the apply, in one launch: (y, bn_mean, bn_var, sbn_mean (C, 2), sbn_var,
    saved (C, 26))."""
    _operands(x, ("rows_all", rows_all, (rows_all.shape[0], x.shape[1], len(ROWS))),
              *_params(x, bn_weight, bn_bias, sbn_weight, sbn_bias))
    with _guard(x):
        return _forward(x, _FROM_GROUP, rows_all, rows_all.shape[0], int(rank), bn, bn_weight,
                        bn_bias, sbn_weight, sbn_bias, (None,) * 4, bn_eps, sbn_eps, fft_norm,
                        act, act_param)


def sbn_forward(x, bn, bn_weight, bn_bias, bn_mean, bn_var, sbn_weight, sbn_bias, sbn_mean,
                sbn_var, bn_eps, sbn_eps, fft_norm, act, act_param):
    """Training (statistics None): statistics pass, then finalize + apply. Eval (statistics
    given, SBN's in the fft_norm scale): finalize + apply. Returns (y, bn_mean, bn_var,
    sbn_mean (C, 2), sbn_var, saved (C, 26))."""
    C = x.shape[1]
    _operands(x, *_params(x, bn_weight, bn_bias, sbn_weight, sbn_bias),
              ("bn_mean", bn_mean, (C,)), ("bn_var", bn_var, (C,)),
              ("sbn_mean", sbn_mean, (C, 2)), ("sbn_var", sbn_var, (C,)))
    with _guard(x):
        if sbn_mean is None:
            partials, n_chunks = _stats_pass(x)
            return _forward(x, _FROM_PARTIALS, partials, n_chunks, 0, bn, bn_weight, bn_bias,
                            sbn_weight, sbn_bias, (None,) * 4, bn_eps, sbn_eps, fft_norm, act,
                            act_param)
        return _forward(x, _GIVEN, None, 0, 0, bn, bn_weight, bn_bias, sbn_weight, sbn_bias,
                        (bn_mean, bn_var, sbn_mean, sbn_var), bn_eps, sbn_eps, fft_norm, act,
                        act_param)


def _saved_operands(x, dy, saved, *named):
    _operands(x, ("dy", dy, x.shape), ("saved", saved, (x.shape[1], len(SAVED))), *named)


def sbn_grad_stats(dy, x, saved, act, act_param):
    """gsums (C, 4) float64 = [sum g, sum g t, sum_n g[n,0,0], sum_{n,w} g[n,0,w] Pi[w]],
    g = act'(pre) dy, t = x - K; reads saved[:, :5] only."""
    _saved_operands(x, dy, saved)
    with _guard(x):
        partials, n_chunks = _grad_pass(dy, x, saved.contiguous(), act, act_param)
        return _reduce_partials(partials, n_chunks, x, stats=False)


def sbn_grad_finish(dy, x, saved, gsums_local, gsums_all, bn, training, fft_norm, act,
                    act_param):
    """(dx, dbn_weight, dbn_bias, dsbn_weight, dsbn_bias), (C,) acc each ((0,) BN's with the BN
    stage off), in one launch: dx from the group's gradient sums, the parameter gradients this
    process's share."""
    shape = (x.shape[1], len(GSUMS))
    _saved_operands(x, dy, saved, ("gsums_local", gsums_local, shape),
                    ("gsums_all", gsums_all, shape))
    with _guard(x):
        return _backward(dy, x, saved.contiguous(), _FROM_GROUP, gsums_local.contiguous(),
                         gsums_all.contiguous(), 0, bn, training, fft_norm, act, act_param)


def sbn_backward(dy, x, saved, bn, training, fft_norm, act, act_param):
    """Gradient sums pass, then backward finalize + apply: (dx, dbn_weight, dbn_bias,
    dsbn_weight, dsbn_bias), (C,) acc each ((0,) BN's with the BN stage off)."""
    _saved_operands(x, dy, saved)
    saved = saved.contiguous()
    with _guard(x):
        partials, n_chunks = _grad_pass(dy, x, saved, act, act_param)
        return _backward(dy, x, saved, _FROM_PARTIALS, partials, None, n_chunks, bn, training,
                         fft_norm, act, act_param)


IMPL = {
    "sbn_stats": sbn_stats, "sbn_finish": sbn_finish, "sbn_forward": sbn_forward,
    "sbn_grad_stats": sbn_grad_stats, "sbn_grad_finish": sbn_grad_finish,
    "sbn_backward": sbn_backward,
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


def _spectrum_operands(Xr, *named) -> None:
    """The minimal internal assertion of the FFT passes (their caller, normkernels/ops/sbn_fft.py,
    builds the spectra): Xr a contiguous (N, C, H, Wr, 2) view (the kernels compute offsets from
    its sizes), each (name, tensor, shape) given of that shape on Xr's device."""
    if Xr.dim() != 5 or Xr.shape[-1] != 2 or not Xr.is_contiguous():
        raise RuntimeError(f"normkernels (triton): Xr must be a contiguous (N, C, H, Wr, 2) real view of a "
                           f"half spectrum, got shape {tuple(Xr.shape)}")
    for name, t, shape in named:
        if t is not None and (t.shape != shape or t.device != Xr.device or
                              (t.dim() == 5 and not t.is_contiguous())):
            raise RuntimeError(f"normkernels (triton): {name} must be {tuple(shape)} on {Xr.device}")


def sbn_fft_spectral_forward(Xr, weight, bias, stats, eps):
    """Xr: contiguous (N, C, H, Wr, 2) real view of X = rfft2(x, norm=fft_norm) (fp32/fp64).
    Returns (Yr, stats (C, 3) = [Re mu, Im mu, var] in Xr's dtype), Y = gamma (X - mu) /
    sqrt(var + eps) + beta, y = irfft2(Y, s=(H, W), norm=fft_norm); the statistics are those of
    the fft_norm-scaled spectrum. stats given (eval) are used instead of batch statistics."""
    N, C, H, Wr, _ = Xr.shape
    _spectrum_operands(Xr, ("weight", weight, (C,)), ("bias", bias, (C,)), ("stats", stats, (C, 3)))
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
        weight = None if weight is None else weight.contiguous()
        bias = None if bias is None else bias.contiguous()
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
    N, C, H, Wr, _ = Xr.shape
    _spectrum_operands(Xr, ("Gr", Gr, Xr.shape), ("weight", weight, (C,)), ("stats", stats, (C, 3)))
    acc = Xr.dtype
    f = _scales(fft_norm, H, int(W))[0]
    f2 = f * f
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
        weight = None if weight is None else weight.contiguous()
        launch(_fft_grad_apply_kernel, plan.grid, Gr, Xr, O, part, st,
               weight if weight is not None else st, grads, C, N, plan.n_chunks,
               plan.n_per_chunk, 1.0 / max(N * H * Wr, 1), r, 1.0 / r, float(eps), W=int(W),
               TRAIN=bool(training), HAS_W=weight is not None, num_warps=plan.num_warps,
               **plan.consts(acc))
    return O, grads
