"""The GSA backward in the tile IR: three programs after a recomputed forward state pass.

With dl = dL/dlogits (natural units), p the slot probabilities and dp = dL/dp:

1. slot backward (per query head and chunk, parallel; the factored or the exact form per chunk, as the
   output pass: blocks.FactoredChunk): recompute logits and p, compute
        dp = 2^b (do Hv_c^T) + sum_{j<=t} (do_t . v_j) s_j 2^(b_t - b_j)   (gated_scores again)
        dl = p (dp - <p, dp>),   dq = scale * [(dl 2^b) Hk_c^T + sum_{j<=t} att(dl, s)[t, j] k_j]
   and store x = logits * dl + p * dp (the gate-gradient terms of this head), the chunk's attention
   matrix att(scale dl, s) for the key backward, and the state backward's weighted rows
   pw = p 2^b and dlw = scale dl 2^b (in the p and dl buffers, which phases B and C used as scratch).
2. state backward (per kv head and K or V tile, chunks in reverse): gradients of the states at each
   chunk's end, summed over the query heads of the group:
        dHk_c = dHk_{c+1} 2^{b_last} + q^T dlw,   dHv_c = 2^{b_last} dHv_{c+1} + pw^T do
   and the initial-state gradients. Each step is loads, one rescale and the products: the weights
   come ready from the parallel slot backward (as the forward's state pass gets w from its gate pass).
3. key backward (per kv head and chunk, parallel), for key rows j, over query rows t >= j:
        dk_j = w_j dHk^T + sum_t att(scale dl, s)[t, j] q_t,  dv_j = w_j dHv + sum_t att(p, s)[t, j] do_t
        ds_j = 2^(B - b_j) (k_j dHk + v_j dHv^T) + sum_t 2^(b_t - b_j) (scale dl_t (q_t.k_j) + p_t (do_t.v_j))
   with w_j = s_j 2^(B - b_j), B = b at the chunk's last row. The slot backward leaves it the two
   attention matrices and the last sum (per query head), so this pass is chunk-level products only.
4. gate backward (per kv head and chunk, parallel; two launches): dGamma = sum_heads x - s ds, the
   gradient w.r.t. the cumulative log gate, and dg_t = sum_{t' >= t in the sequence} dGamma_t' (+ the
   final-state terms, which join at the sequence's last token). The first launch stores each chunk's sum
   of dGamma; the host turns those (a tensor BT times smaller) into `later`, each chunk's sum over the
   later chunks of its sequence plus the final-state terms; the second adds its suffix sums inside the
   chunk and writes dg and ds in their output dtypes. (On the host, ~8 torch kernels over [B, T, H, M] f32
   tensors took 0.29 ms at B8 T2048 H16 M64 on the H200, these 0.14 + the scan's 0.04; and a batch row's
   dg depended on the batch's size: bench/NOTES.md, session 12.)
"""
from __future__ import annotations

from .blocks import (ALL_CHUNK_ROWS, CHUNK_ROWS, ChunkGates, SubChunk, chunk_products, chunk_row, chunk_rows,
                     chunk_state, diagonal_blocks, input_view, last_row, per_chunk_form, scratch_view, seq_view,
                     slot_mod_backward, softmax_slots)
from .ir import Builder, Program, View
from .spec import Spec


def _group_view(name: str, cols: str, internal: bool = False) -> View:
    """Rows of query head i_h * G + i_g (loops over the query heads of kv head i_h)."""
    if internal:  # contiguous [B, T, HQ, cols] buffers of the backward (cols M or BT; f32 or launch.operand_rows)
        stride = "stride_pt" if cols == "M" else "stride_at"
        return View(f"({name} + (i_b * T * HQ + i_h * G + i_g) * {cols})", stride, cols)
    return View(f"({name} + i_b * stride_{name}b + (i_h * G + i_g) * stride_{name}h)", f"stride_{name}t", cols,
                tensor=name)


def slot_backward(spec: Spec) -> Program:
    """The forms as in the forward's output pass, with dp beside the logits. The factored form: logits and
    dp (tf32 products), p, dl, x, att(dl), att(p) and ds as products over the chunk. The exact form's phases:
    A. q Hk, q k^T, do Hv^T, do v^T; the state and off-diagonal-block terms of logits and dp;
    B. per sub-chunk: the diagonal-block terms, p, dl, x and the diagonal blocks of att(dl), att(p), ds;
    C. their off-diagonal blocks; dq = (scale dl 2^b) Hk_c^T + att(scale dl) k per K tile.
    Both also store the chunk's sum of x over its rows (x_sum: the gate gradient's chunk totals)."""
    b = Builder()
    q, k, v, do, dq = (seq_view(n, c) for n, c in (("q", "K"), ("k", "K"), ("v", "V"), ("do", "V"), ("dq", "K")))
    s_view, gc_view = input_view(spec, "s", "M"), seq_view("gc", "M")
    p_view, dl_view, x_view = (seq_view(n, "M", row_stride="stride_pt") for n in ("p", "dl", "x"))
    x_sum_view = View("(x_sum + ((boc + i_c) * HQ + i_hq) * M)", "0", "M")  # [chunk rows, HQ, M]
    att_dl, att_p, dsi = scratch_view("att", "BT"), scratch_view("att_p", "BT"), scratch_view("dsi", "M")
    aqk, adov, loff, dpoff, attd, attd_p, dsd = (scratch_view(n, c) for n, c in (
        ("aqk", "BT"), ("adov", "BT"), ("loff", "M"), ("dpoff", "M"), ("attd", "BT"), ("attd_p", "BT"), ("dsd", "M")))
    gates = ChunkGates(b, s_view, gc_view)
    # V's products first, then K's, whose tiles (k and the chunk's Hk) dq reads again, last tile first: the K
    # loop's tiles are then the most recently read when dq asks for them again (L2 rather than DRAM)
    xdp, dov = chunk_products(b, "dp_", do, v, chunk_state("hv", transposed=True), "V", "BV")
    xl, qk = chunk_products(b, "l_", q, k, chunk_state("hk"), "K", "BK")

    def finish(probs, dls, mix_dl, mix_p, ds):
        """Store the key backward's rows and the state backward's weights; dq per K tile."""
        for view, tile in ((att_dl, mix_dl), (att_p, mix_p), (dsi, ds)):
            b.store(view, tile, "t0", "eos")
        weights = b.map("dlw_c", "{0} * tl.exp2({1})", dls, gates.gc)
        b.store(dl_view, weights, "t0", "eos")  # the state backward's dlw and pw
        b.store(p_view, b.map("pw_c", "{0} * tl.exp2({1})", probs, gates.gc), "t0", "eos")
        with b.loop("i_k", "0", "tl.cdiv(K, BK)"):
            b.map("k0", "(tl.cdiv(K, BK) - 1 - i_k) * BK", dtype="i32", shape=())
            hk_t = b.load("hk_t", chunk_state("hk", transposed=True), "0", "M", ("BM", "BK"), col0="k0")
            out = b.dot("dq_c", weights, hk_t)
            out = b.dot("dq_c", mix_dl, chunk_rows(b, "k_c", k, "BK", "k0", "in"), acc=out)
            b.store(dq, out, "t0", "eos", col0="k0")

    def slot_gradients(acc, probs, dp, index, rows):
        """dl = p (dp - <p, dp>) through the slot_mod, and x, stored from row `rows` on (with the chunk's rows,
        "t0", also their sum); returns dl."""
        mean = b.expand("p_dp", b.reduce("p_dp_sum", b.map("p_times_dp", "{0} * {1}", probs, dp), 1), ":, None")
        suffix = "i" if rows == "ts" else "all"  # a sub-chunk's rows or the chunk's
        dl = b.map("dl_" + suffix, "{0} * ({1} - {2})", probs, dp, mean)
        dl = slot_mod_backward(b, spec, acc, dl, index, rows)
        x = b.map("x_" + suffix, "{0} * scale * {1} + {2} * {3}", acc, dl, probs, dp)
        b.store(x_view, x, rows, "eos")
        if rows == "t0":
            store_x_sum(b.map("x_rows", "tl.where((t0 + tl.arange(0, BT))[:, None] < eos, {0}, 0.0)", x))
        return dl

    def store_x_sum(x):
        """The chunk's sum of x over its rows (the gate gradient's later-chunk sums read it)."""
        b.store(x_sum_view, b.reduce("x_row_sum", x, 0), "t0", "eos")

    def exact_form():
        logits = b.map("l_off", "{0} * tl.exp2({1})", xl, gates.gc)
        dp = b.map("dp_off", "{0} * tl.exp2({1})", xdp, gates.gc)
        with gates.off_diagonal() as blk:
            logits = gates.gated_rows("l_off", qk, logits, blk)
            dp = gates.gated_rows("dp_off", dov, dp, blk)
        for view, tile in ((aqk, qk), (adov, dov), (loff, logits), (dpoff, dp)):
            b.store(view, tile, "t0", "eos")
        b.barrier()
        sub = SubChunk(b, s_view, gc_view, spec.subchunk)  # a loop: unrolled, the slot backward was slower
        with sub.loop():
            l_diag, dp_diag = sub.diagonal_scores([("l_", "qk", aqk), ("dp_", "dov", adov)])
            acc = b.map("l_i", "{0} + {1}", sub.rows(loff, "l_off_i"), l_diag)
            probs = softmax_slots(b, acc)
            dp = b.map("dp_i", "{0} + {1}", sub.rows(dpoff, "dp_off_i"), dp_diag)
            dl = slot_gradients(acc, probs, dp, CHUNK_ROWS, "ts")
            # p and dl in f32 for phase C, over the rows of loff and dpoff this sub-chunk has read (p and dl
            # themselves may be half precision): every thread's reads are done at the barrier
            b.barrier()
            b.store(loff, probs, "ts", "eos")
            b.store(dpoff, dl, "ts", "eos")
            dls = b.map("dls_i", "{0} * scale", dl)
            sub.store_mixes(attention=[("q_", dls, attd), ("v_", probs, attd_p)],
                            key_scores=("ds", dsd, [("qk", aqk, dls), ("dov", adov, probs)]))
        b.barrier()
        store_x_sum(chunk_rows(b, "x_c", x_view))  # (rows past eos load 0)
        probs = chunk_rows(b, "p_c", loff)
        dls = b.map("dls_c", "{0} * scale", chunk_rows(b, "dl_c", dpoff))
        mix_dl, mix_p = diagonal_blocks(b, "att_dl_c", attd), diagonal_blocks(b, "att_p_c", attd_p)
        qk_c, dov_c = chunk_rows(b, "qk_c", aqk, "BT"), chunk_rows(b, "dov_c", adov, "BT")
        ds = chunk_rows(b, "ds_c", dsd)
        with gates.off_diagonal() as blk:
            mix_dl = gates.attention("att_dl_c", dls, mix_dl, blk)
            mix_p = gates.attention("att_p_c", probs, mix_p, blk)
            ds = gates.gated_cols("ds_c", qk_c, dls, ds, blk)
            ds = gates.gated_cols("ds_c", dov_c, probs, ds, blk)
        finish(probs, dls, mix_dl, mix_p, ds)

    def factored_form(factored):
        up, down, s_down = factored.factors()
        acc = factored.gated_rows("l_all", qk, b.map("l_inter", "{0} * tl.exp2({1})", xl, gates.gc), up, s_down,
                                  precise=True)
        dp = factored.gated_rows("dp_all", dov, b.map("dp_inter", "{0} * tl.exp2({1})", xdp, gates.gc), up, s_down,
                                 precise=True)
        probs = softmax_slots(b, acc, ALL_CHUNK_ROWS)
        dls = b.map("dls_all", "{0} * scale", slot_gradients(acc, probs, dp, ALL_CHUNK_ROWS, "t0"))
        finish(probs, dls, factored.attention("att_dl_all", dls, up, s_down),
               factored.attention("att_p_all", probs, up, s_down),
               factored.key_scores("ds_all", [(qk, dls), (dov, probs)], up, down))

    per_chunk_form(b, spec, gates, factored_form, exact_form)
    return Program("gsa_slot_backward", [q, k, v, do, dq, s_view, gc_view, p_view, dl_view, x_view, att_dl, att_p,
                                         dsi, aqk, adov, loff, dpoff, attd, attd_p, dsd], b.body).verify()


# The state backward's walks (a segment's local run and the chunk-storing one) take two chunks a step up to this
# chunk size (steps of <= 64 rows, those of the forward's first run at chunk 64, 96 % of the copy rate); above it
# the pairs' [2 BT, ..] tiles ask more shared memory than the H200 has at 3 stages (ptxas, chunk 128: 256-360 KB).
PAIRED_WALK_MAX_CHUNK = 32


def state_backward(spec: Spec) -> Program:
    b = Builder()
    gc_view = seq_view("gc", "M")

    # Each chunk's total log2 decay is the last row of its gc, loaded one step ahead: a [BM] row is not
    # pipelined by the compiler, and the rescale that waits for it is on the walk's sequential path (as
    # in the forward's state pass). The walk's first chunk ends at eos; chunk i_c's predecessor at t0 - 1.
    def first_decay():
        return b.load("gc_last", gc_view, "tl.maximum(eos - 1, bos)", "eos", ("BM",))

    def next_decay():
        """This step's chunk; issues the load of the next step's decay (the previous chunk's) and returns it."""
        b.map("i_c", "n_chunks - 1 - i_r", dtype="i32", shape=())
        b.map("t0", "bos + i_c * BT", dtype="i64", shape=())
        return b.load("gc_ahead", gc_view, "tl.maximum(t0 - 1, bos)", "eos", ("BM",))

    def pair_decays(pair: str, hi: str, lo: str):
        """The total decays [BM] of chunks 2 pair + 1 (0 where the segment ends before it) and 2 pair."""
        def last_row_of(chunk_end: str) -> str:
            return f"tl.maximum(tl.minimum(bos + ({chunk_end}) * BT, eos) - 1, bos)"
        b_hi = b.load(hi, gc_view, last_row_of(f"2 * ({pair}) + 2"), "eos", ("BM",))
        b_hi = b.map(hi, f"tl.where(2 * ({pair}) + 1 < n_chunks, {{0}}, 0.0)", b_hi)
        return b_hi, b.load(lo, gc_view, last_row_of(f"2 * ({pair}) + 1"), "eos", ("BM",))

    def paired_walk(state, axes: str, pair_rows, weights_first: bool, store):
        """Two chunks a step (half the sequential steps), chunks 2i + 1 then 2i, from the gradient X at chunk
        2i + 1's end:
            X_mid = 2^(b_hi) X + (chunk 2i + 1's rows)^T weights          (the gradient at chunk 2i's end)
            X    <- 2^(b_hi + b_lo) X + (the pair's rows)^T (weights, chunk 2i + 1's rows times 2^b_lo)
        X_mid only feeds the stores (spec.chunk_states: X at chunk 2i + 1's row where that chunk exists, X_mid
        at chunk 2i's), so each step's chain is one product. Rows past the end load 0; an absent chunk 2i + 1
        has decay 0. pair_rows(): (rows, weights) [2 BT, ..] for query head i_g; the product is rows^T weights
        (dHk) or weights^T rows (dHv, weights_first); store(tile, condition) at chunk row i_c."""
        name = state.name
        b.map("n_pairs", "tl.cdiv(n_chunks, 2)", dtype="i32", shape=())
        b_hi, b_lo = pair_decays("n_pairs - 1", "gc_hi", "gc_lo")
        with b.loop("i_r", "0", "n_pairs"):
            b.map("i_p", "n_pairs - 1 - i_r", dtype="i32", shape=())
            b.map("t0", "bos + i_p * 2 * BT", dtype="i64", shape=())
            hi_next, lo_next = pair_decays("i_p - 1", "gc_hi_ahead", "gc_lo_ahead")  # the next step's, in flight
            hi_decay = b.expand("hi_decay", b_hi, axes)
            middle = None
            if spec.chunk_states:
                b.map("i_c", "2 * i_p + 1", dtype="i32", shape=())
                store(state, "i_c < n_chunks")
                middle = b.map(name + "_mid", "{0} * tl.exp2({1})", state, hi_decay)
            state = b.map(name, "{0} * tl.exp2({1} + {2})", state, hi_decay, b.expand("lo_decay", b_lo, axes))
            lo_row = b.expand("lo_row", b_lo, "None, :")
            with b.loop("i_g", "0", "G"):
                rows, weights = pair_rows()
                if middle is not None:  # (before `scaled`, which takes the weights' name)
                    upper = b.map(weights.name + "_hi", "tl.where(tl.arange(0, 2 * BT)[:, None] >= BT, {0}, 0.0)",
                                  weights)
                    middle = b.dot(middle.name, *((upper, rows) if weights_first else (rows, upper)), trans_a=True,
                                   acc=middle)
                scaled = b.map(weights.name, "tl.where(tl.arange(0, 2 * BT)[:, None] >= BT, {0} * tl.exp2({1}), {0})",
                               weights, lo_row)
                state = b.dot(name, *((scaled, rows) if weights_first else (rows, scaled)), trans_a=True, acc=state)
            if middle is not None:
                b.map("i_c", "2 * i_p", dtype="i32", shape=())
                store(middle, "")
            b.map("gc_hi", "{0}", hi_next)
            b.map("gc_lo", "{0}", lo_next)
        return state

    def pair_load(name, view, cols, col0="0", dtype="f32"):
        return b.load(name, view, "t0", "eos", ("2 * BT", cols), col0=col0, dtype=dtype)

    if spec.chunk_size <= PAIRED_WALK_MAX_CHUNK:
        with b.when("i_t < NK"):
            dhk = b.load("dhk", View("dhk_final_base", "M", "M"), "k0", "K", ("BK", "BM"))
            dhk = paired_walk(dhk, "None, :", lambda: (pair_load("q_c", _group_view("q", "K"), "BK", "k0", "in"),
                                                       pair_load("dlw_c", _group_view("dl", "M", internal=True), "BM")),
                              False, lambda x, when: b.store(chunk_state("dhk"), x, "k0", "K", when=when))
            b.store(View("dhk_init_base", "M", "M"), dhk, "k0", "K")
        with b.when("i_t >= NK"):
            dhv = b.load("dhv", View("dhv_final_base", "V", "V"), "0", "M", ("BM", "BV"), col0="v0")
            dhv = paired_walk(dhv, ":, None", lambda: tuple(reversed((
                pair_load("pw_c", _group_view("p", "M", internal=True), "BM"),
                pair_load("do_c", _group_view("do", "V"), "BV", "v0", "in")))), True,
                lambda x, when: b.store(chunk_state("dhv"), x, "0", "M", col0="v0", when=when))
            b.store(View("dhv_init_base", "V", "V"), dhv, "0", "M", col0="v0")
        return Program("gsa_state_backward", [gc_view], b.body).verify()

    with b.when("i_t < NK"):
        dhk = b.load("dhk", View("dhk_final_base", "M", "M"), "k0", "K", ("BK", "BM"))
        last = first_decay()
        with b.loop("i_r", "0", "n_chunks"):
            ahead = next_decay()
            if spec.chunk_states:  # off in a segmented pass's local run (segments.py)
                b.store(chunk_state("dhk"), dhk, "k0", "K")
            dhk = b.map("dhk", "{0} * tl.exp2({1})", dhk, b.expand("last_row", last, "None, :"))
            with b.loop("i_g", "0", "G"):
                q = chunk_rows(b, "q_c", _group_view("q", "K"), "BK", "k0", "in")
                dlw = chunk_rows(b, "dlw_c", _group_view("dl", "M", internal=True))
                b.dot("dhk", q, dlw, trans_a=True, acc=dhk)
            b.map("gc_last", "{0}", ahead)  # the next step's decay (the same tile name: loop-carried)
        b.store(View("dhk_init_base", "M", "M"), dhk, "k0", "K")
    with b.when("i_t >= NK"):
        dhv = b.load("dhv", View("dhv_final_base", "V", "V"), "0", "M", ("BM", "BV"), col0="v0")
        last = first_decay()
        with b.loop("i_r", "0", "n_chunks"):
            ahead = next_decay()
            if spec.chunk_states:  # off in a segmented pass's local run (segments.py)
                b.store(chunk_state("dhv"), dhv, "0", "M", col0="v0")
            dhv = b.map("dhv", "{0} * tl.exp2({1})", dhv, b.expand("last_col", last, ":, None"))
            with b.loop("i_g", "0", "G"):
                pw = chunk_rows(b, "pw_c", _group_view("p", "M", internal=True))
                do = chunk_rows(b, "do_c", _group_view("do", "V"), "BV", "v0", "in")
                b.dot("dhv", pw, do, trans_a=True, acc=dhv)
            b.map("gc_last", "{0}", ahead)
        b.store(View("dhv_init_base", "V", "V"), dhv, "0", "M", col0="v0")
    return Program("gsa_state_backward", [gc_view], b.body).verify()


def key_backward(spec: Spec) -> Program:
    """Chunk-level products only: the attention matrices and the intra part of ds come from the slot backward.
    Also stores the chunk's sum of s ds over its rows (s_ds_sum: the gate gradient's chunk totals)."""
    b = Builder()
    k, v = seq_view("k", "K"), seq_view("v", "V")
    dk, dv, ds_view = seq_view("dk", "K"), seq_view("dv", "V"), seq_view("ds", "M", row_stride="stride_dst")
    q, do = _group_view("q", "K"), _group_view("do", "V")
    att_dl, att_p, dsi = (_group_view(n, c, internal=True) for n, c in (("att", "BT"), ("att_p", "BT"), ("dsi", "M")))
    s_view, gc_view = input_view(spec, "s", "M"), seq_view("gc", "M")
    last = b.expand("last_row", b.load("gc_last", gc_view, last_row("t0 + BT"), "eos", ("BM",)), "None, :")
    to_end = b.map("to_end", "tl.exp2({0} - {1})", last, chunk_rows(b, "gc_c", gc_view))
    s_c = chunk_rows(b, "s_c", s_view)
    w_end = b.map("w_end", "{0} * {1}", s_c, to_end)
    one_head = spec.group == 1  # then the attention matrices are loaded once, outside the tile loops
    if one_head:
        b.map("i_g", "0", dtype="i32", shape=())
        mixes = {view.name: chunk_rows(b, f"mix_{n}", view, "BT") for n, view in (("dl", att_dl), ("p", att_p))}

    def grouped(out, view, rows, col0, block):
        """out + the sum over the query heads of the group of att_g^T rows_g[:, col0:col0+block]."""
        def add(out):
            mix = mixes[view.name] if one_head else chunk_rows(b, "mix", view, "BT")
            x = chunk_rows(b, "rows_g", rows, block, col0, "in")
            return b.dot(out.name, mix, x, trans_a=True, acc=out)
        if one_head:
            return add(out)
        with b.loop("i_g", "0", "G"):
            return add(out)

    ds = b.zeros("ds_c", ("BT", "BM"))
    with b.loop("k0", "0", "K", step="BK"):
        dhk = b.load("dhk_t", chunk_state("dhk"), "k0", "K", ("BK", "BM"))
        out = grouped(b.dot("dk_c", w_end, dhk, trans_b=True), att_dl, q, "k0", "BK")
        b.store(dk, out, "t0", "eos", col0="k0")
        ds = b.dot("ds_c", chunk_rows(b, "k_c", k, "BK", "k0", "in"), dhk, acc=ds)
    with b.loop("v0", "0", "V", step="BV"):
        dhv = b.load("dhv_t", chunk_state("dhv"), "0", "M", ("BM", "BV"), col0="v0")
        out = grouped(b.dot("dv_c", w_end, dhv), att_p, do, "v0", "BV")
        b.store(dv, out, "t0", "eos", col0="v0")
        ds = b.dot("ds_c", chunk_rows(b, "v_c", v, "BV", "v0", "in"), dhv, trans_b=True, acc=ds)
    ds = b.map("ds_c", "{0} * {1}", ds, to_end)
    with b.loop("i_g", "0", "G"):
        ds = b.map("ds_c", "{0} + {1}", ds, chunk_rows(b, "dsi_g", dsi))
    b.store(ds_view, ds, "t0", "eos")
    b.store(chunk_row("s_ds_sum"), b.reduce("s_ds", b.map("s_times_ds", "{0} * {1}", s_c, ds), 0), "t0", "eos")
    return Program("gsa_key_backward", [k, v, dk, dv, ds_view, q, do, att_dl, att_p, dsi], b.body).verify()


def _gate_gradient_rows(b: Builder, spec: Spec):
    """dGamma [BT, BM] of the chunk: the group's x rows summed, minus s ds (rows past eos load 0)."""
    d = b.zeros("d_c", ("BT", "BM"))
    with b.loop("i_g", "0", "G"):
        b.map("d_c", "{0} + {1}", d, chunk_rows(b, "x_g", _group_view("x", "M", internal=True)))
    s, ds = chunk_rows(b, "s_c", input_view(spec, "s", "M")), chunk_rows(b, "ds_c", seq_view("ds", "M"))
    return b.map("d_c", "{0} - {1} * {2}", d, s, ds), ds


def gate_backward(spec: Spec) -> Program:
    """dg = dGamma's suffix sums inside the chunk + later (the sequence's later chunks, final-state terms),
    and ds, each stored in its output's dtype."""
    b = Builder()
    d, ds = _gate_gradient_rows(b, spec)
    total = b.expand("d_total", b.reduce("d_sum", d, 0), "None, :")
    later = b.expand("later_c", b.load("later_row", chunk_row("later"), "t0", "eos", ("BM",)), "None, :")
    dg = b.map("dg_c", "{0} - {1} + {2} + {3}", total, b.reduce("d_prefix", d, 0, "cumsum"), d, later)
    b.store(seq_view("dg", "M", row_stride="stride_dst"), dg, "t0", "eos")
    b.store(seq_view("ds_out", "M", row_stride="stride_dst"), ds, "t0", "eos")
    return Program("gsa_gate_backward", [], b.body).verify()


def gate_backward_later(spec: Spec) -> Program:
    """`later` of every chunk row of a sequence: the sum of the chunk totals of dGamma (the group's x_sum rows
    minus s_ds_sum's, from the slot and key backwards) over the sequence's later chunks, plus its final-state
    terms, which join at its last token. Per (sequence, kv head, tile of BM slots) a walk over its chunk rows
    from the last, BR at a time: float64 sums (the carry, and each block's inclusive prefix sums subtracted from
    its total), so a dense batch row's dg is the same, bit for bit, as when that row runs alone."""
    b = Builder()
    carry = b.load("carry", View("final_base", "0", "m_left"), "0", "has_final", ("BM",), dtype="f64")
    b.map("n_blocks", "tl.cdiv(eoc - boc, BR)", dtype="i64", shape=())
    with b.loop("i_r", "0", "n_blocks"):
        b.map("r0", "boc + (n_blocks - 1 - i_r) * BR", dtype="i64", shape=())
        s_ds_rows = b.load("s_ds_rows", View("s_ds_base", "H * M", "m_left"), "r0", "eoc", ("BR", "BM"), dtype="f64")
        rows = b.map("rows", "-{0}", s_ds_rows, dtype="f64")
        with b.loop("i_g", "0", "G"):
            x_rows = b.load("x_rows", View("x_sum_base + i_g * M", "HQ * M", "m_left"), "r0", "eoc", ("BR", "BM"),
                            dtype="f64")
            b.map("rows", "{0} + {1}", rows, x_rows, dtype="f64")
        block = b.reduce("block_sum", rows, 0)
        after = b.map("after", "{0} + {1} - {2}", b.expand("carry_row", carry, "None, :"),
                      b.expand("block_row", block, "None, :"), b.reduce("prefix", rows, 0, "cumsum"))
        b.store(View("later_base", "H * M", "m_left"), after, "r0", "eoc")
        b.map("carry", "{0} + {1}", carry, block, dtype="f64")
    return Program("gsa_gate_backward_later", [], b.body).verify()


BACKWARD_PROGRAMS = (slot_backward, state_backward, key_backward)
# Not in BACKWARD_PROGRAMS (whose text a tuned backward entry's hash covers, tuner.kernel_text_hash): these
# two read and write [BT, BM] rows only, whatever the tuned tiles.
GATE_BACKWARD_PROGRAMS = (gate_backward_later, gate_backward)
