"""Host side of the generated kernels: buffers, grids and launches (no host synchronisation).

`forward(...)` runs the three forward programs of programs.py for one call. It is the body of
`torch.ops.gsa.chunk_forward`; `launcher` wraps each kernel (with `torch.library.wrap_triton`
inside a triton_op, so Inductor sees the kernels).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch

from . import codegen, mods, programs, programs_backward, segments
from .gate_gradient import gate_backward
from .overrides import (backward_override, call_environment, factored_form, forward_override,
                        maxnreg_override, subchunk_form, warps_override)
from .spec import GateLayout, Spec, TileConfig, cdiv

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}  # float64: interpreter only, for gradcheck
LOG2E = 1.4426950408889634


def untraced(*tensors) -> bool:
    """A real eager call: no compile trace, dispatch mode or functorch transform, and only plain tensors
    (not the fake or functional tensors of a trace) among `tensors` (None allowed)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and not torch._C._are_functorch_transforms_active()
            and all(x is None or type(x) is torch.Tensor for x in tensors))


def float32_copies(*states):
    """Fresh float32 copies of the states (the functional decode's new states)."""
    return tuple(torch.empty(x.shape, device=x.device, dtype=torch.float32).copy_(x) for x in states)


def chunk_layout(cu_seqlens: Optional[torch.Tensor], B: int, T: int, chunk_size: int):
    """(number of chunk-state rows, first chunk row per sequence, chunk -> (seq, index) maps).

    Without cu_seqlens every batch row has cdiv(T, BT) chunks. With it, the counts are computed on
    the device and the tensors are sized by the upper bound cdiv(T, BT) + N - 1, so no value is
    read back to the host; slots past the last chunk map to sequence -1.
    """
    if cu_seqlens is None:
        return B * cdiv(T, chunk_size), None, None, None
    n_seq = cu_seqlens.numel() - 1
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    counts = torch.div(lengths + chunk_size - 1, chunk_size, rounding_mode="floor")
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
    upper = cdiv(T, chunk_size) + n_seq - 1
    slots = torch.arange(upper, device=cu_seqlens.device, dtype=torch.int32)
    seq = torch.searchsorted(offsets[1:].contiguous(), slots, right=True).to(torch.int32)
    inside = seq < n_seq
    index = torch.where(inside, slots - offsets[seq.clamp(max=n_seq - 1).long()], 0)  # 0 past the last chunk
    seq = torch.where(inside, seq, torch.full_like(seq, -1))
    return upper, offsets, seq.contiguous(), index.to(torch.int32).contiguous()


def _strides(x: torch.Tensor):
    return x.stride()[:3]  # one call: host time


def unit_last_stride(*tensors):
    """The kernels read rows with a unit last stride and take every other stride as an argument: only a
    tensor whose last dimension is strided (or broadcast) is copied."""
    return tuple(x if x is None or x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous() for x in tensors)


def gate_for_kernels(g: torch.Tensor, layout: GateLayout) -> torch.Tensor:
    """g as the kernels read it: per-slot layouts need a unit slot stride; per-head ones use only
    stride(0..2) (head: [B, T, H]) or stride(0) (decay_head: [H]), so any strides do."""
    return unit_last_stride(g)[0] if layout in (GateLayout.SLOT, GateLayout.DECAY_SLOT) else g


def _gate_strides(g: torch.Tensor, layout: GateLayout):
    """(stride_gb, stride_gt, stride_gh) for each gate layout; the lowering rule zeroes the rest."""
    if layout in (GateLayout.SLOT, GateLayout.HEAD):
        return _strides(g)
    return 0, 0, g.stride(0)


# The slot backward keeps ~3x the output pass's tiles live (logits and dp side by side, then three
# [BC, BC, BM] pairwise blocks per sub-chunk). At the forward's tuned configs (4 warps, sub-chunks of 16)
# ptxas spills 3.2-10 KB per thread for it on sm_90 (bench/ptxas_report.py; ~7 GB of local-memory
# traffic on B8 T2048 H16 K=V=128); with 8 warps and sub-chunks of 8 it spills nothing at chunk 32 and
# 1.1 KB at chunk 64. The forward's tuning does not see this kernel, so it gets its own launch values.
SLOT_BACKWARD_WARPS, SLOT_BACKWARD_BC = 8, 8


def kernel_constants(spec: Spec, config: TileConfig, slot_bc: int = SLOT_BACKWARD_BC):
    """The constexpr arguments of every program (forward and backward) for a Spec and tile config."""
    BK, BV = spec.kv_tile(spec.K, config.BK), spec.kv_tile(spec.V, config.BV)
    common = dict(K=spec.K, V=spec.V, M=spec.M, BT=spec.chunk_size, BK=BK, BV=BV, BM=spec.BM)
    per_chunk = dict(G=spec.group, BC=spec.BC, **common)
    return {
        "gate_pass": dict(M=spec.M, BT=spec.chunk_size, BM=spec.BM),
        "state_pass": dict(NK=cdiv(spec.K, BK), **common),
        "output_pass": per_chunk,
        "slot_backward": dict(per_chunk, BC=min(slot_bc, spec.chunk_size)),
        "state_backward": dict(G=spec.group, NK=cdiv(spec.K, BK), **common),
        "key_backward": per_chunk,
        "gate_backward": dict(M=spec.M, G=spec.group, BT=spec.chunk_size, BM=spec.BM),
    }


AUTO = 0  # chunk_size value meaning "the tuned launch config for this GPU and problem"


def _hint(size) -> int:
    """A concrete value for a possibly symbolic size, without adding a guard (T stays dynamic)."""
    node = getattr(size, "node", None)
    return int(node.hint) if node is not None and node.hint is not None else int(size)


def tuned_config(layout, dtype, K, V, M, group, varlen, T, BH, device, direction="forward"):
    """(chunk_size, TileConfig, source) from the tuning cache: exact hit, nearest bucket or the default.
    A backward without a tuned backward entry (source "forward") takes the forward's config."""
    import types

    from . import tuner
    problem = types.SimpleNamespace(layout=layout, dtype=dtype, K=K, V=V, M=M, group=group, varlen=varlen)
    cache = tuner.default_cache(device)
    config, source = cache.lookup(tuner.TuningKey.make(problem, T=T, BH=BH, direction=direction))
    if direction == "backward" and source == "default":
        config, _ = cache.lookup(tuner.TuningKey.make(problem, T=T, BH=BH))
        source = "forward"
    return config.chunk_size, config.tile_config(), source


_ZEROS: dict = {}  # (shape, dtype, device) -> a zero tensor kernels only read (Call.read_only_zeros)
MAX_SHARED_ZEROS = (16, 1 << 22)  # at most 16 of them, each of at most 2^22 elements (16 MB in float32)
_PLANS: dict = {}  # eager calls' launch plans (Call.__init__), by sizes, flags, overrides and tuning generation
MAX_PLANS = 512  # emptied when full (distinct lengths of a long-running process)


def remember(cache: dict, key, value, limit: int, device=None):
    """cache[key] = value, the cache emptied first when it holds `limit` entries. A value of device tensors
    passes its device: nothing is kept while a CUDA graph is being captured there (the capture has not run the
    kernels that fill them yet)."""
    if device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


def tuning_generation(device) -> int:
    """The generation of `device`'s tuning cache: unique per cache object and reload (a record() reloads)."""
    from . import tuner
    return tuner.default_cache(device if device.type == "cuda" else "cpu").generation


def _plan(sizes, dtype, device, varlen, initial_state, chunk_size, layout, config, mods_key, slot_backward, direction):
    """(chunk_size, Spec, constexpr arguments per program, launch options, per-program launch options) of a call."""
    B, T, HQ, K, H, V, M = sizes
    override = forward_override() if direction == "forward" else None
    if override is not None:  # GSA_FORWARD_CONFIG (also for launch.state_pass alone: segments_bench.py)
        chunk_size, config = override
    if chunk_size == AUTO:
        chunk_size, config, source = tuned_config(layout, dtype, K, V, M, HQ // H, varlen, _hint(T), _hint(B) * HQ,
                                                  device if device.type == "cuda" else "cpu", direction)
        if direction == "backward" and source != "forward":  # a tuned backward chose its warps for every kernel
            slot_backward = (config.num_warps, slot_backward[1])
    spec = Spec(layout=layout, chunk_size=chunk_size, dtype=DTYPE_NAMES[dtype], K=K, V=V, M=M, group=HQ // H,
                varlen=varlen, initial_state=initial_state, final_state=True, mods=mods_key,
                subchunk=subchunk_form(device), factored=factored_form())
    config = config or TileConfig()
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    # the slot backward's warps: forced (GSA_BACKWARD_CONFIG), a tuned backward's, else at least 8 (its spills)
    slot_warps = slot_backward[0] or max(SLOT_BACKWARD_WARPS, config.num_warps)
    launch_of = {"slot_backward": dict(launch, num_warps=slot_warps)}
    if config.key_maxnreg:
        launch_of["key_backward"] = dict(launch, maxnreg=config.key_maxnreg)
    for name, warps in warps_override().items():
        launch_of[name] = dict(launch_of.get(name, launch), num_warps=warps)
    for name, cap in maxnreg_override().items():
        launch_of[name] = dict(launch_of.get(name, launch), maxnreg=cap)
    return chunk_size, spec, kernel_constants(spec, config, slot_backward[1]), launch, launch_of


class Call:
    """Sizes, Spec, constants and chunk tables of one forward or backward call."""

    def __init__(self, q, k, v, s, hk0, cu_seqlens, chunk_size, layout, config, wrap, mods_key="", mod_params=None,
                 slot_backward=(None, SLOT_BACKWARD_BC), direction="forward"):
        self.B, self.T = q.shape[:2]
        # head counts and dims are kernel constants: specialise on them even under dynamic shapes
        self.HQ, self.K, self.H, self.V, self.M = (int(x) for x in (q.shape[2], q.shape[3], k.shape[2], v.shape[3], s.shape[3]))
        self.N = self.B if cu_seqlens is None else cu_seqlens.numel() - 1
        self.plain_tensors = type(q) is torch.Tensor  # not a fake or functional tensor of a trace
        sizes = (self.B, self.T, self.HQ, self.K, self.H, self.V, self.M)
        static = (sizes, q.dtype, q.device, cu_seqlens is not None, hk0 is not None, chunk_size, layout, config,
                  mods_key, slot_backward, direction)
        # An eager call's launch plan is memoised (host time: ~30 us a call on the H200 machine); a trace's
        # sizes may be symbolic, so it plans every time. The key holds what the plan reads besides `static`:
        # the launch overrides' variables and the tuning cache's generation (a record() invalidates).
        key = (static, call_environment(), tuning_generation(q.device)) if self.plain_tensors else None
        plan = _PLANS.get(key) if key is not None else None
        if plan is None:
            plan = _plan(*static)
            if key is not None:
                remember(_PLANS, key, plan, MAX_PLANS)
        chunk_size, self.spec, self.consts, self.launch, self.launch_of = plan
        self.mods, self.mod_params = mods.lookup(mods_key), mod_params
        self.mod_args = {"mod_params": mod_params} if self.mods is not None and self.mods.n_params else {}
        self.wrap, self.device, self.cu_seqlens = wrap, q.device, cu_seqlens
        self.acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.n_chunk_rows, self.offsets, self.chunk_seq, self.chunk_idx = chunk_layout(cu_seqlens, self.B, self.T, chunk_size)
        self.segments = None  # the segment tables of a segmented state pass (segments.py), once it ran
        self.gates = None  # (gc, w, gtot, s as the kernels read it) of the gate pass, once it ran

    def f32(self, *shape):
        """An accumulator-precision buffer: float32, or float64 for float64 inputs."""
        return torch.empty(*shape, device=self.device, dtype=self.acc_dtype)

    def f32s(self, n: int, *shape):
        """n accumulator-precision buffers of `shape` (see `buffers`)."""
        return self.buffers(n, shape, self.acc_dtype)

    def buffers(self, n: int, shape, dtype):
        """n buffers of `shape` and `dtype`: one allocation for an eager call (n contiguous views; host time), n
        in a trace (whose kernels' mutations are tracked per tensor)."""
        if not self.plain_tensors:
            return tuple(torch.empty(*shape, device=self.device, dtype=dtype) for _ in range(n))
        return torch.empty(n, *shape, device=self.device, dtype=dtype).unbind(0)

    def read_only_zeros(self, *shape):
        """Zeros in the accumulator type that the kernels only read (an absent final-state gradient). Eager calls
        share one per shape: no allocation and no fill kernel per call; none is kept from a CUDA graph capture
        (whose fill has not run yet) or a trace (fake tensors), nor past MAX_SHARED_ZEROS."""
        key = (shape, self.acc_dtype, self.device)
        zeros = _ZEROS.get(key) if self.plain_tensors else None
        if zeros is None:
            zeros = torch.zeros(*shape, device=self.device, dtype=self.acc_dtype)
            if self.plain_tensors and zeros.numel() <= MAX_SHARED_ZEROS[1]:
                remember(_ZEROS, key, zeros, MAX_SHARED_ZEROS[0], self.device)
        return zeros

    def operand_rows(self, n: int, *shape):
        """n buffers of rows that the kernels that read them use only as tensor-core operands (the slot backward's
        p and dl weights for the state backward, its attention matrices for the key backward): bf16 when the
        inputs are bf16, as the products would round them (half the bytes, session 21), else `f32s`."""
        return self.buffers(n, shape, torch.bfloat16 if self.spec.dtype == "bfloat16" else self.acc_dtype)

    def final_states(self):
        """Accumulator-type buffers of the per-sequence states (or their gradients): [N, H, K, M], [N, H, M, V]."""
        return self.f32(self.N, self.H, self.K, self.M), self.f32(self.N, self.H, self.M, self.V)

    def chunk_state_buffers(self):
        """chunk_states of Hk and Hv (or their gradients): [chunk rows, H, K, M], [chunk rows, H, M, V]."""
        return self.chunk_states((self.n_chunk_rows, self.H, self.K, self.M), (self.n_chunk_rows, self.H, self.M, self.V))

    def chunk_states(self, *shapes):
        """Buffers of per-chunk states (or state gradients). The kernels only use them as bf16 operands
        of tensor-core products when the inputs are bf16, so they are stored in bf16 then (half the
        bytes, the same results); otherwise in the accumulator type (fp16's range is too small)."""
        dtype = torch.bfloat16 if self.spec.dtype == "bfloat16" else self.acc_dtype
        return tuple(torch.empty(*shape, device=self.device, dtype=dtype) for shape in shapes)

    def run(self, builder, grid, *args, spec: Optional[Spec] = None, **extra):
        """Launch `builder`'s kernel for this call's Spec (or `spec`: the segmented passes' variants) with its
        constants and launch options."""
        name = builder.__name__
        kernel = self.wrap(codegen.kernel(builder, spec or self.spec))
        kernel[grid](*args, **self.mod_args, **extra, **self.consts[name], **self.launch_of.get(name, self.launch))

    def tables(self, unused):
        """(cu_seqlens, chunk offsets) pointers, `unused` where the Spec compiles them out."""
        if self.cu_seqlens is None:
            return unused, unused
        return self.cu_seqlens, self.offsets

    def chunk_grid(self, heads, unused):
        """Grid and chunk maps of the per-chunk programs."""
        if self.cu_seqlens is None:
            return (cdiv(self.T, self.spec.chunk_size) * self.B * heads,), unused, unused
        return (self.chunk_seq.numel(), heads), self.chunk_seq, self.chunk_idx

    def tile_grid(self):
        return (self.tiles() * self.N * self.H,)

    def tiles(self) -> int:
        """State-pass tiles per (sequence, kv head): NK of Hk rows, then those of Hv columns."""
        return self.consts["state_pass"]["NK"] + cdiv(self.V, self.consts["state_pass"]["BV"])


def gate_pass(call: Call, s, g):
    """(gc, w, gtot, s for the later programs): the gate pass (programs.gate_pass) over every chunk.

    Where the Spec's mods store mapped inputs (mods.STORED_MAPS: s with s_from_gate), it writes them to
    contiguous copies in the input dtype, and the s returned is that copy, which the later programs read
    with no map; otherwise it is s itself. w is kept in bf16 for bf16 inputs (the state pass's products
    round it to bf16 anyway), else in the accumulator type."""
    H, M = call.H, call.M
    stored = call.mods.stored if call.mods is not None else ()
    copies = {f"mapped_{name}": torch.empty(x.shape, device=x.device, dtype=x.dtype)  # s has the inputs' dtype
              for name, x in (("s", s),) if name in stored}
    gc = call.f32(call.B, call.T, H, M)
    w = torch.empty(call.B, call.T, H, M, device=call.device,
                    dtype=torch.bfloat16 if call.spec.dtype == "bfloat16" else call.acc_dtype)
    gtot = call.f32(call.n_chunk_rows, H, M)
    cu, offsets = call.tables(gc)
    grid, chunk_seq, chunk_idx = call.chunk_grid(H, gc)
    call.run(programs.gate_pass, grid, s, g, gc, w, gtot, cu, offsets, chunk_seq, chunk_idx, call.T, H,
             *_strides(s), *_gate_strides(g, call.spec.layout), **copies)
    return gc, w, gtot, copies.get("mapped_s", s)


def state_pass(call: Call, k, v, s, g, hk0, hv0, forward_segments=None, gates=None):
    """(gate cumsum, s for the later programs, chunk-start states of Hk and Hv, final states): the gate
    pass (unless `gates`, its outputs from a forward at this chunk size), then the state pass (segmented where
    segments.plan says so; a backward's recomputation with its forward's segments, `forward_segments`, takes
    their start states where their bounds fall on its chunks)."""
    call.gates = gc, w, gtot, s_read = gates if gates is not None else gate_pass(call, s, g)
    hk_chunks, hv_chunks = call.chunk_state_buffers()
    plan = segments.plan(call, k, v, like=forward_segments)
    if plan is not None:  # GSA_STATE_SEGMENTS: segments of each sequence in parallel (segments.py)
        initial = (None, None) if hk0 is None else (hk0.to(call.acc_dtype), hv0.to(call.acc_dtype))
        hk_final, hv_final = segments.state_pass(plan, call, k, v, w, gtot, *initial, hk_chunks, hv_chunks)
        call.segments = plan
        return gc, s_read, hk_chunks, hv_chunks, hk_final, hv_final
    hk_final, hv_final = call.final_states()
    cu, offsets = call.tables(hk_final)
    hk0 = hk0.to(call.acc_dtype).contiguous() if hk0 is not None else hk_final  # unused when the Spec has none
    hv0 = hv0.to(call.acc_dtype).contiguous() if hv0 is not None else hv_final
    call.run(programs.state_pass, call.tile_grid(),
             k, v, w, gtot, hk_chunks, hv_chunks, hk0, hv0, hk_final, hv_final, cu, offsets,
             call.T, call.H, *_strides(k), *_strides(v))
    return gc, s_read, hk_chunks, hv_chunks, hk_final, hv_final


def forward(q, k, v, s, g, scale: float, hk0, hv0, cu_seqlens, chunk_size: int, layout: GateLayout,
            config: Optional[TileConfig] = None, wrap: Callable = lambda kernel: kernel, mods_key: str = "",
            mod_params: Optional[torch.Tensor] = None, keep_states: bool = False, keep_segments: bool = False):
    """Run the forward; returns (o, hk_final [N,H,K,M] f32, hv_final [N,H,M,V] f32), and with keep_states
    what `backward(kept=...)` takes instead of recomputing the states (checkpoint_level 0), or None where the
    backward will run at another chunk size; with keep_segments, a ForwardRecord, which
    `backward(forward_record=...)` takes to skip what it holds.

    With mods (mods.py), q, k, v, s, g are the raw inputs the kernels map on load."""
    q, k, v, s = unit_last_stride(q, k, v, s)
    g = gate_for_kernels(g, layout)
    call = Call(q, k, v, s, hk0, cu_seqlens, chunk_size, layout, config, wrap, mods_key, mod_params)
    o = torch.empty(call.B, call.T, call.HQ, call.V, device=q.device, dtype=q.dtype)
    loff, pd = call.f32s(2, call.B, call.T, call.HQ, call.M)  # the exact form's scratch rows
    aqk, attd = call.f32s(2, call.B, call.T, call.HQ, call.spec.chunk_size)
    cu, offsets = call.tables(o)
    gc, s_read, hk_chunks, hv_chunks, hk_final, hv_final = state_pass(call, k, v, s, g, hk0, hv0)
    grid, chunk_seq, chunk_idx = call.chunk_grid(call.HQ, hk_final)
    call.run(programs.output_pass, grid,
             q, k, v, s_read, gc, hk_chunks, hv_chunks, o, aqk, loff, pd, attd, cu, offsets, chunk_seq, chunk_idx,
             call.T, call.H, call.HQ, scale * LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(s_read))
    if not (keep_states or keep_segments):
        return o, hk_final, hv_final
    backward = backward_call(q, k, v, s, hk0, cu_seqlens, chunk_size, layout, None, wrap, mods_key, mod_params)
    same_chunks = backward.spec.chunk_size == call.spec.chunk_size
    if keep_states:  # the backward's Call with the states, where it runs at this chunk size (else none kept)
        kept = (backward, call.gates[2], gc, s_read, hk_chunks, hv_chunks, hk_final, hv_final)
        return o, hk_final, hv_final, kept if same_chunks else None
    return o, hk_final, hv_final, ForwardRecord(backward, call.segments, call.gates if same_chunks else None)


class ForwardRecord(NamedTuple):
    """What forward(keep_segments=True) leaves its backward, which then recomputes less: the backward's Call
    (made here rather than there), the segmented state pass's plan with its start states (or None), and the
    gate pass's outputs where the backward runs at the forward's chunk size (else None). Held from forward to
    backward: N * S start states, and then gc (f32) and w (as the chunk states), B T H M each (shape 3: 50 MB);
    the backward skips its gate pass (session 21: ~0.03 ms at B1 T32768 H4 K=V=512)."""
    backward: Call
    plan: Optional[segments.Plan]
    gates: Optional[tuple]


def backward_call(q, k, v, s, hk0, cu_seqlens, chunk_size: int, layout: GateLayout, config, wrap, mods_key,
                  mod_params, slot_warps: Optional[int] = None) -> Call:
    """The backward's Call: GSA_BACKWARD_CONFIG, else the tuned backward entry (chunk_size AUTO), else the forward's."""
    override, slot = backward_override(), (slot_warps, SLOT_BACKWARD_BC)
    if override is not None:
        chunk_size, config, slot = override
    return Call(q, k, v, s, hk0, cu_seqlens, chunk_size, layout, config, wrap, mods_key, mod_params, slot, "backward")


def backward(do, dhk_final, dhv_final, q, k, v, s, g, scale: float, hk0, hv0, cu_seqlens, chunk_size: int,
             layout: GateLayout, config: Optional[TileConfig] = None, wrap: Callable = lambda kernel: kernel,
             mods_key: str = "", mod_params: Optional[torch.Tensor] = None, slot_warps: Optional[int] = None,
             kept=None, forward_record: Optional["ForwardRecord"] = None):
    """Gradients of chunk_forward: (dq, dk, dv, ds, dg, dhk0, dhv0, d mod_params). Recomputes the forward states.

    With mods, the kernels' gradients w.r.t. the mapped inputs go through the mods' chain rule on the
    host; d mod_params is empty without captured tensors. chunk_size AUTO takes the tuned backward
    entry (tuner.TuningKey direction "backward", whose warps the slot backward uses too), else the
    forward's; `slot_warps` forces the slot backward's warps (the tuner times a backward entry so). `kept`
    (forward(keep_states=True)) replaces the recomputation: the backward's Call, made by the forward at its own
    chunk size (so `config` and `slot_warps` do not apply), and the forward's gate totals, gc, s and states.
    `forward_record` (forward(keep_segments=True)): its backward Call (so `config` and `slot_warps` do not
    apply) and its gate pass's outputs where they are at that Call's chunk size; the recomputation starts from
    the forward's segment start states where it segments at bounds that fall on its chunks (bit for bit the
    chunk states it would recompute at the forward's chunk size)."""
    q, k, v, s, do = unit_last_stride(q, k, v, s, do)
    g = gate_for_kernels(g, layout)
    if kept is not None:
        call, gate_totals, gc, s_read, hk_chunks, hv_chunks, hk_final, hv_final = kept
        call.segments = segments.plan(call, k, v)  # the state backward's segments (its tiles may differ)
        if call.segments is not None:
            call.segments.gtot = gate_totals
    elif forward_record is not None:
        call = forward_record.backward
        gc, s_read, hk_chunks, hv_chunks, hk_final, hv_final = state_pass(call, k, v, s, g, hk0, hv0,
                                                                          forward_record.plan, forward_record.gates)
    else:
        call = backward_call(q, k, v, s, hk0, cu_seqlens, chunk_size, layout, config, wrap, mods_key, mod_params,
                             slot_warps)
        gc, s_read, hk_chunks, hv_chunks, hk_final, hv_final = state_pass(call, k, v, s, g, hk0, hv0)
    B, T, HQ, H, K, V, M = call.B, call.T, call.HQ, call.H, call.K, call.V, call.M
    cu, offsets = call.tables(hk_final)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    x, dsi, loff, dpoff, dsd = call.f32s(5, B, T, HQ, M)
    p, dl = call.operand_rows(2, B, T, HQ, M)
    x_sum, s_ds_sum = call.f32(call.n_chunk_rows, HQ, M), call.f32(call.n_chunk_rows, H, M)  # the gate's chunk totals
    att_dl, att_p = call.operand_rows(2, B, T, HQ, call.spec.chunk_size)
    aqk, adov, attd, attd_p = call.f32s(4, B, T, HQ, call.spec.chunk_size)
    grid, chunk_seq, chunk_idx = call.chunk_grid(HQ, hk_final)
    n_terms = len(call.mods.slot_leaves) if call.mods is not None else 0
    terms = {"mod_terms": call.f32(B, T, HQ, n_terms, M)} if n_terms else {}  # slot_mod parameter terms
    call.run(programs_backward.slot_backward, grid,
             q, k, v, s_read, gc, hk_chunks, hv_chunks, do, dq, p, dl, x, x_sum, att_dl, att_p, dsi, aqk, adov, loff,
             dpoff, attd, attd_p, dsd, cu, offsets, chunk_seq, chunk_idx,
             T, H, HQ, scale, scale * LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(s_read),
             *_strides(do), **terms)

    dhk_chunks, dhv_chunks = torch.empty_like(hk_chunks), torch.empty_like(hv_chunks)
    given = dhk_final is not None, dhv_final is not None  # autograd passes None for an unused final state
    dhk_final = dhk_final.to(call.acc_dtype).contiguous() if given[0] else call.read_only_zeros(*hk_final.shape)
    dhv_final = dhv_final.to(call.acc_dtype).contiguous() if given[1] else call.read_only_zeros(*hv_final.shape)
    if call.segments is not None and segments.packable(call, (q, do)):  # the recomputed forward's segments
        dhk0, dhv0 = segments.state_backward(call.segments, call, q, do, gc, p, dl, dhk_chunks, dhv_chunks,
                                             dhk_final, dhv_final, scale)
    else:
        dhk0, dhv0 = call.final_states()
        call.run(programs_backward.state_backward, call.tile_grid(),
                 q, do, gc, p, dl, dhk_chunks, dhv_chunks, dhk_final, dhv_final, dhk0, dhv0, cu, offsets,
                 T, H, HQ, scale, *_strides(q), *_strides(do))

    dk = torch.empty(B, T, H, K, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, T, H, V, device=q.device, dtype=v.dtype)
    ds = call.f32(B, T, H, M)
    grid, chunk_seq, chunk_idx = call.chunk_grid(H, hk_final)
    call.run(programs_backward.key_backward, grid,
             q, k, v, s_read, gc, do, att_dl, att_p, dsi, dhk_chunks, dhv_chunks, dk, dv, ds, s_ds_sum, cu, offsets,
             chunk_seq, chunk_idx, T, H, HQ, scale, *_strides(q), *_strides(k), *_strides(v), *_strides(s_read),
             *_strides(do))

    # dg's terms from the final states' gradients, which join at each sequence's last token: [N, H, M], or none
    final_terms = (dhk_final * hk_final).sum(2) + (dhv_final * hv_final).sum(3) if any(given) else None
    # s as the kernels used it: where the mods map s, the gate pass's copy (mods.STORED_MAPS holds every mapped s)
    ds, dg = gate_backward(call, x, s_read, ds, (x_sum, s_ds_sum), final_terms, s.dtype, g.dtype, layout)
    grads = {"q": dq, "k": dk, "v": dv, "s": ds, "g": dg}
    dparams = torch.empty(0, device=q.device, dtype=torch.float32)
    if call.mods is not None:
        grads, dparams = call.mods.raw_gradients(dict(q=q, k=k, v=v, s=s, g=g), grads, mod_params,
                                                 terms.get("mod_terms"), cu_seqlens)
    dq, dk, dv, ds, dg = (grads[n] for n in "qkvsg")
    # in the inputs' dtypes (a no-op .to() still costs a dispatch: host time)
    ds, dg = (grad if grad.dtype == like.dtype else grad.to(like.dtype) for grad, like in ((ds, s), (dg, g)))
    return dq, dk, dv, ds, dg.contiguous(), dhk0, dhv0, dparams


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
