"""CUDA graph capture (#19): a training step of every layer makes no host read of a device value
(.item(), float(t): a sync, refused inside capture), makes no tensor from host data
(torch.tensor(...): a copy from pageable memory) and copies nothing between devices, so it can be
captured into a CUDA graph and replayed.

On the CPU (CI) this is checked where Python code runs: the modules, functional and the running
update, recorded by a dispatch mode over a whole step (nn.BatchNorm2d with momentum=None is the
positive control: it reads num_batches_tracked on the host), and the Triton host functions of the
SBN family, run on meta tensors (standing for CUDA ones) under the same recorder, and the C++
host code of csrc/cuda/, built for the CPU by tools/cuda_emu, whose every op is recorded by the
profiler (a host read inside it shows there). On a GPU (the [cuda] tests; `make gpu-check` runs
them) the capture itself: a step captured with torch.cuda.graph, replayed on new data, gives what
eager gives.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import normkernels.triton.launch as L
from test_conformance import CONTROLS, ROWS, inputs, make_model, rel_err

# ops that read a device value on the host or make a tensor from host data
_HOST_OPS = {"_local_scalar_dense", "lift_fresh", "lift_fresh_copy", "is_nonzero", "nonzero", "equal"}


def _devices(tree) -> set:
    leaves = torch.utils._pytree.tree_leaves(tree)
    return {t.device for t in leaves if isinstance(t, torch.Tensor)}


class HostTraffic(TorchDispatchMode):
    """Records every op of the code it wraps that a CUDA graph cannot capture: a host read of a
    device value, a tensor from host data, or an op whose tensors span devices (a copy)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket.__name__
        devices = _devices((args, kwargs, out))
        if name in _HOST_OPS or len(devices) > 1:
            self.seen.append(f"{func} on {sorted(map(str, devices))}")
        return out


def _step(model, x):
    y = model(x)
    y.square().mean().backward()
    return y


PARAMS = [(row, 0.1) for row in ROWS] + [(row, None) for row in ROWS if row not in CONTROLS]


@pytest.mark.parametrize("row,momentum", PARAMS)
def test_a_training_step_reads_nothing_back(row, momentum):
    """On the CPU: the Python layer of every layer's step (on a GPU the capture below checks the
    whole step)."""
    model = make_model(row)
    model[1].momentum = momentum
    x = inputs(row)
    _step(model, x)                                   # first call: lazily built constants
    with HostTraffic() as rec:
        _step(model, x)
        model.eval()
        with torch.no_grad():
            model(x)
    assert rec.seen == [], f"{row}, momentum={momentum}: {rec.seen}"


def test_the_recorder_sees_a_host_read():
    """The positive control: nn.BatchNorm2d with momentum=None computes its factor as
    1 / float(num_batches_tracked), a host read that capture refuses."""
    model = make_model("BatchNorm2d")
    model[1].momentum = None
    with HostTraffic() as rec:
        _step(model, inputs("BatchNorm2d"))
    assert any("_local_scalar_dense" in s for s in rec.seen), rec.seen


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_host_functions_make_no_host_copies(layout):
    """Every Triton host function of the SBN family on meta tensors (CUDA's stand-in: no data,
    so a host read raises), from a cold constants cache (a first call may run inside capture): no
    tensor from host data, no copy from the CPU."""
    from normkernels.triton import sbn as K

    K._CONSTS.clear()
    x = torch.empty(8, 16, 7, 6, device="meta", dtype=torch.bfloat16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    C, f64 = x.shape[1], torch.float64
    w, v, m2 = (torch.empty(C, device="meta"), torch.empty(C, device="meta"),
                torch.empty(C, 2, device="meta"))
    g = torch.empty(C, 4, device="meta", dtype=f64)
    rows = torch.empty(3, C, 8, device="meta", dtype=f64)
    with L.recording() as launches, HostTraffic() as rec:
        for bn in (False, True):
            bw, bm = (w, v) if bn else (None, None)
            out = K.sbn_forward(x, bn, bw, bw, None, None, w, w, None, None, 1e-5, 1e-5, "ortho",
                                "silu", 0.0)
            K.sbn_forward(x, bn, bw, bw, bm, bm, w, w, m2, v, 1e-5, 1e-5, "forward", "relu", 0.0)
            for training in (True, False):
                K.sbn_backward(x, x, out[5], bn, training, "backward", "leaky_relu", 0.1)
            K.sbn_finish(x, rows, 1, bn, bw, bw, w, w, 1e-5, 1e-5, "backward", "identity", 0.0)
            K.sbn_grad_finish(x, x, out[5], g, g, bn, True, "backward", "identity", 0.0)
        K.sbn_stats(x)
        K.sbn_grad_stats(x, x, out[5], "relu", 0.0)
    assert len(launches) >= 20 and rec.seen == [], rec.seen


# ---------------------------------------------------------------------------------- on a GPU

def _warm_up(fn, times: int):
    """Runs fn outside capture first (kernels compiled, constants built), on a side stream, as
    torch.cuda.graph's documentation asks."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(side)


CAPTURED = ["BatchNorm2d", "L2BatchNorm1d", "L2BatchNorm2d", "SpectralBatchNorm2d", "BatchNormSBN2d",
            "BatchNormSBNAct2d-silu"]


@pytest.mark.cuda
@pytest.mark.parametrize("row", CAPTURED)
def test_cuda_graph_of_a_training_step(row):
    """Forward + backward + running update captured once, replayed on three new batches: the
    outputs, parameter gradients and running state of each replay are eager's; then an eval
    forward, captured and replayed, likewise (nk layers with momentum=None: the cumulative factor
    is read on the device)."""
    momentum = 0.1 if row in CONTROLS else None
    model, eager = make_model(row).cuda(), make_model(row).cuda()
    for m in (model, eager):
        m[1].momentum = momentum
    static_x = inputs(row).cuda()
    _warm_up(lambda: _step(model, static_x), 2)
    for _ in range(2):
        _step(eager, static_x)
    model.zero_grad(set_to_none=True)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = _step(model, static_x)
    for seed in range(3):
        x = inputs(row, seed=10 + seed).cuda()
        static_x.copy_(x)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        y = _step(eager, x)
        torch.cuda.synchronize()
        assert rel_err(static_y, y) < 1e-5, f"{row} replay {seed}: output"
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert rel_err(p.grad, q.grad) < 1e-4, f"{row} replay {seed}: grad of {name}"
        for (name, b), c in zip(model.named_buffers(), eager.buffers()):
            ok = torch.equal(b, c) if b.dtype == torch.long else rel_err(b, c) < 1e-5
            assert ok, f"{row} replay {seed}: {name}"

    model.eval(), eager.eval()
    with torch.no_grad():
        _warm_up(lambda: model(static_x), 1)
        eval_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(eval_graph):
            static_y = model(static_x)
        x = inputs(row, seed=20).cuda()
        static_x.copy_(x)
        eval_graph.replay()
        assert rel_err(static_y, eager(x)) < 1e-5, f"{row}: eval output"


# ------------------------------------------------------- the CUDA host code, emulated on the CPU

def _host_reads(fn) -> list:
    """The host reads (aten::_local_scalar_dense: .item(), float(t), bool(t)) of fn and of
    everything it calls, C++ included, from torch.profiler's record of every op."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in ("aten::_local_scalar_dense", "aten::item")]


def test_gpu_host_code_reads_nothing_back():
    """The host code of csrc/cuda/ (its launch planning, the cooperative finalize or its
    two-launch fallback, the running update), built for the CPU by tools/cuda_emu exactly as it
    runs for CUDA tensors: every op, training and eval, makes no host read (a sync, which capture
    refuses). The profiler sees the ops the C++ code calls; the positive control is a host read
    made inside a recorded call."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "tools", "cuda_emu"))
    import emu_build

    emu = emu_build.load()
    x = torch.randn(3, 5, 4, 6)
    dy, w, b = torch.randn_like(x), torch.rand(5) + 0.5, torch.randn(5)
    mean, var = torch.randn(5) * 0.1, torch.rand(5) + 0.5

    def every_op():
        for xl in (x, x.contiguous(memory_format=torch.channels_last)):
            y, bm, bv, saved = emu.l2bn_forward(xl, w, b, None, None, 1e-5, 1e-12, True, "silu", 0.0)
            emu.l2bn_backward(dy, xl, w, saved, True, "silu", 0.0)
            _, _, _, saved_eval = emu.l2bn_forward(xl, w, b, mean, var, 1e-5, 1e-12, False, "relu", 0.0)
            emu.l2bn_backward(dy, xl, w, saved_eval, False, "relu", 0.0)
            stats, rows = emu.l2bn_stats(xl, 1e-12, True)
            fin = emu.l2bn_finish(xl, stats, rows[None], w, b, None, None, 1e-5, 1e-12, True, "identity", 0.0)
            sums, grows = emu.l2bn_grad_stats(dy, xl, fin[3], "identity", 0.0)
            emu.l2bn_grad_finish(dy, xl, w, fin[3], sums, grows, grows, "identity", 0.0)
            for momentum in (0.1, -1.0):
                emu.running_stats_update_(mean.clone(), var.clone(), torch.tensor(3), bm, bv, momentum, 1.1)

    assert _host_reads(every_op) == []
    assert "aten::_local_scalar_dense" in _host_reads(lambda: float(x.sum()))
