"""Element-wise expressions of user mods: a small DAG that prints as Triton and evaluates in torch.

A traced mod (mods.py) becomes one `Expr` DAG over its leaves:

    input                  the value being modified (a loaded q/k/v/s/g element, or a slot logit)
    index b | h | t | m    integer positions (slot_mod only)
    const                  a Python number
    param                  an element of a captured tensor, `attr` = (offset, shape, is_bool), its
                           args the index expressions (one per dimension; none for a 1-element tensor)

and operations from `OPS`. Nodes are hash-consed (`Expr(...)` returns the existing node for the same
op, args and attr), so equal subexpressions are one node, identity is equality and `describe()` is a
canonical text (the mods' cache key hashes it). Constant subexpressions fold at construction.

`derivative(root, leaf)` differentiates symbolically (forward mode, with the same op set), which
gives the slot_mod's chain rule inside the kernels and every host-side gradient. `TritonWriter`
emits a DAG as Triton statements (one temporary per operation) and `evaluate` runs it on torch
tensors; both read the same `OPS` table, so the kernels and the host agree by construction.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

INDEX_NAMES = ("b", "h", "t", "m")
LEAF_OPS = ("input", "index", "const", "param")


class Expr:
    """One node; create nodes only through `Expr(op, args, attr)` (hash-consed) or the helpers below."""
    __slots__ = ("args", "attr", "kind", "op")
    _interned: ClassVar[Dict[tuple, Expr]] = {}

    def __new__(cls, op: str, args: Sequence[Expr] = (), attr: tuple = ()):
        args = tuple(args)
        key = (op, tuple(id(a) for a in args), attr, tuple(type(v) for v in attr))  # 2, 2.0 and True differ
        node = cls._interned.get(key)
        if node is None:
            node = super().__new__(cls)
            node.op, node.args, node.attr = op, args, attr
            node.kind = _kind(op, args, attr)
            cls._interned[key] = node
        return node

    def __repr__(self):
        return f"Expr({self.describe()!r})"

    def describe(self) -> str:
        """Canonical text: one line per node in topological order."""
        names: Dict[int, str] = {}
        lines: List[str] = []
        for node in topological(self):
            args = ", ".join(names[id(a)] for a in node.args)
            names[id(node)] = f"%{len(lines)}"
            lines.append(f"%{len(lines)} = {node.op}({args}){node.attr if node.attr else ''}")
        return "; ".join(lines)

    @property
    def value(self):
        return self.attr[0] if self.op == "const" else None


def const(value) -> Expr:
    if isinstance(value, bool):
        return Expr("const", (), (value,))
    if isinstance(value, int):
        return Expr("const", (), (value,))
    return Expr("const", (), (float(value),))


def topological(root: Expr) -> List[Expr]:
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if id(node) in seen:
            continue
        if expanded:
            seen.add(id(node))
            order.append(node)
            continue
        stack.append((node, True))
        stack.extend((a, False) for a in reversed(node.args) if id(a) not in seen)
    return order


# --------------------------------------------------------------------------------------------- ops
# name: (arity, Triton template over {0}, {1}, ... and attr names, torch function(args, attr))

def _softplus_triton(x, beta, threshold):
    y = f"({x} * {beta!r})"
    return f"tl.where({y} > {threshold!r}, {x}, (tl.maximum({y}, 0.0) + tl.log(1.0 + tl.exp(-tl.abs({y})))) / {beta!r})"


def _pow_triton(x, c):
    if c == int(c) and abs(c) <= 3:
        product = " * ".join([x] * int(abs(c))) or "1.0"
        return f"({product})" if c > 0 else f"(1.0 / ({product}))"
    if c == 0.5:
        return f"tl.sqrt({x})"
    if c == int(c):  # |x|^c with the sign of x for odd c
        sign = f" * tl.where({x} < 0, -1.0, 1.0)" if int(c) % 2 else ""
        return f"(tl.exp2({c!r} * tl.log2(tl.abs({x}))){sign})"
    return f"tl.exp2({c!r} * tl.log2({x}))"


def _clamp_triton(x, lo, hi):
    out = x if lo is None else f"tl.maximum({x}, {lo!r})"
    return out if hi is None else f"tl.minimum({out}, {hi!r})"


def _minmax(fn):
    def run(a, b):  # an integer index against a float: compare in the float's dtype
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        dtype = torch.promote_types(a.dtype, b.dtype)
        return fn(a.to(dtype), b.to(dtype))
    return run


OPS: Dict[str, Tuple[int, Callable, Callable]] = {
    "add": (2, lambda a, b: f"({a} + {b})", operator.add),
    "sub": (2, lambda a, b: f"({a} - {b})", operator.sub),
    "mul": (2, lambda a, b: f"({a} * {b})", operator.mul),
    "div": (2, lambda a, b: f"({a} / {b})", operator.truediv),
    "floordiv": (2, lambda a, b: f"({a} // {b})", operator.floordiv),
    "mod": (2, lambda a, b: f"({a} % {b})", operator.mod),
    "neg": (1, lambda a: f"(-{a})", operator.neg),
    "abs": (1, lambda a: f"tl.abs({a})", torch.abs),
    "sign": (1, lambda a: f"tl.where({a} > 0, 1.0, tl.where({a} < 0, -1.0, 0.0))", torch.sign),
    "exp": (1, lambda a: f"tl.exp({a})", torch.exp),
    "log": (1, lambda a: f"tl.log({a})", torch.log),
    "log1p": (1, lambda a: f"tl.log(1.0 + {a})", torch.log1p),
    "expm1": (1, lambda a: f"(tl.exp({a}) - 1.0)", torch.expm1),
    "sqrt": (1, lambda a: f"tl.sqrt({a})", torch.sqrt),
    "rsqrt": (1, lambda a: f"tl.rsqrt({a})", torch.rsqrt),
    "sigmoid": (1, lambda a: f"tl.sigmoid({a})", torch.sigmoid),
    "logsigmoid": (1, lambda a: f"(tl.minimum({a}, 0.0) - tl.log(1.0 + tl.exp(-tl.abs({a}))))", F.logsigmoid),
    "tanh": (1, lambda a: f"(2.0 * tl.sigmoid(2.0 * {a}) - 1.0)", torch.tanh),
    "relu": (1, lambda a: f"tl.maximum({a}, 0.0)", torch.relu),
    "silu": (1, lambda a: f"({a} * tl.sigmoid({a}))", F.silu),
    "elu": (1, lambda a, alpha: f"tl.where({a} > 0, {a}, {alpha!r} * (tl.exp(tl.minimum({a}, 0.0)) - 1.0))",
            lambda a, alpha: F.elu(a, alpha)),
    "softplus": (1, _softplus_triton, lambda a, beta, threshold: F.softplus(a, beta, threshold)),
    "pow": (1, _pow_triton, lambda a, c: torch.pow(a, c)),
    "rpow": (1, lambda a, c: f"tl.exp2({a} * {math.log2(c)!r})", lambda a, c: torch.pow(c, a)),
    "clamp": (1, _clamp_triton, lambda a, lo, hi: torch.clamp(a, lo, hi)),
    "where": (3, lambda c, a, b: f"tl.where({c}, {a}, {b})",
              lambda c, a, b: torch.where(torch.as_tensor(c), a, b)),
    "minimum": (2, lambda a, b: f"tl.minimum({a}, {b})", _minmax(torch.minimum)),
    "maximum": (2, lambda a, b: f"tl.maximum({a}, {b})", _minmax(torch.maximum)),
    "lt": (2, lambda a, b: f"({a} < {b})", operator.lt),
    "le": (2, lambda a, b: f"({a} <= {b})", operator.le),
    "gt": (2, lambda a, b: f"({a} > {b})", operator.gt),
    "ge": (2, lambda a, b: f"({a} >= {b})", operator.ge),
    "eq": (2, lambda a, b: f"({a} == {b})", operator.eq),
    "ne": (2, lambda a, b: f"({a} != {b})", operator.ne),
    "and": (2, lambda a, b: f"({a} & {b})", operator.and_),
    "or": (2, lambda a, b: f"({a} | {b})", operator.or_),
    "not": (1, lambda a: f"({a} == 0)", lambda a: torch.as_tensor(a) == 0),
}
_BOOL_OPS = {"lt", "le", "gt", "ge", "eq", "ne", "and", "or", "not"}
_INT_OPS = {"add", "sub", "mul", "floordiv", "mod", "neg", "abs", "minimum", "maximum", "where"}
_ATTR_NAMES = {"elu": ("alpha",), "softplus": ("beta", "threshold"), "pow": ("c",), "rpow": ("c",),
               "clamp": ("lo", "hi")}


def _kind(op, args, attr) -> str:
    """'float' | 'int' (indices) | 'bool' (conditions) of a node's value."""
    if op == "const":
        return "bool" if isinstance(attr[0], bool) else "int" if isinstance(attr[0], int) else "float"
    if op == "index":
        return "int"
    if op == "param":
        return "bool" if attr[2] else "float"
    if op in _BOOL_OPS:
        return "bool"
    kinds = [a.kind for a in (args[1:] if op == "where" else args)]
    if op in _INT_OPS and all(k in ("int", "bool") for k in kinds):
        return "int"
    return "float"


def op(name: str, *args, **attrs) -> Expr:
    """A node for OPS[name], folding constants; Python numbers in `args` become const nodes."""
    arity = OPS[name][0]
    if len(args) != arity:
        raise TypeError(f"{name} takes {arity} operands, got {len(args)}")
    nodes = tuple(a if isinstance(a, Expr) else const(a) for a in args)
    attr = tuple(attrs[k] for k in _ATTR_NAMES.get(name, ()))
    if name == "pow" and attr[0] in (0, 1):
        return nodes[0] if attr[0] == 1 else const(1.0)
    if _kind(name, nodes, attr) == "float" and name not in _BOOL_OPS:  # integer constants in float maths
        nodes = tuple(const(float(n.value)) if n.op == "const" and n.kind == "int" else n for n in nodes)
    if all(n.op == "const" for n in nodes):
        result = OPS[name][2](*[torch.tensor(n.value, dtype=torch.float64) if n.kind == "float"
                                  else torch.tensor(n.value) for n in nodes], *attr)
        value = result.item()
        return const(value if result.dtype.is_floating_point else bool(value) if result.dtype == torch.bool
                     else int(value))
    return Expr(name, nodes, attr)


# ------------------------------------------------------------------- algebra that keeps DAGs small

def _is(node: Optional[Expr], value) -> bool:
    return node is not None and node.op == "const" and node.value == value


def add(a, b):
    if a is None or _is(a, 0):
        return b
    if b is None or _is(b, 0):
        return a
    return op("add", a, b)


def mul(a, b):
    if a is None or b is None or _is(a, 0) or _is(b, 0):
        return None
    if _is(a, 1):
        return b
    if _is(b, 1):
        return a
    return op("mul", a, b)


def neg(a):
    return None if a is None else op("neg", a)


def sub(a, b):
    return add(a, neg(b))


def div(a, b):
    return None if a is None else op("div", a, b)


def where(cond, a, b):
    if a is None and b is None:
        return None
    return op("where", cond, const(0.0) if a is None else a, const(0.0) if b is None else b)


# ------------------------------------------------------------------------------- differentiation

def _tangent(node: Expr, t: List[Optional[Expr]]) -> Optional[Expr]:
    """d node from the tangents `t` of its operands (None = zero)."""
    a = node.args[0] if node.args else None
    name = node.op
    if name == "add":
        return add(t[0], t[1])
    if name == "sub":
        return sub(t[0], t[1])
    if name == "mul":
        return add(mul(t[0], node.args[1]), mul(node.args[0], t[1]))
    if name == "div":
        return div(sub(t[0], mul(node, t[1])), node.args[1])
    if name == "neg":
        return neg(t[0])
    if all(x is None for x in t):
        return None
    if name == "where":
        return where(node.args[0], t[1], t[2])
    if name in ("minimum", "maximum"):
        first = op("lt" if name == "minimum" else "gt", node.args[0], node.args[1])
        second = op("gt" if name == "minimum" else "lt", node.args[0], node.args[1])
        tie = mul(add(t[0], t[1]), const(0.5))
        return where(first, t[0], where(second, t[1], tie))
    factor = {
        "abs": lambda: op("sign", a),
        "exp": lambda: node,
        "log": lambda: op("div", 1.0, a),
        "log1p": lambda: op("div", 1.0, op("add", a, 1.0)),
        "expm1": lambda: op("add", node, 1.0),
        "sqrt": lambda: op("div", 0.5, node),
        "rsqrt": lambda: op("mul", -0.5, op("pow", node, c=3.0)),
        "sigmoid": lambda: op("mul", node, op("sub", 1.0, node)),
        "logsigmoid": lambda: op("sigmoid", op("neg", a)),
        "tanh": lambda: op("sub", 1.0, op("mul", node, node)),
        "silu": lambda: _silu_slope(a),
        "pow": lambda: op("mul", node.attr[0], op("pow", a, c=node.attr[0] - 1.0)),
        "rpow": lambda: op("mul", node, math.log(node.attr[0])),
    }
    if name in factor:
        return mul(factor[name](), t[0])
    if name == "relu":
        return where(op("gt", a, 0.0), t[0], None)
    if name == "elu":
        return where(op("gt", a, 0.0), t[0], mul(mul(const(node.attr[0]), op("exp", op("minimum", a, 0.0))), t[0]))
    if name == "softplus":
        beta, threshold = node.attr
        y = op("mul", a, beta)
        return where(op("gt", y, threshold), t[0], mul(op("sigmoid", y), t[0]))
    if name == "clamp":
        lo, hi = node.attr
        inside = None
        for bound, cmp in ((lo, "ge"), (hi, "le")):
            if bound is not None:
                test = op(cmp, a, bound)
                inside = test if inside is None else op("and", inside, test)
        return t[0] if inside is None else where(inside, t[0], None)
    return None  # comparisons, logic, integer index arithmetic, sign: zero derivative


def _silu_slope(a):
    s = op("sigmoid", a)
    return op("mul", s, op("add", 1.0, op("mul", a, op("sub", 1.0, s))))


@functools.cache  # nodes are interned: identity is equality
def derivative(root: Expr, leaf: Expr) -> Expr:
    """d root / d leaf as an Expr (const 0.0 when root does not depend on it)."""
    tangents: Dict[int, Optional[Expr]] = {}
    for node in topological(root):
        if node is leaf:
            tangents[id(node)] = const(1.0)
        elif node.op in LEAF_OPS or node.kind != "float":
            tangents[id(node)] = None
        else:
            tangents[id(node)] = _tangent(node, [tangents[id(a)] for a in node.args])
    result = tangents[id(root)]
    return const(0.0) if result is None else result


def params_of(root: Expr) -> List[Expr]:
    """The float captured-tensor leaves of a DAG (those with gradients), in a stable order."""
    return [n for n in topological(root) if n.op == "param" and not n.attr[2]]


def uses_index(root: Expr, name: str) -> bool:
    return any(n.op == "index" and n.attr[0] == name for n in topological(root))


# ---------------------------------------------------------------------------------------- Triton

class TritonWriter:
    """Emits DAGs as Triton statements into `lines`; temporaries are `<prefix><n>`.

    `leaves` maps "input" and the index names to Triton expressions; `params` is the kernel argument
    holding the captured tensors (flattened, in the accumulator type)."""

    def __init__(self, prefix: str, leaves: Dict[str, str], params: str = "mod_params"):
        self.prefix, self.leaves, self.params = prefix, leaves, params
        self.lines: List[str] = []
        self._names: Dict[int, str] = {}

    def __call__(self, root: Expr) -> str:
        for node in topological(root):
            if id(node) not in self._names:
                self._names[id(node)] = self._emit(node)
        return self._names[id(root)]

    def _emit(self, node: Expr) -> str:
        if node.op == "const":
            value = node.value
            return f"float('{value}')" if isinstance(value, float) and not math.isfinite(value) else repr(value)
        if node.op in ("input", "index"):
            key = "input" if node.op == "input" else node.attr[0]
            if key not in self.leaves:
                raise ValueError(f"this kernel has no value for the mod argument {key!r}")
            return f"({self.leaves[key]})"
        args = [self._names[id(a)] for a in node.args]
        if node.op == "param":
            text = self._param(node, args)
        else:
            text = OPS[node.op][1](*args, *node.attr)
        name = f"{self.prefix}{len(self.lines)}"
        self.lines.append(f"{name} = {text}")
        return name

    def _param(self, node, index):
        offset, shape, is_bool = node.attr
        strides = _contiguous_strides(shape)
        position = " + ".join([str(offset)] + [f"({i}) * {s}" for i, s in zip(index, strides)])
        mask = " & ".join(f"(({i}) >= 0) & (({i}) < {n})" for i, n in zip(index, shape))
        load = f"tl.load({self.params} + {position}" + (f", mask={mask}, other=0.0)" if mask else ")")
        return f"({load} != 0)" if is_bool else load


def _contiguous_strides(shape) -> List[int]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return strides[::-1]


# ----------------------------------------------------------------------------------------- torch

def evaluate(root: Expr, leaves: Dict[str, torch.Tensor], params: Optional[torch.Tensor]):
    """The DAG on torch tensors: `leaves` holds "input" and the index tensors (broadcastable),
    `params` the flat captured values. Float results are in the input's dtype."""
    values: Dict[int, object] = {}
    dtype, device = leaves["input"].dtype, leaves["input"].device
    for node in topological(root):
        if node.op == "const":  # floats as tensors of the input's dtype (torch.full: no host-to-device copy)
            values[id(node)] = torch.full((), node.value, dtype=dtype, device=device) if node.kind == "float" \
                else node.value
        elif node.op == "input":
            values[id(node)] = leaves["input"]
        elif node.op == "index":
            values[id(node)] = leaves[node.attr[0]]
        elif node.op == "param":
            values[id(node)] = _gather(node, [values[id(a)] for a in node.args], params, dtype)
        else:
            values[id(node)] = OPS[node.op][2](*[values[id(a)] for a in node.args], *node.attr)
    out = values[id(root)]
    return out.to(dtype) if root.kind == "float" else out


def _flat_position(offset, shape, index):
    """(position in the flat captured values, in range) for index tensors, one per dimension."""
    index = torch.broadcast_tensors(*[i.long() for i in index])
    valid = torch.ones_like(index[0], dtype=torch.bool)
    position = torch.full_like(index[0], offset)
    for i, n, stride in zip(index, shape, _contiguous_strides(shape)):
        valid = valid & (i >= 0) & (i < n)
        position = position + i.clamp(0, n - 1) * stride
    return position, valid


def _gather(node, index, params, dtype):
    offset, shape, is_bool = node.attr
    if not index:
        value = params[offset].to(dtype)
    else:
        position, valid = _flat_position(offset, shape, [_index_tensor(i, params.device) for i in index])
        value = torch.where(valid, params[position].to(dtype), torch.zeros((), dtype=dtype, device=params.device))
    return value != 0 if is_bool else value


def scatter_index(node: Expr, leaves: Dict[str, torch.Tensor], device):
    """(flat positions, in range) of a param leaf for index tensors `leaves` (its gradient's destination)."""
    offset, shape, _ = node.attr
    if not node.args:
        return _index_tensor(offset, device), torch.full((), True, device=device)
    index = [_index_tensor(evaluate(a, {"input": torch.zeros((), device=device), **leaves}, None), device)
             for a in node.args]
    return _flat_position(offset, shape, index)


def _index_tensor(index, device):
    return index if isinstance(index, torch.Tensor) else torch.full((), index, dtype=torch.long, device=device)
