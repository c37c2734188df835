"""The two float64 references agree with each other and with closed forms.

recurrent_gsa (token by token) and parallel_gsa (quadratic, cumulative gates) are written
independently; every kernel test compares against recurrent_gsa, so these tests pin it down.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from gsa_compile import GateLayout, parallel_gsa, recurrent_gsa

F64 = torch.float64
LAYOUTS = list(GateLayout)
TOL = 1e-10


def make_gate(layout, B, T, H, M, gen):
    """Data-dependent gates: logsigmoid(randn); constant decays: -rand; ABC: None."""
    if layout is GateLayout.SLOT:
        return F.logsigmoid(torch.randn(B, T, H, M, generator=gen, dtype=F64))
    if layout is GateLayout.HEAD:
        return F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=F64))
    if layout is GateLayout.DECAY_HEAD:
        return -torch.rand(H, generator=gen, dtype=F64)
    if layout is GateLayout.DECAY_SLOT:
        return -torch.rand(H, M, generator=gen, dtype=F64)
    return None


def make_inputs(layout, B, T, H, G, K, V, M, seed, N=None, with_state=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H * G, K, generator=gen, dtype=F64)
    k = torch.randn(B, T, H, K, generator=gen, dtype=F64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=F64)
    s = torch.randn(B, T, H, M, generator=gen, dtype=F64)
    g = make_gate(layout, B, T, H, M, gen)
    state = None
    if with_state:
        n = B if N is None else N
        state = (torch.randn(n, H, K, M, generator=gen, dtype=F64),
                 torch.randn(n, H, M, V, generator=gen, dtype=F64))
    return q, k, v, s, g, state


def rel_err(x, ref):
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def assert_agree(a, b, output_final_state):
    (o_a, f_a), (o_b, f_b) = a, b
    assert o_a.dtype == o_b.dtype == F64
    assert o_a.shape == o_b.shape
    assert rel_err(o_b, o_a) < TOL
    if output_final_state:
        for x, y in zip(f_a, f_b):
            assert x.shape == y.shape
            assert rel_err(y, x) < TOL
    else:
        assert f_a is None and f_b is None


# T in 1..40 and K, V, M small and mostly not powers of two: the shapes kernels get wrong.
dims = st.integers(1, 9)


@given(layout=st.sampled_from(LAYOUTS), B=st.integers(1, 2), T=st.integers(1, 40), H=st.integers(1, 2),
       G=st.integers(1, 3), K=dims, V=dims, M=st.integers(1, 8), with_state=st.booleans(),
       final=st.booleans(), scale=st.sampled_from([None, 0.3, 1.0]), seed=st.integers(0, 2**31 - 1))
def test_recurrent_matches_parallel(layout, B, T, H, G, K, V, M, with_state, final, scale, seed):
    q, k, v, s, g, h0 = make_inputs(layout, B, T, H, G, K, V, M, seed, with_state=with_state)
    kw = dict(scale=scale, initial_state=h0, output_final_state=final)
    assert_agree(recurrent_gsa(q, k, v, s, g, **kw), parallel_gsa(q, k, v, s, g, **kw), final)


@st.composite
def seqlens(draw):
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))
    if draw(st.booleans()):
        lengths[draw(st.integers(0, len(lengths) - 1))] = 1
    return lengths


@given(layout=st.sampled_from(LAYOUTS), lengths=seqlens(), H=st.integers(1, 2), G=st.integers(1, 3),
       K=dims, V=dims, M=st.integers(1, 8), with_state=st.booleans(), final=st.booleans(),
       int32=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_varlen_recurrent_matches_parallel(layout, lengths, H, G, K, V, M, with_state, final, int32, seed):
    T, N = sum(lengths), len(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int32 if int32 else torch.int64).cumsum(0).to(
        torch.int32 if int32 else torch.int64)
    q, k, v, s, g, h0 = make_inputs(layout, 1, T, H, G, K, V, M, seed, N=N, with_state=with_state)
    kw = dict(initial_state=h0, output_final_state=final, cu_seqlens=cu)
    rec = recurrent_gsa(q, k, v, s, g, **kw)
    assert rec[0].shape == (1, T, H * G, V)
    if final:
        assert rec[1][0].shape == (N, H, K, M) and rec[1][1].shape == (N, H, M, V)
    assert_agree(rec, parallel_gsa(q, k, v, s, g, **kw), final)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_single_token_closed_form(layout):
    """T=1, zero state: Hk = k s^T, Hv = s v^T, p = softmax(scale (q.k) s), o = (p.s) v."""
    q, k, v, s, g, _ = make_inputs(layout, 2, 1, 2, 2, 5, 3, 7, seed=1)
    scale = 0.7
    o, (hk, hv) = recurrent_gsa(q, k, v, s, g, scale=scale, output_final_state=True)
    w = s if layout is not GateLayout.ABC else torch.ones_like(s)  # ABC: exp(s_1 - z_1) = 1
    qk = torch.einsum("bthgk,bthk->bthg", q.view(2, 1, 2, 2, 5), k)  # [B, T, H, G]
    p = torch.softmax(scale * qk[..., None] * w[:, :, :, None, :], dim=-1)  # [B, T, H, G, M]
    expected = (p * w[:, :, :, None, :]).sum(-1)[..., None] * v[:, :, :, None, :]  # [B, T, H, G, V]
    torch.testing.assert_close(o, expected.reshape(2, 1, 4, 3), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hk, torch.einsum("bhk,bhm->bhkm", k[:, 0], w[:, 0]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hv, torch.einsum("bhm,bhv->bhmv", w[:, 0], v[:, 0]), rtol=1e-12, atol=1e-12)


def test_abc_state_is_softmax_over_time():
    """ABC (g=None): Hk_T = sum_t softmax_t(s)[t] k_t and Hv_T = sum_t softmax_t(s)[t] v_t."""
    q, k, v, s, _, _ = make_inputs(GateLayout.ABC, 2, 13, 2, 1, 4, 5, 6, seed=2)
    _, (hk, hv) = recurrent_gsa(q, k, v, s, None, output_final_state=True)
    weights = torch.softmax(s, dim=1)  # over time, per slot: [B, T, H, M]
    torch.testing.assert_close(hk, torch.einsum("bthk,bthm->bhkm", k, weights), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hv, torch.einsum("bthm,bthv->bhmv", weights, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gqa_states_ignore_q_and_heads_map_to_groups(layout):
    B, T, H, G, K, V, M = 2, 9, 2, 3, 4, 3, 5
    q, k, v, s, g, h0 = make_inputs(layout, B, T, H, G, K, V, M, seed=3, with_state=True)
    o, (hk, hv) = recurrent_gsa(q, k, v, s, g, initial_state=h0, output_final_state=True)
    _, (hk2, hv2) = recurrent_gsa(torch.randn_like(q), k, v, s, g, initial_state=h0, output_final_state=True)
    assert torch.equal(hk, hk2) and torch.equal(hv, hv2)
    # query head i reads kv head i // G: query heads j, j+G, ... form a plain H-head problem
    for j in range(G):
        o_j, _ = recurrent_gsa(q[:, :, j::G], k, v, s, g, initial_state=h0)
        torch.testing.assert_close(o[:, :, j::G], o_j, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_varlen_equals_separate_sequences(layout):
    lengths, H, G, K, V, M = [5, 1, 8, 3], 2, 2, 3, 4, 5
    T, N = sum(lengths), len(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0)
    q, k, v, s, g, h0 = make_inputs(layout, 1, T, H, G, K, V, M, seed=4, N=N, with_state=True)
    o, (hk, hv) = recurrent_gsa(q, k, v, s, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n in range(N):
        a, b = cu[n].item(), cu[n + 1].item()
        g_n = g[:, a:b] if layout.data_dependent else g
        o_n, (hk_n, hv_n) = recurrent_gsa(q[:, a:b], k[:, a:b], v[:, a:b], s[:, a:b], g_n,
                                          initial_state=(h0[0][n:n + 1], h0[1][n:n + 1]),
                                          output_final_state=True)
        torch.testing.assert_close(o[:, a:b], o_n, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hk[n:n + 1], hk_n, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hv[n:n + 1], hv_n, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_recurrent_is_differentiable(layout):
    q, k, v, s, g, h0 = make_inputs(layout, 1, 3, 1, 2, 2, 2, 3, seed=5, with_state=True)
    inputs = [x.requires_grad_() for x in (q, k, v, s, g, *h0) if x is not None]

    def fn(*args):
        q, k, v, s = args[:4]
        g = args[4] if layout is not GateLayout.ABC else None
        h0 = tuple(args[-2:])
        o, (hk, hv) = recurrent_gsa(q, k, v, s, g, initial_state=h0, output_final_state=True)
        return o, hk, hv

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay is not GateLayout.ABC])
@pytest.mark.parametrize("varlen", [False, True])
def test_gate_gradient_scale_bounds_the_gate_gradient(layout, varlen):
    """gate_gradient_scale (what dg's error is measured against) is >= |dg| for every gate element (it
    sums the magnitudes of the terms dg sums) and, for a decay, far above it when they cancel."""
    from gsa_compile.reference import gate_gradient_scale
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    B, T, H, K, V, M = (1, 24, 2, 4, 3, 5) if varlen else (2, 13, 2, 4, 3, 5)
    cu = torch.tensor([0, 7, 16, 24]) if varlen else None
    x = [torch.randn(B, T, 2 * H, K, generator=gen, dtype=F64)] + [
        torch.randn(B, T, H, D, generator=gen, dtype=F64) for D in (K, V)]
    s = torch.rand(B, T, H, M, generator=gen, dtype=F64)
    g = make_gate(layout, B, T, H, M, gen).requires_grad_()
    N = B if cu is None else len(cu) - 1
    h0 = (torch.randn(N, H, K, M, generator=gen, dtype=F64), torch.randn(N, H, M, V, generator=gen, dtype=F64))
    o, final = recurrent_gsa(*x, s, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    upstream = [torch.randn(t.shape, generator=gen, dtype=F64) for t in (o, *final)]
    dg, = torch.autograd.grad(sum((a * w).sum() for a, w in zip((o, *final), upstream)), g)
    scale = gate_gradient_scale(*x, s, g, upstream, initial_state=h0, cu_seqlens=cu)
    assert scale.shape == g.shape and (scale >= dg.abs() * (1 - 1e-12)).all()
    if layout in (GateLayout.DECAY_HEAD, GateLayout.DECAY_SLOT):
        assert scale.norm() > 3 * dg.norm()


def test_bench_correctness_check_runs_the_kernels(monkeypatch):
    """`python -m gsa_compile bench`'s correctness check (GPU only there) on CPU, small: float32 rows
    pass, dg of a constant decay measured against its terms' magnitudes."""
    import conftest  # noqa: F401  (the interpreter's settings)
    from gsa_compile import benchmark
    monkeypatch.setitem(benchmark.CORRECTNESS, "quick", (1, 40, 1, 16, 16, 8))
    rows = benchmark.check_correctness("cpu", True, [("float32", "decay_head", 16), ("float32", "slot", 16)])
    assert [r["ok"] for r in rows] == [True, True], rows
    assert all(0 < r["gate_grad_err"] < 1e-4 for r in rows), rows
