"""The gate gradient's host side (launch.backward's last step): the two generated gate-backward launches
around a float64 scan of the chunk totals. `call` is the backward's launch.Call."""
from __future__ import annotations

import torch

from . import programs_backward
from .spec import GateLayout


def gate_backward(call, x, s_read, ds, final_terms, s_dtype, g_dtype, layout: GateLayout):
    """(ds, dg) from the slot backward's x and the key backward's ds (f32): the gate backward's two launches
    (programs_backward.gate_backward_totals, gate_backward) around `later_totals`. Where no mods follow, ds
    and (slot gates) dg are written in the inputs' dtypes; the other layouts sum the slot-wise dg here."""
    _, T, H, M = ds.shape
    grid, chunk_seq, chunk_idx = call.chunk_grid(H, ds)
    cu, offsets = call.tables(ds)
    totals = torch.zeros(call.n_chunk_rows, H, M, device=ds.device, dtype=call.acc_dtype)  # varlen: spare rows 0
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


def contiguous_copy(x: torch.Tensor, dtype) -> torch.Tensor:
    """A contiguous copy of x in `dtype`, in one copy kernel (x.to(dtype) keeps a permuted layout, and aliases x
    where the dtype matches, even with memory_format=torch.contiguous_format for fewer than 4 dimensions)."""
    return torch.empty(x.shape, device=x.device, dtype=dtype).copy_(x)


def later_totals(call, totals, final_terms):
    """[chunk rows, H, M]: for chunk row r of sequence n, the sum of `totals` over n's chunks after r, plus n's
    final-state terms (final_terms [N, H, M] or None), which join at its last token. Sums in float64 over the chunk
    rows (a tensor BT times smaller than dg), scanned with the rows innermost (a scan over an outer dim runs
    one thread per column: 0.2 ms at 512 chunk rows on the H200). Dense batches scan each sequence on its
    own (dg of a batch row is then the same, bit for bit, as when that row runs alone); a packed batch takes
    differences of one scan. Rows past the last chunk of a packed batch hold values no program reads."""
    H, M = totals.shape[1:]
    rows = contiguous_copy(totals.permute(1, 2, 0), torch.float64)  # [H, M, chunk rows]
    final = None if final_terms is None else final_terms.permute(1, 2, 0).double()  # [H, M, N]
    if call.offsets is None:
        prefix = rows.view(H, M, call.N, -1).cumsum(-1)  # [H, M, N, chunks per sequence]
        later = prefix[..., -1:] - prefix
        if final is not None:
            later += final[..., None]
        later = later.view(H, M, -1)
    else:
        ends = call.offsets[1:].long()
        seq = torch.searchsorted(ends, torch.arange(totals.shape[0], device=totals.device), right=True)
        seq = seq.clamp(max=call.N - 1)
        prefix = rows.cumsum(-1)
        later = prefix[..., (ends[seq] - 1).clamp(min=0)] - prefix
        if final is not None:
            later += final[..., seq]
    return contiguous_copy(later.permute(2, 0, 1), call.acc_dtype)
