"""Leaf ops of one call, counted the way ../shared/tools/overhead.py counts them: dispatcher ops
(aten:: and normkernels::) that contain no other counted op (one kernel launch each on a GPU),
views and allocations not counted. Used by the op-budget test and the per-op count tests."""
from torch.profiler import profile

_NOT_COUNTED = ("view", "as_strided", "detach", "alias", "unsqueeze", "squeeze", "expand", "split",
                "unbind", "select", "slice", "permute", "transpose", "aten::t", "empty", "resolve_",
                "lift", "_unsafe_view", "reshape", "flatten", "narrow", "chunk", "real", "imag",
                "view_as", "set_", "contiguous", "result_type", "is_", "size", "stride", "numel",
                "dim", "_shape_as_tensor", "unfold")


def _counted(name: str) -> bool:
    if not (name.startswith("aten::") or name.startswith("normkernels::")):
        return False
    op = name.split("::", 1)[1]
    return not any(name == s or name.startswith("aten::" + s) or op[: len(s)] == s for s in _NOT_COUNTED)


def leaf_ops(fn) -> list[str]:
    """Names of the counted ops of one call of fn that contain no other counted op."""
    with profile() as prof:
        fn()
    events = [e for e in prof.events() if _counted(e.name)]
    ids = {id(e) for e in events}

    def has_counted_child(e):
        stack = list(e.cpu_children)
        while stack:
            c = stack.pop()
            if id(c) in ids:
                return True
            stack.extend(c.cpu_children)
        return False

    return [e.name for e in events if not has_counted_child(e)]
