"""The GSA backward in the tile IR: three programs after a recomputed forward state pass.

With dl = dL/dlogits (natural units), p the slot probabilities and dp = dL/dp:

1. slot backward (per query head and chunk, parallel): recompute logits and p, compute
        dp = 2^b (do Hv_c^T) + sum_{j<=t} (do_t . v_j) s_j 2^(b_t - b_j)   (gated_scores again)
        dl = p (dp - <p, dp>),   dq = scale * [(dl 2^b) Hk_c^T + sum_{j<=t} att(dl, s)[t, j] k_j]
   and store p, dl and x = logits * dl + p * dp (the gate-gradient terms of this head).
2. state backward (per kv head and K or V tile, chunks in reverse): gradients of the states at each
   chunk's end, summed over the query heads of the group:
        dHk_c = dHk_{c+1} 2^{b_last} + scale * q^T (dl 2^b),   dHv_c = 2^{b_last} dHv_{c+1} + (p 2^b)^T do
   and the initial-state gradients.
3. key backward (per kv head and chunk, parallel), for key rows j, over query rows t >= j:
        dk_j = w_j dHk^T + sum_t att(scale dl, s)[t, j] q_t,  dv_j = w_j dHv + sum_t att(p, s)[t, j] do_t
        ds_j = 2^(B - b_j) (k_j dHk + v_j dHv^T) + sum_t 2^(b_t - b_j) (scale dl_t (q_t.k_j) + p_t (do_t.v_j))
   with w_j = s_j 2^(B - b_j), B = b at the chunk's last row.
The gate gradient follows on the host: dGamma = sum_heads x - s ds (+ final-state terms at each
sequence's last token), dg = reverse cumsum of dGamma over each sequence.
"""
from __future__ import annotations

from .blocks import SubChunk, chunk_state, intra_decay, seq_view, slot_mod_backward, softmax_slots
from .ir import Builder, Program, View
from .spec import Spec


def _group_view(name: str, cols: str, internal: bool = False) -> View:
    """Rows of query head i_h * G + i_g (loops over the query heads of kv head i_h)."""
    if internal:  # contiguous f32 [B, T, HQ, M] buffers of the backward
        return View(f"({name} + (i_b * T * HQ + i_h * G + i_g) * M)", "stride_pt", cols)
    return View(f"({name} + i_b * stride_{name}b + (i_h * G + i_g) * stride_{name}h)", f"stride_{name}t", cols,
                tensor=name)


def slot_backward(spec: Spec) -> Program:
    b = Builder()
    q, k, v, do, dq = (seq_view(n, c) for n, c in (("q", "K"), ("k", "K"), ("v", "V"), ("do", "V"), ("dq", "K")))
    p_view, dl_view, x_view = (seq_view(n, "M", row_stride="stride_pt") for n in ("p", "dl", "x"))
    sub = SubChunk(b, seq_view("s", "M"), seq_view("gc", "M"))
    with b.loop("i_s", "0", "BT // BC"):
        b.map("ts", "t0 + i_s * BC", dtype="i64", shape=())
        gc_i = sub.rows(sub.gc, "gc_i", "ts")
        acc = sub.gated_scores("l_", q, k, chunk_state("hk"), "K", "BK", gc_i)
        probs = softmax_slots(b, acc)
        dp = sub.gated_scores("dp_", do, v, chunk_state("hv", transposed=True), "V", "BV", gc_i)
        mean = b.expand("p_dp", b.reduce("p_dp_sum", b.map("p_times_dp", "{0} * {1}", probs, dp), 1), ":, None")
        dl = b.map("dl_i", "{0} * ({1} - {2})", probs, dp, mean)
        dl = slot_mod_backward(b, spec, acc, dl)
        b.store(p_view, probs, "ts", "eos")
        b.store(dl_view, dl, "ts", "eos")
        b.store(x_view, b.map("x_i", "{0} * scale * {1} + {2} * {3}", acc, dl, probs, dp), "ts", "eos")
        dls = b.map("dls_i", "{0} * scale", dl)
        att_ii = sub.diag_attention("q_", dls, gc_i)
        with b.loop("k0", "0", "K", step="BK"):
            out = sub.gated_mix("q_", dls, gc_i, att_ii, k, chunk_state("hk", transposed=True), "k0", "BK")
            b.store(dq, out, "ts", "eos", col0="k0")
    return Program("gsa_slot_backward", [q, k, v, do, dq, sub.s, sub.gc, p_view, dl_view, x_view], b.body).verify()


def state_backward(spec: Spec) -> Program:
    b = Builder()
    gc_view = seq_view("gc", "M")

    def chunk_gates():
        b.map("i_c", "n_chunks - 1 - i_r", dtype="i32", shape=())
        b.map("t0", "bos + i_c * BT", dtype="i64", shape=())
        gc = b.load("gc_c", gc_view, "t0", "eos", ("BT", "BM"))
        last = b.load("gc_last", gc_view, "tl.minimum(t0 + BT, eos) - 1", "eos", ("BM",))
        return gc, last

    with b.when("i_t < NK"):
        dhk = b.load("dhk", View("dhk_final_base", "M", "M"), "k0", "K", ("BK", "BM"))
        with b.loop("i_r", "0", "n_chunks"):
            gc, last = chunk_gates()
            b.store(chunk_state("dhk"), dhk, "k0", "K")
            dhk = b.map("dhk", "{0} * tl.exp2({1})", dhk, b.expand("last_row", last, "None, :"))
            with b.loop("i_g", "0", "G"):
                q = b.load("q_c", _group_view("q", "K"), "t0", "eos", ("BT", "BK"), col0="k0", dtype="in")
                dl = b.load("dl_c", _group_view("dl", "M", internal=True), "t0", "eos", ("BT", "BM"))
                w = b.map("w", "{0} * tl.exp2({1}) * scale", dl, gc)
                b.dot("dhk", q, w, trans_a=True, acc=dhk)
        b.store(View("dhk_init_base", "M", "M"), dhk, "k0", "K")
    with b.when("i_t >= NK"):
        dhv = b.load("dhv", View("dhv_final_base", "V", "V"), "0", "M", ("BM", "BV"), col0="v0")
        with b.loop("i_r", "0", "n_chunks"):
            gc, last = chunk_gates()
            b.store(chunk_state("dhv"), dhv, "0", "M", col0="v0")
            dhv = b.map("dhv", "{0} * tl.exp2({1})", dhv, b.expand("last_col", last, ":, None"))
            with b.loop("i_g", "0", "G"):
                p = b.load("p_c", _group_view("p", "M", internal=True), "t0", "eos", ("BT", "BM"))
                do = b.load("do_c", _group_view("do", "V"), "t0", "eos", ("BT", "BV"), col0="v0", dtype="in")
                w = b.map("w", "{0} * tl.exp2({1})", p, gc)
                b.dot("dhv", w, do, trans_a=True, acc=dhv)
        b.store(View("dhv_init_base", "V", "V"), dhv, "0", "M", col0="v0")
    return Program("gsa_state_backward", [gc_view], b.body).verify()


def key_backward(spec: Spec) -> Program:
    b = Builder()
    k, v = seq_view("k", "K"), seq_view("v", "V")
    dk, dv, ds_view = seq_view("dk", "K"), seq_view("dv", "V"), seq_view("ds", "M", row_stride="stride_dst")
    q, do = _group_view("q", "K"), _group_view("do", "V")
    p_view, dl_view = _group_view("p", "M", internal=True), _group_view("dl", "M", internal=True)
    sub = SubChunk(b, seq_view("s", "M"), seq_view("gc", "M"))

    def over_queries(body):
        """body(gc_i, diagonal) for query sub-chunk i = j, then each later i, for each query head."""
        with b.loop("i_g", "0", "G"):
            b.map("ts", "tj", dtype="i64", shape=())
            body(gc_j, True)
            with b.loop("i_s", "j_s + 1", "BT // BC"):
                b.map("ts", "t0 + i_s * BC", dtype="i64", shape=())
                body(sub.rows(sub.gc, "gc_i", "ts"), False)

    def attention(name, weights, gc_i, diagonal):
        return sub.diag_attention(name, weights, gc_i) if diagonal else sub.off_diag_attention(name, weights, gc_i)

    with b.loop("j_s", "0", "BT // BC"):
        b.map("tj", "t0 + j_s * BC", dtype="i64", shape=())
        gc_j = sub.rows(sub.gc, "gc_j", "tj")
        last = b.expand("last_row", b.load("gc_last", sub.gc, "tl.minimum(t0 + BT, eos) - 1", "eos", ("BM",)), "None, :")
        to_end = b.map("to_end", "tl.exp2({0} - {1})", last, gc_j)
        w_end = b.map("w_end", "{0} * {1}", sub.rows(sub.s, "s_jj", "tj"), to_end)
        with b.loop("k0", "0", "K", step="BK"):
            dk_j = b.dot("dk_j", w_end, b.load("dhk_t", chunk_state("dhk"), "k0", "K", ("BK", "BM")), trans_b=True)

            def key_grad(gc_i, diagonal):
                dls = b.map("dls_i", "{0} * scale", sub.rows(dl_view, "dl_i", "ts"))
                att = attention("k_", dls, gc_i, diagonal)
                b.dot("dk_j", att, sub.rows(q, "q_i", "ts", "BK", "k0", "in"), trans_a=True, acc=dk_j)
            over_queries(key_grad)
            b.store(dk, dk_j, "tj", "eos", col0="k0")
        with b.loop("v0", "0", "V", step="BV"):
            dv_j = b.dot("dv_j", w_end, b.load("dhv_t", chunk_state("dhv"), "0", "M", ("BM", "BV"), col0="v0"))

            def value_grad(gc_i, diagonal):
                att = attention("v_", sub.rows(p_view, "p_i", "ts"), gc_i, diagonal)
                b.dot("dv_j", att, sub.rows(do, "do_i", "ts", "BV", "v0", "in"), trans_a=True, acc=dv_j)
            over_queries(value_grad)
            b.store(dv, dv_j, "tj", "eos", col0="v0")
        ds = b.zeros("ds_j", ("BC", "BM"))
        with b.loop("k0", "0", "K", step="BK"):
            kj = sub.rows(k, "k_j", "tj", "BK", "k0", "in")
            b.dot("ds_j", kj, b.load("dhk_t", chunk_state("dhk"), "k0", "K", ("BK", "BM")), acc=ds)
        with b.loop("v0", "0", "V", step="BV"):
            vj = sub.rows(v, "v_j", "tj", "BV", "v0", "in")
            b.dot("ds_j", vj, b.load("dhv_t", chunk_state("dhv"), "0", "M", ("BM", "BV"), col0="v0"), trans_b=True, acc=ds)
        ds = b.map("ds_j", "{0} * {1}", ds, to_end)

        def slot_grad(gc_i, diagonal):
            dls = b.map("dls_i", "{0} * scale", sub.rows(dl_view, "dl_i", "ts"))
            probs = sub.rows(p_view, "p_i", "ts")
            qk = sub.pair("qk", q, k, "ts", "tj", "K", "BK")
            dov = sub.pair("dov", do, v, "ts", "tj", "V", "BV")
            if diagonal:
                pairs = [b.expand(n, x, pattern) for n, x, pattern in (
                    ("qk3", qk, ":, :, None"), ("dls3", dls, ":, None, :"),
                    ("dov3", dov, ":, :, None"), ("p3", probs, ":, None, :"))]
                terms = b.map("ds_terms", "({0} * {1} + {2} * {3}) * {4}", *pairs, intra_decay(b, gc_i, "ds_"))
                b.map("ds_j", "{0} + {1}", ds, b.reduce("ds_diag", terms, 0))
            else:
                r = b.expand("ds_r", b.load("ds_ref", sub.gc, "ts - 1", "eos", ("BM",)), "None, :")
                to_r = b.map("to_r", "tl.exp2(tl.minimum({0} - {1}, 0.0))", gc_i, r)
                y = b.dot("ds_y", qk, b.map("dls_r", "{0} * {1}", dls, to_r), trans_a=True)
                y = b.dot("ds_y", dov, b.map("p_r", "{0} * {1}", probs, to_r), trans_a=True, acc=y)
                b.map("ds_j", "{0} + {1} * tl.exp2({2} - {3})", ds, y, r, gc_j)
        over_queries(slot_grad)
        b.store(ds_view, ds, "tj", "eos")
    return Program("gsa_key_backward", [k, v, dk, dv, ds_view, q, do, p_view, dl_view], b.body).verify()


BACKWARD_PROGRAMS = (slot_backward, state_backward, key_backward)
