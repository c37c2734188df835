"""GSA written once in the tile IR: the forward is two programs.

Notation: chunk of BT tokens starting at row `t0`, sub-chunks of BC rows; `b` is the chunk-local
cumulative log2 gate (b_t = log2(e) * sum_{i<=t in chunk} g_i, per slot, f32, non-increasing), and
w = s * 2^(b_last - b) is each token's weight in the state at the chunk's end.

1. state pass  (per kv head and K or V tile; sequential over chunks). Both recurrences need only
               k, v, s, g:   Hk_{c+1} = Hk_c * 2^{b_last} + k^T w,   Hv_{c+1} = 2^{b_last} Hv_c + w^T v.
               Stores every chunk-start state, the final states and the gate cumsum b (gc); with user
               mods that map s (mods.py: s_from_gate), also the mapped s, derived from the mapped gate.
2. output pass (per query head and chunk; all chunks in parallel):
               logits = scale * (2^b (q Hk_c) + intra(q k^T, s)),  p = softmax_M(logits),
               o = (p 2^b) Hv_c + att v  with att[t, j] = sum_m p_t s_j 2^(b_t - b_j) (j <= t).
               Everything but the pairwise terms inside each sub-chunk is a chunk-level matrix product
               (see blocks.py for how the gate factors split between sub-chunks).

Intra-chunk terms couple rows t >= j through 2^{b_t - b_j}. Between different sub-chunks this is
factored through r_J = b at the last row of j's sub-chunk J, so both factors are <= 1; within a
sub-chunk it is computed pairwise ([BC, BC, BM]). No exponent is ever positive.

The gate layout is a lowering rule: how a [BT, BM] tile of g is read (`gate_view`).
"""
from __future__ import annotations

from . import mods
from .blocks import (LOG2E, ChunkGates, SubChunk, chunk_products, chunk_rows, chunk_state, diagonal_blocks,
                     input_view, mapped_copy, scratch_view, seq_view, softmax_slots)
from .ir import Builder, Program, View
from .spec import GATE_FLOOR, GateLayout, Spec


def gate_view(layout: GateLayout) -> View:
    """Lowering rule for g: which strides a [rows, slots] tile of the log gate is read with."""
    rule = {
        GateLayout.SLOT: ("stride_gt", "1"),  # g [B, T, H, M]
        GateLayout.HEAD: ("stride_gt", "0"),  # g [B, T, H]: one value broadcast over slots
        GateLayout.DECAY_HEAD: ("0", "0"),  # g [H]: constant in time and over slots
        GateLayout.DECAY_SLOT: ("0", "1"),  # g [H, M]: constant in time
    }
    if layout not in rule:
        raise ValueError(f"no gate lowering rule for layout {layout.value!r} (ABC is normalised before the kernels)")
    row_stride, col_stride = rule[layout]
    return View("g_base", row_stride, "M", col_stride, tensor="g")


def state_pass(spec: Spec) -> Program:
    """Programs i_t < NK carry Hk rows k0:k0+BK; the others carry Hv columns v0:v0+BV. The program i_t = 0
    stores gc (and the mapped inputs of mods.STORED_MAPS) for the later programs."""
    b = Builder()
    k_view, v_view, s_view, gc_view = seq_view("k", "K"), seq_view("v", "V"), seq_view("s", "M"), seq_view("gc", "M")
    s_from_gate = mods.derived_from(spec.mods, "s") == "g"

    def gate_weights():
        g = chunk_rows(b, "g_c", gate_view(spec.layout))
        # floor the log gate (so -inf, a reset, never meets -inf in a difference; see spec.GATE_FLOOR)
        g2 = b.map("g2", f"tl.maximum({{0}}, {GATE_FLOOR}) * " + LOG2E, g)
        gc = b.reduce("gc_c", g2, 0, "cumsum")
        total = b.reduce("g_total", g2, 0, "sum")
        last = b.expand("b_last", total, "None, :")
        s = b.derive("s_c", g, "s") if s_from_gate else chunk_rows(b, "s_c", s_view)
        return gc, total, last, s, b.map("w", "{0} * tl.exp2({1} - {2})", s, last, gc)

    with b.when("i_t < NK"):
        shape = ("BK", "BM")
        init = View("hk_init_base", "M", "M")
        hk = b.load("hk", init, "k0", "K", shape) if spec.initial_state else b.zeros("hk", shape)
        with b.loop("i_c", "0", "n_chunks"):
            b.map("t0", "bos + i_c * BT", dtype="i64", shape=())
            b.store(chunk_state("hk"), hk, "k0", "K")
            gc, total, last, s, w = gate_weights()
            b.store(gc_view, gc, "t0", "eos", when="i_t == 0")
            if "s" in mods.stored(spec.mods):
                b.store(mapped_copy("s", "M"), s, "t0", "eos", when="i_t == 0")
            k = chunk_rows(b, "k_c", k_view, "BK", "k0", "in")
            hk_decayed = b.map("hk", "{0} * tl.exp2({1})", hk, last)
            b.dot("hk", k, w, trans_a=True, acc=hk_decayed)
        b.store(View("hk_final_base", "M", "M"), hk, "k0", "K")
    with b.when("i_t >= NK"):
        shape = ("BM", "BV")
        init = View("hv_init_base", "V", "V")
        hv = b.load("hv", init, "0", "M", shape, col0="v0") if spec.initial_state else b.zeros("hv", shape)
        with b.loop("i_c", "0", "n_chunks"):
            b.map("t0", "bos + i_c * BT", dtype="i64", shape=())
            b.store(chunk_state("hv"), hv, "0", "M", col0="v0")
            gc, total, _, _, w = gate_weights()
            v = chunk_rows(b, "v_c", v_view, "BV", "v0", "in")
            hv_decayed = b.map("hv", "{0} * tl.exp2({1})", hv, b.expand("decay_col", total, ":, None"))
            b.dot("hv", w, v, trans_a=True, acc=hv_decayed)
        b.store(View("hv_final_base", "V", "V"), hv, "0", "M", col0="v0")
    return Program("gsa_state_pass", [k_view, v_view, s_view, gc_view], b.body).verify()


def output_pass(spec: Spec) -> Program:
    """Per (chunk, query head), in three phases joined by barriers through f32 scratch rows:
    A. x = q Hk_c, a = q k^T (one loop over K); the logits' state and off-diagonal-block terms;
    B. per sub-chunk: the diagonal-block terms, p = softmax, the attention's diagonal blocks;
    C. att = those blocks + the off-diagonal blocks of sum_m p_t s_j 2^(b_t - b_j);
       o = (p 2^b) Hv_c + att v per V tile."""
    b = Builder()
    q, k, v, o = seq_view("q", "K"), seq_view("k", "K"), seq_view("v", "V"), seq_view("o", "V")
    s_view, gc_view = input_view(spec, "s", "M"), seq_view("gc", "M")
    aqk, loff, pd, attd = (scratch_view(n, c) for n, c in (("aqk", "BT"), ("loff", "M"), ("pd", "M"), ("attd", "BT")))
    gates = ChunkGates(b, s_view, gc_view)
    x, a = chunk_products(b, "l_", q, k, chunk_state("hk"), "K", "BK")
    logits = b.map("l_off", "{0} * tl.exp2({1})", x, gates.gc)
    with gates.off_diagonal() as blk:
        logits = gates.gated_rows("l_off", a, logits, blk)
    b.store(aqk, a, "t0", "eos")
    b.store(loff, logits, "t0", "eos")
    b.barrier()
    sub = SubChunk(b, s_view, gc_view)
    with sub.loop() as (gc_i, s3, decay):
        diag = sub.scores("l_", sub.block("a_ii", aqk), s3, decay)
        probs = softmax_slots(b, b.map("l_i", "{0} + {1}", sub.rows(loff, "l_off_i"), diag))
        b.store(pd, probs, "ts", "eos")
        b.store(attd, sub.attention("o_", probs, s3, decay), "ts", "eos", col0="J * BC")
    b.barrier()
    probs, att = chunk_rows(b, "p_c", pd), diagonal_blocks(b, "att_c", attd)
    with gates.off_diagonal() as blk:
        att = gates.attention("att_c", probs, att, blk)
    weights = b.map("pw_c", "{0} * tl.exp2({1})", probs, gates.gc)
    with b.loop("v0", "0", "V", step="BV"):
        out = b.dot("o_c", weights, b.load("hv_tile", chunk_state("hv"), "0", "M", ("BM", "BV"), col0="v0"))
        out = b.dot("o_c", att, chunk_rows(b, "v_c", v, "BV", "v0", "in"), acc=out)
        b.store(o, out, "t0", "eos", col0="v0")
    return Program("gsa_output_pass", [q, k, v, s_view, gc_view, o, aqk, loff, pd, attd], b.body).verify()


FORWARD_PROGRAMS = (state_pass, output_pass)
