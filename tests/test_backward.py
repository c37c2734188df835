"""Gradients of chunk_gsa: generated backward kernels against the float64 reference's autograd.

1. Hypothesis, per chunk size x gate layout: every gradient (q, k, v, s, g, initial hk and hv) of
   chunk_gsa in float32 matches autograd through `recurrent_gsa` on float64 copies, with gradients
   flowing in through o, through the final states, or both (random upstream gradients).
2. `torch.autograd.gradcheck` of chunk_gsa in float64 (accepted only under the interpreter).
3. `torch.library.opcheck` of gsa::chunk_forward (requires-grad inputs, so the autograd
   registration and AOT dispatch of the backward are exercised) and of gsa::chunk_backward.
4. A `torch.compile(fullgraph=True)` training step (forward, loss, backward, SGD update) matches eager.
5. Learnable constant decays (parameters of shape [H] and [H, M]) receive the reference gradient.

Under the Triton interpreter every kernel program is slow (chunk 128 costs ~10 s per backward even
at T=1), so the number of Hypothesis examples per (chunk size, layout) is small and scales with
the loaded Hypothesis profile ("ci": 20 examples -> x1, "gpu": 200 -> x10).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import Phase, given, settings, strategies as st

import differential
from slow import slow
from differential import rel_err
from gsa_compile import chunk_gsa, launch, recurrent_gsa
from gsa_compile import ops as gsa_ops

CHUNK_SIZES = (16, 32, 64, 128)
LAYOUTS = ("slot", "head", "decay_head", "decay_slot", "abc")
TOL = 1e-4  # ||a - b|| / ||b|| (see rel_err) for every float32 gradient against the float64 reference
# Examples per (chunk size, layout) under the "ci" profile; a backward at chunk 128 costs ~5-10 s in the interpreter
# (with conftest's interpreter patches).
BASE_EXAMPLES = {16: 2, 32: 2, 64: 1, 128: 1}
# Cap on (chunk rows) x (query heads) per example: the interpreter runs programs one by one.
COST_CAP = {16: 16, 32: 8, 64: 4, 128: 2}
T_MAX = {16: 49, 32: 69, 64: 89, 128: 135}  # the "above one chunk" regime draws odd T in (chunk, T_MAX]


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def make_gate(layout, B, T, H, M, gen, dtype):
    """Data-dependent gates: logsigmoid(randn); constant decays: -rand; ABC: None."""
    if layout == "slot":
        return F.logsigmoid(torch.randn(B, T, H, M, generator=gen, dtype=dtype))
    if layout == "head":
        return F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=dtype))
    if layout == "decay_head":
        return -torch.rand(H, generator=gen, dtype=dtype)
    if layout == "decay_slot":
        return -torch.rand(H, M, generator=gen, dtype=dtype)
    return None


def make_inputs(layout, B, T, HQ, H, K, V, M, N, initial_state, seed, dtype=torch.float32, device="cpu"):
    """Leaf tensors (q, k, v, s, g, hk0, hv0) that require grad; g is None for ABC, hk0/hv0 may be None."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, K, generator=gen, dtype=dtype)
    k = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    if layout == "abc":  # slot logits
        s = torch.randn(B, T, H, M, generator=gen, dtype=dtype)
    else:  # slot weights
        s = torch.rand(B, T, H, M, generator=gen, dtype=dtype)
    g = make_gate(layout, B, T, H, M, gen, dtype)
    hk0 = hv0 = None
    if initial_state:
        hk0 = torch.randn(N, H, K, M, generator=gen, dtype=dtype)
        hv0 = torch.randn(N, H, M, V, generator=gen, dtype=dtype)
    return tuple(None if x is None else x.to(device).requires_grad_() for x in (q, k, v, s, g, hk0, hv0))


# ----------------------------------------------------------------------------------------------
# 1. Hypothesis: float32 gradients against the float64 reference
# ----------------------------------------------------------------------------------------------

def rotated(options, shift):
    """sampled_from(options) whose first (simplest) choice is options[shift % len(options)].

    Hypothesis always tries the simplest example first, and with one or two examples per
    parametrization that example is most of the run. Rotating the option lists by the
    parametrization's index makes those first examples differ across layouts and chunk sizes:
    at chunk 128 (one example each) the five layouts cover T > chunk, T < chunk, T = 1, T = chunk.
    """
    shift %= len(options)
    return st.sampled_from(tuple(options[shift:]) + tuple(options[:shift]))


HEADS = ((1, 2), (2, 1), (1, 3), (1, 1), (2, 2))  # (H, GQA group)
K_DIMS = (5, 3, 7, 12, 1, 17, 24, 10, 20, 13)
V_DIMS = (7, 11, 3, 24, 6, 1, 19, 9)
M_DIMS = (3, 1, 5, 7, 12, 2, 9, 6)


@st.composite
def gradient_cases(draw, chunk, shift):
    """One case: shapes, flags and a seed for the random inputs, within COST_CAP[chunk]."""
    regime = draw(rotated(("above", "below", "one", "exact"), shift))
    if regime == "one":
        T = 1
    elif regime == "below":  # odd T inside the first chunk
        T = draw(st.integers(1, (chunk - 2) // 2)) * 2 + 1
    elif regime == "exact":  # whole chunks
        T = chunk * draw(st.sampled_from((1, 2) if chunk <= 32 else (1,)))
    else:  # odd T past the first chunk boundary
        T = draw(st.integers(chunk // 2, (T_MAX[chunk] - 1) // 2)) * 2 + 1
    # interpreter time grows with (chunk rows) x (query heads): batch, sequences and heads within the cap
    cap = COST_CAP[chunk] if gsa_ops.INTERPRETER else float("inf")
    chunks = -(-T // chunk)
    if draw(rotated(("varlen", "batch"), shift + 1)) == "varlen":
        n_seq = draw(rotated([n for n in (2, 3, 1) if n <= T and chunks + n - 1 <= cap] or [1], shift))
        cuts = sorted(draw(st.lists(st.integers(1, T - 1), min_size=n_seq - 1, max_size=n_seq - 1, unique=True))
                      if n_seq > 1 else [])
        B, cu_seqlens = 1, [0, *cuts, T]
        chunk_rows = sum(-(-(b - a) // chunk) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
    else:
        B, cu_seqlens = draw(rotated([b for b in (2, 1) if b * chunks <= cap] or [1], shift)), None
        chunk_rows = B * chunks
    heads = [hg for hg in HEADS if chunk_rows * hg[0] * hg[1] <= cap] or [(1, 1)]
    H, group = draw(rotated(heads, shift))
    return dict(T=T, B=B, cu_seqlens=cu_seqlens, H=H, HQ=H * group,
                K=draw(rotated(K_DIMS, shift)), V=draw(rotated(V_DIMS, shift + 3)), M=draw(rotated(M_DIMS, shift)),
                initial_state=draw(rotated((True, False), shift // 2)),
                upstream=draw(rotated(("both", "o", "final"), shift)),
                seed=draw(st.integers(0, 2**31 - 1)))


def check_gradients(layout, chunk_size, case, device):
    """Run chunk_gsa (float32) and recurrent_gsa (float64 copies), backward the same random upstream
    gradients through both (differential.compare, as test_fuzz) and return the errors by name: o, the final
    states and every input's gradient; dg against the summed magnitudes of its terms (a suffix sum of
    cancelling terms, README "Guarantees": measured against its own norm, a T = 1 head-gate case drawn in
    session 8 gave 1.17e-4 with the same kernels and reference as every passing run)."""
    B, T, HQ, H, K, V, M = (case[n] for n in ("B", "T", "HQ", "H", "K", "V", "M"))
    N = B if case["cu_seqlens"] is None else len(case["cu_seqlens"]) - 1
    inputs = make_inputs(layout, B, T, HQ, H, K, V, M, N, case["initial_state"], case["seed"], device=device)
    leaves = {n: x for n, x in zip(("q", "k", "v", "s", "g", "hk0", "hv0"), inputs) if x is not None}
    errors = differential.compare(dict(case, chunk_size=chunk_size, memory="contiguous"), leaves,
                                  {n: (lambda x: x) for n in leaves})
    assert errors.pop("finite"), case
    return errors


def _examples(chunk_size):
    scale = max(1, settings.default.max_examples // 20)
    return BASE_EXAMPLES[chunk_size] * scale


def _gradient_test(chunk_size):
    @pytest.mark.parametrize("layout", LAYOUTS)
    # No shrink phase: each rerun costs seconds in the interpreter; the failure message names the case.
    @settings(max_examples=_examples(chunk_size), deadline=None,
              phases=(Phase.explicit, Phase.reuse, Phase.generate))
    @given(data=st.data())
    def test(layout, data, device):
        shift = LAYOUTS.index(layout)
        case = data.draw(gradient_cases(chunk_size, shift), label="case")
        errors = check_gradients(layout, chunk_size, case, device)
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, (f"chunk_size={chunk_size} layout={layout} case={case}: relative errors above {TOL}: "
                         + ", ".join(f"{k}={v:.2e}" for k, v in bad.items()))

    test.__name__ = f"test_gradients_match_reference_chunk{chunk_size}"
    test.__doc__ = f"float32 gradients at chunk_size={chunk_size} match the float64 reference's autograd."
    return test


test_gradients_match_reference_chunk16 = _gradient_test(16)
test_gradients_match_reference_chunk32 = _gradient_test(32)
test_gradients_match_reference_chunk64 = _gradient_test(64)
test_gradients_match_reference_chunk128 = _gradient_test(128)


# ----------------------------------------------------------------------------------------------
# 5. Learnable constant decays
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["decay_head", "decay_slot"])
def test_learnable_decay_parameter_gradient(layout, device):
    """A decay nn.Parameter ([H] or [H, M]) used directly as g gets the reference gradient, summed
    over packed sequences (one spanning two chunks) and all their tokens."""
    B, T, HQ, H, K, V, M = 1, 25, 4, 2, 5, 6, 3
    cu = torch.tensor([0, 3, 25], dtype=torch.int32, device=device)
    q, k, v, s, g, hk0, hv0 = (x.detach() for x in make_inputs(layout, B, T, HQ, H, K, V, M, 2, True, seed=7,
                                                                device=device))
    decay = nn.Parameter(g.clone())
    gen = torch.Generator().manual_seed(11)
    do = torch.randn(B, T, HQ, V, generator=gen).to(device)
    dhk, dhv = torch.randn(2, H, K, M, generator=gen).to(device), torch.randn(2, H, M, V, generator=gen).to(device)

    def loss_of(fn, gate, tensors, **kwargs):
        q_, k_, v_, s_, a, b = tensors
        o, (hk, hv) = fn(q_, k_, v_, s_, gate, initial_state=(a, b), output_final_state=True, cu_seqlens=cu, **kwargs)
        return (o * do).sum() + (hk * dhk).sum() + (hv * dhv).sum()

    loss_of(chunk_gsa, decay, (q, k, v, s, hk0, hv0), chunk_size=16).backward()
    assert decay.grad is not None and decay.grad.shape == decay.shape
    decay_ref = decay.detach().double().requires_grad_()
    loss_of(recurrent_gsa, decay_ref, tuple(x.double() for x in (q, k, v, s, hk0, hv0))).backward()
    assert rel_err(decay.grad, decay_ref.grad) <= TOL


# ----------------------------------------------------------------------------------------------
# 2. gradcheck in float64 (interpreter only)
# ----------------------------------------------------------------------------------------------

needs_interpreter = pytest.mark.skipif(not gsa_ops.INTERPRETER, reason="float64 kernels run only under the "
                                       "Triton interpreter")
GRADCHECK_LAYOUTS = LAYOUTS


@needs_interpreter
@pytest.mark.parametrize("layout, varlen", [("slot", False), ("decay_head", False), ("abc", False), ("slot", True),
                                             ("abc", True)],
                         ids=["batch-slot", "batch-decay_head", "batch-abc", "varlen-slot", "varlen-abc"])
def test_float64_gradients_match_reference(layout, varlen):
    """Float64 kernels (interpreter) give the reference's gradients to float64 precision: every host
    step of the backward (ABC normaliser, gate-gradient suffix sums) must keep float64 too."""
    case = dict(T=21, H=2, HQ=4, K=5, V=3, M=3, initial_state=True, upstream="both", seed=3)
    case.update(B=1, cu_seqlens=[0, 6, 21]) if varlen else case.update(B=2, cu_seqlens=None)
    B, T, HQ, H, K, V, M = (case[n] for n in ("B", "T", "HQ", "H", "K", "V", "M"))
    cu = None if case["cu_seqlens"] is None else torch.tensor(case["cu_seqlens"], dtype=torch.int32)
    N = B if cu is None else cu.numel() - 1
    inputs = make_inputs(layout, B, T, HQ, H, K, V, M, N, True, seed=3, dtype=torch.float64)
    ref_inputs = tuple(None if x is None else x.detach().clone().requires_grad_() for x in inputs)
    gen = torch.Generator().manual_seed(4)
    do = torch.randn(B, T, HQ, V, generator=gen, dtype=torch.float64)
    dhk = torch.randn(N, H, K, M, generator=gen, dtype=torch.float64)
    dhv = torch.randn(N, H, M, V, generator=gen, dtype=torch.float64)

    def loss(fn, tensors, **kwargs):
        q, k, v, s, g, hk0, hv0 = tensors
        o, (hk, hv) = fn(q, k, v, s, g, initial_state=(hk0, hv0), output_final_state=True, cu_seqlens=cu, **kwargs)
        return (o * do).sum() + (hk * dhk).sum() + (hv * dhv).sum()

    names = [n for n, x in zip(("q", "k", "v", "s", "g", "hk0", "hv0"), inputs) if x is not None]
    grads = torch.autograd.grad(loss(chunk_gsa, inputs, chunk_size=16), [x for x in inputs if x is not None])
    grads_ref = torch.autograd.grad(loss(recurrent_gsa, ref_inputs), [x for x in ref_inputs if x is not None])
    errors = {f"d{n}": rel_err(a, b) for n, a, b in zip(names, grads, grads_ref)}
    assert all(a.dtype == torch.float64 for a in grads)
    bad = {n: e for n, e in errors.items() if not e <= 1e-10}
    assert not bad, ", ".join(f"{n}={e:.1e}" for n, e in bad.items())


def _gradcheck(layout, T, cu_seqlens=None, fast_mode=True, seed=0):
    B, HQ, H, K, V, M = 1, 2, 1, 2, 2, 2
    N = 1 if cu_seqlens is None else len(cu_seqlens) - 1
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32)
    inputs = make_inputs(layout, B, T, HQ, H, K, V, M, N, True, seed, dtype=torch.float64)
    present = [x for x in inputs if x is not None]

    def fn(*tensors):
        it = iter(tensors)
        q, k, v, s, g, hk0, hv0 = (None if x is None else next(it) for x in inputs)
        o, (hk, hv) = chunk_gsa(q, k, v, s, g, initial_state=(hk0, hv0), output_final_state=True,
                                cu_seqlens=cu, chunk_size=16)
        assert o.dtype == hk.dtype == hv.dtype == torch.float64
        return o, hk, hv

    assert torch.autograd.gradcheck(fn, tuple(present), eps=1e-6, atol=1e-6, fast_mode=fast_mode)


@pytest.mark.parametrize("varlen", [False, True])
def test_gate_gradient_of_a_sequence_does_not_depend_on_the_batch(varlen):
    """Each sequence's gradients (dg's sums over chunks included: gate_gradient.later_totals) from one batched call
    equal those of the sequence alone: bit for bit for a dense batch row, to float32 rounding when packed.
    Final-state gradients flow in too; fresh inputs, T not a multiple of the chunk."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    lengths = [37, 21]
    B, T = (1, sum(lengths)) if varlen else (len(lengths), max(lengths))
    H, K, V, M = 2, 16, 16, 8
    x = [torch.randn(B, T, H, d, generator=gen) for d in (K, K, V)]
    x.append(torch.randn(B, T, H, M, generator=gen).softmax(-1))
    x.append(F.logsigmoid(torch.randn(B, T, H, M, generator=gen)))
    cu = torch.tensor([0] + lengths).cumsum(0) if varlen else None
    N = len(lengths)
    upstream = (torch.randn(B, T, H, V, generator=gen), torch.randn(N, H, K, M, generator=gen),
                torch.randn(N, H, M, V, generator=gen))

    def grads(tensors, cu_seqlens, up):
        leaves = [t.clone().requires_grad_() for t in tensors]
        o, (hk, hv) = chunk_gsa(*leaves, output_final_state=True, cu_seqlens=cu_seqlens, chunk_size=16)
        return torch.autograd.grad((o * up[0]).sum() + (hk * up[1]).sum() + (hv * up[2]).sum(), leaves)

    batched = grads(x, cu, upstream)
    starts = [0] + torch.tensor(lengths).cumsum(0).tolist()
    for n, length in enumerate(lengths):
        rows = (slice(0, 1), slice(starts[n], starts[n] + length)) if varlen else (slice(n, n + 1), slice(0, T))
        alone = grads([t[rows] for t in x], None, (upstream[0][rows], upstream[1][n:n + 1], upstream[2][n:n + 1]))
        for name, a, b in zip("qkvsg", alone, batched):
            if varlen:
                torch.testing.assert_close(a, b[rows], rtol=1e-5, atol=1e-6, msg=f"d{name} of sequence {n}")
            else:
                assert torch.equal(a, b[rows]), f"d{name} of batch row {n}"


@pytest.mark.parametrize("layout, varlen, segments, backward_chunk", [("slot", False, None, None), ("abc", True, None, None),
                                                                      ("head", False, "2", None), ("slot", False, None, 32)])
def test_kept_states_give_the_recomputed_gradients(layout, varlen, segments, backward_chunk, monkeypatch):
    """checkpoint_level=0 (the forward's chunk states kept for the backward, eager) gives the gradients of the
    default (states recomputed in the backward) bit for bit: dense, packed and a segmented state pass. The
    backward skips its state pass, unless it runs at another chunk size than the forward (GSA_BACKWARD_CONFIG
    here; the tuned backward entry on a GPU), where it recomputes."""
    if segments:
        monkeypatch.setenv("GSA_STATE_SEGMENTS", segments)
    if backward_chunk:
        monkeypatch.setenv("GSA_BACKWARD_CONFIG", f"{backward_chunk},16,16,4,1,4,8")
    state_passes, real_state_pass = [], launch.state_pass
    monkeypatch.setattr(launch, "state_pass", lambda call, *a: state_passes.append(call) or real_state_pass(call, *a))
    cu = torch.tensor([0, 20, 45], dtype=torch.int32) if varlen else None
    B, T = (1, 45) if varlen else (2, 37)
    inputs = make_inputs(layout, B, T, 2, 1, 8, 8, 4, 2, True, seed=5)

    def grads(level):
        leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
        q, k, v, s, g, hk0, hv0 = leaves
        o, (hk, hv) = chunk_gsa(q, k, v, s, g, initial_state=(hk0, hv0), output_final_state=True, cu_seqlens=cu,
                                chunk_size=16, checkpoint_level=level)
        up = torch.Generator().manual_seed(1)
        loss = sum((x * torch.randn(x.shape, generator=up)).sum() for x in (o, hk, hv))
        return torch.autograd.grad(loss, [x for x in leaves if x is not None])

    names = [n for n, x in zip("q k v s g hk0 hv0".split(), inputs) if x is not None]
    recomputed = grads(None)
    assert len(state_passes) == 2
    for name, a, b in zip(names, recomputed, grads(0)):
        assert torch.equal(a, b), f"d{name}"
    assert len(state_passes) == (4 if backward_chunk else 3)
    with pytest.raises(ValueError, match="checkpoint_level"):
        chunk_gsa(*inputs[:5], checkpoint_level=3)


@needs_interpreter
@pytest.mark.parametrize("layout", GRADCHECK_LAYOUTS)
def test_gradcheck_float64(layout):
    """gradcheck (fast mode: finite differences along random directions of each input, against
    the backward's vector-Jacobian product) with initial state in and final states out."""
    _gradcheck(layout, T=5, fast_mode=True)


@needs_interpreter
def test_gradcheck_float64_varlen():
    _gradcheck("slot", T=7, cu_seqlens=[0, 3, 7], fast_mode=True, seed=1)


@needs_interpreter
@slow  # ~25 s in the interpreter
def test_gradcheck_float64_full_jacobian():
    """Element-by-element Jacobian (slow mode) for one data-dependent layout."""
    _gradcheck("head", T=5, fast_mode=False, seed=2)


# ----------------------------------------------------------------------------------------------
# 3. opcheck
# ----------------------------------------------------------------------------------------------

def _op_args(layout, B, T, HQ, H, K, V, M, initial_state, cu_seqlens, chunk_size=16, seed=0, device="cpu"):
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    N = B if cu is None else cu.numel() - 1
    q, k, v, s, g, hk0, hv0 = make_inputs(layout, B, T, HQ, H, K, V, M, N, initial_state, seed, device=device)
    return (q, k, v, s, g, K ** -0.5, hk0, hv0, cu, chunk_size, layout)


OPCHECK_CASES = {
    "plain": dict(layout="slot", B=2, T=7, HQ=2, H=2, K=3, V=5, M=2, initial_state=False, cu_seqlens=None),
    "gqa_initial_state": dict(layout="head", B=1, T=9, HQ=4, H=2, K=5, V=3, M=3, initial_state=True,
                              cu_seqlens=None),
    "varlen": dict(layout="decay_slot", B=1, T=11, HQ=2, H=1, K=3, V=2, M=3, initial_state=True,
                   cu_seqlens=[0, 4, 5, 11]),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck_chunk_forward_with_grad(case, device):
    args = _op_args(**OPCHECK_CASES[case], device=device)
    assert all(x.requires_grad for x in args if isinstance(x, torch.Tensor) and x.is_floating_point())
    torch.library.opcheck(torch.ops.gsa.chunk_forward.default, args)


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck_chunk_backward(case, device):
    """The backward op on its own: real outputs (values, shapes, strides) against its fake kernel."""
    q, k, v, s, g, scale, hk0, hv0, cu, chunk, layout = (
        x.detach() if isinstance(x, torch.Tensor) else x
        for x in _op_args(**OPCHECK_CASES[case], seed=1, device=device))
    gen = torch.Generator().manual_seed(5)
    N = q.shape[0] if cu is None else cu.numel() - 1
    H, K, V, M = k.shape[2], k.shape[3], v.shape[3], s.shape[3]
    do = torch.randn(q.shape[:3] + v.shape[3:], generator=gen).to(device)
    final_grads = case != "plain"  # None upstream gradients for the final states in the plain case
    dhk = torch.randn(N, H, K, M, generator=gen).to(device) if final_grads else None
    dhv = torch.randn(N, H, M, V, generator=gen).to(device) if final_grads else None
    torch.library.opcheck(torch.ops.gsa.chunk_backward.default,
                          (do, dhk, dhv, q, k, v, s, g, scale, hk0, hv0, cu, chunk, layout))


# ----------------------------------------------------------------------------------------------
# 4. torch.compile(fullgraph=True) training step
# ----------------------------------------------------------------------------------------------

class TinyGSA(nn.Module):
    def __init__(self, D=12, HQ=2, H=1, K=5, V=6, M=3):
        super().__init__()
        self.HQ, self.H, self.K, self.V, self.M = HQ, H, K, V, M
        self.q, self.k, self.v = nn.Linear(D, HQ * K), nn.Linear(D, H * K), nn.Linear(D, H * V)
        self.s, self.g = nn.Linear(D, H * M), nn.Linear(D, H * M)
        self.o = nn.Linear(HQ * V, D)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.HQ, self.K)
        k = self.k(x).view(B, T, self.H, self.K)
        v = self.v(x).view(B, T, self.H, self.V)
        s = torch.sigmoid(self.s(x)).view(B, T, self.H, self.M)
        g = (F.logsigmoid(self.g(x)) / 16).view(B, T, self.H, self.M)
        o, _ = chunk_gsa(q, k, v, s, g, chunk_size=16)
        return self.o(o.reshape(B, T, self.HQ * self.V))


def train_step(model, x, y, lr=0.1):
    """Forward, loss, backward and an SGD update, all in one traceable function.

    The update is written out: torch.optim's step() graph-breaks on purpose (torch/optim/
    optimizer.py `_use_grad` calls torch._dynamo.graph_break()), so it cannot sit in a fullgraph step.
    """
    loss = F.mse_loss(model(x), y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(lr * p.grad)
            p.grad = None
    return loss.detach()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_step_matches_eager(backend, device):
    """Two steps of a fullgraph-compiled train_step against eager, with no graph break or recompile.

    Each step starts both models from the same parameters (the compiled one is synced to eager's
    first), so the updates compared are those of one step on equal inputs: float32 drift along a
    trajectory would otherwise dominate (q/k weight updates of this model carry ~1e-5 float32 error
    against float64 even in eager).
    """
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = TinyGSA().to(device)
    compiled = copy.deepcopy(eager)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 19, 12, generator=gen).to(device), torch.randn(2, 19, 12, generator=gen).to(device))
               for _ in range(2)]

    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(train_step, backend=backend, fullgraph=True)
    # trace_autograd_ops: Dynamo traces loss.backward() into the graph instead of breaking on it
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for x, y in batches:
            with torch.no_grad():
                for p_compiled, p_eager in zip(compiled.parameters(), eager.parameters()):
                    p_compiled.copy_(p_eager)
            start = [p.detach().clone() for p in eager.parameters()]
            loss_eager = train_step(eager, x, y)
            loss_compiled = step(compiled, x, y)
            assert rel_err(loss_compiled, loss_eager) <= 1e-5
            for (name, p_eager), p_compiled, p0 in zip(eager.named_parameters(), compiled.parameters(), start):
                update_eager, update_compiled = p_eager.detach() - p0, p_compiled.detach() - p0
                assert update_eager.norm() > 0, name
                assert rel_err(update_compiled, update_eager) <= 1e-5, name
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1  # one graph, not recompiled for the second step
