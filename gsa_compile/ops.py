"""torch.library registrations: every op's schema, fake (shape-only) kernel and autograd, in one place.

    gsa::chunk_forward(q, k, v, s, g, scale, hk0?, hv0?, cu_seqlens?, chunk_size, gate_layout)
        -> (o [B,T,HQ,V] in q's dtype, hk_final [N,H,K,M] f32, hv_final [N,H,M,V] f32)

`g` is the log gate in the layout named by `gate_layout` (slot | head | decay_head | decay_slot);
ABC is normalised to `slot` before the op. The final states are always produced (fixed arity).
On GPU the ops are `triton_op`s, so Inductor sees the generated kernels through `wrap_triton`.
Under the Triton interpreter (CPU, TRITON_INTERPRET=1) they are opaque `custom_op`s: triton_op's
functional decomposition would run the interpreter on FakeTensors there.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import launch
from .spec import GateLayout

_LIB = "gsa"
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRETER:
    _define, _wrap = torch.library.custom_op, (lambda kernel: kernel)
else:
    _define, _wrap = torch.library.triton_op, torch.library.wrap_triton


@_define(f"{_LIB}::chunk_forward", mutates_args=())
def chunk_forward(q: Tensor, k: Tensor, v: Tensor, s: Tensor, g: Tensor, scale: float,
                  hk0: Optional[Tensor], hv0: Optional[Tensor], cu_seqlens: Optional[Tensor],
                  chunk_size: int, gate_layout: str) -> Tuple[Tensor, Tensor, Tensor]:
    return launch.forward(q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size, GateLayout(gate_layout),
                          wrap=_wrap)


@chunk_forward.register_fake
def _chunk_forward_fake(q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size, gate_layout):
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[3], s.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty(B, T, HQ, V)
    return o, q.new_empty(N, H, K, M, dtype=torch.float32), q.new_empty(N, H, M, V, dtype=torch.float32)
