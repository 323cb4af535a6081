"""SBN Triton kernels (normkernels/triton/sbn_kernels.py). Without a GPU they run on CPU tensors
under TRITON_INTERPRET=1 (set by conftest.py): tiny shapes only.

Two levels: the host functions against the torch passes they replace, and the full op path with
backend="triton" against the literal float64 definition (rfft2 -> complex mean -> modulus
variance -> normalize/affine -> irfft2), including gradcheck of the kernels in float64."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

import test_sbn_ops as sbn_op_checks  # noqa: E402
from references import max_rel_error as rel  # noqa: E402
from references import sbn_reference as literal_sbn  # noqa: E402
from normkernels.ops import sbn as S  # noqa: E402

K = pytest.importorskip("normkernels.triton.sbn_kernels")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5






# ------------------------------------------------------------------------------------------
# host functions vs the torch passes
# ------------------------------------------------------------------------------------------

HOST_SHAPES = [(2, 3, 4, 6), (2, 2, 3, 5), (3, 1, 1, 7), (2, 2, 5, 1), (1, 2, 2, 300)]


@pytest.mark.parametrize("shape", HOST_SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_host_passes_match_torch_passes(shape, layout):
    gen = torch.Generator().manual_seed(20)
    x = (torch.randn(shape, generator=gen) + 3).to(DEV)
    dy = torch.randn(shape, generator=gen).to(DEV)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    C, W = shape[1], shape[3]
    PD, PP = S._row_consts(W, x.device, torch.float32)
    Kc = x[0, :, 0, 0].float()
    torch.testing.assert_close(K.sbn_stats(x, Kc, PD), S._torch_stats(x, Kc, PD),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(K.sbn_grad_stats(dy, x, Kc, PP), S._torch_grad_stats(dy, x, Kc, PP),
                               rtol=1e-5, atol=1e-4)
    coef5 = torch.randn(C, 5, generator=gen).to(DEV)
    coef5[:, 0] = Kc
    y = K.sbn_forward_apply(x, coef5, PP)
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, S._torch_forward_apply(x, coef5, PP), rtol=1e-5, atol=1e-5)
    coef8 = torch.randn(C, 8, generator=gen).to(DEV)
    coef8[:, 0] = Kc
    for need_row in (True, False):
        dx = K.sbn_backward_apply(dy, x, coef8, PD, need_row)
        torch.testing.assert_close(dx, S._torch_backward_apply(dy, x, coef8, PD, need_row),
                                   rtol=1e-5, atol=1e-4)


def test_host_many_chunks_deterministic(monkeypatch):
    # force several (channel, chunk) programs per channel on a small tensor
    monkeypatch.setattr(K, "MIN_CHUNK_ELEMS", 1)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(40, 2, 8, 5, generator=gen).to(DEV)
    rows, n_chunks = K._chunking(x, 40 * 8, 5, 2, K._tiles(5, 1024)[0])
    assert n_chunks > 1
    PD, _ = S._row_consts(5, x.device, torch.float32)
    Kc = x[0, :, 0, 0].float()
    a = K.sbn_stats(x, Kc, PD)
    torch.testing.assert_close(a, S._torch_stats(x, Kc, PD), rtol=1e-5, atol=1e-4)
    assert torch.equal(a, K.sbn_stats(x, Kc, PD))       # deterministic


def test_host_half_input_accumulates_fp32():
    gen = torch.Generator().manual_seed(22)
    x = (torch.randn(2, 2, 4, 6, generator=gen) * 2 + 5).to(torch.float16).to(DEV)
    PD, _ = S._row_consts(6, x.device, torch.float32)
    Kc = x[0, :, 0, 0].float()
    s = K.sbn_stats(x, Kc, PD)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, S._torch_stats(x, Kc, PD), rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------------------------------
# full op path, backend="triton"
# ------------------------------------------------------------------------------------------


def run_and_compare(shape, algorithm, **kw):
    sbn_op_checks.run_and_compare(shape, algorithm, "triton", device=DEV, **kw)


SHAPES = [(3, 2, 4, 6), (2, 3, 5, 7), (2, 1, 6, 5), (2, 2, 1, 5), (3, 2, 4, 1), (3, 2, 3, 2),
          (4, 2, 1, 1)]


@pytest.mark.parametrize("algorithm", ["parseval", "fft"])
@pytest.mark.parametrize("shape", SHAPES)
def test_train_matches_literal(shape, algorithm):
    run_and_compare(shape, algorithm)


@pytest.mark.parametrize("algorithm", ["parseval", "fft"])
@pytest.mark.parametrize("shape", [(3, 2, 4, 6), (2, 2, 5, 7), (3, 2, 3, 2)])
def test_large_mean_float32(shape, algorithm):
    run_and_compare(shape, algorithm, shift=1000.0, seed=1)


@pytest.mark.parametrize("algorithm", ["parseval", "fft"])
def test_eval_and_affine_none(algorithm):
    run_and_compare((3, 2, 4, 5), algorithm, eval_stats=True, seed=2)
    run_and_compare((3, 2, 4, 5), algorithm, affine=False, seed=3)
    run_and_compare((3, 2, 4, 5), algorithm, affine=False, eval_stats=True, seed=3)


@pytest.mark.parametrize("algorithm", ["parseval", "fft"])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_half_dtypes(algorithm, dtype, tol):
    run_and_compare((3, 2, 4, 6), algorithm, dtype=dtype, tol=tol, seed=4)


@pytest.mark.parametrize("algorithm", ["parseval", "fft"])
def test_channels_last(algorithm):
    run_and_compare((2, 3, 4, 5), algorithm, channels_last=True, seed=5)


@pytest.mark.parametrize("algorithm", ["parseval", "fft"])
@pytest.mark.parametrize("shape", [(2, 2, 2, 3), (2, 1, 3, 2)])
@pytest.mark.parametrize("eval_stats", [False, True])
def test_gradcheck_kernels_float64(algorithm, shape, eval_stats):
    gen = torch.Generator().manual_seed(8)
    C = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEV).requires_grad_()
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(DEV).requires_grad_()
    b = torch.randn(C, generator=gen, dtype=torch.float64).to(DEV).requires_grad_()
    mean = torch.randn(C, generator=gen, dtype=torch.complex64).to(DEV) if eval_stats else None
    var = (torch.rand(C, generator=gen) + 0.5).to(DEV) if eval_stats else None

    def f(x, w, b):
        return S.spectral_batch_norm(x, w, b, mean, var, EPS, algorithm, "triton")[0]

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_triton_equals_torch_backend():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 4, 6, generator=gen).to(DEV)
    for alg in ("parseval", "fft"):
        a = S.spectral_batch_norm(x, None, None, None, None, EPS, alg, "triton")
        r = S.spectral_batch_norm(x, None, None, None, None, EPS, alg, "torch")
        for u, v in zip(a, r):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
