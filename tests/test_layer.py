"""GatedSlotAttention layer and the example LM, under the interpreter on CPU (tiny shapes)."""
import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F

import gsa_compile.layer as layer_module
from gsa_compile import GatedSlotAttention, GSACache, recurrent_gsa

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = dict(hidden_size=32, num_heads=4, num_kv_heads=2, num_slots=8, use_short_conv=True, conv_bias=True,
           chunk_size=16)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_layer(seed=0, **overrides):
    torch.manual_seed(seed)
    layer = GatedSlotAttention(**{**CFG, **overrides})
    with torch.no_grad():  # non-trivial norm weights and conv biases
        for name, p in layer.named_parameters():
            if name.endswith("bias") or name == "g_norm.weight":
                p.add_(0.3 * torch.randn_like(p))
    return layer


def inputs(B, T, seed=1, hidden=32):
    return torch.randn(B, T, hidden, generator=torch.Generator().manual_seed(seed))


def reference_layer(layer, x, mask=None, params=None):
    """The layer's math in float64 plain torch: F.conv1d for the short conv, recurrent_gsa for GSA.

    `params` (name -> float64 tensor, may require grad) replaces the layer's own parameters."""
    P = params if params is not None else {n: p.detach().double() for n, p in layer.named_parameters()}
    x = x.double()
    B, T, _ = x.shape
    m = None if mask is None else mask[:, -T:].double()

    def branch(name):
        y = x @ P[f"{name}_proj.weight"].T
        if not layer.use_short_conv:
            return y
        if m is not None:
            y = y * m[..., None]
        w = P[f"{name}_conv1d.weight"]
        y = F.conv1d(y.transpose(1, 2), w, P.get(f"{name}_conv1d.bias"), padding=w.shape[-1] - 1, groups=w.shape[0])
        return F.silu(y[..., :T].transpose(1, 2))

    phi = {"SwishFeatureMap": F.silu, "ReLUFeatureMap": F.relu,
           "T2RFeatureMap": lambda t: F.relu(t @ P["feature_map.layer.weight"].T)}[type(layer.feature_map).__name__]
    H, HQ, K, V, M = layer.num_kv_heads, layer.num_heads, layer.head_k_dim, layer.head_v_dim, layer.num_slots
    q = phi(branch("q").view(B, T, HQ, K))
    k = phi(branch("k").view(B, T, H, K))
    v = F.silu(branch("v").view(B, T, H, V))
    f = F.logsigmoid((x @ P["f_proj.weight"].T).view(B, T, H, M)) / layer.gate_logit_normalizer
    s = 1 - torch.exp(f)
    if m is not None:
        f, s = f * m[..., None, None], s * m[..., None, None]
    o, _ = recurrent_gsa(q, k, v, s, f, layer.scale)
    o = F.silu(o.reshape(B, T, layer.value_dim))
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.g_norm.eps)
    if "g_norm.weight" in P:
        o = o * P["g_norm.weight"]
    o = o @ P["o_proj.weight"].T
    return o if m is None else o * m[..., None]


# (c) Parameter names and shapes of fla's layer: fla/layers/gsa.py, GatedSlotAttention.__init__
# (github.com/fla-org/flash-linear-attention, 0.5.2 tag and main): feature_map (T2RFeatureMap.layer
# for 't2r'), q_proj/k_proj/v_proj/f_proj (bias=False), q/k/v_conv1d (ShortConvolution, an
# nn.Conv1d depthwise: weight [D, 1, conv_size], bias if conv_bias), g_norm (RMSNorm weight), o_proj.
FLA_KEYS_CONV = [  # hidden 32, num_heads 4, num_kv_heads 2, num_slots 8, use_short_conv, conv_size 4
    ("q_proj.weight", (32, 32)), ("k_proj.weight", (16, 32)), ("v_proj.weight", (16, 32)),
    ("f_proj.weight", (16, 32)), ("q_conv1d.weight", (32, 1, 4)), ("k_conv1d.weight", (16, 1, 4)),
    ("v_conv1d.weight", (16, 1, 4)), ("g_norm.weight", (32,)), ("o_proj.weight", (32, 32))]
FLA_KEYS_T2R = [  # hidden 32, num_heads 2, expand_k 0.5, num_slots None (= head_k_dim 8), conv_bias,
    # conv_size 3, feature_map 't2r', elementwise_affine False (no g_norm.weight)
    ("feature_map.layer.weight", (8, 8)), ("q_proj.weight", (16, 32)), ("k_proj.weight", (16, 32)),
    ("v_proj.weight", (32, 32)), ("f_proj.weight", (16, 32)), ("q_conv1d.weight", (16, 1, 3)),
    ("q_conv1d.bias", (16,)), ("k_conv1d.weight", (16, 1, 3)), ("k_conv1d.bias", (16,)),
    ("v_conv1d.weight", (32, 1, 3)), ("v_conv1d.bias", (32,)), ("o_proj.weight", (32, 32))]


@pytest.mark.parametrize("kwargs, expected", [
    (dict(hidden_size=32, num_heads=4, num_kv_heads=2, num_slots=8, use_short_conv=True), FLA_KEYS_CONV),
    (dict(hidden_size=32, num_heads=2, expand_k=0.5, use_short_conv=True, conv_size=3, conv_bias=True,
          feature_map="t2r", elementwise_affine=False), FLA_KEYS_T2R),
    (dict(hidden_size=32, num_heads=4), [("q_proj.weight", (32, 32)), ("k_proj.weight", (32, 32)),
                                         ("v_proj.weight", (32, 32)), ("f_proj.weight", (32, 32)),
                                         ("g_norm.weight", (32,)), ("o_proj.weight", (32, 32))]),
])
def test_state_dict_matches_fla(kwargs, expected):
    layer = GatedSlotAttention(**kwargs)
    assert [(k, tuple(v.shape)) for k, v in layer.state_dict().items()] == expected
    fla_state = {k: torch.randn(shape) for k, shape in expected}
    layer.load_state_dict(fla_state, strict=True)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in fla_state.items())


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(num_heads=2, num_kv_heads=None, expand_k=0.5, num_slots=None, feature_map="t2r", use_short_conv=False,
         elementwise_affine=False, scale=None),
], ids=["gqa-conv-swish", "mha-t2r-noconv"])
def test_layer_matches_float64_reference(overrides):
    layer = make_layer(**overrides)
    x = inputs(2, 20)
    with torch.no_grad():
        out, _ = layer(x)
    assert rel(out, reference_layer(layer, x)) <= 1e-5


def test_prefill_then_decode_equals_full_chunked(monkeypatch):
    calls = []
    original = layer_module.recurrent_step
    monkeypatch.setattr(layer_module, "recurrent_step",
                        lambda *a, **kw: calls.append(a[0].shape[1]) or original(*a, **kw))
    layer = make_layer()
    x = inputs(2, 24)
    with torch.no_grad():
        full, final = layer(x, use_cache=True)
        outputs, cache = [], None
        for a, b in ((0, 14), (14, 15), (15, 18), (18, 19), (19, 24)):  # chunk, 1, 3 and 1 decoded, chunk
            o, cache = layer(x[:, a:b], cache=cache, use_cache=True)
            outputs.append(o)
    assert calls == [1, 3, 1], "the short steps must take the recurrent decode path"
    assert rel(torch.cat(outputs, 1), full) <= 1e-5
    assert cache.seen_tokens == 24
    for got, want in zip(cache.recurrent_state + cache.conv_state, final.recurrent_state + final.conv_state):
        assert rel(got, want) <= 1e-5


def test_left_padding_equals_unpadded_sequences():
    layer = make_layer(seed=2)
    lengths, T = [9, 5], 9
    seqs = [inputs(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    steps = [inputs(1, 2, seed=20 + i) for i in range(len(lengths))]
    x = torch.cat([F.pad(s, (0, 0, T - s.shape[1], 0)) for s in seqs])  # left padding
    mask = torch.stack([torch.arange(T) >= T - n for n in lengths]).long()
    with torch.no_grad():
        out, cache = layer(x, attention_mask=mask, use_cache=True)
        full_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)  # HF style: the mask grows
        step_out = [layer(torch.cat([s[:, :1] for s in steps]), full_mask, cache, use_cache=True)]
        full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        step_out.append(layer(torch.cat([s[:, 1:] for s in steps]), full_mask, step_out[0][1], use_cache=True))
        for i, (seq, n) in enumerate(zip(seqs, lengths)):
            alone, alone_cache = layer(seq, use_cache=True)
            assert rel(out[i, T - n:], alone[0]) <= 1e-5
            assert out[i, : T - n].abs().max() == 0 if n < T else True
            o1, alone_cache = layer(steps[i][:, :1], cache=alone_cache, use_cache=True)
            o2, _ = layer(steps[i][:, 1:], cache=alone_cache, use_cache=True)
            assert rel(step_out[0][0][i], o1[0]) <= 1e-5 and rel(step_out[1][0][i], o2[0]) <= 1e-5
    assert rel(out, reference_layer(layer, x, mask)) <= 1e-5


def test_cu_seqlens_equals_separate_sequences():
    layer = make_layer(seed=3)
    lengths = [9, 2, 7]
    heads = [inputs(1, 3, seed=30 + i) for i in range(3)]  # a prefix per sequence, for the caches
    seqs = [inputs(1, n, seed=40 + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0, 9, 11, 18])
    with torch.no_grad():
        prefixes = [layer(h, use_cache=True)[1] for h in heads]
        stacked = GSACache(tuple(torch.cat([c.recurrent_state[j] for c in prefixes]) for j in range(2)),
                           tuple(torch.cat([c.conv_state[j] for c in prefixes]) for j in range(3)))
        for cache in (None, stacked):
            packed, packed_cache = layer(torch.cat(seqs, 1), cache=cache, use_cache=True, cu_seqlens=cu)
            for i, seq in enumerate(seqs):
                alone, alone_cache = layer(seq, cache=None if cache is None else prefixes[i], use_cache=True)
                assert rel(packed[:, cu[i]:cu[i + 1]], alone) <= 1e-5
                for got, want in zip(packed_cache.recurrent_state + packed_cache.conv_state,
                                     alone_cache.recurrent_state + alone_cache.conv_state):
                    assert rel(got[i], want[0]) <= 1e-5


def test_gradients_reach_every_parameter_and_match_reference():
    layer = make_layer(seed=4, feature_map="t2r")
    x = inputs(2, 12, seed=5).requires_grad_()
    weight = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(6))
    out, _ = layer(x)
    (out * weight).sum().backward()
    params64 = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    ref = reference_layer(layer, x.detach(), params=params64)
    ref_grads = torch.autograd.grad((ref * weight).sum(), list(params64.values()))
    assert rel(out, ref) <= 1e-5
    for (name, p), g in zip(layer.named_parameters(), ref_grads):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
        assert rel(p.grad, g) <= 1e-4, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _load_example():
    spec = importlib.util.spec_from_file_location("gsa_lm", ROOT / "examples" / "gsa_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_lm(seed=0):
    lm = _load_example()
    torch.manual_seed(seed)
    return lm, lm.GSALM(vocab_size=16, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, num_slots=4,
                        use_short_conv=True, chunk_size=16)


def test_compiled_loss_has_no_graph_breaks_and_matches_eager():
    lm, model = tiny_lm()
    tokens = torch.randint(0, 16, (2, 13), generator=torch.Generator().manual_seed(7))
    loss = lm.lm_loss(model, tokens)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(lm.lm_loss, fullgraph=True, backend="aot_eager")
    loss_c = compiled(model, tokens)
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert rel(loss_c, loss) <= 1e-5
    for (name, _), g, gc in zip(model.named_parameters(), grads, grads_c):
        assert rel(gc, g) <= 1e-5, name
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.lm_head.weight.detach().clone()
    assert abs(lm.train_step(model, optimizer, tokens, compiled) - loss.item()) <= 1e-5 * loss.item()
    assert not torch.equal(before, model.lm_head.weight)


def test_generate_equals_greedy_full_recompute(monkeypatch):
    calls = []
    original = layer_module.recurrent_step
    monkeypatch.setattr(layer_module, "recurrent_step", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    lm, model = tiny_lm(seed=1)
    prompt = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(8))
    out = lm.generate(model, prompt, 4)
    assert len(calls) == 3 * 2, "every generated token after the first is decoded by recurrent_step (2 layers)"
    seq = prompt
    with torch.no_grad():
        for _ in range(4):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
