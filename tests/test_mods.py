"""FlexAttention-style mods (gsa_compile/mods.py): user functions fused into the generated kernels.

1. The traced expressions: values and symbolic derivatives equal torch and autograd for every
   supported op (and random compositions, hypothesis); unsupported functions are refused naming the op.
2. Each mod kind in the kernels (float64, interpreter) equals applying the same function outside the
   kernels and running the float64 reference, forward and gradients (raw inputs and captured
   parameters), for every gate layout; varlen with b/t-indexed parameters; decode.
3. Cache keys: the same mod never recompiles, different mods never share a kernel.
4. The ops with mods pass opcheck; the layer with fused mods loads the unfused layer's state_dict
   and matches it (forward, gradients, padding, decode), and compiles with fullgraph=True.
"""
import copy
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from gsa_compile import (
    GatedSlotAttention,
    GSAMods,
    chunk_gsa,
    codegen,
    programs,
    recurrent_gsa,
    recurrent_step,
)
from gsa_compile.mod_expr import Expr, derivative, evaluate
from gsa_compile.spec import GateLayout, Spec

F64 = torch.float64
LAYOUTS = ["slot", "head", "decay_head", "decay_slot", "abc"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------------
# 1. traced expressions
# --------------------------------------------------------------------------------------------------

UNARY = {  # one function per supported op (and argument forms), as a user would write it
    "add_sub_mul_div": lambda x: (x + 1.5) * 2 - x / 3,
    "rsub_rdiv": lambda x: 2 - 1 / (x * x + 1),
    "neg_abs": lambda x: -abs(x) + torch.abs(x) * 0.5,
    "exp_log": lambda x: torch.log(torch.exp(x) + 1),
    "log1p_expm1": lambda x: torch.log1p(x * x) + torch.expm1(x / 4),
    "sqrt_rsqrt": lambda x: torch.sqrt(x * x + 1) + (x * x + 2).rsqrt(),
    "sigmoid": lambda x: torch.sigmoid(x) + x.sigmoid() * 2,
    "logsigmoid": lambda x: F.logsigmoid(x) / 8,
    "tanh": lambda x: 3 * torch.tanh(x / 3),
    "relu": lambda x: F.relu(x) + torch.relu(-x) * 0.5 + x.relu(),
    "silu": lambda x: F.silu(x) + torch.nn.SiLU()(x),
    "elu": lambda x: F.elu(x) + 1 + F.elu(x, alpha=0.5),
    "softplus": lambda x: F.softplus(x) + F.softplus(x, beta=2.0, threshold=1.0),
    "where_compare": lambda x: torch.where(x > 0.5, x * x, -x) + (x <= 0).float() + torch.where(x != 1, 1.0, x),
    "min_max": lambda x: torch.minimum(x, torch.zeros_like(x) + 0.3) + torch.maximum(x * 2, 1 - x),
    "clamp": lambda x: x.clamp(min=-0.5) + torch.clamp(x, -1, 1) + x.clamp_max(0.2) + torch.clip(x, max=0.1),
    "pow": lambda x: x ** 2 + x.pow(3) / 4 + torch.square(x) + (x * x + 1) ** 0.5 + (x * x + 1) ** -1.5,
    "rpow": lambda x: 2 ** x,
    "logic": lambda x: torch.where((x > -1) & (x < 1) | ~(x > 2), x, 0.0),
    "casts": lambda x: F.silu(x.double()).to(torch.float64).type_as(x) * x.contiguous(),  # no-ops here
}


@pytest.mark.parametrize("name", list(UNARY))
def test_expression_values_and_derivatives_match_torch(name):
    fn = UNARY[name]
    expr = GSAMods(q_map=fn).traced.loads["q"]
    x = torch.linspace(-3, 3, 601, dtype=F64).requires_grad_()
    x.data += 1e-3  # away from exact kinks (relu, clamp and where at 0, 1, ...)
    expected = fn(x)
    grad, = torch.autograd.grad(expected.sum(), x)
    assert torch.allclose(evaluate(expr, {"input": x.detach()}, None), expected.detach(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(evaluate(derivative(expr, Expr("input")), {"input": x.detach()}, None), grad,
                          rtol=1e-10, atol=1e-10)


@given(st.lists(st.sampled_from(sorted(UNARY)), min_size=2, max_size=4), st.integers(0, 2 ** 16))
def test_random_compositions_differentiate_like_autograd(names, seed):
    def fn(x):
        for name in names:
            x = UNARY[name](x / 2)
        return x
    expr = GSAMods(k_map=fn).traced.loads["k"]
    x = (torch.randn(64, dtype=F64, generator=torch.Generator().manual_seed(seed)) + 1e-3).requires_grad_()
    expected = fn(x)
    grad, = torch.autograd.grad(expected.sum(), x)
    finite = torch.isfinite(grad) & torch.isfinite(expected)
    value = evaluate(expr, {"input": x.detach()}, None).expand_as(x)
    slope = evaluate(derivative(expr, Expr("input")), {"input": x.detach()}, None).expand_as(x)
    assert torch.allclose(value[finite], expected.detach()[finite], rtol=1e-9, atol=1e-9)
    assert torch.allclose(slope[finite], grad[finite], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(q_map=lambda x: x.sum()), TypeError, ["Tensor.sum"]),
    (dict(q_map=lambda x: torch.cumsum(x, 0)), TypeError, ["torch.cumsum"]),
    (dict(k_map=lambda x: torch.softmax(x, -1)), TypeError, ["torch.softmax"]),
    (dict(v_map=lambda x: x @ x), TypeError, ["matmul"]),
    (dict(v_map=F.gelu), TypeError, ["gelu"]),
    (dict(q_map=lambda x: x[0]), TypeError, ["getitem", "input"]),
    (dict(q_map=lambda x: x if x > 0 else -x), TypeError, ["q_map", "control flow"]),
    (dict(q_map=lambda x, y: x), TypeError, ["q_map(x)"]),
    (dict(gate_mod=lambda x: x ** x), TypeError, ["pow", "constant exponent"]),
    (dict(q_map=lambda x: x / torch.arange(4.0)), ValueError, ["shape (4,)", "one index per dimension"]),
    (dict(slot_mod=lambda x, b, h, t, m: x * torch.ones(3, 4)[h]), ValueError, ["shape (3, 4)"]),
    (dict(slot_mod=lambda x, b, h, t, m: x * torch.ones(3)[x.long()]), TypeError, ["Tensor.long"]),
    (dict(slot_mod=lambda x, b, h, t, m: x > 0), TypeError, ["floating-point"]),
    (dict(q_map="silu"), TypeError, ["callable"]),
])
def test_unsupported_mods_are_refused_naming_the_op(kwargs, error, words):
    with pytest.raises(error) as info:
        GSAMods(**kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_cache_key_is_the_traced_graph():
    temps = torch.ones(2), torch.full((2,), 3.0), torch.ones(3)
    keys = [GSAMods(slot_mod=lambda x, b, h, t, m, c=c: x * c[h]).key for c in temps]
    assert keys[0] == keys[1] != keys[2]  # values are kernel arguments; shapes are part of the code
    same = [GSAMods(q_map=lambda x: F.silu(x) * 2), GSAMods(q_map=lambda x: torch.nn.functional.silu(x) * 2.0)]
    assert same[0].key == same[1].key  # different function objects, the same traced graph
    distinct = {GSAMods(q_map=F.silu).key, GSAMods(k_map=F.silu).key, GSAMods(q_map=F.relu).key,
                GSAMods(gate_mod=F.logsigmoid).key, GSAMods(gate_mod=F.logsigmoid, s_from_gate=True).key,
                GSAMods(q_map=lambda x: x * 2).key, GSAMods(q_map=lambda x: x * 2.5).key}
    assert len(distinct) == 7
    spec = Spec(layout=GateLayout.SLOT, chunk_size=16, dtype="float32", K=8, V=8, M=4)
    sources = {codegen.source(programs.state_pass, Spec(**{**spec.__dict__, "mods": key}))
               for key in ("", GSAMods(k_map=F.silu).key, GSAMods(k_map=F.relu).key)}
    assert len(sources) == 3


def test_mods_pickle_and_deepcopy_by_retracing():
    mods = GSAMods(q_map=F.silu, gate_mod=F.logsigmoid, s_from_gate=True)
    assert pickle.loads(pickle.dumps(mods)).key == mods.key
    assert copy.deepcopy(mods).key == mods.key
    layer = GatedSlotAttention(hidden_size=16, num_heads=2, num_slots=4, fuse_mods=True)
    assert copy.deepcopy(layer).mods.key == pickle.loads(pickle.dumps(layer)).mods.key == layer.mods.key


# --------------------------------------------------------------------------------------------------
# 2. every mod kind in the kernels vs the same function outside them, every gate layout
# --------------------------------------------------------------------------------------------------

def make_inputs(layout, B=1, T=20, HQ=2, H=1, K=8, V=8, M=4, seed=0, raw_gate=False):
    """Float64 leaves requiring grad; g is a raw logit (any sign) when a gate_mod maps it, else <= 0."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)
    q, k, v = r(B, T, HQ, K), r(B, T, H, K), r(B, T, H, V)
    s = r(B, T, H, M) if layout == "abc" else torch.rand(B, T, H, M, generator=gen, dtype=F64)
    g_shape = {"slot": (B, T, H, M), "head": (B, T, H), "decay_head": (H,), "decay_slot": (H, M)}.get(layout)
    g = None if g_shape is None else (2 * r(*g_shape) if raw_gate else -torch.rand(*g_shape, generator=gen, dtype=F64))
    return [x if x is None else x.requires_grad_() for x in (q, k, v, s, g)]


def weighted_loss(o, state, seed=7):
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=F64)).sum()
    return loss + sum((x * torch.randn(x.shape, generator=gen, dtype=F64)).sum() for x in state)


def compare(fused, unfused, leaves, tol=1e-9):
    """fused() and unfused() return (o, final state); compare values and gradients w.r.t. `leaves`."""
    o, state = fused()
    o_ref, state_ref = unfused()
    assert rel(o, o_ref) < tol
    for x, y in zip(state, state_ref):
        assert rel(x, y) < tol
    grads = torch.autograd.grad(weighted_loss(o, state), leaves)
    grads_ref = torch.autograd.grad(weighted_loss(o_ref, state_ref), leaves)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert rel(a, b) < tol, f"gradient {i}: {rel(a, b)}"


@pytest.mark.parametrize("layout", LAYOUTS + ["slot_s_from_gate"])
def test_load_mods_match_the_functions_applied_outside(layout):
    """q_map, k_map, v_map (with a captured learnable scalar) and gate_mod, fused into every program."""
    s_from_gate = layout == "slot_s_from_gate"
    layout = "slot" if s_from_gate else layout
    alpha = torch.tensor([0.7], dtype=F64, requires_grad=True)
    gate_mod = None if layout == "abc" else (lambda f: F.logsigmoid(f) / 4)
    mods = GSAMods(q_map=F.silu, k_map=lambda x: F.elu(x) + 1, v_map=lambda x: alpha * torch.tanh(x),
                   gate_mod=gate_mod, s_from_gate=s_from_gate)
    q, k, v, s, g = make_inputs(layout, raw_gate=gate_mod is not None)
    if s_from_gate:
        s = None
    leaves = [x for x in (q, k, v, s, g, alpha) if x is not None]
    compare(lambda: chunk_gsa(q, k, v, s, g, chunk_size=16, output_final_state=True, mods=mods),
            lambda: recurrent_gsa(*mods.apply(q, k, v, s, g), output_final_state=True), leaves)


def slot_mod_parts(HQ, M, seed=3):
    gen = torch.Generator().manual_seed(seed)
    temperature = (torch.rand(HQ, generator=gen, dtype=F64) + 0.5).requires_grad_()
    bias = torch.randn(M, generator=gen, dtype=F64).requires_grad_()
    keep = torch.rand(HQ, M, generator=gen) > 0.3
    keep[:, 0] = True
    return temperature, bias, keep


@pytest.mark.parametrize("layout", LAYOUTS)
def test_slot_mod_matches_the_reference_with_the_same_function(layout):
    """Temperature per head, soft-capping, a learnable bias per slot, slot masking and a position term."""
    HQ, M = 2, 4
    temperature, bias, keep = slot_mod_parts(HQ, M)

    def slot_mod(logit, b, h, t, m):
        capped = 3 * torch.tanh(logit / temperature[h] / 3) + bias[m] - 0.02 * t
        return torch.where(keep[h, m], capped, float("-inf"))
    mods = GSAMods(slot_mod=slot_mod)
    q, k, v, s, g = make_inputs(layout, HQ=HQ, M=M, seed=1)
    leaves = [x for x in (q, k, v, s, g, temperature, bias) if x is not None]
    compare(lambda: chunk_gsa(q, k, v, s, g, chunk_size=16, output_final_state=True, mods=mods),
            lambda: recurrent_gsa(q, k, v, s, g, output_final_state=True, slot_mod=slot_mod), leaves)


def test_slot_mod_varlen_gqa_initial_state_indexes_sequences_and_positions():
    """b is the sequence of cu_seqlens and t the position inside it, as in the reference."""
    cu = torch.tensor([0, 7, 23], dtype=torch.int32)
    q, k, v, s, g = make_inputs("slot", T=23, HQ=4, H=2, seed=2)
    gen = torch.Generator().manual_seed(4)
    state = [torch.randn(2, 2, 8, 4, generator=gen, dtype=F64).requires_grad_(),
             torch.randn(2, 2, 4, 8, generator=gen, dtype=F64).requires_grad_()]
    per_sequence = torch.tensor([1.5, 0.6], dtype=F64, requires_grad=True)

    def slot_mod(logit, b, h, t, m):
        return logit * per_sequence[b] + torch.where(t < 3, 0.5, 0.0) * (h % 2)
    mods = GSAMods(slot_mod=slot_mod, q_map=F.silu)
    leaves = [q, k, v, s, g, *state, per_sequence]
    compare(lambda: chunk_gsa(q, k, v, s, g, initial_state=state, output_final_state=True, cu_seqlens=cu,
                              chunk_size=16, mods=mods),
            lambda: recurrent_gsa(F.silu(q), k, v, s, g, initial_state=state, output_final_state=True,
                                  cu_seqlens=cu, slot_mod=slot_mod), leaves)


def test_decode_applies_every_mod_kind():
    temperature, _, keep = slot_mod_parts(4, 4)

    def slot_mod(logit, b, h, t, m):
        return torch.where(keep[h, m], logit / temperature[h], -1e4)
    mods = GSAMods(q_map=F.relu, k_map=F.silu, v_map=lambda x: F.elu(x) + 1, gate_mod=lambda f: F.logsigmoid(f) / 8,
                   s_from_gate=True, slot_mod=slot_mod)
    q, k, v, _, f = (x if x is None else x.detach() for x in make_inputs("slot", B=2, T=3, HQ=4, H=2, raw_gate=True))
    gen = torch.Generator().manual_seed(5)
    state = (torch.randn(2, 2, 8, 4, generator=gen), torch.randn(2, 2, 4, 8, generator=gen))
    o, (hk, hv) = recurrent_step(q, k, v, None, f, state=state, mods=mods)
    o_ref, (hk_ref, hv_ref) = recurrent_gsa(*mods.apply(q, k, v, None, f), initial_state=state,
                                            output_final_state=True, slot_mod=slot_mod)
    assert rel(o, o_ref) < 1e-5 and rel(hk, hk_ref) < 1e-5 and rel(hv, hv_ref) < 1e-5
    with pytest.raises(ValueError, match="position t"):
        recurrent_step(q, k, v, torch.rand_like(f), -f.abs(), state=state,
                       mods=GSAMods(slot_mod=lambda x, b, h, t, m: x - t))


def test_invalid_mod_calls_are_refused():
    q, k, v, s, g = (x if x is None else x.detach() for x in make_inputs("head", T=4))
    with pytest.raises(ValueError, match="slot gate layout"):
        chunk_gsa(q, k, v, None, g, mods=GSAMods(s_from_gate=True))
    with pytest.raises(ValueError, match="s must be None"):
        chunk_gsa(q, k, v, s, g[..., None].expand(*g.shape, 4), mods=GSAMods(s_from_gate=True))
    with pytest.raises(ValueError, match="ABC"):
        chunk_gsa(q, k, v, s, None, mods=GSAMods(gate_mod=F.logsigmoid))
    with pytest.raises(TypeError, match="GSAMods"):
        chunk_gsa(q, k, v, s, g, mods=F.silu)


# --------------------------------------------------------------------------------------------------
# 3. kernel cache
# --------------------------------------------------------------------------------------------------

def test_same_mod_never_recompiles_and_different_mods_get_their_own_kernels():
    q, k, v, s, g = (x.detach() for x in make_inputs("slot", T=8))
    first, equal, other = (GSAMods(k_map=lambda x, c=c: F.softplus(x) * c) for c in (2.0, 2.0, 3.0))
    o_first, _ = chunk_gsa(q, k, v, s, g, chunk_size=16, mods=first)
    compiled = set(codegen._MODULES)
    o_equal, _ = chunk_gsa(q, k, v, s, g, chunk_size=16, mods=equal)
    assert set(codegen._MODULES) == compiled and torch.equal(o_first, o_equal)
    o_other, _ = chunk_gsa(q, k, v, s, g, chunk_size=16, mods=other)
    new = set(codegen._MODULES) - compiled
    assert {name for name, _ in new} == {"gate_pass", "state_pass", "output_pass"}
    assert all(spec.mods == other.key for _, spec in new)
    assert rel(o_other, o_first) > 1e-3


def test_codegen_refuses_an_untagged_view_of_a_mapped_input():
    """A program that read q through a View without `tensor` would silently skip q_map: refused."""
    from gsa_compile import ir
    b = ir.Builder()
    b.load("x", ir.View("q_base", "stride_qt", "K"), "t0", "eos", ("BT", "BK"))
    spec = Spec(layout=GateLayout.SLOT, chunk_size=16, dtype="float32", K=8, V=8, M=4, mods=GSAMods(q_map=F.silu).key)
    with pytest.raises(ir.IRError, match="without `tensor`"):
        codegen.render_body(ir.Program("p", [], b.body), spec)


def test_s_from_gate_is_derived_and_stored_by_the_gate_pass_only():
    """The gate map runs in the gate pass (and decode) only: the gate pass derives s from the mapped gate
    (no second load and map of the raw gate) and stores it; the other programs read that copy (or the gate
    pass's w) with no map."""
    from gsa_compile import programs_backward, programs_decode
    gate = GSAMods(q_map=F.silu, gate_mod=lambda f: F.logsigmoid(f) / 8, s_from_gate=True)
    spec = Spec(layout=GateLayout.SLOT, chunk_size=16, dtype="bfloat16", K=8, V=8, M=4, mods=gate.key)
    gates = codegen.source(programs.gate_pass, spec)
    assert kernel_args(gates)[-1] == "mapped_s" and gates.count("tl.store((mapped_s +") == 1
    assert "s_base +" not in gates.split("s_base = s +")[1] and gates.count("tl.log(") == 1  # g read once
    for builder in (programs.state_pass, programs.output_pass, programs_backward.slot_backward,
                    programs_backward.key_backward):
        text = codegen.source(builder, spec)
        assert "tl.log(" not in text and "s_c_raw" not in text and "mapped_s" not in kernel_args(text), builder.__name__
    assert "silu" in gate.description and "sigmoid(" in codegen.source(programs.output_pass, spec)  # q_map on load
    decode = codegen.source(programs_decode.decode_step, Spec(**{**spec.__dict__, "chunk_size": 16}))
    assert decode.count("tl.log(") == 1 and "s_t_raw" not in decode
    for other in (GSAMods(gate_mod=F.logsigmoid), GSAMods(k_map=F.silu)):  # s not mapped: nothing stored
        assert "mapped_s" not in codegen.source(programs.gate_pass, Spec(**{**spec.__dict__, "mods": other.key}))


def kernel_args(source):
    import ast
    return [a.arg for a in next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)).args.args]


def test_s_from_gate_in_bf16_matches_the_unfused_functions():
    """bf16: the stored copy of s (input dtype) and the rounded s of the state pass, against the float64
    reference of the same functions applied outside, forward and gradients."""
    mods = GSAMods(k_map=F.silu, gate_mod=lambda f: F.logsigmoid(f) / 4, s_from_gate=True)
    q, k, v, _, f = (x.detach() for x in make_inputs("slot", T=37, HQ=2, H=1, raw_gate=True) if x is not None)
    low = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v, f)]
    ref = [x.detach().double().requires_grad_() for x in low]
    o, state = chunk_gsa(low[0], low[1], low[2], None, low[3], chunk_size=16, output_final_state=True, mods=mods)
    o_ref, state_ref = recurrent_gsa(*mods.apply(ref[0], ref[1], ref[2], None, ref[3]), output_final_state=True)
    assert rel(o, o_ref) < 3e-2 and all(rel(a, b) < 3e-2 for a, b in zip(state, state_ref))
    grads = torch.autograd.grad(weighted_loss(o.double(), [x.double() for x in state]), low)
    grads_ref = torch.autograd.grad(weighted_loss(o_ref, state_ref), ref)
    for name, a, b in zip("qkvf", grads, grads_ref):
        assert rel(a, b) < 5e-2, (name, rel(a, b))


# --------------------------------------------------------------------------------------------------
# 4. ops, layer, torch.compile
# --------------------------------------------------------------------------------------------------

def test_opcheck_ops_with_mods():
    temperature = torch.tensor([1.3, 0.8], requires_grad=True)
    mods = GSAMods(q_map=F.silu, gate_mod=lambda f: F.logsigmoid(f) / 8, s_from_gate=True,
                   slot_mod=lambda x, b, h, t, m: x / temperature[h])
    q, k, v, _, g = (x.detach().float() for x in make_inputs("slot", T=7, HQ=2, H=2, K=3, V=5, M=2, raw_gate=True)
                     if x is not None)
    params = mods.params(q).detach()
    forward_args = [x.clone().requires_grad_() for x in (q, k, v, g)] + [params.clone().requires_grad_()]
    q_, k_, v_, g_, p_ = forward_args
    torch.library.opcheck(torch.ops.gsa.chunk_forward.default,
                          (q_, k_, v_, g_, g_, 0.5, None, None, None, 16, "slot", mods.key, p_))
    do = torch.randn(1, 7, 2, 5)
    torch.library.opcheck(torch.ops.gsa.chunk_backward.default,
                          (do, None, None, q, k, v, g, g, 0.5, None, None, None, 16, "slot", mods.key, params))
    hk, hv = torch.randn(1, 2, 3, 2), torch.randn(1, 2, 2, 5)
    torch.library.opcheck(torch.ops.gsa.recurrent_step.default,
                          (q[:, :1], k[:, :1], v[:, :1], g[:, :1], g[:, :1], 0.5, hk, hv, "slot", mods.key, params))


CFG = dict(hidden_size=32, num_heads=4, num_kv_heads=2, num_slots=8, use_short_conv=True, conv_bias=True,
           chunk_size=16)


def layer_pair(fuse="all", **overrides):
    torch.manual_seed(0)
    unfused = GatedSlotAttention(**{**CFG, **overrides}, fuse_mods=False)
    fused = GatedSlotAttention(**{**CFG, **overrides}, fuse_mods=fuse)
    fused.load_state_dict(unfused.state_dict())
    return unfused, fused


@pytest.mark.parametrize("fuse", ["gate", "all"])
def test_layer_with_fused_mods_matches_the_unfused_layer(fuse):
    unfused, fused = layer_pair(fuse)
    assert unfused.mods is None and fused.mods is not None
    assert (fused.mods.functions["q_map"] is None) == (fuse == "gate")
    x = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0  # left padding
    outputs, grads, caches = [], [], []
    for layer in (unfused, fused):
        y, cache = layer(x, attention_mask=mask, use_cache=True)
        outputs.append(y)
        caches.append(cache)
        grads.append(torch.autograd.grad((y * y).sum(), [x, *layer.parameters()]))
    assert rel(outputs[1], outputs[0]) < 1e-5
    for (name, _), a, b in zip([("x", None), *unfused.named_parameters()], grads[1], grads[0]):
        assert rel(a, b) < 1e-4, name
    for a, b in zip(caches[1].recurrent_state, caches[0].recurrent_state):
        assert rel(a, b) < 1e-5
    with torch.no_grad():  # one decode step from the caches (recurrent_step with the fused mods)
        x_next = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(2))
        mask_next = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        steps = [layer(x_next, attention_mask=mask_next, cache=c, use_cache=True)[0] for layer, c in
                 zip((unfused, fused), caches)]
    assert rel(steps[1], steps[0]) < 1e-5


def test_layer_t2r_feature_map_fuses_only_its_activation():
    unfused, fused = layer_pair(feature_map="t2r", use_short_conv=False)
    x = torch.randn(1, 17, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(fused(x)[0], unfused(x)[0]) < 1e-5


def test_compiled_layer_with_mods_has_no_graph_breaks():
    from torch._dynamo.utils import counters
    _, fused = layer_pair()
    x = torch.randn(1, 19, 32, generator=torch.Generator().manual_seed(4))

    def loss(layer, x):
        return layer(x)[0].square().mean()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    value = compiled(fused, x)
    grads = torch.autograd.grad(value, list(fused.parameters()))
    value_eager = loss(fused, x)
    grads_eager = torch.autograd.grad(value_eager, list(fused.parameters()))
    assert dict(counters["graph_break"]) == {}
    assert rel(value, value_eager) < 1e-6
    for a, b in zip(grads, grads_eager):
        assert rel(a, b) < 1e-5
    torch._dynamo.reset()


SM90_SCRIPT = r"""
import json
import torch, torch.nn.functional as F
from gsa_compile import GSAMods, programs, programs_backward, programs_decode, resources
from gsa_compile.launch import kernel_constants
from gsa_compile.spec import GateLayout, Spec, TileConfig
temperature, keep = torch.ones(4), torch.ones(4, 64, dtype=torch.bool)
mods = GSAMods(q_map=F.silu, k_map=F.relu, v_map=lambda x: F.elu(x) + 1, gate_mod=lambda f: F.logsigmoid(f) / 8,
               s_from_gate=True, slot_mod=lambda x, b, h, t, m: torch.where(
                   keep[h, m], 5 * torch.tanh(x / temperature[h] / 5) - 0.001 * t, float("-inf")))
spec = Spec(GateLayout.SLOT, 64, "bfloat16", 128, 128, 64, group=2, initial_state=True, final_state=True,
            mods=mods.key)
consts = kernel_constants(spec, TileConfig())
out = {b.__name__: resources.footprint(b, spec, consts[b.__name__]).fits
       for b in programs.FORWARD_PROGRAMS + programs_backward.BACKWARD_PROGRAMS}
decode = GSAMods(q_map=F.silu, gate_mod=F.logsigmoid, s_from_gate=True, slot_mod=lambda x, b, h, t, m: x / temperature[h])
spec = Spec(GateLayout.SLOT, 16, "bfloat16", 128, 128, 64, group=2, initial_state=True, final_state=True, mods=decode.key)
out["decode_step"] = resources.footprint(programs_decode.decode_step, spec,
                                         dict(K=128, V=128, M=64, G=2, BG=2, BK=32, BV=32, BM=64)).fits
print(json.dumps(out))
"""


def test_kernels_with_every_mod_kind_compile_for_sm90():
    """The interpreter is lenient; the GPU frontend is not: every program with mods lowers for Hopper."""
    env = dict(os.environ, TRITON_INTERPRET="0")  # triton.compile for a GPU target needs the interpreter off
    result = subprocess.run([sys.executable, "-c", SM90_SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    fits = json.loads(result.stdout.strip().splitlines()[-1])
    assert fits == {name: True for name in ("gate_pass", "state_pass", "output_pass", "slot_backward",
                                            "state_backward", "key_backward", "decode_step")}
