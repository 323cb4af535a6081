"""Forward+backward medians of every layer at the CPU target shapes, timed in turn (one layer after
the other, round after round) so that a slow phase of a shared machine falls on all of them alike.
A cross-check of the table of `python benchmarks/bench.py`, which times each layer in a block.

    python benchmarks/interleaved.py [N,C,H,W ...]      # default: the three CPU target shapes
"""
import os
import statistics
import sys
import time

import torch
from torch import nn

import normkernels as nk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/bench.py, also when imported
from bench import CPU_TARGET_SHAPES  # noqa: E402

LAYERS = {"L2BN": (nk.L2BatchNorm2d, nk.L2BatchNormAct2d),
          "SBN": (nk.SpectralBatchNorm2d, nk.SpectralBatchNormAct2d),
          "BN+SBN": (nk.BatchNormSBN2d, nk.BatchNormSBNAct2d)}


def layers(c: int) -> dict:
    out = {"BN": nn.BatchNorm2d(c), "BN,ReLU": nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True))}
    for name, (plain, fused) in LAYERS.items():
        out[name] = plain(c)
        out[name + "+ReLU"] = fused(c)  # act_layer defaults to ReLU, fused in the kernels
        out[name + ",ReLU"] = nn.Sequential(plain(c), nn.ReLU(inplace=True))
    return out


def medians_ms(shape: tuple, rounds: int | None = None) -> dict:
    mods = layers(shape[1])
    xs = [torch.randn(shape) for _ in range(4)]
    dys = [torch.randn(shape) for _ in range(4)]

    def step(m, i):
        x = xs[i % 4].detach().requires_grad_()
        m(x).backward(dys[i % 4])

    for m in mods.values():  # warm-up
        for i in range(5):
            step(m, i)
    rounds = rounds or min(200, max(5, int(2e8 / (4 * torch.Size(shape).numel()))))  # ~0.2 GB a layer
    times = {k: [] for k in mods}
    for r in range(rounds):
        for k, m in mods.items():
            t = time.perf_counter()
            step(m, r)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv: list[str]) -> None:
    torch.set_num_threads(2)
    shapes = [tuple(map(int, a.split(","))) for a in argv] or CPU_TARGET_SHAPES
    print(f"forward+backward medians, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for shape in shapes:
        ms = medians_ms(shape)
        bn, bnr = ms["BN"], ms["BN,ReLU"]
        print(f"{'x'.join(map(str, shape))}: BN {bn:.3f} ms, BN+ReLU {bnr:.3f} ms")
        for name in LAYERS:
            f, u = ms[name + "+ReLU"], ms[name + ",ReLU"]
            print(f"  {name:7s} {ms[name]:8.3f} ms = {ms[name] / bn:.2f}x BN | fused ReLU {f:.3f} ms = "
                  f"{f / u:.2f}x ({name}, ReLU), {f / bnr:.2f}x BN+ReLU")


if __name__ == "__main__":
    main(sys.argv[1:])
