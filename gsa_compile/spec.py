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
import functools
import os
from typing import Optional, Tuple

import torch

SUPPORTED_CHUNK_SIZES = (16, 32, 64, 128)
MAX_HEAD_DIM = 1024  # K and V are tiled; any size up to this is supported
MAX_SLOTS = 256  # the softmax over M needs all slots of a row in one tile
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The chunked kernels read a log gate g as max(g, GATE_FLOOR): exp(-40) = 4e-18, so a gate at or below
# the floor (-1e4, -inf) still resets the state to float32 precision, while the chunk-local cumulative
# gates stay small enough that their differences keep ~1e-6 relative precision (a floor of -1e4 or
# -inf would cancel every later gate of the chunk, or give -inf - -inf = nan).
GATE_FLOOR = -40.0
# Opt-in value checks (they read the inputs: one host synchronisation per call on a GPU). With
# GSA_CHECK_VALUES=1 the kernels' entry points reject non-finite q, k, v, s, states and positive or
# nan gates with a ValueError instead of returning a silently wrong or nan result.
CHECK_VALUES = os.environ.get("GSA_CHECK_VALUES", "0") == "1"


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
                    gate_layout=None, require_float=True, check_values=None) -> Problem:
    """Check every input of a GSA call; return the problem sizes. Raises ValueError/TypeError.

    `check_values` (default: CHECK_VALUES) also reads the values: finite inputs and g <= 0."""
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
    if (CHECK_VALUES if check_values is None else check_values) and not _is_fake(q):
        states = list(zip(("initial_state[0] (hk)", "initial_state[1] (hv)"), initial_state or ()))
        check_input_values(named[:4] + states, g)
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
    if not _values_known(cu, T):
        _check_cu_seqlens_values(cu, T)
    return cu.numel() - 1


# Reading cu_seqlens is a host synchronisation on a GPU. Its values are read once per tensor (and
# again after an in-place change, which bumps the tensor's version): every layer of a model and the
# backward pass reuse the packing of their batch without another read. Inference tensors have no
# version counter: they are read on every call. Not read while tracing or during CUDA graph capture
# (reading is impossible then: a warm-up call before capture validates the static buffer).
_CHECKED_CU_SEQLENS = torch.utils.weak.WeakIdKeyDictionary()


def _values_known(cu: torch.Tensor, T: int) -> bool:
    if _is_fake(cu) or (cu.is_cuda and torch.cuda.is_current_stream_capturing()):
        return True
    return not cu.is_inference() and _CHECKED_CU_SEQLENS.get(cu) == (cu._version, T)


def _check_cu_seqlens_values(cu: torch.Tensor, T: int):
    values = cu.tolist()
    if values[0] != 0 or values[-1] != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got {values[0]} ... {values[-1]}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError("cu_seqlens must be strictly increasing (every sequence needs >= 1 token)")
    if not cu.is_inference():
        _CHECKED_CU_SEQLENS[cu] = (cu._version, T)


def check_input_values(named, g):
    """ValueError for non-finite entries of the (name, tensor) pairs, or a log gate g with positive or nan
    entries (-inf, a full reset, is allowed). Reads the values: a host synchronisation on a GPU."""
    for name, x in named:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} has non-finite entries (nan or inf)")
    if g is not None:
        if bool(torch.isnan(g).any()):
            raise ValueError("g has nan entries")
        largest = float(g.max())
        if largest > 0:
            raise ValueError(f"g must be <= 0 (a log forget gate such as logsigmoid(x)), got max(g) = {largest:g}")


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


def validate_op_inputs(q, k, v, s, g, scale, hk, hv, cu_seqlens, gate_layout, chunk_size=None,
                       state_name="hk0/hv0", check_values=None) -> Problem:
    """Checks of the torch.ops.gsa.* ops, which take the kernels' arguments directly: as validate_inputs,
    plus an explicit non-ABC gate layout and tensor g, a scale given as a number, the state pair
    (`state_name`, None or both tensors) and, for the chunked ops, chunk_size 0 (tuned) or a supported size."""
    layout = parse_gate_layout(gate_layout)
    if layout is GateLayout.ABC:
        raise ValueError("gate_layout='abc' is not a kernel layout: normalise s with gsa_compile.abc_gate "
                         "and pass its g with gate_layout='slot' (chunk_gsa does this)")
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"g must be a torch.Tensor for gate_layout={layout.value!r}, got {type(g).__name__}")
    if scale is None:
        raise TypeError("scale must be a float, got None (the ops take the scale explicitly)")
    if (hk is None) != (hv is None):
        raise ValueError(f"{state_name}: give both states or neither, got "
                         f"{'hk' if hk is not None else 'hv'} only")
    if chunk_size is not None and chunk_size != 0:
        check_chunk_size(chunk_size)
    return validate_inputs(q, k, v, s, g, scale, None if hk is None else (hk, hv), cu_seqlens, layout,
                           check_values=check_values)


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size not in SUPPORTED_CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {SUPPORTED_CHUNK_SIZES}, got {chunk_size!r}")
    return chunk_size


StateTuple = Tuple[torch.Tensor, torch.Tensor]


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block(size: int, preferred: int) -> int:
    """A power-of-two tile >= 16 (tl.dot's minimum), no larger than needed for `size`."""
    return max(16, min(preferred, next_power_of_2(size)))


def cdiv(a, b):
    """ceil(a / b) for ints and symbolic sizes on the host (triton.cdiv is a jit function: each host
    call goes through JITFunction.__call__, ~5 us, five times per forward)."""
    return (a + b - 1) // b


# Tensor-core tiles (bf16 / fp16: wgmma on the H200). Every GPU failure found so far had a 32-wide dot
# dimension in a bf16/fp16 kernel: session 4's fault (slot tile 32) and session 7's GPU fuzz, where ten
# configurations with K or V = 32 gave an illegal memory access or wrong values that the CPU interpreter, its
# bounds checker and its cross-program race checker (tests/races.py) do not show
# (bench/results/2026-11-29_h200_fuzz_repro_s7*.json). Public reports describe the same class in Triton
# >= 3.6 on sm_90 (several tl.dots in one kernel with a 16- or 32-wide block: an illegal address or silent
# corruption; 64 and wider safe). The GPU checks of earlier sessions all ran tiles >= 64. So bf16 and fp16
# kernels take BK, BV and the slot tile >= 64 (padded columns are masked); GSA_MIN_KV_TILE /
# GSA_MIN_SLOT_TILE = 16 restore the plain rule (bench/fuzz_repro.py runs both). A 64-wide slot tile alone
# did not make K = 32 or V = 32 correct (session 7), hence the K and V floor as well.
MIN_TENSOR_CORE_KV_TILE = int(os.environ.get("GSA_MIN_KV_TILE", "64"))
MIN_TENSOR_CORE_SLOT_TILE = int(os.environ.get("GSA_MIN_SLOT_TILE", "64"))


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
    # the output pass's and slot backward's sub-chunk terms: "sweep" (GPU) or "pairwise" (the interpreter)
    # (blocks.SubChunk; overrides.subchunk_form)
    subchunk: str = dataclasses.field(default="sweep", repr=False)
    # the output pass's factored form of the intra-chunk terms for chunks whose gates allow it
    # (blocks.FactoredChunk); False: the exact sub-chunk form everywhere (overrides.factored_form)
    factored: bool = dataclasses.field(default=True, repr=False)
    # the state pass and state backward store every chunk's state (gradient); False only for a segmented
    # pass's first, local run, which needs just each segment's end states (segments.py)
    chunk_states: bool = dataclasses.field(default=True, repr=False)

    @property
    def BM(self) -> int:
        """The slot tile: M rounded up to a power of two (padded slots are masked), at least 16 (tl.dot's
        minimum), and for tensor-core dtypes at least MIN_TENSOR_CORE_SLOT_TILE (see there)."""
        return max(self._tile_floor(MIN_TENSOR_CORE_SLOT_TILE), next_power_of_2(self.M))

    def replaced(self, **changes) -> "Spec":
        """This Spec with `changes` (dataclasses.replace), memoised: the segmented passes and the gate gradient
        derive Specs on every eager call; a replace costs 5-8 us of host time on the CPU here, a cached lookup 0.4-2."""
        return _replaced(self, tuple(sorted(changes.items())))

    def kv_tile(self, size: int, preferred: int) -> int:
        """BK or BV for a K or V of `size`: `block(size, preferred)`, and for tensor-core dtypes at least
        MIN_TENSOR_CORE_KV_TILE (see there)."""
        return max(self._tile_floor(MIN_TENSOR_CORE_KV_TILE), block(size, preferred))

    def _tile_floor(self, tensor_core_floor: int) -> int:
        """The narrowest tile of a dot dimension: 16 (tl.dot's minimum), `tensor_core_floor` for bf16/fp16."""
        return max(16, tensor_core_floor if self.dtype in ("bfloat16", "float16") else 16)

    @property
    def BC(self) -> int:
        """Sub-chunk: the intra-chunk decays are exact pairwise products within BC x BC blocks."""
        return min(16, self.chunk_size)

    @property
    def tl_dtype(self) -> str:
        return f"tl.{self.dtype}"


@functools.lru_cache(maxsize=256)
def _replaced(spec: Spec, changes: tuple) -> Spec:
    return dataclasses.replace(spec, **dict(changes))


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Launch parameters the autotuner searches over; they never change results beyond rounding."""
    BK: int = 64
    BV: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # the key backward's register cap (Triton's maxnreg; 0: none): at B8 T2048 H16 K=V=128 (4 warps, 64-wide
    # tiles) a cap of 128 took it from 0.268 to 0.246 ms, at 8 warps or 128-wide tiles it lost (bench/NOTES.md,
    # session 18), so the backward's tuner tries it on its winner
    key_maxnreg: int = 0
