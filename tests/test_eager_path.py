"""Eager calls skip the dispatcher (ops.EagerChunkForward, launch_decode.decode_ directly): the same kernels, so
the same bits as the torch.library ops, and every traced or transformed call still takes the ops."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from gsa_compile import chunk_gsa, ops, recurrent_step


def inputs(seed, B=2, T=37, HQ=4, H=2, K=24, V=20, M=8, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    xs = [r(B, T, HQ, K), r(B, T, H, K), r(B, T, H, V), torch.rand(B, T, H, M, generator=gen),
          F.logsigmoid(r(B, T, H, M)), r(B, H, K, M), r(B, H, M, V)]
    return [x.requires_grad_(requires_grad) for x in xs]


def run(xs, eager, monkeypatch, **kwargs):
    """o, final states and every input's gradient through one path (eager=False: the op)."""
    monkeypatch.setattr(ops, "EAGER_FAST_PATH", eager)
    q, k, v, s, g, hk0, hv0 = xs
    o, (hk, hv) = chunk_gsa(q, k, v, s, g, initial_state=(hk0, hv0), output_final_state=True, chunk_size=16, **kwargs)
    node = type(o.grad_fn).__name__
    gen = torch.Generator().manual_seed(7)
    loss = sum((x * torch.randn(x.shape, generator=gen)).sum() for x in (o, hk, hv))
    grads = torch.autograd.grad(loss, xs)
    return node, [o.detach(), hk.detach(), hv.detach(), *grads]


@pytest.mark.parametrize("varlen", [False, True])
def test_eager_path_is_bitwise_the_op(monkeypatch, varlen):
    seed = torch.seed() % 2**31  # fresh inputs each run
    xs = inputs(seed, B=1 if varlen else 2)
    kwargs = dict(cu_seqlens=torch.tensor([0, 11, 37])) if varlen else {}
    if varlen:  # one state per sequence
        xs[5], xs[6] = (torch.randn(2, *x.shape[1:]).requires_grad_() for x in xs[5:])
    eager_node, eager = run(xs, True, monkeypatch, **kwargs)
    op_node, op = run(xs, False, monkeypatch, **kwargs)
    assert eager_node == "EagerChunkForwardBackward" and eager_node != op_node
    for name, a, b in zip("o hk hv dq dk dv ds dg dhk0 dhv0".split(), eager, op):
        assert torch.equal(a, b), f"{name} differs between the eager path and the op (seed {seed})"


def test_traced_calls_take_the_op():
    with FakeTensorMode():
        q, k, v, s, g, _, _ = inputs(0, requires_grad=False)
        assert not ops.eager_ok(q)  # a fake tensor, under a dispatch mode
        o, _ = chunk_gsa(q, k, v, s, g, chunk_size=16)  # the op's fake kernel: shapes only
        assert o.shape == q.shape[:3] + v.shape[3:]
    q = inputs(0)[0]
    assert ops.eager_ok(q, None)
    assert not torch.compile(lambda x: ops.eager_ok(x), fullgraph=True, backend="eager")(q)


@pytest.mark.parametrize("inplace", [False, True])
def test_eager_decode_is_bitwise_the_op(monkeypatch, inplace):
    q, k, v, s, g, hk, hv = inputs(torch.seed() % 2**31, T=2, requires_grad=False)
    results = []
    for eager in (True, False):
        monkeypatch.setattr(ops, "EAGER_FAST_PATH", eager)
        state = (hk.clone(), hv.clone())
        o, new = recurrent_step(q, k, v, s, g, state=state, inplace=inplace)
        assert (new[0] is state[0]) == inplace and torch.equal(state[0], new[0] if inplace else hk)
        results.append([o, *new])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_eager_backward_takes_the_forward_gate_pass(monkeypatch):
    """At the forward's chunk size the eager backward reuses its gate pass (launch.ForwardRecord); the op recomputes."""
    from gsa_compile import launch
    real, passes = launch.gate_pass, []
    monkeypatch.setattr(launch, "gate_pass", lambda *args: passes.append(1) or real(*args))
    for eager, expected in ((True, 1), (False, 2)):
        passes.clear()
        run(inputs(torch.seed() % 2**31), eager, monkeypatch)
        assert len(passes) == expected, (eager, len(passes))
    passes.clear()
    with torch.no_grad():  # inference: no record, one gate pass
        q, k, v, s, g, _, _ = inputs(0)
        chunk_gsa(q, k, v, s, g, chunk_size=16)
    assert len(passes) == 1
