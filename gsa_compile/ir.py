"""A small typed tile IR: each node computes one named tile; codegen prints one Triton line per node.

Tiles have a symbolic shape made of block sizes (`BC`, `BK`, `BM`, `BV`, ...) and a dtype: `f32`
(the accumulator type: float32, or float64 for float64 inputs under the interpreter), `f64` (float64
always: the gate gradient's sums over a sequence's chunks), `in` (the kernel's input element type), `i1`
(masks), `i64` (scalars). Global tensors are seen through `View`s:
2-D row-major windows `[rows, cols]` whose base pointer the kernel frame computes per program.

    hk: [BK, BM] f32 = zeros
    k: [BC, BK] in = load k_view[t0 : t0+BC (< t_end), k0 : k0+BK]
    hk = dot(trans(k), w) + hk

`Program.verify()` checks every node's operands exist, their shapes agree and none is a stale Tile (one
whose name was assigned again since) before codegen.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import List, Optional, Sequence, Tuple

Shape = Tuple[str, ...]


class IRError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Tile:
    name: str
    shape: Shape
    dtype: str  # "f32" | "f64" | "in" | "i1" | "i32" | "i64"

    def __str__(self):
        return f"{self.name}: [{', '.join(self.shape)}] {self.dtype}"


@dataclasses.dataclass(frozen=True)
class View:
    """A 2-D window of a global tensor: element (r, c) is at base + r * row_stride + c * col_stride."""
    name: str  # the base-pointer variable set up by the kernel frame
    row_stride: str
    col_limit: str  # columns >= col_limit are masked (K, V or M)
    col_stride: str = "1"
    tensor: str = ""  # the kernel input it reads (q, k, v, s, g, ...): codegen applies the Spec's load mods
    mapped: bool = False  # it holds `tensor` already mapped (the state pass's stored copy): no load mod applies


def broadcast(shapes: Sequence[Shape]) -> Shape:
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        dims = {s[axis] for s in shapes if len(s) == rank and s[axis] != "1"}
        if any(len(s) not in (0, rank) for s in shapes):
            raise IRError(f"rank mismatch in broadcast of {list(shapes)}")
        if len(dims) > 1:
            raise IRError(f"incompatible dims {sorted(dims)} on axis {axis} in {list(shapes)}")
        out.append(dims.pop() if dims else "1")
    return tuple(out)


def defined(node) -> Optional[Tile]:
    """The tile a node defines (loads, maths), or None (stores, loops)."""
    return getattr(node, "out", None)


class Node:
    def operands(self) -> List[Tile]:
        return []

    def result_shape(self) -> Optional[Shape]:
        return None

    def check(self):
        shape = self.result_shape()
        if shape is not None and defined(self) is not None and tuple(shape) != tuple(self.out.shape):
            raise IRError(f"{self.describe()}: result shape {shape} != declared {self.out.shape}")


@dataclasses.dataclass
class Zeros(Node):
    out: Tile

    def describe(self):
        return f"{self.out} = zeros"


@dataclasses.dataclass
class Load(Node):
    """out[r, c] = view[row0 + r, col0 + c] for row0 + r < row_end; a 1-D out loads the single row `row0`."""
    out: Tile
    view: View
    row0: str
    row_end: str
    col0: str = "0"
    other: str = "0.0"

    def describe(self):
        rows = self.row0 if len(self.out.shape) == 1 else f"{self.row0}:+{self.out.shape[0]} (< {self.row_end})"
        return f"{self.out} = load {self.view.name}[{rows}, {self.col0}:+{self.out.shape[-1]}]"


@dataclasses.dataclass
class Store(Node):
    view: View
    value: Tile
    row0: str
    row_end: str
    col0: str = "0"
    when: str = ""  # an extra scalar condition (e.g. only the first program of a group stores)

    def operands(self):
        return [self.value]

    def describe(self):
        cond = f" if {self.when}" if self.when else ""
        return f"store {self.view.name}[{self.row0}:+{self.value.shape[0]} (< {self.row_end}), {self.col0}:] = {self.value.name}{cond}"


@dataclasses.dataclass
class Dot(Node):
    """out = op(a) @ op(b) (+ acc), operands cast to `operand_dtype`, accumulated in f32."""
    out: Tile
    a: Tile
    b: Tile
    trans_a: bool = False
    trans_b: bool = False
    acc: Optional[Tile] = None
    operand_dtype: str = "in"

    def operands(self):
        return [self.a, self.b] + ([self.acc] if self.acc else [])

    def result_shape(self):
        a = self.a.shape[::-1] if self.trans_a else self.a.shape
        b = self.b.shape[::-1] if self.trans_b else self.b.shape
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise IRError(f"{self.describe()}: cannot multiply {a} by {b}")
        if self.acc is not None and self.acc.shape != (a[0], b[1]):
            raise IRError(f"{self.describe()}: accumulator {self.acc.shape} != {(a[0], b[1])}")
        return (a[0], b[1])

    def describe(self):
        a = f"trans({self.a.name})" if self.trans_a else self.a.name
        b = f"trans({self.b.name})" if self.trans_b else self.b.name
        acc = f" + {self.acc.name}" if self.acc else ""
        return f"{self.out} = dot({a}, {b}){acc}"


@dataclasses.dataclass
class Map(Node):
    """Element-wise: `expr` is a Triton expression over `{0}`, `{1}`, ... (the args, broadcast)."""
    out: Tile
    expr: str
    args: Tuple[Tile, ...]

    def operands(self):
        return list(self.args)

    def result_shape(self):
        return broadcast([a.shape for a in self.args if a.shape]) if self.args else self.out.shape

    def describe(self):
        return f"{self.out} = {self.expr.format(*[a.name for a in self.args])}"


@dataclasses.dataclass(frozen=True)
class SlotIndex:
    """Triton expressions of the slot_mod's index arguments for the rows of a [rows, BM] tile:
    b (sequence), h (query head), t (position in the sequence; None where the kernel cannot know it)."""
    b: str
    h: str
    t: Optional[str]


@dataclasses.dataclass
class SlotMod(Node):
    """The Spec's user slot_mod (mods.py) at the slot logits; the natural logit is acc * scale_log2 * ln 2.

    mode "value": out = where(m < M, slot_mod(logit, b, h, t, m) * log2(e), -inf)  (replaces the logits x)
    mode "grad":  out = x * d slot_mod / d logit   (x = dL/d modded logits; gives dL/d logits)
    mode "term":  out = x * d slot_mod / d (captured value `leaf`)   (for the captured tensors' gradients)
    Without a slot_mod in the Spec codegen emits nothing: value and grad nodes must then have out == x.
    """
    out: Tile
    x: Tile
    acc: Tile
    index: SlotIndex
    mode: str = "value"
    leaf: int = 0

    def operands(self):
        return [self.x, self.acc]

    def result_shape(self):
        return self.x.shape

    def describe(self):
        extra = f", leaf {self.leaf}" if self.mode == "term" else ""
        return f"{self.out} = slot_mod_{self.mode}({self.x.name}, logit={self.acc.name}{extra})"


@dataclasses.dataclass
class Derive(Node):
    """out = the Spec's mapped input `tensor` computed from x, the mapped tile of the input it derives from
    (mods.py `TracedMods.derived`: with s_from_gate, s = 1 - exp(g) from the mapped gate), element-wise in
    f32 and rounded to the input dtype, as the copy the state pass stores holds it (every program sees the
    same s). Elements where x is 0 give 0 (masked rows and slots stay 0)."""
    out: Tile
    x: Tile
    tensor: str

    def operands(self):
        return [self.x]

    def result_shape(self):
        return self.x.shape

    def describe(self):
        return f"{self.out} = derive {self.tensor} from {self.x.name}"


@dataclasses.dataclass
class Expand(Node):
    """Insert unit axes: `pattern` has one ':' per input axis and 'None' for new ones, e.g. ':, None'."""
    out: Tile
    x: Tile
    pattern: str

    def operands(self):
        return [self.x]

    def result_shape(self):
        parts = [p.strip() for p in self.pattern.split(",")]
        if sum(p == ":" for p in parts) != len(self.x.shape):
            raise IRError(f"{self.describe()}: pattern does not fit {self.x.shape}")
        dims = iter(self.x.shape)
        return tuple(next(dims) if p == ":" else "1" for p in parts)

    def describe(self):
        return f"{self.out} = {self.x.name}[{self.pattern}]"


@dataclasses.dataclass
class Reduce(Node):
    out: Tile
    x: Tile
    axis: int
    op: str = "sum"  # sum | max | min | cumsum

    def operands(self):
        return [self.x]

    def result_shape(self):
        if self.op == "cumsum":
            return self.x.shape
        return tuple(d for i, d in enumerate(self.x.shape) if i != self.axis)

    def describe(self):
        return f"{self.out} = {self.op}({self.x.name}, axis={self.axis})"


@dataclasses.dataclass
class Barrier(Node):
    """All threads of the program reach this point (their global-memory writes become visible to
    each other): what one thread stored to scratch, another may load after it."""

    def describe(self):
        return "barrier"


@dataclasses.dataclass
class For(Node):
    """A loop; tiles assigned in the body before use are loop-carried. static=True unrolls it."""
    var: str
    start: str
    stop: str
    body: List[Node]
    static: bool = False
    step: str = "1"

    def describe(self):
        kind = "tl.static_range" if self.static else "range"
        step = "" if self.step == "1" else f", {self.step}"
        return f"for {self.var} in {kind}({self.start}, {self.stop}{step}):"


@dataclasses.dataclass
class If(Node):
    cond: str
    body: List[Node]

    def describe(self):
        return f"if {self.cond}:"


@dataclasses.dataclass
class Program:
    """One kernel: a name, its views and the body; the frame (signature, program ids) is the template's."""
    name: str
    views: List[View]
    body: List[Node]

    def verify(self):
        _verify_block(self.body, {}, self.name)
        return self

    def pretty(self) -> str:
        lines = [f"program {self.name}"]
        _pretty(self.body, lines, 1)
        return "\n".join(lines)


def _verify_block(body, env, where):
    """env: name -> (its type, the ids of the Tile objects that may hold the name's current value here).

    A name may be assigned again with the same type (loop-carried tiles are those a loop body re-assigns).
    The generated code then has one variable, so a builder still holding a Tile of an earlier assignment
    would read the later value: using such a stale Tile is an error (after a nested block, the assignments
    before it and inside it are all current, as the block may run or not)."""
    for node in body:
        for tile in node.operands():
            if tile.name not in env:
                raise IRError(f"{where}: {node.describe()} uses {tile.name} before it is defined")
            defined_as, current = env[tile.name]
            if defined_as != tile:
                raise IRError(f"{where}: {tile.name} used as {tile} but defined as {defined_as}")
            if id(tile) not in current:
                raise IRError(f"{where}: {node.describe()} uses a {tile.name} that was assigned again since: "
                              f"the generated code would read the later value")
        node.check()
        if isinstance(node, (For, If)):
            inner = dict(env)
            _verify_block(node.body, inner, where)
            for name, (tile, current) in inner.items():
                if name in env and env[name][1] is not current:
                    env[name] = (tile, env[name][1] | current)
        out = defined(node)
        if out is not None:
            previous = env.get(out.name, (None, None))[0]
            if previous is not None and previous != out:
                raise IRError(f"{where}: {out.name} redefined as {out}, was {previous}")
            env[out.name] = (out, frozenset({id(out)}))


def _pretty(body, lines, depth):
    for node in body:
        lines.append("    " * depth + node.describe())
        if isinstance(node, (For, If)):
            _pretty(node.body, lines, depth + 1)


class Builder:
    """Appends nodes to the current block; `loop`/`when` open nested blocks."""

    def __init__(self):
        self.body: List[Node] = []
        self._blocks = [self.body]

    def _add(self, node):
        self._blocks[-1].append(node)
        return defined(node)

    def zeros(self, name, shape, dtype="f32"):
        return self._add(Zeros(Tile(name, tuple(shape), dtype)))

    def load(self, name, view, row0, row_end, shape, col0="0", dtype="f32", other="0.0"):
        return self._add(Load(Tile(name, tuple(shape), dtype), view, row0, row_end, col0, other))

    def store(self, view, value, row0, row_end, col0="0", when=""):
        self._blocks[-1].append(Store(view, value, row0, row_end, col0, when))

    def barrier(self):
        self._blocks[-1].append(Barrier())

    def dot(self, name, a, b, trans_a=False, trans_b=False, acc=None, operand_dtype="in"):
        node = Dot(Tile(name, (), "f32"), a, b, trans_a, trans_b, acc, operand_dtype)
        node.out = Tile(name, node.result_shape(), "f32")
        return self._add(node)

    def map(self, name, expr, *args, dtype="f32", shape=None):
        node = Map(Tile(name, tuple(shape or ()), dtype), expr, tuple(args))
        if shape is None:
            node.out = Tile(name, node.result_shape(), dtype)
        return self._add(node)

    def slot_mod(self, name, x, acc, index: SlotIndex, mode="value", leaf=0):
        return self._add(SlotMod(Tile(name, x.shape, x.dtype), x, acc, index, mode, leaf))

    def derive(self, name, x, tensor):
        return self._add(Derive(Tile(name, x.shape, "f32"), x, tensor))

    def expand(self, name, x, pattern):
        node = Expand(Tile(name, (), x.dtype), x, pattern)
        node.out = Tile(name, node.result_shape(), x.dtype)
        return self._add(node)

    def reduce(self, name, x, axis, op="sum"):
        node = Reduce(Tile(name, (), x.dtype), x, axis, op)
        node.out = Tile(name, node.result_shape(), x.dtype)
        return self._add(node)

    @contextlib.contextmanager
    def loop(self, var, start, stop, static=False, step="1"):
        node = For(var, start, stop, [], static, step)
        self._blocks[-1].append(node)
        self._blocks.append(node.body)
        yield var
        self._blocks.pop()

    @contextlib.contextmanager
    def when(self, cond):
        node = If(cond, [])
        self._blocks[-1].append(node)
        self._blocks.append(node.body)
        yield
        self._blocks.pop()
