"""Segmented state passes (`GSA_STATE_SEGMENTS`): more programs for a few long sequences.

The state pass (programs.state_pass) runs one program per (K or V tile, sequence, kv head), each walking
its sequence's chunks in order: at B=1, H=4, K=V=512 that is 64 programs for 132 SMs. Both recurrences
are affine in the state, so each sequence is cut into S segments of whole chunks (the same algebra as
context_parallel, inside one device) and the generated programs run unchanged, as varlen launches
whose "sequences" are the segments:

  1. the state pass on the segments from a zero state: each segment's local end states F_j (the gate
     pass ran before, once for the whole call: gc, w and the chunk totals are chunk-local); this run
     stores no chunk states (Spec.chunk_states off: step 3 writes them all), so it only reads k, v and w;
  2. an exclusive scan over the segments, start_0 = initial state (or 0), start_{j+1} = A_j (.) start_j + F_j,
     with A_j = 2^(a_j) the segment's decay (a_j <= 0: the sum of its chunks' log2 gates, the gate pass's
     chunk totals gtot): one generated kernel (programs.segment_scan), S steps per (sequence, head, tile);
  3. the state pass again from start_j: every chunk state lands on the row the unsegmented pass
     writes (the segment table's chunk offsets), the last segment's final state is the final state.
The backward's recomputation, handed its forward's Plan (with the start states of step 2), runs step 3 only
where the forward's segment bounds fall on its chunks (the forward's chunk size a multiple of its own).
The state backward (programs_backward.state_backward) is the same in reverse: local gradients D_j from
zero (no chunk gradients stored; up to chunk 32 two chunks a step: state_backward's paired_walk), then
end_{S-1} = dH_final, end_{j-1} = A_j (.) end_j + D_j (programs.segment_scan_reverse), then the pass again.
(Until session 9 the scan was ~25 torch operations in float64, which cost ~1.3 ms of host time per forward on
the H200 machine: bench/NOTES.md "Session 9".)

Dense [B, T, H, D] inputs are read as one packed batch of B * T tokens, which needs k's and v's batch
stride to be T times their time stride (else, or with S = 1, the unsegmented pass runs; the gate pass's
outputs are contiguous).
Segment tables are built on the device (no host synchronisation); empty segments (S larger than a
sequence's chunk count) pass their state through.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from . import codegen, programs, programs_backward
from .spec import cdiv, next_power_of_2

ENV = "GSA_STATE_SEGMENTS"
DEFAULT_MIN_SEGMENTS = 4  # unset variable: segment only where it at least quadruples the programs
# ... and only sequences of at least this many chunks (mean if varlen): below, the two extra launches and the
# host work cost more than the shorter chain saves (H200, B1 H4 K=V=512, chunk 32, session 9: segmented
# slower at T = 2048 and 8192, even at 16384, faster at 32768; bench/NOTES.md "Session 9")
DEFAULT_MIN_CHUNKS = 512


def _eager_gpu(call) -> bool:
    """A real (not traced) call on a GPU: the unset variable's default applies only there, so compiled
    graphs keep the unsegmented pass (the segmented one is timed eagerly: bench/segments_bench.py)."""
    from .launch import untraced
    return call.device.type == "cuda" and call.plain_tensors and untraced()


def requested(call) -> int:
    """Segments per sequence from GSA_STATE_SEGMENTS: 0/1/off = off, an integer S, or `auto`: S with
    tiles * N * H * S about twice the SM count and at least 4 chunks per segment (CPU: at most 4).
    Unset: on a GPU, eagerly, for sequences of at least DEFAULT_MIN_CHUNKS chunks, `auto` rounded down to
    a power of two where that is >= 4 (H200, B1 T32768 H4 K=V=512: 32 programs, S = 8, state pass 2.55 ->
    1.08 ms), else off."""
    from .launch import _hint, _sm_count

    value = os.environ.get(ENV, "").strip().lower()
    default = value == ""
    if default:
        if not _eager_gpu(call):
            return 1
        value = "auto"
    if value in ("0", "1", "off"):
        return 1
    N, BT = _hint(call.N), call.spec.chunk_size
    if value == "auto":
        chunks = cdiv(_hint(call.B) * _hint(call.T), BT) // max(N, 1)  # per sequence (mean if varlen)
        if call.device.type == "cuda":
            programs_now = call.tiles() * N * call.H
            S = (2 * _sm_count(call.device)) // programs_now
        else:
            S = 4
        S = min(S, chunks // 4)
        if default:
            S = 1 << (S.bit_length() - 1) if S >= DEFAULT_MIN_SEGMENTS and chunks >= DEFAULT_MIN_CHUNKS else 1
    else:
        try:
            S = int(value)
        except ValueError:
            raise ValueError(f"{ENV}={value!r}: expected an integer number of segments or 'auto'") from None
        if S < 0:
            raise ValueError(f"{ENV}={value!r}: expected a non-negative integer or 'auto'")
    return max(1, S)


def packable(call, tensors) -> bool:
    """Dense [B, T, ...] tensors read as one packed batch: batch stride = T x time stride (or B = 1)."""
    if call.cu_seqlens is not None or call.B == 1:
        return True
    return all(x.stride(0) == call.T * x.stride(1) for x in tensors)


@dataclasses.dataclass
class Plan:
    """Segment tables of one call (device tensors): S segments per sequence, N * S segments in all."""
    S: int
    cu: torch.Tensor  # [N * S + 1] token bounds of the segments in the packed batch
    boc: torch.Tensor  # [N * S] chunk row of each segment's first chunk
    cut: torch.Tensor  # [N, S + 1] chunk rows at the segment bounds (sequence start .. sequence end)
    gtot: Optional[torch.Tensor] = None  # the gate pass's chunk totals, kept for the state backward's scan
    unit: int = 0  # the segments' bounds are multiples of this many tokens (the chunk size they were cut at)
    starts: Optional[tuple] = None  # (Hk, Hv) at each segment's start, f32 [N * S, H, ...], once a state pass ran


def _reusable(forward: Optional[Plan], BT: int) -> bool:
    """Whether a forward's segments (a Plan whose state pass ran) can serve a call at chunk size BT: their
    bounds fall on its chunks' bounds."""
    return forward is not None and forward.starts is not None and forward.unit % BT == 0


_DENSE = {}  # (device, N, T, BT, S, r) -> tables of dense inputs: built once, then no launches


def _dense_tables(N, T, BT, S, device, r=1):
    """(cu, boc, cut) of N rows of T tokens, from a few aranges (sizes may be symbolic): segments of whole
    chunks of r * BT tokens (r > 1: the bounds of segments cut at that chunk size, in chunks of BT)."""
    i64 = dict(device=device, dtype=torch.int64)
    NT = cdiv(T, BT)
    per = cdiv(cdiv(T, r * BT), S) * r  # chunks per segment
    first = (torch.arange(S + 1, **i64) * per).clamp_(max=NT)  # each segment's first chunk
    cut = torch.arange(0, N * NT, NT, **i64)[:, None] + first
    bos = torch.arange(0, N * T, T, **i64)[:, None]
    cu = torch.cat([(bos + (first[:S] * BT).clamp_(max=T)).reshape(-1), bos[-1] + T])
    return cu, cut[:, :S].reshape(-1), cut


def _varlen_tables(call, S, r=1):
    cu = call.cu_seqlens.long()
    bos, eos, boc, BT = cu[:-1], cu[1:], call.offsets[:-1].long(), call.spec.chunk_size
    n_chunks = torch.div(eos - bos + BT - 1, BT, rounding_mode="floor")
    n_units = torch.div(eos - bos + r * BT - 1, r * BT, rounding_mode="floor")  # chunks of r * BT tokens
    per = torch.div(n_units + S - 1, S, rounding_mode="floor") * r  # chunks per segment, per sequence
    first = torch.minimum(torch.arange(S + 1, device=cu.device)[None] * per[:, None], n_chunks[:, None])
    seg_bos = torch.minimum(bos[:, None] + first[:, :S] * BT, eos[:, None])
    cut = boc[:, None] + first
    return torch.cat([seg_bos.reshape(-1), eos[-1:]]), cut[:, :S].reshape(-1), cut


def plan(call, *strided, like: Optional[Plan] = None) -> Optional[Plan]:
    """The segment tables for `call`, or None where the unsegmented pass runs (off, S = 1, not packable).
    `like`: the forward's Plan of the same inputs; where its segments' bounds fall on this call's chunks, the
    plan takes them, with their start states (a backward then skips the first run and the scan)."""
    BT = call.spec.chunk_size
    reuse = _reusable(like, BT)
    S, r = (like.S, like.unit // BT) if reuse else (requested(call), 1)
    if S <= 1 or not packable(call, [x for x in strided if x is not None]):
        return None
    if call.cu_seqlens is not None:
        tables = _varlen_tables(call, S, r)
    else:
        key = (call.device, call.N, call.T, BT, S, r)
        static = all(type(x) is int for x in key[1:])  # not symbolic sizes (which do not hash)
        tables = _DENSE.get(key) if static else None
        if tables is None:
            tables = _dense_tables(*key[1:5], call.device, r)
            if static and all(type(x) is torch.Tensor for x in tables):  # real tensors only (not a trace's)
                from .launch import remember
                remember(_DENSE, key, tables, 64, call.device)
    return Plan(S, *tables, unit=r * BT, starts=like.starts if reuse else None)


# The scan's tiles: SCAN_ROWS chunk rows of gtot per load (BR: a whole segment's at B1 T32768 in chunks of 32 or
# 64 with S = 8) and SCAN_TILE rows of Hk (columns of Hv) a program, so that a state of K = V = 512 spreads over
# 32 programs per (sequence, kv head) rather than the state pass's 8: the walk is a chain of load waits, and
# more programs wait side by side.
SCAN_ROWS, SCAN_TILE = 128, 32


def scan_constants(state_pass: dict, S: int) -> dict:
    """The scan's constexprs, from the state pass's (`state_pass`: K, V, M, BK, BV, BM) and S segments."""
    BK, BV = min(SCAN_TILE, state_pass["BK"]), min(SCAN_TILE, state_pass["BV"])
    return dict(K=state_pass["K"], V=state_pass["V"], M=state_pass["M"], NK=cdiv(state_pass["K"], BK), BK=BK, BV=BV,
                BM=state_pass["BM"], BR=SCAN_ROWS, SP=next_power_of_2(S + 1))


def scan(call, p: Plan, local, edge, reverse: bool):
    """Segment-boundary states from the segments' local ones (see the module docstring), one launch.

    local: (Hk-like [N * S, H, K, M], Hv-like [N * S, H, M, V]) in the accumulator type; edge: the initial
    states (forward) or the final states' gradients (reverse), [N, H, ...] or None. Returns each segment's
    start state (forward) or end gradient (reverse), like `local`."""
    out = tuple(torch.empty_like(x) for x in local)
    spec = call.spec.replaced(varlen=False, initial_state=edge is not None, mods="")
    edge = local if edge is None else tuple(e.to(local[0].dtype).contiguous() for e in edge)  # (unused if None)
    builder = programs.segment_scan_reverse if reverse else programs.segment_scan
    consts = scan_constants(call.consts["state_pass"], p.S)
    tiles = consts["NK"] + cdiv(consts["V"], consts["BV"])
    call.wrap(codegen.kernel(builder, spec))[(tiles * call.N * call.H,)](
        *local, *edge, *out, p.gtot, p.cut, call.H, p.S, **consts, num_warps=4)
    return out


def state_pass(p: Plan, call, k, v, w, gtot, hk0, hv0, hk_chunks, hv_chunks):
    """launch.state_pass's state pass in three phases, after the gate pass (w, gtot): fills the chunk states in
    place and returns the final states, the last segment's end states (for one sequence a view of them: no
    copy, session 21's 9 us and two launches at B1 T32768)."""
    from .launch import _strides

    N, S, H = call.N, p.S, call.H
    grid = (call.tiles() * N * S * H,)
    strides = (*_strides(k), *_strides(v))
    hk_seg, hv_seg = call.f32(N * S, H, call.K, call.M), call.f32(N * S, H, call.M, call.V)
    segmented = call.spec.replaced(varlen=True, initial_state=False)
    p.gtot = gtot
    if p.starts is None:  # (a backward given its forward's segments has their start states: runs 1-2 done)
        local = segmented.replaced(chunk_states=False)  # the end states only: run 3 stores the chunks'
        call.run(programs.state_pass, grid, k, v, w, gtot, hk_chunks, hv_chunks, hk_seg, hv_seg, hk_seg, hv_seg,
                 p.cu, p.boc, call.T, H, *strides, spec=local)
        p.starts = scan(call, p, (hk_seg, hv_seg), None if hk0 is None else (hk0, hv0), reverse=False)
    call.run(programs.state_pass, grid, k, v, w, gtot, hk_chunks, hv_chunks, *p.starts, hk_seg, hv_seg, p.cu,
             p.boc, call.T, H, *strides, spec=segmented.replaced(initial_state=True))
    return _of_each_sequence((hk_seg, hv_seg), N, S, -1)


def state_backward(p: Plan, call, q, do, gc, prob, dl, dhk_chunks, dhv_chunks, dhk_final, dhv_final, scale):
    """launch's state backward in three phases (reverse scan): fills the chunk gradients and returns the initial
    states' gradients, the first segment's start gradients (for one sequence a view of them: no copy kernels,
    two launches fewer per backward, as the forward's final states)."""
    from .launch import _strides

    N, S, H = call.N, p.S, call.H
    grid = (call.tiles() * N * S * H,)
    spec = call.spec.replaced(varlen=True)
    d_end = tuple(call.read_only_zeros(N * S, *x.shape[1:]) for x in (dhk_final, dhv_final))  # the local runs' ends
    d_seg = call.f32(N * S, H, call.K, call.M), call.f32(N * S, H, call.M, call.V)
    tail = (call.T, H, call.HQ, scale, *_strides(q), *_strides(do))
    local = spec.replaced(chunk_states=False)  # the start gradients only: run 3 stores the chunks'
    call.run(programs_backward.state_backward, grid, q, do, gc, prob, dl, dhk_chunks, dhv_chunks, *d_end, *d_seg, p.cu,
             p.boc, *tail, spec=local)
    d_end = scan(call, p, d_seg, (dhk_final, dhv_final), reverse=True)
    call.run(programs_backward.state_backward, grid, q, do, gc, prob, dl, dhk_chunks, dhv_chunks, *d_end, *d_seg, p.cu,
             p.boc, *tail, spec=spec)
    return _of_each_sequence(d_seg, N, S, 0)


def _of_each_sequence(states, N: int, S: int, segment: int):
    """Segment `segment` of each sequence's states [N * S, ...] -> [N, ...]: a view for one sequence (no copy
    kernel), else a contiguous copy."""
    return tuple(x.view(N, S, *x.shape[1:])[:, segment].contiguous() for x in states)

