"""The fusable activations in torch ops (the oracle of csrc/activation.h and of the Triton helper):
y = act(pre) and g = act'(pre) * dy, with torch's values at the kinks (relu'(0) = 0,
leaky_relu'(0) = negative_slope)."""
from __future__ import annotations

import torch
from torch import Tensor

ACTS = ("identity", "relu", "leaky_relu", "silu")


def check_act(act: str, op: str) -> None:
    if act not in ACTS:
        raise ValueError(f"{op}: act must be one of {ACTS}, got {act!r}")


def act_forward(pre: Tensor, act: str, slope: float) -> Tensor:
    if act == "relu":
        return torch.relu(pre)
    if act == "leaky_relu":
        return torch.where(pre > 0, pre, pre * slope)
    if act == "silu":
        return pre * torch.sigmoid(pre)
    return pre


def act_backward(pre: Tensor, dy: Tensor, act: str, slope: float) -> Tensor:
    if act == "relu":
        return torch.where(pre > 0, dy, torch.zeros_like(dy))
    if act == "leaky_relu":
        return torch.where(pre > 0, dy, dy * slope)
    if act == "silu":
        s = torch.sigmoid(pre)
        return dy * s * (1 + pre * (1 - s))
    return dy
