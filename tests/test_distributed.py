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
from normkernels.distributed import convert_sync

WORLD = 2
# name -> (layer factory, input width W); odd W drops SBN's alternating-sum term.
LAYERS = {
    "l2bn": (lambda: nk.L2BatchNorm2d(3, backend="torch"), 6),
    "l2bn_cpp": (lambda: nk.L2BatchNorm2d(3), 6),
    "l2bn_rescale_noaffine": (lambda: nk.L2BatchNorm2d(3, affine=False, rescale=True, momentum=None), 6),
    "sbn": (lambda: nk.SpectralBatchNorm2d(3), 6),
    "sbn_odd_w": (lambda: nk.SpectralBatchNorm2d(3), 5),
    "bnsbn": (lambda: nk.BatchNormSBN2d(3), 6),
    "bnsbn_odd_w": (lambda: nk.BatchNormSBN2d(3), 5),
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
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    single = randomized(make().double(), seed=1)
    synced = convert_sync(copy.deepcopy(single))
    assert synced is not single

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


def check_all_layers(rank):
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
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm1 = nk.L2BatchNorm2d(4)
        self.norm2 = nk.BatchNormSBN2d(4)
        self.norm3 = nk.SpectralBatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.norm1(self.conv(x)))
        x = self.norm3(self.norm2(x))
        return self.fc(x.mean((2, 3)))


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


def test_recentered_sums_match_direct_computation():
    """The SBN statistics-pass sums moved from a rank's shift to another one are exact."""
    from normkernels.ops import sbn as ops

    g = torch.Generator().manual_seed(3)
    for W in (6, 5):
        x = torch.randn(4, 3, 5, W, generator=g, dtype=torch.float64) + 7
        K_r, K_star = x[0, :, 0, 0], torch.tensor([1.5, -2.0, 6.0], dtype=torch.float64)
        PD, _ = ops._row_consts(W, x.device, torch.float64)
        sums_r = ops._torch_stats(x, K_r, PD)

        class OtherRankFirst:  # a 2-process gather whose rank 0 has shift K* and no data
            rank = 1

            def gather(self, t):
                other = torch.zeros_like(t)
                other[:, 0] = 1.0  # N = 1 > 0 so that its shift is chosen
                other[:, 1] = K_star
                other[:, 2:] = 0.0
                return torch.stack([other, t])

        total, K, n, local = ops.combine_shifted_sums(sums_r, K_r, 4, 5, W, OtherRankFirst())
        direct = ops._torch_stats(x, K_star, PD)
        torch.testing.assert_close(K, K_star)
        assert n == 5
        cols = [0, 1, 2, 4, 5] + ([3] if W % 2 == 0 else [])  # SA is unused for odd W
        torch.testing.assert_close(local[:, cols], direct[:, cols], rtol=1e-12, atol=1e-9)


def test_sync_fft_algorithm_raises():
    with pytest.raises(ValueError, match="algorithm='parseval'"):
        convert_sync(nn.Sequential(nk.SpectralBatchNorm2d(3, algorithm="fft")))


def test_convert_sync_without_process_group_runs_locally():
    layer = convert_sync(nk.L2BatchNorm2d(3))
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(layer(x), nk.L2BatchNorm2d(3)(x))
