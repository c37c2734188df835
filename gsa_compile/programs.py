"""GSA written once in the tile IR: the forward is two programs.

Notation: chunk of BT tokens starting at row `t0`, sub-chunks of BC rows; `b` is the chunk-local
cumulative log2 gate (b_t = log2(e) * sum_{i<=t in chunk} g_i, per slot, f32, non-increasing), and
w = s * 2^(b_last - b) is each token's weight in the state at the chunk's end.

0. gate pass   (per kv head and chunk; all chunks in parallel): everything the state pass needs from
               s and g, once per chunk: b (gc), the weights w and the chunk's total log2 gate b_last
               (gtot, one row per chunk). With user mods that map s (mods.py: s_from_gate), also the
               mapped s, derived from the mapped gate. (Inside the state pass this chain sat on its
               sequential critical path, in each of its K/V tile programs: bench/NOTES.md, session 7.)
1. state pass  (per kv head and K or V tile; sequential over chunks). Both recurrences need only
               k, v, w, b_last:   Hk_{c+1} = Hk_c * 2^{b_last} + k^T w,   Hv_{c+1} = 2^{b_last} Hv_c + w^T v.
               Stores every chunk-start state and the final states.
2. output pass (per query head and chunk; all chunks in parallel):
               logits = scale * (2^b (q Hk_c) + intra(q k^T, s)),  p = softmax_M(logits),
               o = (p 2^b) Hv_c + att v  with att[t, j] = sum_m p_t s_j 2^(b_t - b_j) (j <= t).
               Where the chunk's gates allow one factor per slot (blocks.FactoredChunk, the common case)
               every term is a matrix product over the chunk; elsewhere everything but the pairwise terms
               inside each sub-chunk is (see blocks.py for how the gate factors split between sub-chunks).

Intra-chunk terms couple rows t >= j through 2^{b_t - b_j}. Between different sub-chunks this is
factored through r_J = b at the last row of j's sub-chunk J, so both factors are <= 1; within a
sub-chunk it is computed pairwise ([BC, BC, BM]). No exponent is ever positive.

The gate layout is a lowering rule: how a [BT, BM] tile of g is read (`gate_view`).
"""
from __future__ import annotations

from . import mods
from .blocks import (ALL_CHUNK_ROWS, LOG2E, UNROLLED_SWEEP_MAX_CHUNK, ChunkGates, SubChunk, chunk_products,
                     chunk_row, chunk_rows, chunk_state, diagonal_blocks, input_view, mapped_copy, per_chunk_form,
                     scratch_view, seq_view, softmax_slots)
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


def chunk_total(i_c: str = "i_c") -> View:
    """Chunk i_c's total log2 gate b_last [BM] in `gtot` [chunk rows, H, M] (f32)."""
    return chunk_row("gtot", i_c)


def gate_pass(spec: Spec) -> Program:
    """Per (chunk, kv head): gc, w = s * 2^(b_last - b) and b_last of the chunk, and the mapped s of
    mods.STORED_MAPS, for the state pass and the later programs."""
    b = Builder()
    s_view, gc_view, w_view = seq_view("s", "M"), seq_view("gc", "M"), seq_view("w", "M")
    g = chunk_rows(b, "g_c", gate_view(spec.layout))
    # floor the log gate (so -inf, a reset, never meets -inf in a difference; see spec.GATE_FLOOR)
    g2 = b.map("g2", f"tl.maximum({{0}}, {GATE_FLOOR}) * " + LOG2E, g)
    gc = b.reduce("gc_c", g2, 0, "cumsum")
    total = b.reduce("g_total", g2, 0, "sum")
    s = b.derive("s_c", g, "s") if mods.derived_from(spec.mods, "s") == "g" else chunk_rows(b, "s_c", s_view)
    w = b.map("w_c", "{0} * tl.exp2({1} - {2})", s, b.expand("b_last", total, "None, :"), gc)
    b.store(gc_view, gc, "t0", "eos")
    b.store(w_view, w, "t0", "eos")
    b.store(chunk_total(), total, "t0", "eos")  # one row; masked off for the spare programs of a packed batch
    if "s" in mods.stored(spec.mods):
        b.store(mapped_copy("s", "M"), s, "t0", "eos")
    return Program("gsa_gate_pass", [s_view, gc_view, w_view], b.body).verify()


def state_pass(spec: Spec) -> Program:
    """Programs i_t < NK carry Hk rows k0:k0+BK; the others carry Hv columns v0:v0+BV. Each step reads the
    gate pass's w tile (pipelined with k or v) and b_last row: no gate arithmetic on the sequential path.
    b_last of the next chunk is loaded one step ahead (a [BM] row is not pipelined by the compiler, and
    its latency would otherwise add to every step)."""
    b = Builder()
    k_view, v_view, w_view = seq_view("k", "K"), seq_view("v", "V"), seq_view("w", "M")

    def chunk_loop(store_state, update):
        """The sequential walk: store the chunk-start state (unless spec.chunk_states is off), then
        update(w, b_last) the state."""
        total = b.load("g_total", chunk_total("0"), "0", "n_chunks", ("BM",))
        with b.loop("i_c", "0", "n_chunks"):
            b.map("t0", "bos + i_c * BT", dtype="i64", shape=())
            if spec.chunk_states:
                store_state()
            w = chunk_rows(b, "w_c", w_view)
            ahead = b.load("g_next", chunk_total("i_c + 1"), "i_c + 1", "n_chunks", ("BM",))
            update(w, total)
            b.map("g_total", "{0}", ahead)  # the next step's b_last (the same tile name: loop-carried)

    with b.when("i_t < NK"):
        shape = ("BK", "BM")
        init = View("hk_init_base", "M", "M")
        hk = b.load("hk", init, "k0", "K", shape) if spec.initial_state else b.zeros("hk", shape)

        def update_hk(w, total):
            k = chunk_rows(b, "k_c", k_view, "BK", "k0", "in")
            hk_decayed = b.map("hk", "{0} * tl.exp2({1})", hk, b.expand("b_last", total, "None, :"))
            b.dot("hk", k, w, trans_a=True, acc=hk_decayed)
        chunk_loop(lambda: b.store(chunk_state("hk"), hk, "k0", "K"), update_hk)
        b.store(View("hk_final_base", "M", "M"), hk, "k0", "K")
    with b.when("i_t >= NK"):
        shape = ("BM", "BV")
        init = View("hv_init_base", "V", "V")
        hv = b.load("hv", init, "0", "M", shape, col0="v0") if spec.initial_state else b.zeros("hv", shape)

        def update_hv(w, total):
            v = chunk_rows(b, "v_c", v_view, "BV", "v0", "in")
            hv_decayed = b.map("hv", "{0} * tl.exp2({1})", hv, b.expand("decay_col", total, ":, None"))
            b.dot("hv", w, v, trans_a=True, acc=hv_decayed)
        chunk_loop(lambda: b.store(chunk_state("hv"), hv, "0", "M", col0="v0"), update_hv)
        b.store(View("hv_final_base", "V", "V"), hv, "0", "M", col0="v0")
    return Program("gsa_state_pass", [k_view, v_view, w_view], b.body).verify()


def output_pass(spec: Spec) -> Program:
    """Per (chunk, query head): x = q Hk_c and a = q k^T (one loop over K), then one of two forms of the
    intra-chunk terms, chosen per chunk by the spread of its gates (blocks.FactoredChunk):
    - factored (the common case): logits, p = softmax and att = sum_m p_t s_j 2^(b_t - b_j) as matrix
      products over the whole chunk;
    - exact, in three phases joined by barriers through f32 scratch rows:
      A. the logits' state and off-diagonal-block terms;
      B. per sub-chunk: the diagonal-block terms, p = softmax, the attention's diagonal blocks (as sweeps
         over the sub-chunk's rows, or pairwise: spec.subchunk, blocks.SubChunk);
      C. att = those blocks + the off-diagonal blocks.
    Both end in o = (p 2^b) Hv_c + att v per V tile."""
    b = Builder()
    q, k, v, o = seq_view("q", "K"), seq_view("k", "K"), seq_view("v", "V"), seq_view("o", "V")
    s_view, gc_view = input_view(spec, "s", "M"), seq_view("gc", "M")
    aqk, loff, pd, attd = (scratch_view(n, c) for n, c in (("aqk", "BT"), ("loff", "M"), ("pd", "M"), ("attd", "BT")))
    gates = ChunkGates(b, s_view, gc_view)
    x, a = chunk_products(b, "l_", q, k, chunk_state("hk"), "K", "BK")

    def write_output(probs, att):
        weights = b.map("pw_c", "{0} * tl.exp2({1})", probs, gates.gc)
        with b.loop("v0", "0", "V", step="BV"):
            out = b.dot("o_c", weights, b.load("hv_tile", chunk_state("hv"), "0", "M", ("BM", "BV"), col0="v0"))
            out = b.dot("o_c", att, chunk_rows(b, "v_c", v, "BV", "v0", "in"), acc=out)
            b.store(o, out, "t0", "eos", col0="v0")

    def exact_form():
        logits = b.map("l_off", "{0} * tl.exp2({1})", x, gates.gc)
        with gates.off_diagonal() as blk:
            logits = gates.gated_rows("l_off", a, logits, blk)
        b.store(aqk, a, "t0", "eos")
        b.store(loff, logits, "t0", "eos")
        b.barrier()
        sub = SubChunk(b, s_view, gc_view, spec.subchunk, unrolled=spec.chunk_size <= UNROLLED_SWEEP_MAX_CHUNK)
        with sub.loop():
            diag, = sub.diagonal_scores([("l_", "a", aqk)])
            probs = softmax_slots(b, b.map("l_i", "{0} + {1}", sub.rows(loff, "l_off_i"), diag))
            b.store(pd, probs, "ts", "eos")
            sub.store_mixes(attention=[("o_", probs, attd)])
        b.barrier()
        probs, att = chunk_rows(b, "p_c", pd), diagonal_blocks(b, "att_c", attd)
        with gates.off_diagonal() as blk:
            att = gates.attention("att_c", probs, att, blk)
        write_output(probs, att)

    def factored_form(factored):
        up, _, s_down = factored.factors()
        logits = factored.gated_rows("l_all", a, b.map("l_inter", "{0} * tl.exp2({1})", x, gates.gc), up, s_down)
        probs = softmax_slots(b, logits, ALL_CHUNK_ROWS)
        write_output(probs, factored.attention("att_all", probs, up, s_down))

    per_chunk_form(b, spec, gates, factored_form, exact_form)
    return Program("gsa_output_pass", [q, k, v, s_view, gc_view, o, aqk, loff, pd, attd], b.body).verify()


def _segment_scan(spec: Spec, reverse: bool) -> Program:
    """The segmented state pass's boundary states (segments.py): per (sequence, kv head, K or V tile),
    state = edge (spec.initial_state: the initial states, reverse: the final states' gradients) or 0; then
    for each segment j in order (reverse: last to first) store state as j's start state (reverse: the
    gradient at j's end) and step: state = 2^(a_j) (.) state + local_j, where local_j is the segment's
    own pass from zero and a_j its total log2 gate, the sum of its chunks' rows of gtot, read BR rows at a
    time. a_j <= 0: no factor exceeds 1. The S + 1 segment bounds are one vector load before the walk, so a
    step's loads (local_j and its gtot rows) go out together: the walk is a chain of S waits for them (session
    21, B1 T32768 H4 K=V=512, S = 8: 15.7 -> 13.1 us forward, 21.8 -> 19.6 reverse, from scalar bounds in
    front of 64-row loads)."""
    b = Builder()
    bounds = b.map("bounds", "tl.load(cut_base + tl.arange(0, SP), mask=tl.arange(0, SP) <= S, other=0)",
                   dtype="i64", shape=("SP",))

    def bound(name: str, index: str):  # element `index` of the bounds, without a load
        return b.reduce(name, b.map(name + "_of", f"tl.where(tl.arange(0, SP) == {index}, {{0}}, 0)", bounds,
                                    dtype="i64"), 0)

    def walk(kind: str, shape, size: str, width: str, row0: str, row_end: str, col0: str, decay_axes: str):
        def state_view(tensor: str, index: str) -> View:  # the [K, M] or [M, V] state `index`, head i_h
            return View(f"({tensor} + ({index} * H + i_h) * {size})", width, width)

        if spec.initial_state:
            state = b.load(kind, state_view(f"edge_{kind[1]}", "i_n"), row0, row_end, shape, col0=col0)
        else:
            state = b.zeros(kind, shape)
        with b.loop("i_j", "0", "S"):
            b.map("j", "S - 1 - i_j" if reverse else "i_j", dtype="i64", shape=())
            b.map("seg", "i_n * S + j", dtype="i64", shape=())
            seg_start, seg_end = bound("seg_start", "j"), bound("seg_end", "j + 1")
            local = b.load(f"local_{kind}", state_view(f"local_{kind[1]}", "seg"), row0, row_end, shape, col0=col0)
            b.store(state_view(f"out_{kind[1]}", "seg"), state, row0, row_end, col0=col0)
            total = b.zeros("a_j", ("BM",))
            with b.loop("r0", seg_start.name, seg_end.name, step="BR"):
                rows = b.load("gtot_rows", View("gtot_base", "H * M", "M"), "r0", seg_end.name, ("BR", "BM"))
                b.map("a_j", "{0} + {1}", total, b.reduce("gtot_sum", rows, 0))
            state = b.map(kind, "{0} * tl.exp2({1}) + {2}", state, b.expand("decay", total, decay_axes), local)

    with b.when("i_t < NK"):
        walk("hk", ("BK", "BM"), "K * M", "M", "k0", "K", "0", "None, :")
    with b.when("i_t >= NK"):
        walk("hv", ("BM", "BV"), "M * V", "V", "0", "M", "v0", ":, None")
    return Program("gsa_segment_scan" + ("_reverse" if reverse else ""), [], b.body).verify()


def segment_scan(spec: Spec) -> Program:
    """Segment start states from the segments' local end states (the forward's scan)."""
    return _segment_scan(spec, reverse=False)


def segment_scan_reverse(spec: Spec) -> Program:
    """Segment end gradients from the segments' local start gradients (the state backward's scan)."""
    return _segment_scan(spec, reverse=True)


segment_scan.template = segment_scan_reverse.template = "segment_scan"  # one frame (codegen.kernel)


FORWARD_PROGRAMS = (gate_pass, state_pass, output_pass)
