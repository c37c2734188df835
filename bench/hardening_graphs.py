"""bench/gpu_hardening.py's CUDA graph cases (graph_forward, graph_backward, graph_decode: capture and
replay with new inputs against eager) and determinism (bitwise reruns, also in deterministic mode)."""
from __future__ import annotations

import contextlib
import random

import torch
import torch.nn.functional as F

from hardening_common import CHUNK, DIMS, _device, make  # (first: it puts the package on sys.path)
from gsa_compile import chunk_gsa, recurrent_step


# ------------------------------------------------------------------------------------------------ CUDA graphs

def _capture(fn):
    """Warm up `fn` on a side stream (compiles, validates, reads no tuning file later), then capture it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _refill(tensors, seed):
    """New values copied into static inputs (gates stay log gates, slot weights in (0, 1))."""
    gen = torch.Generator(device=tensors[0].device).manual_seed(seed)
    with torch.no_grad():
        for i, t in enumerate(tensors):
            if t is None:
                continue
            new = torch.randn(t.shape, generator=gen, device=t.device)
            new = F.logsigmoid(new) if i == 4 else torch.sigmoid(new) if i == 3 else new
            t.copy_(new.to(t.dtype))


def _random_packing(n, T, seed):
    """cu_seqlens of n sequences of random lengths >= 1 filling T tokens."""
    cuts = sorted(random.Random(seed).sample(range(1, T), n - 1))
    return torch.tensor([0, *cuts, T])


def _dims(small):
    return (2, 100, 2, 32, 32, 16) if small else (2, 2048, 4, DIMS["K"], DIMS["V"], DIMS["M"])


def graph_forward(small=False):
    if not torch.cuda.is_available():
        return dict(skipped="needs CUDA", ok=True)
    B, T, H, K, V, M = _dims(small)
    x = make(B, T, H, H, K, V, M, seed=7, requires_grad=False)
    dense = lambda: chunk_gsa(*x, output_final_state=True, chunk_size=None)  # noqa: E731  (tuned config)
    cu = _random_packing(8, T, seed=8).to(device="cuda", dtype=torch.int32)
    packed = [t[:1].contiguous() for t in x]
    varlen = lambda: chunk_gsa(*packed, cu_seqlens=cu, output_final_state=True, chunk_size=CHUNK)  # noqa: E731
    result = {}
    for name, fn, inputs in (("dense", dense, x), ("varlen", varlen, packed)):
        graph, out = _capture(fn)
        worst = 0.0
        for trial in range(3):
            _refill(inputs, seed=10 + trial)
            cu.copy_(_random_packing(8, T, seed=20 + trial))  # a new packing: 8 sequences, T tokens
            graph.replay()
            eager = fn()
            worst = max(worst, max(float((a.float() - b.float()).abs().max()) for a, b in
                                   zip([out[0], *out[1]], [eager[0], *eager[1]])))
        result[f"{name}_max_abs_diff"] = worst
    result["ok"] = all(v == 0 for v in result.values())
    return result


def graph_backward(small=False):
    if not torch.cuda.is_available():
        return dict(skipped="needs CUDA", ok=True)
    B, T, H, K, V, M = _dims(small)
    x = make(B, T, H, H, K, V, M, seed=9)
    gen = torch.Generator(device="cuda").manual_seed(11)
    weights = [torch.randn(shape, generator=gen, device="cuda") for shape in
               ((B, T, H, V), (B, H, K, M), (B, H, M, V))]

    def step():
        o, (hk, hv) = chunk_gsa(*x, output_final_state=True, chunk_size=CHUNK)
        loss = sum((a.float() * w).sum() for a, w in zip((o, hk, hv), weights))
        return torch.autograd.grad(loss, x)

    graph, grads = _capture(step)
    worst = 0.0
    for trial in range(3):
        _refill(x, seed=30 + trial)
        graph.replay()
        eager = step()
        worst = max(worst, max(float((a.float() - b.float()).abs().max()) for a, b in zip(grads, eager)))
    return dict(max_abs_diff=worst, ok=worst == 0)


def graph_decode(small=False):
    if not torch.cuda.is_available():
        return dict(skipped="needs CUDA", ok=True)
    B, _, H, K, V, M = _dims(small)
    steps = 6
    x = make(B, steps, 2 * H, H, K, V, M, seed=12, requires_grad=False)  # GQA: two query heads per kv head
    gen = torch.Generator(device="cuda").manual_seed(13)
    state0 = tuple(torch.randn(shape, generator=gen, device="cuda") for shape in ((B, H, K, M), (B, H, M, V)))
    static = [t[:, :1].clone() for t in x]
    state = tuple(s.clone() for s in state0)
    graph, out = _capture(lambda: recurrent_step(*static, state=state, inplace=True)[0])
    for s, s0 in zip(state, state0):  # warm-up and capture advanced the state: start again
        s.copy_(s0)
    eager_state = tuple(s.clone() for s in state0)
    worst = 0.0
    for t in range(steps):
        for buffer, source in zip(static, x):
            buffer.copy_(source[:, t:t + 1])
        graph.replay()
        eager, _ = recurrent_step(*(source[:, t:t + 1] for source in x), state=eager_state, inplace=True)
        worst = max(worst, float((out.float() - eager.float()).abs().max()))
    worst = max([worst] + [float((a - b).abs().max()) for a, b in zip(state, eager_state)])
    return dict(steps=steps, max_abs_diff=worst, ok=worst == 0)


# ------------------------------------------------------------------------------------------------ determinism

def determinism(small=False):
    B, T, H, K, V, M = (1, 90, 1, 16, 16, 8) if small or not torch.cuda.is_available() else (2, 2048, 2, 128, 128, 64)

    def run(case):
        if case == "dense":
            x = make(B, T, H, H, K, V, M, seed=14)
            o, (hk, hv) = chunk_gsa(*x, output_final_state=True, chunk_size=CHUNK)
        else:  # varlen ABC, GQA, initial states
            x = make(1, T, 2 * H, H, K, V, M, seed=15, layout="abc")
            cu = torch.tensor([0, 3, T // 2, T - 1, T], dtype=torch.int32, device=_device())
            gen = torch.Generator(device=_device()).manual_seed(16)
            state = [torch.randn(4, H, K, M, generator=gen, device=_device()).requires_grad_(),
                     torch.randn(4, H, M, V, generator=gen, device=_device()).requires_grad_()]
            o, (hk, hv) = chunk_gsa(*x, initial_state=state, output_final_state=True, cu_seqlens=cu, chunk_size=CHUNK)
            x = x[:4] + state
        loss = (o.float() * o.float()).sum() + hk.square().sum() + hv.sum()
        return [o, hk, hv, *torch.autograd.grad(loss, [t for t in x if t is not None])]

    result = {}
    for case in ("dense", "varlen_abc"):
        first, second = run(case), run(case)
        result[f"{case}_bitwise"] = all(torch.equal(a, b) for a, b in zip(first, second))
        try:
            with _deterministic_algorithms():
                third = run(case)
            result[f"{case}_deterministic_mode_bitwise"] = all(torch.equal(a, b) for a, b in zip(first, third))
        except RuntimeError as error:
            result[f"{case}_deterministic_mode_bitwise"], result[f"{case}_error"] = False, str(error)[:300]
    result["ok"] = all(v for k, v in result.items() if k.endswith("bitwise"))
    return result


@contextlib.contextmanager
def _deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
