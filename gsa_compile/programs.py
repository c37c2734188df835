"""GSA written once in the tile IR: the forward is three programs.

Notation: chunk of BT tokens starting at row `t0`, sub-chunks of BC rows; `b` is the chunk-local
cumulative log2 gate (b_t = log2(e) * sum_{i<=t in chunk} g_i, per slot, f32, non-increasing).

1. state pass   (per kv head, K tile):   Hk_{c+1} = Hk_c * 2^{b_last} + k^T (s * 2^{b_last - b});
                stores every chunk-start Hk_c, the final Hk and the gate cumsum b (gc).
2. slot pass    (per query head, chunk): logits = scale * (2^b * (q Hk_c) + intra), p = softmax_M.
3. output pass  (per query head, V tile): o = (p * 2^b) Hv_c + intra(p, s) v, with Hv carried in
                registers across chunks: Hv_{c+1} = Hv_c * 2^{b_last} + (s * 2^{b_last - b})^T v.

Intra-chunk terms couple rows t >= j through 2^{b_t - b_j}. Between different sub-chunks this is
factored through the reference r = b at the row before sub-chunk i, so both factors are <= 1;
within a sub-chunk it is computed pairwise ([BC, BC, BM]). No exponent is ever positive.

The gate layout is a lowering rule: how a [BT, BM] tile of g is read (`gate_view`).
"""
from __future__ import annotations

from .ir import Builder, Program, View
from .spec import GateLayout, Spec

LOG2E = "1.4426950408889634"


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
    return View("g_base", row_stride, "M", col_stride)


def _seq_view(name):  # q/k/v/s/o/p/gc rows are tokens of the current batch row
    return View(f"{name}_base", f"stride_{name}t", {"q": "K", "k": "K", "v": "V", "o": "V"}.get(name, "M"))


# [K, M] f32 state at the start of chunk i_c of the sequence whose first chunk is row `boc`
CHUNK_STATE = View("(hk_chunks + ((boc + i_c) * H + i_h) * (K * M))", "M", "M")


def state_pass(spec: Spec) -> Program:
    b = Builder()
    k_view, s_view, gc_view = _seq_view("k"), _seq_view("s"), _seq_view("gc")
    hk_final = View("hk_final_base", "M", "M")
    shape_km = ("BK", "BM")
    if spec.initial_state:
        hk = b.load("hk", View("hk_init_base", "M", "M"), "k0", "K", shape_km)
    else:
        hk = b.zeros("hk", shape_km)
    with b.loop("i_c", "0", "n_chunks"):
        b.map("t0", "bos + i_c * BT", dtype="i64", shape=())
        b.store(CHUNK_STATE, hk, "k0", "K")
        g = b.load("g_c", gate_view(spec.layout), "t0", "eos", ("BT", "BM"))
        g2 = b.map("g2", "{0} * " + LOG2E, g)
        gc = b.reduce("gc_c", g2, 0, "cumsum")
        b.store(gc_view, gc, "t0", "eos", when="i_k == 0")
        b_last = b.reduce("b_last", g2, 0, "sum")
        k = b.load("k_c", k_view, "t0", "eos", ("BT", "BK"), col0="k0", dtype="in")
        s = b.load("s_c", s_view, "t0", "eos", ("BT", "BM"))
        last = b.expand("b_last_row", b_last, "None, :")
        w = b.map("w", "{0} * tl.exp2({1} - {2})", s, last, gc)
        hk_decayed = b.map("hk", "{0} * tl.exp2({1})", hk, last)
        b.dot("hk", k, w, trans_a=True, acc=hk_decayed)
    if spec.final_state:
        b.store(hk_final, hk, "k0", "K")
    return Program("gsa_state_pass", [k_view, s_view, gc_view], b.body).verify()


def _intra_decay(b: Builder, gc_i):
    """d[t, j, m] = 2^(b_t - b_j) for j <= t in one sub-chunk, else 0: [BC, BC, BM]."""
    causal = b.map("causal", "(tl.arange(0, BC)[:, None] >= tl.arange(0, BC)[None, :])[:, :, None]",
                   dtype="i1", shape=("BC", "BC", "1"))
    rows = b.expand("gc_rows", gc_i, ":, None, :")
    cols = b.expand("gc_cols", gc_i, "None, :, :")
    return b.map("decay", "tl.where({0}, tl.exp2(tl.minimum({1} - {2}, 0.0)), 0.0)", causal, rows, cols)


def _reference_row(b: Builder, gc_view, ts):
    """r = b at the row just before this sub-chunk (non-increasing b: b_t <= r <= b_j)."""
    r = b.load("r", gc_view, f"{ts} - 1", "eos", ("BM",))
    return b.expand("r_row", r, "None, :")


def slot_pass(spec: Spec) -> Program:
    b = Builder()
    q_view, k_view, s_view, gc_view, p_view = (_seq_view(n) for n in ("q", "k", "s", "gc", "p"))

    def qk(name, tj):  # [BC, BC] = q_i k_j^T over all K tiles
        acc = b.zeros(name, ("BC", "BC"))
        with b.loop("k0", "0", "K", step="BK"):
            qi = b.load("q_i", q_view, "ts", "eos", ("BC", "BK"), col0="k0", dtype="in")
            kj = b.load("k_j", k_view, tj, "eos", ("BC", "BK"), col0="k0", dtype="in")
            b.dot(name, qi, kj, trans_b=True, acc=acc)
        return acc

    with b.loop("i_s", "0", "BT // BC"):
        b.map("ts", "t0 + i_s * BC", dtype="i64", shape=())
        gc_i = b.load("gc_i", gc_view, "ts", "eos", ("BC", "BM"))
        acc = b.zeros("acc", ("BC", "BM"))
        with b.loop("k0", "0", "K", step="BK"):
            qi = b.load("q_i", q_view, "ts", "eos", ("BC", "BK"), col0="k0", dtype="in")
            hk = b.load("hk", CHUNK_STATE, "k0", "K", ("BK", "BM"))
            b.dot("acc", qi, hk, acc=acc)
        acc = b.map("acc", "{0} * tl.exp2({1})", acc, gc_i)
        with b.loop("j_s", "0", "i_s"):
            b.map("tj", "t0 + j_s * BC", dtype="i64", shape=())
            r = _reference_row(b, gc_view, "ts")
            a = qk("a", "tj")
            s_j = b.load("s_j", s_view, "tj", "eos", ("BC", "BM"))
            gc_j = b.load("gc_j", gc_view, "tj", "eos", ("BC", "BM"))
            w = b.map("w", "{0} * tl.exp2({1} - {2})", s_j, r, gc_j)
            inter = b.dot("inter", a, w)
            acc = b.map("acc", "{0} + {1} * tl.exp2(tl.minimum({2} - {3}, 0.0))", acc, inter, gc_i, r)
        a = qk("a_ii", "ts")
        s_i = b.load("s_i", s_view, "ts", "eos", ("BC", "BM"))
        decay = _intra_decay(b, gc_i)
        a3 = b.expand("a3", a, ":, :, None")
        s3 = b.expand("s3", s_i, "None, :, :")
        diag = b.reduce("diag", b.map("terms", "{0} * {1} * {2}", a3, s3, decay), 1)
        acc = b.map("acc", "{0} + {1}", acc, diag)
        valid = b.map("slot_valid", "(tl.arange(0, BM) < M)[None, :]", dtype="i1", shape=("1", "BM"))
        logits = b.map("logits", "tl.where({1}, {0} * scale_log2, float('-inf'))", acc, valid)
        top = b.expand("top", b.reduce("row_max", logits, 1, "max"), ":, None")
        e = b.map("e", "tl.exp2({0} - {1})", logits, top)
        total = b.expand("total", b.reduce("row_sum", e, 1), ":, None")
        probs = b.map("probs", "{0} / {1}", e, total)
        b.store(p_view, probs, "ts", "eos")
    return Program("gsa_slot_pass", [q_view, k_view, s_view, gc_view, p_view], b.body).verify()


def output_pass(spec: Spec) -> Program:
    b = Builder()
    v_view, s_view, gc_view, p_view, o_view = (_seq_view(n) for n in ("v", "s", "gc", "p", "o"))
    shape_mv = ("BM", "BV")
    if spec.initial_state:
        hv = b.load("hv", View("hv_init_base", "V", "V"), "0", "M", shape_mv, col0="v0")
    else:
        hv = b.zeros("hv", shape_mv)
    with b.loop("i_c", "0", "n_chunks"):
        b.map("t0", "bos + i_c * BT", dtype="i64", shape=())
        gc_last = b.load("gc_last", gc_view, "tl.minimum(t0 + BT, eos) - 1", "eos", ("BM",))
        last_col, last_row = b.expand("last_col", gc_last, ":, None"), b.expand("last_row", gc_last, "None, :")
        hv_next = b.map("hv_next", "{0} * tl.exp2({1})", hv, last_col)
        with b.loop("i_s", "0", "BT // BC"):
            b.map("ts", "t0 + i_s * BC", dtype="i64", shape=())
            p_i = b.load("p_i", p_view, "ts", "eos", ("BC", "BM"))
            gc_i = b.load("gc_i", gc_view, "ts", "eos", ("BC", "BM"))
            s_i = b.load("s_i", s_view, "ts", "eos", ("BC", "BM"))
            v_i = b.load("v_i", v_view, "ts", "eos", ("BC", "BV"), col0="v0", dtype="in")
            pq = b.map("p_decayed", "{0} * tl.exp2({1})", p_i, gc_i)
            o = b.dot("o_i", pq, hv)
            with b.loop("j_s", "0", "i_s"):
                b.map("tj", "t0 + j_s * BC", dtype="i64", shape=())
                r = _reference_row(b, gc_view, "ts")
                s_j = b.load("s_j", s_view, "tj", "eos", ("BC", "BM"))
                gc_j = b.load("gc_j", gc_view, "tj", "eos", ("BC", "BM"))
                v_j = b.load("v_j", v_view, "tj", "eos", ("BC", "BV"), col0="v0", dtype="in")
                pr = b.map("p_r", "{0} * tl.exp2(tl.minimum({1} - {2}, 0.0))", p_i, gc_i, r)
                sr = b.map("s_r", "{0} * tl.exp2({1} - {2})", s_j, r, gc_j)
                a = b.dot("a", pr, sr, trans_b=True)
                b.dot("o_i", a, v_j, acc=o)
            decay = _intra_decay(b, gc_i)
            p3 = b.expand("p3", p_i, ":, None, :")
            s3 = b.expand("s3", s_i, "None, :, :")
            a = b.reduce("a_ii", b.map("a3", "{0} * {1} * {2}", p3, s3, decay), 2)
            b.dot("o_i", a, v_i, acc=o)
            b.store(o_view, o, "ts", "eos", col0="v0")
            w = b.map("w", "{0} * tl.exp2({1} - {2})", s_i, last_row, gc_i)
            b.dot("hv_next", w, v_i, trans_a=True, acc=hv_next)
        b.map("hv", "{0}", hv_next)
    if spec.final_state:
        b.store(View("hv_final_base", "V", "V"), hv, "0", "M", col0="v0", when="i_hq % G == 0")
    return Program("gsa_output_pass", [v_view, s_view, gc_view, p_view, o_view], b.body).verify()


FORWARD_PROGRAMS = (state_pass, slot_pass, output_pass)
