"""Model surgery: swap BN for L2BN, insert SBN after the BN layers of chosen ResNet stages,
fuse/unfuse BN+SBN pairs, fuse norm layers with the activation after them (fuse_norm_act),
re-estimate running statistics (recalibrate) and freeze norm layers.

Each surgery function changes the model in place and returns it (or the replacement, when the
model itself is the layer being replaced). None leaves a model computing something other than
its state says: state whose meaning changed is reset (or re-estimated), state that is new starts
at its initial values, and a FreshStateWarning (``.keys``: the state_dict keys) reports both.
"""
from __future__ import annotations

import collections
import functools
import sys
import warnings
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import (BatchNormSBN2d, BatchNormSBNAct2d, FreshStateWarning, L2BatchNorm1d, L2BatchNorm2d,
                      L2BatchNormAct2d, NormThenSBN2d, SpectralBatchNorm2d, SpectralBatchNormAct2d, _is_trained,
                      _NormAct, _NormBase)

__all__ = ["convert_bn_to_l2bn", "insert_sbn", "fuse_bn_sbn", "unfuse_bn_sbn", "fuse_norm_act", "recalibrate", "freeze",
           "unfreeze"]

_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def _replace(module: nn.Module, swap: Callable[[nn.Module, str], nn.Module | None], prefix: str = "",
             enter: Callable[[nn.Module], bool] = lambda m: True) -> nn.Module:
    """Depth-first: every module for which swap(module, its qualified name) returns a module is
    replaced by it; modules for which enter() is False are not looked into."""
    new = swap(module, prefix)
    if new is not None:
        return new
    if not enter(module):
        return module
    for name, child in list(module.named_children()):
        replaced = _replace(child, swap, f"{prefix}{name}.", enter)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def _share_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give dst src's Parameter objects and buffers (optimizers holding them keep working)."""
    for name in ("weight", "bias") + _RUNNING:
        if getattr(src, name, None) is not None:
            setattr(dst, name, getattr(src, name))
    dst.train(src.training)
    return dst


def _factory(m: nn.Module) -> dict:
    p = m.weight if getattr(m, "weight", None) is not None else getattr(m, "running_mean", None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def _timm_norm_act(m: nn.Module) -> str | None:
    """'local' / 'sync' for timm's BatchNormAct2d / SyncBatchNormAct (without importing timm)."""
    for cls in type(m).__mro__:
        if cls.__module__.startswith("timm."):
            if cls.__name__ == "BatchNormAct2d":
                return "local"
            if cls.__name__ == "SyncBatchNormAct":
                return "sync"
    return None


def _is_sync_bn(m: nn.Module) -> bool:
    from .distributed import SyncBatchNorm as GlooSyncBatchNorm

    return isinstance(m, (nn.SyncBatchNorm, GlooSyncBatchNorm))


def _warn_fresh(what: str, keys: list[str], advice: str) -> None:
    """One FreshStateWarning for a whole conversion: the layers, then the keys' names in each."""
    if keys:
        layers = list(dict.fromkeys(k.rsplit(".", 1)[0] if "." in k else "" for k in keys))
        names = list(dict.fromkeys(k.rsplit(".", 1)[-1] for k in keys))
        shown = ", ".join(layers[:8]) + (f", ... ({len(layers)} layers)" if len(layers) > 8 else "")
        warnings.warn(FreshStateWarning(f"{what} ({', '.join(names)}) in {shown}. {advice}", keys), stacklevel=3)


# ------------------------------------------------------------------------------------ BN -> L2BN

def convert_bn_to_l2bn(model: nn.Module, rescale: bool = False, backend: str = "auto",
                       batches: Iterable | None = None) -> nn.Module:
    """Replace every BatchNorm layer by the matching L2BN layer, keeping its Parameter objects
    (weight, bias) and settings:

        nn.BatchNorm1d -> L2BatchNorm1d,  nn.BatchNorm2d -> L2BatchNorm2d,
        nn.SyncBatchNorm (and normkernels.distributed.SyncBatchNorm) -> SyncL2BatchNorm2d (same
            process group; conv nets' 4-d inputs),
        timm's BatchNormAct2d -> L2BatchNormAct2d, timm's SyncBatchNormAct -> SyncL2BatchNormAct2d
            (the same act and drop modules).
    Other BatchNorm classes (BatchNorm3d, ...) and the nk layers are left as they are.

    The running statistics change meaning (L2BN's are those of the l2-normalized samples, about
    1/(C*H*W) the variance of x), so BN's are never kept: with ``batches`` (as for recalibrate)
    they are re-estimated on them; otherwise they are reset (mean 0, var 1, count 0) and, where
    the BN had trained statistics, a FreshStateWarning lists the reset keys (train, or call
    nk.recalibrate(model, batches), before using eval mode).
    """
    from . import distributed as nkd

    reset: list[str] = []

    def swap(m, name):
        kind = _timm_norm_act(m)
        if kind is not None:
            new = L2BatchNormAct2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, apply_act=False,
                                   rescale=rescale, backend=backend, device="meta")
            new._set_act(m.act, m.drop)
            if kind == "sync":
                new = nkd._to_sync(new, m.process_group)
        elif type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) or _is_sync_bn(m):
            cls = L2BatchNorm1d if type(m) is nn.BatchNorm1d else L2BatchNorm2d
            new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, rescale=rescale,
                      backend=backend, device="meta")
            if _is_sync_bn(m):
                new = nkd._to_sync(new, m.process_group)
        else:
            return None
        _share_state(m, new)
        if _is_trained(m):
            reset.extend(name + k for k in _RUNNING if getattr(m, k, None) is not None)
        new.reset_running_stats()
        return new

    model = _replace(model, swap)
    if batches is not None:
        recalibrate(model, batches)
    else:
        _warn_fresh("convert_bn_to_l2bn: BatchNorm's running statistics are at the wrong scale for L2BN and were "
                    "reset", reset, "Train, or re-estimate them with nk.recalibrate(model, batches), before eval.")
    return model


# ------------------------------------------------------------------------------------ SBN

def _stage(model: nn.Module, stage) -> nn.Module:
    name = f"layer{stage}" if isinstance(stage, int) else stage
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = [n for n, _ in model.named_children()]
        raise ValueError(f"model has no stage {name!r}; its children are {children}") from None


def insert_sbn(model: nn.Module, stages: Iterable = (3, 4), fuse: bool = True, **sbn_kwargs) -> nn.Module:
    """Put a SpectralBatchNorm2d right after every normalization layer of the given stages.

    stages: ints name torchvision/timm ResNet stages (3 -> model.layer3); strings name any
    submodule. The paper's settings: stages=(3, 4) ("SBN34", CIFAR) and stages=(4,) ("SBN4",
    ImageNet). sbn_kwargs: SpectralBatchNorm2d's (eps, momentum, fft_norm, backend, ...).

        nn.BatchNorm2d     -> BatchNormSBN2d (fuse=True) or NormThenSBN2d(bn, sbn) (fuse=False)
        nn.SyncBatchNorm / normkernels.distributed.SyncBatchNorm -> SyncBatchNormSBN2d (fused)
        timm's BatchNormAct2d -> BatchNormSBNAct2d (SBN between the norm and its activation)
        L2BatchNorm2d (and its Sync form) -> NormThenSBN2d(l2bn, sbn) (no fused form)
    Layers that already have an SBN after them are left alone.

    State: the norm's keys do not change (layer4.0.bn1.weight stays layer4.0.bn1.weight in
    every form), so checkpoints of the plain model load strictly; SBN's is new, under
    <layer>.sbn_*, and where it sits beside trained statistics a FreshStateWarning lists those
    keys (loading a plain checkpoint later reports them too).
    """
    from . import distributed as nkd

    targets = {(f"layer{s}" if isinstance(s, int) else s): _stage(model, s) for s in stages}
    fresh: list[str] = []

    def make_sbn(m, sync):
        sbn = SpectralBatchNorm2d(m.num_features, affine=m.affine, track_running_stats=m.track_running_stats,
                                  **_factory(m), **sbn_kwargs)
        sbn.train(m.training)
        return nkd._to_sync(sbn, m.process_group) if sync else sbn

    def swap(m, name):
        kind = _timm_norm_act(m)
        if type(m) is nn.BatchNorm2d or _is_sync_bn(m) or kind is not None:
            sbn = make_sbn(m, False)
            if kind is not None:
                bn = _share_state(m, nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine,
                                                    m.track_running_stats, device="meta"))
                new = BatchNormSBNAct2d.from_modules(bn, sbn, apply_act=False)
                new._set_act(m.act, m.drop)
                new = nkd._to_sync(new, m.process_group) if kind == "sync" else new
            elif _is_sync_bn(m):
                bn = _share_state(m, nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine,
                                                    m.track_running_stats, device="meta"))
                new = nkd._to_sync(BatchNormSBN2d.from_modules(bn, sbn), m.process_group)
            else:
                new = BatchNormSBN2d.from_modules(m, sbn) if fuse else NormThenSBN2d(m, sbn)
        elif isinstance(m, L2BatchNorm2d) and not isinstance(m, _NormAct):
            new = NormThenSBN2d(m, make_sbn(m, isinstance(m, nkd._Sync)))
        else:
            return None
        if _is_trained(m):  # fresh SBN state beside trained state: say so (a fresh model is all fresh)
            fresh.extend(name + "sbn_" + k for k in ("weight", "bias") + _RUNNING
                         if getattr(sbn_of(new), k, None) is not None)
        return new

    def sbn_of(new):
        return new.sbn if isinstance(new, NormThenSBN2d) else _SBNState(new)

    def enter(m):  # never a second SBN: not into pairs that already have one
        return not isinstance(m, (NormThenSBN2d, BatchNormSBN2d))

    inserted = []

    def counted_swap(m, name):
        new = swap(m, name)
        if new is not None:
            inserted.append(name)
        return new

    for base, stage in targets.items():
        for name, child in list(stage.named_children()):
            setattr(stage, name, _replace(child, counted_swap, f"{base}.{name}.", enter))
    if not inserted:
        norms = sorted({type(m).__name__ for stage in targets.values() for m in stage.modules()
                        if isinstance(m, (_NormBase, _BatchNorm))})
        warnings.warn(f"insert_sbn: no layer to put an SBN after in {tuple(targets)}: the norms there are "
                      f"{', '.join(norms) or 'none'} (an SBN goes after BatchNorm2d, SyncBatchNorm, timm's "
                      "BatchNormAct2d and L2BatchNorm2d; layers with SBN already are left alone)", stacklevel=2)
    _warn_fresh("insert_sbn: SBN state freshly initialised", fresh,
                "Checkpoints of the plain model load strictly (SBN's keys keep these initial values).")
    return model


class _SBNState:
    """A fused layer's SBN state under SpectralBatchNorm2d's names."""

    def __init__(self, layer):
        self._layer = layer

    def __getattr__(self, name):
        return getattr(self._layer, "sbn_" + name)


def fuse_bn_sbn(model: nn.Module) -> nn.Module:
    """Turn every NormThenSBN2d(nn.BatchNorm2d, SpectralBatchNorm2d) (and legacy
    nn.Sequential(nn.BatchNorm2d, SpectralBatchNorm2d)) into a BatchNormSBN2d with the same state
    (state_dict keys unchanged for NormThenSBN2d)."""

    def swap(m, name):
        if isinstance(m, NormThenSBN2d) and type(m.norm) is nn.BatchNorm2d and type(m.sbn) is SpectralBatchNorm2d:
            return BatchNormSBN2d.from_modules(m.norm, m.sbn)
        if (isinstance(m, nn.Sequential) and len(m) == 2 and type(m[0]) is nn.BatchNorm2d
                and type(m[1]) is SpectralBatchNorm2d):
            return BatchNormSBN2d.from_modules(m[0], m[1])
        return None

    return _replace(model, swap)


def unfuse_bn_sbn(model: nn.Module) -> nn.Module:
    """Turn every BatchNormSBN2d back into NormThenSBN2d(bn, sbn) (same state, same keys).
    Synchronized and norm+act fused layers stay fused."""
    return _replace(model, lambda m, name: m.to_modules() if type(m) is BatchNormSBN2d else None)


# ------------------------------------------------------------------------------------ norm + act

# Activations the NormAct layers fuse. Exact types only: a subclass may compute something else.
_ACT_MODULES = (nn.ReLU, nn.LeakyReLU, nn.SiLU)
# fx call_function targets (F.relu_ is torch.relu_, F.leaky_relu_ is torch._C._nn.leaky_relu_)
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.leaky_relu: "leaky_relu",
                  F.leaky_relu_: "leaky_relu", F.silu: "silu"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}  # x.relu(), x.relu_()
_ACT_KWARGS = {"input", "negative_slope", "inplace"}
_CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_STATE_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")
# what a GraphModule standing in for a module does not carry over from the module's class
_STATE_METHODS = ("_save_to_state_dict", "_load_from_state_dict", "state_dict", "load_state_dict", "_apply", "train")


def _norm_act_classes() -> dict:
    """Each nk norm layer that has a NormAct form -> that form (the Sync forms too)."""
    from . import distributed as nkd

    return {L2BatchNorm2d: L2BatchNormAct2d, SpectralBatchNorm2d: SpectralBatchNormAct2d,
            BatchNormSBN2d: BatchNormSBNAct2d, nkd.SyncL2BatchNorm2d: nkd.SyncL2BatchNormAct2d,
            nkd.SyncSpectralBatchNorm2d: nkd.SyncSpectralBatchNormAct2d,
            nkd.SyncBatchNormSBN2d: nkd.SyncBatchNormSBNAct2d}


def _hooked(m: nn.Module, names=_CALL_HOOKS + _STATE_HOOKS) -> bool:
    """Hooks (or an instance-level forward) that a rewrite would bypass or lose."""
    return "forward" in m.__dict__ or any(getattr(m, n, None) for n in names)


def _fusable_norm(m: nn.Module, classes: dict) -> bool:
    """An nk norm layer without an activation (or a NormThenSBN2d, whose SBN then takes it)."""
    if isinstance(m, NormThenSBN2d):
        return not _hooked(m, _CALL_HOOKS) and type(m.sbn) in classes and not _hooked(m.sbn)
    return type(m) in classes and not _hooked(m)


def _is_act_module(m: nn.Module) -> bool:
    return type(m) in _ACT_MODULES and not _hooked(m, _CALL_HOOKS)


def _transparent(m: nn.Module) -> bool:
    """Containers whose own forward is known to only run their children (traced through)."""
    if _hooked(m):
        return False
    if isinstance(m, nn.Sequential):
        return type(m).forward is nn.Sequential.forward
    return isinstance(m, (nn.ModuleList, nn.ModuleDict)) and type(m).forward is nn.Module.forward


def _with_act(norm: nn.Module, act: nn.Module, classes: dict) -> nn.Module:
    """norm's NormAct form with the fused activation act, holding norm's Parameter objects,
    buffers and settings (so its state_dict keys are norm's)."""
    if isinstance(norm, NormThenSBN2d):
        pair = NormThenSBN2d(norm.norm, _with_act(norm.sbn, act, classes))
        pair.training = norm.training
        return pair
    cls = classes[type(norm)]
    new = cls.__new__(cls)
    new.__dict__.update({k: (type(v)(v) if isinstance(v, dict) else v) for k, v in norm.__dict__.items()})
    new._set_act(act, None)
    new.act.training = new.drop.training = norm.training
    if _is_frozen(norm):  # nk.freeze's train() is bound to the layer it froze
        new.train = functools.partial(_frozen_train, new)
    return new


def _act_of(desc: tuple, owner: nn.Module) -> nn.Module:
    """The activation module an activation descriptor stands for."""
    if desc[0] == "module":
        return owner.get_submodule(desc[1])
    kind, slope = desc[1], desc[2]
    return nn.ReLU() if kind == "relu" else nn.LeakyReLU(slope) if kind == "leaky_relu" else nn.SiLU()


def _timm_notrace_functions() -> tuple:
    """timm's functions that its own fx tracing keeps as calls (only if timm is imported)."""
    timm_fx = sys.modules.get("timm.layers._fx")
    if timm_fx is None or not hasattr(timm_fx, "get_notrace_functions"):
        return ()
    return tuple(f for f in timm_fx.get_notrace_functions() if callable(f))


class _OwnForwardTracer(fx.Tracer):
    """Traces one module's own forward: every sub-module is a leaf (a call_module node), except
    the plain containers (nn.Sequential's forward only runs its children). So only that forward's
    code must be traceable, and a rewrite changes nothing inside the sub-modules."""

    def __init__(self):
        super().__init__(autowrap_functions=_timm_notrace_functions())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not _transparent(m)


class _Modes:
    """Every module under root in training mode `mode` for the duration (then as before); None:
    as they are."""

    def __init__(self, root: nn.Module, mode: bool | None):
        self.modules, self.mode = list(root.modules()), mode

    def __enter__(self):
        self.saved = [m.training for m in self.modules]
        if self.mode is not None:
            for m in self.modules:
                m.training = self.mode

    def __exit__(self, *exc):
        for m, mode in zip(self.modules, self.saved):
            m.training = mode


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _act_descriptor(node: fx.Node | None, src: fx.Node, owner: nn.Module, norm: nn.Module) -> tuple | None:
    """("module", target) or ("function", kind, negative_slope) if node applies a fusable
    activation to src (and to nothing else), else None."""
    if node is None:
        return None
    if node.op == "call_module":
        act = owner.get_submodule(node.target)
        if _is_act_module(act) and node.args == (src,) and not node.kwargs and act.training == norm.training:
            return ("module", node.target)
    elif node.op == "call_method" and node.target in _ACT_METHODS:
        if node.args == (src,) and not node.kwargs:
            return ("function", _ACT_METHODS[node.target], None)
    elif node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        kind = _ACT_FUNCTIONS[node.target]
        args, kwargs = list(node.args), dict(node.kwargs)
        inp = args.pop(0) if args else kwargs.pop("input", None)
        slope = None
        if kind == "leaky_relu":
            slope = args.pop(0) if args else kwargs.pop("negative_slope", 0.01)
            if isinstance(slope, bool) or not isinstance(slope, (int, float)):
                return None
            slope = float(slope)
        rest = args + list(kwargs.values())  # only an inplace flag may remain
        if inp is src and set(kwargs) <= _ACT_KWARGS and len(rest) <= 1 and all(isinstance(v, bool) for v in rest):
            return ("function", kind, slope)
    return None


def _pairs_in(graph: fx.Graph, owner: nn.Module, norms: set) -> dict:
    """norm target -> (activation descriptor, norm node, activation node, nn.Identity nodes between
    them): the norms (targets relative to owner) whose output only feeds a fusable activation,
    possibly through nn.Identity modules (timm's drop_block=None)."""
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    found = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in norms or calls[node.target] != 1:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        chain, user = [], _only_user(node)
        while (user is not None and user.op == "call_module" and type(owner.get_submodule(user.target)) is nn.Identity
               and not _hooked(owner.get_submodule(user.target), _CALL_HOOKS) and user.args == ((chain or [node])[-1],)
               and not user.kwargs):
            chain.append(user)
            user = _only_user(user)
        desc = _act_descriptor(user, (chain or [node])[-1], owner, owner.get_submodule(node.target))
        if desc is not None:
            found[node.target] = (desc, node, user, chain)
    return found


def _rewrite_problem(owner: nn.Module) -> str | None:
    """Why a GraphModule could not stand in for owner with the same state_dict, or None."""
    if _hooked(owner):
        return "it has hooks (a rewritten forward would lose them)"
    base = fx.GraphModule if isinstance(owner, fx.GraphModule) else nn.Module
    own = [name for name in _STATE_METHODS if getattr(type(owner), name, None) is not getattr(base, name)]
    if own:
        return f"its class defines {', '.join(own)} (a GraphModule in its place would not)"
    if "train" in owner.__dict__:
        return "its train() is replaced (nk.freeze?)"
    if owner._non_persistent_buffers_set:
        return "it has non-persistent buffers (a copied GraphModule would save them)"
    return None


class _Plan:
    """What fuse_norm_act does in one module whose forward calls norm layers (the owner).

    swaps: (norm target, activation target): the activation module is called only there, so the
        owner keeps its class and forward: the norm becomes its NormAct form, the activation an
        nn.Identity (valid in either training mode: both modes' traces agree on the pair).
    rewrites: (norm target, descriptor, norm node, act node, identity nodes) in `graph`: the
        activation is a function, or a module that is also called elsewhere (torchvision's
        self.relu after the residual add): the owner is replaced by a GraphModule of its forward
        without the activation node.
    problem: why the rewrites cannot be done (they are then not done)."""

    def __init__(self, owner: nn.Module, path: str):
        self.owner, self.path = owner, path
        self.swaps, self.rewrites, self.graph, self.problem = [], [], None, None
        self.cause = None  # the exception behind a tracing problem


def _plan(owner: nn.Module, path: str, norms: set, model_paths: dict) -> _Plan:
    plan = _Plan(owner, path)
    graphs, constants = [], False
    # trace as the modules are, then with all of them in the other training mode: a pair is fused
    # only if the forward forms it in both (the first graph is the one a rewrite keeps)
    for mode in (None, not owner.training):
        before = set(owner.__dict__)
        try:
            with _Modes(owner, mode):
                graphs.append(_OwnForwardTracer().trace(owner))
        except Exception as e:  # anything the user's forward raises under tracing: report it
            plan.problem, plan.cause = f"torch.fx cannot trace its forward ({type(e).__name__}: {e})", e
            return plan
        finally:
            made = [k for k in owner.__dict__ if k not in before]  # the tracer's tensor constants
            for k in made:
                del owner.__dict__[k]
            constants = constants or bool(made)
    found = [_pairs_in(g, owner, norms) for g in graphs]
    calls = [collections.Counter(n.target for n in g.nodes if n.op == "call_module") for g in graphs]
    for target, (desc, norm_node, act_node, chain) in found[0].items():
        if target not in found[1] or found[1][target][0] != desc:
            continue  # the pair exists in one training mode only
        if (desc[0] == "module" and len(model_paths[id(owner.get_submodule(desc[1]))]) == 1
                and all(c[desc[1]] == 1 for c in calls)):
            plan.swaps.append((target, desc[1]))
        else:
            plan.rewrites.append((target, desc, norm_node, act_node, chain))
    if plan.rewrites:
        if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
            plan.problem = "its forward depends on the training mode (a traced graph would keep one mode's code)"
        elif constants:
            plan.problem = "its forward makes tensor constants (a GraphModule would save them as state)"
        else:
            plan.problem = _rewrite_problem(owner)
        plan.graph = graphs[0]
    return plan


def _set_path(root: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _set_path_copying(root: nn.Module, target: str, new: nn.Module, copies: set) -> None:
    """Install new at target under root, copying the containers on the way (once each: ids in
    copies) so that the module they were taken from keeps its own children."""
    *parents, name = target.split(".")
    m = root
    for atom in parents:
        child = m._modules[atom]
        if id(child) not in copies:
            child = child.__class__.__new__(child.__class__)
            child.__dict__.update(m._modules[atom].__dict__)
            child._modules = collections.OrderedDict(child._modules)
            copies.add(id(child))
            m._modules[atom] = child
        m = child
    m._modules[name] = new


def _graph_module(plan: _Plan, classes: dict) -> fx.GraphModule:
    """A GraphModule standing in for plan.owner: its forward without the fused activations, and
    exactly the owner's children, parameters and buffers (so the same state_dict keys, including
    those of modules its forward does not call), the fused norms in their places."""
    owner, graph = plan.owner, plan.graph
    for _target, _desc, norm_node, act_node, chain in plan.rewrites:
        act_node.replace_all_uses_with(norm_node)
        graph.erase_node(act_node)
        for node in reversed(chain):
            graph.erase_node(node)
    graph.lint()
    gm = fx.GraphModule(owner, graph, class_name=type(owner).__name__)
    # GraphModule keeps only what the graph names, under fresh containers: restore the owner's own
    gm._modules.clear()
    gm._modules.update(owner._modules)
    gm._parameters.clear()
    gm._parameters.update(owner._parameters)
    gm._buffers.clear()
    gm._buffers.update(owner._buffers)
    copies: set = set()
    for target, desc, *_ in plan.rewrites:
        _set_path_copying(gm, target, _with_act(owner.get_submodule(target), _act_of(desc, owner), classes), copies)
    for k, v in owner.__dict__.items():  # plain attributes (stride, num_classes, ...)
        if not k.startswith("_") and k not in gm.__dict__ and not hasattr(type(gm), k):
            gm.__dict__[k] = v
    gm.training = owner.training
    return gm


def fuse_norm_act(model: nn.Module, *, strict: bool = True, report: bool = False):
    """Fuse each nk normalization layer with the activation that follows it: the layer becomes
    its NormAct form (the activation runs inside the layer's kernels) and the activation goes.

        L2BatchNorm2d -> L2BatchNormAct2d, SpectralBatchNorm2d -> SpectralBatchNormAct2d,
        BatchNormSBN2d -> BatchNormSBNAct2d, their Sync forms (normkernels.distributed) -> the
        Sync NormAct forms; NormThenSBN2d(norm, sbn) -> NormThenSBN2d(norm, sbn's NormAct form).
        Activations: nn.ReLU, nn.LeakyReLU (any slope), nn.SiLU, and in code F.relu, torch.relu,
        F.relu_ / torch.relu_, x.relu(), x.relu_(), F.leaky_relu, F.leaky_relu_, F.silu (inplace
        or not); nn.Identity modules between the two are looked through (timm's drop_block=None).

    A pair is fused only if the norm's output feeds nothing but the activation (not a residual
    too), the norm is called once and sits at one place in the model, the two modules are in the
    same training mode (so not a layer frozen by nk.freeze in a model in training mode), neither
    has hooks, and (in code) the forward forms the pair in training and in eval mode. Torch's BatchNorm layers are not fused (nk.convert_bn_to_l2bn or
    nk.insert_sbn first); timm models built on BatchNormAct2d take the NormAct layers through
    norm_layer= instead.

    How:
      * nn.Sequential(..., norm, act, ...): the pair becomes (NormAct, nn.Identity()) in place.
      * Norms called from code (``self.act1(self.bn1(x))``): the forward of the module that
        calls them is traced with torch.fx (only that forward: its sub-modules stay calls). Where
        the activation module is called only there (timm's ResNet: act1), the norm becomes its
        NormAct form and the activation an nn.Identity, in place: the module keeps its class
        and methods. Where the activation is a function (F.relu) or a module called again
        elsewhere (torchvision's BasicBlock: self.relu after the residual add, which is not
        fused), that module is replaced by a torch.fx.GraphModule of its forward without the
        activation node; it has the module's children (the fused norm at the norm's path),
        parameters, buffers and plain attributes, but not its class or methods. So the result
        is a GraphModule when the model's own forward had to be rewritten (a model calling
        F.relu itself); otherwise it is the model, changed in place. Use the returned model.

    State: the fused layers hold the norms' Parameter objects and buffers (an optimizer holding
    them keeps working) under the same state_dict keys, so checkpoints of the unfused model load
    strictly into the fused one and back. Traced code is fixed at tracing time (Python control
    flow on attributes, as torch.fx does); a forward whose code differs between training and
    eval mode is not rewritten (in-place swaps do not depend on it). Only forward is traced: a
    module's other methods that call a swapped norm get its activation too, which is right where
    they call the same pair (timm's forward_features, forward_intermediates).

    strict: if a module whose forward calls a norm cannot be traced, or cannot be replaced by a
        GraphModule (hooks, its own state_dict methods, a forward that depends on the training
        mode, ...), raise a RuntimeError naming it, before changing anything (default). False:
        fuse everything else and warn about those modules.
    report: also return the fused layers' names (their state_dict prefixes).
    Returns the fused model, or (model, names) with report=True. If nothing can be fused the
    model is returned unchanged, with a UserWarning.
    """
    classes = _norm_act_classes()
    model_paths = collections.defaultdict(list)
    for name, m in model.named_modules(remove_duplicate=False):
        model_paths[id(m)].append(name)
    order = {name: i for i, (name, _m) in enumerate(model.named_modules(remove_duplicate=False))}

    def single(m):
        return len(model_paths[id(m)]) == 1

    # nn.Sequential pairs
    pairs, paired = [], set()
    for path, seq in model.named_modules():
        if not _transparent(seq) or not isinstance(seq, nn.Sequential):
            continue
        items, i = list(seq._modules.items()), 0
        while i < len(items) - 1:
            (norm_name, norm), (act_name, act) = items[i], items[i + 1]
            if (norm is not None and act is not None and _fusable_norm(norm, classes) and single(norm)
                    and _is_act_module(act) and norm.training == act.training):
                pairs.append((seq, path, norm_name, act_name))
                paired.add(id(norm))
                i += 2
            else:
                i += 1

    # the other norms, grouped by the module whose forward calls them (the nearest ancestor that
    # is not a plain container)
    owners: dict = {}

    def walk(m, path, ancestors):
        for name, child in m._modules.items():
            if child is None:
                continue
            child_path = path + name
            here = ancestors + [(m, path)]
            if _fusable_norm(child, classes) and id(child) not in paired and single(child):
                owner, owner_path = next(((a, p) for a, p in reversed(here) if not _transparent(a)), here[0])
                owners.setdefault(id(owner), (owner, owner_path, set()))[2].add(child_path[len(owner_path):])
            if not isinstance(child, (_NormBase, NormThenSBN2d)):
                walk(child, child_path + ".", here)

    walk(model, "", [])
    plans = [_plan(owner, path, norms, model_paths) for owner, path, norms in owners.values()]

    problems = [p for p in plans if p.problem is not None]
    if problems:
        lines = "; ".join(f"{p.path[:-1] or '(the model)'} ({type(p.owner).__name__}): {p.problem}" for p in problems)
        if strict:
            raise RuntimeError(
                f"fuse_norm_act: cannot fuse the norm layers called by {lines}. Nothing was changed; pass "
                f"strict=False to fuse the rest and leave these as they are.") from problems[0].cause
        warnings.warn(f"fuse_norm_act: left unfused the norm layers called by {lines}", stacklevel=2)

    fused = []
    for seq, path, norm_name, act_name in pairs:
        act = seq._modules[act_name]
        setattr(seq, norm_name, _with_act(seq._modules[norm_name], act, classes))
        identity = nn.Identity()
        identity.training = act.training
        setattr(seq, act_name, identity)
        fused.append(path + ("." if path else "") + norm_name)
    for plan in plans:
        for norm_target, act_target in plan.swaps:
            act = plan.owner.get_submodule(act_target)
            identity = nn.Identity()
            identity.training = act.training
            _set_path(plan.owner, norm_target, _with_act(plan.owner.get_submodule(norm_target), act, classes))
            _set_path(plan.owner, act_target, identity)
            fused.append(plan.path + norm_target)
    # GraphModules deepest first: each is built from its owner's children as they are by then
    for plan in sorted(plans, key=lambda p: -p.path.count(".")):
        if plan.rewrites and plan.problem is None:
            gm = _graph_module(plan, classes)
            fused.extend(plan.path + r[0] for r in plan.rewrites)
            if plan.path:
                _set_path(model, plan.path[:-1], gm)
            else:
                model = gm
    if not fused and not problems:
        warnings.warn("fuse_norm_act: nothing to fuse (no L2BatchNorm2d, SpectralBatchNorm2d or BatchNormSBN2d, "
                      "or their Sync forms, is followed only by a ReLU, LeakyReLU or SiLU); the model is unchanged",
                      stacklevel=2)
    fused.sort(key=lambda name: order.get(name, len(order)))
    return (model, fused) if report else model


# ------------------------------------------------------------------------------------ statistics

def _norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every layer with running statistics: nk's and torch's (any _BatchNorm, timm's too)."""
    return [m for m in model.modules() if isinstance(m, (_NormBase, _BatchNorm))
            and m.track_running_stats and m.running_mean is not None]


def _momenta(m):
    return ("momentum", "sbn_momentum") if isinstance(m, BatchNormSBN2d) else ("momentum",)


def recalibrate(model: nn.Module, batches: Iterable, device=None) -> nn.Module:
    """Re-estimate the running statistics of every normalization layer, nk's and torch's, like
    torch.optim.swa_utils.update_bn (which sees only torch's): each layer's statistics are reset
    and replaced by the cumulative average over ``batches`` (momentum None during the pass),
    with the model in training mode under torch.no_grad(); each module's mode and each layer's
    momentum are restored afterwards. Frozen layers (nk.freeze) are left alone.

    batches: an iterable of inputs, or of (input, ...) tuples/lists (the first element is fed),
    moved to ``device`` if given. If it yields nothing, or the model raises, the previous
    statistics are restored. Returns the model."""
    layers = [m for m in _norm_layers(model) if not _is_frozen(m)]
    saved = {m: {k: getattr(m, k).clone() for k in _state_names(m)} for m in layers}
    momenta = {m: {k: getattr(m, k) for k in _momenta(m)} for m in layers}
    modes = {m: m.training for m in model.modules()}
    count = 0
    try:
        for m in layers:
            m.reset_running_stats()
            for k in _momenta(m):
                setattr(m, k, None)
        model.train()
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, (list, tuple)):
                    batch = batch[0]
                if device is not None:
                    batch = batch.to(device)
                model(batch)
                count += 1
        if count == 0:
            raise ValueError("recalibrate: batches yielded nothing (running statistics left as they were)")
    except BaseException:
        with torch.no_grad():
            for m, state in saved.items():
                for k, v in state.items():
                    getattr(m, k).copy_(v)
        raise
    finally:
        for m, ms in momenta.items():
            for k, v in ms.items():
                setattr(m, k, v)
        for m, mode in modes.items():
            m.training = mode
    return model


def _state_names(m) -> list[str]:
    prefixes = getattr(m, "_state_prefixes", ("",))
    return [p + k for p in prefixes for k in _RUNNING if getattr(m, p + k, None) is not None]


# ------------------------------------------------------------------------------------ freeze

def _frozen_train(module: nn.Module, mode: bool = True) -> nn.Module:
    """A frozen layer's train(): it (and its act/drop modules) stays in eval mode."""
    return nn.Module.train(module, False)


def _is_frozen(m: nn.Module) -> bool:
    return "train" in m.__dict__


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every normalization layer (nk's, torch's _BatchNorm layers, timm's BatchNormAct2d),
    like timm's freeze_batch_norm_2d / torchvision's FrozenBatchNorm2d but without changing
    classes or state_dict keys: its parameters stop requiring gradients and it always
    normalizes with its running statistics, whatever model.train() says. unfreeze() undoes it.
    Returns the model."""
    for m in _norm_layers(model):
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
        m.train = functools.partial(_frozen_train, m)  # instance attribute: survives model.train()
        nn.Module.train(m, False)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo freeze(): parameters require gradients again and the layers follow model.train()."""
    for m in model.modules():
        if _is_frozen(m) and isinstance(m, (_NormBase, _BatchNorm)):
            del m.__dict__["train"]
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    return model
