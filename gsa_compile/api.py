"""Python API: `chunk_gsa`, with fla's `chunk_gsa` signature, on top of torch.ops.gsa.*."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import launch, launch_decode, ops  # ops registers torch.ops.gsa.*
from .mods import GSAMods
from .spec import GateLayout, StateTuple, check_chunk_size, validate_inputs

AUTO_CHUNK_SIZE = None  # the tuned config of this GPU (autotune/<GPU>.json), else chunk 64


def abc_gate(s: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None):
    """ABC normaliser: z_t = logcumsumexp(s) per sequence; returns (g in float32, or float64 for float64 s,
    and exp(s - z) in s's dtype).

    g_t = z_{t-1} - z_t with g = 0 at each sequence start (see reference.py). Varlen runs without
    a host sync: each sequence's logits are lifted by `offset * sequence index`, with offset larger
    than the whole logit range, so earlier sequences vanish from the running log-sum-exp.
    """
    x = s.to(torch.float64)
    positions = torch.arange(s.shape[1], device=s.device)
    if cu_seqlens is not None:
        seq = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
        offset = (x.max() - x.min()).detach() + 1000.0
        lift = (seq.to(x.dtype) * offset)[None, :, None, None]
        z = torch.logcumsumexp(x + lift, dim=1) - lift
        starts = positions == cu_seqlens.index_select(0, seq).to(positions.dtype)  # gathers: no host sync
    else:
        z = torch.logcumsumexp(x, dim=1)
        starts = positions == 0
    previous = torch.cat([z[:, :1], z[:, :-1]], dim=1)
    g = torch.where(starts[None, :, None, None], torch.zeros_like(z), previous - z)
    return g.to(torch.promote_types(s.dtype, torch.float32)), torch.exp(x - z).to(s.dtype)


def _mods_inputs(mods, q, s, g):
    """s for the ops (with s_from_gate the kernels read the raw gate as s), the mods key and mod_params."""
    if mods is None:
        return s, "", None
    if not isinstance(mods, GSAMods):
        raise TypeError(f"mods must be a gsa_compile.GSAMods or None, got {type(mods).__name__}")
    if mods.s_from_gate:
        if s is not None:
            raise ValueError("s must be None with s_from_gate: s = 1 - exp(gate_mod(g)) is computed in the kernels")
        if not isinstance(g, torch.Tensor) or g.dim() != 4:
            raise ValueError("s_from_gate needs the slot gate layout, g [B, T, H, M] (the shape of s); got "
                             f"g {None if g is None else tuple(g.shape)}")
        if isinstance(q, torch.Tensor) and g.dtype != q.dtype:
            raise TypeError(f"with s_from_gate the kernels read g as s, so g must have q's dtype {q.dtype}; got {g.dtype}")
        s = g
    return s, mods.key, mods.params(q) if isinstance(q, torch.Tensor) else None


def chunk_gsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
              g: Optional[torch.Tensor] = None, scale: Optional[float] = None,
              initial_state: Optional[StateTuple] = None, output_final_state: bool = False,
              checkpoint_level: Optional[int] = None, cu_seqlens: Optional[torch.Tensor] = None,
              head_first: bool = False, *, chunk_size: Optional[int] = AUTO_CHUNK_SIZE,
              gate_layout=None, mods: Optional[GSAMods] = None) -> Tuple[torch.Tensor, Optional[StateTuple]]:
    """Gated Slot Attention, chunked. Same arguments and results as `reference.recurrent_gsa`.

    q [B,T,HQ,K], k [B,T,H,K], v [B,T,H,V], s [B,T,H,M]; g per-slot [B,T,H,M], per-head [B,T,H],
    constant [H] or [H,M], or None (ABC). g is a log forget gate and must be <= 0. Returns
    (o [B,T,HQ,V] in q's dtype, (hk [N,H,K,M], hv [N,H,M,V]) in float32 or None).
    `chunk_size=None` takes the launch config tuned for this GPU (see autotune/README.md); an explicit
    16/32/64/128 forces it. `checkpoint_level` as fla's: 2 or None (the default) recomputes the forward's chunk
    states in the backward; 0 or 1 keeps them from the forward for the backward (eager calls whose backward runs
    at the forward's chunk size: less backward work, the states held until the backward; compiled graphs
    recompute);
    `head_first=True` takes [B,H,T,D] inputs and returns o as [B,HQ,T,V], as fla's did.
    `mods` (gsa_compile.GSAMods) fuses user feature maps, gate_mod and slot_mod into the kernels; then
    q, k, v, g are raw inputs the kernels map, and s is None when the mods derive it from g (s_from_gate).
    """
    s, mods_key, mod_params = _mods_inputs(mods, q, s, g)
    if head_first:
        q, k, v, s = (x.transpose(1, 2) for x in (q, k, v, s))
        if g is not None and g.dim() >= 3:
            g = g.transpose(1, 2)
    problem = validate_inputs(q, k, v, s, g, scale, initial_state, cu_seqlens, gate_layout,
                              check_values=False if mods is not None else None)
    if chunk_size is not None:
        check_chunk_size(chunk_size)
    if checkpoint_level not in (None, 0, 1, 2):
        raise ValueError(f"checkpoint_level must be None, 0, 1 or 2 (fla's levels), got {checkpoint_level!r}")
    if mods is not None:
        mods.check(problem.layout)
    if problem.dtype == torch.float64 and not ops.INTERPRETER:
        raise TypeError("q has dtype float64: the GPU kernels take float32, float16 or bfloat16 (float64 runs "
                        "only under the Triton interpreter, for gradcheck; use gsa_compile.recurrent_gsa)")
    layout = problem.layout
    if layout is GateLayout.ABC:
        g, s = abc_gate(s, cu_seqlens)
        layout = GateLayout.SLOT
    hk0, hv0 = initial_state if initial_state is not None else (None, None)
    args = (q, k, v, s, g, problem.scale, hk0, hv0, cu_seqlens, chunk_size or 0, layout.value, mods_key, mod_params)
    if ops.eager_ok(q, k, v, s, g, hk0, hv0, cu_seqlens, mod_params):  # the same kernels, less host time
        o, hk, hv = ops.EagerChunkForward.apply(*args, checkpoint_level in (0, 1))
    else:
        o, hk, hv = torch.ops.gsa.chunk_forward(*args)
    if head_first:
        o = o.transpose(1, 2)
    return o, ((hk, hv) if output_final_state else None)


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                   g: Optional[torch.Tensor] = None, scale: Optional[float] = None, *,
                   state: StateTuple, inplace: bool = False,
                   mods: Optional[GSAMods] = None) -> Tuple[torch.Tensor, StateTuple]:
    """Decode a few tokens (q [B, T, HQ, K], ... with small T) against `state` = (hk [B,H,K,M], hv [B,H,M,V]).

    Same recurrence and layouts as chunk_gsa, except ABC (its running normaliser is not part of
    the state). With `inplace=True` the float32, contiguous state tensors are updated in place
    (torch.ops.gsa.recurrent_step_, usable under CUDA graphs); otherwise new states are returned.
    Inference only: no gradients. Returns (o [B, T, HQ, V], (hk, hv)). `mods` as for chunk_gsa (a
    slot_mod must not use the position t, which decode does not know).
    """
    s, mods_key, mod_params = _mods_inputs(mods, q, s, g)
    problem = validate_inputs(q, k, v, s, g, scale, state, None, check_values=False if mods is not None else None)
    if mods is not None:
        mods.check(problem.layout, decode=True)
    if problem.layout is GateLayout.ABC:
        raise ValueError("recurrent_step does not support g=None (ABC): its log-normaliser is not part of "
                         "the (hk, hv) state; decode ABC with chunk_gsa over the whole prefix")
    if problem.dtype == torch.float64 and not ops.INTERPRETER:
        raise TypeError("q has dtype float64: the GPU kernels take float32, float16 or bfloat16")
    hk, hv = state
    layout = problem.layout.value
    if inplace:
        for name, x in (("state[0] (hk)", hk), ("state[1] (hv)", hv)):
            if x.dtype != torch.float32 or not x.is_contiguous():
                raise ValueError(f"inplace=True needs float32 contiguous states; {name} is {x.dtype}, "
                                 f"contiguous={x.is_contiguous()}")
    tensors = (q, k, v, s, g, hk, hv, mod_params)
    if ops.eager_ok(*tensors) and not any(x is not None and x.requires_grad for x in tensors):
        if not inplace:  # the op's functional form: fresh float32 states
            hk, hv = launch.float32_copies(hk, hv)
        o = launch_decode.decode_(q, k, v, s, g, problem.scale, hk, hv, problem.layout, mods_key=mods_key,
                                  mod_params=mod_params)  # the op's kernels without the dispatcher (ops.eager_ok)
        return o, (hk, hv)
    if inplace:
        o = torch.ops.gsa.recurrent_step_(q, k, v, s, g, problem.scale, hk, hv, layout, mods_key, mod_params)
        return o, (hk, hv)
    o, hk, hv = torch.ops.gsa.recurrent_step(q, k, v, s, g, problem.scale, hk, hv, layout, mods_key, mod_params)
    return o, (hk, hv)
