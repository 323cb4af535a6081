"""The dispatcher ops of csrc/sbn.cpp (C++ on CPU, Triton on CUDA) as ops: the compiled finalize
against the torch finalize piece by piece (the same rows in, the same outputs out), a synchronized
group's rows, sbn_sync / bnsbn_sync, opcheck of every op, torch.compile(fullgraph=True) forward and
backward, thread-count determinism and one leaf op per top-level op on CPU."""
import pytest
import torch

from normkernels.ops import sbn as S
from sbn_cases import F64, gen, leaf, make_params, make_x, require_native
from cpu_isa import outputs_per_isa
from op_count import leaf_ops

OPS = ("sbn_stats", "sbn_finish", "sbn_forward", "sbn_grad_stats", "sbn_grad_finish",
       "sbn_backward", "bnsbn_finish", "bnsbn_forward", "bnsbn_grad_finish", "bnsbn_backward")


@pytest.fixture
def ops(device):
    require_native(device)
    return torch.ops.normkernels


def acc_of(dtype):
    return F64 if dtype == F64 else torch.float32


def close(got, ref, rtol, name):
    assert got.shape == ref.shape and got.dtype == ref.dtype, (name, got.shape, ref.shape,
                                                               got.dtype, ref.dtype)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (got.to(F64) - ref.to(F64)).abs().max().item() if ref.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30), (name, err, scale)


def close_cols(got, ref, rtol, name):
    """Column-wise relative comparison of (C, k) float64 tensors (saved, rows, gradient sums)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype == F64, (name, got.shape, ref.shape)
    scale = ref.abs().amax(0).clamp_min(1e-300)
    err = ((got - ref).abs().amax(0) / scale).max().item()
    assert err <= rtol, (name, err)


# rtol of the pass outputs (y, dx) and of the finalize outputs given the same rows
PASS_TOL = {F64: 1e-13, torch.float32: 2e-6, torch.float16: 2e-3}
FIN_TOL = 1e-12


def group_batch(device, dtype, g, layout="contiguous"):
    """A batch of 5 split over 3 processes (the middle one empty), each with its own shift."""
    parts = [make_x((2, 3, 4, 6), dtype, device, g, shift=3.0, layout=layout),
             make_x((0, 3, 4, 6), dtype, device, g, layout=layout),
             make_x((3, 3, 4, 6), dtype, device, g, shift=-2.0, layout=layout)]
    return parts, torch.cat(parts)


# ------------------------------------------------------------------------------ pieces
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_stats_pass_matches_torch(device, ops, dtype, layout):
    g = gen(device)
    for shape in ((3, 4, 5, 6), (2, 3, 4, 7), (4, 2, 1, 1), (0, 3, 4, 5)):
        x = make_x(shape, dtype, device, g, shift=1000.0, layout=layout)
        got, ref = ops.sbn_stats(x), S.torch_sbn_stats(x)
        # the sums of t = x - K: accumulation in acc within rows, float64 across
        tol = 1e-12 if dtype == F64 else 1e-5
        assert torch.equal(got[:, :2], ref[:, :2])
        close_cols(got[:, 2:], ref[:, 2:], tol, f"rows {shape}")


def finish_pair(ops, x, rows, w, b, fft_norm, act):
    got = ops.sbn_finish(x, rows, w, b, 1e-5, fft_norm, act, 0.2)
    ref = S.torch_sbn_finish(x, rows, w, b, 1e-5, fft_norm, act, 0.2)
    return got, ref


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fft_norm,act", [("backward", "identity"), ("ortho", "silu"),
                                          ("forward", "relu")])
def test_sbn_finalize_matches_torch_piece_by_piece(device, ops, dtype, affine, fft_norm, act):
    g = gen(device, 1)
    x = make_x((3, 4, 5, 6), dtype, device, g, shift=10.0)
    w, b = make_params(4, device, g) if affine else (None, None)
    rows = S.torch_sbn_stats(x)[None]          # the same rows into both finalizes
    (y, m, v, sv), (yr, mr, vr, svr) = finish_pair(ops, x, rows, w, b, fft_norm, act)
    close_cols(sv, svr, FIN_TOL, "saved")
    close(m, mr, FIN_TOL * 10, "batch_mean")
    close(v, vr, FIN_TOL * 10, "batch_var")
    close(y, yr, PASS_TOL[dtype], "y")
    # backward pieces from the same saved and the same gradient sums
    dy = make_x(x.shape, dtype, device, g)
    gs, gsr = ops.sbn_grad_stats(dy, x, svr, act, 0.2), S.torch_sbn_grad_stats(dy, x, svr, act, 0.2)
    close_cols(gs, gsr, 1e-12 if dtype == F64 else 1e-4, "gsums")
    for training in (True, False):
        got = ops.sbn_grad_finish(dy, x, svr, gsr, gsr, training, fft_norm, act, 0.2)
        ref = S.torch_sbn_grad_finish(dy, x, svr, gsr, gsr, training, fft_norm, act, 0.2)
        close(got[0], ref[0], PASS_TOL[dtype], "dx")
        close(got[1], ref[1], FIN_TOL * 10, "dweight")
        close(got[2], ref[2], FIN_TOL * 10, "dbias")


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16])
@pytest.mark.parametrize("affine", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("fft_norm,act", [("backward", "identity"), ("ortho", "leaky_relu")])
def test_bnsbn_finalize_matches_torch_piece_by_piece(device, ops, dtype, affine, fft_norm, act):
    g = gen(device, 2)
    x = make_x((3, 4, 5, 7), dtype, device, g, shift=-20.0)
    bw, bb = make_params(4, device, g) if affine[0] else (None, None)
    sw, sb = make_params(4, device, g) if affine[1] else (None, None)
    rows = S.torch_sbn_stats(x)[None]
    args = (bw, bb, sw, sb, 1e-5, 2e-5, fft_norm, act, 0.2)
    got = ops.bnsbn_finish(x, rows, 0, *args)
    ref = S.torch_bnsbn_finish(x, rows, 0, *args)
    close_cols(got[5], ref[5], FIN_TOL, "saved")
    for a, r, name in zip(got[1:5], ref[1:5], ("bn_mean", "bn_var", "sbn_mean", "sbn_var")):
        close(a, r, FIN_TOL * 10, name)
    close(got[0], ref[0], PASS_TOL[dtype], "y")
    sv = ref[5]
    dy = make_x(x.shape, dtype, device, g)
    gs = S.torch_sbn_grad_stats(dy, x, sv, act, 0.2)
    close_cols(ops.sbn_grad_stats(dy, x, sv, act, 0.2), gs, 1e-12 if dtype == F64 else 1e-4,
               "gsums")
    for training in (True, False):
        a = ops.bnsbn_grad_finish(dy, x, sv, gs, gs, training, fft_norm, act, 0.2)
        r = S.torch_bnsbn_grad_finish(dy, x, sv, gs, gs, training, fft_norm, act, 0.2)
        close(a[0], r[0], PASS_TOL[dtype], "dx")
        for i in range(1, 5):
            close(a[i], r[i], FIN_TOL * 100, f"param grad {i}")


@pytest.mark.parametrize("layer", ["sbn", "bnsbn"])
def test_eval_forward_matches_torch(device, ops, layer):
    g = gen(device, 3)
    x = make_x((3, 4, 5, 6), torch.float32, device, g)
    w, b = make_params(4, device, g)
    m2 = torch.randn(4, 2, generator=g, device=device)
    var = torch.rand(4, generator=g, device=device) + 0.5
    if layer == "sbn":
        args = (x, w, b, m2, var, 1e-5, "ortho", "relu", 0.0)
        got, ref = ops.sbn_forward(*args), S.torch_sbn_forward(*args)
    else:
        args = (x, w, b, var - 0.2, var, b, w, m2, var * 3, 1e-5, 1e-5, "ortho", "relu", 0.0)
        got, ref = ops.bnsbn_forward(*args), S.torch_bnsbn_forward(*args)
    close_cols(got[-1], ref[-1], FIN_TOL, "saved")
    close(got[0], ref[0], PASS_TOL[torch.float32], "y")
    for a, r in zip(got[1:-1], ref[1:-1]):
        assert torch.equal(a, r)


def test_group_rows_match_the_whole_batch(device, ops):
    """P = 3 processes, one of them empty, each with its own shift: the finish ops on the gathered
    rows give each process exactly its slice of the single-process result on the concatenated
    batch, and match the torch finalize on the same rows."""
    g = gen(device, 4)
    parts, whole = group_batch(device, torch.float64, g)
    w, b = (t.double() for t in make_params(3, device, g))
    rows = torch.stack([ops.sbn_stats(p) for p in parts])
    assert rows[1, :, 0].eq(0).all() and rows[1, :, 1].eq(0).all()
    y_all, m_all, v_all, _ = ops.sbn_forward(whole, w, b, None, None, 1e-5, "ortho", "silu", 0.0)
    bn_all = ops.bnsbn_forward(whole, w, b, None, None, b, w, None, None, 1e-5, 1e-5, "ortho",
                               "silu", 0.0)
    start = 0
    for rank, p in enumerate(parts):
        sl = slice(start, start + p.shape[0])
        start += p.shape[0]
        y, m, v, sv = ops.sbn_finish(p, rows, w, b, 1e-5, "ortho", "silu", 0.0)
        ref = S.torch_sbn_finish(p, rows, w, b, 1e-5, "ortho", "silu", 0.0)
        close_cols(sv, ref[3], FIN_TOL, "saved")
        torch.testing.assert_close(y, y_all[sl], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m, m_all, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v, v_all, rtol=1e-12, atol=1e-12)
        got = ops.bnsbn_finish(p, rows, rank, w, b, b, w, 1e-5, 1e-5, "ortho", "silu", 0.0)
        ref = S.torch_bnsbn_finish(p, rows, rank, w, b, b, w, 1e-5, 1e-5, "ortho", "silu", 0.0)
        close_cols(got[5], ref[5], FIN_TOL, "bnsbn saved")
        torch.testing.assert_close(got[0], bn_all[0][sl], rtol=1e-12, atol=1e-12)
        for a, r in zip(got[1:5], bn_all[1:5]):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
        # the L columns are this process's own sums at the group's shift
        local = S.torch_sbn_stats(p)
        if p.shape[0]:
            moved = S._combine(torch.stack([rows[0], local]), 4, 6, 1)[1]
            torch.testing.assert_close(got[5][:, 20:26], moved, rtol=1e-10, atol=1e-9)
        else:
            assert torch.equal(got[5][:, 20:26], torch.zeros_like(got[5][:, 20:26]))


class FakeReducer:
    """Reducer of process `rank` of a simulated group whose other processes' contributions are
    known in advance (gather: their rows; all_reduce: their gradient sums)."""

    def __init__(self, rank, rows, gsums=None):
        self.rank, self.size, self.rows, self.gsums = rank, len(rows), rows, gsums
        self.calls = []

    def gather(self, t):
        self.calls.append("gather")
        assert torch.equal(t, self.rows[self.rank])
        return torch.stack(self.rows)

    def all_reduce(self, t):
        self.calls.append("all_reduce")
        return t + sum(s for i, s in enumerate(self.gsums) if i != self.rank)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("layer", ["sbn", "bnsbn"])
def test_sync_functions_equal_the_whole_batch(device, backend, layer):
    """sbn_sync / bnsbn_sync on each process of a group (one empty) give that process's slice of the
    single-process output and input gradient, the group's statistics and count, and parameter
    gradients that sum to the single-process ones; one gather forward, one all_reduce backward."""
    if backend == "native":
        require_native(device)
        backend = "cpp" if device.type == "cpu" else "triton"
    g = gen(device, 5)
    parts, whole = group_batch(device, torch.float64, g)
    dys = [torch.randn(p.shape, generator=g, device=device, dtype=F64) for p in parts]
    ps = [t.double() for t in make_params(3, device, g) + make_params(3, device, g)]
    pc = S._pieces(backend)
    rows = [pc.stats(p) for p in parts]
    rows_all = torch.stack(rows)
    if layer == "sbn":
        saved = [pc.finish(p, rows_all, ps[0], ps[1], 1e-5, "ortho", "relu", 0.0)[3] for p in parts]
        entry = S.spectral_batch_norm
        full = [leaf(whole)] + [leaf(t) for t in ps[:2]]
        y_full, *st_full = entry(full[0], full[1], full[2], None, None, 1e-5, "parseval", "ortho",
                                 "relu", 0.0, backend)
    else:
        saved = [pc.bn_finish(p, rows_all, r, *ps, 1e-5, 1e-5, "ortho", "relu", 0.0)[5]
                 for r, p in enumerate(parts)]
        full = [leaf(whole)] + [leaf(t) for t in ps]
        y_full, *st_full = S.batch_norm_sbn(full[0], full[1], full[2], None, None, full[3],
                                            full[4], None, None, 1e-5, 1e-5, "ortho", "relu", 0.0,
                                            backend)
    gsums = [pc.grad_stats(dy, p, sv, "relu", 0.0) for dy, p, sv in zip(dys, parts, saved)]
    y_full.backward(torch.cat(dys))
    pgrad_sum = [torch.zeros_like(t) for t in full[1:]]
    start = 0
    for rank, p in enumerate(parts):
        sl = slice(start, start + p.shape[0])
        start += p.shape[0]
        red = FakeReducer(rank, rows, gsums)
        ins = [leaf(p)] + [leaf(t) for t in ps[:len(full) - 1]]
        if layer == "sbn":
            y, m, v, count = S.sbn_sync(ins[0], ins[1], ins[2], 1e-5, "ortho", "relu", 0.0, backend,
                                        red)
            assert count == 5 * 4 * (6 // 2 + 1)
            stats = (m, v)
        else:
            y, *stats, bn_count, sbn_count = S.bnsbn_sync(*ins, 1e-5, 1e-5, "ortho", "relu", 0.0,
                                                          backend, red)
            assert (bn_count, sbn_count) == (5 * 4 * 6, 5 * 4 * 4)
        torch.testing.assert_close(y, y_full[sl].detach(), rtol=1e-11, atol=1e-11)
        for a, r in zip(stats, st_full):
            torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)
        y.backward(dys[rank])
        assert red.calls == ["gather", "all_reduce"]
        torch.testing.assert_close(ins[0].grad, full[0].grad[sl], rtol=1e-10, atol=1e-11)
        for acc, t in zip(pgrad_sum, ins[1:]):
            acc += t.grad
    for a, t in zip(pgrad_sum, full[1:]):
        torch.testing.assert_close(a, t.grad, rtol=1e-10, atol=1e-11)


def test_bad_piece_arguments_raise_clear_errors(device, ops):
    x = make_x((2, 3, 4, 5), torch.float32, device, gen(device))
    rows = ops.sbn_stats(x)[None]
    with pytest.raises(TypeError, match="float64"):
        ops.sbn_finish(x, rows.float(), None, None, 1e-5, "backward", "identity", 0.0)
    with pytest.raises(ValueError, match="rows_all"):
        ops.sbn_finish(x, rows[0], None, None, 1e-5, "backward", "identity", 0.0)
    with pytest.raises(ValueError, match="rank"):
        ops.bnsbn_finish(x, rows, 1, None, None, None, None, 1e-5, 1e-5, "backward", "identity", 0.0)
    with pytest.raises(ValueError, match="no samples"):
        ops.sbn_finish(x, ops.sbn_stats(x[:0])[None], None, None, 1e-5, "backward", "identity", 0.0)
    saved = ops.sbn_forward(x, None, None, None, None, 1e-5, "backward", "identity", 0.0)[3]
    with pytest.raises(ValueError, match="saved"):
        ops.sbn_backward(x, x, saved[:, :9], True, "backward", "identity", 0.0)
    with pytest.raises(ValueError, match="saved"):
        ops.bnsbn_backward(x, x, saved, True, "backward", "identity", 0.0)
    with pytest.raises(ValueError, match="shape"):
        ops.sbn_backward(x[:1], x, saved, True, "backward", "identity", 0.0)
    with pytest.raises(ValueError, match="rank"):
        ops.sbn_stats(x[0])
    with pytest.raises(TypeError, match="real"):
        ops.sbn_forward(x, None, None, torch.zeros(3, dtype=torch.complex64, device=device),
                        torch.ones(3, device=device), 1e-5, "backward", "identity", 0.0)


# ------------------------------------------------------------------------------ op machinery
def op_cases(device):
    g = gen(device, 6)
    x = make_x((2, 3, 4, 5), torch.float32, device, g)
    dy = make_x(x.shape, torch.float32, device, g)
    w, b = make_params(3, device, g)
    m2, var = torch.randn(3, 2, generator=g, device=device), torch.rand(3, generator=g, device=device) + 1
    o = torch.ops.normkernels
    rows = o.sbn_stats(x)[None]
    sv = o.sbn_forward(x, w, b, None, None, 1e-5, "ortho", "relu", 0.0)[3]
    bsv = o.bnsbn_forward(x, w, b, None, None, b, w, None, None, 1e-5, 1e-5, "ortho", "relu", 0.0)[5]
    gs = o.sbn_grad_stats(dy, x, sv, "relu", 0.0)
    xg, wg, bg = leaf(x), leaf(w), leaf(b)
    return {
        "sbn_stats": [(x,)],
        "sbn_finish": [(x, rows, w, b, 1e-5, "ortho", "relu", 0.0)],
        "sbn_forward": [(xg, wg, bg, None, None, 1e-5, "ortho", "silu", 0.0),
                        (xg, wg, None, m2, var, 1e-5, "forward", "leaky_relu", 0.1)],
        "sbn_grad_stats": [(dy, x, sv, "relu", 0.0)],
        "sbn_grad_finish": [(dy, x, sv, gs, gs * 2, True, "ortho", "relu", 0.0)],
        "sbn_backward": [(dy, x, sv, True, "ortho", "relu", 0.0)],
        "bnsbn_finish": [(x, rows, 0, w, b, b, w, 1e-5, 1e-5, "ortho", "relu", 0.0)],
        "bnsbn_forward": [(xg, wg, bg, None, None, bg, wg, None, None, 1e-5, 1e-5, "ortho", "silu",
                           0.0),
                          (xg, None, bg, var - 0.5, var, wg, None, m2, var, 1e-5, 1e-5, "backward",
                           "relu", 0.0)],
        "bnsbn_grad_finish": [(dy, x, bsv, gs, gs, True, "ortho", "relu", 0.0)],
        "bnsbn_backward": [(dy, x, bsv, False, "backward", "relu", 0.0)],
    }


@pytest.mark.parametrize("name", OPS)
def test_opcheck(device, ops, name):
    for args in op_cases(device)[name]:
        torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize("layer", ["sbn", "bnsbn"])
def test_torch_compile_fullgraph_forward_and_backward(device, ops, layer):
    g = gen(device, 7)
    x = make_x((2, 3, 4, 5), torch.float32, device, g)
    dy = make_x(x.shape, torch.float32, device, g)
    params = make_params(3, device, g) + make_params(3, device, g)
    backend = "cpp" if device.type == "cpu" else "triton"

    def f(x, bw, bb, sw, sb):
        if layer == "sbn":
            y, m, v = S.spectral_batch_norm(x, bw, bb, None, None, 1e-5, "parseval", "ortho",
                                            "relu", 0.0, backend)
        else:
            y, m, v, sm, sv = S.batch_norm_sbn(x, bw, bb, None, None, sw, sb, None, None, 1e-5,
                                               1e-5, "ortho", "relu", 0.0, backend)
        return (y * dy).sum(), m, v

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        ins = [leaf(x)] + [leaf(t) for t in params]
        loss, m, v = fn(*ins)
        loss.backward()
        used = ins if layer == "bnsbn" else ins[:3]
        results.append([loss, m, v] + [t.grad for t in used])
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_each_top_level_op_is_one_leaf_op_on_cpu():
    require_native(torch.device("cpu"))
    o = torch.ops.normkernels
    g = gen("cpu", 8)
    x = make_x((2, 8, 4, 4), torch.float32, "cpu", g)
    dy = make_x(x.shape, torch.float32, "cpu", g)
    w, b = make_params(8, "cpu", g)
    m2, var = torch.zeros(8, 2), torch.ones(8)
    sv = o.sbn_forward(x, w, b, None, None, 1e-5, "backward", "relu", 0.0)[3]
    bsv = o.bnsbn_forward(x, w, b, None, None, w, b, None, None, 1e-5, 1e-5, "backward", "relu",
                          0.0)[5]
    calls = {
        "sbn_forward": lambda: o.sbn_forward(x, w, b, None, None, 1e-5, "ortho", "relu", 0.0),
        "sbn_forward(eval)": lambda: o.sbn_forward(x, w, b, m2, var, 1e-5, "ortho", "relu", 0.0),
        "sbn_backward": lambda: o.sbn_backward(dy, x, sv, True, "ortho", "relu", 0.0),
        "bnsbn_forward": lambda: o.bnsbn_forward(x, w, b, None, None, w, b, None, None, 1e-5, 1e-5,
                                                 "ortho", "relu", 0.0),
        "bnsbn_backward": lambda: o.bnsbn_backward(dy, x, bsv, True, "ortho", "relu", 0.0),
    }
    for name, call in calls.items():
        assert leaf_ops(call) == ["normkernels::" + name.split("(")[0]], name
    # through autograd: one op forward, one op backward (+ autograd's gradient accumulation)
    xx, ww, bb = leaf(x), leaf(w), leaf(b)
    y = [None]

    def fwd():
        y[0] = S.spectral_batch_norm(xx, ww, bb, None, None, 1e-5, "parseval", "backward", "relu",
                                     0.0, "cpp")[0]

    assert leaf_ops(fwd) == ["normkernels::sbn_forward"]
    bwd = leaf_ops(lambda: y[0].backward(dy))
    assert bwd.count("normkernels::sbn_backward") == 1 and len(bwd) <= 3, bwd


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic_across_thread_counts(layout):
    require_native(torch.device("cpu"))
    o = torch.ops.normkernels
    g = gen("cpu", 9)
    x = make_x((6, 40, 7, 9), torch.float32, "cpu", g, shift=5.0, layout=layout)
    dy = make_x(x.shape, torch.float32, "cpu", g, layout=layout)
    w, b = make_params(40, "cpu", g)
    threads = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y, m, v, sv = o.sbn_forward(x, w, b, None, None, 1e-5, "backward", "silu", 0.0)
            bn = o.bnsbn_forward(x, w, b, None, None, b, w, None, None, 1e-5, 1e-5, "ortho",
                                 "relu", 0.0)
            res.append([y, m, v, sv, *o.sbn_backward(dy, x, sv, True, "backward", "silu", 0.0),
                        *bn, *o.bnsbn_backward(dy, x, bn[5], True, "ortho", "relu", 0.0)])
    finally:
        torch.set_num_threads(threads)
    for other in res[1:]:
        for a, r in zip(other, res[0]):
            assert torch.equal(a, r)


_ISA_SCRIPT = r"""
import sys, torch
import normkernels.ops.sbn as S
torch.manual_seed(0)
o, out = torch.ops.normkernels, []
for shape, fmt, dtype, act in [((3, 10, 7, 7), torch.contiguous_format, torch.float32, "relu"),
                               ((2, 9, 8, 6), torch.contiguous_format, torch.float64, "silu"),
                               ((2, 12, 30, 33), torch.contiguous_format, torch.float32, "identity"),
                               ((2, 9, 5, 6), torch.channels_last, torch.float32, "leaky_relu"),
                               ((2, 16, 4, 4), torch.contiguous_format, torch.bfloat16, "relu"),
                               ((2, 11, 8, 8), torch.contiguous_format, torch.float32, "silu"),
                               ((2, 3, 3, 8), torch.contiguous_format, torch.float32, "leaky_relu"),
                               ((1, 1, 7, 7), torch.contiguous_format, torch.float32, "relu")]:
    x = (torch.randn(shape) * 3 + 2).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    f = o.sbn_forward(x, w, b, None, None, 1e-5, "ortho", act, 0.1)
    g = o.bnsbn_forward(x, w, b, None, None, b, w, None, None, 1e-5, 1e-5, "backward", act, 0.1)
    out += [*f, *o.sbn_backward(dy, x, f[3], True, "ortho", act, 0.1), *g,
            *o.bnsbn_backward(dy, x, g[5], True, "backward", act, 0.1),
            *o.sbn_backward(dy, x, f[3], False, "ortho", act, 0.1)]
torch.save(out, sys.argv[1])
"""


def test_baseline_and_avx2_builds_agree_bitwise(tmp_path):
    """The pass kernels are compiled twice (baseline ISA and AVX2, chosen at run time); their lanes
    do the same IEEE operations in the same order, so the two builds agree bit for bit."""
    require_native(torch.device("cpu"))
    results = outputs_per_isa(_ISA_SCRIPT, tmp_path)
    for a, r in zip(*results):
        assert torch.equal(a, r)
