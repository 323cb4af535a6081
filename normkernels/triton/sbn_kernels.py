"""Triton kernels of the SBN family (BN+SBN, and SBN as BN+SBN with the BN stage off: the ops of
csrc/sbn.cpp); their host functions (the ops' CUDA kernels) are in normkernels/triton/sbn.py.

Kernels (launches per call: sbn.py's docstring)
-----------------------------------------------
* ``_stats_kernel``: per-chunk partial sums of x (no atomics).
* ``_grad_stats_kernel``: per-chunk partial gradient sums of (dy, x).
* ``_rows_kernel``: this process's partials reduced to rows / gradient sums (the synchronized
  path's pieces sbn_stats and sbn_grad_stats).
* ``_forward_kernel``: forward finalize + apply. Each program first computes, in float64, the
  statistics and apply coefficients of its channels (``_forward_finalize``: from this process's
  partials, from every process's rows, or from given statistics in eval), then applies them to
  its rows; the programs of chunk 0 write the statistics and ``saved``.
* ``_backward_kernel``: backward finalize + apply, the same way (``_backward_finalize``: the dx
  coefficients from the group's gradient sums and ``saved``; chunk 0 writes the parameter
  gradients, this process's share).
The finalize is per channel and reads the partials in chunk order, so every program of a channel
computes bit-identical coefficients (deterministic, no grid synchronisation), and the finalize of
a separate kernel launch costs a few hundred float64 operations per program instead. ``BN`` (a
constexpr) turns the BN stage on: each formula is written once, for BN+SBN; the BN stage off is
p = 1, sd = 1, Kz = K, mbn = K (compile-time constants: the multiplications fold away).
The literal FFT path's spectral kernels are at the end.

The math (shifted sums; ops/sbn_oracle.py's module docstring has the derivation)
------------------------------------------------------------------------
Per channel, t = x - K with K = x[0, c, 0, 0] (eval: BN's mean with the BN stage on, else 0);
rows are (n, h); R = sum_w t, A = sum_w (-1)^w t.
Statistics pass: S1 = sum t, S2 = sum t^2, SR = sum R^2, SA = sum A^2 (0 for odd W),
SD0 / SD1 = sum_{n,w} t[n, 0, w] Re D(w) / Im D(w), D(w) = sum_{l < W//2+1} exp(-2 pi i l w / W).
BN stage: z = p t + Kz; SBN's statistics of z follow from the same sums (sum (z - Kz) = p S1,
sum (z - Kz)^2 = p^2 S2, SR and SA scale by p^2, SD by p).
Forward apply: pre = cx (x - K) + b off row 0; on row 0: + u at w = 0 (in place of b) and
b + v Pi[w] elsewhere (Pr[0, :] = delta_w0 exactly, Pi = irfft(1j*ones)); y = act(pre).
Gradient sums: g = act'(pre) dy with pre recomputed by the same helper: [sum g, sum g t,
sum_n g[n, 0, 0], sum_{n,w} g[n, 0, w] Pi[w]].
Backward apply: dx = cx g + c_t t + c_R R + c_A A (-1)^w + cst + [h == 0](u' Re D + v' Im D).

fft_norm (torch.fft's norm of the transform pair), f = 1, 1/sqrt(HW), 1/(HW) and h = 1/f: the
m-normalized layer irfft2(gamma (X_m - mu_m)/sqrt(var_m + eps) + beta, norm=m), X_m = f X, equals
the "backward" formulas with eps_eff = eps/f^2, gamma_eff = h gamma and beta_eff = h beta (the
inverse transform of mode m is h times the "backward" one, and it scales gamma's term too):
s = sqrt(var + eps_eff), a = h gamma / s (= gamma / sqrt(var_m + eps)). Statistics are reported
in the m scale (f mu, f^2 var; eval inputs are divided back); dgamma = h Ga / s, dbeta = h G0.

GPU design notes
----------------
* Tiles are [BR rows, BW columns, BC channels]: NCHW-like inputs use BC = 1 (a program per channel
  and chunk of rows, loads along W), channels_last inputs BC > 1 (loads along C, the contiguous
  dimension). The map size (H, W) is constexpr: (n, h) = divmod(row, H) is an int32 division by a
  constant (a multiply-high), never a call of a 64-bit division routine; offsets are int32 unless
  the tensor spans 2^31 elements (IDX64). Contiguous and channels_last operands compute their
  offsets from (C, H, W) so that the compiler knows the alignment (16-byte loads where W or C
  allows); other strided views pass their strides.
* The finalize in a pass's prologue divides and takes square roots in float64 without the IEEE
  div.rn.f64 / sqrt.rn.f64 sequences (their slow-path calls would put the registers live around
  them in local memory): ``_rcp64`` and ``_rsqrt64`` (a float32 seed, two Newton steps, ~1 ulp).
* Launches run under ``torch.cuda.device(x.device)``; the multiprocessor count is cached; the row
  constants (D(w), Pi) are cached per (W, device, dtype).
"""

from __future__ import annotations

import triton
import triton.language as tl

from normkernels.ops.sbn_layout import COL, FFT_NORMS, GSUMS, ROWS, SAVED, SUMS  # noqa: F401

_NS = 1 + len(SUMS)   # statistics partials per chunk: [K, S1, S2, SR, SA, SD0, SD1]
_NG = len(GSUMS)      # gradient partials per chunk: [sum g, sum g t, G0, G1]

# The layouts as constexprs the kernels can read (the column indices of normkernels/ops/sbn_layout.py)
NSAVED = tl.constexpr(len(SAVED))
NROWS = tl.constexpr(len(ROWS))
NGSUMS = tl.constexpr(len(GSUMS))
SV_SHIFT = tl.constexpr(COL["shift"])
SV_X_SCALE = tl.constexpr(COL["x_scale"])
SV_OFFSET = tl.constexpr(COL["offset"])
SV_PR = tl.constexpr(COL["pr_coef"])
SV_PI = tl.constexpr(COL["pi_coef"])
SV_BN_SCALE = tl.constexpr(COL["bn_scale"])
SV_BN_STD = tl.constexpr(COL["bn_std"])
SV_Z_SHIFT = tl.constexpr(COL["z_shift"])
SV_MEAN_RE = tl.constexpr(COL["mean_re"])
SV_MEAN_IM = tl.constexpr(COL["mean_im"])
SV_SBN_STD = tl.constexpr(COL["sbn_std"])
SV_SBN_SCALE = tl.constexpr(COL["sbn_scale"])
SV_BN_MEAN = tl.constexpr(COL["bn_mean"])
SV_COUNT = tl.constexpr(COL["count"])
SV_SUMS = tl.constexpr(COL["sum_t"])          # the group's six sums, in SUMS order
SV_LOCAL = tl.constexpr(COL["local_sum_t"])   # this process's six sums
ROW_COUNT = tl.constexpr(ROWS.index("count"))
ROW_SHIFT = tl.constexpr(ROWS.index("shift"))
ROW_SUMS = tl.constexpr(ROWS.index("sum_t"))

# ----------------------------------------------------------------------------------------------
# device helpers: activation, offsets, row-0 term
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(pre):
    """1 / (1 + exp(-pre)) from z = exp(-|pre|) in (0, 1]: 1 / (1 + z) for pre >= 0, z / (1 + z)
    below (one exponential, a denominator in (1, 2]; -inf gives 0, NaN stays NaN). In float64 the
    reciprocal comes from a float32 seed and two Newton steps (~1 ulp): an IEEE float64 division
    calls a slow-path routine, and the registers saved around that call are spills (local
    memory) in every pass that holds the activation."""
    z = tl.exp(-tl.abs(pre))
    d = 1.0 + z
    if pre.dtype == tl.float64:
        r = (1.0 / d.to(tl.float32)).to(tl.float64)
        r = r * (2.0 - d * r)
        r = r * (2.0 - d * r)
    else:
        r = 1.0 / d
    return tl.where(pre >= 0, r, z * r)


@triton.jit
def _rsqrt64(v):
    """1 / sqrt(v) of float64 values without the slow-path calls of sqrt.rn / div.rn.f64 (see
    _sigmoid): v = m 2^e (e even) scaled exactly to m in [0.25, 4), a float32 seed, two Newton
    steps (~1 ulp), times 2^(-e/2). v = 0 gives inf, inf gives 0, NaN stays NaN."""
    e = ((v.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023
    e = tl.minimum(tl.maximum(e, -1000), 1000) & -2
    m = v * ((1023 - e) << 52).to(tl.float64, bitcast=True)
    y = tl.rsqrt(m.to(tl.float32)).to(tl.float64)
    h = 0.5 * m
    y = y * (1.5 - h * y * y)
    y = y * (1.5 - h * y * y)
    y = y * ((1023 - e // 2) << 52).to(tl.float64, bitcast=True)
    return tl.where(v == 0, float("inf"), tl.where(v == float("inf"), 0.0, y))


@triton.jit
def act_forward(pre, slope, act):
    """act(pre); act: 0 identity, 1 relu, 2 leaky_relu (slope), 3 silu (csrc/activation.h). A
    runtime argument, uniform over the grid: a branch per tile, one compiled kernel for all four."""
    if act == 1:
        out = tl.where(pre < 0, 0.0, pre)            # NaN stays NaN, as torch.relu
    elif act == 2:
        out = tl.where(pre > 0, pre, pre * slope)
    elif act == 3:
        out = pre * _sigmoid(pre)
    else:
        out = pre
    return out


@triton.jit
def act_backward(pre, dy, slope, act):
    """act'(pre) * dy with torch's values at the kink: relu'(0) = 0, leaky_relu'(0) = slope."""
    if act == 1:
        g = tl.where(pre > 0, dy, 0.0)
    elif act == 2:
        g = tl.where(pre > 0, dy, dy * slope)
    elif act == 3:
        s = _sigmoid(pre)
        g = dy * s * (1.0 + pre * (1.0 - s))
    else:
        g = dy
    return g


@triton.jit
def _f64(v):
    """A float64 scalar argument as a float64 value (the interpreter passes a python float)."""
    return tl.zeros([], tl.float64) + v


@triton.jit
def _offsets(n, h, w, c, C, sN, sC, sH, sW, H: tl.constexpr, W: tl.constexpr,
             LAYOUT: tl.constexpr):
    """Element offsets of (n, h, w, c) (broadcastable index tensors). LAYOUT 1: contiguous NCHW,
    2: channels_last (both from C, H, W, so the compiler sees the alignment), 0: the strides."""
    if LAYOUT == 1:
        off = ((n * C + c) * H + h) * W + w
    elif LAYOUT == 2:
        off = ((n * H + h) * W + w) * C + c
    else:
        off = n * sN + c * sC + h * sH + w * sW
    return off


@triton.jit
def _rcp64(v):
    """1 / v of normal float64 values (|exponent| <= 1000) without the slow-path call of
    div.rn.f64 (see _sigmoid): v = m 2^e scaled exactly to |m| in [1, 2), a float32 seed, two
    Newton steps (~1 ulp), times 2^-e. v = 0 gives +inf, inf gives 0, NaN stays NaN."""
    e = ((v.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023
    e = tl.minimum(tl.maximum(e, -1000), 1000)
    scale = ((1023 - e) << 52).to(tl.float64, bitcast=True)         # 2^-e
    special = (v == 0) | (tl.abs(v) == float("inf"))
    m = tl.where(special, 1.0, v * scale)
    y = (1.0 / m.to(tl.float32)).to(tl.float64)
    y = y * (2.0 - m * y)
    y = y * (2.0 - m * y)
    y = y * scale
    return tl.where(v == 0, float("inf"), tl.where(special, 0.0, y))


@triton.jit
def _pre(xv, K, cx, b, u, v, cst_ptr, w3, wm3, h, has_row0, W: tl.constexpr):
    """The forward apply's pre-activation, written once: every pass that recomputes it (forward
    apply, gradient sums, backward apply) rounds exactly alike, so act' masks agree.
    pre = cx (x - K) + b; on row 0 (tiles that hold one) b is replaced by u at w = 0 and by
    b + v Pi[w] elsewhere; Pi is loaded only there."""
    t = xv - K
    pre = tl.fma(cx, t, b)
    if has_row0:
        pi = tl.load(cst_ptr + 2 * W + w3, mask=wm3, other=0.0)
        row = tl.where(w3 == 0, u, tl.fma(v, pi, b))
        pre = tl.where(h == 0, tl.fma(cx, t, row), pre)
    return pre


@triton.jit
def _rows(r0, NH, H: tl.constexpr, BR: tl.constexpr, IDX64: tl.constexpr):
    """Rows r0 .. r0+BR of the (n, h) rows: (n [BR,1,1], h [BR,1,1], row mask, whether a row
    h = 0 is among them)."""
    r = r0 + tl.arange(0, BR)
    n = r // H                       # int32 division by a constant: a multiply-high
    h = r - n * H
    if IDX64:
        n = n.to(tl.int64)
    hr = r0 % H
    return n[:, None, None], h[:, None, None], (r < NH)[:, None, None], (hr == 0) | (hr + BR > H)


@triton.jit
def _channels(BC: tl.constexpr, VEC: tl.constexpr, C, IDX64: tl.constexpr):
    """This program's channels: (c (BC,), mask, c as [1, 1, BC] index). VEC < BC caps the
    contiguity the compiler assumes (channels a thread holds: per-channel coefficients are
    registers, one set per channel)."""
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    if VEC < BC:
        c = tl.max_contiguous(c, VEC)
    cmask = c < C
    c3 = c[None, None, :]
    if IDX64:
        c3 = c3.to(tl.int64)
    return c, cmask, c3


@triton.jit
def _sgn(w3, ACC: tl.constexpr):
    return (1 - 2 * (w3 % 2)).to(ACC)


@triton.jit
def _stats_kernel(x_ptr, cst_ptr, part_ptr, C, NH, rows_per_chunk, sN, sC, sH, sW,
                  H: tl.constexpr, W: tl.constexpr, X_LAYOUT: tl.constexpr,
                  IDX64: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr,
                  BW: tl.constexpr, BC: tl.constexpr, VEC: tl.constexpr):
    """Partials part[chunk, :, c] = [K, S1, S2, SR, SA, SD0, SD1] of this chunk's rows (float64).
    cst = [Re D, Im D, Pi] (3, W)."""
    c, cmask, c3 = _channels(BC, VEC, C, IDX64)
    chunk = tl.program_id(1)
    cm3 = cmask[None, None, :]
    K = tl.load(x_ptr + _offsets(0, 0, 0, c3, C, sN, sC, sH, sW, H, W, X_LAYOUT), mask=cm3,
                other=0.0).to(ACC)
    r_start = chunk * rows_per_chunk
    r_end = tl.minimum(r_start + rows_per_chunk, NH)
    s2 = tl.zeros([BR, BW, BC], ACC)
    s1 = tl.zeros([BR, 1, BC], ACC)          # S1 = sum of the row sums R
    sr = tl.zeros([BR, 1, BC], ACC)
    sa = tl.zeros([BR, 1, BC], ACC)
    sd0 = tl.zeros([BR, 1, BC], ACC)
    sd1 = tl.zeros([BR, 1, BC], ACC)
    for r0 in range(r_start, r_end, BR):
        n, h, rmask, has_row0 = _rows(r0, r_end, H, BR, IDX64)
        R = tl.zeros([BR, 1, BC], ACC)
        A = tl.zeros([BR, 1, BC], ACC)
        D0 = tl.zeros([BR, 1, BC], ACC)
        D1 = tl.zeros([BR, 1, BC], ACC)
        for w0 in range(0, W, BW):
            w3 = (w0 + tl.arange(0, BW))[None, :, None]
            wm3 = w3 < W
            m = rmask & wm3 & cm3
            xv = tl.load(x_ptr + _offsets(n, h, w3, c3, C, sN, sC, sH, sW, H, W, X_LAYOUT),
                         mask=m, other=0.0)
            t = tl.where(m, xv.to(ACC) - K, 0.0)
            s2 += t * t
            R += tl.sum(t, axis=1, keep_dims=True)
            if W % 2 == 0:
                A += tl.sum(t * _sgn(w3, ACC), axis=1, keep_dims=True)
            if has_row0:
                dre = tl.load(cst_ptr + w3, mask=wm3, other=0.0)
                dim = tl.load(cst_ptr + W + w3, mask=wm3, other=0.0)
                D0 += tl.sum(t * dre, axis=1, keep_dims=True)
                D1 += tl.sum(t * dim, axis=1, keep_dims=True)
        s1 += R
        sr += R * R
        if W % 2 == 0:
            sa += A * A
        if has_row0:
            sd0 += tl.where(h == 0, D0, 0.0)
            sd1 += tl.where(h == 0, D1, 0.0)
    out = part_ptr + chunk * (7 * C) + c
    tl.store(out, K.reshape([BC]).to(tl.float64), mask=cmask)
    tl.store(out + C, tl.sum(tl.sum(s1, 0), 0).to(tl.float64), mask=cmask)
    tl.store(out + 2 * C, tl.sum(tl.sum(s2, 0), 0).to(tl.float64), mask=cmask)
    tl.store(out + 3 * C, tl.sum(tl.sum(sr, 0), 0).to(tl.float64), mask=cmask)
    tl.store(out + 4 * C, tl.sum(tl.sum(sa, 0), 0).to(tl.float64), mask=cmask)
    tl.store(out + 5 * C, tl.sum(tl.sum(sd0, 0), 0).to(tl.float64), mask=cmask)
    tl.store(out + 6 * C, tl.sum(tl.sum(sd1, 0), 0).to(tl.float64), mask=cmask)


@triton.jit
def _coef(ptr, k, cols, c, cmask, ACC: tl.constexpr):
    """Column k of a float64 (C, cols) table for channels c, as [1, 1, BC] in ACC."""
    return tl.load(ptr + c * cols + k, mask=cmask, other=0.0).to(ACC)[None, None, :]



@triton.jit
def _apply_coefs(sv_ptr, c, cmask, ACC: tl.constexpr):
    """saved's apply columns (K, cx, b, u, v) for channels c, as [1, 1, BC] in ACC."""
    K = _coef(sv_ptr, SV_SHIFT, NSAVED, c, cmask, ACC)
    cx = _coef(sv_ptr, SV_X_SCALE, NSAVED, c, cmask, ACC)
    b = _coef(sv_ptr, SV_OFFSET, NSAVED, c, cmask, ACC)
    u = _coef(sv_ptr, SV_PR, NSAVED, c, cmask, ACC)
    v = _coef(sv_ptr, SV_PI, NSAVED, c, cmask, ACC)
    return K, cx, b, u, v


@triton.jit(do_not_specialize=["act"])
def _grad_stats_kernel(dy_ptr, x_ptr, sv_ptr, cst_ptr, part_ptr, C, NH, rows_per_chunk,
                       slope: tl.float64, act, sN, sC, sH, sW, dN, dC, dH, dW,
                       H: tl.constexpr, W: tl.constexpr, X_LAYOUT: tl.constexpr,
                       DY_LAYOUT: tl.constexpr, IDX64: tl.constexpr,
                       ACC: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr,
                       BC: tl.constexpr, VEC: tl.constexpr):
    """Partials part[chunk, :, c] = [sum g, sum g t, sum_n g[n,0,0], sum_{n,w} g[n,0,w] Pi[w]],
    g = act'(pre) dy, t = x - K."""
    c, cmask, c3 = _channels(BC, VEC, C, IDX64)
    chunk = tl.program_id(1)
    cm3 = cmask[None, None, :]
    K, cx, b, u, v = _apply_coefs(sv_ptr, c, cmask, ACC)
    sl = _f64(slope).to(ACC)
    r_start = chunk * rows_per_chunk
    r_end = tl.minimum(r_start + rows_per_chunk, NH)
    sg = tl.zeros([BR, BW, BC], ACC)
    sgt = tl.zeros([BR, BW, BC], ACC)
    g0 = tl.zeros([BR, 1, BC], ACC)
    g1 = tl.zeros([BR, 1, BC], ACC)
    for r0 in range(r_start, r_end, BR):
        n, h, rmask, has_row0 = _rows(r0, r_end, H, BR, IDX64)
        for w0 in range(0, W, BW):
            w3 = (w0 + tl.arange(0, BW))[None, :, None]
            wm3 = w3 < W
            m = rmask & wm3 & cm3
            xv = tl.load(x_ptr + _offsets(n, h, w3, c3, C, sN, sC, sH, sW, H, W, X_LAYOUT),
                         mask=m, other=0.0).to(ACC)
            dyv = tl.load(dy_ptr + _offsets(n, h, w3, c3, C, dN, dC, dH, dW, H, W, DY_LAYOUT),
                          mask=m, other=0.0).to(ACC)
            pre = _pre(xv, K, cx, b, u, v, cst_ptr, w3, wm3, h, has_row0, W)
            g = act_backward(pre, dyv, sl, act)      # 0 in masked lanes: dy is loaded as 0
            sg += g
            sgt += g * (xv - K)
            if has_row0:
                pi = tl.load(cst_ptr + 2 * W + w3, mask=wm3, other=0.0)
                g_row0 = tl.where(h == 0, g, 0.0)
                g0 += tl.sum(tl.where(w3 == 0, g_row0, 0.0), axis=1, keep_dims=True)
                g1 += tl.sum(g_row0 * pi, axis=1, keep_dims=True)
    out = part_ptr + chunk * (4 * C) + c
    tl.store(out, tl.sum(tl.sum(sg, 0), 0).to(tl.float64), mask=cmask)
    tl.store(out + C, tl.sum(tl.sum(sgt, 0), 0).to(tl.float64), mask=cmask)
    tl.store(out + 2 * C, tl.sum(tl.sum(g0, 0), 0).to(tl.float64), mask=cmask)
    tl.store(out + 3 * C, tl.sum(tl.sum(g1, 0), 0).to(tl.float64), mask=cmask)


# ----------------------------------------------------------------------------------------------
# finalize: device helpers (float64), written once for every source of the statistics
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sum_partials(part_ptr, n_chunks, C, c, cmask, NP: tl.constexpr, k: tl.constexpr):
    """sum over chunks (in chunk order) of part[chunk, k, c]."""
    s = tl.zeros(c.shape, tl.float64)
    for i in range(0, n_chunks):
        s += tl.load(part_ptr + (i * NP + k) * C + c, mask=cmask, other=0.0)
    return s


@triton.jit
def _local_sums(part_ptr, n_chunks, C, c, cmask):
    """The statistics partials of this process reduced: (K, S1, S2, SR, SA, SD0, SD1)."""
    # (an empty batch has no chunks: its partials buffer is one unwritten row, K = 0)
    # one loop over the chunks for the six sums (each still summed in chunk order)
    S1 = tl.zeros(c.shape, tl.float64)
    S2 = tl.zeros(c.shape, tl.float64)
    SR = tl.zeros(c.shape, tl.float64)
    SA = tl.zeros(c.shape, tl.float64)
    SD0 = tl.zeros(c.shape, tl.float64)
    SD1 = tl.zeros(c.shape, tl.float64)
    for i in range(0, n_chunks):
        q = part_ptr + i * (7 * C) + c
        S1 += tl.load(q + C, mask=cmask, other=0.0)
        S2 += tl.load(q + 2 * C, mask=cmask, other=0.0)
        SR += tl.load(q + 3 * C, mask=cmask, other=0.0)
        SA += tl.load(q + 4 * C, mask=cmask, other=0.0)
        SD0 += tl.load(q + 5 * C, mask=cmask, other=0.0)
        SD1 += tl.load(q + 6 * C, mask=cmask, other=0.0)
    K = tl.where(n_chunks > 0, tl.load(part_ptr + c, mask=cmask, other=0.0), 0.0)
    return K, S1, S2, SR, SA, SD0, SD1


@triton.jit
def _group_sums(rows_ptr, P, rank, C, c, cmask, H, W):
    """rows_all (P, C, 8) [N, K, S1, S2, SR, SA, SD0, SD1] of every process -> (N_all, K*, the
    group's sums at K*, process ``rank``'s sums at K*), K* = the shift of the first process with
    N > 0. Re-centering t' = t + d, d = K_p - K*, n = N_p H W (exact):
    S1' = S1 + n d, S2' = S2 + 2 d S1 + n d^2, SR' = SR + 2 W d S1 + N_p H W^2 d^2, SA' = SA,
    SD0' = SD0 + d N_p W (sum_w D(w) = W), SD1' = SD1."""
    Ks = tl.zeros(c.shape, tl.float64)
    found = tl.zeros(c.shape, tl.int32)
    for p in range(0, P):
        base = rows_ptr + (p * C + c) * NROWS
        Np = tl.load(base + ROW_COUNT, mask=cmask, other=0.0)
        Kp = tl.load(base + ROW_SHIFT, mask=cmask, other=0.0)
        take = (Np > 0) & (found == 0)
        Ks = tl.where(take, Kp, Ks)
        found = tl.where(take, 1, found)
    N_all = tl.zeros(c.shape, tl.float64)
    S1 = tl.zeros(c.shape, tl.float64)
    S2 = tl.zeros(c.shape, tl.float64)
    SR = tl.zeros(c.shape, tl.float64)
    SA = tl.zeros(c.shape, tl.float64)
    SD0 = tl.zeros(c.shape, tl.float64)
    SD1 = tl.zeros(c.shape, tl.float64)
    L1 = tl.zeros(c.shape, tl.float64)
    L2 = tl.zeros(c.shape, tl.float64)
    LR = tl.zeros(c.shape, tl.float64)
    LA = tl.zeros(c.shape, tl.float64)
    LD0 = tl.zeros(c.shape, tl.float64)
    LD1 = tl.zeros(c.shape, tl.float64)
    for p in range(0, P):
        base = rows_ptr + (p * C + c) * NROWS
        Np = tl.load(base + ROW_COUNT, mask=cmask, other=0.0)
        d = tl.load(base + ROW_SHIFT, mask=cmask, other=0.0) - Ks
        s1 = tl.load(base + ROW_SUMS, mask=cmask, other=0.0)
        s2 = tl.load(base + ROW_SUMS + 1, mask=cmask, other=0.0)
        sr = tl.load(base + ROW_SUMS + 2, mask=cmask, other=0.0)
        sa = tl.load(base + ROW_SUMS + 3, mask=cmask, other=0.0)
        sd0 = tl.load(base + ROW_SUMS + 4, mask=cmask, other=0.0)
        sd1 = tl.load(base + ROW_SUMS + 5, mask=cmask, other=0.0)
        nd = Np * (H * W) * d
        m1 = s1 + nd
        m2 = s2 + d * (2.0 * s1 + nd)
        mr = sr + d * (2.0 * W * s1 + W * nd)
        md0 = sd0 + d * Np * W
        N_all += Np
        S1 += m1
        S2 += m2
        SR += mr
        SA += sa
        SD0 += md0
        SD1 += sd1
        me = p == rank
        L1 = tl.where(me, m1, L1)
        L2 = tl.where(me, m2, L2)
        LR = tl.where(me, mr, LR)
        LA = tl.where(me, sa, LA)
        LD0 = tl.where(me, md0, LD0)
        LD1 = tl.where(me, sd1, LD1)
    return N_all, Ks, S1, S2, SR, SA, SD0, SD1, L1, L2, LR, LA, LD0, LD1


@triton.jit
def _batch_stats(src_ptr, n_src, rank, C, c, cmask, N_f, H, W, SRC: tl.constexpr):
    """(N_all, K, the group's sums, this process's sums) from this process's partials (SRC 0)
    or from every process's rows (SRC 1)."""
    if SRC == 0:
        K, S1, S2, SR, SA, SD0, SD1 = _local_sums(src_ptr, n_src, C, c, cmask)
        N_all = tl.full(c.shape, N_f, tl.float64)
        L1, L2, LR, LA, LD0, LD1 = S1, S2, SR, SA, SD0, SD1
    else:
        N_all, K, S1, S2, SR, SA, SD0, SD1, L1, L2, LR, LA, LD0, LD1 = _group_sums(
            src_ptr, n_src, rank, C, c, cmask, H, W)
    return N_all, K, S1, S2, SR, SA, SD0, SD1, L1, L2, LR, LA, LD0, LD1


@triton.jit
def _spectral_stats(S1, S2, SR, SA, SD0, SD1, K, N, H: tl.constexpr, W: tl.constexpr):
    """Shifted sums of t = z - K over N samples -> (Re mu, Im mu, var) of SBN on z ("backward"
    scale), exactly: mu_t = (H/M) SD, var_t = (HW S2 + H SR + [W even] H SA)/(2M) - |mu_t|^2,
    mu = mu_t + K W/Wr, var = var_t + d (N (d - K W/Wr) + 2 (S1 - N Re mu_t)) / M, d = K H W."""
    inv_M = _rcp64(N * (H * (W // 2 + 1)))
    mr_t = SD0 * (H * inv_M)
    mi_t = SD1 * (H * inv_M)
    E = S2 * (H * W) + SR * H
    if W % 2 == 0:
        E += SA * H
    var_t = E * (0.5 * inv_M) - mr_t * mr_t - mi_t * mi_t
    d = K * (H * W)
    cK = K * (W / (W // 2 + 1))
    var = var_t + d * (N * (d - cK) + 2.0 * (S1 - N * mr_t)) * inv_M
    return mr_t + cK, mi_t, tl.maximum(var, 0.0)


@triton.jit
def _param(ptr, c, cmask, HAS: tl.constexpr, default: tl.constexpr):
    if HAS:
        val = tl.load(ptr + c, mask=cmask, other=default).to(tl.float64)
    else:
        val = tl.full(c.shape, default, tl.float64)
    return val


@triton.jit
def _sbn_grad_core(Sdy, Gt, G0, G1, Kz, mr, mi, inv_s, a, N, H: tl.constexpr, W: tl.constexpr):
    """SBN backward on z from the gradient sums (of every process): Sdy = sum g, Gt = sum g (z-Kz),
    G0, G1 (row-0 sums against Pr, Pi) -> (kE, u, v, cst) with
    dz = a g + kE (HW (z-Kz) + H R + [W even] H A (-1)^w) + cst + [h==0] (u Re D + v Im D)."""
    inv_M = _rcp64(N * (H * (W // 2 + 1)))
    Ga = Gt + Kz * Sdy - mr * G0 - mi * G1
    kE = (Ga * inv_s) * (a * inv_s) * (-0.5 * inv_M)        # dvar / M, dvar = -Ga a / (2 s^2)
    u = -(H * inv_M) * a * G0 - (2.0 * H) * mr * kE
    v = -(H * inv_M) * a * G1 - (2.0 * H) * mi * kE
    cst = Kz * kE * (2.0 * H * W)
    return kE, u, v, cst


@triton.jit
def _bn_grad_sums(S1, S2, SR, SA, SD0, SD1, Sdy, Gt, a, p, kE, cst_z, u_z, v_z, N,
                  H: tl.constexpr, W: tl.constexpr):
    """Sums of dz and dz t over N samples with statistics sums S* and gradient sums Sdy, Gt:
    dz = a g + kE p (HW t + H R_t + [even] H A_t (-1)^w) + cst_z + [h==0](u_z Re D + v_z Im D)
    (sum_w D(w) = W)."""
    kEp = kE * p
    sdz = a * Sdy + kEp * S1 * (2.0 * H * W) + cst_z * (N * H * W) + u_z * (N * W)
    E = S2 * (H * W) + SR * H
    if W % 2 == 0:
        E += SA * H
    sdzt = a * Gt + kEp * E + cst_z * S1 + u_z * SD0 + v_z * SD1
    return sdz, sdzt


@triton.jit
def _store6(o, mask, s1, s2, sr, sa, sd0, sd1):
    tl.store(o, s1, mask=mask)
    tl.store(o + 1, s2, mask=mask)
    tl.store(o + 2, sr, mask=mask)
    tl.store(o + 3, sa, mask=mask)
    tl.store(o + 4, sd0, mask=mask)
    tl.store(o + 5, sd1, mask=mask)


@triton.jit
def _forward_finalize(src_ptr, n_src, rank, bnw_ptr, bnb_ptr, sw_ptr, sb_ptr, bn_mean_ptr,
                      bn_var_ptr, sbn_mean_ptr, sbn_var_ptr, o_bn_mean_ptr, o_bn_var_ptr,
                      o_sbn_mean_ptr, o_sbn_var_ptr, sv_ptr, C, c, cmask, chunk, N_f, bn_eps,
                      eps_eff, f, hf, H: tl.constexpr, W: tl.constexpr, SRC: tl.constexpr,
                      BN: tl.constexpr, HAS_BW: tl.constexpr, HAS_BB: tl.constexpr,
                      HAS_SW: tl.constexpr, HAS_SB: tl.constexpr, ACC: tl.constexpr):
    """Statistics and apply coefficients of channels c, float64: SRC 0 from this process's
    partials (n_src chunks), 1 from rows_all (n_src processes, this one ``rank``), 2 eval (the
    given statistics, SBN's in the fft_norm scale). Chunk 0's programs write the
    statistics (BN's only with the BN stage on) and saved (C, 26). Returns (K, cx, b, u, v).
    BN stage: z = p t + Kz (t = x - K); SBN on z from the same sums."""
    # Each value is stored as soon as it is known (chunk 0's programs), so that few float64
    # values are live at once: the sums die after the statistics, the statistics after the
    # coefficients (a finalize holding them all for one store at its end kept a 64-bit value
    # in local memory under ptxas 12.9 / 13.4).
    wm = cmask & ((c * 0 + chunk) == 0)      # chunk 0's programs write
    o = sv_ptr + c * NSAVED
    zero = tl.zeros(c.shape, tl.float64)
    one = tl.full(c.shape, 1.0, tl.float64)
    if SRC == 2:
        m_re = tl.load(sbn_mean_ptr + 2 * c, mask=cmask, other=0.0).to(tl.float64)
        m_im = tl.load(sbn_mean_ptr + 2 * c + 1, mask=cmask, other=0.0).to(tl.float64)
        var_m = tl.load(sbn_var_ptr + c, mask=cmask, other=0.0).to(tl.float64)
        N_all = tl.full(c.shape, N_f, tl.float64)
        _store6(o + SV_SUMS, wm, zero, zero, zero, zero, zero, zero)
        _store6(o + SV_LOCAL, wm, zero, zero, zero, zero, zero, zero)
        if BN:
            mbn = tl.load(bn_mean_ptr + c, mask=cmask, other=0.0).to(tl.float64)
            vbn = tl.load(bn_var_ptr + c, mask=cmask, other=0.0).to(tl.float64)
            # shift by the BN mean (rounded to the passes' dtype, so that x - K is the passes'
            # t): z = p (x - K) + Kz then has no cancellation for data with a large mean
            K = mbn.to(ACC).to(tl.float64)
            inv_sd = _rsqrt64(vbn + bn_eps)
            p = _param(bnw_ptr, c, cmask, HAS_BW, 1.0) * inv_sd
            Kz = _param(bnb_ptr, c, cmask, HAS_BB, 0.0) + p * (K - mbn)
        else:
            K = zero
            p, Kz, mbn = one, K, K
        mr = m_re * hf
        mi = m_im * hf
        svar = var_m * (hf * hf)
    else:
        N_all, K, S1, S2, SR, SA, SD0, SD1, L1, L2, LR, LA, LD0, LD1 = _batch_stats(
            src_ptr, n_src, rank, C, c, cmask, N_f, H, W, SRC)
        _store6(o + SV_SUMS, wm, S1, S2, SR, SA, SD0, SD1)
        _store6(o + SV_LOCAL, wm, L1, L2, LR, LA, LD0, LD1)
        if BN:
            inv_nb = _rcp64(N_all * (H * W))
            m_t = S1 * inv_nb
            vbn = tl.maximum(S2 * inv_nb - m_t * m_t, 0.0)
            mbn = K + m_t
            inv_sd = _rsqrt64(vbn + bn_eps)
            p = _param(bnw_ptr, c, cmask, HAS_BW, 1.0) * inv_sd
            Kz = _param(bnb_ptr, c, cmask, HAS_BB, 0.0) - p * m_t
        else:
            p, Kz, mbn = one, K, K
        p2 = p * p
        mr, mi, svar = _spectral_stats(p * S1, p2 * S2, p2 * SR, p2 * SA, p * SD0, p * SD1, Kz,
                                       N_all, H, W)
        m_re = f * mr
        m_im = f * mi
        var_m = (f * f) * svar
    tl.store(o + SV_SHIFT, K, mask=wm)
    tl.store(o + SV_COUNT, N_all, mask=wm)
    tl.store(o + SV_BN_SCALE, p, mask=wm)
    tl.store(o + SV_Z_SHIFT, Kz, mask=wm)
    tl.store(o + SV_BN_MEAN, mbn, mask=wm)
    if BN:
        tl.store(o + SV_BN_STD, (vbn + bn_eps) * inv_sd, mask=wm)
        tl.store(o_bn_mean_ptr + c, mbn.to(o_bn_mean_ptr.dtype.element_ty), mask=wm)
        tl.store(o_bn_var_ptr + c, vbn.to(o_bn_var_ptr.dtype.element_ty), mask=wm)
    else:
        tl.store(o + SV_BN_STD, one, mask=wm)
    tl.store(o_sbn_mean_ptr + 2 * c, m_re.to(o_sbn_mean_ptr.dtype.element_ty), mask=wm)
    tl.store(o_sbn_mean_ptr + 2 * c + 1, m_im.to(o_sbn_mean_ptr.dtype.element_ty), mask=wm)
    tl.store(o_sbn_var_ptr + c, var_m.to(o_sbn_var_ptr.dtype.element_ty), mask=wm)
    tl.store(o + SV_MEAN_RE, mr, mask=wm)
    tl.store(o + SV_MEAN_IM, mi, mask=wm)
    inv_s = _rsqrt64(svar + eps_eff)
    tl.store(o + SV_SBN_STD, (svar + eps_eff) * inv_s, mask=wm)
    a = hf * _param(sw_ptr, c, cmask, HAS_SW, 1.0) * inv_s          # gamma_eff = h gamma
    tl.store(o + SV_SBN_SCALE, a, mask=wm)
    u = hf * _param(sb_ptr, c, cmask, HAS_SB, 0.0) + a * (Kz - mr)
    cx = a * p
    b = a * Kz
    v = -a * mi
    tl.store(o + SV_X_SCALE, cx, mask=wm)
    tl.store(o + SV_OFFSET, b, mask=wm)
    tl.store(o + SV_PR, u, mask=wm)
    tl.store(o + SV_PI, v, mask=wm)
    return K, cx, b, u, v


@triton.jit
def _grad_sums(src_ptr, all_ptr, n_chunks, C, c, cmask, SRC: tl.constexpr):
    """(group's [Sdy, Gt, G0, G1], this process's) from the partials (SRC 0: one process) or
    from gsums_local (src) and gsums_all (C, 4) tensors (SRC 1)."""
    if SRC == 0:
        # one loop over the chunks for the four sums (each still summed in chunk order)
        Sdy = tl.zeros(c.shape, tl.float64)
        Gt = tl.zeros(c.shape, tl.float64)
        G0 = tl.zeros(c.shape, tl.float64)
        G1 = tl.zeros(c.shape, tl.float64)
        for i in range(0, n_chunks):
            q = src_ptr + i * (4 * C) + c
            Sdy += tl.load(q, mask=cmask, other=0.0)
            Gt += tl.load(q + C, mask=cmask, other=0.0)
            G0 += tl.load(q + 2 * C, mask=cmask, other=0.0)
            G1 += tl.load(q + 3 * C, mask=cmask, other=0.0)
        lSdy, lGt, lG0, lG1 = Sdy, Gt, G0, G1
    else:
        lSdy = tl.load(src_ptr + NGSUMS * c, mask=cmask, other=0.0)
        lGt = tl.load(src_ptr + NGSUMS * c + 1, mask=cmask, other=0.0)
        lG0 = tl.load(src_ptr + NGSUMS * c + 2, mask=cmask, other=0.0)
        lG1 = tl.load(src_ptr + NGSUMS * c + 3, mask=cmask, other=0.0)
        Sdy = tl.load(all_ptr + NGSUMS * c, mask=cmask, other=0.0)
        Gt = tl.load(all_ptr + NGSUMS * c + 1, mask=cmask, other=0.0)
        G0 = tl.load(all_ptr + NGSUMS * c + 2, mask=cmask, other=0.0)
        G1 = tl.load(all_ptr + NGSUMS * c + 3, mask=cmask, other=0.0)
    return Sdy, Gt, G0, G1, lSdy, lGt, lG0, lG1


@triton.jit
def _saved(sv_ptr, col, c, cmask, other: tl.constexpr):
    return tl.load(sv_ptr + c * NSAVED + col, mask=cmask, other=other)


@triton.jit
def _backward_finalize(src_ptr, all_ptr, n_src, sv_ptr, dbw_ptr, dbb_ptr, dsw_ptr, dsb_ptr, c,
                       cmask, C, chunk, N_local_f, hf, H: tl.constexpr, W: tl.constexpr,
                       SRC: tl.constexpr, BN: tl.constexpr, TRAINING: tl.constexpr):
    """dx coefficients (c_t, c_R, c_A, cst, u, v) of channels c from the group's gradient sums
    (SRC 0: this process's partials, n_src chunks; 1: gsums_all) and saved; chunk 0's
    programs write the parameter gradients, this process's share (saved's local sums,
    gsums_local, this process's N). SBN on z = p t + Kz, then (BN stage on) BN's backward with
    dz's sums."""
    Sdy, Gt, G0, G1, lSdy, lGt, lG0, lG1 = _grad_sums(src_ptr, all_ptr, n_src, C, c, cmask, SRC)
    zero = tl.zeros(c.shape, tl.float64)
    mr = _saved(sv_ptr, SV_MEAN_RE, c, cmask, 0.0)
    mi = _saved(sv_ptr, SV_MEAN_IM, c, cmask, 0.0)
    s = _saved(sv_ptr, SV_SBN_STD, c, cmask, 1.0)
    a = _saved(sv_ptr, SV_SBN_SCALE, c, cmask, 0.0)
    inv_s = _rcp64(s)
    if BN:
        K = _saved(sv_ptr, SV_SHIFT, c, cmask, 0.0)
        p = _saved(sv_ptr, SV_BN_SCALE, c, cmask, 0.0)
        inv_sd = _rcp64(_saved(sv_ptr, SV_BN_STD, c, cmask, 1.0))
        Kz = _saved(sv_ptr, SV_Z_SHIFT, c, cmask, 0.0)
    else:
        p = tl.full(c.shape, 1.0, tl.float64)
        Kz = _saved(sv_ptr, SV_SHIFT, c, cmask, 0.0)
    wm = cmask & ((c * 0 + chunk) == 0)      # chunk 0's programs write
    # SBN's parameter gradients (this process's share): Ga/s on z, dbeta = h G0
    dsw = hf * (p * lGt + Kz * lSdy - mr * lG0 - mi * lG1) * inv_s
    tl.store(dsw_ptr + c, dsw.to(dsw_ptr.dtype.element_ty), mask=wm)
    tl.store(dsb_ptr + c, (hf * lG0).to(dsb_ptr.dtype.element_ty), mask=wm)
    if TRAINING:
        N_all = _saved(sv_ptr, SV_COUNT, c, cmask, 1.0)
        kE, u_z, v_z, cst_z = _sbn_grad_core(Sdy, p * Gt, G0, G1, Kz, mr, mi, inv_s, a, N_all,
                                             H, W)
        pkEH = p * p * kE * H
        c_t = pkEH * W
        cst = cst_z
        if BN:
            S = sv_ptr + c * NSAVED + SV_SUMS
            S1 = tl.load(S, mask=cmask, other=0.0)
            sdz, sdzt = _bn_grad_sums(S1, tl.load(S + 1, mask=cmask, other=0.0),
                                      tl.load(S + 2, mask=cmask, other=0.0),
                                      tl.load(S + 3, mask=cmask, other=0.0),
                                      tl.load(S + 4, mask=cmask, other=0.0),
                                      tl.load(S + 5, mask=cmask, other=0.0),
                                      Sdy, Gt, a, p, kE, cst_z, u_z, v_z, N_all, H, W)
            inv_nb = _rcp64(N_all * (H * W))
            m_t = S1 * inv_nb
            kb = p * (sdzt - m_t * sdz) * (inv_sd * inv_sd * inv_nb)
            c_t = c_t - kb
            cst = p * cst_z - p * sdz * inv_nb + kb * m_t
            L = sv_ptr + c * NSAVED + SV_LOCAL
            lsdz, lsdzt = _bn_grad_sums(tl.load(L, mask=cmask, other=0.0),
                                        tl.load(L + 1, mask=cmask, other=0.0),
                                        tl.load(L + 2, mask=cmask, other=0.0),
                                        tl.load(L + 3, mask=cmask, other=0.0),
                                        tl.load(L + 4, mask=cmask, other=0.0),
                                        tl.load(L + 5, mask=cmask, other=0.0),
                                        lSdy, lGt, a, p, kE, cst_z, u_z, v_z, N_local_f, H, W)
            tl.store(dbb_ptr + c, lsdz.to(dbb_ptr.dtype.element_ty), mask=wm)
            tl.store(dbw_ptr + c, ((lsdzt - m_t * lsdz) * inv_sd).to(dbw_ptr.dtype.element_ty),
                     mask=wm)
        if W % 2 == 0:
            c_A = pkEH
        else:
            c_A = zero
        c_R = pkEH
        uD = p * u_z
        vD = p * v_z
    else:
        if BN:
            # eval: SBN is affine in z, dz = a g; BN with fixed statistics
            mbn = _saved(sv_ptr, SV_BN_MEAN, c, cmask, 0.0)
            tl.store(dbb_ptr + c, (a * lSdy).to(dbb_ptr.dtype.element_ty), mask=wm)
            tl.store(dbw_ptr + c, (a * (lGt + (K - mbn) * lSdy) * inv_sd).to(
                dbw_ptr.dtype.element_ty), mask=wm)
        c_t, c_R, c_A, cst, uD, vD = zero, zero, zero, zero, zero, zero
    return c_t, c_R, c_A, cst, uD, vD


# ----------------------------------------------------------------------------------------------
# kernels: the reduction of the synchronized path's pieces, forward and backward finalize + apply
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_chunks"])
def _rows_kernel(part_ptr, out_ptr, n_chunks, C, N_f: tl.float64, STATS: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Reduce this process's partials: STATS: rows (C, 8) = [N, K, S1, S2, SR, SA, SD0, SD1];
    else gradient sums (C, 4)."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = c < C
    if STATS:
        K, S1, S2, SR, SA, SD0, SD1 = _local_sums(part_ptr, n_chunks, C, c, cmask)
        o = out_ptr + c * NROWS
        tl.store(o + ROW_COUNT, tl.full(c.shape, N_f, tl.float64), mask=cmask)
        tl.store(o + ROW_SHIFT, K, mask=cmask)
        _store6(o + ROW_SUMS, cmask, S1, S2, SR, SA, SD0, SD1)
    else:
        o = out_ptr + c * NGSUMS
        for k in tl.static_range(4):
            tl.store(o + k, _sum_partials(part_ptr, n_chunks, C, c, cmask, 4, k), mask=cmask)


@triton.jit(do_not_specialize=["act", "n_src", "rank"])
def _forward_kernel(x_ptr, y_ptr, cst_ptr, src_ptr, bnw_ptr, bnb_ptr, sw_ptr, sb_ptr,
                    bn_mean_ptr, bn_var_ptr, sbn_mean_ptr, sbn_var_ptr, o_bn_mean_ptr,
                    o_bn_var_ptr, o_sbn_mean_ptr, o_sbn_var_ptr, sv_ptr, C, NH, rows_per_chunk,
                    n_src, rank, N_f: tl.float64, bn_eps: tl.float64, eps_eff: tl.float64,
                    f: tl.float64, hf: tl.float64, slope: tl.float64, act, sN, sC, sH, sW,
                    H: tl.constexpr, W: tl.constexpr, X_LAYOUT: tl.constexpr,
                    Y_LAYOUT: tl.constexpr, SRC: tl.constexpr, BN: tl.constexpr,
                    HAS_BW: tl.constexpr, HAS_BB: tl.constexpr, HAS_SW: tl.constexpr,
                    HAS_SB: tl.constexpr, IDX64: tl.constexpr, ACC: tl.constexpr,
                    BR: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr, VEC: tl.constexpr):
    """Forward finalize (``_forward_finalize``: SRC 0 partials, 1 rows_all, 2 eval) of this
    program's channels, then y = act(pre) over its chunk of rows."""
    c, cmask, c3 = _channels(BC, VEC, C, IDX64)
    chunk = tl.program_id(1)
    cm3 = cmask[None, None, :]
    K64, cx64, b64, u64, v64 = _forward_finalize(
        src_ptr, n_src, rank, bnw_ptr, bnb_ptr, sw_ptr, sb_ptr, bn_mean_ptr, bn_var_ptr,
        sbn_mean_ptr, sbn_var_ptr, o_bn_mean_ptr, o_bn_var_ptr, o_sbn_mean_ptr, o_sbn_var_ptr,
        sv_ptr, C, c, cmask, chunk, N_f, bn_eps, eps_eff, f, hf, H, W, SRC, BN, HAS_BW,
        HAS_BB, HAS_SW, HAS_SB, ACC)
    K = K64.to(ACC)[None, None, :]
    cx = cx64.to(ACC)[None, None, :]
    b = b64.to(ACC)[None, None, :]
    u = u64.to(ACC)[None, None, :]
    v = v64.to(ACC)[None, None, :]
    sl = _f64(slope).to(ACC)
    r_start = chunk * rows_per_chunk
    r_end = tl.minimum(r_start + rows_per_chunk, NH)
    for r0 in range(r_start, r_end, BR):
        n, h, rmask, has_row0 = _rows(r0, r_end, H, BR, IDX64)
        for w0 in range(0, W, BW):
            w3 = (w0 + tl.arange(0, BW))[None, :, None]
            wm3 = w3 < W
            m = rmask & wm3 & cm3
            xv = tl.load(x_ptr + _offsets(n, h, w3, c3, C, sN, sC, sH, sW, H, W, X_LAYOUT),
                         mask=m, other=0.0).to(ACC)
            pre = _pre(xv, K, cx, b, u, v, cst_ptr, w3, wm3, h, has_row0, W)
            y = act_forward(pre, sl, act)
            tl.store(y_ptr + _offsets(n, h, w3, c3, C, 0, 0, 0, 0, H, W, Y_LAYOUT),
                     y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["act", "n_src"])
def _backward_kernel(dy_ptr, x_ptr, dx_ptr, sv_ptr, cst_ptr, src_ptr, all_ptr, dbw_ptr, dbb_ptr,
                     dsw_ptr, dsb_ptr, C, NH, rows_per_chunk, n_src, N_f: tl.float64,
                     hf: tl.float64, slope: tl.float64, act, sN, sC, sH, sW, dN, dC, dH, dW,
                     H: tl.constexpr, W: tl.constexpr, X_LAYOUT: tl.constexpr,
                     DY_LAYOUT: tl.constexpr, DX_LAYOUT: tl.constexpr, SRC: tl.constexpr,
                     BN: tl.constexpr, TRAINING: tl.constexpr, IDX64: tl.constexpr,
                     ACC: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr,
                     VEC: tl.constexpr):
    """Backward finalize (``_backward_finalize``: SRC 0 this process's gradient partials, 1
    gsums_local / gsums_all) of this program's channels, then over its chunk of rows
    dx = cx g + c_t t + c_R R + c_A A (-1)^w + cst + [h==0](u Re D + v Im D) (training) or
    cx g (eval); cx, the dy coefficient, is the forward's x coefficient (a p). A row longer
    than one tile (W > BW) is read twice: once for its sums R, A, then for dx."""
    c, cmask, c3 = _channels(BC, VEC, C, IDX64)
    chunk = tl.program_id(1)
    cm3 = cmask[None, None, :]
    c_t64, c_R64, c_A64, cst64, uD64, vD64 = _backward_finalize(
        src_ptr, all_ptr, n_src, sv_ptr, dbw_ptr, dbb_ptr, dsw_ptr, dsb_ptr, c, cmask, C,
        chunk, N_f, hf, H, W, SRC, BN, TRAINING)
    K, cx, b, u, v = _apply_coefs(sv_ptr, c, cmask, ACC)
    sl = _f64(slope).to(ACC)
    if TRAINING:
        c_t = c_t64.to(ACC)[None, None, :]
        c_R = c_R64.to(ACC)[None, None, :]
        c_A = c_A64.to(ACC)[None, None, :]
        cst = cst64.to(ACC)[None, None, :]
        uD = uD64.to(ACC)[None, None, :]
        vD = vD64.to(ACC)[None, None, :]
    r_start = chunk * rows_per_chunk
    r_end = tl.minimum(r_start + rows_per_chunk, NH)
    for r0 in range(r_start, r_end, BR):
        n, h, rmask, has_row0 = _rows(r0, r_end, H, BR, IDX64)
        if TRAINING:
            if W > BW:      # a row spans several tiles: its sums first
                R = tl.zeros([BR, 1, BC], ACC)
                A = tl.zeros([BR, 1, BC], ACC)
                for w0 in range(0, W, BW):
                    w3 = (w0 + tl.arange(0, BW))[None, :, None]
                    m = rmask & (w3 < W) & cm3
                    xv = tl.load(x_ptr + _offsets(n, h, w3, c3, C, sN, sC, sH, sW, H, W,
                                                  X_LAYOUT), mask=m, other=0.0)
                    t = tl.where(m, xv.to(ACC) - K, 0.0)
                    R += tl.sum(t, axis=1, keep_dims=True)
                    if W % 2 == 0:
                        A += tl.sum(t * _sgn(w3, ACC), axis=1, keep_dims=True)
        for w0 in range(0, W, BW):
            w3 = (w0 + tl.arange(0, BW))[None, :, None]
            wm3 = w3 < W
            m = rmask & wm3 & cm3
            dyv = tl.load(dy_ptr + _offsets(n, h, w3, c3, C, dN, dC, dH, dW, H, W, DY_LAYOUT),
                          mask=m, other=0.0).to(ACC)
            if TRAINING:
                xv = tl.load(x_ptr + _offsets(n, h, w3, c3, C, sN, sC, sH, sW, H, W, X_LAYOUT),
                             mask=m, other=0.0).to(ACC)
                pre = _pre(xv, K, cx, b, u, v, cst_ptr, w3, wm3, h, has_row0, W)
                g = act_backward(pre, dyv, sl, act)
                t = tl.where(m, xv - K, 0.0)
                if W <= BW:
                    R = tl.sum(t, axis=1, keep_dims=True)
                    if W % 2 == 0:
                        A = tl.sum(t * _sgn(w3, ACC), axis=1, keep_dims=True)
                out = tl.fma(cx, g, tl.fma(c_t, t, tl.fma(c_R, R, cst)))
                if W % 2 == 0:
                    out += (c_A * A) * _sgn(w3, ACC)
                if has_row0:
                    dre = tl.load(cst_ptr + w3, mask=wm3, other=0.0)
                    dim = tl.load(cst_ptr + W + w3, mask=wm3, other=0.0)
                    out = tl.where(h == 0, out + tl.fma(uD, dre, vD * dim), out)
            else:
                if act == 0:        # identity: dx = cx dy, x is not read
                    g = dyv
                else:
                    xv = tl.load(x_ptr + _offsets(n, h, w3, c3, C, sN, sC, sH, sW, H, W,
                                                  X_LAYOUT), mask=m, other=0.0).to(ACC)
                    pre = _pre(xv, K, cx, b, u, v, cst_ptr, w3, wm3, h, has_row0, W)
                    g = act_backward(pre, dyv, sl, act)
                out = cx * g
            tl.store(dx_ptr + _offsets(n, h, w3, c3, C, 0, 0, 0, 0, H, W, DX_LAYOUT),
                     out.to(dx_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# the literal FFT path: spectral kernels between rfft2 and irfft2 (algorithm="fft")
# ----------------------------------------------------------------------------------------------
# The half spectrum X = rfft2(x, norm=fft_norm) as its contiguous real view (N, C, H, Wr, 2):
# per (n, c) a span of H rows of J2 = 2 Wr reals [re, im, re, im, ...]. Tiles [BN, BH, BJ] over
# (samples, rows, row position), programs per (channel, chunk of samples); no index division.


@triton.jit
def _fft_tile(n0, h0, j0, c, C, H: tl.constexpr, J2: tl.constexpr, n_end, IDX64: tl.constexpr,
              BN: tl.constexpr, BH: tl.constexpr, BJ: tl.constexpr):
    n = n0 + tl.arange(0, BN)[:, None, None]
    h = h0 + tl.arange(0, BH)[None, :, None]
    j = j0 + tl.arange(0, BJ)[None, None, :]
    m = (n < n_end) & (h < H) & (j < J2)
    if IDX64:
        n = n.to(tl.int64)
    off = ((n * C + c) * H + h) * J2 + j
    return off, m, j


@triton.jit
def _store_re_im(o, C, a, a2, BJ: tl.constexpr):
    """o[0], o[C], o[2 C] = sums of a at even positions j (re), at odd ones (im), sum of a2.
    j0 is a multiple of BJ (even: J2 = 2 Wr), so a position's parity is that of its index."""
    is_re = (tl.arange(0, BJ) % 2 == 0)[None, None, :]
    tl.store(o, tl.sum(tl.sum(tl.sum(tl.where(is_re, a, 0.0), 0), 0), 0).to(tl.float64))
    tl.store(o + C, tl.sum(tl.sum(tl.sum(tl.where(is_re, 0.0, a), 0), 0), 0).to(tl.float64))
    tl.store(o + 2 * C, tl.sum(tl.sum(tl.sum(a2, 0), 0), 0).to(tl.float64))


@triton.jit
def _fft_stats_kernel(X_ptr, part_ptr, C, N, n_per_chunk, H: tl.constexpr, J2: tl.constexpr,
                      IDX64: tl.constexpr, ACC: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr,
                      BJ: tl.constexpr):
    """part[chunk, :, c] = [sum (re - sr), sum (im - si), sum |X - s|^2] over this chunk's
    samples, s = X[0, c, 0, 0] (a shift: stable for a large DC coefficient)."""
    c = tl.program_id(0)
    chunk = tl.program_id(1)
    cb = c.to(tl.int64) * H * J2 if IDX64 else c * H * J2
    sr = tl.load(X_ptr + cb).to(ACC)
    si = tl.load(X_ptr + cb + 1).to(ACC)
    n_start = chunk * n_per_chunk
    n_end = tl.minimum(n_start + n_per_chunk, N)
    a_d = tl.zeros([BN, BH, BJ], ACC)        # re at even positions j, im at odd ones
    a_sq = tl.zeros([BN, BH, BJ], ACC)
    for n0 in range(n_start, n_end, BN):
        for h0 in range(0, H, BH):
            for j0 in range(0, J2, BJ):
                off, m, j = _fft_tile(n0, h0, j0, c, C, H, J2, n_end, IDX64, BN, BH, BJ)
                is_re = (j % 2) == 0
                v = tl.load(X_ptr + off, mask=m, other=0.0).to(ACC)
                d = tl.where(m, v - tl.where(is_re, sr, si), 0.0)
                a_d += d
                a_sq += d * d
    _store_re_im(part_ptr + chunk * 3 * C + c, C, a_d, a_sq, BJ)


@triton.jit
def _sum_chunks(part_ptr, n_chunks, C, c, k: tl.constexpr):
    s = tl.zeros([], tl.float64)
    for i in range(0, n_chunks):
        s += tl.load(part_ptr + (i * 3 + k) * C + c)
    return s


@triton.jit(do_not_specialize=["n_chunks"])
def _fft_apply_kernel(X_ptr, Y_ptr, part_ptr, stat_ptr, w_ptr, b_ptr, C, N, n_chunks,
                      n_per_chunk, inv_M: tl.float64, eps: tl.float64, H: tl.constexpr,
                      J2: tl.constexpr, TRAIN: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr, IDX64: tl.constexpr,
                      ACC: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr, BJ: tl.constexpr):
    """Y = gamma (X - mu) / sqrt(var + eps) + beta; training: mu, var from the partials (every
    program reduces its channel's in the same order; chunk 0 writes stat[c] = [Re mu, Im mu,
    var]), eval: from stat."""
    c = tl.program_id(0)
    chunk = tl.program_id(1)
    if TRAIN:
        cb = c.to(tl.int64) * H * J2 if IDX64 else c * H * J2
        sr = tl.load(X_ptr + cb).to(tl.float64)
        si = tl.load(X_ptr + cb + 1).to(tl.float64)
        mr_d = _sum_chunks(part_ptr, n_chunks, C, c, 0) * inv_M
        mi_d = _sum_chunks(part_ptr, n_chunks, C, c, 1) * inv_M
        var = tl.maximum(_sum_chunks(part_ptr, n_chunks, C, c, 2) * inv_M - mr_d * mr_d
                         - mi_d * mi_d, 0.0)
        mr = mr_d + sr
        mi = mi_d + si
        if chunk == 0:
            tl.store(stat_ptr + 3 * c, mr.to(stat_ptr.dtype.element_ty))
            tl.store(stat_ptr + 3 * c + 1, mi.to(stat_ptr.dtype.element_ty))
            tl.store(stat_ptr + 3 * c + 2, var.to(stat_ptr.dtype.element_ty))
    else:
        mr = tl.load(stat_ptr + 3 * c).to(tl.float64)
        mi = tl.load(stat_ptr + 3 * c + 1).to(tl.float64)
        var = tl.load(stat_ptr + 3 * c + 2).to(tl.float64)
    a64 = _rsqrt64(var + eps)
    if HAS_W:
        a64 = a64 * tl.load(w_ptr + c).to(tl.float64)
    a = a64.to(ACC)
    beta = tl.load(b_ptr + c).to(ACC) if HAS_B else 0.0
    mr_a = mr.to(ACC)
    mi_a = mi.to(ACC)
    n_start = chunk * n_per_chunk
    n_end = tl.minimum(n_start + n_per_chunk, N)
    for n0 in range(n_start, n_end, BN):
        for h0 in range(0, H, BH):
            for j0 in range(0, J2, BJ):
                off, m, j = _fft_tile(n0, h0, j0, c, C, H, J2, n_end, IDX64, BN, BH, BJ)
                is_re = (j % 2) == 0
                v = tl.load(X_ptr + off, mask=m, other=0.0).to(ACC)
                y = a * (v - tl.where(is_re, mr_a, mi_a)) + tl.where(is_re, beta, 0.0)
                tl.store(Y_ptr + off, y.to(Y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fft_dY(G_ptr, off, m, j, W: tl.constexpr, r):
    """dL/dY from G = rfft2(dy, norm): c_l r G, c_l = 1 on the self-conjugate columns (l = 0,
    l = W/2) else 2, r = 1/(H W f^2) (the adjoint of irfft2(., norm))."""
    l2 = (j >> 1) << 1                               # 2 l, l the column of position j
    cl = tl.where((l2 == 0) | (l2 == W), 1.0, 2.0)
    g = tl.load(G_ptr + off, mask=m, other=0.0)
    return g * (cl * r), cl


@triton.jit
def _fft_grad_stats_kernel(G_ptr, X_ptr, part_ptr, stat_ptr, C, N, n_per_chunk, r: tl.float64,
                           eps: tl.float64, H: tl.constexpr, J2: tl.constexpr,
                           W: tl.constexpr, IDX64: tl.constexpr,
                           ACC: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr,
                           BJ: tl.constexpr):
    """part[chunk, :, c] = [sum Re dY, sum Im dY, sum dY . Xhat] (Xhat = (X - mu)/s)."""
    c = tl.program_id(0)
    chunk = tl.program_id(1)
    mr = tl.load(stat_ptr + 3 * c).to(ACC)
    mi = tl.load(stat_ptr + 3 * c + 1).to(ACC)
    inv_s = _rsqrt64(tl.load(stat_ptr + 3 * c + 2).to(tl.float64) + eps).to(ACC)
    ra = _f64(r).to(ACC)
    a_g = tl.zeros([BN, BH, BJ], ACC)        # re at even positions j, im at odd ones
    a_gx = tl.zeros([BN, BH, BJ], ACC)
    n_start = chunk * n_per_chunk
    n_end = tl.minimum(n_start + n_per_chunk, N)
    for n0 in range(n_start, n_end, BN):
        for h0 in range(0, H, BH):
            for j0 in range(0, J2, BJ):
                off, m, j = _fft_tile(n0, h0, j0, c, C, H, J2, n_end, IDX64, BN, BH, BJ)
                is_re = (j % 2) == 0
                g, cl = _fft_dY(G_ptr, off, m, j, W, ra)
                g = g.to(ACC)
                xv = tl.load(X_ptr + off, mask=m, other=0.0).to(ACC)
                xh = (xv - tl.where(is_re, mr, mi)) * inv_s
                a_g += g
                a_gx += g * xh
    _store_re_im(part_ptr + chunk * 3 * C + c, C, a_g, a_gx, BJ)


@triton.jit(do_not_specialize=["n_chunks"])
def _fft_grad_apply_kernel(G_ptr, X_ptr, O_ptr, part_ptr, stat_ptr, w_ptr, grad_ptr, C, N,
                           n_chunks, n_per_chunk, inv_M: tl.float64, r: tl.float64,
                           r_inv: tl.float64, eps: tl.float64, H: tl.constexpr,
                           J2: tl.constexpr, W: tl.constexpr, TRAIN: tl.constexpr,
                           HAS_W: tl.constexpr,
                           IDX64: tl.constexpr, ACC: tl.constexpr, BN: tl.constexpr,
                           BH: tl.constexpr, BJ: tl.constexpr):
    """O = dX / (c_l r) so that dx = irfft2(O, norm) (the adjoint of rfft2(., norm)); training
    dX = a (dY - mean dY - Xhat mean(dY . Xhat)), eval dX = a dY. Chunk 0 writes
    grad[c] = [dgamma, dbeta]."""
    c = tl.program_id(0)
    chunk = tl.program_id(1)
    dbeta = _sum_chunks(part_ptr, n_chunks, C, c, 0)
    g_im = _sum_chunks(part_ptr, n_chunks, C, c, 1)
    dgamma = _sum_chunks(part_ptr, n_chunks, C, c, 2)
    if chunk == 0:
        tl.store(grad_ptr + 2 * c, dgamma.to(grad_ptr.dtype.element_ty))
        tl.store(grad_ptr + 2 * c + 1, dbeta.to(grad_ptr.dtype.element_ty))
    mr = tl.load(stat_ptr + 3 * c).to(ACC)
    mi = tl.load(stat_ptr + 3 * c + 1).to(ACC)
    inv_s64 = _rsqrt64(tl.load(stat_ptr + 3 * c + 2).to(tl.float64) + eps)
    a64 = inv_s64
    if HAS_W:
        a64 = a64 * tl.load(w_ptr + c).to(tl.float64)
    a = a64.to(ACC)
    inv_s = inv_s64.to(ACC)
    mean_r = (dbeta * inv_M).to(ACC)
    mean_i = (g_im * inv_M).to(ACC)
    kx = (dgamma * inv_M).to(ACC)
    ra = _f64(r).to(ACC)
    ria = _f64(r_inv).to(ACC)
    n_start = chunk * n_per_chunk
    n_end = tl.minimum(n_start + n_per_chunk, N)
    for n0 in range(n_start, n_end, BN):
        for h0 in range(0, H, BH):
            for j0 in range(0, J2, BJ):
                off, m, j = _fft_tile(n0, h0, j0, c, C, H, J2, n_end, IDX64, BN, BH, BJ)
                is_re = (j % 2) == 0
                g, cl = _fft_dY(G_ptr, off, m, j, W, ra)
                g = g.to(ACC)
                if TRAIN:
                    xv = tl.load(X_ptr + off, mask=m, other=0.0).to(ACC)
                    xh = (xv - tl.where(is_re, mr, mi)) * inv_s
                    dX = a * (g - tl.where(is_re, mean_r, mean_i) - xh * kx)
                else:
                    dX = a * g
                out = dX * (ria * tl.where(cl == 1.0, 1.0, 0.5))       # dX / (c_l r)
                tl.store(O_ptr + off, out.to(O_ptr.dtype.element_ty), mask=m)
