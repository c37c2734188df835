"""Hardening: numerics at the edges, many short sequences without host reads, strided inputs without
copies, determinism (CPU, Triton interpreter), and CUDA graphs (GPU only).

    test_edge_gates           g = 0 over many chunks, -1e4, -inf (state reset) and mixes, every gate layout
    test_large_logits         slot logits far past a naive softmax's range; ABC logits of +-1e4
    test_zero_slot_weights    s = 0 rows, and a whole sequence with s = 0
    test_fp16_large_values    fp16 inputs whose products pass 65504 (tf32 products for fp32 intermediates)
    test_fp16_decay_gradient_past_range_is_inf  a decay's fp16 gradient past 65504: the rounded infinity
    test_decode_edge_gates    recurrent_step with -inf gates equals the chunked forward
    test_many_short_sequences 40 packed sequences of 1-17 tokens against the reference
    test_packed_batch_stays_in_bounds  every load/store of a packed batch's kernels inside its tensors
    test_no_host_reads        the host path of forward, backward and decode reads no tensor value
    test_strided_*            every memory layout gives the contiguous result bit for bit, and the
                              kernels read the caller's memory (no copy) wherever strides can be passed
    test_deterministic        two runs, bitwise equal outputs and gradients
    test_cuda_graph_*         capture and replay (GPU; bench/gpu_hardening.py records the H200 run)

T = 1 and T not a multiple of the chunk size are covered for every chunk size and layout by
test_forward.test_boundaries, test_backward's regimes and test_fuzz; the GPU sizes (T = 2^20,
> 2^31 elements, 10,000 sequences) run in bench/gpu_hardening.py.
"""
import contextlib
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

import differential
from bounds import bounds_checked
from races import races_checked
from gsa_compile import chunk_gsa, codegen, programs, recurrent_step
from gsa_compile.spec import GATE_FLOOR
from test_backward import make_inputs

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import gpu_hardening  # noqa: E402  (the GPU checks; needs no GPU to import)

FP32_CASE = dict(chunk_size=16, memory="contiguous", cu_seqlens=None, upstream="both", dtype="float32", seed=0)


def inputs(layout, B, T, HQ, H, K, V, M, N, initial_state, seed):
    """test_backward.make_inputs, detached: (q, k, v, s, g or None, hk0 or None, hv0 or None)."""
    return tuple(None if x is None else x.detach()
                 for x in make_inputs(layout, B, T, HQ, H, K, V, M, N, initial_state, seed=seed))


def compare_inputs(q, k, v, s, g, hk0=None, hv0=None, **case):
    """differential.compare on given tensors (made leaves), in the contiguous layout."""
    tensors = dict(q=q, k=k, v=v, s=s, g=g, hk0=hk0, hv0=hv0)
    leaves = {n: x.detach().clone().requires_grad_() for n, x in tensors.items() if x is not None}
    case = {**FP32_CASE, **case}
    errors = differential.compare(case, leaves, {n: (lambda x: x) for n in leaves})
    return case, errors


def assert_within_tolerance(case, errors, what):
    bad = differential.failures(case, errors)
    assert not bad, f"{what}: {bad} above {differential.TOLERANCE[case['dtype']]} (all: {errors})"


# ----------------------------------------------------------------------------------- edge gates

def edge_gate(layout, edge, B, T, H, M, gen):
    """g for one edge: 'zero' (no forgetting), 'minus_1e4', 'minus_inf' (reset at every token) or 'mixed'
    (-inf, -1e4, 0 and ordinary gates at random places; constant decays mix them across heads/slots)."""
    shape = {"slot": (B, T, H, M), "head": (B, T, H), "decay_head": (H,), "decay_slot": (H, M)}[layout]
    if edge != "mixed":
        return torch.full(shape, {"zero": 0.0, "minus_1e4": -1e4, "minus_inf": float("-inf")}[edge])
    g = F.logsigmoid(torch.randn(shape, generator=gen))
    pick = torch.randint(0, 6, shape, generator=gen)
    g = torch.where(pick == 0, float("-inf"), torch.where(pick == 1, -1e4, torch.where(pick == 2, 0.0, g)))
    if layout.startswith("decay"):  # both extremes present whatever the draw
        g.view(-1)[0], g.view(-1)[-1] = float("-inf"), 0.0
    return g


@pytest.mark.parametrize("edge", ["zero", "minus_1e4", "minus_inf", "mixed"])
@pytest.mark.parametrize("layout", ["slot", "head", "decay_head", "decay_slot"])
def test_edge_gates(layout, edge):
    """Outputs, final states and every gradient stay finite and within the float32 tolerances of the
    float64 reference. -inf resets the state (the kernels floor g at GATE_FLOOR: no -inf - -inf); g = 0
    runs four chunks without forgetting; an initial state makes the first reset visible."""
    B, T, HQ, H, K, V, M = 1, 61, 2, 2, 5, 4, 3
    gen = torch.Generator().manual_seed(1)
    q, k, v, s, _, hk0, hv0 = inputs("slot", B, T, HQ, H, K, V, M, B, True, seed=2)
    g = edge_gate(layout, edge, B, T, H, M, gen)
    case, errors = compare_inputs(q, k, v, s, g, hk0, hv0)
    assert errors["finite"], f"{layout} {edge}: non-finite output or gradient"
    assert_within_tolerance(case, errors, f"{layout} gates {edge}")


def test_gate_floor_changes_nothing_measurable():
    """A gate exactly at the floor and one far below it give the same result within float32 round-off:
    exp(GATE_FLOOR) is far below float32 resolution relative to fresh writes."""
    q, k, v, s, g, hk0, hv0 = inputs("slot", 1, 40, 2, 1, 5, 4, 3, 1, True, seed=3)
    g[:, 7], g2 = GATE_FLOOR, g.clone()
    g2[:, 7] = -1e30
    o1, (hk1, _) = chunk_gsa(q, k, v, s, g, initial_state=(hk0, hv0), output_final_state=True, chunk_size=16)
    o2, (hk2, _) = chunk_gsa(q, k, v, s, g2, initial_state=(hk0, hv0), output_final_state=True, chunk_size=16)
    assert torch.equal(o1, o2) and torch.equal(hk1, hk2)


def test_large_logits():
    """Slot logits of order 1e3 (a naive exp overflows past ~88) and ABC slot logits of +-1e4: the
    softmax over slots and the ABC normaliser are shifted; results and gradients match the reference."""
    q, k, v, s, g, hk0, hv0 = inputs("slot", 1, 37, 2, 1, 6, 5, 4, 1, True, seed=4)
    case, errors = compare_inputs(q * 30.0, k, v, s, g, hk0, hv0)
    assert_within_tolerance(case, errors, "q x 30 (logits ~1e3)")
    q, k, v, s, _, _, _ = inputs("abc", 1, 37, 2, 1, 6, 5, 4, 1, False, seed=5)
    s[:, 3], s[:, 20, :, 1], s[:, 21] = 1e4, -1e4, 5e3
    case, errors = compare_inputs(q, k, v, s, None)
    assert_within_tolerance(case, errors, "ABC logits +-1e4")


def test_zero_slot_weights():
    """s = 0 rows write nothing (and a whole packed sequence of them leaves its initial state decayed
    only): finite, and equal to the reference."""
    q, k, v, s, g, hk0, hv0 = inputs("slot", 1, 40, 2, 1, 5, 4, 3, 3, True, seed=6)
    s[:, 2:9] = 0
    s[:, 20:31] = 0  # the whole second sequence
    case, errors = compare_inputs(q, k, v, s, g, hk0, hv0, cu_seqlens=[0, 20, 31, 40])
    assert errors["finite"]
    assert_within_tolerance(case, errors, "s = 0 rows")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fp16_large_values():
    """fp16 q, k of magnitude ~100 with a scale that keeps the logits O(1): a well-posed problem."""
    q, k, v, s, g, _, _ = inputs("slot", 1, 40, 1, 1, 16, 16, 4, 1, False, seed=7)
    q, k = (x.abs() * 100 for x in (q, k))
    case, errors = compare_inputs(*(x.half() for x in (q, k, v * 100, s, g)), dtype="float16", chunk_size=32,
                                  scale=1e-4)
    assert errors["finite"], "non-finite output or gradient"
    assert_within_tolerance(case, errors, "fp16, |q|, |k| ~ 100")


def test_fp16_moderate_values():
    """The same with |q|, |k| ~ 10 (products ~1e3): within the fp16 tolerances."""
    q, k, v, s, g, _, _ = inputs("slot", 1, 40, 1, 1, 16, 16, 4, 1, False, seed=7)
    q, k = (x.abs() * 10 for x in (q, k))
    case, errors = compare_inputs(*(x.half() for x in (q, k, v * 10, s, g)), dtype="float16", chunk_size=32,
                                  scale=0.01)
    assert_within_tolerance(case, errors, "fp16, |q|, |k| ~ 10")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fp16_decay_gradient_past_range_is_inf():
    """An fp16 decay's gradient sums over every token: where its float64 value passes 65504 the kernels
    return the correctly rounded -+inf (the fuzz found one at |q|, |k| ~ 300), finite values elsewhere;
    the harness accepts exactly that infinity and nothing else."""
    q, k, v, s, _, _, _ = inputs("decay_slot", 1, 32, 1, 1, 8, 8, 4, 1, False, seed=12)
    g = torch.tensor([[-3.0, -1e-3, -0.5, -1e-3]])  # slots 1 and 3 keep almost everything: large sums
    case, errors = compare_inputs(*(x.half() for x in (q, k, v * 1000, s, g)), dtype="float16", chunk_size=16,
                                  layout="decay_slot")
    assert errors["finite"] and not differential.failures(case, errors), errors
    leaf = g.half().requires_grad_()
    o, _ = chunk_gsa(q.half(), k.half(), (v * 1000).half(), s.half(), leaf, chunk_size=16)
    (o.float() * torch.randn(o.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    assert torch.isinf(leaf.grad).any() and torch.isfinite(leaf.grad).any(), leaf.grad  # both kinds here
    reference = torch.tensor([[1.0, -float("inf"), 70000.0]])
    assert differential.without_true_overflow(torch.tensor([[1.0, -float("inf"), float("inf")]]).half(), reference)[2]
    assert not differential.without_true_overflow(torch.tensor([[1.0, float("inf"), float("inf")]]).half(),
                                                  reference)[2]  # the wrong sign
    a, _, _ = differential.without_true_overflow(torch.tensor([[float("inf"), 1.0]]).half(), torch.ones(1, 2))
    assert not torch.isfinite(a).all()  # a finite reference masks nothing: compare's isfinite check fails it


def test_decode_edge_gates():
    """recurrent_step (decode kernel, exp of the gate itself) with -inf and 0 gates equals the chunked
    forward after a prefill."""
    B, T, HQ, H, K, V, M = 1, 12, 2, 1, 5, 4, 3
    q, k, v, s, _, _, _ = inputs("slot", B, T, HQ, H, K, V, M, B, False, seed=8)
    g = edge_gate("slot", "mixed", B, T, H, M, torch.Generator().manual_seed(9))
    full, _ = chunk_gsa(q, k, v, s, g, chunk_size=16)
    o, state = chunk_gsa(q[:, :8], k[:, :8], v[:, :8], s[:, :8], g[:, :8], output_final_state=True, chunk_size=16)
    steps = [recurrent_step(*(x[:, t:t + 1] for x in (q, k, v, s, g)), state=state, inplace=True)[0]
             for t in range(8, T)]
    decoded = torch.cat([o] + steps, 1)
    assert torch.isfinite(decoded).all()
    assert differential.rel_err(decoded, full) <= 1e-5


# ----------------------------------------------------------------------------------- many short sequences

def short_sequences(n, seed, longest=17):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (n,), generator=gen)
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).tolist()


def test_many_short_sequences():
    """40 packed sequences of 1-17 tokens with initial states (the interpreter runs ~0.2 s of programs per
    sequence; test_no_host_reads packs 400 and the GPU run 10,000): forward and gradients against the reference."""
    cu = short_sequences(40, seed=10)
    T, N = cu[-1], len(cu) - 1
    q, k, v, s, g, hk0, hv0 = inputs("slot", 1, T, 1, 1, 4, 3, 2, N, True, seed=11)
    case, errors = compare_inputs(q, k, v, s, g, hk0, hv0, cu_seqlens=cu)
    assert_within_tolerance(case, errors, "40 short sequences")


@pytest.mark.parametrize("layout", ["slot", "abc"])
def test_packed_batch_stays_in_bounds(layout):
    """A packed batch has more programs than chunks (the grid's upper bound is fixed without reading
    cu_seqlens); the spare ones must not address memory: here every load and store of forward and
    backward is checked against its launch's tensors (the 10,000-sequence GPU run faulted on one)."""
    cu = short_sequences(12, seed=16)
    T, N = cu[-1], len(cu) - 1
    q, k, v, s, g, hk0, hv0 = make_inputs(layout, 1, T, 2, 1, 4, 3, 2, N, True, seed=17)
    with bounds_checked() as faults:
        o, (hk, hv) = chunk_gsa(q, k, v, s, g, initial_state=(hk0, hv0), output_final_state=True,
                                cu_seqlens=torch.tensor(cu, dtype=torch.int32), chunk_size=16)
        (o.sum() + hk.sum() + hv.sum()).backward()
    assert not faults, faults[:5]


def test_programs_share_no_memory_within_a_launch():
    """The interpreter runs a launch's programs one after another, a GPU concurrently: no program may load
    or store what another program of the same launch stores (GQA, a packed batch, states, forward and
    backward). The checker itself flags a kernel whose programs all store one row."""
    import triton
    import triton.language as tl

    @triton.jit
    def racy(x):
        tl.store(x + tl.arange(0, 4), tl.zeros([4], tl.float32) + tl.program_id(0))

    with races_checked() as races:
        racy[(2,)](torch.zeros(4))
    assert len(races) == 1 and "two programs store" in races[0]
    cu = [0, 5, 21, 40]
    q, k, v, s, g, hk0, hv0 = make_inputs("slot", 1, 40, 4, 2, 8, 8, 4, 3, True, seed=18)  # GQA group 2
    with races_checked() as races:
        o, (hk, hv) = chunk_gsa(q, k, v, s, g, initial_state=(hk0, hv0), output_final_state=True,
                                cu_seqlens=torch.tensor(cu, dtype=torch.int32), chunk_size=16)
        (o.sum() + hk.sum() + hv.sum()).backward()
    assert not races, races[:5]


class _Recorder:
    """Stands in for a compiled kernel: records each launch's tensor arguments, runs the real kernel or not."""

    def __init__(self, real, launches):
        self.real, self.launches = real, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append([a for a in args if isinstance(a, torch.Tensor)])
            if self.real is not None:
                self.real[grid](*args, **kwargs)
        return launch


@contextlib.contextmanager
def recorded_launches(monkeypatch, run_kernels=True):
    """Every kernel launch's tensor arguments (list of lists); with run_kernels=False nothing runs."""
    launches, real_kernel = [], codegen.kernel
    monkeypatch.setattr(codegen, "kernel", lambda builder, spec: _Recorder(
        real_kernel(builder, spec) if run_kernels else None, launches))
    yield launches
    monkeypatch.setattr(codegen, "kernel", real_kernel)


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@contextlib.contextmanager
def forbid_host_reads(monkeypatch):
    """Any read of a tensor's values by the host (a device synchronisation on a GPU) raises."""
    def forbidden(name):
        def read(*args, **kwargs):
            raise AssertionError(f"host read of a tensor: Tensor.{name}")
        return read
    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, forbidden(name))
        patch.setattr(torch, "nonzero", forbidden("nonzero"))
        yield


@pytest.mark.parametrize("layout", ["slot", "abc"])
def test_no_host_reads(layout, monkeypatch):
    """The host side of forward and backward over 400 packed sequences (and of a decode step) reads no
    tensor value once cu_seqlens was validated: no synchronisation per call. (The interpreter itself
    reads tensors, so the kernels are recorded instead of run; the GPU run uses set_sync_debug_mode.)"""
    cu_list = short_sequences(400, seed=12)
    T, N = cu_list[-1], len(cu_list) - 1
    q, k, v, s, g, hk0, hv0 = make_inputs(layout, 1, T, 2, 1, 4, 3, 2, N, True, seed=13)
    cu = torch.tensor(cu_list, dtype=torch.int32)
    with recorded_launches(monkeypatch, run_kernels=False) as launches:
        chunk_gsa(q, k, v, s, g, initial_state=(hk0, hv0), cu_seqlens=cu, chunk_size=16)  # validates cu once
        with forbid_host_reads(monkeypatch):
            with pytest.raises(AssertionError, match="host read"):
                bool(cu[0] > 0)  # the guard is on
            o, (hk, hv) = chunk_gsa(q, k, v, s, g, initial_state=(hk0, hv0), output_final_state=True, cu_seqlens=cu,
                                    chunk_size=None)
            (o.sum() + hk.sum() + hv.sum()).backward()
            if layout == "slot":
                state = (hk.detach().contiguous(), hv.detach().contiguous())
                recurrent_step(*(x.detach()[:, :1].expand(N, 1, *x.shape[2:]) for x in (q, k, v, s, g)),
                               state=state, inplace=True)
    assert len(launches) >= 2 * 2 + 3 + (1 if layout == "slot" else 0)


# ----------------------------------------------------------------------------------- strides

STRIDED = [m for m in differential.MEMORY if m != "contiguous"]
STRIDED_CASE = dict(chunk_size=16, layout="slot", dtype="float32", B=2, T=21, H=2, group=2, K=5, V=4, M=3,
                    cu_seqlens=None, initial_state=True, upstream="both", seed=14)


def _outputs_and_grads(args, head_first=False):
    """chunk_gsa on `args` (as laid out in memory): ([o, hk, hv], gradients w.r.t. the [B, T, H, D] views)."""
    o, (hk, hv) = chunk_gsa(args["q"], args["k"], args["v"], args["s"], args.get("g"), head_first=head_first,
                            initial_state=(args["hk0"], args["hv0"]), output_final_state=True, chunk_size=16)
    o = o.transpose(1, 2) if head_first else o
    gen = torch.Generator().manual_seed(15)
    loss = sum((x * torch.randn(x.shape, generator=gen)).sum() for x in (o, hk, hv))
    grads = torch.autograd.grad(loss, list(args.values()))
    return [o, hk, hv], dict(zip(args, grads))


@pytest.mark.parametrize("memory", STRIDED)
def test_strided_inputs_match_contiguous(memory, monkeypatch):
    """Each memory layout gives the contiguous layout's outputs and gradients bit for bit, and every
    input whose last dimension has unit stride reaches the forward and backward kernels uncopied."""
    leaves, views = differential.make_leaves({**STRIDED_CASE, "memory": memory}, "cpu")
    head_first = memory == "head_first"
    args = leaves if head_first else {n: views[n](leaves[n]) for n in leaves}
    with recorded_launches(monkeypatch) as launches:
        outputs, grads = _outputs_and_grads(args, head_first)
    if head_first:  # gradients of the [B, H, T, D] tensors, seen as [B, T, H, D]
        grads = {n: views[n](x) for n, x in grads.items()}
    same_values = {n: views[n](leaves[n]).detach().contiguous().requires_grad_() for n in leaves}
    outputs2, grads2 = _outputs_and_grads(same_values)
    assert all(torch.equal(a, b) for a, b in zip(outputs, outputs2))
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), f"d{name}"
    pointers = [{x.data_ptr() for x in launch} for launch in launches]
    n_forward = len(programs.FORWARD_PROGRAMS)  # the forward's launches come first, then the backward's
    forward, backward = set().union(*pointers[:n_forward]), set().union(*pointers[n_forward:])
    copied = memory == "strided_last"  # a last-dimension stride of 2: copied to unit stride
    for name in ("q", "k", "v", "s", "g"):
        assert (args[name].data_ptr() in forward) != copied, f"{name} ({memory}) in the forward launches"
        if name != "g":  # (the backward takes the forward's gate pass, launch.ForwardRecord: no kernel of it reads g)
            assert (args[name].data_ptr() in backward) != copied, f"{name} ({memory}) in the backward launches"
    assert args["g"].data_ptr() not in backward


@pytest.mark.parametrize("layout", ["head", "decay_head"])
def test_strided_per_head_gates_are_not_copied(layout, monkeypatch):
    """Per-head gates use only their head/time strides: a transposed or strided one reaches the kernels as is."""
    q, k, v, s, g, _, _ = inputs(layout, 2, 19, 2, 2, 5, 4, 3, 2, False, seed=16)
    strided = g.transpose(-1, 0).contiguous().transpose(-1, 0) if layout == "head" else torch.stack([g, g], -1)[..., 0]
    assert strided.stride(-1) != 1 and torch.equal(strided, g)
    with recorded_launches(monkeypatch) as launches:
        o = chunk_gsa(q, k, v, s, strided, chunk_size=16)[0]
    assert strided.data_ptr() in {x.data_ptr() for x in launches[0]}
    assert torch.equal(o, chunk_gsa(q, k, v, s, g, chunk_size=16)[0])


# ----------------------------------------------------------------------------------- determinism

# Determinism (bitwise equal repeats, no atomics) is a GPU question: the interpreter runs programs one after
# another. test_cuda_graphs_and_no_sync[determinism] (bench/gpu_hardening.py) checks it on the GPU.


# ----------------------------------------------------------------------------------- CUDA graphs (GPU)

@pytest.mark.gpu
@pytest.mark.parametrize("check", ["graph_forward", "graph_backward", "graph_decode", "many_sequences",
                                   "determinism"])
def test_cuda_graphs_and_no_sync(check):
    """Capture + replay of chunk_forward, the backward and recurrent_step_ (new inputs copied into the
    static buffers give the eager answer), varlen without a synchronisation, bitwise determinism."""
    result = getattr(gpu_hardening, check)(small=True)
    assert result["ok"], result
