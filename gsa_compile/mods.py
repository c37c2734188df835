"""FlexAttention-style mods: user functions traced with torch.fx and fused into the generated kernels.

    temperature = torch.nn.Parameter(torch.ones(HQ))
    mods = GSAMods(q_map=F.silu, k_map=F.silu, v_map=F.silu,
                   gate_mod=lambda f: F.logsigmoid(f) / 8, s_from_gate=True,
                   slot_mod=lambda logit, b, h, t, m: logit / temperature[h])
    o, _ = chunk_gsa(q, k, v, None, f, mods=mods)       # == chunk_gsa(silu(q), silu(k), silu(v), s, g)
                                                        #    with g = logsigmoid(f) / 8, s = 1 - exp(g)

Where each mod applies (every program: forward, backward and decode, with no edit of the programs):

    q_map, k_map, v_map   every load of q, k, v is mapped element-wise (IR views name the tensor they read)
    gate_mod(g)           every load of the gate: the log forget gate is gate_mod(g), for any layout but ABC
                          (only the gate pass and decode load g; the other programs read its cumsum gc)
    s_from_gate=True      s is not an input: s = 1 - exp(gate_mod(g)) (slot layout only, where s and g share
                          [B, T, H, M]). The gate pass derives s from the gate tile it mapped (an IR `Derive`)
                          and stores it (`STORED_MAPS`); the output pass and the backward read that copy as is
    slot_mod(logit, b, h, t, m)
                          the natural-unit slot logits scale * Hk^T q, before the softmax over slots;
                          b: the sequence (batch row, or sequence of cu_seqlens), h: the query head,
                          t: the position in the sequence (not available in decode), m: the slot

Each function is traced once, at construction, into an element-wise `Expr` DAG (mod_expr.py) that
codegen prints as Triton. Supported: arithmetic, neg, abs, exp, log, log1p, expm1, sqrt, rsqrt, sigmoid,
logsigmoid, tanh, relu, silu, elu, softplus, where, minimum, maximum, clamp, comparisons, logical
and/or/not, pow with a constant, zeros/ones/full_like, dtype casts (ignored: mods compute in the
accumulator type, float32, and the kernels round mapped q, k, v to the input dtype), and captured tensors: one-element tensors anywhere,
larger ones indexed by the index arguments (and integers) with one index per dimension, in slot_mod.
Anything else raises TypeError naming the op. Captured tensors reach the kernels flattened into one
`mod_params` argument (the op's `mod_params` input), so their gradients flow back through autograd.

The cache key (`GSAMods.key`, part of the kernels' Spec) hashes the canonical text of the DAGs, which
includes captured tensors' shapes but not their values: equal functions share kernels, different ones
never do. The ops take the key as a `str` and look the traced mods up in a process-wide registry.

Gradients: the kernels return gradients w.r.t. the mapped q, k, v, s, g; the host applies each map's
symbolic derivative (element-wise torch). slot_mod's chain rule runs inside slot_backward (it turns
dL/d modded logits into dL/d logits before anything else reads them), which also stores, per float
captured leaf, dL/d modded logit * d slot_mod / d leaf; the host scatters those into the parameters.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import math
import operator
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx

from . import mod_expr
from .mod_expr import Expr, derivative, evaluate, op, params_of, scatter_index
from .spec import GateLayout

LOAD_MODS = ("q_map", "k_map", "v_map", "gate_mod")
# Mapped inputs the gate pass stores ([B, T, H, cols], the input dtype) for the later programs (output pass,
# slot and key backward), which then load the copy with no map. Only s: it is loaded 2-3 times per chunk and
# query head after the gate pass, and with s_from_gate its map costs a logsigmoid and an exp per element. g needs
# no copy (the later programs read its cumsum gc); q, k, v are mapped on load everywhere (each element is loaded
# by 1 + G programs in the forward: a stored copy would trade one HBM write for G maps; bench/NOTES.md).
STORED_MAPS = ("s",)
_ARITY = {"q_map": 1, "k_map": 1, "v_map": 1, "gate_mod": 1, "slot_mod": 5}


# ----------------------------------------------------------------------------------------- tracing

class _Tracer(fx.Tracer):
    """Records every tensor the function touches (closure variables, module parameters) as `captured_i`."""

    def __init__(self):
        super().__init__()
        self.captured: List[torch.Tensor] = []

    def create_arg(self, a):
        if isinstance(a, torch.Tensor):
            for i, c in enumerate(self.captured):
                if c is a:
                    break
            else:
                i = len(self.captured)
                self.captured.append(a)
            return self.create_node("get_attr", f"captured_{i}", (), {})
        return super().create_arg(a)

    def call_module(self, m, forward, args, kwargs):
        return forward(*args, **kwargs)  # inline nn.Modules (nn.SiLU(), a user module's forward)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val


def _trace(role: str, fn: Callable) -> Tuple[fx.Graph, List[torch.Tensor]]:
    if not callable(fn):
        raise TypeError(f"{role} must be a callable, got {type(fn).__name__}")
    names = ("x",) if _ARITY[role] == 1 else ("logit", "b", "h", "t", "m")
    try:
        inspect.signature(fn).bind(*names)
    except TypeError as error:
        raise TypeError(f"{role} must be callable as {role}({', '.join(names)}): {error}") from error
    except ValueError:
        pass  # builtins without a signature: called as below anyway

    def unary(x):
        return fn(x)

    def slot(logit, b, h, t, m):
        return fn(logit, b, h, t, m)

    tracer = _Tracer()
    try:
        graph = tracer.trace(unary if _ARITY[role] == 1 else slot)
    except Exception as error:  # control flow on values, Python math on tensors, ...
        raise TypeError(f"{role} could not be traced by torch.fx ({type(error).__name__}: {error}); a mod must "
                        f"be an element-wise function of its arguments without data-dependent control flow") from error
    return graph, tracer.captured


class _Captured:
    """A captured tensor before it is indexed: (offset in mod_params, shape, is bool)."""

    def __init__(self, offset, tensor):
        self.offset, self.shape, self.is_bool = offset, tuple(tensor.shape), tensor.dtype == torch.bool

    def leaf(self, index: Tuple, role: str) -> Expr:
        if len(index) != len(self.shape):
            if not index and math.prod(self.shape) == 1:
                return Expr("param", (), (self.offset, (), self.is_bool))
            raise ValueError(f"{role}: a captured tensor of shape {self.shape} must be indexed with one index per "
                             f"dimension (got {len(index)}) to stay element-wise")
        args = []
        for i in index:
            node = i if isinstance(i, Expr) else mod_expr.const(i) if isinstance(i, int) else None
            if node is None or node.kind != "int":
                raise TypeError(f"{role}: captured tensors can be indexed only by the index arguments (b, h, t, m), "
                                f"integer arithmetic on them and integers; got {type(i).__name__}")
            args.append(node)
        return Expr("param", args, (self.offset, self.shape, self.is_bool))


# fx targets -> (op name, parameter names with defaults)
_UNARY_NAMES = ("neg", "abs", "exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "sigmoid", "tanh", "relu",
                "logical_not", "sign")
_BINARY_NAMES = ("add", "sub", "mul", "div", "minimum", "maximum", "lt", "le", "gt", "ge", "eq", "ne",
                 "logical_and", "logical_or", "pow")
_ALIASES = {"subtract": "sub", "multiply": "mul", "true_divide": "div", "divide": "div", "negative": "neg",
            "clip": "clamp", "expit": "sigmoid", "logical_not": "not", "logical_and": "and", "logical_or": "or",
            "greater": "gt", "less": "lt", "greater_equal": "ge", "less_equal": "le", "not_equal": "ne",
            "truediv": "div", "and_": "and", "or_": "or", "invert": "not", "log_sigmoid": "logsigmoid"}
_CASTS = {"float", "double", "half", "bfloat16", "to", "type_as", "contiguous"}
_FUNCTIONS: Dict[object, str] = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
    operator.floordiv: "floordiv", operator.mod: "mod", operator.neg: "neg", operator.pos: "pos",
    operator.abs: "abs", operator.pow: "pow", operator.lt: "lt", operator.le: "le", operator.gt: "gt",
    operator.ge: "ge", operator.eq: "eq", operator.ne: "ne", operator.and_: "and", operator.or_: "or",
    operator.invert: "not", operator.getitem: "getitem",
    F.relu: "relu", F.silu: "silu", F.elu: "elu", F.softplus: "softplus", F.logsigmoid: "logsigmoid",
    torch.special.expit: "sigmoid", torch.where: "where", torch.clamp: "clamp", torch.clip: "clamp",
    torch.clamp_min: "clamp_min", torch.clamp_max: "clamp_max", torch.square: "square",
    torch.zeros_like: "zeros_like", torch.ones_like: "ones_like", torch.full_like: "full_like",
}
for _name in _UNARY_NAMES + _BINARY_NAMES + ("subtract", "multiply", "true_divide", "divide", "negative",
                                             "greater", "less", "greater_equal", "less_equal", "not_equal"):
    _FUNCTIONS[getattr(torch, _name)] = _ALIASES.get(_name, _name)

_SIGNATURES = {  # op -> parameter names (defaults after '=')
    **{name: ("input",) for name in ("neg", "pos", "abs", "exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "sigmoid",
                                      "tanh", "not", "sign", "square")},
    **{name: ("input", "other") for name in ("mul", "minimum", "maximum", "lt", "le", "gt", "ge", "eq", "ne", "and",
                                              "or", "floordiv", "mod")},
    "add": ("input", "other", "alpha=1"), "sub": ("input", "other", "alpha=1"),
    "div": ("input", "other", "rounding_mode=None"), "pow": ("input", "exponent"),
    "relu": ("input", "inplace=False"), "silu": ("input", "inplace=False"),
    "elu": ("input", "alpha=1.0", "inplace=False"), "softplus": ("input", "beta=1.0", "threshold=20.0"),
    "logsigmoid": ("input",), "where": ("condition", "input", "other"),
    "clamp": ("input", "min=None", "max=None"), "clamp_min": ("input", "min"), "clamp_max": ("input", "max"),
    "getitem": ("input", "index"), "zeros_like": ("input", "dtype=None"), "ones_like": ("input", "dtype=None"),
    "full_like": ("input", "fill_value", "dtype=None"),
}
SUPPORTED = sorted(set(_SIGNATURES) - {"getitem", "pos"})


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    module = getattr(node.target, "__module__", None) or ""
    name = getattr(node.target, "__name__", str(node.target))
    return f"{module}.{name}" if module and module != "_operator" else name


def _bind(role, node, name, args, kwargs) -> Dict[str, object]:
    params = _SIGNATURES[name]
    bound = {}
    for spec in params:
        key, _, default = spec.partition("=")
        if default:
            bound[key] = ast.literal_eval(default)
    names = [p.partition("=")[0] for p in params]
    if len(args) > len(names):
        raise TypeError(f"{role}: {_target_name(node)} got {len(args)} positional arguments, expected {len(names)}")
    bound.update(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"{role}: {_target_name(node)} got the unsupported keyword argument {key!r}")
        bound[key] = value
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"{role}: {_target_name(node)} is missing {missing}")
    return bound


def _scalar(role, what, value):
    if isinstance(value, Expr) and value.op == "const":
        return value.value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise TypeError(f"{role}: {what} must be a Python number, got {type(value).__name__}")


def _as_expr(role, value) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, _Captured):
        return value.leaf((), role)
    if isinstance(value, (bool, int, float)):
        return mod_expr.const(value)
    raise TypeError(f"{role}: unsupported value of type {type(value).__name__} in a mod")


def _apply(role: str, node: fx.Node, name: str, a: Dict[str, object]) -> Expr:
    """One fx call as an Expr, from its bound arguments."""
    if name == "getitem":
        if not isinstance(a["input"], _Captured):
            raise TypeError(f"{role}: indexing ({_target_name(node)}) applies only to captured tensors; indexing the "
                            f"mod's input is not element-wise")
        index = a["index"] if isinstance(a["index"], tuple) else (a["index"],)
        return a["input"].leaf(index, role)
    x = {k: _as_expr(role, v) if k in ("input", "other", "condition") else v for k, v in a.items()}
    if name in ("add", "sub"):
        other = x["other"] if a["alpha"] == 1 else op("mul", x["other"], _scalar(role, "alpha", a["alpha"]))
        return op(name, x["input"], other)
    if name == "div":
        if a["rounding_mode"] is not None:
            raise TypeError(f"{role}: {_target_name(node)} with rounding_mode={a['rounding_mode']!r} is not supported")
        return op("div", x["input"], x["other"])
    if name == "pow":
        exponent, base = a["exponent"], x["input"]
        if isinstance(exponent, (int, float)) or (isinstance(exponent, Expr) and exponent.op == "const"):
            return op("pow", base, c=float(_scalar(role, "the exponent", exponent)))
        if base.op == "const" and base.value > 0:
            return op("rpow", _as_expr(role, exponent), c=float(base.value))
        raise TypeError(f"{role}: {_target_name(node)} needs a constant exponent (or a positive constant base)")
    if name == "pos":
        return x["input"]
    if name in ("zeros_like", "ones_like", "full_like"):  # a constant broadcast like the input
        return mod_expr.const(float({"zeros_like": 0.0, "ones_like": 1.0}.get(name, a.get("fill_value"))))
    if name == "square":
        return op("mul", x["input"], x["input"])
    if name in ("relu", "silu", "logsigmoid"):
        return op(name, x["input"])
    if name == "elu":
        return op("elu", x["input"], alpha=float(_scalar(role, "elu's alpha", a["alpha"])))
    if name == "softplus":
        return op("softplus", x["input"], beta=float(_scalar(role, "softplus' beta", a["beta"])),
                  threshold=float(_scalar(role, "softplus' threshold", a["threshold"])))
    if name in ("clamp", "clamp_min", "clamp_max"):
        lo, hi = a.get("min"), a.get("max")
        out = x["input"]
        if all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
            return op("clamp", out, lo=None if lo is None else float(lo), hi=None if hi is None else float(hi))
        if lo is not None:
            out = op("maximum", out, _as_expr(role, lo))
        return out if hi is None else op("minimum", out, _as_expr(role, hi))
    if name == "where":
        return op("where", x["condition"], x["input"], x["other"])
    return op(name, *(x[k] for k in ("input", "other") if k in x))


def _to_expr(role: str, graph: fx.Graph, captured: Dict[int, _Captured]) -> Expr:
    leaves = [Expr("input")] + [Expr("index", (), (n,)) for n in mod_expr.INDEX_NAMES]
    env: Dict[fx.Node, object] = {}
    placeholders = iter(leaves)
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "get_attr":
            env[node] = captured[int(node.target.rsplit("_", 1)[1])]
        elif node.op == "output":
            result = _as_expr(role, fx.node.map_arg(node.args[0], env.__getitem__))
            if result.kind != "float":
                raise TypeError(f"{role} must return a floating-point value, got a {result.kind} expression")
            return result
        else:
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if node.op == "call_method" and node.target in _CASTS:
                env[node] = args[0]
                continue
            raw = node.target if node.op == "call_method" else _FUNCTIONS.get(node.target)
            if isinstance(raw, str) and raw.startswith("__") and raw.endswith("__"):  # Tensor dunders
                raw = raw[2:-2]
                if raw.startswith("r") and _ALIASES.get(raw[1:], raw[1:]) in _SIGNATURES and raw != "rsqrt":
                    raw, args = raw[1:], (args[1], args[0]) + tuple(args[2:])  # reflected: other <op> self
                raw = {"and": "and_", "or": "or_", "getitem": "getitem"}.get(raw, raw)
            name = _ALIASES.get(raw, raw) if isinstance(raw, str) else None
            if name not in _SIGNATURES or node.op not in ("call_function", "call_method"):
                raise TypeError(f"{role} uses {_target_name(node)}, which is not supported in a mod: mods must be "
                                f"element-wise functions of {', '.join(SUPPORTED)}")
            if name == "where" and node.op == "call_method":  # x.where(condition, y)
                args = (args[1], args[0]) + tuple(args[2:])
            env[node] = _apply(role, node, name, _bind(role, node, name, args, kwargs))
    raise TypeError(f"{role} has no output")


# ---------------------------------------------------------------------------------- traced mods

class TracedMods:
    """What the kernels and the host need of a GSAMods: the DAGs, by the tensor each load mod maps."""

    def __init__(self, key: str, loads: Dict[str, Expr], slot: Optional[Expr], n_params: int,
                 derived: Optional[Dict[str, Tuple[str, Expr]]] = None):
        self.key, self.loads, self.slot, self.n_params = key, loads, slot, n_params
        self.slot_leaves: List[Expr] = params_of(slot) if slot is not None else []
        # tensor -> (the input it derives from, its value as an Expr of that input's mapped value)
        self.derived: Dict[str, Tuple[str, Expr]] = derived or {}
        self.stored: Tuple[str, ...] = tuple(name for name in STORED_MAPS if name in loads)

    def kernel_params(self, with_terms: bool, stores: Tuple[str, ...] = ()) -> List[str]:
        """Extra kernel arguments: the flat captured values, slot_backward's leaf-gradient terms, and the
        buffers `mapped_<tensor>` the gate pass stores mapped inputs to."""
        return ((["mod_params"] if self.n_params else []) + (["mod_terms"] if with_terms and self.slot_leaves else [])
                + [f"mapped_{name}" for name in stores])

    def raw_gradients(self, raw: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor], params, terms, cu_seqlens):
        """Gradients w.r.t. the raw inputs and the flat captured values, from the kernels' gradients w.r.t.
        the mapped inputs (`grads`, by tensor name) and slot_backward's parameter terms (or None)."""
        device = grads["q"].device
        dparams = torch.zeros(self.n_params, device=device, dtype=params.dtype if params is not None else torch.float32)
        out = dict(grads)
        for name, fn in self.loads.items():
            acc = torch.float64 if raw[name].dtype == torch.float64 else torch.float32
            x, grad = raw[name].to(acc), grads[name].to(acc)
            out[name] = (grad * evaluate(derivative(fn, Expr("input")), {"input": x}, params)).to(grads[name].dtype)
            for leaf in params_of(fn):
                contribution = (grad * evaluate(derivative(fn, leaf), {"input": x}, params)).sum()
                dparams = _accumulate(dparams, leaf, {}, contribution)
        if terms is not None:
            B, T, HQ, _, M = terms.shape
            grids = slot_index_grids(B, T, HQ, M, cu_seqlens, device)
            for j, leaf in enumerate(self.slot_leaves):
                dparams = _accumulate(dparams, leaf, grids, terms[:, :, :, j, :])
        return out, dparams


def _accumulate(dparams, leaf: Expr, grids, contribution):
    position, valid = scatter_index(leaf, grids, dparams.device)
    position, valid, contribution = torch.broadcast_tensors(position, valid, contribution)
    values = torch.where(valid, contribution, torch.zeros_like(contribution)).to(dparams.dtype)
    return dparams.index_put((position.reshape(-1),), values.reshape(-1), accumulate=True)


def slot_index_grids(B, T, HQ, M, cu_seqlens, device) -> Dict[str, torch.Tensor]:
    """b (sequence), t (position in it), h, m as broadcastable [B, T, HQ, M] index tensors."""
    positions = torch.arange(T, device=device)
    if cu_seqlens is None:
        b, t = torch.arange(B, device=device)[:, None].expand(B, T), positions[None, :].expand(B, T)
    else:
        seq = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
        b, t = seq[None, :], (positions - cu_seqlens[seq].long())[None, :]
    return {"b": b[:, :, None, None], "t": t[:, :, None, None],
            "h": torch.arange(HQ, device=device)[None, None, :, None], "m": torch.arange(M, device=device)}


_REGISTRY: Dict[str, TracedMods] = {}


def lookup(key: str) -> Optional[TracedMods]:
    """The traced mods of a Spec's `mods` key ('' = none)."""
    if not key:
        return None
    if key not in _REGISTRY:
        raise KeyError(f"no traced mods with key {key!r} in this process: build the GSAMods before calling the ops")
    return _REGISTRY[key]


class GSAMods:
    """User mods for chunk_gsa / recurrent_step / the layer; traced at construction (see the module doc)."""

    def __init__(self, q_map: Optional[Callable] = None, k_map: Optional[Callable] = None,
                 v_map: Optional[Callable] = None, gate_mod: Optional[Callable] = None,
                 slot_mod: Optional[Callable] = None, s_from_gate: bool = False):
        self.functions = dict(q_map=q_map, k_map=k_map, v_map=v_map, gate_mod=gate_mod, slot_mod=slot_mod)
        self.s_from_gate = bool(s_from_gate)
        traced = {role: _trace(role, fn) for role, fn in self.functions.items() if fn is not None}
        captured: List[torch.Tensor] = []  # every tensor once, in order of first use
        for _, tensors in traced.values():
            captured += [t for t in tensors if not any(t is c for c in captured)]
        offsets, total = [], 0
        for c in captured:
            offsets.append(total)
            total += c.numel()

        def slots(tensors):
            return {i: _Captured(offsets[next(j for j, c in enumerate(captured) if c is t)], t)
                    for i, t in enumerate(tensors)}
        exprs = {role: _to_expr(role, graph, slots(tensors)) for role, (graph, tensors) in traced.items()}
        loads = {name: exprs[role] for name, role in (("q", "q_map"), ("k", "k_map"), ("v", "v_map"),
                                                      ("g", "gate_mod")) if role in exprs}
        derived = {}
        if self.s_from_gate:
            gate = exprs.get("gate_mod", Expr("input"))
            loads["s"] = op("sub", 1.0, op("exp", gate))
            derived["s"] = ("g", op("sub", 1.0, op("exp", Expr("input"))))  # the same, from the mapped gate
        self.captured: Tuple[torch.Tensor, ...] = tuple(captured)
        self.slot_uses_t = "slot_mod" in exprs and mod_expr.uses_index(exprs["slot_mod"], "t")
        text = "\n".join([f"s_from_gate={self.s_from_gate}"] + [f"{role}: {exprs[role].describe()}" for role in sorted(exprs)])
        self.key = "m" + hashlib.sha256(text.encode()).hexdigest()[:16]
        self.description = text
        self.traced = _REGISTRY.setdefault(self.key, TracedMods(self.key, loads, exprs.get("slot_mod"), total,
                                                                 derived))

    def __repr__(self):
        given = [role for role, fn in self.functions.items() if fn is not None]
        return f"GSAMods({', '.join(given)}{', s_from_gate' if self.s_from_gate else ''}; key={self.key})"

    def __reduce__(self):  # picklable/deep-copyable when its functions are: retraced on load
        return (_rebuild, (self.functions, self.s_from_gate))

    def params(self, like: torch.Tensor) -> Optional[torch.Tensor]:
        """The captured tensors flattened into one vector in the accumulator type of `like` (differentiable)."""
        if not self.captured:
            return None
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return torch.cat([c.reshape(-1).to(device=like.device, dtype=dtype) for c in self.captured])

    def check(self, layout, decode: bool = False):
        """ValueError where a mod cannot apply to this call's gate layout (or to decode)."""
        has_gate = self.functions["gate_mod"] is not None
        if layout is GateLayout.ABC and (has_gate or self.s_from_gate):
            raise ValueError("gate_mod and s_from_gate need a gate g; the ABC layout (g=None) has none")
        if self.s_from_gate and layout is not GateLayout.SLOT:
            raise ValueError(f"s_from_gate needs the slot gate layout (g [B, T, H, M], the shape of s); got "
                             f"layout {layout.value!r}")
        if decode and self.slot_uses_t:
            raise ValueError("slot_mod uses the position t, which recurrent_step does not know: decode with "
                             "chunk_gsa, or write the slot_mod without t")

    def apply(self, q, k, v, s, g):
        """The same functions applied outside the kernels, in torch (the unfused equivalent of the load mods)."""
        fn = self.functions
        q, k, v = (x if f is None else f(x) for x, f in ((q, fn["q_map"]), (k, fn["k_map"]), (v, fn["v_map"])))
        if fn["gate_mod"] is not None:
            g = fn["gate_mod"](g)
        if self.s_from_gate:
            s = 1 - torch.exp(g)
        return q, k, v, s, g


def _rebuild(functions, s_from_gate):
    return GSAMods(**functions, s_from_gate=s_from_gate)


def slot_leaf_count(key: str) -> int:
    traced = lookup(key)
    return len(traced.slot_leaves) if traced is not None else 0


def stored(key: str) -> Tuple[str, ...]:
    """The inputs whose mapped value the gate pass stores for the later programs under a Spec's `mods` key."""
    traced = lookup(key)
    return traced.stored if traced is not None else ()


def derived_from(key: str, tensor: str) -> Optional[str]:
    """The input that `tensor` is derived from under a Spec's `mods` key (s_from_gate: s from g), or None."""
    traced = lookup(key)
    return traced.derived[tensor][0] if traced is not None and tensor in traced.derived else None
