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
Every op checks its arguments, in its real and its fake kernel (spec.validate_op_inputs: errors name the
argument), and accepts inputs of any strides (launch.unit_last_stride copies only a strided last dim).
On GPU the ops are `triton_op`s, so Inductor sees the generated kernels through `wrap_triton`.
Under the Triton interpreter (CPU, TRITON_INTERPRET=1) they are opaque `custom_op`s: triton_op's
functional decomposition would run the interpreter on FakeTensors there.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import launch, launch_decode
from . import mods as _mods
from .spec import GateLayout, validate_op_inputs

_LIB = "gsa"
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRETER:
    _define, _wrap = torch.library.custom_op, (lambda kernel: kernel)
else:
    _define, _wrap = torch.library.triton_op, torch.library.wrap_triton


def _validate(q, k, v, s, g, scale, hk, hv, cu_seqlens, gate_layout, mods, mod_params, chunk_size=None,
              state_name="hk0/hv0"):
    """The ops are public entry points too: every argument is checked, and errors name it."""
    problem = validate_op_inputs(q, k, v, s, g, scale, hk, hv, cu_seqlens, gate_layout, chunk_size, state_name,
                                 check_values=False if mods else None)
    if problem.dtype == torch.float64 and not INTERPRETER:
        raise TypeError("q has dtype float64: the GPU kernels take float32, float16 or bfloat16 (float64 runs "
                        "only under the Triton interpreter, for gradcheck; use gsa_compile.recurrent_gsa)")
    if not isinstance(mods, str):
        raise TypeError(f"mods must be the str key of a GSAMods ('' for none), got {type(mods).__name__}")
    try:
        traced = _mods.lookup(mods)
    except KeyError as error:
        raise ValueError(f"mods={mods!r}: {error.args[0]}") from None
    n_params = traced.n_params if traced is not None else 0
    if n_params:
        _check_like("mod_params", mod_params, (n_params,), q.device)
    elif mod_params is not None:
        raise ValueError(f"mod_params must be None for mods={mods!r}, which capture no tensors")
    return problem


def _check_like(name, x, shape, device, dtype=None):
    """An extra tensor argument (an upstream gradient, mod parameters) of a known shape."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {tuple(shape)}, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but q has {dtype}")


@_define(f"{_LIB}::chunk_forward", mutates_args=())
def chunk_forward(q: Tensor, k: Tensor, v: Tensor, s: Tensor, g: Tensor, scale: float,
                  hk0: Optional[Tensor], hv0: Optional[Tensor], cu_seqlens: Optional[Tensor],
                  chunk_size: int, gate_layout: str, mods: str = "",
                  mod_params: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    _validate(q, k, v, s, g, scale, hk0, hv0, cu_seqlens, gate_layout, mods, mod_params, chunk_size)
    return launch.forward(q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size, GateLayout(gate_layout),
                          wrap=_wrap, mods_key=mods, mod_params=mod_params)


@chunk_forward.register_fake
def _chunk_forward_fake(q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size, gate_layout, mods="",
                        mod_params=None):
    _validate(q, k, v, s, g, scale, hk0, hv0, cu_seqlens, gate_layout, mods, mod_params, chunk_size)
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
    _validate_backward(do, dhk_final, dhv_final, q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size, gate_layout,
                       mods, mod_params)
    return launch.backward(do, dhk_final, dhv_final, q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size,
                           GateLayout(gate_layout), wrap=_wrap, mods_key=mods, mod_params=mod_params)


def _validate_backward(do, dhk_final, dhv_final, q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size, gate_layout,
                       mods, mod_params):
    p = _validate(q, k, v, s, g, scale, hk0, hv0, cu_seqlens, gate_layout, mods, mod_params, chunk_size)
    _check_like("do", do, (p.B, p.T, p.HQ, p.V), q.device, q.dtype)
    for name, x, shape in (("dhk_final", dhk_final, (p.N, p.H, p.K, p.M)),
                           ("dhv_final", dhv_final, (p.N, p.H, p.M, p.V))):
        if x is not None:
            _check_like(name, x, shape, q.device)


@chunk_backward.register_fake
def _chunk_backward_fake(do, dhk_final, dhv_final, q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size,
                         gate_layout, mods="", mod_params=None):
    _validate_backward(do, dhk_final, dhv_final, q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size, gate_layout,
                       mods, mod_params)
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


def _forward_backward(ctx, do, dhk_final, dhv_final, backward=None):
    """chunk_forward's autograd formula: chunk_backward (the op, or `backward` = launch.backward eagerly)."""
    q, k, v, s, g, hk0, hv0, cu_seqlens, mod_params = ctx.saved_tensors
    if do is None:
        do = torch.zeros(q.shape[:3] + v.shape[3:], device=q.device, dtype=q.dtype)
    if backward is None:
        grads = chunk_backward(do, dhk_final, dhv_final, q, k, v, s, g, ctx.scale, hk0, hv0, cu_seqlens,
                               ctx.chunk_size, ctx.gate_layout, ctx.mods, mod_params)
    else:
        grads = backward(do, dhk_final, dhv_final, q, k, v, s, g, ctx.scale, hk0, hv0, cu_seqlens, ctx.chunk_size,
                         GateLayout(ctx.gate_layout), mods_key=ctx.mods, mod_params=mod_params)
    dq, dk, dv, ds, dg, dhk0, dhv0, dparams = grads
    return (dq, dk, dv, ds, dg, None, dhk0 if hk0 is not None else None, dhv0 if hv0 is not None else None,
            None, None, None, None, dparams if mod_params is not None else None)


chunk_forward.register_autograd(_forward_backward, setup_context=_forward_setup)


# -- the eager path ----------------------------------------------------------------------------
# An eager call through the dispatcher (autograd_impl, redispatch, the triton_op wrapper, defaults,
# the aliasing check) cost ~0.3 ms of host time per forward and as much again per backward on the H200
# machine (bench/host_profile.py), more than the kernels of a 512-token call. Eager calls on plain
# tensors therefore run the same launch functions through a torch.autograd.Function; everything else
# (torch.compile, fake tensors, dispatch modes, functorch transforms, tensor subclasses) takes the op.
EAGER_FAST_PATH = os.environ.get("GSA_EAGER_OPS", "0") != "1"  # GSA_EAGER_OPS=1: always the op


def eager_ok(*tensors) -> bool:
    """Whether this call may skip the dispatcher: eager, no mode or transform, plain tensors only."""
    return EAGER_FAST_PATH and launch.untraced(*tensors)


class EagerChunkForward(torch.autograd.Function):
    """gsa::chunk_forward with its autograd formula, without the dispatcher (see eager_ok). The
    arguments are those of the op and were validated by the caller (api.chunk_gsa)."""

    @staticmethod
    def forward(ctx, *inputs):  # ctx first, no setup_context: apply() then binds no signature (host time)
        *inputs, keep_states = inputs  # the op's arguments, then checkpoint_level 0/1: keep the chunk states
        q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size, gate_layout, mods, mod_params = inputs
        training = any(ctx.needs_input_grad)  # (inference keeps nothing, and makes no backward Call)
        output = launch.forward(q, k, v, s, g, scale, hk0, hv0, cu_seqlens, chunk_size, GateLayout(gate_layout),
                                mods_key=mods, mod_params=mod_params, keep_states=keep_states and training,
                                keep_segments=training and not keep_states)
        # the chunk states (checkpoint_level 0/1), else a launch.ForwardRecord; None in inference
        output, ctx.kept, ctx.kept_states = output[:3], output[3] if training else None, keep_states
        _forward_setup(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero tensors to make and read
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dhk_final, dhv_final):
        kept, ctx.kept = ctx.kept, None  # (once_differentiable: one backward)
        backward = functools.partial(launch.backward, **{"kept" if ctx.kept_states else "forward_record": kept})
        return _forward_backward(ctx, do, dhk_final, dhv_final, backward=backward) + (None,)


@_define(f"{_LIB}::recurrent_step_", mutates_args=("hk", "hv"))
def recurrent_step_(q: Tensor, k: Tensor, v: Tensor, s: Tensor, g: Tensor, scale: float, hk: Tensor, hv: Tensor,
                    gate_layout: str, mods: str = "", mod_params: Optional[Tensor] = None) -> Tensor:
    """Decode: T tokens against (hk, hv), which are updated in place; returns o [B, T, HQ, V]."""
    _validate_decode_(q, k, v, s, g, scale, hk, hv, gate_layout, mods, mod_params)
    return launch_decode.decode_(q, k, v, s, g, scale, hk, hv, GateLayout(gate_layout), wrap=_wrap, mods_key=mods,
                                 mod_params=mod_params)


def _validate_decode_(q, k, v, s, g, scale, hk, hv, gate_layout, mods, mod_params):
    _validate(q, k, v, s, g, scale, hk, hv, None, gate_layout, mods, mod_params, state_name="hk/hv")
    for name, x in (("hk", hk), ("hv", hv)):
        if x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"{name} must be a float32 contiguous state to be updated in place, got {x.dtype} "
                             f"with strides {x.stride()}")


@recurrent_step_.register_fake
def _recurrent_step_fake(q, k, v, s, g, scale, hk, hv, gate_layout, mods="", mod_params=None):
    _validate_decode_(q, k, v, s, g, scale, hk, hv, gate_layout, mods, mod_params)
    return q.new_empty(q.shape[:3] + v.shape[3:])


@_define(f"{_LIB}::recurrent_step", mutates_args=())
def recurrent_step(q: Tensor, k: Tensor, v: Tensor, s: Tensor, g: Tensor, scale: float, hk: Tensor, hv: Tensor,
                   gate_layout: str, mods: str = "", mod_params: Optional[Tensor] = None
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """Functional decode: returns (o, new hk, new hv) in float32; the given states are not modified."""
    _validate(q, k, v, s, g, scale, hk, hv, None, gate_layout, mods, mod_params, state_name="hk/hv")
    hk, hv = launch.float32_copies(hk, hv)
    o = launch_decode.decode_(q, k, v, s, g, scale, hk, hv, GateLayout(gate_layout), wrap=_wrap, mods_key=mods,
                              mod_params=mod_params)
    return o, hk, hv


@recurrent_step.register_fake
def _recurrent_step_functional_fake(q, k, v, s, g, scale, hk, hv, gate_layout, mods="", mod_params=None):
    _validate(q, k, v, s, g, scale, hk, hv, None, gate_layout, mods, mod_params, state_name="hk/hv")
    return (q.new_empty(q.shape[:3] + v.shape[3:]), hk.new_empty(hk.shape, dtype=torch.float32),
            hv.new_empty(hv.shape, dtype=torch.float32))
