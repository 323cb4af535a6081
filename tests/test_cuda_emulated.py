"""The CUDA kernels of csrc/cuda/ executed on the CPU (docs/DESIGN.md section 8, issue #19).

tools/cuda_emu builds csrc/cuda/*.cu as host C++ under an emulation header (a block's threads as
host threads, barriers, warp shuffles, per-block __shared__ poisoned with NaN, cooperative grid
sync, tiny emulated devices) and registers the very same host code for CPU tensors as
torch.ops.normkernels_cuda_emu.* with the schemas of normkernels::*. Every op is checked against
the float64 literal (tests/references.py) or the torch oracle of its piece
(normkernels/ops/l2bn.py), on tiny tensors chosen so that every path of the launch planning runs:
the team sizes of the statistics pass, long rows split into segments, channels_last with and
without 16-byte channel vectors, grid-stride loops, the cooperative finalize and its two-launch
fallback. Scratch memory from at::empty is NaN (torch's deterministic fill), so a read of a value
never written shows.

Needs only a C++ compiler: it runs (never skips) wherever the tests run; the build is cached in
build/cuda_emu (first build ~40 s on 2 cores).
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from normkernels.ops import l2bn as L
from references import l2bn_reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                                "cuda_emu"))
import emu_build  # noqa: E402

ACTS = ["identity", "relu", "leaky_relu", "silu"]
SLOPE = 0.1
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@pytest.fixture(scope="module")
def emu():
    return emu_build.load()


@pytest.fixture(autouse=True)
def nan_filled_empty():
    """at::empty returns NaN-filled memory: outputs or scratch read before written show."""
    det, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(det)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture
def on_device(emu):
    """on_device(i): the next launches run on emulated device i; back to device 0 afterwards."""
    yield emu.emu_set_device
    emu.emu_set_device(0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _act(y, act):
    return {"identity": lambda t: t, "relu": F.relu, "silu": F.silu,
            "leaky_relu": lambda t: F.leaky_relu(t, SLOPE)}[act](y)


def _misaligned(shape, dtype, seed):
    """x whose data starts one element past a 16-byte boundary."""
    n = 1
    for s in shape:
        n *= s
    base = _randn((n + 1,), seed, dtype)
    x = base[1:].view(shape)
    assert x.storage_offset() == 1
    return x


def make_x(shape, dtype=torch.float32, layout="ncs", seed=0, offset=0.0):
    if layout == "misaligned":
        return _misaligned(shape, dtype, seed) + offset
    if layout == "nsc3d":  # (N, C, L) with strides (L*C, 1, C)
        n, c, l = shape
        return (_randn((n, l, c), seed) + offset).to(dtype).transpose(1, 2)
    x = (_randn(shape, seed) + offset).to(dtype)
    if layout == "nsc":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _close(got, ref, tol, what):
    got = got.detach().double()
    assert got.shape == ref.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} (tolerance {tol * scale:.3e})"


def check_layer(emu, x, *, act="identity", eval_mode=False, rescale=False, affine=True, seed=0,
                tol=None):
    """l2bn_forward and l2bn_backward (emulated) against autograd through the float64 literal."""
    C = x.shape[1]
    tol = TOL[x.dtype] if tol is None else tol
    pdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = (torch.rand(C, generator=_gen(seed + 1), dtype=pdt) + 0.5) if affine else None
    b = _randn(C, seed + 2, pdt) if affine else None
    mean = var = None
    if eval_mode:
        mean = _randn(C, seed + 3, pdt) * 0.1
        var = torch.rand(C, generator=_gen(seed + 4), dtype=pdt) * 0.02 + 0.01
    dy = _randn(x.shape, seed + 5, x.dtype)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        dy = dy.contiguous(memory_format=torch.channels_last)
    y, bm, bv, saved = emu.l2bn_forward(x, w, b, mean, var, 1e-5, 1e-12, rescale, act, SLOPE)
    dx, dw, db = emu.l2bn_backward(dy, x, w, saved, not eval_mode, act, SLOPE)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and y.shape == x.shape
    assert y.stride() == L._out_like(x).stride() and dx.stride() == y.stride()

    xd = x.detach().double().requires_grad_()
    wd = w.double().requires_grad_() if affine else None
    bd = b.double().requires_grad_() if affine else None
    yr = _act(l2bn_reference(xd, wd, bd, None if mean is None else mean.double(),
                             None if var is None else var.double(), training=not eval_mode,
                             rescale=rescale), act)
    _close(y, yr, tol, "y")
    if not eval_mode:
        u = F.normalize(x.double().flatten(1), dim=1, eps=1e-12).view_as(x)
        if rescale:
            u = u * x[0].numel() ** 0.5
        dims = [0] + list(range(2, x.dim()))
        _close(bm, u.mean(dims), tol, "batch_mean")
        _close(bv, u.var(dims, unbiased=False), tol, "batch_var")
    ins = [t for t in (xd, wd, bd) if t is not None]
    grads = torch.autograd.grad(yr, ins, dy.double())
    for name, got, ref in zip(["dx", "dweight", "dbias"], [dx, dw, db], grads):
        _close(got, ref, tol, name)


# --------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["ncs", "nsc", "misaligned"])
def test_layer_dtypes_layouts(emu, dtype, layout):
    # S = 35: not a multiple of any vector width; misaligned: storage offset 1 element
    check_layer(emu, make_x((3, 5, 5, 7), dtype, layout, seed=1))
    # 8 channels: 16-byte channel vectors in channels_last for every dtype
    check_layer(emu, make_x((2, 8, 3, 4), dtype, layout, seed=2), act="silu")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_activations(emu, act, layout):
    x = make_x((3, 4, 5, 6), torch.float64, layout, seed=3)
    check_layer(emu, x, act=act)
    check_layer(emu, x, act=act, eval_mode=True, rescale=True)
    check_layer(emu, x.float(), act=act)


@pytest.mark.parametrize("shape,layout", [((4, 6, 1, 1), "ncs"), ((4, 6, 1, 1), "nsc"), ((5, 3), "ncs"),
                                          ((3, 4, 1), "nsc3d"), ((3, 4, 9), "nsc3d")],
                         ids=["s1", "s1_nsc", "nc", "s1_3d", "nsc3d"])
def test_small_spatial(emu, shape, layout):
    check_layer(emu, make_x(shape, torch.float32, layout, seed=4), act="relu")
    check_layer(emu, make_x(shape, torch.float64, layout, seed=5), eval_mode=True)


@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("rescale", [False, True])
def test_zero_norm_samples(emu, layout, rescale):
    x = make_x((4, 3, 5, 5), torch.float64, layout, seed=6)
    x[1] = 0.0
    x[3] = 0.0
    check_layer(emu, x, rescale=rescale)
    check_layer(emu, x.float(), rescale=rescale, act="leaky_relu")


def test_modes(emu):
    x = make_x((4, 3, 5, 7), torch.float32, seed=7, offset=30.0)  # large mean: shifted sums
    check_layer(emu, x, tol=5e-4)
    check_layer(emu, make_x((4, 3, 5, 7), torch.float32, seed=8), affine=False)
    check_layer(emu, make_x((4, 3, 5, 7), torch.float32, "nsc", seed=9), eval_mode=True, act="silu")


# Every path of the planning, on each emulated device (2 SMs x 2 blocks; 1 SM x 1 block; 3 SMs x
# 2 blocks without cooperative launch: the two-launch finalize).
PLAN_CASES = {
    # statistics pass in NCS: team of 4, 8, 16, 32 lanes and the whole block (float: 4-wide vectors)
    "teams": [((2, 3, 4, 5), "ncs"), ((2, 3, 5, 7), "ncs"), ((2, 3, 10, 10), "ncs"), ((2, 3, 10, 20), "ncs"),
              ((2, 2, 40, 40), "ncs")],
    # long rows cut into segments (few rows, >= 2 x 4096 values per row)
    "split_ncs": [((1, 2, 96, 96), "ncs")],
    # channels_last: few (n, channel tile) items, rows cut into segments; scalar and vector channels
    "split_nsc": [((1, 3, 32, 32), "nsc"), ((1, 8, 24, 24), "nsc")],
    # more rows / samples / channel tiles than the grid: grid-stride loops everywhere
    "grid_stride": [((20, 70, 2, 2), "ncs"), ((20, 70, 2, 2), "nsc"), ((40, 3, 1, 1), "ncs"),
                    ((3, 3, 65, 65), "ncs")],   # the last: rows for a whole block, more rows than blocks
}


@pytest.mark.parametrize("device_index", [0, 1, 2])
@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_launch_planning(emu, on_device, device_index, case):
    on_device(device_index)
    for i, (shape, layout) in enumerate(PLAN_CASES[case]):
        check_layer(emu, make_x(shape, torch.float32, layout, seed=10 + i), act="silu", tol=2e-4)


def test_emulated_devices(emu):
    devs = [list(emu.emu_device(i)) for i in range(emu.emu_device_count())]
    assert [1, 1, 1] in devs and any(d[2] == 0 for d in devs) and max(d[0] for d in devs) <= 3


# --------------------------------------------------------------------------- the pieces
def _pieces_inputs(dtype, layout, seed, zero_sample=False):
    x = make_x((4, 3, 5, 6), dtype, layout, seed=seed) * 2 + 0.5
    if layout == "nsc":
        x = x.contiguous(memory_format=torch.channels_last)
    if zero_sample:
        x[1] = 0
    w = torch.rand(3, generator=_gen(seed + 1)) + 0.5
    b = _randn(3, seed + 2, torch.float32)
    dy = _randn(x.shape, seed + 3, dtype)
    if layout == "nsc":
        dy = dy.contiguous(memory_format=torch.channels_last)
    return x, w, b, dy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["train", "eval", "zero_norm_nsc", "silu_nsc"])
def test_pieces_match_torch_pieces(emu, dtype, mode):
    """stats / finish / grad_stats / grad_finish / sample_stats against the torch oracle's pieces
    on the same inputs."""
    layout = "nsc" if mode.endswith("nsc") else "ncs"
    x, w, b, dy = _pieces_inputs(dtype, layout, 50, zero_sample=mode.startswith("zero"))
    act = "silu" if mode.startswith("silu") else "identity"
    rescale = mode == "train"
    mean = var = None
    if mode == "eval":
        mean, var = _randn(3, 51, torch.float32) * 0.1, torch.rand(3, generator=_gen(52)) + 0.5
    f64 = dtype == torch.float64
    tol = dict(rtol=1e-10, atol=1e-10) if f64 else dict(rtol=2e-4, atol=2e-4)
    stats, rows = emu.l2bn_stats(x, 1e-12, rescale)
    stats_t, rows_t = L.stats_torch(x, 1e-12, rescale)
    torch.testing.assert_close(stats, stats_t, **tol)
    torch.testing.assert_close(rows, rows_t, **tol)
    m, m2 = emu.l2bn_sample_stats(x)
    mt, m2t = L.stats_pass_torch(x)
    torch.testing.assert_close(m, mt, **tol)
    torch.testing.assert_close(m2, m2t, **tol)
    rows_all = None if mode == "eval" else rows_t[None]
    args = (w, b, mean, var, 1e-5, 1e-12, rescale, act, SLOPE)
    out = emu.l2bn_finish(x, stats_t, rows_all, *args)
    ref = L.finish_torch(x, stats_t, rows_all, *args)
    out_tol = tol if f64 else dict(rtol=TOL[dtype], atol=TOL[dtype])
    for name, a, r in zip(["y", "batch_mean", "batch_var", "saved"], out, ref):
        torch.testing.assert_close(a, r, **(out_tol if name == "y" else tol), msg=name)
    saved = ref[3]
    sums, grows = emu.l2bn_grad_stats(dy, x, saved, act, SLOPE)
    sums_t, grows_t = L.grad_stats_torch(dy, x, saved, act, SLOPE)
    torch.testing.assert_close(sums, sums_t, **tol)
    torch.testing.assert_close(grows, grows_t, **tol)
    g_all = None if mode == "eval" else grows_t
    out = emu.l2bn_grad_finish(dy, x, w, saved, sums_t, grows_t, g_all, act, SLOPE)
    ref = L.grad_finish_torch(dy, x, w, saved, sums_t, grows_t, g_all, act, SLOPE)
    for name, a, r in zip(["dx", "dweight", "dbias"], out, ref):
        torch.testing.assert_close(a, r, **(out_tol if name == "dx" else tol), msg=name)


@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_top_level_ops_are_their_pieces(emu, layout):
    """l2bn_forward / l2bn_backward equal the composition of the pieces bitwise."""
    x, w, b, dy = _pieces_inputs(torch.float32, layout, 60)
    fused = emu.l2bn_forward(x, w, b, None, None, 1e-5, 1e-12, True, "silu", SLOPE)
    stats, rows = emu.l2bn_stats(x, 1e-12, True)
    piece = emu.l2bn_finish(x, stats, rows[None], w, b, None, None, 1e-5, 1e-12, True, "silu", SLOPE)
    for a, r in zip(fused, piece):
        assert torch.equal(a, r)
    fused_b = emu.l2bn_backward(dy, x, w, fused[3], True, "silu", SLOPE)
    sums, grows = emu.l2bn_grad_stats(dy, x, fused[3], "silu", SLOPE)
    piece_b = emu.l2bn_grad_finish(dy, x, w, fused[3], sums, grows, grows, "silu", SLOPE)
    for a, r in zip(fused_b, piece_b):
        assert torch.equal(a, r)


def test_group_rows_equal_concatenated_batch(emu):
    """A synchronized group of 3 processes (the second one empty, N = 0): the emulated pieces on
    the gathered / summed rows equal the torch oracle on the concatenated batch."""
    x = _randn((5, 3, 4, 6), 70) + 2
    dy = _randn(x.shape, 71)
    w = torch.rand(3, generator=_gen(72), dtype=torch.float64) + 0.5
    b = _randn(3, 73)
    xs, dys = [x[:2], x[2:2], x[2:]], [dy[:2], dy[2:2], dy[2:]]
    stats = [emu.l2bn_stats(xp, 1e-12, True) for xp in xs]
    rows_all = torch.stack([r for _, r in stats])
    outs = [emu.l2bn_finish(xp, st, rows_all, w, b, None, None, 1e-5, 1e-12, True, "leaky_relu", SLOPE)
            for xp, (st, _) in zip(xs, stats)]
    gstats = [emu.l2bn_grad_stats(dp, xp, o[3], "leaky_relu", SLOPE) for dp, xp, o in zip(dys, xs, outs)]
    grows_all = sum(g for _, g in gstats)
    grads = [emu.l2bn_grad_finish(dp, xp, w, o[3], s, g, grows_all, "leaky_relu", SLOPE)
             for dp, xp, o, (s, g) in zip(dys, xs, outs, gstats)]
    y_ref, bm_ref, bv_ref, saved = L.torch_l2bn_forward(x, w, b, None, None, 1e-5, 1e-12, True, "leaky_relu", SLOPE)
    dx_ref, dw_ref, db_ref = L.torch_l2bn_backward(dy, x, w, saved, True, "leaky_relu", SLOPE)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([o[0] for o in outs]), y_ref, **tol)
    for o in outs:
        torch.testing.assert_close(o[1], bm_ref, **tol)
        torch.testing.assert_close(o[2], bv_ref, **tol)
    torch.testing.assert_close(torch.cat([g[0] for g in grads]), dx_ref, **tol)
    torch.testing.assert_close(sum(g[1] for g in grads), dw_ref, **tol)
    torch.testing.assert_close(sum(g[2] for g in grads), db_ref, **tol)


def test_deterministic(emu, on_device):
    """Fixed reduction orders: two runs agree bitwise, and so do devices with the same plan."""
    x, w, b, dy = _pieces_inputs(torch.float32, "ncs", 80)

    def run():
        out = emu.l2bn_forward(x, w, b, None, None, 1e-5, 1e-12, False, "relu", 0.0)
        return out + emu.l2bn_backward(dy, x, w, out[3], True, "relu", 0.0)

    first = run()
    for a, r in zip(run(), first):
        assert torch.equal(a, r)


# --------------------------------------------------------------------------- running statistics
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum", [0.1, -1.0], ids=["momentum", "cumulative"])
def test_running_stats_update(emu, dtype, momentum):
    C = 300  # more channels than the block's 256 threads
    rm, rv = _randn(C, 90, dtype), (torch.rand(C, generator=_gen(91)) + 0.5).to(dtype)
    bdt = torch.float64 if dtype == torch.float64 else torch.float32
    bm, bv = _randn(C, 92, bdt), torch.rand(C, generator=_gen(93), dtype=bdt) + 0.5
    nbt = torch.tensor(4)
    m, v, n = rm.clone(), rv.clone(), nbt.clone()
    emu.running_stats_update_(m, v, n, bm, bv, momentum, 1.25)
    assert n.item() == 5
    f = momentum if momentum >= 0 else 1 / 5
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(m.double(), (1 - f) * rm.double() + f * bm.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(v.double(), (1 - f) * rv.double() + f * 1.25 * bv.double(), rtol=tol, atol=tol)
    m2, v2 = rm.clone(), rv.clone()
    emu.running_stats_update_(m2, v2, None, bm, bv, 0.1, 1.0)
    torch.testing.assert_close(m2.double(), 0.9 * rm.double() + 0.1 * bm.double(), rtol=tol, atol=tol)
