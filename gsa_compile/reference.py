"""The truth: a float64, token-by-token GSA recurrence in plain torch (differentiable).

Per kv head and token t (q_t is a query head of that kv head's group):

    Hk_t = Hk_{t-1} * exp(g_t)[None, :] + k_t s_t^T          [K, M]
    Hv_t = exp(g_t)[:, None] * Hv_{t-1} + s_t v_t^T          [M, V]
    p_t  = softmax_M(scale * Hk_t^T q_t)
    o_t  = Hv_t^T p_t

GQA: query head i reads kv head i // (HQ // H). Both states depend only on k, v, s, g, so they
live per kv head and are shared exactly by the query heads of a group; only the softmax input
(q) differs. Hence `final_state` is (hk [N, H, K, M], hv [N, H, M, V]), per kv head.

ABC (g is None): s holds slot logits. Per sequence, z_t = logcumsumexp(s_{1..t}); the gate is
g_t = z_{t-1} - z_t with g_1 = 0 (fla's convention: an initial state shares the first token's
weight), and the written slot weights are exp(s_t - z_t). Hk_t is then the softmax(s)-weighted
average of k over time, as in ABC.
"""
from __future__ import annotations

import torch

from .spec import GateLayout, validate_inputs


def expand_gate(g, s, layout: GateLayout, cu_seqlens=None):
    """Return (log gate [B,T,H,M], slot weights [B,T,H,M]) in s's dtype for any gate layout."""
    B, T, H, M = s.shape
    if layout is not GateLayout.ABC:  # each layout's gate has its own number of dimensions
        return per_token_gate(g.to(s.dtype), s.shape), s
    # ABC: log-normaliser per sequence
    gates, weights = [], []
    for seq in _sequence_slices(B, T, cu_seqlens):
        logits = s[seq]
        z = torch.logcumsumexp(logits, dim=1)
        gates.append(torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1] - z[:, 1:]], dim=1))
        weights.append(torch.exp(logits - z))
    return torch.cat(gates, dim=0 if cu_seqlens is None else 1), torch.cat(weights, dim=0 if cu_seqlens is None else 1)


def _sequence_slices(B, T, cu_seqlens):
    """Index expressions selecting each sequence of a [B, T, ...] tensor."""
    if cu_seqlens is None:
        return [(slice(b, b + 1), slice(0, T)) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(slice(0, 1), slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _initial(initial_state, n, H, K, M, V, like):
    if initial_state is None:
        return like.new_zeros(H, K, M), like.new_zeros(H, M, V)
    return initial_state[0][n].to(like.dtype), initial_state[1][n].to(like.dtype)


def recurrent_gsa(q, k, v, s, g=None, scale=None, initial_state=None, output_final_state=False,
                  cu_seqlens=None, slot_mod=None):
    """Float64 token-by-token GSA. Returns (o [B,T,HQ,V] float64, final_state or None).

    `slot_mod(logit, b, h, t, m)` (optional, as for gsa_compile.GSAMods) modifies the slot logits before
    the softmax; it gets integer tensors: b the sequence, h the query head, t the position in the
    sequence, m the slot (broadcastable against the logits)."""
    p = validate_inputs(q, k, v, s, g, scale, initial_state, cu_seqlens, require_float=False, check_values=False)
    f64 = torch.float64
    q, k, v, s = (x.to(f64) for x in (q, k, v, s))
    gate, weight = expand_gate(None if g is None else g.to(f64), s, p.layout, cu_seqlens)
    outputs, final_hk, final_hv = [], [], []
    for n, (bsel, tsel) in enumerate(_sequence_slices(p.B, p.T, cu_seqlens)):
        hk, hv = _initial(initial_state, n, p.H, p.K, p.M, p.V, q)
        o_seq = []
        for t in range(tsel.start, tsel.stop):
            b = bsel.start
            decay = torch.exp(gate[b, t])  # [H, M]
            hk = hk * decay[:, None, :] + k[b, t][:, :, None] * weight[b, t][:, None, :]
            hv = hv * decay[:, :, None] + weight[b, t][:, :, None] * v[b, t][:, None, :]
            q_t = q[b, t].view(p.H, p.group, p.K)
            logits = p.scale * torch.einsum("hgk,hkm->hgm", q_t, hk)
            if slot_mod is not None:
                heads = torch.arange(p.HQ, device=q.device).view(p.H, p.group, 1)
                logits = slot_mod(logits, torch.tensor(n, device=q.device), heads,
                                  torch.tensor(t - tsel.start, device=q.device), torch.arange(p.M, device=q.device))
            probs = torch.softmax(logits, dim=-1)
            o_seq.append(torch.einsum("hgm,hmv->hgv", probs, hv).reshape(p.HQ, p.V))
        outputs.append(torch.stack(o_seq, dim=0))
        final_hk.append(hk)
        final_hv.append(hv)
    o = torch.stack(outputs, 0) if cu_seqlens is None else torch.cat(outputs, 0)[None]
    final = (torch.stack(final_hk), torch.stack(final_hv)) if output_final_state else None
    return o, final


def parallel_gsa(q, k, v, s, g=None, scale=None, initial_state=None, output_final_state=False,
                 cu_seqlens=None):
    """The same function in its quadratic form with cumulative gates (an independent check).

    With Gc_t = sum_{i<=t} g_i per slot and D[t, j, m] = exp(Gc_t[m] - Gc_j[m]) for j <= t:
        logits_t = scale * (sum_j D[t,j] * s_j * (q_t . k_j) + exp(Gc_t) * (Hk_0^T q_t))
        o_t      = sum_j (sum_m p_t[m] D[t,j,m] s_j[m]) v_j + Hv_0^T (p_t * exp(Gc_t))
    """
    p = validate_inputs(q, k, v, s, g, scale, initial_state, cu_seqlens, require_float=False, check_values=False)
    f64 = torch.float64
    q, k, v, s = (x.to(f64) for x in (q, k, v, s))
    gate, weight = expand_gate(None if g is None else g.to(f64), s, p.layout, cu_seqlens)
    outputs, final_hk, final_hv = [], [], []
    for n, (bsel, tsel) in enumerate(_sequence_slices(p.B, p.T, cu_seqlens)):
        b = bsel.start
        qs, ks, vs = q[b, tsel], k[b, tsel], v[b, tsel]  # [L, HQ|H, D]
        ws, cum = weight[b, tsel], torch.cumsum(gate[b, tsel], dim=0)  # [L, H, M]
        L = qs.shape[0]
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=q.device))
        diff = cum[:, None] - cum[None, :]  # [t, j, H, M]
        decay = torch.where(causal[:, :, None, None], torch.exp(diff.clamp(max=0)), torch.zeros_like(diff))
        hk0, hv0 = _initial(initial_state, n, p.H, p.K, p.M, p.V, q)
        qg = qs.view(L, p.H, p.group, p.K)
        qk = torch.einsum("thgk,jhk->thgj", qg, ks)
        logits = torch.einsum("thgj,tjhm,jhm->thgm", qk, decay, ws)
        logits = logits + torch.exp(cum)[:, :, None, :] * torch.einsum("thgk,hkm->thgm", qg, hk0)
        probs = torch.softmax(p.scale * logits, dim=-1)
        attn = torch.einsum("thgm,tjhm,jhm->thgj", probs, decay, ws)
        o = torch.einsum("thgj,jhv->thgv", attn, vs)
        o = o + torch.einsum("thgm,hmv->thgv", probs * torch.exp(cum)[:, :, None, :], hv0)
        outputs.append(o.reshape(L, p.HQ, p.V))
        total = torch.exp(cum[-1])  # [H, M]
        tail = torch.exp(cum[-1][None] - cum) * ws  # [L, H, M]: weight of token j in the final state
        final_hk.append(hk0 * total[:, None, :] + torch.einsum("jhk,jhm->hkm", ks, tail))
        final_hv.append(hv0 * total[:, :, None] + torch.einsum("jhm,jhv->hmv", tail, vs))
    o = torch.stack(outputs, 0) if cu_seqlens is None else torch.cat(outputs, 0)[None]
    final = (torch.stack(final_hk), torch.stack(final_hv)) if output_final_state else None
    return o, final


# ------------------------------------------------------------------ the scale of the gate gradient's error

def per_token_gate(g, shape):
    """A log gate of any layout ([B, T, H, M], [B, T, H], [H] or [H, M]) as the [B, T, H, M] gate it means."""
    B, T, H, M = shape
    view = {4: g, 3: g[..., None], 1: g[None, None, :, None], 2: g[None, None]}[g.dim()]
    return view.expand(B, T, H, M)


def suffix_magnitudes(dg_tokens, s_ds, cu_seqlens=None):
    """The size of what dg_t sums, per token: dg_t = sum_{t' >= t in t's sequence} dGamma_t', where
    dGamma_t' = x_t' - s_t' ds_t' (+ the final states' term at the last token) and |x| <= |dGamma| + |s ds|;
    so sum_{t' >= t} |dGamma_t'| + 2 |s_t' ds_t'|. (One token's |dg_t| + |s_t ds_t| misses the cancellation
    between the final states' term and the whole suffix: bf16 found it at M = 1 with only final states
    upstream.) `cu_seqlens`: None, a list or a tensor of sequence bounds."""
    T = dg_tokens.shape[1]
    bounds = [0, T] if cu_seqlens is None else [int(b) for b in cu_seqlens]
    out = torch.zeros_like(dg_tokens)
    for a, b in zip(bounds[:-1], bounds[1:]):
        dg = dg_tokens[:, a:b]
        d_gamma = dg - torch.cat([dg[:, 1:], torch.zeros_like(dg[:, :1])], dim=1)
        out[:, a:b] = (d_gamma.abs() + 2 * s_ds[:, a:b].abs()).flip(1).cumsum(1).flip(1)
    return out


def gate_gradient_scale(q, k, v, s, g, upstream, scale=None, initial_state=None, cu_seqlens=None):
    """What an error of dg (the gradient of a layout's gate g) is measured against: the summed magnitudes
    of the per-token terms it sums (a decay's dg sums over every token of every sequence, and those terms
    largely cancel), from a float64 run with g expanded to every token. `upstream`: the gradients (do,
    dhk, dhv) reaching o and the final states (None for one that gets none). Shaped as g."""
    f64 = lambda x: x.detach().double()  # noqa: E731
    probe = f64(g).requires_grad_()
    tokens = per_token_gate(probe, s.shape)
    gate, s64 = tokens.detach().clone().requires_grad_(), f64(s).requires_grad_()
    initial = None if initial_state is None else tuple(f64(x) for x in initial_state)
    o, final = recurrent_gsa(f64(q), f64(k), f64(v), s64, gate, scale, initial_state=initial,
                             output_final_state=True, cu_seqlens=cu_seqlens)
    loss = sum((a * w.double()).sum() for a, w in zip((o, *final), upstream) if w is not None)
    dg_tokens, ds = torch.autograd.grad(loss, [gate, s64])
    terms = suffix_magnitudes(dg_tokens, s64.detach() * ds, cu_seqlens)
    magnitude, = torch.autograd.grad((tokens * terms).sum(), probe)
    return magnitude
