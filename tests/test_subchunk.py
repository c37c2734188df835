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
"""
import pytest
import torch

from differential import compare, failures, make_leaves, rel_err
from gsa_compile import chunk_gsa, overrides

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
