"""normkernels: fused normalization layers for convolutional networks.

    import normkernels as nk
    layer = nk.L2BatchNorm2d(64)            # l2-normalize each sample, then batch norm
    layer = nk.SpectralBatchNorm2d(64)      # batch norm in the frequency domain, no FFT needed
    layer = nk.BatchNormSBN2d(64)           # BN then SBN, fused
    layer = nk.L2BatchNormAct2d(64, act_layer=nn.SiLU)   # + activation (timm's BatchNormAct2d)

Model surgery: nk.convert_bn_to_l2bn, nk.insert_sbn, nk.fuse_bn_sbn / nk.unfuse_bn_sbn,
nk.fuse_norm_act (norm + ReLU/LeakyReLU/SiLU into the NormAct layers), nk.recalibrate
(re-estimate running statistics), nk.freeze / nk.unfreeze. Synchronized
statistics for DDP: normkernels.distributed.convert_sync. Importing normkernels also makes
torch's and timm's BatchNorm converters see its layers (normkernels/_frameworks.py).
"""
from . import functional
from .ops import decompositions as _decompositions  # noqa: F401  (export/ONNX: eval ops -> aten)
from ._backend import backends
from .convert import (convert_bn_to_l2bn, freeze, fuse_bn_sbn, fuse_norm_act, insert_sbn, recalibrate, unfreeze,
                      unfuse_bn_sbn)
from .modules import (BatchNormSBN2d, BatchNormSBNAct2d, FreshStateWarning, L2BatchNorm1d, L2BatchNorm2d,
                      L2BatchNormAct2d, NormThenSBN2d, SpectralBatchNorm2d, SpectralBatchNormAct2d)
from . import distributed  # noqa: E402  (after the modules it wraps)
from . import _frameworks
from .version import __version__

_frameworks.install()

__all__ = [
    "L2BatchNorm1d", "L2BatchNorm2d", "SpectralBatchNorm2d", "BatchNormSBN2d", "NormThenSBN2d",
    "L2BatchNormAct2d", "SpectralBatchNormAct2d", "BatchNormSBNAct2d", "FreshStateWarning",
    "functional", "backends", "distributed", "convert_bn_to_l2bn", "insert_sbn", "fuse_bn_sbn", "unfuse_bn_sbn",
    "fuse_norm_act", "recalibrate", "freeze", "unfreeze",
]
