"""The per-call op budget of issue #10: a training forward of every layer is at most 6 leaf ops
(one kernel launch each on a GPU), its backward at most 8, an eval forward at most 3.

Counted the way ../shared/tools/overhead.py counts them: dispatcher ops (aten:: and
normkernels::) that contain no other counted op, views and allocations not counted. An op count
is deterministic, so it is a test; host time is a benchmark (overhead.py, `make bench`).
"""
import pytest
import torch
import normkernels as nk
from op_count import leaf_ops

LAYERS = {
    "L2BatchNorm2d": lambda c: nk.L2BatchNorm2d(c),
    "SpectralBatchNorm2d": lambda c: nk.SpectralBatchNorm2d(c),
    "BatchNormSBN2d": lambda c: nk.BatchNormSBN2d(c),
    "L2BatchNorm2d+relu": lambda c: nk.L2BatchNormAct2d(c) if hasattr(nk, "L2BatchNormAct2d") else None,
    "SpectralBatchNorm2d+relu": lambda c: nk.SpectralBatchNormAct2d(c) if hasattr(nk, "SpectralBatchNormAct2d") else None,
    "BatchNormSBN2d+relu": lambda c: nk.BatchNormSBNAct2d(c) if hasattr(nk, "BatchNormSBNAct2d") else None,
}


@pytest.fixture(params=list(LAYERS))
def layer(request):
    m = LAYERS[request.param](8)
    if m is None:
        pytest.fail(f"nk has no layer for {request.param}")
    return request.param, m


def test_training_call_budget(layer):
    name, m = layer
    x = torch.randn(2, 8, 4, 4)
    dy = torch.randn_like(x)
    for _ in range(3):  # warm caches (first calls may build constants)
        m(x.detach().requires_grad_()).backward(dy)
    fwd = leaf_ops(lambda: m(x.detach().requires_grad_()))
    y = m(x.detach().requires_grad_())
    bwd = leaf_ops(lambda: y.backward(dy))
    assert len(fwd) <= 6, f"{name} training forward: {len(fwd)} leaf ops {fwd}"
    assert len(bwd) <= 8, f"{name} backward: {len(bwd)} leaf ops {bwd}"


def test_eval_call_budget(layer):
    name, m = layer
    x = torch.randn(2, 8, 4, 4)
    m.train()
    m(x)
    m.eval()
    with torch.no_grad():
        m(x)
        ops = leaf_ops(lambda: m(x))
    assert len(ops) <= 3, f"{name} eval forward: {len(ops)} leaf ops {ops}"


def test_counter_sees_batchnorm():
    """The counter itself: nn.BatchNorm2d's training forward is native_batch_norm + the
    num_batches_tracked increment (so a budget test cannot pass by counting nothing)."""
    m = torch.nn.BatchNorm2d(8)
    x = torch.randn(2, 8, 4, 4)
    m(x)
    ops = leaf_ops(lambda: m(x))
    assert len(ops) == 2 and any("batch_norm" in o for o in ops), ops
