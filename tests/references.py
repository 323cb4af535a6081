"""The layers' literal definitions in float64 torch ops: the oracle every path is tested against."""
import torch
import torch.nn.functional as F


def l2bn_reference(x, weight, bias, running_mean=None, running_var=None, training=True, momentum=0.1, eps=1e-5,
                   l2_eps=1e-12, rescale=False):
    """F.batch_norm(F.normalize(x.flatten(1)).view_as(x)) [times sqrt(D) with rescale]."""
    u = F.normalize(x.flatten(1), dim=1, eps=l2_eps).view_as(x)
    if rescale:
        u = u * (x[0].numel() ** 0.5)
    return F.batch_norm(u, running_mean, running_var, weight, bias, training, momentum, eps)


def sbn_reference(x, weight, bias, mean=None, var=None, eps=1e-5):
    """rfft2 -> complex mean, modulus variance over (n, k, l) -> normalize, affine -> irfft2.

    Returns (y, batch_mean, biased batch_var) — the statistics used (given or computed)."""
    h, w = x.shape[-2:]
    X = torch.fft.rfft2(x)
    if mean is None:
        mean = X.mean(dim=(0, 2, 3))
        var = (X - mean[None, :, None, None]).abs().pow(2).mean(dim=(0, 2, 3))
    Y = (X - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)
    if weight is not None:
        Y = Y * weight[None, :, None, None] + bias[None, :, None, None]
    return torch.fft.irfft2(Y, s=(h, w)), mean, var


def bn_sbn_reference(x, bn_weight, bn_bias, sbn_weight, sbn_bias, bn_stats=None, sbn_stats=None, bn_eps=1e-5,
                     sbn_eps=1e-5):
    """F.batch_norm followed by the literal SBN; returns (y, bn_mean, bn_var, sbn_mean, sbn_var)."""
    if bn_stats is None:
        bn_mean, bn_var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    else:
        bn_mean, bn_var = bn_stats
    z = F.batch_norm(x, bn_mean, bn_var, bn_weight, bn_bias, False, 0.0, bn_eps)
    y, sbn_mean, sbn_var = sbn_reference(z, sbn_weight, sbn_bias, *(sbn_stats or (None, None)), eps=sbn_eps)
    return y, bn_mean, bn_var, sbn_mean, sbn_var
