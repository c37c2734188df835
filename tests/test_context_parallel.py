"""Context parallelism (`chunk_gsa_cp`): a sequence split along time over 2 and 4 gloo processes
reproduces single-process chunk_gsa on the whole sequence, outputs, final states and every gradient.

1. One `torch.multiprocessing.spawn` per world size (2, 4): the children loop over all cases (every
   gate layout, GQA, initial states, varlen with sequences crossing rank boundaries, a rank inside
   one sequence, a boundary exactly at a rank start, slices that are not multiples of the chunk)
   and return their slices' results; the parent compares them with chunk_gsa on the full sequence
   (float32, 1e-5; dg against the summed magnitudes of its per-token terms, as test_fuzz: a decay
   layout's dg is one sum over every token whose terms cancel) and the outputs with the float64 reference. The children also check that a
   mismatch between ranks, or a bad input on one rank, raises on every rank (no hang).
2. `SimulatedGroup` (R ranks one after the other in one process) on one case.
3. `plan_span` invariants (pure Python) and argument errors.

Gates are kept slow (log gates near 0) so that the state crossing a boundary still matters tokens
later: with logsigmoid(randn) gates it would fade within a few tokens and hide a wrong carry.
"""
import itertools
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from gsa_compile import chunk_gsa, chunk_gsa_cp, recurrent_gsa
from slow import slow_param
from gsa_compile.benchmark import rel
from gsa_compile.context_parallel import SimulatedGroup, plan_span
from gsa_compile.reference import gate_gradient_scale

D, T_TOTAL, CHUNK, TOL, REF_TOL = 16, 64, 16, 1e-5, 1e-4
# The gloo children run the kernels in the Triton interpreter on CPU tensors; this process (the
# single-process reference, the simulated group) uses the GPU when there is one (fp32 dots are IEEE).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SPLITS = {2: [40, 24], 4: [16, 20, 12, 16]}  # rank starts 0, 40 / 0, 16, 36, 48
# BOUNDS_A: with 4 ranks, rank 1 lies inside sequence 1, rank 3 starts exactly at a sequence start;
# with 2 ranks, rank 1 holds the end of sequence 1 (8 tokens) and then two whole sequences.
BOUNDS_A = [0, 10, 48, 52, 64]
BOUNDS_B = [0, 37, 64]  # 4 ranks: rank 2 holds one token of sequence 0 and then starts sequence 1
# name, gate layout, B, HQ, H, cu_seqlens values (None: B whole sequences), initial state
CASES = [
    ("slot", "slot", 2, 1, 1, None, True),
    ("head-gqa", "head", 1, 2, 1, None, False),
    ("decay_head", "decay_head", 1, 2, 2, None, True),
    ("decay_slot", "decay_slot", 2, 1, 1, None, False),
    ("abc-gqa", "abc", 1, 2, 1, None, True),
    ("varlen-slot-gqa", "slot", 1, 2, 1, BOUNDS_A, True),
    ("varlen-abc", "abc", 1, 1, 1, BOUNDS_B, True),
    ("varlen-decay_head", "decay_head", 1, 1, 1, BOUNDS_A, True),  # 2 ranks: rank 1 sums two shares of dg
    ("varlen-head", "head", 1, 1, 1, BOUNDS_B, False),
]


def make_case(layout, B, HQ, H, bounds, initial, seed, T=T_TOTAL):
    """Inputs, upstream gradients (do, dhk, dhv) and the names of the differentiable inputs."""
    gen = torch.Generator().manual_seed(seed)
    N = B if bounds is None else len(bounds) - 1
    x = {"q": torch.randn(B, T, HQ, D, generator=gen), "k": torch.randn(B, T, H, D, generator=gen),
             "v": torch.randn(B, T, H, D, generator=gen)}
    x["s"] = torch.randn(B, T, H, D, generator=gen) if layout == "abc" else torch.rand(B, T, H, D, generator=gen)
    x["g"] = {"slot": lambda: F.logsigmoid(torch.randn(B, T, H, D, generator=gen) + 3),
              "head": lambda: F.logsigmoid(torch.randn(B, T, H, generator=gen) + 3),
              "decay_head": lambda: -0.05 * torch.rand(H, generator=gen),
              "decay_slot": lambda: -0.05 * torch.rand(H, D, generator=gen), "abc": lambda: None}[layout]()
    if initial:
        x["hk0"], x["hv0"] = torch.randn(N, H, D, D, generator=gen), torch.randn(N, H, D, D, generator=gen)
    upstream = {"do": torch.randn(B, T, HQ, D, generator=gen), "dhk": torch.randn(N, H, D, D, generator=gen),
                "dhv": torch.randn(N, H, D, D, generator=gen)}
    names = [n for n in ("q", "k", "v", "s", "g", "hk0", "hv0") if x.get(n) is not None]
    return x, upstream, names


def split_names(layout):
    """Inputs each rank holds a time slice of (the others are whole on every rank)."""
    return {"q", "k", "v", "s"} | ({"g"} if layout in ("slot", "head") else set())


def rank_slice(name, tensor, layout, start, stop):
    return tensor[:, start:stop] if name in split_names(layout) else tensor


def run_rank(case, rank, lengths, group, rank_lengths=None, final_state=True):
    """One rank's chunk_gsa_cp on its slice: (o, hk, hv, loss <o, do> + <finals, d>, its input leaves)."""
    layout, bounds, x, upstream, names = case["layout"], case["bounds"], case["x"], case["upstream"], case["names"]
    start, stop = sum(lengths[:rank]), sum(lengths[:rank + 1])
    local = {n: rank_slice(n, x[n], layout, start, stop).clone().requires_grad_() for n in names}
    cu = None if bounds is None else torch.tensor(bounds, dtype=torch.int32, device=x["q"].device)
    initial = (local["hk0"], local["hv0"]) if "hk0" in local else None
    o, finals = chunk_gsa_cp(local["q"], local["k"], local["v"], local["s"], local.get("g"), group=group,
                               initial_state=initial, output_final_state=final_state, cu_seqlens=cu,
                               chunk_size=CHUNK, rank_lengths=rank_lengths)
    assert (finals is None) != final_state
    hk, hv = finals or (None, None)
    loss = (o * upstream["do"][:, start:stop]).sum()
    if final_state:
        loss = loss + (hk * upstream["dhk"]).sum() + (hv * upstream["dhv"]).sum()
    return o, hk, hv, loss, local


def detached(o, hk, hv, names, grads):
    return {"o": o.detach(), "hk": None if hk is None else hk.detach(), "hv": None if hv is None else hv.detach(),
            "grads": dict(zip(names, grads))}


def expect_error_everywhere(case, lengths, mutate_rank, mutation, match):
    """A bad argument on one rank must raise ValueError/TypeError on every rank (nobody hangs)."""
    rank = dist.get_rank()
    start, stop = sum(lengths[:rank]), sum(lengths[:rank + 1])
    x = {n: rank_slice(n, t, case["layout"], start, stop) for n, t in case["x"].items() if t is not None}
    if rank == mutate_rank:
        x = mutation(x)
    try:
        chunk_gsa_cp(x["q"], x["k"], x["v"], x["s"], x.get("g"), chunk_size=CHUNK)
    except (ValueError, TypeError) as error:
        return match in str(error) or f"rank(s) [{mutate_rank}]" in str(error), str(error)
    return False, "no error"


def gloo_worker(rank, world, workdir):
    import conftest  # noqa: F401  (a spawned child: the test-only interpreter patches, as in the parent)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world)
    cases = torch.load(os.path.join(workdir, "cases.pt"))
    lengths = SPLITS[world]
    results = []
    for case in cases:
        o, hk, hv, loss, local = run_rank(case, rank, lengths, None)
        grads = torch.autograd.grad(loss, [local[n] for n in case["names"]])
        results.append(detached(o, hk, hv, case["names"], grads))
    slot = cases[0]
    narrow_k = lambda x: {**x, "k": x["k"][..., :8], "q": x["q"][..., :8]}
    checks = [expect_error_everywhere(slot, lengths, world - 1, narrow_k, "K must be the same on every rank"),
              expect_error_everywhere(slot, lengths, 0, lambda x: {**x, "g": x["g"][..., :3]}, "g must have shape")]
    torch.save({"results": results, "checks": checks}, os.path.join(workdir, f"rank{rank}.pt"))
    dist.barrier()  # every rank's messages are delivered before any rank tears its process group down
    dist.destroy_process_group()
    # skip the interpreter's teardown: under load, gloo's background threads were seen to abort the
    # process there ("terminate called without an active exception") after its results were saved
    os._exit(0)


def on_device(case):
    moved = {key: {n: None if t is None else t.to(DEVICE) for n, t in case[key].items()} for key in ("x", "upstream")}
    return {**case, **moved}


def to_cpu(result):
    return {n: {k: v.cpu() for k, v in t.items()} if isinstance(t, dict) else t if t is None else t.cpu()
            for n, t in result.items()}


def reference(case):
    case = on_device(case)
    x, upstream, names = case["x"], case["upstream"], case["names"]
    leaves = {n: x[n].clone().requires_grad_() for n in names}
    cu = None if case["bounds"] is None else torch.tensor(case["bounds"], dtype=torch.int32, device=DEVICE)
    initial = (leaves["hk0"], leaves["hv0"]) if "hk0" in leaves else None
    args = (leaves["q"], leaves["k"], leaves["v"], leaves["s"], leaves.get("g"))
    o, (hk, hv) = chunk_gsa(*args, initial_state=initial, output_final_state=True, cu_seqlens=cu, chunk_size=CHUNK)
    loss = (o * upstream["do"]).sum() + (hk * upstream["dhk"]).sum() + (hv * upstream["dhv"]).sum()
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))
    o64, _ = recurrent_gsa(*(None if a is None else a.detach().double() for a in args),
                           initial_state=None if initial is None else tuple(h.detach().double() for h in initial),
                           cu_seqlens=cu)
    out = {"o": o.detach(), "hk": hk.detach(), "hv": hv.detach(), "grads": grads, "o64": o64}
    if "g" in leaves:
        # dg sums cancelling per-token terms (over the whole sequence for a decay layout): their magnitudes
        initial64 = None if initial is None else (x["hk0"], x["hv0"])
        out["dg_scale"] = gate_gradient_scale(x["q"], x["k"], x["v"], x["s"], x["g"],
                                              (upstream["do"], upstream["dhk"], upstream["dhv"]),
                                              initial_state=initial64, cu_seqlens=cu)
    return to_cpu(out)



_REFERENCES = {}  # seed -> reference(case): computed once, while the first spawn's children run


def cached_reference(case):
    if case["seed"] not in _REFERENCES:
        _REFERENCES[case["seed"]] = reference(case)
    return _REFERENCES[case["seed"]]


def rel_err(a, b, scale=None):
    return rel(a, b, scale, floor=1e-12)  # an exactly zero reference (ABC at T = 1) leaves round-off only


def assemble(case, per_rank):
    """The ranks' results as one: slices concatenated along time, shares of unsplit tensors summed."""
    out = {"o": torch.cat([r["o"] for r in per_rank], 1), "grads": {}}
    for name in ("hk", "hv"):
        out[name] = None if per_rank[0][name] is None else sum(r[name] for r in per_rank)
    for n in case["names"]:
        parts = [r["grads"][n] for r in per_rank]
        out["grads"][n] = torch.cat(parts, 1) if n in split_names(case["layout"]) else sum(parts)
    return out


def compare(case, per_rank, ref, label):
    got = assemble(case, per_rank)
    errors = {"o": rel_err(got["o"], ref["o"])}
    if got["hk"] is not None:
        errors.update(hk=rel_err(got["hk"], ref["hk"]), hv=rel_err(got["hv"], ref["hv"]))
    errors.update({f"d{n}": rel_err(got["grads"][n], ref["grads"][n], ref.get("dg_scale") if n == "g" else None)
                   for n in case["names"]})
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"{label} {case['name']} seed {case['seed']}: relative errors above {TOL}: {bad}"
    assert rel_err(got["o"], ref["o64"]) <= REF_TOL, f"{label} {case['name']}: o vs the float64 reference"
    if got["hk"] is None:
        return
    # each sequence's final state lives on exactly one rank (where it ends), zeros elsewhere
    holders = torch.stack([(r["hk"].flatten(1).abs().sum(1) > 0) for r in per_rank]).sum(0)
    assert holders.tolist() == [1] * len(holders), f"{label} {case['name']}: final rows held by {holders.tolist()}"


@pytest.fixture(scope="module")
def cases():
    seed = random.randrange(2**31)
    built = []
    for i, (name, layout, B, HQ, H, bounds, initial) in enumerate(CASES):
        x, upstream, names = make_case(layout, B, HQ, H, bounds, initial, seed + i)
        built.append({"name": name, "layout": layout, "bounds": bounds, "x": x, "upstream": upstream,
                      "names": names, "seed": seed + i})
    return built


# 4 gloo ranks: ~30 s of the CI's 2 cores (4 processes compiling), so only with GSA_SLOW_TESTS=1; in CI
# 2 gloo ranks run, and 4 ranks run in one process (test_simulated_group_matches_single_process).
FOUR_RANKS = slow_param(4)


@pytest.mark.parametrize("world", [2, FOUR_RANKS])
def test_gloo_ranks_match_single_process(world, cases, tmp_path, monkeypatch):
    torch.save(cases, tmp_path / "cases.pt")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the children import triton in interpreter mode
    context = mp.spawn(gloo_worker, args=(world, str(tmp_path)), nprocs=world, join=False)
    references = [cached_reference(case) for case in cases]  # while the children run
    while not context.join():
        pass
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for i, (case, ref) in enumerate(zip(cases, references)):
        compare(case, [p["results"][i] for p in per_rank], ref, f"{world} gloo ranks")
    for r, p in enumerate(per_rank):
        for ok, message in p["checks"]:
            assert ok, f"rank {r}: expected an error naming the mismatch, got: {message}"


def test_simulated_group_matches_single_process(cases):
    """R ranks run one after the other in this process (forwards in rank order, backwards reversed);
    without output_final_state (the gloo cases return the final states)."""
    case, lengths = cases[6], [5, 20, 12, 27]  # ABC varlen: ranks inside, across and at boundaries
    zeros = {n: torch.zeros_like(case["upstream"][n]) for n in ("dhk", "dhv")}
    case = {**case, "upstream": {**case["upstream"], **zeros}}  # the reference's loss without final states
    sim, here = SimulatedGroup(len(lengths)), on_device(case)
    runs = [run_rank(here, r, lengths, sim.rank(r), lengths, final_state=False) for r in range(len(lengths))]
    per_rank = [None] * len(lengths)
    for r in reversed(range(len(lengths))):
        o, hk, hv, loss, local = runs[r]
        grads = torch.autograd.grad(loss, [local[n] for n in case["names"]])
        per_rank[r] = to_cpu(detached(o, hk, hv, case["names"], grads))
    compare(case, per_rank, reference(case), "simulated")


@given(st.lists(st.integers(1, 9), min_size=1, max_size=6), st.lists(st.integers(1, 9), min_size=1, max_size=6),
       st.integers(1, 3))
def test_plan_span_invariants(lengths, sequence_lengths, batch):
    """Neighbours agree on what crosses each boundary; every token and sequence end is accounted once."""
    total = sum(lengths)
    bounds = [0]
    for n in sequence_lengths:
        bounds.append(min(total, bounds[-1] + n))
    bounds = sorted(set(bounds) | {total})
    for cu, rows in ((None, batch), (bounds, 1)):
        spans = [plan_span(r, lengths, batch, cu) for r in range(len(lengths))]
        assert not spans[0].receives and not spans[-1].sends
        for left, right in itertools.pairwise(spans):
            assert left.sends == right.receives
        ends = [n for span in spans for n in ((span.head_rows if span.head and span.head_ends_here else ())
                                             + span.visible_tail_rows)]
        starts = [n for span in spans for n in span.tail_rows]
        expected = list(range(batch if cu is None else len(bounds) - 1))
        assert sorted(ends) == expected and sorted(starts) == expected
        for span in spans:
            assert 0 <= span.head <= span.length and span.carry == rows
            if span.tail_bounds is not None:
                assert span.tail_bounds[0] == 0 and span.tail_bounds[-1] == span.length - span.head


def test_argument_errors(cases):
    x = cases[0]["x"]
    q, k, v, s, g = (x[n] for n in "qkvsg")
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        chunk_gsa_cp(q, k, v, s, g)
    with pytest.raises(TypeError, match="group must be"):
        chunk_gsa_cp(q, k, v, s, g, group="world")
    sim = SimulatedGroup(2)
    with pytest.raises(ValueError, match="needs rank_lengths"):
        chunk_gsa_cp(q, k, v, s, g, group=sim.rank(0))
    with pytest.raises(ValueError, match=r"rank_lengths\[0\] = 3"):
        chunk_gsa_cp(q, k, v, s, g, group=sim.rank(0), rank_lengths=[3, 5])
    with pytest.raises(ValueError, match="rank_lengths must list 2"):
        chunk_gsa_cp(q, k, v, s, g, group=sim.rank(0), rank_lengths=[T_TOTAL])
    cu = torch.tensor([0, 10, 70], dtype=torch.int32)
    with pytest.raises(ValueError, match="batch size must be 1"):
        chunk_gsa_cp(q, k, v, s, g, group=sim.rank(0), rank_lengths=[T_TOTAL, 6], cu_seqlens=cu)
    one = {n: t[:1] for n, t in x.items() if n in "qkvsg"}
    with pytest.raises(ValueError, match="sum of T_r = 74"):
        chunk_gsa_cp(*(one[n] for n in "qkvsg"), group=sim.rank(0), rank_lengths=[T_TOTAL, 10],
                     cu_seqlens=torch.tensor([0, 10, 80], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"initial_state\[0\] \(hk\) must have shape"):
        chunk_gsa_cp(*(one[n] for n in "qkvsg"), group=sim.rank(0), rank_lengths=[T_TOTAL, 10], cu_seqlens=cu,
                     initial_state=(torch.zeros(1, 1, D, D), torch.zeros(1, 1, D, D)))
    with pytest.raises(ValueError, match="world_size must be"):
        SimulatedGroup(0)
