"""Compile a generated kernel for a GPU target without a GPU, to read its shared-memory need.

Triton ships ptxas, so `triton.compile` can lower a kernel for sm_90 on any machine. The tuner uses
this to prune configs that cannot launch (Hopper: 227 KiB of shared memory per block), and the
tests use it to prove every chunk size fits before any device time is spent.
"""
from __future__ import annotations

import dataclasses

from . import codegen
from .spec import Spec, TileConfig

HOPPER_SHARED_LIMIT = 232448
_INPUT_POINTERS = {"q", "k", "v", "s", "o", "do", "dq", "dk", "dv"}
_INT_POINTERS = {"cu_seqlens", "chunk_offsets", "chunk_seq", "chunk_idx"}
_TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclasses.dataclass(frozen=True)
class Footprint:
    shared_bytes: int
    fits: bool


def signature(arg_names, spec: Spec, constexprs):
    """Triton signature by argument role: inputs in the spec dtype, int maps, f32 internals."""
    sig = {}
    for name in arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _INPUT_POINTERS or name.startswith("mapped_"):  # mapped_*: stored mapped inputs (mods.py)
            sig[name] = "*" + _TRITON_DTYPE[spec.dtype]
        elif name in _INT_POINTERS:
            sig[name] = "*i32"
        elif name == "cut":  # the segment scan's chunk rows at segment bounds (segments.Plan.cut)
            sig[name] = "*i64"
        elif name in ("scale", "scale_log2"):
            sig[name] = "fp32"
        elif name.startswith("stride_") or name in ("T", "H", "HQ", "S"):
            sig[name] = "i32"
        else:
            sig[name] = "*fp32"
    return sig


def footprint(builder, spec: Spec, constexprs: dict, config: TileConfig = TileConfig(), arch: int = 90) -> Footprint:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.jit import JITFunction

    fn = codegen.kernel(builder, spec)
    if not isinstance(fn, JITFunction):  # under the interpreter: wrap the same Python function
        fn = JITFunction(fn.fn)
    constants = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    source = ASTSource(fn, signature(fn.arg_names, spec, constexprs), constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    shared = compiled.metadata.shared
    return Footprint(shared, shared <= HOPPER_SHARED_LIMIT)
