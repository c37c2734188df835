"""The fused forward (programs_fused, GSA_FUSED_FORWARD=1): the same outputs, final states and gradients as the
gate, state and output passes, bit for bit (one K and one V tile, so both sum in the same order), in both
intra-chunk forms, with initial states and packed sequences; ineligible calls keep the three passes."""
import pytest
import torch
import torch.nn.functional as F

from gsa_compile import chunk_gsa, codegen, overrides

KERNEL = codegen.kernel  # (each run wraps the original)


def _inputs(seed, B, T, HQ, H, K, V, M, layout, strong=False):
    """strong: gates of -120 (floored to spec.GATE_FLOOR, -40) at tokens 18-21, so that chunk 1 (of 16 rows)
    takes the exact form (a spread of 4 * 40 log2(e) > blocks.FACTOR_SPREAD_MAX), the others not."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    g = {"slot": lambda: F.logsigmoid(r(B, T, H, M)) / 4, "head": lambda: F.logsigmoid(r(B, T, H)) / 4,
         "decay_slot": lambda: -torch.rand(H, M, generator=gen) / 4}[layout]()
    if strong:
        g[:, 18:22] = -120.0
    xs = [r(B, T, HQ, K), r(B, T, H, K), r(B, T, H, V), torch.rand(B, T, H, M, generator=gen), g]
    return [x.requires_grad_() for x in xs]


def _run(xs, fused, monkeypatch, states=None, **kwargs):
    """o, final states and the inputs' gradients, and the programs launched by name."""
    monkeypatch.setenv(overrides.FUSED_ENV, "1" if fused else "0")
    launched = []
    monkeypatch.setattr(codegen, "kernel", lambda builder, spec: launched.append(builder.__name__) or KERNEL(builder, spec))
    o, (hk, hv) = chunk_gsa(*xs, initial_state=states, output_final_state=True, chunk_size=16, **kwargs)
    gen = torch.Generator().manual_seed(3)
    loss = sum((x * torch.randn(x.shape, generator=gen)).sum() for x in (o, hk, hv))
    leaves = xs + ([] if states is None else list(states))
    return [o, hk, hv, *torch.autograd.grad(loss, leaves)], launched


@pytest.mark.parametrize("layout, varlen, initial, factored, V, strong", [
    ("slot", False, False, "1", 20, False), ("slot", True, True, "1", 40, True), ("head", False, True, "1", 40, True),
    ("head", False, False, "0", 20, False), ("decay_slot", True, False, "0", 20, False),
])
def test_fused_forward_is_bitwise_the_three_passes(layout, varlen, initial, factored, V, strong, monkeypatch):
    """V = 40 in tiles of 16: three programs per head, each with its columns of Hv and o (the last partial).
    strong: one chunk's gates do not factor (its o from output_pass_exact); factored "0": no chunk's do."""
    monkeypatch.setenv(overrides.FACTORED_ENV, factored)  # "0": every chunk in the exact form
    monkeypatch.setenv(overrides.FORWARD_CONFIG_ENV, "16,32,16,4,2")
    seed = torch.seed() % 2**31
    B, T, H, K, M = (1, 45, 2, 24, 8) if varlen else (2, 37, 2, 24, 8)
    xs = _inputs(seed, B, T, H, H, K, V, M, layout, strong)
    kwargs = dict(cu_seqlens=torch.tensor([0, 13, 45])) if varlen else {}
    N = 2 if varlen else B
    states = tuple(torch.randn(N, H, *shape).requires_grad_() for shape in ((K, M), (M, V))) if initial else None
    plain, launched_plain = _run(xs, False, monkeypatch, states, **kwargs)
    fused, launched_fused = _run(xs, True, monkeypatch, states, **kwargs)
    assert launched_fused[:3] == ["gate_pass", "fused_pass", "output_pass_exact"]
    assert "fused_pass" not in launched_plain
    for i, (a, b) in enumerate(zip(fused, plain)):
        assert torch.equal(a, b), f"output {i} differs (seed {seed})"


@pytest.mark.parametrize("HQ, K", [(4, 24), (2, 160)])  # GQA; K past programs_fused.FUSED_MAX_DIM
def test_ineligible_calls_keep_the_three_passes(HQ, K, monkeypatch):
    xs = _inputs(0, 1, 20, HQ, 2, K, 16, 8, "slot")
    _, launched = _run(xs, True, monkeypatch)
    assert "fused_pass" not in launched and "output_pass" in launched
