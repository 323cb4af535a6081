"""Bad input and faults (#16.6), each against what the float64 reference or nn.BatchNorm2d does:
NaN propagation in L2BN, failed calls that leave every buffer untouched, empty batches, running
buffers that require grad, the Triton FFT path with one channel, and synchronized layers whose
processes disagree on what they compute."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normkernels as nk
from test_distributed import run_workers

LAYERS = {
    "BatchNorm2d": lambda c: nn.BatchNorm2d(c),  # the control
    "L2BatchNorm2d": lambda c: nk.L2BatchNorm2d(c),
    "SpectralBatchNorm2d": lambda c: nk.SpectralBatchNorm2d(c),
    "BatchNormSBN2d": lambda c: nk.BatchNormSBN2d(c),
    "BatchNormSBNAct2d": lambda c: nk.BatchNormSBNAct2d(c, act_layer=nn.SiLU),
}


def buffers(m):
    return {k: v.clone() for k, v in m.named_buffers()}


def same_buffers(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_l2bn_propagates_nan_like_f_normalize(backend):
    """One NaN element: F.normalize makes its sample NaN, so the batch statistics (and outputs,
    and running statistics) are NaN, as the reference computes; never a sample divided by
    l2_eps (the clamp) with running variances of ~1e22."""
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    x[1, 2, 3, 4] = float("nan")
    layer = nk.L2BatchNorm2d(4, backend=backend).double()
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    want = F.batch_norm(F.normalize(x.flatten(1)).view_as(x), rm, rv, training=True)
    got = layer(x)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    assert torch.equal(layer.running_var.isnan(), rv.isnan()) and layer.running_var.isnan().all()
    layer.eval()  # eval with clean statistics: only the NaN sample is NaN
    clean = nk.L2BatchNorm2d(4, backend=backend).double().eval()
    y = clean(x)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


def test_failed_training_call_leaves_every_buffer_untouched():
    """BatchNormSBN2d's SBN statistics made inconsistent by hand: the call raises before any
    update, BN's statistics and both counters included."""
    layer = nk.BatchNormSBN2d(4)
    layer.sbn_running_var = layer.sbn_running_var.half()
    before = buffers(layer)
    with pytest.raises(TypeError, match="same precision"):
        layer(torch.randn(2, 4, 6, 6))
    assert same_buffers(buffers(layer), before)


def test_half_bn_sbn_trains_with_float32_spectral_statistics():
    """The issue's case: BatchNormSBN2d.half() trains; BN's statistics are half as
    nn.BatchNorm2d's would be, SBN's complex64/float32."""
    layer = nk.BatchNormSBN2d(4).half()
    layer(torch.randn(2, 4, 6, 6).half()).float().sum().backward()
    assert layer.running_var.dtype == torch.float16 and layer.sbn_running_var.dtype == torch.float32
    assert layer.sbn_running_mean.dtype == torch.complex64 and int(layer.sbn_num_batches_tracked) == 1


@pytest.mark.parametrize("name", list(LAYERS))
def test_empty_batch_behaves_as_batchnorm(name):
    """N = 0: an empty output that backpropagates, running statistics untouched, and the batch
    counter as nn.BatchNorm2d keeps it (+1 per training call)."""
    layer = LAYERS[name](3)
    control = nn.BatchNorm2d(3)
    for mode in (True, False):
        layer.train(mode), control.train(mode)
        x = torch.randn(0, 3, 4, 4, requires_grad=True)
        stats = {k: v.clone() for k, v in buffers(layer).items() if "num_batches" not in k}
        y = layer(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
        assert all(torch.equal(getattr(layer, k), v) for k, v in stats.items())
        control(torch.randn(0, 3, 4, 4))
        counters = [v for k, v in layer.named_buffers() if "num_batches" in k]
        assert all(int(c) == int(control.num_batches_tracked) for c in counters)


@pytest.mark.parametrize("name", list(LAYERS))
def test_running_buffers_that_require_grad_are_refused(name):
    """As F.batch_norm: a RuntimeError, the statistics untouched (nn.BatchNorm2d counts the
    batch before it raises; the nk layers leave their counters alone too)."""
    layer = LAYERS[name](3)
    layer.running_var.requires_grad_(True)
    before = buffers(layer)
    with pytest.raises(RuntimeError, match="running_mean|requires_grad"):
        layer(torch.randn(2, 3, 4, 4))
    after = buffers(layer)
    if name == "BatchNorm2d":
        after, before = ({k: v for k, v in d.items() if "num_batches" not in k} for d in (after, before))
    assert same_buffers(after, before)


def test_triton_fft_path_with_one_channel():
    """C = 1: the spectral statistics of the Triton FFT path are no longer views of one buffer
    ("may not alias any inputs")."""
    from normkernels.triton import sbn as triton_sbn
    gpu = torch.cuda.is_available()
    x = torch.randn(3, 1, 6, 8, dtype=torch.float64, device="cuda" if gpu else "cpu")
    outs = []
    with contextlib.nullcontext() if gpu else triton_sbn.on_cpu():  # the interpreter runs them on CPU
        outs.append(_fft_run(x, "triton"))
    outs.append(_fft_run(x, "torch"))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def _fft_run(x, backend):
    layer = nk.SpectralBatchNorm2d(1, algorithm="fft", backend=backend).double()
    xi = x.detach().clone().requires_grad_(True)
    y = layer(xi)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum().backward()
    return y.detach(), xi.grad, layer.running_mean.clone(), layer.running_var.clone()


def _disagreeing_ranks(rank):
    """rank 0: SBN on 6x6 maps; rank 1: SBN on 6x8 maps (and then BN+SBN against SBN)."""
    for case in ("map size", "layer kind"):
        torch.manual_seed(0)
        if case == "map size":
            layer = nk.SpectralBatchNorm2d(3)
            x = torch.randn(2, 3, 6, 6 if rank == 0 else 8)
        else:
            layer = nk.SpectralBatchNorm2d(3) if rank == 0 else nk.BatchNormSBN2d(3)
            x = torch.randn(2, 3, 6, 6)
        layer = nk.distributed.convert_sync(nn.Sequential(layer))
        assert isinstance(layer[0], nk.distributed._Sync)
        before = buffers(layer)
        with pytest.raises(RuntimeError, match="different layers or map sizes"):
            layer(x)
        assert same_buffers(buffers(layer), before), case


def test_synchronized_processes_that_disagree_raise_on_every_rank():
    run_workers(_disagreeing_ranks)
