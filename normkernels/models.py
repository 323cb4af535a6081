"""Small models for the study and the benchmarks.

- ``SmallCNN(norm=...)``: a few conv stages (plain conv-norm-ReLU, or ResNet basic blocks) for small
  images; ``norm`` in ``"bn"``, ``"bn_sbn"`` (BN, and BN followed by SBN — one fused
  ``nk.BatchNormSBN2d`` — in the later stages), ``"l2bn"`` (``nk.L2BatchNorm2d``), ``"none"``.
  ``model.diagnostic_layers()`` names every block's (post-ReLU) output, shallow to deep.
- torchvision-compatible ResNets: ``resnet18/34/50/101/152(num_classes=1000, norm_layer=...)`` with
  torchvision's attribute and state_dict names (conv1/bn1/relu/maxpool/layer1..layer4/avgpool/fc,
  blocks with conv1/bn1/conv2/bn2[/conv3/bn3]/relu/downsample), so torchvision weights load and
  model-surgery code works on both; ``resnet_cifar(depth, ...)``: the same network with a 3x3
  stride-1 stem and no max-pool (``maxpool`` is an ``nn.Identity``), for 32x32 inputs.
- ``norm_factory(norm)`` / ``make_norm(norm, num_features, stage, num_stages)``: the layer choice.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Type, Union

import torch
from torch import nn

__all__ = [
    "NORMS",
    "norm_layer_class",
    "make_norm",
    "norm_factory",
    "SmallCNN",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet_cifar",
]

#: the normalizations the study compares
NORMS = ("bn", "bn_sbn", "l2bn", "none")


def norm_layer_class(name: str) -> Type[nn.Module]:
    """The public normkernels layer class ``name`` (e.g. ``"L2BatchNorm2d"``), imported lazily so
    that this module can be imported while the package itself is being imported."""
    import importlib

    nk = importlib.import_module("normkernels")
    cls = getattr(nk, name, None)
    if cls is None:  # package __init__ still importing / not re-exported: go to the module
        cls = getattr(importlib.import_module("normkernels.modules"), name)
    return cls


def make_norm(norm: str, num_features: int, stage: int = 0, num_stages: int = 1,
              sbn_stages: Optional[Sequence[int]] = None) -> nn.Module:
    """One normalization layer for a conv output with ``num_features`` channels in stage ``stage``.

    ``"bn_sbn"`` gives ``nn.BatchNorm2d`` in the early stages and ``nk.BatchNormSBN2d`` in
    ``sbn_stages`` (default: the later half of the stages, like the paper's "SBN34")."""
    if norm == "bn":
        return nn.BatchNorm2d(num_features)
    if norm == "bn_sbn":
        if sbn_stages is None:
            sbn_stages = range(num_stages // 2, num_stages)
        if stage in set(sbn_stages):
            return norm_layer_class("BatchNormSBN2d")(num_features)
        return nn.BatchNorm2d(num_features)
    if norm == "l2bn":
        return norm_layer_class("L2BatchNorm2d")(num_features)
    if norm == "sbn":
        return norm_layer_class("SpectralBatchNorm2d")(num_features)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS + ('sbn',)}")


def norm_factory(norm: str) -> Callable[[int], nn.Module]:
    """A torchvision-style ``norm_layer(num_features)`` callable for ``norm``. Stage-independent:
    ``"bn_sbn"`` here means ``nk.BatchNormSBN2d`` everywhere (use ``nk.insert_sbn`` on a BN model
    for per-stage placement)."""
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "bn_sbn":
        return lambda c: norm_layer_class("BatchNormSBN2d")(c)
    if norm == "l2bn":
        return lambda c: norm_layer_class("L2BatchNorm2d")(c)
    if norm == "sbn":
        return lambda c: norm_layer_class("SpectralBatchNorm2d")(c)
    if norm == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS + ('sbn',)}")


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        # nn.Linear keeps PyTorch's default init (as torchvision's ResNet does); normalization
        # layers keep their own reset_parameters (weight 1, bias 0)


# ----------------------------------------------------------------------------- small CNN


class _ConvBlock(nn.Module):
    """conv3x3 -> norm -> ReLU."""

    def __init__(self, cin, cout, stride, norm_layer: Callable[[int], nn.Module], bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
        self.norm = norm_layer(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.norm(self.conv(x)))


class _ResBlock(nn.Module):
    """ResNet basic block: conv-norm-ReLU-conv-norm, + shortcut, ReLU."""

    def __init__(self, cin, cout, stride, norm_layer: Callable[[int], nn.Module], bias: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
        self.norm1 = norm_layer(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=bias)
        self.norm2 = norm_layer(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=bias), norm_layer(cout))

    def forward(self, x):
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallCNN(nn.Module):
    """A small CNN for small images (e.g. 16x16 digits).

    ``widths[i]`` channels in stage i; stage 0 keeps the resolution, each later stage halves it.
    ``blocks`` blocks per stage, each ``conv-norm-ReLU`` (``block="plain"``) or a ResNet basic block
    (``block="resnet"``). Head: global average pool + linear. Convolutions have a bias only when
    ``norm="none"``. ``sbn_stages`` (for ``"bn_sbn"``) defaults to the later half of the stages.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, norm: str = "bn",
                 widths: Sequence[int] = (16, 32, 64), blocks: int = 2, block: str = "plain",
                 sbn_stages: Optional[Sequence[int]] = None):
        super().__init__()
        if norm not in NORMS + ("sbn",):
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        if block not in ("plain", "resnet"):
            raise ValueError(f"block must be 'plain' or 'resnet', got {block!r}")
        self.norm = norm
        self.block = block
        n = len(widths)
        bias = norm == "none"
        Block = _ConvBlock if block == "plain" else _ResBlock
        self.stem = _ConvBlock(in_channels, widths[0], 1,
                               lambda c: make_norm(norm, c, 0, n, sbn_stages), bias)
        stages: List[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            nl = (lambda c, i=i: make_norm(norm, c, i, n, sbn_stages))
            layers = [Block(cin if j == 0 else w, w, (2 if (i > 0 and j == 0) else 1), nl, bias)
                      for j in range(blocks)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def diagnostic_layers(self) -> List[str]:
        """Names of every block's output (post-ReLU), stem first, shallow to deep."""
        names = ["stem"]
        for i, s in enumerate(self.stages):
            names += [f"stages.{i}.{j}" for j in range(len(s))]
        return names

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# ----------------------------------------------------------------------------- torchvision ResNet


def _conv3x3(cin, cout, stride=1, groups=1, dilation=1):
    return nn.Conv2d(cin, cout, 3, stride, dilation, groups=groups, bias=False, dilation=dilation)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock (same attribute names)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("dilation > 1 not supported in BasicBlock")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (ResNet v1.5: stride in the 3x3 conv)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.resnet.ResNet, same constructor, attributes and state_dict keys;
    ``cifar_stem=True`` swaps the 7x7/2 conv + max-pool for a 3x3/1 conv and ``nn.Identity``."""

    def __init__(self, block, layers: Sequence[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation=None, norm_layer=None, cifar_stem: bool = False):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple")
        self.groups = groups
        self.base_width = width_per_group
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, self.inplanes, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if last is not None and getattr(last, "weight", None) is not None:
                    nn.init.constant_(last.weight, 0)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def diagnostic_layers(self) -> List[str]:
        """The four stages' outputs (block ``relu`` modules are called several times per block
        with different shapes, so hook stages or blocks, not those)."""
        return ["layer1", "layer2", "layer3", "layer4"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_SPECS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}


def _resnet(depth: int, **kw) -> ResNet:
    if depth not in _SPECS:
        raise ValueError(f"depth must be one of {sorted(_SPECS)}, got {depth}")
    block, layers = _SPECS[depth]
    return ResNet(block, layers, **kw)


def resnet18(num_classes: int = 1000, norm_layer=None, **kw) -> ResNet:
    return _resnet(18, num_classes=num_classes, norm_layer=norm_layer, **kw)


def resnet34(num_classes: int = 1000, norm_layer=None, **kw) -> ResNet:
    return _resnet(34, num_classes=num_classes, norm_layer=norm_layer, **kw)


def resnet50(num_classes: int = 1000, norm_layer=None, **kw) -> ResNet:
    """torchvision.models.resnet50(weights=None, num_classes=..., norm_layer=...) equivalent."""
    return _resnet(50, num_classes=num_classes, norm_layer=norm_layer, **kw)


def resnet101(num_classes: int = 1000, norm_layer=None, **kw) -> ResNet:
    return _resnet(101, num_classes=num_classes, norm_layer=norm_layer, **kw)


def resnet152(num_classes: int = 1000, norm_layer=None, **kw) -> ResNet:
    return _resnet(152, num_classes=num_classes, norm_layer=norm_layer, **kw)


def resnet_cifar(depth: int = 50, num_classes: int = 10, norm_layer=None, **kw) -> ResNet:
    """ResNet-``depth`` (18/34/50/101/152) for 32x32 inputs: 3x3 stride-1 stem, no max-pool (the
    common CIFAR variant the SBN paper's CIFAR ResNet-50 follows); torchvision attribute names."""
    return _resnet(depth, num_classes=num_classes, norm_layer=norm_layer, cifar_stem=True, **kw)
