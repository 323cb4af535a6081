"""Deploy paths of the conformance matrix (issue #17; the training paths are issue #16's columns):
every public layer in eval, with trained (non-trivial) running statistics and affine parameters,
through

  * torch.export.export(model, dynamic batch) + run_decompositions(): only aten ops remain; the
    program matches eager at another batch size; torch.export.save'd, it loads and runs in a
    process that cannot import normkernels (one subprocess for every row);
  * torch.onnx.export(..., dynamo=True) with a dynamic batch dimension, run in onnxruntime;
  * torch.jit.trace + torch.jit.save / load;

with nn.BatchNorm2d as the control row that must pass the same checks. Then whole models
(torchvision resnet18 converted with convert_bn_to_l2bn / insert_sbn / fuse_norm_act) through
ONNX, and the decompositions themselves against the ops they replace.
"""
from __future__ import annotations

import io
import json
import operator
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import normkernels as nk
from normkernels.ops import decompositions as D
from normkernels.ops import sbn_oracle as _sbn_oracle

import onnxruntime as ort  # make setup installs it (with onnx, onnxscript); missing, the file fails

ATOL = RTOL = 1e-5  # float32, against eager

ROWS = {
    "BatchNorm2d": lambda: nn.BatchNorm2d(6),
    "L2BatchNorm1d": lambda: nk.L2BatchNorm1d(6),
    "L2BatchNorm2d": lambda: nk.L2BatchNorm2d(6),
    "SpectralBatchNorm2d": lambda: nk.SpectralBatchNorm2d(6),
    "BatchNormSBN2d": lambda: nk.BatchNormSBN2d(6),
}
for _act in (nn.ReLU, nn.SiLU):
    for _cls in (nk.L2BatchNormAct2d, nk.SpectralBatchNormAct2d, nk.BatchNormSBNAct2d):
        ROWS[f"{_cls.__name__}[{_act.__name__}]"] = (lambda c=_cls, a=_act: c(6, act_layer=a))
NAMES = list(ROWS)


def _shape(name, n):
    # 7 x 6 maps: even W (the alternating sums) and an H != W (rows vs columns of the pattern)
    return (n, 6, 5) if name == "L2BatchNorm1d" else (n, 6, 7, 6)


def _trained(name):
    """The layer after a few training steps on shifted, scaled data, with random affine
    parameters: every statistic and parameter differs from its initial value."""
    torch.manual_seed(NAMES.index(name))
    m = ROWS[name]()
    with torch.no_grad():
        for pname, p in m.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if pname.endswith("weight") else torch.randn_like(p))
    m.train()
    for _ in range(3):
        m(torch.randn(_shape(name, 8)) * 2.0 + 0.7)
    return m.eval()


@pytest.fixture(scope="module")
def rows():
    """name -> (eval layer, export input (batch 2), check input (batch 5), eager output on it)."""
    out = {}
    for name in NAMES:
        m = _trained(name)
        x = torch.randn(_shape(name, 2))
        xc = torch.randn(_shape(name, 5)) * 1.5 + 0.3
        with torch.no_grad():
            out[name] = (m, x, xc, m(xc))
    return out


def _batch_dim():
    return ({0: torch.export.Dim("batch")},)


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------- torch.export
def _non_aten(gm: torch.fx.GraphModule) -> list[str]:
    bad = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if not (isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "aten"):
            bad.append(str(node.target))
    return sorted(set(bad))


@pytest.fixture(scope="module")
def exported(rows):
    """name -> the decomposed ExportedProgram, or the exception export raised."""
    out = {}
    for name, (m, x, _, _) in rows.items():
        try:
            out[name] = torch.export.export(m, (x,), dynamic_shapes=_batch_dim()).run_decompositions()
        except Exception as e:  # reported by the row's test
            out[name] = e
    return out


@pytest.mark.parametrize("name", NAMES)
def test_export_decomposes_to_aten(name, rows, exported):
    ep = exported[name]
    if isinstance(ep, Exception):
        raise ep
    assert _non_aten(ep.graph_module) == []
    m, _, xc, ref = rows[name]
    with torch.no_grad():
        _close(ep.module()(xc), ref)  # another batch size than the exported one


_LOADER = r"""
import json, sys

class _NoNormkernels:  # any import of normkernels fails in this process
    def find_spec(self, name, path=None, target=None):
        if name == "normkernels" or name.startswith("normkernels."):
            raise ImportError("this process must not import normkernels")
        return None

sys.meta_path.insert(0, _NoNormkernels())
import torch

d = sys.argv[1]
result = {}
for i in json.load(open(d + "/rows.json")):
    try:
        ep = torch.export.load(f"{d}/{i}.pt2")
        with torch.no_grad():
            torch.save(ep.module()(torch.load(f"{d}/{i}.x.pt")), f"{d}/{i}.y.pt")
        result[i] = "ok"
    except Exception as e:
        result[i] = f"{type(e).__name__}: {e}"[:2000]
result["modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "normkernels")
json.dump(result, open(d + "/result.json", "w"))
"""


@pytest.fixture(scope="module")
def loaded_elsewhere(rows, exported, tmp_path_factory):
    """Save every decomposed program, load and run them all in one fresh process that cannot
    import normkernels: name -> its output, or the error it got."""
    d = tmp_path_factory.mktemp("pt2")
    saved = []
    for i, name in enumerate(NAMES):
        if isinstance(exported[name], Exception):
            continue
        torch.export.save(exported[name], str(d / f"{i}.pt2"))
        torch.save(rows[name][2], d / f"{i}.x.pt")
        saved.append(str(i))
    (d / "rows.json").write_text(json.dumps(saved))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _LOADER, str(d)], cwd=d, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((d / "result.json").read_text())
    assert result.pop("modules") == []
    out = {}
    for i, name in enumerate(NAMES):
        r = result.get(str(i), "not exported")
        out[name] = torch.load(d / f"{i}.y.pt") if r == "ok" else r
    return out


@pytest.mark.parametrize("name", NAMES)
def test_saved_program_runs_without_normkernels(name, rows, loaded_elsewhere):
    y = loaded_elsewhere[name]
    assert isinstance(y, torch.Tensor), y
    _close(y, rows[name][3])


# ----------------------------------------------------------------------------------- ONNX
def _onnx_run(model, x, xc):
    """Export with dynamo=True and a dynamic batch, check that the batch is symbolic in the
    graph, and run it in onnxruntime at xc's (other) batch size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=_batch_dim(),
                                 verbose=False)
    proto = prog.model_proto
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value, "the batch dimension is not dynamic"
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: xc.numpy()})
    return torch.from_numpy(y)


@pytest.mark.parametrize("name", NAMES)
def test_onnx_dynamo_in_onnxruntime(name, rows):
    m, x, xc, ref = rows[name]
    _close(_onnx_run(m, x, xc), ref)


# ----------------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("name", NAMES)
def test_jit_trace_save_load(name, rows):
    m, x, xc, ref = rows[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the input checks
        traced = torch.jit.trace(m, (x,))
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        _close(loaded(xc), ref)


# ----------------------------------------------------------------------------------- whole models
def _resnet18(conversion):
    from model_zoo import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(0)
    m = tv.models.resnet18(num_classes=10)
    if conversion == "l2bn":
        nk.convert_bn_to_l2bn(m)
    else:
        nk.insert_sbn(m, stages=(3, 4), fuse=conversion == "bn_sbn")
    nk.fuse_norm_act(m, strict=False)
    m.train()
    for _ in range(2):
        m(torch.randn(4, 3, 32, 32))
    return m.eval()


@pytest.mark.parametrize("conversion", ["l2bn", "bn_sbn", "sbn_unfused"])
def test_resnet18_onnx_and_export(conversion):
    """torchvision resnet18 after convert_bn_to_l2bn / insert_sbn (fused BN+SBN, or BN then
    SBN) and fuse_norm_act: the NormAct layers are in it, and it exports to ONNX (dynamic
    batch, onnxruntime) and to plain aten ops."""
    m = _resnet18(conversion)
    kinds = {type(mod).__name__ for mod in m.modules()}
    want = {"l2bn": "L2BatchNormAct2d", "bn_sbn": "BatchNormSBNAct2d",
            "sbn_unfused": "SpectralBatchNormAct2d"}[conversion]
    assert want in kinds
    x, xc = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = m(xc)
    _close(_onnx_run(m, x, xc), ref)
    ep = torch.export.export(m, (x,), dynamic_shapes=_batch_dim()).run_decompositions()
    assert _non_aten(ep.graph_module) == []
    with torch.no_grad():
        _close(ep.module()(xc), ref)


# ----------------------------------------------------------------------------------- the decompositions
def test_decompositions_match_the_eval_ops():
    """Each formula returns what its op returns in eval, every output (saved too, at the
    precision of the accumulation dtype), here in float64 with non-default fft_norm, no affine,
    leaky_relu, rescale, odd and even widths."""
    torch.manual_seed(0)
    o = torch.ops.normkernels
    f64 = dict(dtype=torch.float64)
    C = 5
    w, b = torch.rand(C, **f64) + 0.5, torch.randn(C, **f64)
    mean, var = torch.randn(C, **f64), torch.rand(C, **f64) + 0.5
    smean, svar = torch.randn(C, 2, **f64), torch.rand(C, **f64) + 0.5
    for shape in [(3, C, 6, 8), (2, C, 7, 5), (2, C, 1, 1)]:
        x = torch.randn(shape, **f64) * 2 + 1
        for fft_norm in ("backward", "ortho", "forward"):
            for weight, bias in ((w, b), (None, None)):
                for args in ((x, False, None, None, None, None, weight, bias, smean, svar, 0.0, 1e-5, fft_norm,
                              "silu", 0.0),
                             (x, True, weight, bias, mean, var, w, b, smean, svar, 1e-5, 1e-3, fft_norm,
                              "leaky_relu", 0.2)):
                    got, ref = D.sbn_family_eval(*args), o.torch_sbn_forward(*args)
                    for g, r in zip(got, ref):
                        torch.testing.assert_close(g, r)
        for rescale in (False, True):
            got = D.l2bn_eval(x, w, b, mean, var, 1e-5, 1e-12, rescale, "relu", 0.0)
            ref = o.torch_l2bn_forward(x, w, b, mean, var, 1e-5, 1e-12, rescale, "relu", 0.0)
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r)


@pytest.mark.parametrize("W", [1, 2, 5, 8, 9, 56])
def test_pi_row_is_the_irfft2_pattern(W):
    """The closed form of Pi's row 0 against ops/sbn_oracle.py's torch.fft derivation, in float32."""
    torch.testing.assert_close(D.pi_row(W, torch.float32, "cpu"),
                               _sbn_oracle.row_consts(W, "cpu")[2].float(), atol=3e-7, rtol=0)


def test_ops_can_be_kept_and_training_calls_are_not_decomposed():
    """The first export graph has the ops, keep_ops() keeps them through run_decompositions (a
    runtime with these kernels can use them), and a training-mode export keeps them (a batch
    statistic is no eval formula)."""
    m = _trained("SpectralBatchNorm2d")
    x = torch.randn(_shape("SpectralBatchNorm2d", 2))
    ep = torch.export.export(m, (x,))
    assert "normkernels.sbn_forward.default" in _non_aten(ep.graph_module)
    with D.keep_ops():
        assert "normkernels.sbn_forward.default" in _non_aten(ep.run_decompositions().graph_module)
    assert _non_aten(ep.run_decompositions().graph_module) == []
    with torch.inference_mode():  # no autograd keys: the decomposition must not depend on them
        assert _non_aten(torch.export.export(m, (x,)).run_decompositions().graph_module) == []
    ep_train = torch.export.export(m.train(), (x,))
    assert "normkernels.sbn_forward.default" in _non_aten(ep_train.run_decompositions().graph_module)


def test_decompositions_leave_the_dispatch_table_alone():
    """They are kernels for export's tracer in the Python dispatcher (active only while
    tracing): no kernel is added to the C++ dispatch table, so eager calls, autograd and
    torch.compile reach the compiled kernels (tests/test_sbn_family_ops.py and test_l2bn_ops.py
    compile them with inductor)."""
    for op in D.DECOMPOSED_OPS:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")
        assert torch.compiler.is_exporting() is False
    assert len(D.DECOMPOSED_OPS) == (5 if nk.backends()["cpp"] else 3)
