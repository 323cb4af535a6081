"""Triton kernels for Spectral Batch Norm (SBN) and BN+SBN (see DESIGN.md section 2).

Only the heavy passes over the tensor live here; every formula that turns partial sums into
statistics and per-channel coefficients is in ``normkernels/ops/sbn.py`` (torch ops, shared with
the pure-PyTorch fallback).

Parseval path (no FFT), per channel c, on data shifted by a per-channel constant K_c
(t = x - K_c, rows r = (n, h), R = sum_w t, A = sum_w (-1)^w t):

  * ``sbn_stats``       -> sums [sum t, sum t^2, sum R^2, sum A^2, sum_row0 t*P0, sum_row0 t*P1]
  * ``sbn_forward_apply`` y  = cx*(x - K) + b*(1 - [h==0]*P0[w]) + [h==0]*(u*P0[w] + v*P1[w])
                          (P0 must be 0/1 valued: it is Pr[0, :] = delta_w0)
  * ``sbn_grad_stats``  -> sums [sum dy, sum dy*t, sum_row0 dy*P0, sum_row0 dy*P1]
  * ``sbn_backward_apply`` dx = c_dy*dy + c_t*t + c_R*R + c_A*A*(-1)^w + cst
                                + [h==0]*(u*P0[w] + v*P1[w])

P0/P1 are two length-W vectors chosen by the caller (Re D / Im D for the statistics and for dx,
Pr[0,:] / Pi[0,:] for y and for the gradient sums).  Strides are kernel arguments, so NCHW,
channels_last and strided views all work.  Reductions are written as fp32 (fp64 for fp64 input)
partial sums to a (C, n_chunks, n_sums) buffer that the caller combines with a deterministic
torch sum: no atomics.

FFT path: one fused kernel per channel over the half spectrum viewed as real pairs
(statistics + normalize + affine), and its backward counterpart.
"""


import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sbn_stats_kernel(x_ptr, coef_ptr, p_ptr, part_ptr,
                      NH, H, W, sN, sC, sH, sW, rows_per_chunk, n_chunks,
                      ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    c = tl.program_id(0)
    chunk = tl.program_id(1)
    K = tl.load(coef_ptr + c).to(ACC)
    r_start = chunk * rows_per_chunk
    r_end = tl.minimum(r_start + rows_per_chunk, NH)
    acc1 = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    acc2 = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    acc_d0 = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    acc_d1 = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    acc_r = tl.zeros([BLOCK_R], dtype=ACC)
    acc_a = tl.zeros([BLOCK_R], dtype=ACC)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        rows64 = rows.to(tl.int64)
        n = rows64 // H
        h = rows64 % H
        base = n * sN + c.to(tl.int64) * sC + h * sH
        is_row0 = (h == 0) & rmask
        R = tl.zeros([BLOCK_R], dtype=ACC)
        A = tl.zeros([BLOCK_R], dtype=ACC)
        for w0 in range(0, W, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            cmask = cols < W
            m = rmask[:, None] & cmask[None, :]
            v = tl.load(x_ptr + base[:, None] + cols[None, :].to(tl.int64) * sW, mask=m, other=0.0)
            t = tl.where(m, v.to(ACC) - K, 0.0)
            acc1 += t
            acc2 += t * t
            sgn = (1 - 2 * (cols % 2)).to(ACC)
            R += tl.sum(t, axis=1)
            A += tl.sum(t * sgn[None, :], axis=1)
            p0 = tl.load(p_ptr + cols, mask=cmask, other=0.0).to(ACC)
            p1 = tl.load(p_ptr + W + cols, mask=cmask, other=0.0).to(ACC)
            t0 = tl.where(is_row0[:, None], t, 0.0)
            acc_d0 += t0 * p0[None, :]
            acc_d1 += t0 * p1[None, :]
        acc_r += R * R
        acc_a += A * A
    out = part_ptr + (c * n_chunks + chunk) * 6
    tl.store(out + 0, tl.sum(tl.sum(acc1, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(acc2, axis=1), axis=0))
    tl.store(out + 2, tl.sum(acc_r, axis=0))
    tl.store(out + 3, tl.sum(acc_a, axis=0))
    tl.store(out + 4, tl.sum(tl.sum(acc_d0, axis=1), axis=0))
    tl.store(out + 5, tl.sum(tl.sum(acc_d1, axis=1), axis=0))


@triton.jit
def _sbn_grad_stats_kernel(dy_ptr, x_ptr, coef_ptr, p_ptr, part_ptr,
                           NH, H, W, dN, dC, dH, dW, sN, sC, sH, sW, rows_per_chunk, n_chunks,
                           ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    c = tl.program_id(0)
    chunk = tl.program_id(1)
    K = tl.load(coef_ptr + c).to(ACC)
    r_start = chunk * rows_per_chunk
    r_end = tl.minimum(r_start + rows_per_chunk, NH)
    acc_dy = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    acc_dt = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    acc_0 = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    acc_1 = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    c64 = c.to(tl.int64)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        rows64 = rows.to(tl.int64)
        n = rows64 // H
        h = rows64 % H
        xbase = n * sN + c64 * sC + h * sH
        dbase = n * dN + c64 * dC + h * dH
        is_row0 = (h == 0) & rmask
        for w0 in range(0, W, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            cmask = cols < W
            cols64 = cols.to(tl.int64)
            m = rmask[:, None] & cmask[None, :]
            xv = tl.load(x_ptr + xbase[:, None] + cols64[None, :] * sW, mask=m, other=0.0)
            g = tl.load(dy_ptr + dbase[:, None] + cols64[None, :] * dW, mask=m, other=0.0).to(ACC)
            t = tl.where(m, xv.to(ACC) - K, 0.0)
            acc_dy += g
            acc_dt += g * t
            p0 = tl.load(p_ptr + cols, mask=cmask, other=0.0).to(ACC)
            p1 = tl.load(p_ptr + W + cols, mask=cmask, other=0.0).to(ACC)
            g0 = tl.where(is_row0[:, None], g, 0.0)
            acc_0 += g0 * p0[None, :]
            acc_1 += g0 * p1[None, :]
    out = part_ptr + (c * n_chunks + chunk) * 4
    tl.store(out + 0, tl.sum(tl.sum(acc_dy, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(acc_dt, axis=1), axis=0))
    tl.store(out + 2, tl.sum(tl.sum(acc_0, axis=1), axis=0))
    tl.store(out + 3, tl.sum(tl.sum(acc_1, axis=1), axis=0))


@triton.jit
def _sbn_fwd_apply_kernel(x_ptr, y_ptr, coef_ptr, p_ptr,
                          NH, H, W, sN, sC, sH, sW, yN, yC, yH, yW, rows_per_chunk,
                          ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    # coef[c] = [K, cx, b, u, v]
    c = tl.program_id(0)
    chunk = tl.program_id(1)
    cp = coef_ptr + c * 5
    K = tl.load(cp + 0).to(ACC)
    cx = tl.load(cp + 1).to(ACC)
    b = tl.load(cp + 2).to(ACC)
    u = tl.load(cp + 3).to(ACC)
    v = tl.load(cp + 4).to(ACC)
    c64 = c.to(tl.int64)
    r_start = chunk * rows_per_chunk
    r_end = tl.minimum(r_start + rows_per_chunk, NH)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        rows64 = rows.to(tl.int64)
        n = rows64 // H
        h = rows64 % H
        xbase = n * sN + c64 * sC + h * sH
        ybase = n * yN + c64 * yC + h * yH
        is_row0 = h == 0
        for w0 in range(0, W, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            cmask = cols < W
            cols64 = cols.to(tl.int64)
            m = rmask[:, None] & cmask[None, :]
            xv = tl.load(x_ptr + xbase[:, None] + cols64[None, :] * sW, mask=m, other=0.0).to(ACC)
            p0 = tl.load(p_ptr + cols, mask=cmask, other=0.0).to(ACC)
            p1 = tl.load(p_ptr + W + cols, mask=cmask, other=0.0).to(ACC)
            # on row 0, b is replaced by u where P0 = 1 (P0 = Pr[0, :] is 0/1), so that
            # b - a*Re(mu) cancellations happen in float64 in the finalize, not here
            row_term = b * (1.0 - p0) + u * p0 + v * p1
            y = cx * (xv - K) + tl.where(is_row0[:, None], row_term[None, :], b)
            tl.store(y_ptr + ybase[:, None] + cols64[None, :] * yW,
                     y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sbn_bwd_apply_kernel(dy_ptr, x_ptr, dx_ptr, coef_ptr, p_ptr,
                          NH, H, W, dN, dC, dH, dW, sN, sC, sH, sW, oN, oC, oH, oW,
                          rows_per_chunk,
                          NEED_ROW: tl.constexpr, ONE_TILE: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    # coef[c] = [K, c_dy, c_t, c_R, c_A, cst, u, v]
    c = tl.program_id(0)
    chunk = tl.program_id(1)
    cp = coef_ptr + c * 8
    K = tl.load(cp + 0).to(ACC)
    c_dy = tl.load(cp + 1).to(ACC)
    c_t = tl.load(cp + 2).to(ACC)
    c_R = tl.load(cp + 3).to(ACC)
    c_A = tl.load(cp + 4).to(ACC)
    cst = tl.load(cp + 5).to(ACC)
    u = tl.load(cp + 6).to(ACC)
    v = tl.load(cp + 7).to(ACC)
    c64 = c.to(tl.int64)
    r_start = chunk * rows_per_chunk
    r_end = tl.minimum(r_start + rows_per_chunk, NH)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        rows64 = rows.to(tl.int64)
        n = rows64 // H
        h = rows64 % H
        xbase = n * sN + c64 * sC + h * sH
        dbase = n * dN + c64 * dC + h * dH
        obase = n * oN + c64 * oC + h * oH
        is_row0 = h == 0
        if ONE_TILE:
            cols = tl.arange(0, BLOCK_W)
            cmask = cols < W
            cols64 = cols.to(tl.int64)
            m = rmask[:, None] & cmask[None, :]
            xv = tl.load(x_ptr + xbase[:, None] + cols64[None, :] * sW, mask=m, other=0.0)
            t = tl.where(m, xv.to(ACC) - K, 0.0)
            g = tl.load(dy_ptr + dbase[:, None] + cols64[None, :] * dW, mask=m, other=0.0).to(ACC)
            sgn = (1 - 2 * (cols % 2)).to(ACC)
            p0 = tl.load(p_ptr + cols, mask=cmask, other=0.0).to(ACC)
            p1 = tl.load(p_ptr + W + cols, mask=cmask, other=0.0).to(ACC)
            row_term = u * p0 + v * p1
            out = c_dy * g + c_t * t + cst + tl.where(is_row0[:, None], row_term[None, :], 0.0)
            if NEED_ROW:
                R = tl.sum(t, axis=1)
                A = tl.sum(t * sgn[None, :], axis=1)
                out += c_R * R[:, None] + (c_A * A)[:, None] * sgn[None, :]
            tl.store(dx_ptr + obase[:, None] + cols64[None, :] * oW,
                     out.to(dx_ptr.dtype.element_ty), mask=m)
        else:
            R = tl.zeros([BLOCK_R], dtype=ACC)
            A = tl.zeros([BLOCK_R], dtype=ACC)
            if NEED_ROW:
                for w0 in range(0, W, BLOCK_W):
                    cols = w0 + tl.arange(0, BLOCK_W)
                    cmask = cols < W
                    m = rmask[:, None] & cmask[None, :]
                    xv = tl.load(x_ptr + xbase[:, None] + cols[None, :].to(tl.int64) * sW,
                                 mask=m, other=0.0)
                    t = tl.where(m, xv.to(ACC) - K, 0.0)
                    sgn = (1 - 2 * (cols % 2)).to(ACC)
                    R += tl.sum(t, axis=1)
                    A += tl.sum(t * sgn[None, :], axis=1)
            for w0 in range(0, W, BLOCK_W):
                cols = w0 + tl.arange(0, BLOCK_W)
                cmask = cols < W
                cols64 = cols.to(tl.int64)
                m = rmask[:, None] & cmask[None, :]
                xv = tl.load(x_ptr + xbase[:, None] + cols64[None, :] * sW, mask=m, other=0.0)
                t = tl.where(m, xv.to(ACC) - K, 0.0)
                g = tl.load(dy_ptr + dbase[:, None] + cols64[None, :] * dW,
                            mask=m, other=0.0).to(ACC)
                sgn = (1 - 2 * (cols % 2)).to(ACC)
                p0 = tl.load(p_ptr + cols, mask=cmask, other=0.0).to(ACC)
                p1 = tl.load(p_ptr + W + cols, mask=cmask, other=0.0).to(ACC)
                row_term = u * p0 + v * p1
                out = c_dy * g + c_t * t + cst + tl.where(is_row0[:, None], row_term[None, :], 0.0)
                out += c_R * R[:, None] + (c_A * A)[:, None] * sgn[None, :]
                tl.store(dx_ptr + obase[:, None] + cols64[None, :] * oW,
                         out.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sbn_fft_fwd_kernel(X_ptr, Y_ptr, stat_ptr, w_ptr, b_ptr, N, L2, CL2, M, eps,
                        TRAIN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        ACC: tl.constexpr, BLOCK: tl.constexpr):
    # X, Y: contiguous (N, C, H, Wr, 2) real views of the half spectrum; L2 = 2*H*Wr.
    # stat[c] = [Re mu, Im mu, var] (written in training, read in eval).
    c = tl.program_id(0)
    c64 = c.to(tl.int64)
    total = N * L2
    if TRAIN:
        # shift by the channel's first coefficient (stable for huge DC terms)
        sr = tl.load(X_ptr + c64 * L2).to(ACC)
        si = tl.load(X_ptr + c64 * L2 + 1).to(ACC)
        a_re = tl.zeros([BLOCK], dtype=ACC)
        a_im = tl.zeros([BLOCK], dtype=ACC)
        a_sq = tl.zeros([BLOCK], dtype=ACC)
        for i0 in range(0, total, BLOCK):
            idx = i0 + tl.arange(0, BLOCK)
            msk = idx < total
            idx64 = idx.to(tl.int64)
            n = idx64 // L2
            j = idx64 % L2
            is_re = (j % 2) == 0
            v = tl.load(X_ptr + n * CL2 + c64 * L2 + j, mask=msk, other=0.0).to(ACC)
            d = tl.where(msk, v - tl.where(is_re, sr, si), 0.0)
            a_re += tl.where(is_re, d, 0.0)
            a_im += tl.where(is_re, 0.0, d)
            a_sq += d * d
        mr_d = tl.sum(a_re, axis=0) / M
        mi_d = tl.sum(a_im, axis=0) / M
        var = tl.sum(a_sq, axis=0) / M - mr_d * mr_d - mi_d * mi_d
        var = tl.maximum(var, 0.0)
        mr = mr_d + sr
        mi = mi_d + si
        tl.store(stat_ptr + c * 3 + 0, mr)
        tl.store(stat_ptr + c * 3 + 1, mi)
        tl.store(stat_ptr + c * 3 + 2, var)
    else:
        mr = tl.load(stat_ptr + c * 3 + 0).to(ACC)
        mi = tl.load(stat_ptr + c * 3 + 1).to(ACC)
        var = tl.load(stat_ptr + c * 3 + 2).to(ACC)
    s = tl.sqrt(var + eps)
    if HAS_W:
        a = tl.load(w_ptr + c).to(ACC) / s
    else:
        a = 1.0 / s
    if HAS_B:
        beta = tl.load(b_ptr + c).to(ACC)
    else:
        beta = 0.0
    for i0 in range(0, total, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        msk = idx < total
        idx64 = idx.to(tl.int64)
        n = idx64 // L2
        j = idx64 % L2
        is_re = (j % 2) == 0
        off = n * CL2 + c64 * L2 + j
        v = tl.load(X_ptr + off, mask=msk, other=0.0).to(ACC)
        y = a * (v - tl.where(is_re, mr, mi)) + tl.where(is_re, beta, 0.0)
        tl.store(Y_ptr + off, y.to(Y_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _sbn_fft_bwd_kernel(G_ptr, X_ptr, O_ptr, stat_ptr, w_ptr, grad_ptr,
                        N, L2, CL2, Wr, W, HW, M, eps,
                        TRAIN: tl.constexpr, HAS_W: tl.constexpr,
                        ACC: tl.constexpr, BLOCK: tl.constexpr):
    # G = rfft2(dy) (real view), X = rfft2(x) (real view), O = HW/c_l * dX so that
    # dx = irfft2(O).  c_l = 1 for the self-conjugate columns l = 0 and l = W/2, else 2.
    # grad[c] = [dgamma, dbeta].
    c = tl.program_id(0)
    c64 = c.to(tl.int64)
    total = N * L2
    mr = tl.load(stat_ptr + c * 3 + 0).to(ACC)
    mi = tl.load(stat_ptr + c * 3 + 1).to(ACC)
    var = tl.load(stat_ptr + c * 3 + 2).to(ACC)
    s = tl.sqrt(var + eps)
    if HAS_W:
        a = tl.load(w_ptr + c).to(ACC) / s
    else:
        a = 1.0 / s
    a_re = tl.zeros([BLOCK], dtype=ACC)
    a_im = tl.zeros([BLOCK], dtype=ACC)
    a_gx = tl.zeros([BLOCK], dtype=ACC)
    for i0 in range(0, total, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        msk = idx < total
        idx64 = idx.to(tl.int64)
        n = idx64 // L2
        j = idx64 % L2
        is_re = (j % 2) == 0
        col = (j // 2) % Wr
        cl = tl.where((col == 0) | (col * 2 == W), 1.0, 2.0).to(ACC)
        off = n * CL2 + c64 * L2 + j
        g = tl.load(G_ptr + off, mask=msk, other=0.0).to(ACC) * cl / HW
        xv = tl.load(X_ptr + off, mask=msk, other=0.0).to(ACC)
        xh = (xv - tl.where(is_re, mr, mi)) / s
        g = tl.where(msk, g, 0.0)
        a_re += tl.where(is_re, g, 0.0)
        a_im += tl.where(is_re, 0.0, g)
        a_gx += g * xh
    dbeta = tl.sum(a_re, axis=0)
    dgamma = tl.sum(a_gx, axis=0)
    tl.store(grad_ptr + c * 2 + 0, dgamma)
    tl.store(grad_ptr + c * 2 + 1, dbeta)
    mean_r = dbeta / M
    mean_i = tl.sum(a_im, axis=0) / M
    kx = dgamma / M
    for i0 in range(0, total, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        msk = idx < total
        idx64 = idx.to(tl.int64)
        n = idx64 // L2
        j = idx64 % L2
        is_re = (j % 2) == 0
        col = (j // 2) % Wr
        cl = tl.where((col == 0) | (col * 2 == W), 1.0, 2.0).to(ACC)
        off = n * CL2 + c64 * L2 + j
        g = tl.load(G_ptr + off, mask=msk, other=0.0).to(ACC) * cl / HW
        if TRAIN:
            xv = tl.load(X_ptr + off, mask=msk, other=0.0).to(ACC)
            xh = (xv - tl.where(is_re, mr, mi)) / s
            dX = a * (g - tl.where(is_re, mean_r, mean_i) - xh * kx)
        else:
            dX = a * g
        tl.store(O_ptr + off, (dX * HW / cl).to(O_ptr.dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------------------------
# host launch functions
# ----------------------------------------------------------------------------------------------

def _acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_SM_CACHE: dict = {}
MIN_CHUNK_ELEMS = 8192      # smallest (channel, chunk) program worth launching


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_CACHE:
        _SM_CACHE[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 8 * _SM_CACHE[idx]


def _tiles(W: int, tile: int) -> tuple[int, int]:
    block_w = min(triton.next_power_of_2(max(W, 1)), 256)
    block_r = max(1, tile // block_w)
    return block_r, block_w


def _chunking(x: torch.Tensor, NH: int, W: int, C: int, block_r: int) -> tuple[int, int]:
    """(rows_per_chunk, n_chunks): enough (channel, chunk) programs to fill the device, each
    chunk a multiple of block_r rows and not smaller than MIN_CHUNK_ELEMS elements."""
    target = _target_programs(x.device)
    want = max(1, -(-target // C))
    min_rows = max(block_r, -(-MIN_CHUNK_ELEMS // max(W, 1)))
    max_chunks = max(1, -(-NH // min_rows))
    n_chunks = min(want, max_chunks)
    rows = -(-NH // n_chunks)
    rows = -(-rows // block_r) * block_r
    n_chunks = -(-NH // rows)
    return rows, n_chunks


def _num_warps(block_r: int, block_w: int) -> int:
    return 8 if block_r * block_w >= 2048 else 4


def sbn_stats(x: torch.Tensor, K: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Per-channel sums of t = x - K: [sum t, sum t^2, sum R^2, sum A^2, sum_row0 t*P[0],
    sum_row0 t*P[1]] as a (C, 6) tensor in the accumulation dtype. P: (2, W) acc dtype."""
    N, C, H, W = x.shape
    acc = _acc_torch(x.dtype)
    NH = N * H
    block_r, block_w = _tiles(W, 1024)
    rows, n_chunks = _chunking(x, NH, W, C, block_r)
    part = torch.empty((C, n_chunks, 6), device=x.device, dtype=acc)
    sN, sC, sH, sW = x.stride()
    _sbn_stats_kernel[(C, n_chunks)](
        x, K.contiguous(), P.contiguous(), part, NH, H, W, sN, sC, sH, sW, rows, n_chunks,
        ACC=_acc_tl(x.dtype), BLOCK_R=block_r, BLOCK_W=block_w,
        num_warps=_num_warps(block_r, block_w))
    return part.sum(dim=1)


def sbn_grad_stats(dy: torch.Tensor, x: torch.Tensor, K: torch.Tensor,
                   P: torch.Tensor) -> torch.Tensor:
    """Per-channel [sum dy, sum dy*(x-K), sum_row0 dy*P[0], sum_row0 dy*P[1]] as (C, 4)."""
    N, C, H, W = x.shape
    acc = _acc_torch(x.dtype)
    NH = N * H
    block_r, block_w = _tiles(W, 1024)
    rows, n_chunks = _chunking(x, NH, W, C, block_r)
    part = torch.empty((C, n_chunks, 4), device=x.device, dtype=acc)
    _sbn_grad_stats_kernel[(C, n_chunks)](
        dy, x, K.contiguous(), P.contiguous(), part, NH, H, W, *dy.stride(), *x.stride(),
        rows, n_chunks, ACC=_acc_tl(x.dtype), BLOCK_R=block_r, BLOCK_W=block_w,
        num_warps=_num_warps(block_r, block_w))
    return part.sum(dim=1)


def sbn_forward_apply(x: torch.Tensor, coef: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """y = cx*(x-K) + b*(1 - [h==0]*P[0,w]) + [h==0]*(u*P[0,w] + v*P[1,w]), P[0] 0/1-valued;
    coef (C, 5) = [K, cx, b, u, v]."""
    N, C, H, W = x.shape
    y = torch.empty_like(x)
    NH = N * H
    block_r, block_w = _tiles(W, 2048)
    rows, n_chunks = _chunking(x, NH, W, C, block_r)
    _sbn_fwd_apply_kernel[(C, n_chunks)](
        x, y, coef.contiguous(), P.contiguous(), NH, H, W, *x.stride(), *y.stride(), rows,
        ACC=_acc_tl(x.dtype), BLOCK_R=block_r, BLOCK_W=block_w,
        num_warps=_num_warps(block_r, block_w))
    return y


def sbn_backward_apply(dy: torch.Tensor, x: torch.Tensor, coef: torch.Tensor, P: torch.Tensor,
                       need_row: bool) -> torch.Tensor:
    """dx = c_dy*dy + c_t*t + c_R*R + c_A*A*(-1)^w + cst + [h==0]*(u*P[0,w] + v*P[1,w]);
    coef (C, 8) = [K, c_dy, c_t, c_R, c_A, cst, u, v]."""
    N, C, H, W = x.shape
    dx = torch.empty_like(x)
    NH = N * H
    block_r, block_w = _tiles(W, 2048)
    rows, n_chunks = _chunking(x, NH, W, C, block_r)
    _sbn_bwd_apply_kernel[(C, n_chunks)](
        dy, x, dx, coef.contiguous(), P.contiguous(), NH, H, W, *dy.stride(), *x.stride(),
        *dx.stride(), rows, NEED_ROW=need_row, ONE_TILE=W <= block_w,
        ACC=_acc_tl(x.dtype), BLOCK_R=block_r, BLOCK_W=block_w,
        num_warps=_num_warps(block_r, block_w))
    return dx


def sbn_fft_spectral_forward(Xr: torch.Tensor, weight, bias, stats: torch.Tensor | None,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Xr: contiguous (N, C, H, Wr, 2) real view of rfft2(x). Returns (Yr, stats (C, 3) =
    [Re mu, Im mu, var]); stats given (eval) are used instead of batch statistics."""
    N, C, H, Wr, _ = Xr.shape
    L2 = 2 * H * Wr
    M = N * H * Wr
    acc = Xr.dtype
    train = stats is None
    st = torch.empty((C, 3), device=Xr.device, dtype=acc) if train else \
        stats.to(acc).contiguous()
    Y = torch.empty_like(Xr)
    block = min(2048, triton.next_power_of_2(max(N * L2, 16)))
    dummy = st
    _sbn_fft_fwd_kernel[(C,)](
        Xr, Y, st, weight if weight is not None else dummy, bias if bias is not None else dummy,
        N, L2, C * L2, M, float(eps), TRAIN=train, HAS_W=weight is not None,
        HAS_B=bias is not None, ACC=_acc_tl(acc), BLOCK=block, num_warps=4)
    return Y, st


def sbn_fft_spectral_backward(Gr: torch.Tensor, Xr: torch.Tensor, weight, stats: torch.Tensor,
                              eps: float, W: int, training: bool
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gr = real view of rfft2(dy), Xr = real view of rfft2(x) (contiguous). Returns
    (O, grads (C, 2) = [dgamma, dbeta]) with dx = irfft2(O, s=(H, W))."""
    N, C, H, Wr, _ = Xr.shape
    L2 = 2 * H * Wr
    M = N * H * Wr
    acc = Xr.dtype
    O = torch.empty_like(Xr)
    grads = torch.empty((C, 2), device=Xr.device, dtype=acc)
    st = stats.to(acc).contiguous()
    block = min(2048, triton.next_power_of_2(max(N * L2, 16)))
    _sbn_fft_bwd_kernel[(C,)](
        Gr, Xr, O, st, weight if weight is not None else st, grads,
        N, L2, C * L2, Wr, W, float(H * W), M, float(eps), TRAIN=training,
        HAS_W=weight is not None, ACC=_acc_tl(acc), BLOCK=block, num_warps=4)
    return O, grads

