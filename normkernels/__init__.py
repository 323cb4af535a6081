"""normkernels: fused normalization layers for convolutional networks.

    import normkernels as nk
    layer = nk.L2BatchNorm2d(64)            # l2-normalize each sample, then batch norm
    layer = nk.SpectralBatchNorm2d(64)      # batch norm in the frequency domain, no FFT needed
    layer = nk.BatchNormSBN2d(64)           # BN then SBN, fused
"""
from . import functional
from ._backend import backends
from .convert import convert_bn_to_l2bn, fuse_bn_sbn, insert_sbn, unfuse_bn_sbn
from .modules import BatchNormSBN2d, L2BatchNorm1d, L2BatchNorm2d, SpectralBatchNorm2d

__version__ = "0.1.0"
__all__ = [
    "L2BatchNorm1d", "L2BatchNorm2d", "SpectralBatchNorm2d", "BatchNormSBN2d",
    "functional", "backends", "convert_bn_to_l2bn", "insert_sbn", "fuse_bn_sbn", "unfuse_bn_sbn",
]
