"""Context parallelism: `chunk_gsa_cp`, GSA on a sequence split along time across the ranks of a group.

Convention. The ranks of `group` (0..R-1 in group order) each hold one contiguous slice of the time
axis of the same batch, rank 0 the first: q [B, T_r, HQ, K], k [B, T_r, H, K], v, s and a
data-dependent g likewise, T_r >= 1 (the T_r may differ). With `cu_seqlens` (B = 1, packed
sequences) every rank passes the same GLOBAL boundaries of the whole packed sequence,
0 = c_0 < ... < c_N = T_0 + ... + T_{R-1}; a sequence may cross any number of rank boundaries.
Tensors that are not split (constant decays g [H] / [H, M], `initial_state` [N, ...]) are passed
whole on every rank; the gradient each rank returns for them is its share: sum it over the group
(all_reduce), as data parallel does for parameters. `initial_state[n]` is read by the rank where
sequence n starts. Returns o [B, T_r, HQ, V] and, with output_final_state=True, (hk [N, H, K, M],
hv [N, H, M, V]) that hold sequence n's final state on the rank where n ends and zeros elsewhere (the
sum over the group is the whole). Every rank must call it with the same sizes, dtype, gate layout,
chunk size and cu_seqlens, and must backpropagate through its output o (the backward exchanges state
gradients with its neighbours, like a collective). Messages between two ranks are matched in call
order, so all ranks make their calls (and run their backwards) in the same order, as with
collectives; use a dedicated process group if other traffic (e.g. data-parallel gradient
reduction) could interleave with these point-to-point messages.

Math. Both recurrences are affine in the state. Over a span without a sequence start the state
leaving a rank is S_{r+1} = A_r (.) S_r + F_r (`combine`): F_r is what the span's tokens produce from
a zero state, A_r = exp(sum of g over the span) per slot, applied to Hk's M columns and Hv's M rows.
A span holding a sequence start sends the final state of its last sequence, independent of S_r.
Unrolled, S_r = sum_{i<r} (prod_{i<j<r} A_j) F_i up to the last sequence start: the exclusive scan
runs as a chain of point-to-point messages, rank r -> r+1, of B x H x (K M + M V) floats (1 x ... with
cu_seqlens: one sequence crosses a boundary). The backward sends the state gradients back along the
chain: E_r = dL/dS_r = (gradient from rank r's outputs) + A_r (.) E_{r+1}; F_r receives E_{r+1}.
ABC (g=None): the normaliser z_t = logcumsumexp(s) also crosses ranks, so the running log-sum-exp
of the slot logits travels the same way first ([B or 1, H, M] float64 per message).

Schedule and cost on rank r (T_r tokens; one "pass" = the work of chunk_gsa on them):
  a sequence starts in the slice at local position p: the tail [p, T_r) does not need the incoming
    state, so it runs first and its last sequence's state is sent at once; then the head [0, p)
    runs with the received state. One pass forward, one backward pass, as chunk_gsa.
  no sequence starts in the slice ("inside", e.g. every rank but 0 without cu_seqlens): the state
    pass alone (no outputs) gives F_r; receive S_r, send A_r S_r + F_r, then chunk_gsa's forward with
    S_r. Backward: chunk_backward for o (which gives the gradient at S_r), receive E_{r+1}, send
    E_r, then a second chunk_backward with do = 0 and the final-state gradient E_{r+1} (the kernels
    have no states-only backward, so this one costs a full backward pass). So chunk_gsa's forward
    plus its state pass, and twice its backward, on T_r tokens (bench/cp_sim.py measures it);
    the chain adds R-1 message latencies each way. Sends are asynchronous (isend) and overlap the
    compute that follows them; they are waited for at the end of the call.
No host synchronisation beyond reading cu_seqlens and one small all_gather of every rank's sizes
per call (skipped when `rank_lengths` is given).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops
from ..spec import (
    GateLayout,
    StateTuple,
    _validate_cu_seqlens,
    _validate_state,
    check_chunk_size,
    validate_inputs,
)
from .passes import (
    _Config,
    _ContextParallelAbcGate,
    _ContextParallelGSA,
    combine,
    decay_states,
    local_final_states,
    log_decay,
)
from .topology import IsolatedRank, RankSpan, SimulatedGroup, make_link, plan_span

__all__ = ["IsolatedRank", "RankSpan", "SimulatedGroup", "chunk_gsa_cp", "combine", "decay_states",
           "local_final_states", "log_decay", "plan_span"]

# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------

_AGREED = ("B", "HQ", "H", "K", "V", "M", "gate layout", "dtype", "chunk_size", "initial_state given",
           "cu_seqlens")
_LAYOUT_CODES = {layout: i for i, layout in enumerate(GateLayout)}
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _fingerprint(values) -> int:
    return -1 if values is None else hash(tuple(values)) & ((1 << 62) - 1)


def _global_bounds(cu_seqlens, B, device):
    """(values, N) of the global cu_seqlens; checked as chunk_gsa does, except the end (the total T)."""
    readable = (isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2
                and not cu_seqlens.is_floating_point())
    N = _validate_cu_seqlens(cu_seqlens, B, int(cu_seqlens[-1]) if readable else 0, device)
    return cu_seqlens.tolist(), N


def _rank_lengths(link, problem, chunk_size, has_initial, bounds, device, failure, rank_lengths):
    """Every rank's T_r, after checking that the ranks agree (one all_gather) or trusting `rank_lengths`."""
    if rank_lengths is not None:
        if failure is not None:
            raise failure
        lengths = list(rank_lengths)
        if len(lengths) != link.world or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
            raise ValueError(f"rank_lengths must list {link.world} positive ints (T_r of every rank), "
                             f"got {rank_lengths!r}")
        if lengths[link.rank] != problem.T:
            raise ValueError(f"rank_lengths[{link.rank}] = {lengths[link.rank]} but this rank's q has T = {problem.T} "
                             "tokens")
        return lengths
    if link.gather is None:
        raise ValueError("a SimulatedGroup rank needs rank_lengths (it cannot gather the ranks' sizes)")
    row = [1, 0] + [0] * len(_AGREED)
    if failure is None:
        row = [0, problem.T, problem.B, problem.HQ, problem.H, problem.K, problem.V, problem.M,
               _LAYOUT_CODES[problem.layout], _DTYPE_CODES[problem.dtype], chunk_size or 0, int(has_initial),
               _fingerprint(bounds)]
    rows = link.gather(torch.tensor(row, dtype=torch.int64, device=device))
    failed = [r for r, values in enumerate(rows) if values[0]]
    if failure is not None:
        raise failure
    if failed:
        raise ValueError(f"chunk_gsa_cp: rank(s) {failed} of the group rejected their inputs (see the error there)")
    for i, name in enumerate(_AGREED, start=2):
        values = [r[i] for r in rows]
        if len(set(values)) > 1:
            shown = values if name != "cu_seqlens" else "differ"
            raise ValueError(f"chunk_gsa_cp: {name} must be the same on every rank of the group, got {shown} "
                             f"(ranks 0..{link.world - 1})")
    return [r[1] for r in rows]


@torch.compiler.disable  # point-to-point messages and host reads: runs eagerly inside compiled models
def chunk_gsa_cp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                 g: torch.Tensor | None = None, scale: float | None = None, *, group=None,
                 initial_state: StateTuple | None = None, output_final_state: bool = False,
                 cu_seqlens: torch.Tensor | None = None, chunk_size: int | None = None, gate_layout=None,
                 rank_lengths: Sequence[int] | None = None) -> tuple[torch.Tensor, StateTuple | None]:
    """chunk_gsa on this rank's slice [B, T_r, ...] of a sequence split along time across `group`.

    See the module docstring for the convention (slices in rank order, GLOBAL cu_seqlens, shares of
    the gradients of unsplit tensors, final states on the rank where each sequence ends), the
    schedule and its cost. `group`: a torch.distributed ProcessGroup (None: the default group), or
    `SimulatedGroup(R).rank(r)` to run R ranks one after the other in one process, or
    `IsolatedRank(r, R)` to time one rank alone (neighbours answer zeros). `rank_lengths`:
    T_r of every rank; when given, the per-call all_gather that checks the ranks agree is skipped.
    Differentiable in q, k, v, s, g and initial_state; gradients come back to each rank's slices.
    """
    link = make_link(group)
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    failure, problem, bounds = None, None, None
    try:  # local checks; a failure is shared with the other ranks by the exchange below, so all raise
        problem = validate_inputs(q, k, v, s, g, scale, None, None, gate_layout)
        if chunk_size is not None:
            check_chunk_size(chunk_size)
        if problem.dtype == torch.float64 and not ops.INTERPRETER:
            raise TypeError("q has dtype float64: the GPU kernels take float32, float16 or bfloat16")
        N = problem.B
        if cu_seqlens is not None:
            bounds, N = _global_bounds(cu_seqlens, problem.B, device)
        if initial_state is not None:
            _validate_state("initial_state", initial_state, N, problem.H, problem.K, problem.M, problem.V, device)
    except (ValueError, TypeError) as error:
        failure = error
    lengths = _rank_lengths(link, problem, chunk_size, initial_state is not None, bounds, device, failure,
                            rank_lengths)
    if bounds is not None and bounds[-1] != sum(lengths):
        raise ValueError(f"cu_seqlens must end at the total length over the group, sum of T_r = {sum(lengths)} "
                         f"(T_r = {lengths}), got {bounds[-1]}")
    span = plan_span(link.rank, lengths, problem.B, bounds)

    layout = problem.layout
    if layout is GateLayout.ABC:
        g, s = _ContextParallelAbcGate.apply(span, link, s)
        layout = GateLayout.SLOT
    q, k, v, s, g = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, s, g))
    cfg = _Config(problem.scale, chunk_size or 0, layout, problem.H, problem.K, problem.V, problem.M, N,
                  torch.float64 if problem.dtype == torch.float64 else torch.float32, bool(output_final_state))
    hk0, hv0 = initial_state if initial_state is not None else (None, None)
    if not output_final_state:
        return _ContextParallelGSA.apply(span, link, cfg, q, k, v, s, g, hk0, hv0), None
    o, hk, hv = _ContextParallelGSA.apply(span, link, cfg, q, k, v, s, g, hk0, hv0)
    return o, (hk, hv)
