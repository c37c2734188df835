"""Lower IR programs to Triton source through the templates, and load the kernels.

Each IR node becomes one or two Triton statements (`emit`); the template of the program holds the
fixed frame (signature, program ids, sequence bounds, base pointers). Generated modules are cached
in memory by (program, Spec) and on disk by a hash of their source, so identical Specs never
regenerate and a new process only re-imports.

User mods (mods.py, named by `Spec.mods`) enter here only: a load from a view whose `tensor` the mods
map (q, k, v, s, g) is followed by the mod's element-wise Triton code (not for a `mapped` view: the
state pass's stored copy), `Derive` nodes print a mapped input from another one's mapped tile (s from
g), `SlotMod` nodes print the slot_mod (or its derivatives), and the mods' kernel parameters (captured
values, slot_mod terms, `mapped_<tensor>` buffers the program stores to) are appended to the signature.
Without mods the generated source is exactly what it is without this feature.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import jinja2

from . import ir, mods
from .mod_expr import Expr, TritonWriter, derivative
from .spec import Spec

TEMPLATE_DIR = Path(__file__).parent / "templates"
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), keep_trailing_newline=True,
                          undefined=jinja2.StrictUndefined)
_TL_DTYPE = {"f32": "tl.float32", "f64": "tl.float64", "i1": "tl.int1", "i64": "tl.int64", "i32": "tl.int32"}


def cache_dir() -> Path:
    root = os.environ.get("GSA_COMPILE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gsa_compile")
    return Path(root) / "kernels"


LN2, LOG2E = "0.6931471805599453", "1.4426950408889634"


class _Emitter:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.mods = mods.lookup(spec.mods)  # user mods (mods.py), or None
        self._temporaries = 0

    def dtype(self, d: str) -> str:
        if d == "in" or (d == "f32" and self.spec.dtype == "float64"):  # f32 is the accumulator type
            return self.spec.tl_dtype
        return _TL_DTYPE[d]

    def dims(self, shape) -> str:
        return ", ".join(shape)

    def emit(self, node: ir.Node) -> List[str]:
        return getattr(self, "emit_" + type(node).__name__.lower())(node)

    def emit_zeros(self, n: ir.Zeros):
        return [f"{n.out.name} = tl.zeros([{self.dims(n.out.shape)}], dtype={self.dtype(n.out.dtype)})"]

    def _offsets(self, view: ir.View, row0, row_end, col0, shape):
        """Pointer and mask expressions for a [rows, cols] window (or one row if 1-D)."""
        cols = f"({col0} + tl.arange(0, {shape[-1]}))"
        col_off = cols if view.col_stride == "1" else f"({cols} * {view.col_stride})"
        col_mask = f"{cols} < {view.col_limit}"
        if len(shape) == 1:
            row_off = f"({row0}) * {view.row_stride}" if view.row_stride != "0" else "0"
            return f"{view.name} + {row_off} + {col_off}", f"({col_mask}) & ({row0} < {row_end})"
        rows = f"({row0} + tl.arange(0, {shape[0]}))"
        row_off = f"{rows}[:, None] * {view.row_stride}" if view.row_stride != "0" else f"{rows}[:, None] * 0"
        return f"{view.name} + {row_off} + {col_off}[None, :]", f"({rows} < {row_end})[:, None] & ({col_mask})[None, :]"

    def emit_load(self, n: ir.Load):
        ptr, mask = self._offsets(n.view, n.row0, n.row_end, n.col0, n.out.shape)
        cast = "" if n.out.dtype == "in" else f".to({self.dtype(n.out.dtype)})"
        load_mod = self.mods.loads.get(n.view.tensor) if self.mods is not None and not n.view.mapped else None
        if self.mods is not None and not n.view.tensor and any(
                n.view.name == f"{t}_base" or n.view.name.startswith(f"({t} +") for t in self.mods.loads):
            raise ir.IRError(f"{n.describe()} reads a mapped input through a View without `tensor`: the mods "
                             f"would not apply to it")
        if load_mod is None:
            return [f"{n.out.name} = tl.load({ptr}, mask={mask}, other={n.other}){cast}"]
        # a mapped load: the mod runs in the accumulator type; masked elements keep `other`
        writer = self._writer({"input": f"{n.out.name}_raw"})
        value = writer(load_mod)
        cast = "" if n.out.dtype == "f32" else f".to({self.dtype(n.out.dtype)})"
        return [f"{n.out.name}_raw = tl.load({ptr}, mask={mask}, other=0.0).to({self.dtype('f32')})",
                *writer.lines, f"{n.out.name} = tl.where({mask}, {value}, {n.other}){cast}"]

    def emit_derive(self, n: ir.Derive):
        derived = self.mods.derived.get(n.tensor) if self.mods is not None else None
        if derived is None:
            raise ir.IRError(f"{n.describe()}: the Spec's mods do not derive {n.tensor!r} from another input")
        writer = self._writer({"input": n.x.name})
        value = writer(derived[1])
        acc, stored = self.dtype(n.out.dtype), self.dtype("in")
        rounded = "" if stored == acc else f".to({stored}).to({acc})"  # as the stored copy holds it
        return [*writer.lines, f"{n.out.name} = ({value}){rounded}"]

    def _writer(self, leaves) -> TritonWriter:
        self._temporaries += 1
        return TritonWriter(f"mod{self._temporaries}_", leaves)

    def emit_slotmod(self, n: ir.SlotMod):
        slot = self.mods.slot if self.mods is not None else None
        if slot is None:
            if n.mode == "term" or n.out.name != n.x.name:
                raise ir.IRError(f"{n.describe()}: the Spec has no slot_mod, so this node must be a no-op")
            return []
        leaves = {"input": f"{n.out.name}_logit", "b": n.index.b, "h": n.index.h, "m": "tl.arange(0, BM)[None, :]"}
        if n.index.t is not None:
            leaves["t"] = n.index.t
        writer = self._writer(leaves)
        valid = "(tl.arange(0, BM) < M)[None, :]"
        if n.mode == "value":
            result = f"tl.where({valid}, {writer(slot)} * {LOG2E}, float('-inf'))"
        else:
            wrt = Expr("input") if n.mode == "grad" else self.mods.slot_leaves[n.leaf]
            result = f"tl.where({valid}, {n.x.name} * {writer(derivative(slot, wrt))}, 0.0)"
        return [f"{n.out.name}_logit = {n.acc.name} * scale_log2 * {LN2}", *writer.lines, f"{n.out.name} = {result}"]

    def emit_store(self, n: ir.Store):
        ptr, mask = self._offsets(n.view, n.row0, n.row_end, n.col0, n.value.shape)
        if n.when:
            mask = f"({mask}) & ({n.when})"
        return [f"tl.store({ptr}, {n.value.name}, mask={mask})"]  # tl.store casts to the pointee type

    def emit_dot(self, n: ir.Dot):
        # operand_dtype "f32" asks for more than the input dtype's precision: tf32 for half-precision inputs
        operand_dtype = n.operand_dtype if self.spec.dtype in ("float16", "bfloat16") else "in"
        precision = {"float32": ', input_precision="ieee"', "float64": ", out_dtype=tl.float64"}.get(self.spec.dtype, "")
        if self.spec.dtype == "float16" and operand_dtype == "in" and (n.a.dtype, n.b.dtype) != ("in", "in"):
            # an fp32 intermediate (q k^T, a state, an attention block) can pass fp16's 65504 although every
            # true value is in range: tf32 products (fp16's 10 mantissa bits, fp32's exponent) instead
            operand_dtype, precision = "f32", ', input_precision="tf32"'
        elif operand_dtype == "f32":
            precision = ', input_precision="tf32"'

        def operand(t: ir.Tile, trans: bool):
            x = t.name if t.dtype == operand_dtype else f"{t.name}.to({self.dtype(operand_dtype)})"
            return f"tl.trans({x})" if trans else x
        acc = f", {n.acc.name}" if n.acc is not None else ""
        return [f"{n.out.name} = tl.dot({operand(n.a, n.trans_a)}, {operand(n.b, n.trans_b)}{acc}{precision})"]

    def emit_map(self, n: ir.Map):
        return [f"{n.out.name} = {n.expr.format(*[a.name for a in n.args])}"]

    def emit_expand(self, n: ir.Expand):
        return [f"{n.out.name} = {n.x.name}[{n.pattern}]"]

    def emit_barrier(self, n: ir.Barrier):
        return ["tl.debug_barrier()"]

    def emit_reduce(self, n: ir.Reduce):
        fn = {"sum": "tl.sum", "max": "tl.max", "min": "tl.min", "cumsum": "tl.cumsum"}[n.op]
        return [f"{n.out.name} = {fn}({n.x.name}, axis={n.axis})"]


def render_body(program: ir.Program, spec: Spec, indent: int = 1) -> str:
    emitter = _Emitter(spec)
    lines: List[str] = []

    def walk(body, depth):
        for node in body:
            if isinstance(node, (ir.For, ir.If)):
                lines.append("    " * depth + node.describe())
                walk(node.body, depth + 1)
            else:
                lines.extend("    " * depth + line for line in emitter.emit(node))
    walk(program.body, indent)
    return "\n".join(lines)


def _tile_names(body) -> set:
    names = set()
    for node in body:
        if isinstance(node, (ir.For, ir.If)):
            names |= _tile_names(node.body)
        elif ir.defined(node) is not None:
            names.add(ir.defined(node).name)
    return names


def _check_no_shadowing(program: ir.Program, source_text: str):
    """A tile named like a kernel argument would silently replace that pointer: refuse it."""
    tree = ast.parse(source_text)
    kernel_def = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == program.name)
    clash = _tile_names(program.body) & {a.arg for a in kernel_def.args.args}
    if clash:
        raise ir.IRError(f"{program.name}: tiles {sorted(clash)} shadow kernel arguments of the same name")


def _has_slot_terms(body) -> bool:
    return any(_has_slot_terms(node.body) if isinstance(node, (ir.For, ir.If)) else
               isinstance(node, ir.SlotMod) and node.mode == "term" for node in body)


def _stored_maps(body) -> Tuple[str, ...]:
    """The tensors whose mapped copies a program stores (to `mapped` views: the `mapped_<tensor>` buffers)."""
    found = []
    for node in body:
        inner = _stored_maps(node.body) if isinstance(node, (ir.For, ir.If)) else (
            (node.view.tensor,) if isinstance(node, ir.Store) and node.view.mapped else ())
        found += [t for t in inner if t not in found]
    return tuple(found)


def _add_kernel_params(source_text: str, name: str, params: List[str]) -> str:
    """Append `params` to the signature of kernel `name` (after its last parameter; passed by keyword)."""
    if not params:
        return source_text
    kernel_def = next(n for n in ast.parse(source_text).body if isinstance(n, ast.FunctionDef) and n.name == name)
    last = kernel_def.args.args[-1]
    lines = source_text.split("\n")
    line = lines[last.end_lineno - 1]
    lines[last.end_lineno - 1] = line[:last.end_col_offset] + "".join(f", {p}" for p in params) + line[last.end_col_offset:]
    return "\n".join(lines)


def render(program: ir.Program, spec: Spec, template: str) -> str:
    """Triton source of one kernel module; the Spec's mods add their kernel parameters (mods.py)."""
    text = _ENV.get_template(template).render(
        name=program.name, body=render_body(program, spec), varlen=spec.varlen,
        acc_dtype=_Emitter(spec).dtype("f32"), spec_comment=repr(spec) + (f" mods={spec.mods}" if spec.mods else ""))
    traced = mods.lookup(spec.mods)
    if traced is not None:
        text = _add_kernel_params(text, program.name, traced.kernel_params(_has_slot_terms(program.body),
                                                                          _stored_maps(program.body)))
    _check_no_shadowing(program, text)
    return text


_MODULES: Dict[Tuple[str, Spec], Callable] = {}


def load_kernel(source: str, name: str):
    """Write `source` to the disk cache (named by its hash) and import the jitted kernel `name`."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    module_name = f"gsa_compile_generated_{name}_{digest}"
    if module_name in sys.modules:
        return getattr(sys.modules[module_name], name)
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{module_name}.py"
    if not path.exists() or path.read_text() != source:
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)  # atomic: concurrent processes never see a half-written module
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def kernel(builder: Callable[[Spec], ir.Program], spec: Spec):
    """The compiled-on-first-launch Triton kernel for one forward/backward program and Spec."""
    key = (builder.__name__, spec)
    if key not in _MODULES:
        program = builder(spec)
        _MODULES[key] = load_kernel(render(program, spec, _template(builder)), program.name)
    return _MODULES[key]


def _template(builder) -> str:
    """The frame of a program: templates/<builder name>.py.jinja, or the builder's `template` attribute."""
    return f"{getattr(builder, 'template', builder.__name__)}.py.jinja"


def source(builder: Callable[[Spec], ir.Program], spec: Spec) -> str:
    return render(builder(spec), spec, _template(builder))
