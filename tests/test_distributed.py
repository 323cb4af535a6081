"""Synchronized statistics: P gloo processes on CPU must equal one process on the whole batch."""
import copy
import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normkernels as nk
import normkernels.distributed as nkd
from normkernels.distributed import convert_sync
from references import sbn_reference

WORLD = 2
# name -> (layer factory, input width W); odd W drops SBN's alternating-sum term.
LAYERS = {
    "l2bn": (lambda: nk.L2BatchNorm2d(3, backend="torch"), 6),
    "l2bn_cpp": (lambda: nk.L2BatchNorm2d(3), 6),
    "l2bn_rescale_noaffine": (lambda: nk.L2BatchNorm2d(3, affine=False, rescale=True, momentum=None), 6),
    "l2bn1d": (lambda: nk.L2BatchNorm1d(3), 6),  # #12.5: fed (N, C, H*W)
    "l2bn_act_silu": (lambda: nk.L2BatchNormAct2d(3, act_layer=nn.SiLU), 6),
    "sbn": (lambda: nk.SpectralBatchNorm2d(3), 6),
    "sbn_odd_w": (lambda: nk.SpectralBatchNorm2d(3), 5),
    "sbn_act_leaky": (lambda: nk.SpectralBatchNormAct2d(3, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}),
                      6),
    "bnsbn": (lambda: nk.BatchNormSBN2d(3), 6),
    "bnsbn_odd_w": (lambda: nk.BatchNormSBN2d(3), 5),
    "bnsbn_act_unfused": (lambda: nk.BatchNormSBNAct2d(3, act_layer=nn.GELU), 6),
    "torch_bn": (lambda: nn.BatchNorm2d(3), 6),  # -> normkernels.distributed.SyncBatchNorm on gloo
    "torch_bn_cumulative": (lambda: nn.BatchNorm2d(3, momentum=None), 5),
}
# Per-rank batch sizes: uneven, and one rank with an empty batch.
SPLITS = {"uneven": [3, 5], "empty_rank": [6, 0]}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(fn, *args):
    port = free_port()
    mp.spawn(_worker, args=(fn, port, args), nprocs=WORLD, join=True)


def _worker(rank, fn, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, *args)
        dist.barrier()  # tear down together (a rank leaving early can abort the other's gloo)
    except Exception:  # make the failing rank's traceback visible in the parent
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def randomized(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def all_sum(t):
    t = t.clone()
    dist.all_reduce(t)
    return t


def check_layer_matches_single_process(rank, name, split):
    g = torch.Generator().manual_seed(0)
    sizes = SPLITS[split]
    make, width = LAYERS[name]
    # a different mean per rank: the ranks' statistics shifts differ
    x = torch.randn(sum(sizes), 3, 6, width, generator=g, dtype=torch.float64) * 2 + 3
    x[sizes[0]:] += 5
    if name == "l2bn1d":
        x = x.flatten(2)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    single = randomized(make().double(), seed=1)
    synced = convert_sync(copy.deepcopy(single))
    assert synced is not single and nkd._is_synchronized(synced), type(synced)

    # One process, whole batch.
    xs = x.clone().requires_grad_()
    for _ in range(2):
        y_single = single(xs)
    (y_single * dy).sum().backward()

    # This rank's share.
    start = sum(sizes[:rank])
    xl = x[start:start + sizes[rank]].clone().requires_grad_()
    for _ in range(2):
        y_local = synced(xl)
    (y_local * dy[start:start + sizes[rank]]).sum().backward()

    torch.testing.assert_close(y_local, y_single[start:start + sizes[rank]])
    torch.testing.assert_close(xl.grad, xs.grad[start:start + sizes[rank]])
    for (pname, p), q in zip(single.named_parameters(), synced.parameters()):
        torch.testing.assert_close(all_sum(q.grad), p.grad, msg=f"grad of {pname}")
    for (bname, b), c in zip(single.named_buffers(), synced.buffers()):
        torch.testing.assert_close(c, b, msg=f"buffer {bname}")
    # Eval mode does no collective: a rank alone can run it (a collective here would hang).
    if rank == 0:
        synced.eval()
        torch.testing.assert_close(synced(x), single.eval()(x))


def check_fft_norm_against_torch_fft(rank):
    """#12.9 in the synchronized path: fft_norm's layer equals torch.fft's literal on the whole batch."""
    g = torch.Generator().manual_seed(5)
    sizes = [3, 2]
    x = torch.randn(sum(sizes), 3, 6, 6, generator=g, dtype=torch.float64) + 2
    start, local = sum(sizes[:rank]), slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    for fft_norm in ("ortho", "forward"):
        for fused_bn in (False, True):
            layer = (nk.BatchNormSBN2d(3, fft_norm=fft_norm) if fused_bn else
                     nk.SpectralBatchNorm2d(3, eps=1e-3, fft_norm=fft_norm))
            layer = convert_sync(randomized(layer.double(), seed=2))
            xl = x[local].clone().requires_grad_()
            xs = x.clone().requires_grad_()
            y = layer(xl)
            if fused_bn:
                z = nn.functional.batch_norm(xs, None, None, layer.weight, layer.bias, True)
                ref, mean, var = sbn_reference(z, layer.sbn_weight, layer.sbn_bias, eps=1e-5, fft_norm=fft_norm)
                running = layer.sbn_running_mean, layer.sbn_running_var
            else:
                ref, mean, var = sbn_reference(xs, layer.weight, layer.bias, eps=1e-3, fft_norm=fft_norm)
                running = layer.running_mean, layer.running_var
            torch.testing.assert_close(y, ref[local], msg=f"{fft_norm} {fused_bn}")
            (y * ref[local].detach()).sum().backward()
            (ref * ref.detach()).sum().backward()
            torch.testing.assert_close(xl.grad, xs.grad[local])
            n = x.shape[0] * 6 * 4
            torch.testing.assert_close(running[0], 0.1 * mean.detach())
            torch.testing.assert_close(running[1], 0.9 + 0.1 * var.detach() * n / (n - 1))


def check_all_layers(rank):
    check_fft_norm_against_torch_fft(rank)
    failed = []
    for name in LAYERS:
        for split in SPLITS:
            try:
                check_layer_matches_single_process(rank, name, split)
            except AssertionError as e:
                failed.append(f"{name}-{split}: {e}")
    assert not failed, "\n".join(failed)


def test_sync_matches_single_process():
    # every (layer, split) case in one pair of processes: spawning costs ~10 s a time
    run_workers(check_all_layers)


class SmallNet(nn.Module):
    """Every kind of norm layer, nk's and torch's: DDP on CPU (gloo) must accept the converted model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.norm1 = nk.L2BatchNorm2d(4)
        self.norm2 = nk.BatchNormSBN2d(4)
        self.norm3 = nk.SpectralBatchNorm2d(4)
        self.norm4 = nk.L2BatchNorm1d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.norm1(self.bn(self.conv(x))))
        x = self.norm3(self.norm2(x))
        return self.fc(self.norm4(x.mean((2, 3))))


def ddp_step(rank):
    torch.manual_seed(0)
    model = SmallNet()
    x = torch.randn(8, 3, 8, 8)
    target = torch.randint(0, 5, (8,))
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    nn.functional.cross_entropy(reference(x), target).backward()
    opt.step()

    ddp = nn.parallel.DistributedDataParallel(convert_sync(model))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    local = slice(4 * rank, 4 * rank + 4)
    nn.functional.cross_entropy(ddp(x[local]), target[local]).backward()
    opt.step()
    for (name, p), q in zip(reference.named_parameters(), ddp.module.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=f"parameter {name}")
    for (name, b), c in zip(reference.named_buffers(), ddp.module.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=f"buffer {name}")


def test_ddp_training_step_matches_single_process():
    run_workers(ddp_step)


def test_sync_fft_algorithm_raises():
    with pytest.raises(ValueError, match="algorithm='parseval'"):
        convert_sync(nn.Sequential(nk.SpectralBatchNorm2d(3, algorithm="fft")))


def test_convert_sync_without_process_group_runs_locally():
    layer = convert_sync(nk.L2BatchNorm2d(3))
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(layer(x), nk.L2BatchNorm2d(3)(x))
    bn = convert_sync(nn.BatchNorm2d(3))
    assert type(bn) is nkd.SyncBatchNorm  # no NCCL group: the layer that runs on any device
    torch.testing.assert_close(bn(x), nn.BatchNorm2d(3)(x))


# ---------------------------------------------------------------- framework converters (#12.2)

def test_torch_converter_synchronizes_the_nk_layers_too():
    """nn.SyncBatchNorm.convert_sync_batchnorm alone must not leave a model half-synchronized."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nk.BatchNormSBN2d(4), nk.L2BatchNorm2d(4),
                          nn.Sequential(nk.SpectralBatchNormAct2d(4), nk.L2BatchNorm1d(4)))
    weight = model[2].sbn_weight
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    kinds = [type(m) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm,
                                                                nk.modules._NormBase))]
    assert kinds == [nn.SyncBatchNorm, nkd.SyncBatchNormSBN2d, nkd.SyncL2BatchNorm2d,
                     nkd.SyncSpectralBatchNormAct2d, nkd.SyncL2BatchNorm1d]
    assert model[2].sbn_weight is weight  # same state
    layer = nn.SyncBatchNorm.convert_sync_batchnorm(nk.L2BatchNorm2d(4))  # the model itself a layer
    assert type(layer) is nkd.SyncL2BatchNorm2d


def test_convert_sync_rejects_unknown_batchnorm_subclasses():
    class MyNorm(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="MyNorm"):
        convert_sync(nn.Sequential(MyNorm(3)))
