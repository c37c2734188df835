"""Decode (recurrent_step) vs the chunked forward, under the interpreter on CPU."""
import pytest
import torch
import torch.nn.functional as F

from gsa_compile import chunk_gsa, recurrent_step

LAYOUTS = ["slot", "head", "decay_head", "decay_slot"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(layout, B=2, T=19, HQ=4, H=2, K=20, V=12, M=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)
    g = {"slot": lambda: F.logsigmoid(r(B, T, H, M)), "head": lambda: F.logsigmoid(r(B, T, H)),
         "decay_head": lambda: -torch.rand(H, generator=gen), "decay_slot": lambda: -torch.rand(H, M, generator=gen)}
    return r(B, T, HQ, K), r(B, T, H, K), r(B, T, H, V), torch.rand(B, T, H, M, generator=gen), g[layout]()


def window(x, a, b):
    return x[:, a:b] if x.dim() > 2 else x  # constant decays have no time axis


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_then_decode_equals_chunked(layout):
    q, k, v, s, g = make(layout, seed=LAYOUTS.index(layout))
    T, prefix = q.shape[1], 15
    full, _ = chunk_gsa(q, k, v, s, g, chunk_size=16)
    o, state = chunk_gsa(*(window(x, 0, prefix) for x in (q, k, v, s, g)), output_final_state=True, chunk_size=16)
    outputs = [o]
    for t in range(prefix, T):
        o, state = recurrent_step(*(window(x, t, t + 1) for x in (q, k, v, s, g)), state=state, inplace=t % 2 == 0)
        outputs.append(o)
    assert rel(torch.cat(outputs, 1), full) <= 1e-5


def test_several_tokens_and_state_semantics():
    q, k, v, s, g = make("slot")
    _, state = chunk_gsa(*(window(x, 0, 10) for x in (q, k, v, s, g)), output_final_state=True, chunk_size=16)
    before = [x.clone() for x in state]
    rest = [window(x, 10, 19) for x in (q, k, v, s, g)]
    o_functional, new_state = recurrent_step(*rest, state=state)
    assert all(torch.equal(a, b) for a, b in zip(state, before)), "functional form must not modify the state"
    o_inplace, same = recurrent_step(*rest, state=state, inplace=True)
    assert same[0] is state[0] and same[1] is state[1]
    assert torch.equal(o_inplace, o_functional)
    assert all(torch.equal(a, b) for a, b in zip(state, new_state)), "in place must equal the functional result"
    full, final = chunk_gsa(q, k, v, s, g, output_final_state=True, chunk_size=16)
    assert rel(o_functional, full[:, 10:]) <= 1e-5 and rel(new_state[0], final[0]) <= 1e-5


def test_bad_inputs():
    q, k, v, s, g = make("slot", T=1)
    state = (torch.zeros(2, 2, 20, 6), torch.zeros(2, 2, 6, 12))
    with pytest.raises(ValueError, match="ABC"):
        recurrent_step(q, k, v, s, None, state=state)
    with pytest.raises(ValueError, match="float32 contiguous"):
        recurrent_step(q, k, v, s, g, state=(state[0].transpose(2, 3).contiguous().transpose(2, 3), state[1]),
                       inplace=True)
    with pytest.raises(ValueError, match="hk"):
        recurrent_step(q, k, v, s, g, state=(torch.zeros(2, 2, 20, 5), state[1]))


def test_opcheck_decode_ops():
    q, k, v, s, g = make("head", T=2)
    hk, hv = torch.randn(2, 2, 20, 6), torch.randn(2, 2, 6, 12)
    torch.library.opcheck(torch.ops.gsa.recurrent_step_.default, (q, k, v, s, g, 0.3, hk.clone(), hv.clone(), "head"))
    torch.library.opcheck(torch.ops.gsa.recurrent_step.default, (q, k, v, s, g, 0.3, hk, hv, "head"))


def test_compiled_inplace_decode_matches_eager():
    q, k, v, s, g = make("slot", T=1)
    state = [torch.randn(2, 2, 20, 6), torch.randn(2, 2, 6, 12)]
    eager_state = [x.clone() for x in state]

    def step(q, k, v, s, g, hk, hv):
        return recurrent_step(q, k, v, s, g, state=(hk, hv), inplace=True)[0]

    o = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, s, g, *state)
    o_ref = step(q, k, v, s, g, *eager_state)
    assert torch.allclose(o, o_ref) and all(torch.allclose(a, b) for a, b in zip(state, eager_state))
