"""The conformance matrix (#16): every public layer along the paths users take with
nn.BatchNorm2d, checked against eager, with BatchNorm as the control row that must pass the very
same check (so a check that cannot fail shows).

Rows: nn.BatchNorm2d / nn.BatchNorm1d (controls), L2BatchNorm1d/2d, SpectralBatchNorm2d,
BatchNormSBN2d and the three NormAct forms with ReLU and SiLU. Columns (one test each):

  compile        torch.compile(model, fullgraph=True) with the default inductor: training steps
                 (outputs, input and parameter gradients, running statistics), then eval
  compile_dyn    the same with dynamic=True over three batch sizes
  cast           .half() / .bfloat16() / .double() / .to(dtype), then training and eval, against
                 the float64 model; running statistics in at least float32 where BN's would be
  autocast       torch.autocast (AMP) around the float32 model: 16-bit in and out of the layer,
                 float32 parameters, gradients and statistics, against the float64 model
  fx             torch.fx.symbolic_trace: the layer is one leaf call (never traced through), the
                 traced module trains and evaluates as eager; fx conv+BN folding (optimization.fuse)
                 never folds an nk layer as if it were BN
  feature        torchvision's create_feature_extractor and timm's features_only fx extractor
  update_bn      torch.optim.swa_utils.update_bn vs nk.recalibrate (pinned: update_bn sees only
                 torch's BatchNorm; nk.recalibrate re-estimates every layer)
  checkpoint     a plain-BN model's checkpoint loaded into the model with the layer in BN's place:
                 every state value either loads or is reported fresh (FreshStateWarning) with its
                 initial value, never loaded into state of another meaning

The export and ONNX columns are in tests/test_export.py.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import normkernels as nk

C = 4
ACTS = {"relu": nn.ReLU, "silu": nn.SiLU}

ROWS = {
    "BatchNorm2d": (lambda: nn.BatchNorm2d(C), 2),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(C), 1),
    "L2BatchNorm1d": (lambda: nk.L2BatchNorm1d(C), 1),
    "L2BatchNorm2d": (lambda: nk.L2BatchNorm2d(C), 2),
    "SpectralBatchNorm2d": (lambda: nk.SpectralBatchNorm2d(C), 2),
    "BatchNormSBN2d": (lambda: nk.BatchNormSBN2d(C), 2),
}
for _act, _cls in ACTS.items():
    ROWS[f"L2BatchNormAct2d-{_act}"] = (lambda a=_cls: nk.L2BatchNormAct2d(C, act_layer=a), 2)
    ROWS[f"SpectralBatchNormAct2d-{_act}"] = (lambda a=_cls: nk.SpectralBatchNormAct2d(C, act_layer=a), 2)
    ROWS[f"BatchNormSBNAct2d-{_act}"] = (lambda a=_cls: nk.BatchNormSBNAct2d(C, act_layer=a), 2)
CONTROLS = ("BatchNorm2d", "BatchNorm1d")
ROWS_2D = [r for r, (_, rank) in ROWS.items() if rank == 2]

pytestmark = pytest.mark.filterwarnings("ignore::normkernels.FreshStateWarning")


def make_model(row: str, seed: int = 0) -> nn.Module:
    """conv -> layer -> conv: the layer's input and output gradients both matter (no bias before
    the layer: BN's gradient of it is zero up to rounding)."""
    factory, rank = ROWS[row]
    torch.manual_seed(seed)
    conv = nn.Conv2d if rank == 2 else nn.Conv1d
    model = nn.Sequential(conv(3, C, 3, padding=1, bias=False), factory(), conv(C, 2, 1))
    with torch.no_grad():  # non-trivial affine parameters
        for name, p in model[1].named_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def inputs(row: str, n: int = 4, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    shape = (n, 3, 6, 7) if ROWS[row][1] == 2 else (n, 3, 9)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)


def state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_steps(model: nn.Module, batches, lr: float = 0.05) -> list:
    """A few SGD steps; returns what each step saw: output, input grad, parameter grads."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    seen = []
    for x in batches:
        x = x.clone().requires_grad_(True)
        y = model(x)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
        (y * w).sum().backward()
        seen.append([y.detach(), x.grad] + [p.grad.clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
    return seen


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.is_complex() or b.is_complex():
        a, b = torch.view_as_real(a.to(torch.complex128)), torch.view_as_real(b.to(torch.complex128))
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-3)).item()


def assert_close_lists(got, want, tol: float, what: str):
    for step, (g, w) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(g, w)):
            assert a.shape == b.shape, f"{what}: step {step} tensor {i}: shape {a.shape} vs {b.shape}"
            assert rel_err(a, b) < tol, f"{what}: step {step} tensor {i}: relative error {rel_err(a, b):.2e}"


def assert_same_state(got: dict, want: dict, tol: float, what: str):
    assert got.keys() == want.keys(), what
    for k in want:
        if want[k].dtype == torch.long:
            assert torch.equal(got[k], want[k]), f"{what}: {k}"
        else:
            assert rel_err(got[k], want[k]) < tol, f"{what}: {k}: relative error {rel_err(got[k], want[k]):.2e}"


def check_against_eager(row: str, run, tol: float = 2e-5, n_sizes=(4, 4, 4), device="cpu"):
    """run(model) -> the module to drive (compiled, traced, ...); the same steps on a twin in
    eager must give the same outputs, gradients, running statistics and eval outputs."""
    eager, other = make_model(row).to(device), make_model(row).to(device)
    driven = run(other)
    batches = [inputs(row, n, seed=s).to(device) for s, n in enumerate(n_sizes)]
    assert_close_lists(train_steps(driven, batches), train_steps(eager, batches), tol, f"{row} training")
    assert_same_state(state(other), state(eager), tol, f"{row} state after training")
    eager.eval(), driven.eval()
    x = inputs(row, 3, seed=9).to(device)
    with torch.no_grad():
        assert rel_err(driven(x), eager(x)) < tol, f"{row} eval output"


# ------------------------------------------------------------------------------ torch.compile

@pytest.mark.parametrize("row", list(ROWS))
def test_compile_inductor(row, device):
    """On a GPU too (the device fixture): the Triton SBN and CUDA L2BN paths under inductor."""
    torch._dynamo.reset()
    check_against_eager(row, lambda m: torch.compile(m, fullgraph=True), device=device,
                        tol=2e-5 if device.type == "cpu" else 1e-4)


@pytest.mark.parametrize("row", ["BatchNorm2d", "L2BatchNorm1d", "L2BatchNormAct2d-relu", "SpectralBatchNorm2d", "BatchNormSBN2d",
                                 "BatchNormSBNAct2d-silu"])
def test_compile_inductor_dynamic_batch(row):
    torch._dynamo.reset()
    check_against_eager(row, lambda m: torch.compile(m, fullgraph=True, dynamic=True), n_sizes=(2, 3, 5))


# ------------------------------------------------------------------------------ module casts

CASTS = {
    "half": (lambda m: m.half(), torch.float16, 2e-2),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16, 1e-1),
    "double": (lambda m: m.double(), torch.float64, 1e-6),
    "to_bfloat16": (lambda m: m.to(torch.bfloat16), torch.bfloat16, 1e-1),
}


def stats_dtypes(layer: nn.Module) -> dict:
    return {k: v.dtype for k, v in layer.named_buffers() if "running" in k}


@pytest.mark.parametrize("cast", list(CASTS))
@pytest.mark.parametrize("row", list(ROWS))
def test_module_cast_then_train_and_eval(row, cast):
    """Cast the model, train two steps, evaluate: as the float64 model does, to the dtype's
    precision. Running statistics: BN's and L2BN's follow the cast as nn.BatchNorm's do; SBN's
    (a complex mean and its variance) stay complex64/float32 under half and bfloat16 casts
    (there is no complex bfloat16) and become complex128/float64 under .double()."""
    to, dtype, tol = CASTS[cast]
    model, ref = to(make_model(row)), make_model(row).double()
    batches = [inputs(row, 4, seed=s) for s in range(2)]
    got = train_steps(model, [b.to(dtype) for b in batches], lr=0.0)  # lr 0: the steps stay comparable
    want = train_steps(ref, [b.double() for b in batches], lr=0.0)
    assert_close_lists(got, want, tol, f"{row} {cast} training")
    for k, v in stats_dtypes(model[1]).items():
        sbn_stat = "sbn_" in k or isinstance(model[1], nk.SpectralBatchNorm2d)
        real = torch.float64 if dtype == torch.float64 else (torch.float32 if sbn_stat else dtype)
        assert v == (torch.promote_types(real, torch.complex64) if "mean" in k and sbn_stat else real), (k, v)
    assert_same_state(state(model.double()), state(ref), tol, f"{row} {cast} state")
    model.eval(), ref.eval()
    x = inputs(row, 3, seed=9)
    with torch.no_grad():
        assert rel_err(model.to(dtype)(x.to(dtype)), ref(x.double())) < tol


# ------------------------------------------------------------------------------ autocast (AMP)

@pytest.mark.parametrize("row", list(ROWS))
def test_autocast_train_and_eval(row, device):
    """torch.autocast around a float32 model (bfloat16 on the CPU, float16 on a GPU): training
    and eval as the float64 model does, to the dtype's precision. The layer takes and returns
    the autocast dtype (its input is a 16-bit conv output), as BatchNorm does; its parameters,
    their gradients and its running statistics stay float32 (SBN's mean complex64)."""
    dtype, tol = (torch.bfloat16, 1e-1) if device.type == "cpu" else (torch.float16, 2e-2)
    model, ref = make_model(row).to(device), make_model(row).double()
    seen = []
    model[1].register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    batches = [inputs(row, 4, seed=s) for s in range(2)]
    with torch.autocast(device.type, dtype=dtype):
        got = train_steps(model, [b.to(device) for b in batches], lr=0.0)
    want = train_steps(ref, [b.double() for b in batches], lr=0.0)
    assert_close_lists([[t.cpu() for t in g] for g in got], want, tol, f"{row} autocast training")
    assert seen == [(dtype, dtype)] * 2, seen
    assert {g.dtype for step in got for g in step[2:]} == {torch.float32}      # parameter gradients
    for k, v in stats_dtypes(model[1]).items():
        assert v in (torch.float32, torch.complex64), (k, v)
    assert_same_state({k: v.cpu() for k, v in state(model.double()).items()}, state(ref), tol, f"{row} autocast state")
    model.float().eval(), ref.eval()
    x = inputs(row, 3, seed=9)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        y = model(x.to(device))
    assert rel_err(y.cpu(), ref(x.double())) < tol


# ------------------------------------------------------------------------------ fx

def traced_through(gm: torch.fx.GraphModule) -> list:
    """Nodes from inside an nk layer (its ops or Python internals): a leaf call leaves none."""
    calls = layer_calls(gm)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n not in calls
            and "normkernels" in f"{getattr(n.target, '__module__', '')} {n.target}"]


def layer_calls(gm: torch.fx.GraphModule) -> list:
    """The nodes that call the layer: a call_module of it (torch's layers) or one leaf
    call_function on it (normkernels.modules._layer_call)."""
    return [n for n in gm.graph.nodes
            if (n.op == "call_module" and n.target == "1")
            or (n.op == "call_function" and getattr(n.target, "__name__", "") == "_layer_call")]


@pytest.mark.parametrize("row", list(ROWS))
def test_fx_symbolic_trace_is_a_leaf_call(row):
    traced = {}

    def trace(m):
        traced["gm"] = torch.fx.symbolic_trace(m)
        return traced["gm"]

    check_against_eager(row, trace)
    gm = traced["gm"]
    assert len(layer_calls(gm)) == 1 and not traced_through(gm), gm.graph


@pytest.mark.parametrize("row", ROWS_2D)
def test_fx_conv_bn_folding_never_folds_nk_layers(row):
    """optimization.fuse folds conv+BN in eval; an nk layer must come out computing the same."""
    from torch.fx.experimental.optimization import fuse
    model = make_model(row)
    train_steps(model, [inputs(row, 4, seed=s) for s in range(2)])
    model.eval()
    fused = fuse(copy.deepcopy(model))
    x = inputs(row, 3, seed=9)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) < 1e-5
    kept = any(type(m) is type(model[1]) for m in fused.modules())
    assert kept != (row == "BatchNorm2d")  # the control's BN is folded into the conv; nothing else is


@pytest.mark.parametrize("row", ["BatchNorm2d", "L2BatchNorm2d", "SpectralBatchNorm2d", "BatchNormSBN2d"])
def test_feature_extractors(row):
    """torchvision's create_feature_extractor and timm's fx feature extractor on resnet18 built
    with the layer as norm_layer: the features equal the eager model's intermediate outputs."""
    from model_zoo import import_timm, import_torchvision
    tv, timm = import_torchvision(), import_timm()
    from torchvision.models.feature_extraction import create_feature_extractor
    norm = {"BatchNorm2d": nn.BatchNorm2d}.get(row) or getattr(nk, row)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    model = tv.models.resnet18(num_classes=3, norm_layer=norm).eval()
    ext = create_feature_extractor(model, return_nodes={"layer2": "l2", "layer4.1.bn2": "bn"})
    seen = {}
    model.layer4[1].bn2.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.clone()))
    with torch.no_grad():
        feats, logits = ext(x), model(x)
        assert rel_err(feats["l2"], model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))) < 1e-5
        assert rel_err(feats["bn"], seen["bn"]) < 1e-5 and torch.isfinite(logits).all()

    torch.manual_seed(0)
    tm = timm.create_model("resnet18", num_classes=3, norm_layer=norm, features_only=True, feature_cls="fx",
                           out_indices=(2, 4)).eval()
    torch.manual_seed(0)
    eager = timm.create_model("resnet18", num_classes=3, norm_layer=norm, features_only=True,
                              out_indices=(2, 4)).eval()
    assert any(isinstance(m, torch.fx.GraphModule) for m in tm.modules())
    with torch.no_grad():
        for a, b in zip(tm(x), eager(x)):
            assert rel_err(a, b) < 1e-5


# ------------------------------------------------------------------------------ statistics re-estimation

@pytest.mark.parametrize("row", list(ROWS))
def test_update_bn_and_recalibrate(row):
    """Pinned: torch.optim.swa_utils.update_bn re-estimates torch's BatchNorm only (it looks for
    _BatchNorm) and leaves nk layers as they were; nk.recalibrate re-estimates both, to the
    cumulative average that update_bn computes for BatchNorm."""
    model = make_model(row)
    train_steps(model, [inputs(row, 4, seed=s) for s in range(2)])
    loader = [inputs(row, 4, seed=10 + s) for s in range(3)]
    before = state(model)

    swa = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(loader, swa)
    changed = any(not torch.equal(state(swa)[k], before[k]) for k in before if "running" in k)
    assert changed == (row in CONTROLS), "update_bn sees torch's BatchNorm, and only it"

    # The cumulative average, by hand: fresh statistics, momentum None, training-mode passes.
    want = copy.deepcopy(model)
    layer = want[1]
    layer.reset_running_stats()
    for k in ("momentum", "sbn_momentum"):
        if hasattr(layer, k):
            setattr(layer, k, None)
    with torch.no_grad():
        for b in loader:
            want.train()(b)
    rec = nk.recalibrate(copy.deepcopy(model), loader)
    running = [k for k in before if "running" in k or "num_batches" in k]
    assert_same_state({k: state(rec)[k] for k in running}, {k: state(want)[k] for k in running}, 1e-6, row)
    if row in CONTROLS:
        assert_same_state({k: state(swa)[k] for k in running}, {k: state(rec)[k] for k in running}, 1e-6, row)


# ------------------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("row", list(ROWS))
def test_plain_bn_checkpoint_never_loads_into_state_of_another_meaning(row):
    """A trained plain-BN model's checkpoint loaded into the model with the layer in BN's place.
    Each state value of the layer either is the checkpoint's value under a key of the same
    meaning (BN's own state, including BatchNormSBN2d's BN part), or is reported in a
    FreshStateWarning and keeps the value it had."""
    _, rank = ROWS[row]
    bn_cls = nn.BatchNorm2d if rank == 2 else nn.BatchNorm1d
    plain = make_model(row)
    plain[1] = bn_cls(C)
    train_steps(plain, [inputs(row, 4, seed=s) for s in range(2)])
    ckpt = plain.state_dict()

    model = make_model(row, seed=3)
    before = state(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_state_dict(ckpt, strict=False)
    fresh = {k for w in caught if isinstance(w.message, nk.FreshStateWarning) for k in w.message.keys}
    layer = model[1]
    same_meaning = {"BatchNorm2d", "BatchNorm1d", "BatchNormSBN2d"} | {r for r in ROWS if r.startswith("BatchNormSBNAct")}
    for name, value in list(layer.named_parameters()) + list(layer.named_buffers()):
        key = "1." + name
        if key in fresh:
            assert torch.equal(value.detach(), before[key]), f"{key}: reported fresh but changed"
        elif not name.startswith("sbn_") and row in same_meaning or name in ("weight", "bias"):
            assert torch.equal(value.detach(), ckpt[key].to(value.dtype)), f"{key}: not loaded"
        else:
            raise AssertionError(f"{row}: {key} was neither loaded with its meaning nor reported fresh")


def test_insert_sbn_that_finds_nothing_warns():
    """insert_sbn on stages whose norms have no SBN form (or have one already) says so."""
    from model_zoo import import_torchvision
    tv = import_torchvision()
    for norm in (nk.SpectralBatchNorm2d, nk.L2BatchNormAct2d, nk.BatchNormSBN2d):
        model = tv.models.resnet18(num_classes=3, norm_layer=norm)
        with pytest.warns(UserWarning, match="insert_sbn: no layer"):
            nk.insert_sbn(model)
    model = tv.models.resnet18(num_classes=3)  # the control: BN layers get their SBN, no such warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nk.insert_sbn(model)
    assert any(isinstance(m, nk.BatchNormSBN2d) for m in model.modules())


# ------------------------------------------------------------------------------ whole models

def _resnet18(kind: str) -> nn.Module:
    """torchvision's resnet18 with one nk layer family (one compile per family keeps CI short)."""
    from model_zoo import import_torchvision
    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=5)
    if kind == "batchnorm":        # the control
        return model
    if kind == "insert_sbn":       # the paper's SBN34: BN+SBN in stages 3 and 4, BN elsewhere
        return nk.insert_sbn(model)
    if kind == "l2bn_norm_act":    # every BN as L2BN, with the ReLUs after them fused
        return nk.fuse_norm_act(nk.convert_bn_to_l2bn(model))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["batchnorm", "insert_sbn", "l2bn_norm_act"])
def test_compile_inductor_resnet18(kind):
    """torch.compile(model) of a converted torchvision resnet18, training (dynamic batch size)
    then eval, against eager. Through 18 layers inductor's float32 reduction order moves
    gradients by up to ~4e-3 (relative) for plain BatchNorm too: the control row sets the
    tolerance; a wrong layer is off by O(1)."""
    torch._dynamo.reset()
    eager, other = _resnet18(kind), _resnet18(kind)
    compiled = torch.compile(other, fullgraph=True, dynamic=True)
    batches = [torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(n)) for n in (3, 4)]
    assert_close_lists(train_steps(compiled, batches), train_steps(eager, batches), 2e-2, f"resnet18 {kind}")
    assert_same_state(state(other), state(eager), 2e-2, f"resnet18 {kind} state")
    eager.eval(), other.eval()
    with torch.no_grad():
        assert rel_err(compiled(batches[0]), eager(batches[0])) < 2e-2
