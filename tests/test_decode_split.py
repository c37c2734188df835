"""Split decode (issue 7): NS programs per (sequence, kv head) in two launches (programs_decode.decode_keys,
decode_values) give the one-launch kernel's outputs and states, and the float64 reference's, under the
interpreter. NS is forced with GSA_DECODE_SPLITS (NS = 1 is the one-launch kernel)."""
import pytest
import torch
import torch.nn.functional as F

from gsa_compile import GSAMods, launch_decode, recurrent_gsa, recurrent_step

LAYOUTS = ["slot", "head", "decay_head", "decay_slot"]
SPLITS = [1, 2, 4]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(layout, B, T=2, HQ=4, H=2, K=20, V=12, M=6, seed=0):
    """K, V not multiples of NS: the last split owns fewer rows / columns (and NS = 4 > V / BV)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)
    g = {"slot": lambda: F.logsigmoid(r(B, T, H, M)), "head": lambda: F.logsigmoid(r(B, T, H)),
         "decay_head": lambda: -torch.rand(H, generator=gen), "decay_slot": lambda: -torch.rand(H, M, generator=gen)}
    inputs = (r(B, T, HQ, K), r(B, T, H, K), r(B, T, H, V), torch.rand(B, T, H, M, generator=gen), g[layout]())
    return inputs, (r(B, H, K, M) * 0.3, r(B, H, M, V) * 0.3)


def run(monkeypatch, splits, inputs, state, inplace, **kwargs):
    monkeypatch.setenv(launch_decode.DECODE_SPLITS_ENV, str(splits))
    state = tuple(x.clone() for x in state)
    o, new = recurrent_step(*inputs, state=state, inplace=inplace, **kwargs)
    if inplace:
        assert new[0] is state[0] and new[1] is state[1]
    return o, new


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_equals_one_launch_and_reference(monkeypatch, layout, B):
    """Every gate layout, GQA (HQ = 4 on H = 2), T = 2 tokens, in place and functional."""
    inputs, state = make(layout, B, seed=LAYOUTS.index(layout) + 10 * B)
    ro, (rhk, rhv) = recurrent_gsa(*(x.double() for x in inputs), initial_state=tuple(x.double() for x in state),
                                   output_final_state=True)
    base = run(monkeypatch, 1, inputs, state, inplace=True)
    for splits in SPLITS:
        for inplace in (True, False):
            o, (hk, hv) = run(monkeypatch, splits, inputs, state, inplace)
            assert rel(o, ro) <= 1e-5 and rel(hk, rhk) <= 1e-6 and rel(hv, rhv) <= 1e-6, (splits, inplace)
            assert torch.allclose(o, base[0], rtol=1e-5, atol=1e-6), (splits, inplace)
            # the state updates do not depend on the split (same operations per element): bit for bit
            assert torch.equal(hk, base[1][0]) and torch.equal(hv, base[1][1]), (splits, inplace)


def test_functional_split_leaves_state(monkeypatch):
    inputs, state = make("slot", 1)
    before = tuple(x.clone() for x in state)
    monkeypatch.setenv(launch_decode.DECODE_SPLITS_ENV, "4")
    recurrent_step(*inputs, state=state)
    assert all(torch.equal(a, b) for a, b in zip(state, before))


def test_split_with_mods(monkeypatch):
    """Load mods, gate_mod with s_from_gate and a slot_mod with a captured tensor, split 1/2/4."""
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.5])

    def slot_mod(logit, b, h, t, m):
        return logit / temperature[h]
    mods = GSAMods(q_map=F.relu, k_map=F.silu, v_map=lambda x: F.elu(x) + 1, gate_mod=lambda f: F.logsigmoid(f) / 8,
                   s_from_gate=True, slot_mod=slot_mod)
    (q, k, v, _, f), state = make("slot", 3, seed=3)
    ro, (rhk, rhv) = recurrent_gsa(*mods.apply(q, k, v, None, f), initial_state=state, output_final_state=True,
                                   slot_mod=slot_mod)
    base = run(monkeypatch, 1, (q, k, v, None, f), state, inplace=True, mods=mods)
    for splits in SPLITS:
        o, (hk, hv) = run(monkeypatch, splits, (q, k, v, None, f), state, inplace=splits != 2, mods=mods)
        assert rel(o, ro) <= 1e-5 and rel(hk, rhk) <= 1e-5 and rel(hv, rhv) <= 1e-5, splits
        assert torch.allclose(o, base[0], rtol=1e-5, atol=1e-6), splits


def test_split_count_choice(monkeypatch):
    monkeypatch.delenv(launch_decode.DECODE_SPLITS_ENV, raising=False)
    monkeypatch.setattr(launch_decode, "_sm_count", lambda device: 132)  # H200
    assert launch_decode.decode_splits(4, 512, 512, "cpu") == 1  # the interpreter: one launch unless forced
    assert launch_decode.decode_splits(4, 512, 512, "cuda") == 8  # B=1 H=4
    assert launch_decode.decode_splits(256, 512, 512, "cuda") == 1  # B=64 H=4: every SM busy, one launch timed best
    assert launch_decode.decode_splits(131, 512, 512, "cuda") == 2  # fewer heads than SMs
    assert launch_decode.decode_splits(64, 16, 512, "cuda") == 1  # K / 16 = 1
    assert launch_decode.decode_splits(48, 512, 512, "cuda") == 2
    assert launch_decode.decode_splits(4, 32, 64, "cuda") == 2  # at most K / 16
    assert launch_decode.decode_splits(4, 512, 512, "cuda", splits=3) == 3
    assert launch_decode.decode_tiles(1, 1, 64) == (128, 128, 8) and launch_decode.decode_tiles(1, 4, 64) == (32, 32, 8)
    assert launch_decode.decode_tiles(8, 1, 64) == (32, 32, 4)
    monkeypatch.setenv(launch_decode.DECODE_SPLITS_ENV, "64")
    assert launch_decode.decode_splits(4, 20, 12, "cuda") == 12  # forced, clamped to min(K, V)
