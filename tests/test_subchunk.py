"""The two forms of the sub-chunk terms (blocks.SubChunk, overrides.subchunk_form): GPUs run the output
pass's sweep over the sub-chunk's rows, the Triton interpreter (the rest of this CPU suite) runs the pairwise
[BC, BC, BM] form by default, which costs it a half to a third of the time. Here the sweep runs on CPU, in
the output pass and the slot backward:

1. Per case (every gate layout, varlen, GQA, chunks 16/32/64, T below/above/at the chunk, M not a power
   of two, each mod kind, initial states, head-first memory, fp16 and bf16): chunk_gsa with
   GSA_SUBCHUNK=sweep against recurrent_gsa (float64), outputs and gradients, within the project
   tolerances, and its o and final states against the pairwise form's (float32 1e-5; the same terms summed
   in another order).
2. The choice: the default per device and the variable's values.
3. The output pass's factored form (blocks.FactoredChunk) runs wherever a chunk's gates allow it, the exact
   sub-chunk form elsewhere, chunk by chunk in one call: against the reference and against the exact form
   everywhere (GSA_FACTORED=0, which 1. sets so that it tests the sub-chunk forms).
"""
import pytest
import torch
import torch.nn.functional as F

from differential import compare, failures, make_leaves, rel_err
from gsa_compile import chunk_gsa, overrides
from gsa_compile.blocks import FACTOR_SPREAD_MAX
from gsa_compile.reference import recurrent_gsa
from gsa_compile.spec import GATE_FLOOR

VARLEN = [0, 5, 40, 61]


def _case(layout, chunk, T=50, B=2, cu=None, H=1, group=1, M=6, mods="none", dtype="float32",
          initial_state=False, memory="contiguous", seed=0):
    return dict(chunk_size=chunk, layout=layout, dtype=dtype, memory=memory, B=1 if cu else B, cu_seqlens=cu,
                T=cu[-1] if cu else T, H=H, group=group, K=8, V=8, M=M, initial_state=initial_state,
                upstream="both", mods=mods, seed=seed)


CASES = [
    _case("slot", 16, seed=1),
    _case("slot", 32, T=20, B=1, group=2, seed=2),  # one chunk, T below it, GQA
    _case("head", 64, T=130, B=1, initial_state=True, seed=3),
    _case("decay_head", 16, cu=VARLEN, H=2, seed=4),
    _case("decay_slot", 32, cu=VARLEN, M=5, initial_state=True, seed=5),
    _case("abc", 16, T=32, group=3, seed=6),  # T at the chunk
    _case("slot", 16, mods="s_from_gate", seed=7),  # s read from the gate pass's mapped copy
    _case("slot", 32, mods="slot_mod", group=2, seed=8),
    _case("head", 16, mods="maps", memory="head_first", seed=9),
    _case("slot", 16, dtype="bfloat16", M=16, seed=10),
    _case("slot", 32, dtype="float16", T=40, seed=11),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['layout']}-c{c['chunk_size']}-{c['mods']}-{c['dtype']}")
def test_sweep_matches_reference_and_pairwise(case, monkeypatch):
    leaves, views = make_leaves(case, "cpu")
    monkeypatch.setenv(overrides.FACTORED_ENV, "0")  # every chunk in the sub-chunk forms
    monkeypatch.setenv(overrides.SUBCHUNK_ENV, "sweep")
    errors = compare(case, leaves, views)
    assert not failures(case, errors), errors
    if case["dtype"] != "float32" or case["mods"] != "none" or case["memory"] != "contiguous":
        return  # the reference comparison above covers these; the forms' difference is checked in float32
    args = [leaves[n].detach() for n in ("q", "k", "v", "s")] + [leaves["g"].detach() if "g" in leaves else None]
    initial = (leaves["hk0"].detach(), leaves["hv0"].detach()) if "hk0" in leaves else None
    cu = None if case["cu_seqlens"] is None else torch.tensor(case["cu_seqlens"], dtype=torch.int32)
    outputs = {}
    for form in ("sweep", "pairwise"):
        monkeypatch.setenv(overrides.SUBCHUNK_ENV, form)
        o, (hk, hv) = chunk_gsa(*args, initial_state=initial, output_final_state=True, cu_seqlens=cu,
                                chunk_size=case["chunk_size"])
        outputs[form] = (o, hk, hv)
    for a, b in zip(outputs["sweep"], outputs["pairwise"]):
        assert rel_err(a, b) <= 1e-5


def test_subchunk_form_choice(monkeypatch):
    monkeypatch.delenv(overrides.SUBCHUNK_ENV, raising=False)
    assert overrides.subchunk_form(torch.device("cuda")) == "sweep"
    assert overrides.subchunk_form(torch.device("cpu")) == "pairwise"
    monkeypatch.setenv(overrides.SUBCHUNK_ENV, "Sweep")
    assert overrides.subchunk_form(torch.device("cpu")) == "sweep"
    monkeypatch.setenv(overrides.SUBCHUNK_ENV, "pairwise")
    assert overrides.subchunk_form(torch.device("cuda")) == "pairwise"
    monkeypatch.setenv(overrides.SUBCHUNK_ENV, "both")
    with pytest.raises(ValueError, match=overrides.SUBCHUNK_ENV):
        overrides.subchunk_form(torch.device("cpu"))


def _spreads(g, chunk):
    """Per (batch row, head, chunk): the factored form's spread, max over slots of -min_t b (log2 units)."""
    B, T, H, M = g.shape
    b = F.pad(g.clamp(min=GATE_FLOOR).double(), (0, 0, 0, 0, 0, -T % chunk)).view(B, -1, chunk, H, M)
    return (-(b.cumsum(2) * 1.4426950408889634).amin(2)).amax(-1)


@pytest.mark.parametrize("chunk,form", [(16, "pairwise"), (32, "sweep")])
def test_factored_and_exact_chunks(chunk, form, monkeypatch):
    """Chunks with a few resets take the exact form, the others the factored one, in one call (the output
    pass and the slot backward): o, the final states and every gradient against the reference, and o against
    the exact form everywhere."""
    B, T, H, K, V, M = 2, 3 * chunk + 5, 2, 8, 8, 6
    gen = torch.Generator().manual_seed(chunk)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for D in (K, K, V))
    s = torch.rand(B, T, H, M, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, M, generator=gen))
    g[0, chunk + 3: chunk + 9] = float("-inf")  # six resets: spread 6 * 57.7, past what one factor can hold
    g[1, 2 * chunk + 1, 1, 2] = -30.0
    spreads = _spreads(g, chunk)
    assert (spreads > FACTOR_SPREAD_MAX).any() and (spreads <= FACTOR_SPREAD_MAX).any()
    do, dhk, dhv = torch.randn(B, T, H, V, generator=gen), torch.randn(B, H, K, M, generator=gen), \
        torch.randn(B, H, M, V, generator=gen)
    monkeypatch.setenv(overrides.SUBCHUNK_ENV, form)

    def run(fn, dtype):
        leaves = [x.to(dtype).clone().requires_grad_() for x in (q, k, v, s)]
        o, (hk, hv) = fn(*leaves, g.to(dtype), output_final_state=True)
        ((o * do.to(dtype)).sum() + (hk * dhk.to(dtype)).sum() + (hv * dhv.to(dtype)).sum()).backward()
        return [o, hk, hv] + [x.grad for x in leaves]

    reference = run(recurrent_gsa, torch.float64)
    outputs = {}
    for factored in ("1", "0"):
        monkeypatch.setenv(overrides.FACTORED_ENV, factored)
        outputs[factored] = run(lambda *a, **kw: chunk_gsa(*a, **kw, chunk_size=chunk), torch.float32)
    for name, x, r in zip(("o", "hk", "hv", "dq", "dk", "dv", "ds"), outputs["1"], reference):
        assert rel_err(x, r) <= 1e-5, name
    assert rel_err(outputs["1"][0], outputs["0"][0]) <= 1e-5


def test_factored_form_choice(monkeypatch):
    monkeypatch.delenv(overrides.FACTORED_ENV, raising=False)
    assert overrides.factored_form()
    monkeypatch.setenv(overrides.FACTORED_ENV, "0")
    assert not overrides.factored_form()
    monkeypatch.setenv(overrides.FACTORED_ENV, "yes")
    with pytest.raises(ValueError, match=overrides.FACTORED_ENV):
        overrides.factored_form()
