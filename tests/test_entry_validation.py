"""Every public entry point rejects bad arguments with an error naming the argument.

test_validation.py checks `validate_inputs` itself; here each entry point (chunk_gsa, recurrent_step,
torch.ops.gsa.chunk_forward / chunk_backward / recurrent_step / recurrent_step_, and the
GatedSlotAttention layer) gets the same bad arguments and must raise before any kernel runs: a wrong
device mix, integer dtypes, a negative scale, an unsupported chunk size, cu_seqlens on the wrong
device, of the wrong dtype or not increasing. Plus what only the ops see (their extra arguments), and
the opt-in value checks (GSA_CHECK_VALUES=1: positive or nan gates, non-finite inputs).
"""
import pytest
import torch

import gsa_compile.spec as spec_module
from gsa_compile import GatedSlotAttention, chunk_gsa, recurrent_step

B, T, HQ, H, K, V, M = 1, 6, 2, 1, 4, 3, 5


def good(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    return dict(q=r(B, T, HQ, K), k=r(B, T, H, K), v=r(B, T, H, V), s=torch.rand(B, T, H, M, generator=gen).to(dtype),
                g=-torch.rand(B, T, H, M, generator=gen).to(dtype), scale=0.5,
                hk=torch.zeros(B, H, K, M), hv=torch.zeros(B, H, M, V), cu_seqlens=None, chunk_size=16)


def call_chunk_gsa(a):
    state = (a["hk"], a["hv"])
    return chunk_gsa(a["q"], a["k"], a["v"], a["s"], a["g"], a["scale"], initial_state=state,
                     cu_seqlens=a["cu_seqlens"], chunk_size=a["chunk_size"])


def call_recurrent_step(a):
    return recurrent_step(a["q"], a["k"], a["v"], a["s"], a["g"], a["scale"], state=(a["hk"], a["hv"]))


def call_chunk_forward(a):
    return torch.ops.gsa.chunk_forward(a["q"], a["k"], a["v"], a["s"], a["g"], a["scale"], a["hk"], a["hv"],
                                       a["cu_seqlens"], a["chunk_size"], "slot")


def call_chunk_backward(a):
    do = torch.zeros(a["q"].shape[:3] + a["v"].shape[3:], dtype=a["q"].dtype, device=a["q"].device)
    return torch.ops.gsa.chunk_backward(do, None, None, a["q"], a["k"], a["v"], a["s"], a["g"], a["scale"], a["hk"],
                                        a["hv"], a["cu_seqlens"], a["chunk_size"], "slot")


def call_recurrent_step_op(a):
    return torch.ops.gsa.recurrent_step(a["q"], a["k"], a["v"], a["s"], a["g"], a["scale"], a["hk"], a["hv"], "slot")


def call_recurrent_step_inplace(a):
    return torch.ops.gsa.recurrent_step_(a["q"], a["k"], a["v"], a["s"], a["g"], a["scale"], a["hk"], a["hv"], "slot")


CHUNKED = {"chunk_gsa": call_chunk_gsa, "chunk_forward": call_chunk_forward, "chunk_backward": call_chunk_backward}
DECODE = {"recurrent_step": call_recurrent_step, "op_recurrent_step": call_recurrent_step_op,
          "op_recurrent_step_": call_recurrent_step_inplace}
ENTRY_POINTS = {**CHUNKED, **DECODE}


def packed(cu):
    """B = 1 arguments with sequences packed by `cu` (a list or a tensor)."""
    a = good()
    cu = torch.tensor(cu) if isinstance(cu, list) else cu
    n = cu.numel() - 1 if cu.dim() == 1 else 1
    a.update(cu_seqlens=cu, hk=torch.zeros(max(n, 1), H, K, M), hv=torch.zeros(max(n, 1), H, M, V))
    return a


BAD_ARGUMENTS = {  # name: (change to good(), exception, message)
    "device_mix_k": (lambda a: a.update(k=a["k"].to("meta")), ValueError, r"^k is on meta but q is on cpu"),
    "device_mix_g": (lambda a: a.update(g=a["g"].to("meta")), ValueError, r"^g is on meta but q is on cpu"),
    "device_mix_state": (lambda a: a.update(hv=a["hv"].to("meta")), ValueError, r"hv\)? is on meta but q is on cpu"),
    "integer_q": (lambda a: a.update(q=a["q"].to(torch.int32)), TypeError, r"^q must be a floating-point tensor"),
    "integer_s": (lambda a: a.update(s=a["s"].to(torch.int64)), TypeError, r"^s must be a floating-point tensor"),
    "negative_scale": (lambda a: a.update(scale=-0.5), ValueError, r"^scale must be a positive finite float"),
    "nan_scale": (lambda a: a.update(scale=float("nan")), ValueError, r"^scale must be a positive finite float"),
    "wrong_dtype_mix": (lambda a: a.update(v=a["v"].half()), TypeError, r"^v has dtype torch.float16 but q has"),
    "state_shape": (lambda a: a.update(hk=torch.zeros(B, H, K + 1, M)), ValueError, r"hk\)? must have shape"),
}
BAD_CHUNKED = {
    "chunk_size_48": (lambda a: a.update(chunk_size=48), ValueError, r"^chunk_size must be one of"),
    "chunk_size_256": (lambda a: a.update(chunk_size=256), ValueError, r"^chunk_size must be one of"),
    "cu_seqlens_device": (lambda a: a.update(packed([0, 2, 6]), cu_seqlens=torch.tensor([0, 2, 6]).to("meta")),
                          ValueError, r"^cu_seqlens is on meta but q is on cpu"),
    "cu_seqlens_dtype": (lambda a: a.update(packed([0, 2, 6]), cu_seqlens=torch.tensor([0.0, 2.0, 6.0])),
                         TypeError, r"^cu_seqlens must have dtype int32 or int64"),
    "cu_seqlens_decreasing": (lambda a: a.update(packed([0, 4, 2, 6])), ValueError,
                              r"^cu_seqlens must be strictly increasing"),
    "cu_seqlens_repeated": (lambda a: a.update(packed([0, 3, 3, 6])), ValueError,
                            r"^cu_seqlens must be strictly increasing"),
    "cu_seqlens_end": (lambda a: a.update(packed([0, 2, 5])), ValueError,
                       r"^cu_seqlens must start at 0 and end at T=6"),
}


@pytest.mark.parametrize("bad", list(BAD_ARGUMENTS))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_bad_argument(entry, bad):
    change, exc, message = BAD_ARGUMENTS[bad]
    a = good()
    change(a)
    with pytest.raises(exc, match=message):
        ENTRY_POINTS[entry](a)


@pytest.mark.parametrize("bad", list(BAD_CHUNKED))
@pytest.mark.parametrize("entry", list(CHUNKED))
def test_bad_chunked_argument(entry, bad):
    change, exc, message = BAD_CHUNKED[bad]
    a = good()
    change(a)
    with pytest.raises(exc, match=message):
        CHUNKED[entry](a)


def test_cu_seqlens_changed_in_place_is_checked_again():
    """Values are read once per tensor: an in-place change (a new version) is read again."""
    a = packed([0, 2, 6])
    call_chunk_forward(a)
    a["cu_seqlens"][1] = 7
    with pytest.raises(ValueError, match=r"^cu_seqlens must be strictly increasing"):
        call_chunk_forward(a)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_float64_refused_on_the_gpu_path(entry, monkeypatch):
    """float64 runs only under the interpreter (gradcheck); the GPU path refuses it before any launch."""
    import gsa_compile.ops
    monkeypatch.setattr(gsa_compile.ops, "INTERPRETER", False)
    a = good(torch.float64)
    with pytest.raises(TypeError, match=r"float64"):
        ENTRY_POINTS[entry](a)


OP_ONLY = {  # arguments only the ops take
    "abc_layout": (lambda: torch.ops.gsa.chunk_forward(*_op_args(), 16, "abc"), ValueError, r"gate_layout='abc'"),
    "unknown_layout": (lambda: torch.ops.gsa.chunk_forward(*_op_args(), 16, "diagonal"), ValueError,
                       r"^gate_layout must be one of"),
    "layout_mismatch": (lambda: torch.ops.gsa.chunk_forward(*_op_args(), 16, "head"), ValueError,
                        r"^gate_layout='head' does not match g"),
    "one_state": (lambda: torch.ops.gsa.chunk_forward(*_op_args(hv=None), 16, "slot"), ValueError,
                  r"^hk0/hv0: give both"),
    "unknown_mods": (lambda: torch.ops.gsa.chunk_forward(*_op_args(), 16, "slot", "m0123"), ValueError,
                     r"^mods='m0123'"),
    "stray_mod_params": (lambda: torch.ops.gsa.chunk_forward(*_op_args(), 16, "slot", "", torch.zeros(2)), ValueError,
                         r"^mod_params must be None"),
    "do_shape": (lambda: _backward(do_shape=(B, T, HQ, V + 1)), ValueError, r"^do must have shape"),
    "do_dtype": (lambda: _backward(do_dtype=torch.float16), TypeError, r"^do has dtype torch.float16 but q has"),
    "dhk_final_shape": (lambda: _backward(dhk=torch.zeros(B, H, K, M + 1)), ValueError, r"^dhk_final must have shape"),
    "inplace_state_dtype": (lambda: call_recurrent_step_inplace({**good(), "hk": torch.zeros(B, H, K, M).double()}),
                            ValueError, r"^hk must be a float32 contiguous state"),
    "inplace_state_strides": (lambda: call_recurrent_step_inplace({**good(), "hv": torch.zeros(B, H, V, M).mT}),
                              ValueError, r"^hv must be a float32 contiguous state"),
}


def _op_args(hv=0):
    a = good()
    return a["q"], a["k"], a["v"], a["s"], a["g"], a["scale"], a["hk"], a["hv"] if hv is not None else None, None


def _backward(do_shape=(B, T, HQ, V), do_dtype=torch.float32, dhk=None):
    a = good()
    return torch.ops.gsa.chunk_backward(torch.zeros(do_shape, dtype=do_dtype), dhk, None, a["q"], a["k"], a["v"],
                                        a["s"], a["g"], a["scale"], None, None, None, 16, "slot")


@pytest.mark.parametrize("bad", list(OP_ONLY))
def test_op_only_arguments(bad):
    run, exc, message = OP_ONLY[bad]
    with pytest.raises(exc, match=message):
        run()


def test_functional_decode_op_returns_contiguous_float32_states():
    """recurrent_step (functional) accepts any float states and returns new float32 contiguous ones."""
    a = good()
    hk, hv = torch.randn(B, H, M, K).mT, torch.randn(B, H, M, V).double()  # strided, float64
    o, hk1, hv1 = torch.ops.gsa.recurrent_step(a["q"], a["k"], a["v"], a["s"], a["g"], 0.5, hk, hv, "slot")
    _, (hk2, hv2) = recurrent_step(a["q"], a["k"], a["v"], a["s"], a["g"], 0.5,
                                   state=(hk.contiguous(), hv.float()), inplace=False)
    assert hk1.is_contiguous() and hk1.dtype == hv1.dtype == torch.float32
    torch.testing.assert_close(hk1, hk2)
    torch.testing.assert_close(hv1, hv2)


LAYER_BAD = {
    "rank": (lambda x: x[0], ValueError, r"^hidden_states must have shape \[batch, seq_len, hidden_size=8\]"),
    "width": (lambda x: x[..., :4], ValueError, r"^hidden_states must have shape"),
    "integer": (lambda x: x.long(), TypeError, r"^hidden_states must be floating point"),
    "device": (lambda x: x.to("meta"), ValueError, r"^hidden_states is on meta but the layer's parameters are on cpu"),
    "not_a_tensor": (lambda x: x.tolist(), TypeError, r"^hidden_states must be a torch.Tensor"),
}


@pytest.mark.parametrize("bad", list(LAYER_BAD))
def test_layer_rejects_bad_hidden_states(bad):
    layer = GatedSlotAttention(hidden_size=8, num_heads=2, num_slots=4, chunk_size=16)
    change, exc, message = LAYER_BAD[bad]
    with pytest.raises(exc, match=message):
        layer(change(torch.randn(1, 5, 8)))


@pytest.mark.parametrize("cu, exc, message", [
    (torch.tensor([0, 3, 2, 5]), ValueError, r"^cu_seqlens must be strictly increasing"),
    (torch.tensor([0.0, 5.0]), TypeError, r"^cu_seqlens must have dtype"),
    (torch.tensor([0, 5]).to("meta"), ValueError, r"^cu_seqlens is on meta")])
def test_layer_rejects_bad_cu_seqlens(cu, exc, message):
    layer = GatedSlotAttention(hidden_size=8, num_heads=2, num_slots=4, chunk_size=16)
    with pytest.raises(exc, match=message):
        layer(torch.randn(1, 5, 8), cu_seqlens=cu)


def test_layer_rejects_an_unknown_fuse_mods():
    with pytest.raises(ValueError, match=r"^fuse_mods must be False / 'none', 'gate' or True / 'all', got 'maps'"):
        GatedSlotAttention(hidden_size=8, num_heads=2, num_slots=4, fuse_mods="maps")


def test_layer_rejects_a_foreign_cache():
    layer = GatedSlotAttention(hidden_size=8, num_heads=2, num_slots=4, chunk_size=16)
    with pytest.raises(TypeError, match=r"^cache must be a GSACache or None"):
        layer(torch.randn(1, 5, 8), cache=(torch.zeros(1), torch.zeros(1)))


# ------------------------------------------------------------------------- opt-in value checks

VALUE_BAD = {
    "positive_gate": (lambda a: a["g"].__setitem__((0, 2, 0, 1), 0.1), r"^g must be <= 0 .* max\(g\) = 0.1"),
    "nan_gate": (lambda a: a["g"].__setitem__((0, 2, 0, 1), float("nan")), r"^g has nan entries"),
    "inf_query": (lambda a: a["q"].__setitem__((0, 1, 1, 0), float("inf")), r"^q has non-finite entries"),
    "nan_state": (lambda a: a["hv"].__setitem__((0, 0, 1, 1), float("nan")), r"hv\)? has non-finite entries"),
}


@pytest.mark.parametrize("bad", list(VALUE_BAD))
@pytest.mark.parametrize("entry", ["chunk_gsa", "chunk_forward", "recurrent_step", "op_recurrent_step_"])
def test_value_checks_reject_ill_posed_inputs(entry, bad, monkeypatch):
    """With GSA_CHECK_VALUES=1 (spec.CHECK_VALUES) a positive or nan gate and non-finite inputs are a
    ValueError, not a silently wrong or nan result; -inf gates (full resets) pass."""
    monkeypatch.setattr(spec_module, "CHECK_VALUES", True)
    change, message = VALUE_BAD[bad]
    a = good()
    change(a)
    with pytest.raises(ValueError, match=message):
        ENTRY_POINTS[entry](a)
    a = good()
    a["g"][0, 3] = float("-inf")
    ENTRY_POINTS[entry](a)


def test_value_checks_are_off_by_default():
    assert spec_module.CHECK_VALUES is False  # GSA_CHECK_VALUES unset: no host synchronisation
    a = good()
    a["g"][0, 2, 0, 1] = 0.1
    call_chunk_forward(a)  # outside the contract (g <= 0) but not read: no error


def test_grids_fit_cuda_limits():
    """Many sequences or batch rows x heads: CUDA's grid dimensions 1 and 2 stop at 65535, so only
    dimension 0 (up to 2^31 - 1) may grow with the problem (host side: the grids, no kernel runs)."""
    from gsa_compile import launch
    from gsa_compile.spec import GateLayout
    for n, dense in ((100_000, False), (40_000, True)):
        B, T = (n, 3) if dense else (1, n)
        q, k, v, s = (torch.zeros(B, T, heads, dim) for heads, dim in ((2, K), (1, K), (1, V), (1, M)))
        cu = None if dense else torch.arange(n + 1, dtype=torch.int32)
        call = launch.Call(q, k, v, s, None, cu, 16, GateLayout.SLOT, None, lambda kernel: kernel)
        for grid in (call.tile_grid(), call.chunk_grid(2, None)[0], call.chunk_grid(1, None)[0]):
            assert grid[0] < 2 ** 31 and all(d <= 65535 for d in grid[1:]), grid
