"""The gate gradient's host side (launch.backward's last step): two generated launches, the chunk totals of
dGamma summed over each sequence's later chunks (float64, from the chunk sums of x and s ds that the slot and
key backwards stored), then dg and ds. `call` is the backward's launch.Call."""
from __future__ import annotations

import torch

from . import codegen, programs_backward
from .spec import GateLayout, cdiv, next_power_of_2

# gate_backward_later's tiles: up to LATER_ROWS[1] chunk rows a step (BR: the next power of two of a sequence's
# chunks, at least LATER_ROWS[0]) by LATER_SLOTS slots a program (BM). Session 17's 64 rows by all M slots walked
# the 1024 chunk rows of B1 T32768 (chunk 32) in 16 steps with 4 programs: 0.048 ms, bound by the steps' latency;
# 256 rows by 16 slots (4 steps, 16 programs): 0.015 ms; 1024 by 4 (session 21): one step, 64 programs.
LATER_ROWS, LATER_SLOTS = (16, 1024), 4


def gate_backward(call, x, s_read, ds, chunk_sums, final_terms, s_dtype, g_dtype, layout: GateLayout):
    """(ds, dg) from the slot backward's x and the key backward's ds (f32) and their chunk sums (x_sum, s_ds_sum):
    `later_totals`, then programs_backward.gate_backward. Where no mods follow, ds and (slot gates) dg are
    written in the inputs' dtypes; the other layouts sum the slot-wise dg here."""
    _, T, H, M = ds.shape
    grid, chunk_seq, chunk_idx = call.chunk_grid(H, ds)
    cu, offsets = call.tables(ds)
    exact = call.mods is None  # else the mods' chain rule (mods.raw_gradients) takes them in f32
    ds_out = torch.empty_like(ds, dtype=s_dtype) if exact else ds
    dg = torch.empty_like(ds, dtype=g_dtype if exact and layout is GateLayout.SLOT else call.acc_dtype)
    later = later_totals(call, *chunk_sums, final_terms)
    call.run(programs_backward.gate_backward, grid, x, s_read, ds, later, dg, ds_out, cu, offsets, chunk_seq,
             chunk_idx, T, H, call.HQ, *s_read.stride()[:3])
    if layout is GateLayout.HEAD:
        dg = dg.sum(3)
    elif layout is GateLayout.DECAY_HEAD:
        dg = dg.sum((0, 1, 3))
    elif layout is GateLayout.DECAY_SLOT:
        dg = dg.sum((0, 1))
    return ds_out, dg


def later_totals(call, x_sum, s_ds_sum, final_terms):
    """[chunk rows, H, M]: for chunk row r of sequence n, the sum over n's chunks after r of their totals of dGamma
    (x_sum [chunk rows, HQ, M] over each kv head's query heads, minus s_ds_sum [chunk rows, H, M]), plus n's
    final-state terms (final_terms [N, H, M] or None), which join at its last token: one launch of
    programs_backward.gate_backward_later (float64 sums; each sequence on its own, so a dense batch row's dg is
    the same, bit for bit, as when that row runs alone). Rows past the last chunk of a packed batch are neither
    read nor written."""
    later = torch.empty_like(s_ds_sum)
    H, M = s_ds_sum.shape[1:]
    spec = call.spec.replaced(mods="")  # (reads no input the mods map)
    from .launch import _hint
    n_chunks = cdiv(call.T, call.spec.chunk_size)  # a dense row's; a packed batch's sequences have at most this many
    # (the tile sizes follow T's hint under a trace with a dynamic length: any size is exact, no guard is added)
    rows = min(LATER_ROWS[1], max(LATER_ROWS[0], next_power_of_2(_hint(n_chunks))))
    slots = min(LATER_SLOTS, call.spec.BM)
    call.wrap(codegen.kernel(programs_backward.gate_backward_later, spec))[(call.N * H, cdiv(M, slots))](
        x_sum, s_ds_sum, s_ds_sum if final_terms is None else final_terms, later,
        call.offsets if call.offsets is not None else s_ds_sum, n_chunks, int(final_terms is not None), H,
        x_sum.shape[1], M=M, G=x_sum.shape[1] // H, BM=slots, BR=rows, num_warps=8 if rows * slots >= 4096 else 4)
    return later
