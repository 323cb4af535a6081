"""The SBN family's dispatcher ops (csrc/sbn.cpp; C++ on CPU, Triton on CUDA), for SBN (the BN
stage off) and BN+SBN alike: the compiled finalize against the torch oracle piece by piece (the
same rows in, the same outputs out), a synchronized group's rows, the synchronized entry, opcheck
of every op, torch.compile(fullgraph=True) forward and backward, thread-count determinism, one
leaf op per top-level op on CPU and the baseline/AVX2 builds bit for bit."""
import pytest
import torch

from normkernels.ops import sbn as S
from normkernels.ops import sbn_oracle as O
from normkernels.ops.sbn_layout import COL, SUMS
from sbn_cases import F64, gen, leaf, make_params, make_x, require_native
from cpu_isa import outputs_per_isa
from op_count import leaf_ops

OPS = ("sbn_stats", "sbn_finish", "sbn_forward", "sbn_grad_stats", "sbn_grad_finish", "sbn_backward")
STAGES = pytest.mark.parametrize("bn", [False, True], ids=["sbn", "bnsbn"])
LOCAL = slice(COL["local_sum_t"], COL["local_sum_t"] + len(SUMS))


@pytest.fixture
def ops(device):
    require_native(device)
    return torch.ops.normkernels


def fwd_args(x, bn, bw, bb, sw, sb, stats=None, fft_norm="ortho", act="relu", slope=0.0, eps=(1e-5, 2e-5)):
    """sbn_forward's 15 arguments; stats = (bn_mean, bn_var, sbn_mean, sbn_var) or None (training);
    with the BN stage off the BN arguments are None."""
    bm, bv, sm, sv = stats if stats is not None else (None,) * 4
    if not bn:
        bw = bb = bm = bv = None
    return (x, bn, bw, bb, bm, bv, sw, sb, sm, sv, eps[0], eps[1], fft_norm, act, slope)


def finish_args(x, rows, rank, bn, bw, bb, sw, sb, fft_norm="ortho", act="relu", slope=0.0):
    if not bn:
        bw = bb = None
    return (x, rows, rank, bn, bw, bb, sw, sb, 1e-5, 2e-5, fft_norm, act, slope)


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
        got, ref = ops.sbn_stats(x), O.torch_sbn_stats(x)
        # the sums of t = x - K: accumulation in acc within rows, float64 across
        tol = 1e-12 if dtype == F64 else 1e-5
        assert torch.equal(got[:, :2], ref[:, :2])
        close_cols(got[:, 2:], ref[:, 2:], tol, f"rows {shape}")


@STAGES
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16])
@pytest.mark.parametrize("affine", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("fft_norm,act", [("backward", "identity"), ("ortho", "silu"), ("forward", "relu"),
                                          ("ortho", "leaky_relu")])
def test_finalize_matches_torch_piece_by_piece(device, ops, bn, dtype, affine, fft_norm, act):
    g = gen(device, 2)
    x = make_x((3, 4, 5, 7 if bn else 6), dtype, device, g, shift=-20.0 if bn else 10.0)
    bw, bb = make_params(4, device, g) if affine[0] else (None, None)
    sw, sb = make_params(4, device, g) if affine[1] else (None, None)
    rows = O.torch_sbn_stats(x)[None]          # the same rows into both finalizes
    args = finish_args(x, rows, 0, bn, bw, bb, sw, sb, fft_norm, act, 0.2)
    got, ref = ops.sbn_finish(*args), O.torch_sbn_finish(*args)
    close_cols(got[5], ref[5], FIN_TOL, "saved")
    for a, r, name in zip(got[1:5], ref[1:5], ("bn_mean", "bn_var", "sbn_mean", "sbn_var")):
        close(a, r, FIN_TOL * 10, name)
    assert got[1].shape == ((4,) if bn else (0,))
    close(got[0], ref[0], PASS_TOL[dtype], "y")
    # backward pieces from the same saved and the same gradient sums
    sv = ref[5]
    dy = make_x(x.shape, dtype, device, g)
    gs = O.torch_sbn_grad_stats(dy, x, sv, act, 0.2)
    close_cols(ops.sbn_grad_stats(dy, x, sv, act, 0.2), gs, 1e-12 if dtype == F64 else 1e-4, "gsums")
    for training in (True, False):
        a = ops.sbn_grad_finish(dy, x, sv, gs, gs, bn, training, fft_norm, act, 0.2)
        r = O.torch_sbn_grad_finish(dy, x, sv, gs, gs, bn, training, fft_norm, act, 0.2)
        close(a[0], r[0], PASS_TOL[dtype], "dx")
        for i in range(1, 5):
            close(a[i], r[i], FIN_TOL * 100, f"param grad {i}")


@STAGES
def test_eval_forward_matches_torch(device, ops, bn):
    g = gen(device, 3)
    x = make_x((3, 4, 5, 6), torch.float32, device, g)
    w, b = make_params(4, device, g)
    m2 = torch.randn(4, 2, generator=g, device=device)
    var = torch.rand(4, generator=g, device=device) + 0.5
    args = fwd_args(x, bn, w, b, b, w, (var - 0.2, var, m2, var * 3))
    got, ref = ops.sbn_forward(*args), S.torch_sbn_forward(*args)
    close_cols(got[-1], ref[-1], FIN_TOL, "saved")
    close(got[0], ref[0], PASS_TOL[torch.float32], "y")
    for a, r in zip(got[1:-1], ref[1:-1]):
        assert torch.equal(a, r)


@STAGES
def test_group_rows_match_the_whole_batch(device, ops, bn):
    """P = 3 processes, one of them empty, each with its own shift: the finish op on the gathered
    rows gives each process exactly its slice of the single-process result on the concatenated
    batch, and matches the torch finalize on the same rows."""
    g = gen(device, 4)
    parts, whole = group_batch(device, torch.float64, g)
    w, b = (t.double() for t in make_params(3, device, g))
    rows = torch.stack([ops.sbn_stats(p) for p in parts])
    assert rows[1, :, 0].eq(0).all() and rows[1, :, 1].eq(0).all()
    full = ops.sbn_forward(*fwd_args(whole, bn, w, b, b, w, fft_norm="ortho", act="silu"))
    start = 0
    for rank, p in enumerate(parts):
        sl = slice(start, start + p.shape[0])
        start += p.shape[0]
        args = finish_args(p, rows, rank, bn, w, b, b, w, "ortho", "silu")
        got, ref = ops.sbn_finish(*args), O.torch_sbn_finish(*args)
        close_cols(got[5], ref[5], FIN_TOL, "saved")
        torch.testing.assert_close(got[0], full[0][sl], rtol=1e-12, atol=1e-12)
        for a, r in zip(got[1:5], full[1:5]):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
        # the local columns are this process's own sums at the group's shift
        if p.shape[0]:
            moved = O._combine(torch.stack([rows[0], O.torch_sbn_stats(p)]), 4, 6, 1)[1]
            torch.testing.assert_close(got[5][:, LOCAL], moved, rtol=1e-10, atol=1e-9)
        else:
            assert torch.equal(got[5][:, LOCAL], torch.zeros_like(got[5][:, LOCAL]))


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
@STAGES
def test_synchronized_entry_equals_the_whole_batch(device, backend, bn):
    """ops.sbn.forward with a reducer, on each process of a group (one empty), gives that
    process's slice of the single-process output and input gradient, the group's statistics and
    sample count, and parameter gradients that sum to the single-process ones; one gather
    forward, one all_reduce backward."""
    if backend == "native":
        require_native(device)
        backend = "cpp" if device.type == "cpu" else "triton"
    g = gen(device, 5)
    parts, whole = group_batch(device, torch.float64, g)
    dys = [torch.randn(p.shape, generator=g, device=device, dtype=F64) for p in parts]
    ps = [t.double() for t in make_params(3, device, g) + make_params(3, device, g)]
    if not bn:
        ps[0] = ps[1] = None
    _, stats, finish, grad_stats, _ = S._ops(backend)  # the backend's own pieces for the other processes
    rows = [stats(p) for p in parts]
    saved = [finish(*finish_args(p, torch.stack(rows), r, bn, *ps, "ortho", "relu"))[5] for r, p in enumerate(parts)]
    gsums = [grad_stats(dy, p, sv, "relu", 0.0) for dy, p, sv in zip(dys, parts, saved)]

    def run(x, params, reducer=None):
        return S.forward(x, bn, params[0], params[1], None, None, params[2], params[3], None, None, 1e-5, 2e-5,
                         "ortho", "relu", 0.0, backend, reducer)

    full = [leaf(whole), [leaf(t) for t in ps]]
    y_full, *st_full, n_full = run(full[0], full[1])
    assert n_full == 5
    y_full.backward(torch.cat(dys))
    used = [t for t in full[1] if t is not None]
    pgrad_sum = [torch.zeros_like(t) for t in used]
    start = 0
    for rank, p in enumerate(parts):
        sl = slice(start, start + p.shape[0])
        start += p.shape[0]
        red = FakeReducer(rank, rows, gsums)
        x, params = leaf(p), [leaf(t) for t in ps]
        y, *st, n = run(x, params, red)
        assert n == 5
        torch.testing.assert_close(y, y_full[sl].detach(), rtol=1e-11, atol=1e-11)
        for a, r in zip(st, st_full):
            torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)
        y.backward(dys[rank])
        assert red.calls == ["gather", "all_reduce"]
        torch.testing.assert_close(x.grad, full[0].grad[sl], rtol=1e-10, atol=1e-11)
        for acc, t in zip(pgrad_sum, [t for t in params if t is not None]):
            acc += t.grad
    for a, t in zip(pgrad_sum, used):
        torch.testing.assert_close(a, t.grad, rtol=1e-10, atol=1e-11)


def test_bad_piece_arguments_raise_clear_errors(device, ops):
    """What the ops themselves check: whatever would read out of bounds, and the contract's own
    conditions (inputs are otherwise validated once, in normkernels/functional.py)."""
    x = make_x((2, 3, 4, 5), torch.float32, device, gen(device))
    rows = ops.sbn_stats(x)[None]
    with pytest.raises(ValueError, match="rows_all"):
        ops.sbn_finish(*finish_args(x, rows[0], 0, False, None, None, None, None))
    with pytest.raises(ValueError, match="rank"):
        ops.sbn_finish(*finish_args(x, rows, 1, True, None, None, None, None))
    with pytest.raises(ValueError, match="no samples"):
        ops.sbn_finish(*finish_args(x, ops.sbn_stats(x[:0])[None], 0, False, None, None, None, None))
    with pytest.raises(ValueError, match="bn"):
        ops.sbn_forward(x, False, torch.ones(3, device=device), None, None, None, None, None, None, None,
                        1e-5, 1e-5, "backward", "identity", 0.0)
    saved = ops.sbn_forward(*fwd_args(x, False, None, None, None, None))[5]
    with pytest.raises(ValueError, match="saved"):
        ops.sbn_backward(x, x, saved[:, :9], False, True, "backward", "identity", 0.0)
    with pytest.raises(ValueError, match="shape"):
        ops.sbn_backward(x[:1], x, saved, False, True, "backward", "identity", 0.0)
    with pytest.raises(ValueError, match="rank"):
        ops.sbn_stats(x[0])


# ------------------------------------------------------------------------------ op machinery
def op_cases(device, bn):
    g = gen(device, 6)
    x = make_x((2, 3, 4, 5), torch.float32, device, g)
    dy = make_x(x.shape, torch.float32, device, g)
    w, b = make_params(3, device, g)
    m2, var = torch.randn(3, 2, generator=g, device=device), torch.rand(3, generator=g, device=device) + 1
    o = torch.ops.normkernels
    rows = o.sbn_stats(x)[None]
    sv = o.sbn_forward(*fwd_args(x, bn, w, b, b, w))[5]
    gs = o.sbn_grad_stats(dy, x, sv, "relu", 0.0)
    xg, wg, bg = leaf(x), leaf(w), leaf(b)
    return {
        "sbn_stats": [(x,)],
        "sbn_finish": [finish_args(x, rows, 0, bn, w, b, b, w)],
        "sbn_forward": [fwd_args(xg, bn, wg, bg, bg, wg, act="silu"),
                        fwd_args(xg, bn, None, bg, wg, None, (var - 0.5, var, m2, var), "forward", "leaky_relu",
                                 0.1)],
        "sbn_grad_stats": [(dy, x, sv, "relu", 0.0)],
        "sbn_grad_finish": [(dy, x, sv, gs, gs * 2, bn, True, "ortho", "relu", 0.0)],
        "sbn_backward": [(dy, x, sv, bn, True, "ortho", "relu", 0.0), (dy, x, sv, bn, False, "backward", "relu", 0.0)],
    }


@STAGES
@pytest.mark.parametrize("name", OPS)
def test_opcheck(device, ops, bn, name):
    for args in op_cases(device, bn)[name]:
        torch.library.opcheck(getattr(ops, name).default, args)


@STAGES
def test_torch_compile_fullgraph_forward_and_backward(device, ops, bn):
    g = gen(device, 7)
    x = make_x((2, 3, 4, 5), torch.float32, device, g)
    dy = make_x(x.shape, torch.float32, device, g)
    params = make_params(3, device, g) + make_params(3, device, g)
    backend = "cpp" if device.type == "cpu" else "triton"

    def f(x, bw, bb, sw, sb):
        y, bm, bv, sm, sv, _ = S.forward(x, bn, bw, bb, None, None, sw, sb, None, None, 1e-5, 1e-5, "ortho",
                                         "relu", 0.0, backend)
        return (y * dy).sum(), sm, sv

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        ins = [leaf(x)] + [leaf(t) for t in params]
        if not bn:
            ins[1] = ins[2] = None
        loss, m, v = fn(*ins)
        loss.backward()
        results.append([loss, m, v] + [t.grad for t in ins if t is not None])
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_each_top_level_op_is_one_leaf_op_on_cpu():
    require_native(torch.device("cpu"))
    o = torch.ops.normkernels
    g = gen("cpu", 8)
    x = make_x((2, 8, 4, 4), torch.float32, "cpu", g)
    dy = make_x(x.shape, torch.float32, "cpu", g)
    w, b = make_params(8, "cpu", g)
    m2, var, zero = torch.zeros(8, 2), torch.ones(8), torch.zeros(8)
    calls = {}
    for bn in (False, True):
        sv = o.sbn_forward(*fwd_args(x, bn, w, b, w, b))[5]
        calls[f"sbn_forward(bn={bn})"] = lambda bn=bn: o.sbn_forward(*fwd_args(x, bn, w, b, w, b))
        calls[f"sbn_forward(bn={bn}, eval)"] = lambda bn=bn: o.sbn_forward(
            *fwd_args(x, bn, w, b, w, b, (zero, var, m2, var)))
        calls[f"sbn_backward(bn={bn})"] = lambda bn=bn, sv=sv: o.sbn_backward(dy, x, sv, bn, True, "ortho", "relu",
                                                                             0.0)
    for name, call in calls.items():
        assert leaf_ops(call) == ["normkernels::" + name.split("(")[0]], name
    # through autograd: one op forward, one op backward (+ autograd's gradient accumulation)
    xx, ww, bb = leaf(x), leaf(w), leaf(b)
    y = [None]

    def fwd():
        y[0] = S.forward(xx, False, None, None, None, None, ww, bb, None, None, 0.0, 1e-5, "backward", "relu", 0.0,
                         "cpp")[0]

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
            out = []
            for bn, act in ((False, "silu"), (True, "relu")):
                f = o.sbn_forward(*fwd_args(x, bn, w, b, b, w, act=act))
                out += [*f, *o.sbn_backward(dy, x, f[5], bn, True, "ortho", act, 0.0)]
            res.append(out)
    finally:
        torch.set_num_threads(threads)
    for other in res[1:]:
        for a, r in zip(other, res[0]):
            assert torch.equal(a, r)


_ISA_SCRIPT = r"""
import sys, torch
import normkernels  # noqa: F401  (the ops)
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
    f = o.sbn_forward(x, False, None, None, None, None, w, b, None, None, 0.0, 1e-5, "ortho", act, 0.1)
    g = o.sbn_forward(x, True, w, b, None, None, b, w, None, None, 1e-5, 1e-5, "backward", act, 0.1)
    out += [*f, *o.sbn_backward(dy, x, f[5], False, True, "ortho", act, 0.1), *g,
            *o.sbn_backward(dy, x, g[5], True, True, "backward", act, 0.1),
            *o.sbn_backward(dy, x, f[5], False, False, "ortho", act, 0.1)]
torch.save(out, sys.argv[1])
"""


def test_baseline_and_avx2_builds_agree_bitwise(tmp_path):
    """The pass kernels are compiled twice (baseline ISA and AVX2, chosen at run time); their lanes
    do the same IEEE operations in the same order, so the two builds agree bit for bit."""
    require_native(torch.device("cpu"))
    results = outputs_per_isa(_ISA_SCRIPT, tmp_path)
    for a, r in zip(*results):
        assert torch.equal(a, r)
