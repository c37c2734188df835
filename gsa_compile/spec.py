"""Input validation shared by every entry point, and the frozen `Spec` that drives codegen.

Shapes (B batch, T time, HQ query heads, H key/value heads, K/V head dims, M slots):

    q [B, T, HQ, K]   k [B, T, H, K]   v [B, T, H, V]   s [B, T, H, M]
    g: [B, T, H, M] per-slot (GateLayout.SLOT)    [B, T, H] per-head scalar (HEAD)
       [H] constant per-head decay (DECAY_HEAD)    [H, M] constant per-slot decay (DECAY_SLOT)
       None: ABC, the gate is derived from s (ABC)
    initial_state / final_state: (hk [N, H, K, M], hv [N, H, M, V]) with N = B, or the number
    of sequences when `cu_seqlens` (1-D int, 0 = c_0 < ... < c_N = T) packs them with B = 1.

Every check raises ValueError/TypeError naming the argument, its shape and what was expected.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional, Tuple

import torch

SUPPORTED_CHUNK_SIZES = (16, 32, 64, 128)
MAX_HEAD_DIM = 1024  # K and V are tiled; any size up to this is supported
MAX_SLOTS = 256  # the softmax over M needs all slots of a row in one tile
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class GateLayout(str, enum.Enum):
    SLOT = "slot"  # g [B, T, H, M]
    HEAD = "head"  # g [B, T, H]
    DECAY_HEAD = "decay_head"  # g [H]
    DECAY_SLOT = "decay_slot"  # g [H, M]
    ABC = "abc"  # g None: derived from s by a log-cumsum-exp over time

    @property
    def data_dependent(self) -> bool:
        return self in (GateLayout.SLOT, GateLayout.HEAD)


_LAYOUT_BY_NDIM = {4: GateLayout.SLOT, 3: GateLayout.HEAD, 1: GateLayout.DECAY_HEAD, 2: GateLayout.DECAY_SLOT}
_LAYOUT_ALIASES = {"gsa": GateLayout.SLOT, "vector": GateLayout.SLOT, "scalar": GateLayout.HEAD,
                   "none": GateLayout.ABC, "decay": GateLayout.DECAY_HEAD}


def parse_gate_layout(value) -> GateLayout:
    if isinstance(value, GateLayout):
        return value
    if isinstance(value, str):
        key = value.lower()
        if key in _LAYOUT_ALIASES:
            return _LAYOUT_ALIASES[key]
        try:
            return GateLayout(key)
        except ValueError:
            pass
    names = [layout.value for layout in GateLayout]
    raise ValueError(f"gate_layout must be one of {names}, got {value!r}")


def infer_gate_layout(g: Optional[torch.Tensor]) -> GateLayout:
    if g is None:
        return GateLayout.ABC
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"g must be a torch.Tensor or None, got {type(g).__name__}")
    if g.dim() not in _LAYOUT_BY_NDIM:
        raise ValueError(
            f"g must be [B,T,H,M] (per-slot), [B,T,H] (per-head), [H] or [H,M] (constant decay) "
            f"or None (ABC); got shape {tuple(g.shape)}")
    return _LAYOUT_BY_NDIM[g.dim()]


@dataclasses.dataclass(frozen=True)
class Problem:
    """Sizes of one call, after validation."""
    B: int
    T: int
    HQ: int
    H: int
    K: int
    V: int
    M: int
    N: int  # number of sequences (B, or len(cu_seqlens) - 1)
    layout: GateLayout
    dtype: torch.dtype
    scale: float

    @property
    def group(self) -> int:
        return self.HQ // self.H


def _shape(x) -> str:
    return str(tuple(x.shape))


def _check_tensor(name, x, ndim, expected):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {expected} ({ndim} dims), got {_shape(x)}")


def _check_dims(name, x, expected_desc, dims):
    """dims: axis -> (expected size, symbol), e.g. {0: (B, "B")}"""
    for axis, (size, symbol) in dims.items():
        if x.shape[axis] != size:
            raise ValueError(
                f"{name} must have shape {expected_desc} with {symbol}={size}, got {_shape(x)}")


def validate_inputs(q, k, v, s, g=None, scale=None, initial_state=None, cu_seqlens=None,
                    gate_layout=None, require_float=True) -> Problem:
    """Check every input of a GSA call; return the problem sizes. Raises ValueError/TypeError."""
    _check_tensor("q", q, 4, "[B, T, HQ, K]")
    B, T, HQ, K = q.shape
    _check_tensor("k", k, 4, "[B, T, H, K]")
    H = k.shape[2]
    _check_dims("k", k, "[B, T, H, K]", {0: (B, "B"), 1: (T, "T"), 3: (K, "K")})
    _check_tensor("v", v, 4, "[B, T, H, V]")
    V = v.shape[3]
    _check_dims("v", v, "[B, T, H, V]", {0: (B, "B"), 1: (T, "T"), 2: (H, "H")})
    _check_tensor("s", s, 4, "[B, T, H, M]")
    M = s.shape[3]
    _check_dims("s", s, "[B, T, H, M]", {0: (B, "B"), 1: (T, "T"), 2: (H, "H")})
    if B < 1:
        raise ValueError(f"q must have batch size B >= 1, got shape {_shape(q)}")
    if T < 1:
        raise ValueError(f"q must have T >= 1 tokens, got shape {_shape(q)}")
    if H < 1 or HQ < 1 or HQ % H != 0:
        raise ValueError(
            f"q has HQ={HQ} heads and k has H={H}: HQ must be a positive multiple of H (GQA); "
            f"q {_shape(q)}, k {_shape(k)}")
    for name, size in (("K", K), ("V", V)):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"head dim {name}={size} is not supported: expected 1 <= {name} <= {MAX_HEAD_DIM}")
    if not 1 <= M <= MAX_SLOTS:
        raise ValueError(f"s has M={M} slots (shape {_shape(s)}): expected 1 <= M <= {MAX_SLOTS}")

    layout = infer_gate_layout(g)
    if gate_layout is not None:
        requested = parse_gate_layout(gate_layout)
        if requested != layout:
            got = "None" if g is None else _shape(g)
            raise ValueError(f"gate_layout={requested.value!r} does not match g of shape {got} "
                             f"(which means {layout.value!r})")
    expected_g = {GateLayout.SLOT: ((B, T, H, M), "[B, T, H, M]"), GateLayout.HEAD: ((B, T, H), "[B, T, H]"),
                  GateLayout.DECAY_HEAD: ((H,), "[H]"), GateLayout.DECAY_SLOT: ((H, M), "[H, M]")}
    if g is not None and tuple(g.shape) != expected_g[layout][0]:
        raise ValueError(f"g must have shape {expected_g[layout][1]} = {expected_g[layout][0]} "
                         f"for the {layout.value!r} gate layout, got {_shape(g)}")

    named = [("q", q), ("k", k), ("v", v), ("s", s)] + ([("g", g)] if g is not None else [])
    dtype, device = q.dtype, q.device
    for name, x in named:
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if require_float and x.dtype not in FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"{name} has dtype {x.dtype}; expected one of float32, float16, bfloat16")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but q is on {device}: all inputs must share a device")
    for name, x in named[1:4]:
        if x.dtype != dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {dtype}: q, k, v, s must share a dtype")

    if scale is None:
        scale = K ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale must be a positive finite float, got {scale}")

    N = B
    if cu_seqlens is not None:
        N = _validate_cu_seqlens(cu_seqlens, B, T, device)
    if initial_state is not None:
        _validate_state("initial_state", initial_state, N, H, K, M, V, device)
    return Problem(B=B, T=T, HQ=HQ, H=H, K=K, V=V, M=M, N=N, layout=layout, dtype=dtype, scale=float(scale))


def _validate_cu_seqlens(cu, B, T, device) -> int:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a 1-D integer torch.Tensor, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries [0, ..., T], got shape {_shape(cu)}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must have dtype int32 or int64, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"cu_seqlens is on {cu.device} but q is on {device}")
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={B}")
    # Value checks read the tensor: done once, on the host copy, and skipped while tracing.
    if not _is_fake(cu):
        values = cu.tolist()
        if values[0] != 0 or values[-1] != T:
            raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got {values[0]} ... {values[-1]}")
        if any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError("cu_seqlens must be strictly increasing (every sequence needs >= 1 token)")
    return cu.numel() - 1


def _is_fake(x: torch.Tensor) -> bool:
    """True while tracing (dynamo, fake or meta tensors): values cannot be read then."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(x) or torch._C._functorch.is_functorch_wrapped_tensor(x) or x.device.type == "meta"


def _validate_state(name, state, N, H, K, M, V, device):
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"{name} must be a pair (hk [N, H, K, M], hv [N, H, M, V]), got {type(state).__name__}")
    for part, x, expected in ((f"{name}[0] (hk)", state[0], (N, H, K, M)),
                              (f"{name}[1] (hv)", state[1], (N, H, M, V))):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{part} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != expected:
            axes = "[N, H, K, M]" if part.endswith("(hk)") else "[N, H, M, V]"
            raise ValueError(f"{part} must have shape {axes} = {expected}, got {_shape(x)}")
        if not x.is_floating_point():
            raise TypeError(f"{part} must be floating point, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"{part} is on {x.device} but q is on {device}")


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size not in SUPPORTED_CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {SUPPORTED_CHUNK_SIZES}, got {chunk_size!r}")
    return chunk_size


StateTuple = Tuple[torch.Tensor, torch.Tensor]


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything a generated kernel is specialised on (T, B and N stay runtime values)."""
    layout: GateLayout  # ABC arrives here as SLOT: its normaliser runs before the kernels
    chunk_size: int
    dtype: str  # "float32" | "float16" | "bfloat16"
    K: int
    V: int
    M: int
    group: int = 1  # HQ // H
    varlen: bool = False
    initial_state: bool = False
    final_state: bool = False
    mods: str = dataclasses.field(default="", repr=False)  # key of the user mods fused in (mods.py); "" = none

    @property
    def BM(self) -> int:
        return max(16, next_power_of_2(self.M))

    @property
    def BC(self) -> int:
        """Sub-chunk: the intra-chunk decays are exact pairwise products within BC x BC blocks."""
        return min(16, self.chunk_size)

    @property
    def tl_dtype(self) -> str:
        return f"tl.{self.dtype}"


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Launch parameters the autotuner searches over; they never change results beyond rounding."""
    BK: int = 64
    BV: int = 64
    num_warps: int = 4
    num_stages: int = 2
