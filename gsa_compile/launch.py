"""Host side of the generated kernels: buffers, grids and launches (no host synchronisation).

`forward(...)` runs the three forward programs of programs.py for one call. It is the body of
`torch.ops.gsa.chunk_forward`; `launcher` wraps each kernel (with `torch.library.wrap_triton`
inside a triton_op, so Inductor sees the kernels).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton

from . import codegen, programs
from .spec import GateLayout, Spec, TileConfig, next_power_of_2

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
LOG2E = 1.4426950408889634


def block(size: int, preferred: int) -> int:
    """A power-of-two tile >= 16 (tl.dot's minimum), no larger than needed for `size`."""
    return max(16, min(preferred, next_power_of_2(size)))


def chunk_layout(cu_seqlens: Optional[torch.Tensor], B: int, T: int, chunk_size: int):
    """(number of chunk-state rows, first chunk row per sequence, chunk -> (seq, index) maps).

    Without cu_seqlens every batch row has cdiv(T, BT) chunks. With it, the counts are computed on
    the device and the tensors are sized by the upper bound cdiv(T, BT) + N - 1, so no value is
    read back to the host; slots past the last chunk map to sequence -1.
    """
    if cu_seqlens is None:
        return B * triton.cdiv(T, chunk_size), None, None, None
    n_seq = cu_seqlens.numel() - 1
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    counts = torch.div(lengths + chunk_size - 1, chunk_size, rounding_mode="floor")
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
    upper = triton.cdiv(T, chunk_size) + n_seq - 1
    slots = torch.arange(upper, device=cu_seqlens.device, dtype=torch.int32)
    seq = torch.searchsorted(offsets[1:].contiguous(), slots, right=True).to(torch.int32)
    index = slots - offsets[seq.clamp(max=n_seq - 1).long()]
    seq = torch.where(seq < n_seq, seq, torch.full_like(seq, -1))
    return upper, offsets, seq.contiguous(), index.to(torch.int32).contiguous()


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def _gate_strides(g: torch.Tensor, layout: GateLayout):
    """(stride_gb, stride_gt, stride_gh) for each gate layout; the lowering rule zeroes the rest."""
    if layout in (GateLayout.SLOT, GateLayout.HEAD):
        return _strides(g)
    return 0, 0, g.stride(0)


def forward_constants(spec: Spec, config: TileConfig):
    """The constexpr arguments of each forward program for a Spec and tile config."""
    BK, BV = block(spec.K, config.BK), block(spec.V, config.BV)
    common = dict(K=spec.K, V=spec.V, M=spec.M, BT=spec.chunk_size, BK=BK, BV=BV, BM=spec.BM)
    return {
        "state_pass": dict(NK=triton.cdiv(spec.K, BK), **common),
        "output_pass": dict(G=spec.group, BC=spec.BC, **common),
    }


def forward(q, k, v, s, g, scale: float, hk0, hv0, cu_seqlens, chunk_size: int, layout: GateLayout,
            config: TileConfig = TileConfig(), wrap: Callable = lambda kernel: kernel):
    """Run the forward; returns (o, hk_final [N,H,K,M] f32, hv_final [N,H,M,V] f32)."""
    B, T = q.shape[:2]
    # head counts and dims are kernel constants: specialise on them even under dynamic shapes
    HQ, K, H, V, M = (int(x) for x in (q.shape[2], q.shape[3], k.shape[2], v.shape[3], s.shape[3]))
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    spec = Spec(layout=layout, chunk_size=chunk_size, dtype=DTYPE_NAMES[q.dtype], K=K, V=V, M=M,
                group=HQ // H, varlen=cu_seqlens is not None, initial_state=hk0 is not None, final_state=True)
    consts = forward_constants(spec, config)
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)

    n_chunk_rows, offsets, chunk_seq, chunk_idx = chunk_layout(cu_seqlens, B, T, chunk_size)
    f32 = dict(device=q.device, dtype=torch.float32)
    gc = torch.empty(B, T, H, M, **f32)
    hk_chunks = torch.empty(n_chunk_rows, H, K, M, **f32)
    hv_chunks = torch.empty(n_chunk_rows, H, M, V, **f32)
    o = torch.empty(B, T, HQ, V, device=q.device, dtype=q.dtype)
    hk_final = torch.empty(N, H, K, M, **f32)
    hv_final = torch.empty(N, H, M, V, **f32)
    unused = hk_final  # pointer for arguments the Spec compiles out
    cu = cu_seqlens if cu_seqlens is not None else unused
    offsets = offsets if offsets is not None else unused
    hk0 = hk0.float().contiguous() if hk0 is not None else unused
    hv0 = hv0.float().contiguous() if hv0 is not None else unused

    n_tiles = consts["state_pass"]["NK"] + triton.cdiv(V, consts["state_pass"]["BV"])
    wrap(codegen.kernel(programs.state_pass, spec))[(n_tiles, N * H)](
        k, v, s, g, gc, hk_chunks, hv_chunks, hk0, hv0, hk_final, hv_final, cu, offsets,
        T, H, *_strides(k), *_strides(v), *_strides(s), *_gate_strides(g, layout),
        **consts["state_pass"], **launch)
    if cu_seqlens is None:
        grid = (triton.cdiv(T, chunk_size), B * HQ)
        chunk_seq = chunk_idx = unused
    else:
        grid = (chunk_seq.numel(), HQ)
    wrap(codegen.kernel(programs.output_pass, spec))[grid](
        q, k, v, s, gc, hk_chunks, hv_chunks, o, cu, offsets, chunk_seq, chunk_idx,
        T, H, HQ, scale * LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(s),
        **consts["output_pass"], **launch)
    return o, hk_final, hv_final
