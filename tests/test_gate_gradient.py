"""gate_gradient.later_totals (programs_backward.gate_backward_later): each chunk row's sum over its sequence's
later chunks of their totals of dGamma (x_sum over a kv head's query heads minus s_ds_sum), plus the sequence's
final-state terms, against a float64 loop in torch. Sequences of 0 to 150 chunks (the kernel reads up to 256 rows
per step; smaller caps give many steps), slots in one tile or several (the last one masked), dense and packed, GQA,
with and without the final-state terms."""
import pytest
import torch

from gsa_compile import gate_gradient, launch
from gsa_compile.spec import GateLayout

BT = 16


def _call(B, T, cu_seqlens, H, G, M):
    q, k, v, s = torch.randn(B, T, H * G, 8), torch.randn(B, T, H, 8), torch.randn(B, T, H, 8), torch.randn(B, T, H, M)
    return launch.Call(q, k, v, s, None, cu_seqlens, BT, GateLayout.SLOT, None, lambda kernel: kernel)


def _expected(totals, sequences, final):
    """Row by row in float64: later[r] = sum of totals[r + 1 : end of r's sequence] + final[sequence]."""
    want = torch.full_like(totals, float("nan"))
    for n, (first, end) in enumerate(sequences):
        carry = final[n].double() if final is not None else torch.zeros_like(totals[0])
        for r in reversed(range(first, end)):
            want[r] = carry
            carry = carry + totals[r]
    return want


@pytest.mark.parametrize("tiles", [None, ((16, 64), 2), ((16, 16), 4)])  # (LATER_ROWS, LATER_SLOTS); None: as set
@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize("varlen, G", [(False, 1), (True, 2)])
def test_later_totals_match_a_float64_loop(varlen, G, final, tiles, monkeypatch):
    if tiles is not None:
        monkeypatch.setattr(gate_gradient, "LATER_ROWS", tiles[0])
        monkeypatch.setattr(gate_gradient, "LATER_SLOTS", tiles[1])
    gen = torch.Generator().manual_seed(int(varlen) * 2 + int(final))
    H, M = 2, 6  # M below the slot tile: padded slots masked
    if varlen:
        lengths = [150 * BT - 3, 1, 0, 64 * BT, 65 * BT + 5]  # 150, 1, 0, 64 and 66 chunks
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
        call = _call(1, int(cu[-1]), cu, H, G, M)
        offsets = call.offsets.tolist()
        sequences = list(zip(offsets[:-1], offsets[1:]))
    else:
        B, T = 3, 130 * BT + 7  # 131 chunks per row
        call = _call(B, T, None, H, G, M)
        sequences = [(n * 131, (n + 1) * 131) for n in range(B)]
    x_sum = torch.randn(call.n_chunk_rows, H * G, M, generator=gen)
    s_ds_sum = torch.randn(call.n_chunk_rows, H, M, generator=gen)
    terms = torch.randn(call.N, H, M, generator=gen) if final else None
    got = gate_gradient.later_totals(call, x_sum, s_ds_sum, terms)
    totals = x_sum.double().view(-1, H, G, M).sum(2) - s_ds_sum.double()
    want = _expected(totals, sequences, terms)
    rows = [r for first, end in sequences for r in range(first, end)]
    assert rows, "no chunk rows"
    torch.testing.assert_close(got[rows].double(), want[rows], rtol=1e-6, atol=1e-6)
