"""L2BN CUDA kernels (GPU only: pytest -m cuda). Same checks as test_l2bn_ops.py on CUDA tensors,
plus CUDA-vs-torch-passes agreement on layouts/dtypes, splits (small N*C, large S),
determinism, and float64 gradcheck."""
import os

import pytest
import torch

from normkernels.ops import l2bn as L

pytestmark = pytest.mark.cuda

if torch.cuda.is_available():
    from test_l2bn_ops import run_case  # noqa: E402  (same reference and tolerances)


def _need_cuda_ext():
    if not L._EXT or not torch._C._dispatch_has_kernel_for_dispatch_key(
            "normkernels::l2bn_sample_stats", "CUDA"):
        pytest.fail("normkernels._C was built without CUDA kernels on a CUDA machine")
    return torch.ops.normkernels


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


SHAPES = [(4, 3, 5, 7), (3, 5, 1, 1), (6, 1, 4, 4), (7, 4), (3, 4, 9), (2, 3, 129, 67), (1, 2, 256, 256),
          (2, 160, 3, 3), (8, 64, 16, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
def test_forward_backward(shape, channels_last, rescale):
    _need_cuda_ext()
    x = torch.randn(shape, generator=_gen(1), device="cuda")
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    y, _ = run_case(x, "cuda", rescale=rescale)
    if channels_last and x.dim() == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(5, 3, 6, 5), (2, 4, 100, 100), (6, 4)], ids=str)
def test_large_mean(shape):
    _need_cuda_ext()
    x = 1000.0 + torch.randn(shape, generator=_gen(2), device="cuda")
    run_case(x, "cuda", rtol=2e-4, atol=5e-4)
    if x.dim() == 4:
        run_case(x.contiguous(memory_format=torch.channels_last), "cuda", rtol=2e-4, atol=5e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)], ids=["f16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_types(dtype, tol, channels_last):
    _need_cuda_ext()
    x = torch.randn(4, 8, 12, 10, generator=_gen(3), device="cuda").to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    run_case(x, "cuda", rtol=tol, atol=tol)


def test_eval_affine_none_noncontiguous_zero_sample():
    _need_cuda_ext()
    g = _gen(4)
    x = torch.randn(4, 6, 10, 9, generator=g, device="cuda")
    run_case(x, "cuda", eval_mode=True)
    run_case(x, "cuda", affine=False)
    run_case(x[:, ::2, 1:8, ::2], "cuda")
    run_case(x.transpose(2, 3), "cuda")
    z = x.clone()
    z[2] = 0
    run_case(z, "cuda", rescale=True)


@pytest.mark.parametrize("layout", ["ncs", "nsc", "nsc3d", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_passes_match_torch_passes(layout, dtype):
    ops = _need_cuda_ext()
    g = _gen(5)
    if layout == "ncs":
        x = torch.randn(3, 5, 70, 90, generator=g, device="cuda")
    elif layout == "nsc":
        x = torch.randn(3, 70, 17, 19, generator=g, device="cuda").contiguous(memory_format=torch.channels_last)
    elif layout == "nsc3d":
        x = torch.randn(3, 1000, 40, generator=g, device="cuda").transpose(1, 2)
    else:  # storage offset of one element: vector loads must fall back / realign
        x = torch.randn(3 * 5 * 4097 + 1, generator=g, device="cuda")[1:].view(3, 5, 4097)
    x = (x * 3 + 50).to(dtype)
    dy = torch.randn(x.shape, generator=g, device="cuda").to(dtype)
    m, m2 = ops.l2bn_sample_stats(x)
    mr, m2r = L._torch_sample_stats(x)
    torch.testing.assert_close(m, mr, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(m2, m2r, rtol=1e-4, atol=1e-2)
    pc, q = ops.l2bn_backward_sums(dy, x, m)
    pcr, qr = L._torch_backward_sums(dy, x, m)
    torch.testing.assert_close(pc, pcr, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(q, qr, rtol=1e-4, atol=1e-2)
    acc = m.dtype
    a, b, d = (torch.randn(x.shape[:2], generator=g, device="cuda", dtype=acc) for _ in range(3))
    for args in [(x, m, a, b), (x, m, a, b, dy, d)]:
        out = ops.l2bn_apply(*args)
        ref = L._torch_apply(*args)
        assert out.stride() == ref.stride()
        torch.testing.assert_close(out, ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, atol=1e-2)


def test_deterministic():
    ops = _need_cuda_ext()
    x = torch.randn(1, 3, 512, 512, generator=_gen(6), device="cuda")  # small N*C: split rows
    dy = torch.randn_like(x)
    m1, v1 = ops.l2bn_sample_stats(x)
    m2, v2 = ops.l2bn_sample_stats(x)
    assert torch.equal(m1, m2) and torch.equal(v1, v2)
    p1, q1 = ops.l2bn_backward_sums(dy, x, m1)
    p2, q2 = ops.l2bn_backward_sums(dy, x, m1)
    assert torch.equal(p1, p2) and torch.equal(q1, q2)


@pytest.mark.parametrize("eval_mode", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
def test_gradcheck_float64(eval_mode, rescale):
    _need_cuda_ext()
    g = _gen(7)
    for shape in [(3, 2, 3, 2), (4, 3)]:
        C = shape[1]
        x = torch.randn(shape, generator=g, device="cuda", dtype=torch.float64, requires_grad=True)
        w = (torch.rand(C, generator=g, device="cuda", dtype=torch.float64) + 0.5).requires_grad_()
        b = torch.randn(C, generator=g, device="cuda", dtype=torch.float64, requires_grad=True)
        mean = var = None
        if eval_mode:
            mean = torch.randn(C, generator=g, device="cuda", dtype=torch.float64) * 0.1
            var = torch.rand(C, generator=g, device="cuda", dtype=torch.float64) + 0.5
        fn = lambda x, w, b: L.l2_batch_norm(x, w, b, mean, var, 1e-5, 1e-12, rescale, "cuda")[0]
        assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)
        if x.dim() == 4:
            xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
            assert torch.autograd.gradcheck(fn, (xc, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_opcheck_and_compile():
    ops = _need_cuda_ext()
    g = _gen(8)
    x = torch.randn(3, 4, 5, 6, generator=g, device="cuda")
    m = torch.randn(3, 4, generator=g, device="cuda")
    a, b, d = (torch.randn(3, 4, generator=g, device="cuda") for _ in range(3))
    dy = torch.randn_like(x)
    torch.library.opcheck(ops.l2bn_sample_stats.default, (x,))
    torch.library.opcheck(ops.l2bn_backward_sums.default, (dy, x, m))
    torch.library.opcheck(ops.l2bn_apply.default, (x, m, a, b, dy, d))
    w = torch.rand(4, generator=g, device="cuda").add(0.5).requires_grad_()
    bb = torch.randn(4, generator=g, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.normkernels.l2bn_forward.default,
                          (x.clone().requires_grad_(), w, bb, None, None, 1e-5, 1e-12, False, "cuda"))

    def f(x, w, b):
        return L.l2_batch_norm(x, w, b, None, None, 1e-5, 1e-12, False, "cuda")[0]

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(cf(x, w, bb), f(x, w, bb))
