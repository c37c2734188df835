"""torch.library registrations: every op's schema, fake (shape-only) kernel and autograd, in one place.

    gsa::chunk_forward(q, k, v, s, g, scale, hk0?, hv0?, cu_seqlens?, chunk_size, gate_layout,
                       mods="", mod_params?=None)
        -> (o [B,T,HQ,V] in q's dtype, hk_final [N,H,K,M] f32, hv_final [N,H,M,V] f32)

    gsa::chunk_backward(do, dhk_final?, dhv_final?, q, k, v, s, g, scale, hk0?, hv0?, cu_seqlens?,
                        chunk_size, gate_layout, mods="", mod_params?=None)
        -> (dq, dk, dv, ds, dg, dhk0 f32, dhv0 f32, d mod_params (empty without))
        (recomputes the forward states; registered as chunk_forward's autograd formula)
    gsa::recurrent_step_(q, k, v, s, g, scale, hk!, hv!, gate_layout, mods="", mod_params?=None) -> o
        (decode, states in place)
    gsa::recurrent_step(q, k, v, s, g, scale, hk, hv, gate_layout, mods="", mod_params?=None) -> (o, hk', hv')
        (functional)

`mods` is the key of traced user mods (mods.py: feature maps, gate_mod, slot_mod fused into the
kernels; q, k, v, s, g are then the raw inputs) and `mod_params` their captured tensors, flattened.

`chunk_size` 0 means the tuned launch config (tuner.py); `g` is the log gate in the layout named by `gate_layout` (slot | head | decay_head | decay_slot);
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
                  chunk_size: int, gate_layout: str, mods: str = "",
                  mod_params: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    return launch.forward(q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size, GateLayout(gate_layout),
                          wrap=_wrap, mods_key=mods, mod_params=mod_params)


@chunk_forward.register_fake
def _chunk_forward_fake(q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size, gate_layout, mods="",
                        mod_params=None):
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[3], s.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty(B, T, HQ, V)
    return o, q.new_empty(N, H, K, M, dtype=torch.float32), q.new_empty(N, H, M, V, dtype=torch.float32)


@_define(f"{_LIB}::chunk_backward", mutates_args=())
def chunk_backward(do: Tensor, dhk_final: Optional[Tensor], dhv_final: Optional[Tensor], q: Tensor, k: Tensor,
                   v: Tensor, s: Tensor, g: Tensor, scale: float, hk0: Optional[Tensor], hv0: Optional[Tensor],
                   cu_seqlens: Optional[Tensor], chunk_size: int, gate_layout: str, mods: str = "",
                   mod_params: Optional[Tensor] = None
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return launch.backward(do, dhk_final, dhv_final, q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size,
                           GateLayout(gate_layout), wrap=_wrap, mods_key=mods, mod_params=mod_params)


@chunk_backward.register_fake
def _chunk_backward_fake(do, dhk_final, dhv_final, q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size,
                         gate_layout, mods="", mod_params=None):
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[3], s.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    f32 = dict(dtype=torch.float32)
    # every gradient comes back contiguous, whatever the strides of the input it belongs to
    dparams = q.new_empty(0, **f32) if mod_params is None else torch.empty_like(mod_params)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), s.new_empty(s.shape),
            g.new_empty(g.shape), q.new_empty(N, H, K, M, **f32), q.new_empty(N, H, M, V, **f32), dparams)


def _forward_setup(ctx, inputs, output):
    q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size, gate_layout, mods, mod_params = inputs
    ctx.save_for_backward(q, k, v, s, g, hk0, hv0, cu_seqlens, mod_params)
    ctx.scale, ctx.chunk_size, ctx.gate_layout, ctx.mods = scale, chunk_size, gate_layout, mods


def _forward_backward(ctx, do, dhk_final, dhv_final):
    q, k, v, s, g, hk0, hv0, cu_seqlens, mod_params = ctx.saved_tensors
    if do is None:
        do = torch.zeros(q.shape[:3] + v.shape[3:], device=q.device, dtype=q.dtype)
    dq, dk, dv, ds, dg, dhk0, dhv0, dparams = chunk_backward(
        do.contiguous(), dhk_final, dhv_final, q, k, v, s, g, ctx.scale, hk0, hv0, cu_seqlens,
        ctx.chunk_size, ctx.gate_layout, ctx.mods, mod_params)
    return (dq, dk, dv, ds, dg, None, dhk0 if hk0 is not None else None, dhv0 if hv0 is not None else None,
            None, None, None, None, dparams if mod_params is not None else None)


chunk_forward.register_autograd(_forward_backward, setup_context=_forward_setup)


@_define(f"{_LIB}::recurrent_step_", mutates_args=("hk", "hv"))
def recurrent_step_(q: Tensor, k: Tensor, v: Tensor, s: Tensor, g: Tensor, scale: float, hk: Tensor, hv: Tensor,
                    gate_layout: str, mods: str = "", mod_params: Optional[Tensor] = None) -> Tensor:
    """Decode: T tokens against (hk, hv), which are updated in place; returns o [B, T, HQ, V]."""
    return launch.decode_(q, k, v, s, g, scale, hk, hv, GateLayout(gate_layout), wrap=_wrap, mods_key=mods,
                          mod_params=mod_params)


@recurrent_step_.register_fake
def _recurrent_step_fake(q, k, v, s, g, scale, hk, hv, gate_layout, mods="", mod_params=None):
    return q.new_empty(q.shape[:3] + v.shape[3:])


@_define(f"{_LIB}::recurrent_step", mutates_args=())
def recurrent_step(q: Tensor, k: Tensor, v: Tensor, s: Tensor, g: Tensor, scale: float, hk: Tensor, hv: Tensor,
                   gate_layout: str, mods: str = "", mod_params: Optional[Tensor] = None
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """Functional decode: returns (o, new hk, new hv); the given states are not modified."""
    hk, hv = hk.clone(), hv.clone()
    o = launch.decode_(q, k, v, s, g, scale, hk, hv, GateLayout(gate_layout), wrap=_wrap, mods_key=mods,
                       mod_params=mod_params)
    return o, hk, hv


@recurrent_step.register_fake
def _recurrent_step_functional_fake(q, k, v, s, g, scale, hk, hv, gate_layout, mods="", mod_params=None):
    return q.new_empty(q.shape[:3] + v.shape[3:]), torch.empty_like(hk), torch.empty_like(hv)
