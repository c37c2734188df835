"""The gate gradient's host side (launch.backward's last step): three generated launches, the chunks' totals of
dGamma, their sums over each sequence's later chunks (float64, on the device), then dg and ds. `call` is the
backward's launch.Call."""
from __future__ import annotations

import dataclasses

import torch

from . import codegen, programs_backward
from .spec import GateLayout, cdiv

LATER_ROWS = 64  # chunk rows of totals gate_backward_later sums per step (BR)


def gate_backward(call, x, s_read, ds, final_terms, s_dtype, g_dtype, layout: GateLayout):
    """(ds, dg) from the slot backward's x and the key backward's ds (f32): the gate backward's two launches
    (programs_backward.gate_backward_totals, gate_backward) around `later_totals`. Where no mods follow, ds
    and (slot gates) dg are written in the inputs' dtypes; the other layouts sum the slot-wise dg here."""
    _, T, H, M = ds.shape
    grid, chunk_seq, chunk_idx = call.chunk_grid(H, ds)
    cu, offsets = call.tables(ds)
    totals = call.f32(call.n_chunk_rows, H, M)  # (a packed batch's spare rows: never read)
    exact = call.mods is None  # else the mods' chain rule (mods.raw_gradients) takes them in f32
    ds_out = torch.empty_like(ds, dtype=s_dtype) if exact else ds
    dg = torch.empty_like(ds, dtype=g_dtype if exact and layout is GateLayout.SLOT else call.acc_dtype)
    rest = (dg, ds_out, cu, offsets, chunk_seq, chunk_idx, T, H, call.HQ, *s_read.stride()[:3])
    call.run(programs_backward.gate_backward_totals, grid, x, s_read, ds, totals, totals, *rest)  # (no `later` yet)
    later = later_totals(call, totals, final_terms)
    call.run(programs_backward.gate_backward, grid, x, s_read, ds, totals, later, *rest)
    if layout is GateLayout.HEAD:
        dg = dg.sum(3)
    elif layout is GateLayout.DECAY_HEAD:
        dg = dg.sum((0, 1, 3))
    elif layout is GateLayout.DECAY_SLOT:
        dg = dg.sum((0, 1))
    return ds_out, dg


def later_totals(call, totals, final_terms):
    """[chunk rows, H, M]: for chunk row r of sequence n, the sum of `totals` over n's chunks after r, plus n's
    final-state terms (final_terms [N, H, M] or None), which join at its last token: one launch of
    programs_backward.gate_backward_later (float64 sums; each sequence on its own, so a dense batch row's dg is
    the same, bit for bit, as when that row runs alone). Rows past the last chunk of a packed batch are not
    written (no program reads them)."""
    later = torch.empty_like(totals)
    H, M = totals.shape[1:]
    spec = dataclasses.replace(call.spec, mods="")  # (reads no input the mods map)
    call.wrap(codegen.kernel(programs_backward.gate_backward_later, spec))[(call.N * H,)](
        totals, totals if final_terms is None else final_terms, later, call.offsets if call.offsets is not None
        else totals, cdiv(call.T, call.spec.chunk_size), int(final_terms is not None), H,
        M=M, BM=call.spec.BM, BR=LATER_ROWS, num_warps=4)
    return later
