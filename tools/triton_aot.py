"""Ahead-of-time compilation of the Triton launches recorded by normkernels.triton.launch, for
sm_90 without a GPU (tests/test_triton_compile.py, `make gpu-check`'s aot stage).

Compiling (``specialise``, ``compile_launches``) mirrors what the JIT does at the first launch on
a GPU: the JIT's own binder turns the arguments into the signature (pointer dtypes from the
tensors' dtypes; integers as i32/i64/u64), the constexprs (integers equal to 1 become constexpr
1) and the attributes (tt.divisibility 16 for pointers and integers divisible by 16), then
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``.
Registers, stack frame and local-memory instructions (spills) are read from the cubin with the
cuobjdump bundled in triton's package; nothing here needs libcuda. Run it in a process without
TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time

from normkernels.triton.launch import Launch

__all__ = ["specialise", "launch_key", "explicit_specialisation", "compile_launches", "ptxas_for_sm90",
           "legacy_ptxas", "cubin_resources", "reassemble"]


# ---------------------------------------------------------------------------------------------
# ahead-of-time: the JIT's specialisation, compile for sm_90, resources from the cubin

def _target(arch: int = 90):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)


def _jit_kwargs(rec: Launch) -> dict:
    """The keyword arguments JITFunction.run hands its binder (constexprs, options, and the
    debug/instrumentation options run adds itself)."""
    from triton import knobs
    kw = dict(rec.constexprs, **rec.options, num_warps=rec.num_warps)
    if rec.num_stages is not None:
        kw["num_stages"] = rec.num_stages
    kw["debug"] = kw.get("debug", getattr(rec.kernel, "debug", None)) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):        # triton >= 3.7
        kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return kw


def _arg_key(v):
    if hasattr(v, "data_ptr") and hasattr(v, "dtype"):
        return ("tensor", str(v.dtype), v.data_ptr() % 16)
    if isinstance(v, (bool, int, float, str, type(None))):
        return (type(v).__name__, v)
    return (type(v).__name__, repr(v))


def launch_key(rec: Launch) -> tuple:
    """A key that is equal for launches the JIT cannot tell apart: the kernel, every scalar
    argument by type and value, tensors by dtype and address modulo 16 (all the binder looks
    at), constexprs and options. Finer than the specialisation (integers are compared by value,
    not by their divisibility), so ``specialise`` needs to run once per key only (it costs ~3 ms:
    the JIT's binder; a recording has ~10x more launches than keys)."""
    return (id(rec.kernel), tuple(_arg_key(a) for a in rec.args),
            tuple(sorted((k, _arg_key(v)) for k, v in rec.constexprs.items())), rec.num_warps,
            rec.num_stages, tuple(sorted((k, _arg_key(v)) for k, v in rec.options.items())))


def specialise(rec: Launch, arch: int = 90):
    """(signature, constexprs, attrs, options) of a launch exactly as JITFunction.run computes
    them on a GPU of compute capability ``arch``: its own binder
    (triton.runtime.jit.create_function_from_signature) and JITFunction._pack_args (both present,
    with these signatures, in triton 3.6 and 3.9)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    kernel = rec.kernel
    backend = make_backend(_target(arch))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kw = _jit_kwargs(rec)
    bound, specialization, options = binder(*rec.args, **kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, specialization, options)
    return signature, constexprs, attrs, options


_TL_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
             "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
             "bool": "u1", "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5"}


def _explicit_arg(value, is_const: bool, specialize: bool, align: bool):
    """(type, key) of one runtime argument, by the rules of triton's native_specialize_impl
    (checked against it in tests/test_triton_compile.py for triton 3.6 and 3.9)."""
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        ty = "i32" if -2**31 <= value < 2**31 else "i64" if -2**63 <= value < 2**63 else "u64"
        if not specialize:
            return ty, None
        return ty, "D" if align and value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        ty = ("*k" if is_const else "*") + _TL_TYPES[str(value.dtype).replace("torch.", "")]
        if not specialize:
            return ty, None
        return ty, "D" if align and value.data_ptr() % 16 == 0 else ""
    raise TypeError(f"explicit_specialisation: cannot specialise an argument of type {type(value).__name__}")


def explicit_specialisation(rec: Launch):
    """(signature, constexprs, attrs) written out from the JIT's rules: pointer dtypes from the
    tensors' dtypes, integers divisible by 16 get tt.divisibility 16 (pointers: data_ptr divisible
    by 16), integers equal to 1 become constexpr 1, None becomes constexpr None, floats fp32,
    bools u1 (neither specialised). A fallback to ``specialise`` and a check of it: the test
    compares the two on every recorded launch."""
    params = rec.kernel.params
    values = list(rec.args) + [rec.constexprs.get(p.name, p.default) for p in params[len(rec.args):]]
    signature, constexprs, attrs = {}, {}, {}
    for i, (p, v) in enumerate(zip(params, values)):
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", v
            continue
        ty, key = _explicit_arg(v, p.is_const, not p.do_not_specialize,
                                not p.do_not_specialize_on_alignment)
        if p.annotation_type and ty != "constexpr":
            ty = p.annotation_type
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = key
        if isinstance(key, str):
            attrs[(i,)] = [["tt.divisibility", 16]] if "D" in key else []
    return signature, constexprs, attrs


def _tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in triton's package ({path})")
    return path


def ptxas_for_sm90() -> tuple[str, str]:
    """(path, CUDA release) of the ptxas this triton uses for sm_90: triton 3.6 takes its bundled
    ``ptxas`` (CUDA 12.8) below sm_100; triton 3.9 takes ``ptxas-blackwell`` (CUDA 13.x) from
    sm_90 on."""
    from triton.backends.nvidia import compiler as nv
    tool = nv.get_ptxas(90)
    return tool.path, tool.version


def legacy_ptxas() -> tuple[str, str] | None:
    """(path, release) of the CUDA 12 ``ptxas`` bundled with triton when this triton compiles
    sm_90 with another (a CUDA 13 ptxas-blackwell): the closest thing here to what triton 3.6
    runs on the GPU machine. None when sm_90 already uses it."""
    from triton import knobs
    used, _ = ptxas_for_sm90()
    legacy = knobs.nvidia.ptxas
    if legacy is None or os.path.realpath(legacy.path) == os.path.realpath(used):
        return None
    return legacy.path, legacy.version


def cubin_resources(cubin: bytes) -> dict:
    """Registers, stack frame, local and static shared memory of the (single) kernel in a cubin,
    with triton's cuobjdump, and its local-memory instructions (STL/LDL in the SASS: what spilling
    costs). Local memory lives in the stack frame / local area: with both 0 there is none, so the
    SASS (0.4 s a kernel to disassemble) is read only when one is not."""
    cuobjdump = _tool("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
        if "REG" not in fields:
            raise RuntimeError(f"cuobjdump --dump-resource-usage gave no register count:\n{usage}")
        res = {"registers": int(fields["REG"]), "stack_bytes": int(fields.get("STACK", 0)),
               "local_bytes": int(fields.get("LOCAL", 0)), "static_shared_bytes": int(fields.get("SHARED", 0)),
               "spill_stores": 0, "spill_loads": 0}
        if res["stack_bytes"] or res["local_bytes"]:
            sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True,
                                  check=True).stdout
            res["spill_stores"] = len(re.findall(r"\bSTL(?:\.\w+)*\b", sass))
            res["spill_loads"] = len(re.findall(r"\bLDL(?:\.\w+)*\b", sass))
    return res


def _fmt_constexpr(v) -> str:
    return repr(v) if isinstance(v, (int, float, bool, str, type(None))) else str(v)


def _spec_key(rec: Launch, spec) -> tuple:
    signature, constexprs, attrs, options = spec
    opts = {k: v for k, v in options.__dict__.items() if k != "extern_libs"}
    fn = rec.kernel.fn
    return (f"{fn.__module__}.{fn.__qualname__}", tuple(signature.items()),
            tuple(sorted((k, _fmt_constexpr(v)) for k, v in constexprs.items())),
            tuple(sorted((k, str(v)) for k, v in attrs.items())), tuple(sorted((k, str(v)) for k, v in opts.items())))


def _describe(rec: Launch, spec) -> dict:
    signature, constexprs, attrs, options = spec
    names = list(signature)
    return {"kernel": rec.name,
            "constexprs": {names[k[0]]: _fmt_constexpr(v) for k, v in constexprs.items()},
            "divisible16": [names[k[0]] for k, v in attrs.items() if v],
            "pointers": {n: t for n, t in signature.items() if t.startswith("*")},
            "num_warps": options.num_warps, "num_stages": options.num_stages}


_JOBS: list = []


def reassemble(ptx: str, ptxas: str, release: str, arch: int = 90) -> dict:
    """Resources of ``ptx`` assembled by another ptxas (as triton would call it: -lineinfo -v
    --gpu-name=sm_<arch>a), its .version lowered to the newest PTX ISA that ptxas takes (triton's
    own mapping from the CUDA release). Kept in triton's cache (a ptxas run costs ~0.5 s)."""
    import hashlib
    import json

    from triton.backends.nvidia.compiler import ptx_get_version
    from triton.runtime.cache import get_cache_manager
    isa = ptx_get_version(release)
    ptx = re.sub(r"^\.version \d+\.\d+", f".version {isa // 10}.{isa % 10}", ptx, count=1, flags=re.M)
    cmd = ["-lineinfo", "-v", f"--gpu-name=sm_{arch}a"]
    key = hashlib.sha256("\0".join([ptx, os.path.realpath(ptxas), release, *cmd]).encode()).hexdigest()
    cache = get_cache_manager(key)
    hit = cache.get_file("resources.json")
    if hit is not None:
        with open(hit) as f:
            return json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, *cmd, src, "-o", out], capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": f"ptxas {release}: {proc.stderr.strip()[-1500:]}"}
        with open(out, "rb") as f:
            res = cubin_resources(f.read())
    res["error"] = None
    cache.put(json.dumps(res), "resources.json", binary=False)
    return res


def _compile_one(index: int) -> dict:
    import triton
    from triton.compiler import ASTSource
    kernel, spec, arch, extra = _JOBS[index]
    signature, constexprs, attrs, options = spec
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=_target(arch),
                                  options=options.__dict__)
        out = cubin_resources(compiled.asm["cubin"])
        out["shared_bytes"] = int(compiled.metadata.shared)
        out["ptx_version"] = next((l.split()[1] for l in compiled.asm["ptx"].splitlines()
                                   if l.startswith(".version")), None)
        out["error"] = None
        if extra is not None:
            out["reassembled"] = reassemble(compiled.asm["ptx"], *extra, arch=arch)
    except Exception as e:                       # a compile error is a result, reported per kernel
        msg = str(e).strip()
        out = {"error": f"{type(e).__name__}: {msg[-2000:]}"}
    out["compile_s"] = round(time.perf_counter() - t0, 3)
    return out


def compile_launches(launches, arch: int = 90, jobs: int | None = None,
                     reassemble_with: tuple[str, str] | None = None, progress=None) -> list[dict]:
    """Compile every unique specialisation of ``launches`` for sm_<arch>; one result per unique
    specialisation: its description, how many launches (and which) produce it, and the compiled
    resources (registers, stack_bytes, spill_stores/spill_loads = STL/LDL instructions, shared)
    or the compile error. ``reassemble_with``: (path, CUDA release) of a second ptxas (e.g.
    legacy_ptxas()); each kernel's PTX is also assembled by it, its resources under
    "reassembled". Compiles run in ``jobs`` forked processes (default: the cores this process may
    use); triton's cache makes a repeated run take seconds. ``progress(row, total)`` is called
    after each."""
    import multiprocessing

    unique: dict = {}
    bound: dict = {}                  # launch_key -> the entry of its specialisation
    for rec in launches:
        lk = launch_key(rec)
        entry = bound.get(lk)
        if entry is None:
            spec = specialise(rec, arch)
            key = _spec_key(rec, spec)
            entry = unique.get(key)
            if entry is None:
                entry = unique[key] = {"rec": rec, "spec": spec, "launches": 0, "where": []}
            bound[lk] = entry
        entry["launches"] += 1
        if rec.where and rec.where not in entry["where"] and len(entry["where"]) < 4:
            entry["where"].append(rec.where)
    entries = list(unique.values())
    global _JOBS
    _JOBS = [(e["rec"].kernel, e["spec"], arch, reassemble_with) for e in entries]
    jobs = jobs or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    # forked workers: the kernels need not be picklable
    ctx = multiprocessing.get_context("fork")
    results = []
    try:
        with ctx.Pool(min(jobs, max(1, len(entries)))) as pool:
            for i, res in enumerate(pool.imap(_compile_one, range(len(entries)))):
                e = entries[i]
                row = _describe(e["rec"], e["spec"])
                row.update(launches=e["launches"], where=e["where"], **res)
                results.append(row)
                if progress is not None:
                    progress(row, len(entries))
    finally:
        _JOBS = []
    return results
