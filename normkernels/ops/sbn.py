"""The SBN family's ops, Python side: BN+SBN is the op (csrc/sbn.cpp has the contracts), SBN is it
with the BN stage off (``bn=False``). This module is the glue:

* the fake kernels of the dispatcher ops (csrc/sbn.cpp; CPU kernels in C++, CUDA kernels in
  Triton registered onto the same schemas by normkernels/_backend.py);
* backend "torch": the oracle of normkernels/ops/sbn_oracle.py as the custom ops
  ``normkernels::torch_sbn_forward`` / ``torch_sbn_backward`` (register_autograd);
* ``forward``, the one entry of normkernels/functional.py (the only place that validates), which
  runs one op per direction, or with a reducer the synchronized pieces (one all_gather forward,
  one all_reduce backward).

The literal FFT path is normkernels/ops/sbn_fft.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import sbn_oracle as oracle
from .sbn_fft import grad_to
from .sbn_layout import GSUMS, ROWS, SAVED

__all__ = ["forward"]

_OPT = Optional[Tensor]

try:  # registers torch.ops.normkernels.sbn_* (csrc/sbn.cpp)
    import normkernels._C  # noqa: F401

    _HAS_C = hasattr(torch.ops.normkernels, "sbn_forward")
except ImportError:  # pure-PyTorch install: backend "torch" only
    _HAS_C = False


# ----------------------------------------------------------------------------------------------
# fake kernels
# ----------------------------------------------------------------------------------------------


def _fake_forward_outputs(x: Tensor, bn: bool):
    C, stat = x.shape[1], oracle.stat
    n_bn = C if bn else 0
    return (oracle.like(x), stat(x, n_bn), stat(x, n_bn), stat(x, C, 2), stat(x, C),
            x.new_empty((C, len(SAVED)), dtype=torch.float64))


def _fake_backward_outputs(x: Tensor, bn: bool):
    C, stat = x.shape[1], oracle.stat
    n_bn = C if bn else 0
    return oracle.like(x), stat(x, n_bn), stat(x, n_bn), stat(x, C), stat(x, C)


def _fake_forward(x, bn, *_):
    return _fake_forward_outputs(x, bn)


def _fake_finish(x, rows_all, rank, bn, *_):
    return _fake_forward_outputs(x, bn)


def _fake_backward(dy, x, saved, bn, *_):
    return _fake_backward_outputs(x, bn)


def _fake_grad_finish(dy, x, saved, gsums_local, gsums_all, bn, *_):
    return _fake_backward_outputs(x, bn)


def _fake_stats(x):
    return x.new_empty((x.shape[1], len(ROWS)), dtype=torch.float64)


def _fake_grad_stats(dy, x, saved, act, act_param):
    return x.new_empty((x.shape[1], len(GSUMS)), dtype=torch.float64)


if _HAS_C:
    for _name, _fake in (("sbn_stats", _fake_stats), ("sbn_finish", _fake_finish),
                         ("sbn_forward", _fake_forward), ("sbn_grad_stats", _fake_grad_stats),
                         ("sbn_grad_finish", _fake_grad_finish), ("sbn_backward", _fake_backward)):
        torch.library.register_fake(f"normkernels::{_name}", _fake)


# ----------------------------------------------------------------------------------------------
# backend "torch": the oracle as custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("normkernels::torch_sbn_forward", mutates_args=())
def torch_sbn_forward(x: Tensor, bn: bool, bn_weight: _OPT, bn_bias: _OPT, bn_mean: _OPT,
                      bn_var: _OPT, sbn_weight: _OPT, sbn_bias: _OPT, sbn_mean: _OPT,
                      sbn_var: _OPT, bn_eps: float, sbn_eps: float, fft_norm: str, act: str,
                      act_param: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """sbn_forward (csrc/sbn.cpp) in torch ops."""
    if sbn_mean is None:
        return oracle.torch_sbn_finish(x, oracle.torch_sbn_stats(x)[None], 0, bn, bn_weight, bn_bias,
                                       sbn_weight, sbn_bias, bn_eps, sbn_eps, fft_norm, act, act_param)
    return oracle.torch_sbn_eval(x, bn, bn_weight, bn_bias, bn_mean, bn_var, sbn_weight, sbn_bias,
                                 sbn_mean, sbn_var, bn_eps, sbn_eps, fft_norm, act, act_param)


torch_sbn_forward.register_fake(_fake_forward)


@torch.library.custom_op("normkernels::torch_sbn_backward", mutates_args=())
def torch_sbn_backward(dy: Tensor, x: Tensor, saved: Tensor, bn: bool, training: bool,
                       fft_norm: str, act: str, act_param: float
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """sbn_backward (csrc/sbn.cpp) in torch ops."""
    gs = oracle.torch_sbn_grad_stats(dy, x, saved, act, act_param)
    return oracle.torch_sbn_grad_finish(dy, x, saved, gs, gs, bn, training, fft_norm, act, act_param)


torch_sbn_backward.register_fake(_fake_backward)

# positions of sbn_forward's differentiable arguments, and where their gradients are in the
# backward's outputs: x, bn_weight, bn_bias, sbn_weight, sbn_bias
_GRAD_ARGS = ((0, 0), (2, 1), (3, 2), (6, 3), (7, 4))


def _grads(needs_input_grad, params: dict, grads) -> tuple:
    """The autograd outputs (one per sbn_forward argument) from the backward's five."""
    out = [None] * 15
    for arg, k in _GRAD_ARGS:
        if needs_input_grad[arg]:
            out[arg] = grads[k] if arg == 0 else grad_to(grads[k], params[arg], True)
    return tuple(out)


def _setup(ctx, inputs, output):
    x, bn, sbn_mean = inputs[0], inputs[1], inputs[8]
    ctx.save_for_backward(x, output[5])
    ctx.mark_non_differentiable(*output[1:])
    ctx.cfg = (bn, sbn_mean is None) + tuple(inputs[12:])
    ctx.params = {arg: inputs[arg] for arg, _ in _GRAD_ARGS[1:]}


def _backward(ctx, dy, *_):
    x, saved = ctx.saved_tensors
    return _grads(ctx.needs_input_grad, ctx.params, torch_sbn_backward(dy, x, saved, *ctx.cfg))


torch.library.register_autograd("normkernels::torch_sbn_forward", _backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------
# the entry of normkernels/functional.py
# ----------------------------------------------------------------------------------------------

if _HAS_C:
    _o = torch.ops.normkernels
    _NATIVE = (_o.sbn_forward.default, _o.sbn_stats.default, _o.sbn_finish.default,
               _o.sbn_grad_stats.default, _o.sbn_grad_finish.default)
_TORCH = (torch.ops.normkernels.torch_sbn_forward.default, oracle.torch_sbn_stats,
          oracle.torch_sbn_finish, oracle.torch_sbn_grad_stats, oracle.torch_sbn_grad_finish)


def _ops(backend: str):
    """(forward, stats, finish, grad_stats, grad_finish) of a concrete backend: "cpp" (CPU) and
    "triton" (CUDA, or CPU tensors inside normkernels.triton.sbn.on_cpu()) are the same
    dispatcher ops, whose kernel the device picks; "torch" is the oracle."""
    if backend == "torch":
        return _TORCH
    if not _HAS_C:
        raise RuntimeError(f"backend {backend!r} needs the C++ extension normkernels._C, which is "
                           "not built (pip install --no-build-isolation -e .); use backend 'torch'")
    return _NATIVE


def forward(x: Tensor, bn: bool, bn_weight: _OPT, bn_bias: _OPT, bn_mean: _OPT, bn_var: _OPT,
            sbn_weight: _OPT, sbn_bias: _OPT, sbn_mean: _OPT, sbn_var: _OPT, bn_eps: float,
            sbn_eps: float, fft_norm: str, act: str, act_param: float, backend: str, reducer=None):
    """The family's layer on validated inputs: statistics all given (eval; sbn_mean (C, 2) real)
    or all None (training). With a reducer (training only) the statistics are its group's.
    Returns (y, bn_mean, bn_var, sbn_mean (C, 2), sbn_var, samples): the statistics of the
    normalization ((0,) BN ones with the stage off) and the number of samples they cover."""
    ops = _ops(backend)
    if reducer is None:
        y, bm, bv, sm, sv, _ = ops[0](x, bn, bn_weight, bn_bias, bn_mean, bn_var, sbn_weight, sbn_bias,
                                      sbn_mean, sbn_var, bn_eps, sbn_eps, fft_norm, act, act_param)
        return y, bm, bv, sm, sv, x.shape[0]
    info: dict = {}
    y, bm, bv, sm, sv = _Synchronized.apply(x, bn_weight, bn_bias, sbn_weight, sbn_bias, (
        bn, bn_eps, sbn_eps, fft_norm, act, act_param), ops, reducer, info)
    return y, bm, bv, sm, sv, info["samples"]


class _Synchronized(torch.autograd.Function):
    """Training over a process group: the statistics rows of every process gathered (one
    all_gather), finished by each; the gradient sums all_reduced (one all_reduce). An empty local
    batch joins both collectives."""

    @staticmethod
    def forward(ctx, x, bn_w, bn_b, sbn_w, sbn_b, cfg, ops, reducer, info):
        bn, bn_eps, sbn_eps, fft_norm, act, act_param = cfg
        rows_all = reducer.gather(ops[1](x))
        y, bm, bv, sm, sv, saved = ops[2](x, rows_all, reducer.rank, bn, bn_w, bn_b, sbn_w, sbn_b,
                                          bn_eps, sbn_eps, fft_norm, act, act_param)
        info["samples"] = int(round(float(rows_all[:, 0, 0].sum().item()))) if rows_all.shape[1] else 0
        ctx.save_for_backward(x, saved)
        ctx.cfg = (bn, fft_norm, act, act_param, ops, reducer)
        ctx.params = (bn_w, bn_b, sbn_w, sbn_b)
        ctx.mark_non_differentiable(bm, bv, sm, sv)
        ctx.set_materialize_grads(False)
        return y, bm, bv, sm, sv

    @staticmethod
    def backward(ctx, dy, *_):
        if dy is None:
            return (None,) * 9
        x, saved = ctx.saved_tensors
        bn, fft_norm, act, act_param, ops, reducer = ctx.cfg
        local = ops[3](dy, x, saved, act, act_param)
        dx, *dparams = ops[4](dy, x, saved, local, reducer.all_reduce(local), bn, True, fft_norm, act,
                              act_param)
        need = ctx.needs_input_grad
        return ((dx if need[0] else None),) + tuple(
            grad_to(g, p, n) for g, p, n in zip(dparams, ctx.params, need[1:5])) + (None,) * 4
