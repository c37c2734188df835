"""GSA written once in the tile IR: the forward is two programs.

Notation: chunk of BT tokens starting at row `t0`, sub-chunks of BC rows; `b` is the chunk-local
cumulative log2 gate (b_t = log2(e) * sum_{i<=t in chunk} g_i, per slot, f32, non-increasing), and
w = s * 2^(b_last - b) is each token's weight in the state at the chunk's end.

1. state pass  (per kv head and K or V tile; sequential over chunks). Both recurrences need only
               k, v, s, g:   Hk_{c+1} = Hk_c * 2^{b_last} + k^T w,   Hv_{c+1} = 2^{b_last} Hv_c + w^T v.
               Stores every chunk-start state, the final states and the gate cumsum b (gc).
2. output pass (per query head and chunk; all chunks in parallel), per sub-chunk:
               logits = scale * (2^b (q Hk_c) + intra(q k^T, s)),  p = softmax_M(logits),
               o = (p 2^b) Hv_c + intra(p s^T) v  -- p stays in registers.

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


def _seq_view(name):  # q/k/v/s/o/gc rows are tokens of the current batch row
    return View(f"{name}_base", f"stride_{name}t", {"q": "K", "k": "K", "v": "V", "o": "V"}.get(name, "M"))


def chunk_state(kind: str) -> View:
    """Chunk-start state of chunk i_c (f32): Hk [K, M] or Hv [M, V]; `boc` is the sequence's first chunk."""
    if kind == "hk":
        return View("(hk_chunks + ((boc + i_c) * H + i_h) * (K * M))", "M", "M")
    return View("(hv_chunks + ((boc + i_c) * H + i_h) * (M * V))", "V", "V")


def state_pass(spec: Spec) -> Program:
    """Programs i_t < NK carry Hk rows k0:k0+BK; the others carry Hv columns v0:v0+BV."""
    b = Builder()
    k_view, v_view, s_view, gc_view = _seq_view("k"), _seq_view("v"), _seq_view("s"), _seq_view("gc")

    def gate_weights():
        g = b.load("g_c", gate_view(spec.layout), "t0", "eos", ("BT", "BM"))
        g2 = b.map("g2", "{0} * " + LOG2E, g)
        gc = b.reduce("gc_c", g2, 0, "cumsum")
        total = b.reduce("g_total", g2, 0, "sum")
        last = b.expand("b_last", total, "None, :")
        s = b.load("s_c", s_view, "t0", "eos", ("BT", "BM"))
        return gc, total, last, b.map("w", "{0} * tl.exp2({1} - {2})", s, last, gc)

    with b.when("i_t < NK"):
        shape = ("BK", "BM")
        init = View("hk_init_base", "M", "M")
        hk = b.load("hk", init, "k0", "K", shape) if spec.initial_state else b.zeros("hk", shape)
        with b.loop("i_c", "0", "n_chunks"):
            b.map("t0", "bos + i_c * BT", dtype="i64", shape=())
            b.store(chunk_state("hk"), hk, "k0", "K")
            gc, total, last, w = gate_weights()
            b.store(gc_view, gc, "t0", "eos", when="i_t == 0")
            k = b.load("k_c", k_view, "t0", "eos", ("BT", "BK"), col0="k0", dtype="in")
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
            gc, total, _, w = gate_weights()
            v = b.load("v_c", v_view, "t0", "eos", ("BT", "BV"), col0="v0", dtype="in")
            hv_decayed = b.map("hv", "{0} * tl.exp2({1})", hv, b.expand("decay_col", total, ":, None"))
            b.dot("hv", w, v, trans_a=True, acc=hv_decayed)
        b.store(View("hv_final_base", "V", "V"), hv, "0", "M", col0="v0")
    return Program("gsa_state_pass", [k_view, v_view, s_view, gc_view], b.body).verify()


def _intra_decay(b: Builder, gc_i):
    """d[t, j, m] = 2^(b_t - b_j) for j <= t in one sub-chunk, else 0: [BC, BC, BM]."""
    causal = b.map("causal", "(tl.arange(0, BC)[:, None] >= tl.arange(0, BC)[None, :])[:, :, None]",
                   dtype="i1", shape=("BC", "BC", "1"))
    rows = b.expand("gc_rows", gc_i, ":, None, :")
    cols = b.expand("gc_cols", gc_i, "None, :, :")
    return b.map("decay", "tl.where({0}, tl.exp2(tl.minimum({1} - {2}, 0.0)), 0.0)", causal, rows, cols)


def _reference_row(b: Builder, gc_view):
    """r = b at the row just before sub-chunk `ts` (b non-increasing, so b_t <= r <= b_j)."""
    return b.expand("r_row", b.load("r", gc_view, "ts - 1", "eos", ("BM",)), "None, :")


class _SubChunk:
    """Loads and products of sub-chunk i (rows ts:ts+BC) against sub-chunk j (rows tj:tj+BC)."""

    def __init__(self, b: Builder):
        self.b = b
        self.q, self.k, self.v, self.s, self.gc = (_seq_view(n) for n in ("q", "k", "v", "s", "gc"))

    def rows(self, view, name, t, cols="BM", col0="0", dtype="f32"):
        return self.b.load(name, view, t, "eos", ("BC", cols), col0=col0, dtype=dtype)

    def qk(self, name, tj):
        """[BC, BC] = q_i k_j^T over all K tiles."""
        b = self.b
        acc = b.zeros(name, ("BC", "BC"))
        with b.loop("k0", "0", "K", step="BK"):
            qi = self.rows(self.q, "q_i", "ts", "BK", "k0", "in")
            kj = self.rows(self.k, "k_j", tj, "BK", "k0", "in")
            b.dot(name, qi, kj, trans_b=True, acc=acc)
        return acc

    def slot_logits(self, gc_i):
        """scale-free logits of sub-chunk i: 2^b (q Hk_c) + sum_{j<=t} (q_t k_j) s_j 2^(b_t - b_j)."""
        b = self.b
        acc = b.zeros("acc", ("BC", "BM"))
        with b.loop("k0", "0", "K", step="BK"):
            qi = self.rows(self.q, "q_i", "ts", "BK", "k0", "in")
            hk = b.load("hk", chunk_state("hk"), "k0", "K", ("BK", "BM"))
            b.dot("acc", qi, hk, acc=acc)
        acc = b.map("acc", "{0} * tl.exp2({1})", acc, gc_i)
        with b.loop("j_s", "0", "i_s"):
            b.map("tj", "t0 + j_s * BC", dtype="i64", shape=())
            r = _reference_row(b, self.gc)
            a = self.qk("a", "tj")
            w = b.map("w", "{0} * tl.exp2({1} - {2})", self.rows(self.s, "s_j", "tj"), r, self.rows(self.gc, "gc_j", "tj"))
            inter = b.dot("inter", a, w)
            acc = b.map("acc", "{0} + {1} * tl.exp2(tl.minimum({2} - {3}, 0.0))", acc, inter, gc_i, r)
        a3 = b.expand("a3", self.qk("a_ii", "ts"), ":, :, None")
        s3 = b.expand("s3", self.rows(self.s, "s_i", "ts"), "None, :, :")
        diag = b.reduce("diag", b.map("terms", "{0} * {1} * {2}", a3, s3, _intra_decay(b, gc_i)), 1)
        return b.map("acc", "{0} + {1}", acc, diag)

    def diag_attention(self, probs, gc_i):
        """[BC, BC]: sum_m p_t[m] s_j[m] 2^(b_t[m] - b_j[m]) for t >= j inside sub-chunk i."""
        b = self.b
        p3 = b.expand("p3", probs, ":, None, :")
        s3 = b.expand("s3", self.rows(self.s, "s_i", "ts"), "None, :, :")
        return b.reduce("pa_ii", b.map("pa3", "{0} * {1} * {2}", p3, s3, _intra_decay(b, gc_i)), 2)

    def output(self, probs, gc_i, pa_ii):
        """o_i[:, v0:v0+BV] = (p 2^b) Hv_c + sum_{j<=t} (sum_m p_t s_j 2^(b_t - b_j)) v_j."""
        b = self.b
        hv = b.load("hv", chunk_state("hv"), "0", "M", ("BM", "BV"), col0="v0")
        o = b.dot("o_i", b.map("p_decayed", "{0} * tl.exp2({1})", probs, gc_i), hv)
        with b.loop("j_s", "0", "i_s"):
            b.map("tj", "t0 + j_s * BC", dtype="i64", shape=())
            r = _reference_row(b, self.gc)
            pr = b.map("p_r", "{0} * tl.exp2(tl.minimum({1} - {2}, 0.0))", probs, gc_i, r)
            sr = b.map("s_r", "{0} * tl.exp2({1} - {2})", self.rows(self.s, "s_j", "tj"), r, self.rows(self.gc, "gc_j", "tj"))
            a = b.dot("a", pr, sr, trans_b=True)
            b.dot("o_i", a, self.rows(self.v, "v_j", "tj", "BV", "v0", "in"), acc=o)
        return b.dot("o_i", pa_ii, self.rows(self.v, "v_i", "ts", "BV", "v0", "in"), acc=o)


def softmax_slots(b: Builder, acc):
    """p = softmax over the M valid slots of scale * acc (exp2 with scale_log2 = scale * log2 e)."""
    valid = b.map("slot_valid", "(tl.arange(0, BM) < M)[None, :]", dtype="i1", shape=("1", "BM"))
    logits = b.map("logits", "tl.where({1}, {0} * scale_log2, float('-inf'))", acc, valid)
    top = b.expand("top", b.reduce("row_max", logits, 1, "max"), ":, None")
    e = b.map("e", "tl.exp2({0} - {1})", logits, top)
    total = b.expand("total", b.reduce("row_sum", e, 1), ":, None")
    return b.map("probs", "{0} / {1}", e, total)


def output_pass(spec: Spec) -> Program:
    b = Builder()
    sub = _SubChunk(b)
    o_view = _seq_view("o")
    with b.loop("i_s", "0", "BT // BC"):
        b.map("ts", "t0 + i_s * BC", dtype="i64", shape=())
        gc_i = sub.rows(sub.gc, "gc_i", "ts")
        probs = softmax_slots(b, sub.slot_logits(gc_i))
        pa_ii = sub.diag_attention(probs, gc_i)
        with b.loop("v0", "0", "V", step="BV"):
            b.store(o_view, sub.output(probs, gc_i, pa_ii), "ts", "eos", col0="v0")
    return Program("gsa_output_pass", [sub.q, sub.k, sub.v, sub.s, sub.gc, o_view], b.body).verify()


FORWARD_PROGRAMS = (state_pass, output_pass)
