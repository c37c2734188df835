"""GSA_STATE_SEGMENTS: the segmented state pass and state backward (gsa_compile/segments.py).

1. Per gate layout, with and without initial states, dense and varlen, with GQA: o, the final states
   and every gradient with segmentation equal the unsegmented call (float32, 1e-5 relative), and both
   match recurrent_gsa (float64) within the project tolerances (tests/differential.py). T is never a
   multiple of the chunk size; some cases have more segments than chunks (empty segments).
   Gates are weakened (g / 16) so that states carry across segments: with logsigmoid(randn) gates a
   state is forgotten within a chunk or two and a wrong scan would go unnoticed. The state backward's
   local runs take two chunks a step: the segments here hold odd and even numbers of chunks, and none.
2. The scan kernel against the step-by-step recurrence with context_parallel's combine.
3. The switch: parsing of the variable, 'auto' on CPU, the fallback for inputs that do not pack.
"""
import math

import pytest
import torch

from differential import compare, failures, make_leaves, rel_err
from gsa_compile import chunk_gsa, launch, programs_backward, segments
from gsa_compile.context_parallel.passes import combine
from gsa_compile.spec import GateLayout

VARLEN = [0, 29, 32, 75]  # lengths 29, 3 and 43: 2, 1 and 3 chunks (fewer than most S below)
CASES = [  # (layout, initial_state, B or cu_seqlens, H, group, S)
    ("slot", False, 2, 1, 2, "3"),
    ("slot", True, VARLEN, 2, 1, "2"),
    ("head", True, 1, 1, 2, "20"),
    ("head", False, VARLEN, 1, 1, "2"),
    ("decay_head", True, VARLEN, 1, 2, "3"),
    ("decay_head", False, 1, 1, 1, "auto"),  # T = 130 (B = 1): 9 chunks, 'auto' on CPU takes 2 segments
    ("decay_slot", False, VARLEN, 1, 2, "5"),
    ("decay_slot", True, 2, 1, 2, "2"),
    ("abc", True, 2, 1, 1, "3"),
    ("abc", False, VARLEN, 1, 2, "4"),
]


def _case(layout, initial_state, rows, H, group, S, seed):
    varlen = isinstance(rows, list)
    T = 75 if varlen else 130 if S == "auto" else 50  # never a multiple of the chunk (16)
    return dict(chunk_size=16, layout=layout, dtype="float32", memory="contiguous", B=1 if varlen else rows,
                cu_seqlens=rows if varlen else None, T=T, H=H, group=group, K=8, V=8, M=4,
                initial_state=initial_state, upstream="both", seed=seed)


def _counting(monkeypatch):
    counts = {"state_pass": 0, "state_backward": 0}
    for name in counts:
        original = getattr(segments, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(segments, name, counted)
    return counts


def _run(case, leaves, views, monkeypatch, S):
    """compare() against the reference, also keeping chunk_gsa's outputs and its leaves' gradients."""
    if S is None:
        monkeypatch.delenv(segments.ENV, raising=False)
    else:
        monkeypatch.setenv(segments.ENV, S)
    kept, hooks = {}, [x.register_hook(lambda grad, n=n: kept.__setitem__("d" + n, grad)) for n, x in leaves.items()]
    original = chunk_gsa

    def keeping(*args, **kwargs):
        o, final = original(*args, **kwargs)
        kept.update(o=o.detach(), hk=final[0].detach(), hv=final[1].detach())
        return o, final
    monkeypatch.setattr("differential.chunk_gsa", keeping)
    try:
        errors = compare(case, leaves, views)
    finally:
        for hook in hooks:
            hook.remove()
    return errors, kept


def _assert_both_match(case, errors_plain, plain, errors_seg, seg):
    """Both calls match float64 within the project tolerances, and each other within 1e-5 (float32)."""
    assert not failures(case, errors_plain), errors_plain
    assert not failures(case, errors_seg), errors_seg
    differences = {n: rel_err(seg[n], plain[n]) for n in plain}
    assert all(e <= 1e-5 for e in differences.values()), differences


@pytest.mark.parametrize("layout, initial_state, rows, H, group, S", CASES)
def test_segmented_equals_unsegmented(layout, initial_state, rows, H, group, S, monkeypatch):
    case = _case(layout, initial_state, rows, H, group, S, seed=len(layout) * 7 + initial_state)
    leaves, views = make_leaves(case, "cpu")
    if "g" in leaves:
        leaves["g"] = (leaves["g"].detach() / 16).requires_grad_()
    counts = _counting(monkeypatch)
    errors_plain, plain = _run(case, leaves, views, monkeypatch, None)
    assert counts == {"state_pass": 0, "state_backward": 0}
    errors_seg, seg = _run(case, leaves, views, monkeypatch, S)
    assert counts == {"state_pass": 2, "state_backward": 1}  # forward, the backward's recompute, state backward
    assert set(seg) == set(plain) == {"o", "hk", "hv", *("d" + n for n in leaves)}
    _assert_both_match(case, errors_plain, plain, errors_seg, seg)


@pytest.mark.parametrize("chunk", [32, 64])
def test_both_walks_of_the_local_state_backward(chunk, monkeypatch):
    """The state backward's walks: two chunks a step up to PAIRED_WALK_MAX_CHUNK, one above; the segmented
    call (local run, then the chunk-storing run) gives the unsegmented call's gradients (segments of 1 and 2
    chunks, a partial last chunk)."""
    assert 32 <= programs_backward.PAIRED_WALK_MAX_CHUNK < 64
    case = dict(_case("slot", True, 1, 1, 2, "3", seed=chunk), chunk_size=chunk, T=4 * chunk - 7)
    leaves, views = make_leaves(case, "cpu")
    leaves["g"] = (leaves["g"].detach() / 16).requires_grad_()
    errors_plain, plain = _run(case, leaves, views, monkeypatch, None)
    counts = _counting(monkeypatch)
    errors_seg, seg = _run(case, leaves, views, monkeypatch, "3")
    assert counts["state_backward"] == 1  # segmented
    _assert_both_match(case, errors_plain, plain, errors_seg, seg)


@pytest.mark.parametrize("rows, forward_chunk, backward_chunk", [(2, 32, 16), (VARLEN, 32, 16), (VARLEN, 16, 32),
                                                                  (2, 16, 16)])
def test_backward_takes_the_forward_segment_starts(rows, forward_chunk, backward_chunk, monkeypatch):
    """The eager backward recomputes the chunk states from its forward's segment start states (no first run, no
    scan) where the forward's segment bounds fall on its chunks (the forward's chunk size a multiple of the
    backward's), else it segments on its own; the gradients match float64 and the unsegmented call's."""
    case = dict(_case("slot", True, rows, 2, 2, "3", seed=forward_chunk + backward_chunk), chunk_size=forward_chunk)
    leaves, views = make_leaves(case, "cpu")
    monkeypatch.setenv("GSA_BACKWARD_CONFIG", f"{backward_chunk},16,16,4,1,4,8")
    scans, real_scan = [], segments.scan

    def scan(call, p, *args, **kwargs):
        scans.append(kwargs["reverse"])
        return real_scan(call, p, *args, **kwargs)
    monkeypatch.setattr(segments, "scan", scan)
    first_runs, real_run = [], launch.Call.run

    def run(call, builder, grid, *args, spec=None, **extra):
        if spec is not None and builder.__name__ == "state_pass" and not spec.chunk_states:
            first_runs.append(call.spec.chunk_size)
        return real_run(call, builder, grid, *args, spec=spec, **extra)
    monkeypatch.setattr(launch.Call, "run", run)
    errors_plain, plain = _run(case, leaves, views, monkeypatch, None)
    errors_seg, seg = _run(case, leaves, views, monkeypatch, "3")
    reused = forward_chunk % backward_chunk == 0
    assert first_runs == [forward_chunk] + ([] if reused else [backward_chunk])
    assert scans == [False] + ([] if reused else [False]) + [True]
    _assert_both_match(case, errors_plain, plain, errors_seg, seg)


@pytest.mark.parametrize("level", [None, 0])
def test_a_second_backward_recomputes(level, monkeypatch):
    """What a forward keeps for its backward (the segment start states; the chunk states at checkpoint_level 0)
    serves the first backward only: a second one through a retained graph recomputes, with the same gradients
    bit for bit."""
    monkeypatch.setenv(segments.ENV, "3")
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    B, T, H, K, V, M = 2, 50, 2, 8, 8, 4
    leaves = [torch.randn(B, T, H, d, generator=gen).requires_grad_() for d in (K, K, V)]
    leaves.append(torch.randn(B, T, H, M, generator=gen).softmax(-1).requires_grad_())
    leaves.append((torch.nn.functional.logsigmoid(torch.randn(B, T, H, M, generator=gen)) / 16).requires_grad_())
    o, _ = chunk_gsa(*leaves, chunk_size=16, checkpoint_level=level)
    loss = (o * torch.randn(o.shape, generator=gen)).sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for name, a, b in zip("qkvsg", first, second):
        assert torch.equal(a, b), f"d{name}"


@pytest.mark.parametrize("rows", [2, VARLEN])
def test_segmented_with_stored_mapped_s(rows, monkeypatch):
    """Mods that derive s from the gate store the mapped s from the state pass: the segmented pass
    writes it too (it ran unsegmented until session 6: 5.8 ms against 0.9 on the H200 at T = 32768)."""
    case = dict(_case("slot", False, rows, 1, 2, "3", seed=11), mods="s_from_gate")
    leaves, views = make_leaves(case, "cpu")
    counts = _counting(monkeypatch)
    errors_plain, plain = _run(case, leaves, views, monkeypatch, None)
    errors_seg, seg = _run(case, leaves, views, monkeypatch, "3")
    assert counts == {"state_pass": 2, "state_backward": 1}
    _assert_both_match(case, errors_plain, plain, errors_seg, seg)


def test_local_runs_store_no_chunk_states(monkeypatch):
    """The first run of each segmented pass (Spec.chunk_states off) writes only the segments' end states: the
    chunk-state buffers it is handed keep the NaN put there before it, and the second run fills every row
    (the gradients then match the reference: test_segmented_equals_unsegmented)."""
    chunk_buffers = {"state_pass": slice(4, 6), "state_backward": slice(5, 7)}  # positions among the kernel args
    runs, original = [], launch.Call.run

    def checked(call, builder, grid, *args, spec=None, **extra):
        if spec is None:  # not a segmented run
            return original(call, builder, grid, *args, **extra)
        buffers = args[chunk_buffers[builder.__name__]]
        if not spec.chunk_states:
            for x in buffers:
                x.fill_(float("nan"))
        original(call, builder, grid, *args, spec=spec, **extra)
        runs.append((builder.__name__, spec.chunk_states, [bool(x.isnan().all()) for x in buffers],
                     [bool(x.isnan().any()) for x in buffers]))
    monkeypatch.setattr(launch.Call, "run", checked)
    case = _case("slot", True, 2, 1, 2, "3", seed=5)
    leaves, views = make_leaves(case, "cpu")
    leaves["g"] = (leaves["g"].detach() / 16).requires_grad_()
    errors, _ = _run(case, leaves, views, monkeypatch, "3")
    assert not failures(case, errors), errors
    local = [(name, all_nan) for name, chunk_states, all_nan, _ in runs if not chunk_states]
    stored = [(name, any_nan) for name, chunk_states, _, any_nan in runs if chunk_states]
    # (the backward's recomputation starts from the forward's segment start states: no first run of its own)
    assert local == [("state_pass", [True, True])] + [("state_backward", [True, True])]
    assert stored == [("state_pass", [False, False])] * 2 + [("state_backward", [False, False])]


@pytest.mark.parametrize("edge", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_matches_step_by_step_combine(reverse, edge):
    """The scan kernel (programs.segment_scan) against context_parallel's combine, one segment at a time:
    segments of 0 to 150 chunks (its sum reads 64 chunk rows at a time), one that forgets everything
    before it, K and V wider than one tile (BK = BV = 16 here), M not a power of two."""
    gen = torch.Generator().manual_seed(3)
    N, S, H, K, M, V = 2, 5, 2, 40, 6, 20
    counts = torch.tensor([[3, 0, 150, 1, 70], [64, 65, 2, 0, 5]])  # chunks per segment
    cut = torch.cat([torch.zeros(N, 1, dtype=torch.int64), counts.cumsum(1)], 1) + 1  # chunk row 0: another sequence's
    cut[1] += cut[0, -1]  # and one more row between the two sequences; 3 rows after the last
    rows = -0.05 * torch.rand(int(cut[1, -1]) + 3, H, M, generator=gen)
    rows[int(cut[0, 3]) - 1] = -500.0  # segment 2 of sequence 0: a chunk that forgets everything
    a = torch.stack([torch.stack([rows[cut[n, j]:cut[n, j + 1]].sum(0) for j in range(S)]) for n in range(N)])
    local = (torch.randn(N * S, H, K, M, generator=gen), torch.randn(N * S, H, M, V, generator=gen))
    edges = (torch.randn(N, H, K, M, generator=gen), torch.randn(N, H, M, V, generator=gen)) if edge else None
    call, _ = _call(B=N, H=H, K=K, V=V, M=M)
    plan = segments.Plan(S, None, None, cut, gtot=rows)
    got = segments.scan(call, plan, local, edges, reverse=reverse)
    per = lambda x: x.view(N, S, *x.shape[1:])  # noqa: E731
    want = [[None] * S for _ in range(2)]
    state = edges or tuple(torch.zeros(N, *x.shape[1:]) for x in local)
    for j in (reversed(range(S)) if reverse else range(S)):  # reverse: the gradient at segment j's end
        want[0][j], want[1][j] = state  # forward: the state at segment j's start
        state = combine(state, a[:, j] * math.log(2), (per(local[0])[:, j], per(local[1])[:, j]))
    for x, w in zip(got, want):
        torch.testing.assert_close(per(x), torch.stack(w, 1), rtol=1e-5, atol=1e-6)


def _call(B=1, T=100, cu_seqlens=None, head_first=False, H=2, K=8, V=8, M=8):
    q, k, v, s = (torch.randn(B, T, H, D) for D in (K, K, V, M))
    if head_first:  # [B, H, T, D] storage seen as [B, T, H, D]: the batch stride is not T x the time stride
        k = torch.randn(B, H, T, K).transpose(1, 2)
    return launch.Call(q, k, v, s, None, cu_seqlens, 16, GateLayout.SLOT, None, lambda kernel: kernel), (k, v, s)


@pytest.mark.parametrize("value, expected", [(None, 1), ("", 1), ("0", 1), ("1", 1), ("off", 1), ("3", 3),
                                             ("100", 100), ("auto", 1)])
def test_requested(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv(segments.ENV, raising=False)
    else:
        monkeypatch.setenv(segments.ENV, value)
    call, _ = _call(T=20)  # 2 chunks: 'auto' keeps at least 4 chunks per segment -> 1
    assert segments.requested(call) == expected


def test_auto_on_cpu(monkeypatch):
    monkeypatch.setenv(segments.ENV, "auto")
    assert segments.requested(_call(T=1000)[0]) == 4  # CPU: at most 4
    assert segments.requested(_call(T=200)[0]) == 3  # 13 chunks: at least 4 per segment
    monkeypatch.setenv(segments.ENV, "many")
    with pytest.raises(ValueError, match=segments.ENV):
        segments.requested(_call()[0])


@pytest.mark.parametrize("tiles, heads, plain, T, expected", [
    (8, 4, True, 32768, 8),  # B1 H4 K=V=512 at BK=BV=128: 32 programs -> 2 * 132 // 32 = 8
    (2, 4, True, 32768, 32),  # K=V=128: 8 programs -> 33, rounded down to a power of two
    (8, 16, True, 32768, 1),  # 128 programs: S = 2 < 4, not worth a second pass
    (8, 4, False, 32768, 1),  # traced (fake or functional tensors): compiled graphs keep the unsegmented pass
    (8, 4, True, 16384, 8),  # 512 chunks: DEFAULT_MIN_CHUNKS
    (8, 4, True, 16352, 1),  # 511 chunks: the extra launches cost more than they save
])
def test_default_on_a_gpu(tiles, heads, plain, T, expected, monkeypatch):
    """Unset variable: segments only eagerly on a GPU, only where they at least quadruple the programs,
    and only for sequences of at least DEFAULT_MIN_CHUNKS chunks."""
    import types
    monkeypatch.delenv(segments.ENV, raising=False)
    monkeypatch.setattr(launch, "_sm_count", lambda device: 132)
    call = types.SimpleNamespace(device=torch.device("cuda"), plain_tensors=plain, N=1, B=1, T=T, H=heads,
                                 spec=types.SimpleNamespace(chunk_size=32), tiles=lambda: tiles)
    assert segments.requested(call) == expected
    call.device = torch.device("cpu")
    assert segments.requested(call) == 1


def test_plan_tables_and_fallback(monkeypatch):
    monkeypatch.setenv(segments.ENV, "3")
    call, tensors = _call(B=2, T=100)  # 7 chunks per row: segments of 3, 3, 1 chunks
    p = segments.plan(call, *tensors)
    assert p.cu.tolist() == [0, 48, 96, 100, 148, 196, 200]
    assert p.boc.tolist() == [0, 3, 6, 7, 10, 13]
    assert p.cut.tolist() == [[0, 3, 6, 7], [7, 10, 13, 14]]
    call, tensors = _call(B=1, T=75, cu_seqlens=torch.tensor(VARLEN, dtype=torch.int32))
    p = segments.plan(call, *tensors)
    assert p.cu.tolist() == [0, 16, 29, 29, 32, 32, 32, 48, 64, 75]  # empty segments where 3 > chunks
    assert p.boc.tolist() == [0, 1, 2, 2, 3, 3, 3, 4, 5]
    call, tensors = _call(B=2, head_first=True)
    assert segments.plan(call, *tensors) is None  # does not pack: the unsegmented pass runs
    call, tensors = _call(B=1, head_first=True)
    assert segments.plan(call, *tensors) is not None  # one batch row always packs
