"""One rank's share of the work: the state algebra (pure functions), the forward and backward of a
rank's slice around the messages to its neighbours, and the two autograd Functions (GSA, and the
ABC normaliser carried across ranks). See the package docstring for the schedule."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import launch
from ..api import abc_gate
from ..spec import GateLayout, StateTuple
from .topology import (
    NEXT,
    PREVIOUS,
    TAG_LSE,
    TAG_LSE_GRAD,
    TAG_STATE,
    TAG_STATE_GRAD,
    RankSpan,
)

# ----------------------------------------------------------------------------------------------
# State algebra (pure functions: the distributed path and the simulation both use these)
# ----------------------------------------------------------------------------------------------


def log_decay(g: torch.Tensor, layout: GateLayout, length: int, rows: int, M: int, dtype) -> torch.Tensor:
    """log A [rows, H, M]: the summed log gate of `length` tokens of g in `layout` (ABC as slot)."""
    if layout is GateLayout.SLOT:
        return g.to(dtype).sum(1)
    if layout is GateLayout.HEAD:
        return g.to(dtype).sum(1)[..., None].expand(-1, -1, M)
    if layout is GateLayout.DECAY_HEAD:
        return (g.to(dtype) * length)[None, :, None].expand(rows, -1, M)
    return (g.to(dtype) * length)[None].expand(rows, -1, -1)  # DECAY_SLOT


def decay_states(state: StateTuple, log_a: torch.Tensor) -> StateTuple:
    """(Hk A, A Hv): A = exp(log_a) [rows, H, M] scales Hk's M columns and Hv's M rows. Also the
    transpose, i.e. the gradient of <E, combine(S, ...)> with respect to S."""
    a = torch.exp(log_a)
    return state[0] * a[:, :, None, :], state[1] * a[:, :, :, None]


def combine(state: StateTuple, log_a: torch.Tensor, local: StateTuple) -> StateTuple:
    """The state after a span without a sequence start: A (.) S + F (F: the span's state from zero)."""
    decayed = decay_states(state, log_a)
    return decayed[0] + local[0], decayed[1] + local[1]


def _pack(state: StateTuple) -> torch.Tensor:
    return torch.cat([state[0].reshape(-1), state[1].reshape(-1)])


class _Config(NamedTuple):
    scale: float
    chunk_size: int  # 0: the tuned config
    layout: GateLayout  # the kernels' layout (ABC arrives as SLOT)
    H: int
    K: int
    V: int
    M: int
    N: int
    state_dtype: torch.dtype
    final_state: bool  # return the final states

    @property
    def state_shapes(self):
        return (self.H, self.K, self.M), (self.H, self.M, self.V)

    def unpack(self, buffer, rows) -> StateTuple:
        split = rows * self.H * self.K * self.M
        return (buffer[:split].view(rows, self.H, self.K, self.M), buffer[split:].view(rows, self.H, self.M, self.V))

    def state_numel(self, rows) -> int:
        return rows * self.H * self.M * (self.K + self.V)


class _Tokens(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    s: torch.Tensor
    g: torch.Tensor

    def slice(self, start, stop, layout):
        g = self.g[:, start:stop] if layout.data_dependent else self.g
        return _Tokens(self.q[:, start:stop], self.k[:, start:stop], self.v[:, start:stop], self.s[:, start:stop], g)


def _rows(state, rows):
    if state is None:
        return None
    index = torch.tensor(rows, device=state[0].device)
    return state[0].index_select(0, index), state[1].index_select(0, index)


def _cu(bounds, device):
    return None if bounds is None else torch.tensor(bounds, dtype=torch.int32, device=device)


def _forward_call(cfg: _Config, x: _Tokens, state, bounds):
    hk0, hv0 = state if state is not None else (None, None)
    return torch.ops.gsa.chunk_forward(x.q, x.k, x.v, x.s, x.g, cfg.scale, hk0, hv0, _cu(bounds, x.q.device),
                                       cfg.chunk_size, cfg.layout.value)


def _backward_call(cfg: _Config, do, d_final, x: _Tokens, state, bounds):
    hk0, hv0 = state if state is not None else (None, None)
    dhk, dhv = d_final if d_final is not None else (None, None)
    grads = torch.ops.gsa.chunk_backward(do.contiguous(), dhk, dhv, x.q, x.k, x.v, x.s, x.g, cfg.scale, hk0, hv0,
                                         _cu(bounds, x.q.device), cfg.chunk_size, cfg.layout.value)
    return grads[:7]  # dq, dk, dv, ds, dg, dhk0, dhv0 (the 8th, the mods' parameter gradient, is empty: no mods)


def local_final_states(cfg: _Config, x: _Tokens) -> StateTuple:
    """F: the final states of one span per batch row from a zero state (the state pass only, no outputs)."""
    call = launch.Call(x.q, x.k, x.v, x.s, None, None, cfg.chunk_size, cfg.layout, None, lambda kernel: kernel)
    *_, hk, hv = launch.state_pass(call, x.k, x.v, x.s, x.g, None, None)
    return hk, hv


# ----------------------------------------------------------------------------------------------
# One rank's forward and backward
# ----------------------------------------------------------------------------------------------


def _rank_forward(span: RankSpan, link, cfg: _Config, x: _Tokens, initial):
    """(o, [(rows, hk, hv) of the sequences ending here], incoming state or None)."""
    outputs, finals, local = [], [], None
    if span.inside and span.sends:
        local = local_final_states(cfg, x)
    if span.tail_rows:
        o_tail, hk, hv = _forward_call(cfg, x.slice(span.head, span.length, cfg.layout),
                                       _rows(initial, span.tail_rows), span.tail_bounds)
        if span.sends:
            link.send(_pack((hk[-span.carry:], hv[-span.carry:])), NEXT, TAG_STATE)
        visible = len(span.visible_tail_rows)
        finals.append((span.visible_tail_rows, hk[:visible], hv[:visible]))
        outputs.append(o_tail)
    incoming = None
    if span.receives:
        incoming = cfg.unpack(link.recv(cfg.state_numel(span.carry), cfg.state_dtype, x.q.device, PREVIOUS,
                                        TAG_STATE), span.carry)
    if span.head:
        head = x.slice(0, span.head, cfg.layout)
        if local is not None:
            log_a = log_decay(head.g, cfg.layout, span.head, span.carry, cfg.M, cfg.state_dtype)
            link.send(_pack(combine(incoming, log_a, local)), NEXT, TAG_STATE)
        o_head, hk, hv = _forward_call(cfg, head, incoming, None)
        if span.head_ends_here:
            finals.append((span.head_rows, hk, hv))
        outputs.insert(0, o_head)
    link.flush()
    return (torch.cat(outputs, 1) if len(outputs) > 1 else outputs[0]), finals, incoming


def _rank_backward(span: RankSpan, link, cfg: _Config, x: _Tokens, initial, incoming, do, d_final):
    """Gradients (dq, dk, dv, ds, dg, dhk0, dhv0) of one rank; d_final is (dhk, dhv) [N, ...] or None."""
    parts, d_initial = [], None
    if span.head:
        head, do_head = x.slice(0, span.head, cfg.layout), do[:, :span.head]
        d_end = _rows(d_final, span.head_rows) if span.head_ends_here else None
        *grads, dhk_in, dhv_in = _backward_call(cfg, do_head, d_end, head, incoming, None)
        if span.inside and span.sends:
            later = cfg.unpack(link.recv(cfg.state_numel(span.carry), cfg.state_dtype, x.q.device, NEXT,
                                         TAG_STATE_GRAD), span.carry)
            log_a = log_decay(head.g, cfg.layout, span.head, span.carry, cfg.M, cfg.state_dtype)
            through = decay_states(later, log_a)
            link.send(_pack((dhk_in + through[0], dhv_in + through[1])), PREVIOUS, TAG_STATE_GRAD)
            # the path through F_r (and through A_r's gate), evaluated at the same incoming state
            *more, _, _ = _backward_call(cfg, torch.zeros_like(do_head), later, head, incoming, None)
            grads = [a + b for a, b in zip(grads, more)]
        else:
            link.send(_pack((dhk_in, dhv_in)), PREVIOUS, TAG_STATE_GRAD)
        parts.append(grads)
    if span.tail_rows:
        tail = x.slice(span.head, span.length, cfg.layout)
        d_end = None
        if span.sends or d_final is not None:
            d_end = tuple(torch.zeros(len(span.tail_rows), *shape, device=x.q.device, dtype=cfg.state_dtype)
                          for shape in cfg.state_shapes)
            visible = len(span.visible_tail_rows)
            if d_final is not None and visible:
                for end, d in zip(d_end, _rows(d_final, span.visible_tail_rows)):
                    end[:visible] = d
            if span.sends:
                later = cfg.unpack(link.recv(cfg.state_numel(span.carry), cfg.state_dtype, x.q.device, NEXT,
                                             TAG_STATE_GRAD), span.carry)
                for end, d in zip(d_end, later):
                    end[-span.carry:] = d
        *grads, dhk0, dhv0 = _backward_call(cfg, do[:, span.head:], d_end, tail, _rows(initial, span.tail_rows),
                                            span.tail_bounds)
        parts.append(grads)
        if initial is not None:
            index = torch.tensor(span.tail_rows, device=x.q.device)
            d_initial = tuple(torch.zeros_like(h).index_copy_(0, index, d.to(h.dtype))
                              for h, d in zip(initial, (dhk0, dhv0)))
    link.flush()
    if initial is not None and d_initial is None:
        d_initial = tuple(torch.zeros_like(h) for h in initial)
    def join(pieces, name):
        if len(pieces) == 1:
            return pieces[0]
        if name == "g" and not cfg.layout.data_dependent:  # a constant decay [H] / [H, M]: the shares add up
            return pieces[0] + pieces[1]
        return torch.cat(pieces, 1)  # the head's and the tail's tokens

    grads = [join(pieces, name) for pieces, name in zip(zip(*parts), "qkvsg")]
    return (*grads, *(d_initial or (None, None)))


class _ContextParallelGSA(torch.autograd.Function):
    """(q, k, v, s, g, hk0, hv0) -> o, or (o, hk, hv) with the final states when cfg.final_state."""

    @staticmethod
    def forward(ctx, span, link, cfg, q, k, v, s, g, hk0, hv0):
        ctx.set_materialize_grads(False)
        initial = None if hk0 is None else (hk0, hv0)
        o, finals, incoming = _rank_forward(span, link, cfg, _Tokens(q, k, v, s, g), initial)
        ctx.span, ctx.link, ctx.cfg = span, link, cfg
        ctx.save_for_backward(q, k, v, s, g, hk0, hv0, *(incoming or (None, None)))
        if not cfg.final_state:
            return o
        hk, hv = (torch.zeros(cfg.N, *shape, device=q.device, dtype=cfg.state_dtype) for shape in cfg.state_shapes)
        for rows, part_k, part_v in finals:
            if rows:
                index = torch.tensor(rows, device=q.device)
                hk.index_copy_(0, index, part_k)
                hv.index_copy_(0, index, part_v)
        return o, hk, hv

    @staticmethod
    def backward(ctx, do, *d_finals):
        q, k, v, s, g, hk0, hv0, in_k, in_v = ctx.saved_tensors
        cfg = ctx.cfg
        if do is None:
            do = torch.zeros(q.shape[:3] + (cfg.V,), device=q.device, dtype=q.dtype)
        d_final = None
        if any(d is not None for d in d_finals):
            d_final = tuple(torch.zeros(cfg.N, *shape, device=q.device, dtype=cfg.state_dtype) if d is None
                            else d.to(cfg.state_dtype) for d, shape in zip(d_finals, cfg.state_shapes))
        grads = _rank_backward(ctx.span, ctx.link, cfg, _Tokens(q, k, v, s, g), None if hk0 is None else (hk0, hv0),
                               None if in_k is None else (in_k, in_v), do, d_final)
        return (None, None, None, *grads)


# ----------------------------------------------------------------------------------------------
# ABC: the running log-sum-exp of the slot logits crosses ranks first
# ----------------------------------------------------------------------------------------------


def _abc_continuing(s, z_in):
    """ABC gate, slot weights and last log-normaliser of tokens that continue a sequence whose
    earlier logits have log-sum-exp z_in [rows, H, M] (float64)."""
    x = s.to(torch.float64)
    z = torch.logaddexp(z_in[:, None], torch.logcumsumexp(x, 1))
    previous = torch.cat([z_in[:, None], z[:, :-1]], 1)
    return (previous - z).to(torch.promote_types(s.dtype, torch.float32)), torch.exp(x - z).to(s.dtype), z[:, -1]


def _abc_tail(span, s_tail):
    """ABC gate and weights of the sequences starting in the slice, and the log-sum-exp of the last one."""
    g, w = abc_gate(s_tail, _cu(span.tail_bounds, s_tail.device))
    last_start = span.tail_bounds[-2] if span.tail_bounds is not None else 0
    return g, w, torch.logsumexp(s_tail[:, last_start:].to(torch.float64), 1)


class _ContextParallelAbcGate(torch.autograd.Function):
    """s (slot logits) -> (g, slot weights) of ABC, with the normaliser carried across ranks."""

    @staticmethod
    def forward(ctx, span, link, s):
        rows, H, M = span.carry, s.shape[2], s.shape[3]
        gates, weights, z_in = [], [], None
        if span.tail_rows:
            g, w, z_out = _abc_tail(span, s[:, span.head:])
            if span.sends:
                link.send(z_out, NEXT, TAG_LSE)
            gates, weights = [g], [w]
        if span.receives:
            z_in = link.recv(rows * H * M, torch.float64, s.device, PREVIOUS, TAG_LSE).view(rows, H, M)
        if span.head:
            g, w, z_out = _abc_continuing(s[:, :span.head], z_in)
            if span.inside and span.sends:
                link.send(z_out, NEXT, TAG_LSE)
            gates.insert(0, g)
            weights.insert(0, w)
        link.flush()
        ctx.span, ctx.link = span, link
        ctx.save_for_backward(s, z_in)
        ctx.set_materialize_grads(False)
        return (torch.cat(gates, 1), torch.cat(weights, 1)) if len(gates) > 1 else (gates[0], weights[0])

    @staticmethod
    def backward(ctx, dg, dw):
        span, link = ctx.span, ctx.link
        s, z_in = ctx.saved_tensors
        rows, H, M = span.carry, s.shape[2], s.shape[3]
        ds = []

        def local_grad(outputs, grad_outputs, inputs):
            pairs = [(o, d) for o, d in zip(outputs, grad_outputs) if d is not None]
            if not pairs:
                return [torch.zeros_like(x) for x in inputs]
            found = torch.autograd.grad([o for o, _ in pairs], inputs, [d for _, d in pairs], allow_unused=True)
            return [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, found)]

        def piece(grad, start, stop):
            return None if grad is None else grad[:, start:stop]

        with torch.enable_grad():
            if span.head:
                s_head, z_leaf = s[:, :span.head].detach().requires_grad_(), z_in.detach().requires_grad_()
                g, w, z_out = _abc_continuing(s_head, z_leaf)
                outputs, grads = [g, w], [piece(dg, 0, span.head), piece(dw, 0, span.head)]
                if span.inside and span.sends:
                    outputs.append(z_out)
                    grads.append(link.recv(rows * H * M, torch.float64, s.device, NEXT, TAG_LSE_GRAD).view(rows, H, M))
                d_s, d_z = local_grad(outputs, grads, [s_head, z_leaf])
                link.send(d_z, PREVIOUS, TAG_LSE_GRAD)
                ds.append(d_s)
            if span.tail_rows:
                s_tail = s[:, span.head:].detach().requires_grad_()
                g, w, z_out = _abc_tail(span, s_tail)
                outputs, grads = [g, w], [piece(dg, span.head, None), piece(dw, span.head, None)]
                if span.sends:
                    outputs.append(z_out)
                    grads.append(link.recv(rows * H * M, torch.float64, s.device, NEXT, TAG_LSE_GRAD).view(rows, H, M))
                ds.extend(local_grad(outputs, grads, [s_tail]))
        link.flush()
        return None, None, torch.cat(ds, 1) if len(ds) > 1 else ds[0]
