"""Every bad input raises the right exception type with a message naming the argument."""
import pytest
import torch

from gsa_compile import recurrent_gsa
from gsa_compile.spec import GateLayout, check_chunk_size, validate_inputs

B, T, HQ, H, K, V, M = 2, 6, 4, 2, 5, 3, 7


def inputs(dtype=torch.float32, **override):
    x = dict(q=torch.randn(B, T, HQ, K, dtype=dtype), k=torch.randn(B, T, H, K, dtype=dtype),
             v=torch.randn(B, T, H, V, dtype=dtype), s=torch.randn(B, T, H, M, dtype=dtype),
             g=torch.randn(B, T, H, M, dtype=dtype))
    x.update(override)
    return x


def state(n=B, h=H, k=K, m=M, v=V):
    return torch.zeros(n, h, k, m), torch.zeros(n, h, m, v)


def packed(cu, t=T, **kw):
    """B=1 inputs of length t, for cu_seqlens checks."""
    return dict(q=torch.randn(1, t, HQ, K), k=torch.randn(1, t, H, K), v=torch.randn(1, t, H, V),
                s=torch.randn(1, t, H, M), g=None, cu_seqlens=cu, **kw)


def test_valid_inputs_pass():
    problem = validate_inputs(**inputs())
    assert (problem.B, problem.T, problem.HQ, problem.H, problem.K, problem.V, problem.M) == (B, T, HQ, H, K, V, M)
    assert problem.N == B and problem.group == 2 and problem.layout is GateLayout.SLOT
    assert problem.scale == pytest.approx(K ** -0.5)
    assert validate_inputs(**packed(torch.tensor([0, 2, 6]))).N == 2


def test_meta_tensors_skip_value_checks():
    """Under tracing (fake/meta tensors) cu_seqlens values cannot be read: only shapes are checked."""
    meta = {name: t.to("meta") for name, t in packed(torch.tensor([0, 3, 6])).items() if t is not None}
    assert validate_inputs(**meta).N == 2


@pytest.mark.parametrize("name, shape", [("q", (B, T, HQ)), ("k", (B, T, H, K, 1)), ("v", (T, H, V)), ("s", (B, T, H))])
def test_wrong_rank(name, shape):
    with pytest.raises(ValueError, match=rf"^{name} must have shape"):
        validate_inputs(**inputs(**{name: torch.randn(*shape)}))


def test_not_a_tensor():
    with pytest.raises(TypeError, match=r"^q must be a torch.Tensor"):
        validate_inputs(**inputs(q=[[1.0]]))


@pytest.mark.parametrize("name, shape, symbol", [
    ("k", (B + 1, T, H, K), "B"), ("k", (B, T + 1, H, K), "T"), ("k", (B, T, H, K + 1), "K"),
    ("v", (B, T - 1, H, V), "T"), ("v", (B, T, H + 1, V), "H"), ("s", (1, T, H, M), "B"), ("s", (B, T, 1, M), "H")])
def test_mismatched_sizes(name, shape, symbol):
    with pytest.raises(ValueError, match=rf"^{name} must have shape .* with {symbol}="):
        validate_inputs(**inputs(**{name: torch.randn(*shape)}))


def test_hq_not_multiple_of_h():
    with pytest.raises(ValueError, match=r"q has HQ=3 heads and k has H=2"):
        validate_inputs(**inputs(q=torch.randn(B, T, 3, K)))


@pytest.mark.parametrize("sizes, message", [
    (dict(b=0), r"^q must have batch size B >= 1"), (dict(t=0), r"^q must have T >= 1 tokens"),
    (dict(hq=0), r"^q has HQ=0 heads and k has H=2"), (dict(h=0, hq=0), r"^q has HQ=0 heads and k has H=0")])
def test_empty_sizes(sizes, message):
    b, t, hq, h = sizes.get("b", B), sizes.get("t", T), sizes.get("hq", HQ), sizes.get("h", H)
    x = dict(q=torch.randn(b, t, hq, K), k=torch.randn(b, t, h, K), v=torch.randn(b, t, h, V),
             s=torch.randn(b, t, h, M))
    with pytest.raises(ValueError, match=message):
        validate_inputs(**x)


@pytest.mark.parametrize("g_shape, expected", [
    ((B, T, H, M + 1), r"\[B, T, H, M\]"), ((B, T, H + 1), r"\[B, T, H\]"), ((H + 1,), r"\[H\]"),
    ((H, M - 1), r"\[H, M\]"), ((1, T, H, M), r"\[B, T, H, M\]")])
def test_gate_shape_for_its_layout(g_shape, expected):
    with pytest.raises(ValueError, match=rf"^g must have shape {expected}"):
        validate_inputs(**inputs(g=torch.randn(*g_shape)))


def test_gate_rank_not_a_layout():
    with pytest.raises(ValueError, match=r"^g must be \[B,T,H,M\]"):
        validate_inputs(**inputs(g=torch.randn(B, T, H, M, 1)))
    with pytest.raises(TypeError, match=r"^g must be a torch.Tensor or None"):
        validate_inputs(**inputs(g=0.5))


@pytest.mark.parametrize("layout, g", [("slot", torch.randn(H)), ("head", None), ("abc", torch.randn(H, M)),
                                       (GateLayout.DECAY_HEAD, torch.randn(B, T, H))])
def test_gate_layout_mismatch(layout, g):
    with pytest.raises(ValueError, match=r"^gate_layout="):
        validate_inputs(**inputs(g=g), gate_layout=layout)


def test_gate_layout_unknown_and_aliases():
    with pytest.raises(ValueError, match=r"^gate_layout must be one of"):
        validate_inputs(**inputs(), gate_layout="diagonal")
    assert validate_inputs(**inputs(), gate_layout="gsa").layout is GateLayout.SLOT
    assert validate_inputs(**inputs(g=None), gate_layout="none").layout is GateLayout.ABC


@pytest.mark.parametrize("name", ["q", "k", "v", "s", "g"])
def test_integer_dtype(name):
    x = inputs()
    x[name] = x[name].to(torch.int32)
    with pytest.raises(TypeError, match=rf"^{name} must be a floating-point tensor"):
        validate_inputs(**x)


@pytest.mark.parametrize("name", ["k", "v", "s"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_mismatched_dtypes(name, dtype):
    x = inputs()
    x[name] = x[name].to(dtype)
    with pytest.raises(TypeError, match=rf"^{name} has dtype {dtype} but q has torch.float32"):
        validate_inputs(**x)


def test_float64_q_with_float32_rest():
    with pytest.raises(TypeError, match=r"^k has dtype torch.float32 but q has torch.float64"):
        validate_inputs(**inputs(q=torch.randn(B, T, HQ, K, dtype=torch.float64)))


@pytest.mark.parametrize("name", ["k", "v", "s", "g"])
def test_mismatched_devices(name):
    x = inputs()
    x[name] = x[name].to("meta")
    with pytest.raises(ValueError, match=rf"^{name} is on meta but q is on cpu"):
        validate_inputs(**x)


@pytest.mark.parametrize("which, kwargs, label", [
    (0, dict(k=K + 1), r"initial_state\[0\] \(hk\) must have shape \[N, H, K, M\]"),
    (0, dict(n=B + 1), r"initial_state\[0\] \(hk\) must have shape \[N, H, K, M\]"),
    (1, dict(v=V + 1), r"initial_state\[1\] \(hv\) must have shape \[N, H, M, V\]"),
    (1, dict(h=HQ), r"initial_state\[1\] \(hv\) must have shape \[N, H, M, V\]")])
def test_initial_state_shapes(which, kwargs, label):
    good, bad = state(), state(**kwargs)
    pair = (bad[0], good[1]) if which == 0 else (good[0], bad[1])
    with pytest.raises(ValueError, match=rf"^{label}"):
        validate_inputs(**inputs(), initial_state=pair)


@pytest.mark.parametrize("bad", [torch.zeros(B, H, K, M), state() + (torch.zeros(1),), {"hk": 0, "hv": 1}])
def test_initial_state_not_a_pair(bad):
    with pytest.raises(TypeError, match=r"^initial_state must be a pair"):
        validate_inputs(**inputs(), initial_state=bad)


def test_initial_state_parts():
    with pytest.raises(TypeError, match=r"^initial_state\[1\] \(hv\) must be a torch.Tensor"):
        validate_inputs(**inputs(), initial_state=(state()[0], None))
    with pytest.raises(TypeError, match=r"^initial_state\[0\] \(hk\) must be floating point"):
        validate_inputs(**inputs(), initial_state=(state()[0].long(), state()[1]))
    with pytest.raises(ValueError, match=r"^initial_state\[0\] \(hk\) is on meta"):
        validate_inputs(**inputs(), initial_state=(state()[0].to("meta"), state()[1]))


@pytest.mark.parametrize("cu, exc, message", [
    (torch.tensor([[0, 6]]), ValueError, r"^cu_seqlens must be 1-D"),
    (torch.tensor([0]), ValueError, r"^cu_seqlens must be 1-D with at least 2 entries"),
    (torch.tensor([0.0, 6.0]), TypeError, r"^cu_seqlens must have dtype int32 or int64"),
    ([0, 6], TypeError, r"^cu_seqlens must be a 1-D integer torch.Tensor"),
    (torch.tensor([1, 6]), ValueError, r"^cu_seqlens must start at 0 and end at T=6"),
    (torch.tensor([0, 3, 5]), ValueError, r"^cu_seqlens must start at 0 and end at T=6"),
    (torch.tensor([0, 3, 3, 6]), ValueError, r"^cu_seqlens must be strictly increasing"),
    (torch.tensor([0, 4, 2, 6]), ValueError, r"^cu_seqlens must be strictly increasing"),
    (torch.tensor([0, 6]).to("meta"), ValueError, r"^cu_seqlens is on meta")])
def test_cu_seqlens(cu, exc, message):
    with pytest.raises(exc, match=message):
        validate_inputs(**packed(cu))


def test_cu_seqlens_needs_batch_one():
    with pytest.raises(ValueError, match=r"with cu_seqlens the batch size must be 1"):
        validate_inputs(**inputs(), cu_seqlens=torch.tensor([0, 6]))


def test_initial_state_counts_sequences_with_cu_seqlens():
    with pytest.raises(ValueError, match=r"^initial_state\[0\] \(hk\) must have shape \[N, H, K, M\] = \(3,"):
        validate_inputs(**packed(torch.tensor([0, 1, 4, 6]), initial_state=state(n=1)))


@pytest.mark.parametrize("name, shape, message", [
    ("q", None, r"head dim K=1025 is not supported"), ("v", (B, T, H, 1025), r"head dim V=1025 is not supported"),
    ("s", (B, T, H, 257), r"^s has M=257 slots"), ("s", (B, T, H, 0), r"^s has M=0 slots")])
def test_unsupported_head_dims(name, shape, message):
    if name == "q":  # K is shared by q and k
        x = inputs(q=torch.randn(B, T, HQ, 1025), k=torch.randn(B, T, H, 1025), g=None)
    else:
        x = inputs(**{name: torch.randn(*shape)}, g=None)
    with pytest.raises(ValueError, match=message):
        validate_inputs(**x)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_scale(scale):
    with pytest.raises(ValueError, match=r"^scale must be a positive finite float"):
        validate_inputs(**inputs(), scale=scale)


@pytest.mark.parametrize("scale", ["0.5", True, torch.tensor(0.5), [0.5]])
def test_non_numeric_scale(scale):
    with pytest.raises(TypeError, match=r"^scale must be a float or None"):
        validate_inputs(**inputs(), scale=scale)


def test_integer_scale_is_accepted():
    assert validate_inputs(**inputs(), scale=2).scale == 2.0


@pytest.mark.parametrize("chunk_size", [0, 8, 48, 256, -64, True, 64.0, "64", None])
def test_chunk_size(chunk_size):
    with pytest.raises(ValueError, match=r"^chunk_size must be one of \(16, 32, 64, 128\)"):
        check_chunk_size(chunk_size)


@pytest.mark.parametrize("chunk_size", [16, 32, 64, 128])
def test_chunk_size_ok(chunk_size):
    assert check_chunk_size(chunk_size) == chunk_size


def test_entry_point_validates():
    with pytest.raises(ValueError, match=r"^v must have shape .* with H="):
        recurrent_gsa(**inputs(v=torch.randn(B, T, H + 1, V)))
    with pytest.raises(TypeError, match=r"^s has dtype torch.float16 but q has torch.float32"):
        recurrent_gsa(**inputs(s=torch.randn(B, T, H, M, dtype=torch.float16)))
    with pytest.raises(ValueError, match=r"^cu_seqlens must be strictly increasing"):
        recurrent_gsa(**packed(torch.tensor([0, 0, 6])))
