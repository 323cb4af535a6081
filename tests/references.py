"""The layers' literal definitions in torch ops (use float64): the oracle every path is tested
against, and the error measure the tests share."""
import torch
import torch.nn.functional as F


def l2bn_reference(x, weight, bias, running_mean=None, running_var=None, training=True, momentum=0.1, eps=1e-5,
                   l2_eps=1e-12, rescale=False):
    """F.batch_norm(F.normalize(x.flatten(1)).view_as(x)) [times sqrt(D) with rescale]."""
    u = F.normalize(x.flatten(1), dim=1, eps=l2_eps).view_as(x)
    if rescale:
        u = u * (x[0].numel() ** 0.5)
    return F.batch_norm(u, running_mean, running_var, weight, bias, training, momentum, eps)


def sbn_reference(x, weight, bias, mean=None, var=None, eps=1e-5, fft_norm="backward"):
    """irfft2(gamma (rfft2(x) - mean) / sqrt(var + eps) + beta) with torch.fft's norm=fft_norm on
    both transforms; mean (complex) and var (modulus variance) over (n, k, l) of the normalized
    spectrum, or the given ones (in that scale).

    Returns (y, mean, biased var): the statistics used (given, or of this batch)."""
    C, (H, W) = x.shape[1], x.shape[-2:]
    X = torch.fft.rfft2(x, norm=fft_norm)
    if mean is None:
        mean = X.mean(dim=(0, 2, 3))
        var = (X - mean.view(1, C, 1, 1)).abs().square().mean(dim=(0, 2, 3))
    Y = (X - mean.view(1, C, 1, 1)) / torch.sqrt(var.view(1, C, 1, 1) + eps)
    if weight is not None:
        Y = Y * weight.view(1, C, 1, 1)
    if bias is not None:
        Y = Y + bias.view(1, C, 1, 1)
    return torch.fft.irfft2(Y, s=(H, W), norm=fft_norm), mean, var


def bn_sbn_reference(x, bn_weight, bn_bias, sbn_weight, sbn_bias, stats=None, bn_eps=1e-5, sbn_eps=1e-5,
                     fft_norm="backward"):
    """F.batch_norm then the literal SBN (sbn_reference with fft_norm). stats = (bn_mean, bn_var,
    sbn_mean, sbn_var) for eval, None for batch statistics. Returns (y, bn_mean, bn_var, sbn_mean,
    sbn_var)."""
    if stats is None:
        bn_mean, bn_var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        z = F.batch_norm(x, None, None, bn_weight, bn_bias, True, 0.0, bn_eps)
        sbn_stats = (None, None)
    else:
        bn_mean, bn_var, *sbn_stats = stats
        z = F.batch_norm(x, bn_mean, bn_var, bn_weight, bn_bias, False, 0.0, bn_eps)
    y, sbn_mean, sbn_var = sbn_reference(z, sbn_weight, sbn_bias, *sbn_stats, eps=sbn_eps, fft_norm=fft_norm)
    return y, bn_mean, bn_var, sbn_mean, sbn_var


def max_rel_error(a, ref):
    """max |a - ref| / max |ref|, computed in ref's dtype and device."""
    a = a.detach().to(device=ref.device, dtype=ref.dtype)
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
