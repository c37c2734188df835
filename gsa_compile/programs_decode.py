"""Decode in the tile IR: a few tokens against a state, updated in place.

One program per (sequence, kv head) walks the tokens in order; for each token it updates Hk tile
by tile while accumulating the slot logits of the G query heads of its group, then the softmax,
then updates Hv tile by tile while accumulating the outputs:

    Hk = Hk * e^g[None, :] + k s^T,   p_j = softmax(scale * Hk^T q_j),   Hv = e^g[:, None] Hv + s v^T,
    o_j = Hv^T p_j   for the query heads j of the group.
"""
from __future__ import annotations

from . import mods
from .blocks import LOG2E, softmax_slots
from .ir import Builder, Program, SlotIndex, View
from .programs import gate_view
from .spec import Spec


def _token_view(name: str, cols: str, head: str, rows: str = "") -> View:
    """Token i_tok of the current sequence; rows are heads (the query heads of a group) if `rows`."""
    base = f"({name} + i_n * stride_{name}b + i_tok * stride_{name}t + {head} * stride_{name}h)"
    return View(base, rows or "0", cols, tensor=name)


DECODE_ROWS = SlotIndex(b="i_n", h="(i_h * G + tl.arange(0, BG))[:, None]", t=None)  # rows: the query heads


def _token_gates(b: Builder, spec: Spec, s_view: View):
    """(gate view, e^g, s) of token i_tok; with mods that derive s from the mapped gate (s_from_gate), s is
    derived here, not loaded (every decode program, like the chunked kernels)."""
    derive_s = mods.derived_from(spec.mods, "s") == "g"
    gate = gate_view(spec.layout)
    b.map("g_base", "g + i_n * stride_gb + i_tok * stride_gt + i_h * stride_gh", dtype="ptr", shape=())
    g_t = b.load("g_t", gate, "0", "1", ("BM",))
    decay = b.map("decay", "tl.exp2({0} * " + LOG2E + ")", g_t)
    s_t = b.derive("s_t", g_t, "s") if derive_s else b.load("s_t", s_view, "0", "1", ("BM",))
    return gate, decay, s_t


def _update_keys(b: Builder, hk_view: View, k_view: View, q_view: View, decay, s_t, k_lo: str, k_hi: str):
    """Hk rows [k_lo, k_hi) = Hk * e^g + k s^T, stored in place; returns the slot logits of those rows."""
    logits = b.zeros("logits_acc", ("BG", "BM"))
    with b.loop("k0", k_lo, k_hi, step="BK"):
        hk = b.load("hk_tile", hk_view, "k0", k_hi, ("BK", "BM"))
        k_t = b.expand("k_col", b.load("k_t", k_view, "0", "1", ("BK",), col0="k0"), ":, None")
        hk = b.map("hk_tile", "{0} * {1} + {2} * {3}", hk, b.expand("decay_row", decay, "None, :"),
                   k_t, b.expand("s_row", s_t, "None, :"))
        b.store(hk_view, hk, "k0", k_hi)
        q = b.load("q_g", q_view, "0", "G", ("BG", "BK"), col0="k0")
        terms = b.map("qk_terms", "{0} * {1}", b.expand("q3", q, ":, :, None"), b.expand("hk3", hk, "None, :, :"))
        b.map("logits_acc", "{0} + {1}", logits, b.reduce("qk", terms, 1))
    return logits


def _update_values(b: Builder, hv_view: View, v_view: View, o_view: View, decay, s_t, probs, v_lo: str, v_hi: str):
    """Hv columns [v_lo, v_hi) = e^g Hv + s v^T, stored in place, and the outputs o = Hv^T p of those columns."""
    with b.loop("v0", v_lo, v_hi, step="BV"):
        hv = b.load("hv_tile", hv_view, "0", "M", ("BM", "BV"), col0="v0")
        v_t = b.expand("v_row", b.load("v_t", v_view, "0", "1", ("BV",), col0="v0"), "None, :")
        hv = b.map("hv_tile", "{0} * {1} + {2} * {3}", hv, b.expand("decay_col", decay, ":, None"),
                   b.expand("s_col", s_t, ":, None"), v_t)
        b.store(hv_view, hv, "0", "M", col0="v0")
        terms = b.map("pv_terms", "{0} * {1}", b.expand("p3", probs, ":, :, None"), b.expand("hv3", hv, "None, :, :"))
        b.store(o_view, b.reduce("o_g", terms, 1), "0", "G", col0="v0")


def decode_step(spec: Spec) -> Program:
    b = Builder()
    hk_view, hv_view = View("hk_base", "M", "M"), View("hv_base", "V", "V")
    q_view = _token_view("q", "K", "i_h * G", rows="stride_qh")
    o_view = _token_view("o", "V", "i_h * G", rows="stride_oh")
    k_view, v_view, s_view = (_token_view(n, c, "i_h") for n, c in (("k", "K"), ("v", "V"), ("s", "M")))
    with b.loop("i_tok", "0", "T"):
        gate, decay, s_t = _token_gates(b, spec, s_view)
        logits = _update_keys(b, hk_view, k_view, q_view, decay, s_t, "0", "K")
        probs = softmax_slots(b, logits, DECODE_ROWS)
        _update_values(b, hv_view, v_view, o_view, decay, s_t, probs, "0", "V")
    return Program("gsa_decode_step", [q_view, k_view, v_view, s_view, gate, o_view], b.body).verify()


# ------------------------------------------------------------------------------- split decode (issue 7)
#
# With few (sequence, kv head) pairs (B = 1, H = 4: 4 programs), one program per head is latency-bound:
# it streams 256 KB of fp32 state in and out on one SM. The split decode spreads each head over NS
# programs in two launches, grid (N * H, NS) each:
#
#   decode_keys    program j owns Hk rows [k_lo, k_hi) = [j*KS, min((j+1)*KS, K)), KS = cdiv(K, NS).
#                  For each token: Hk[rows] = Hk[rows] * e^g + k[rows] s^T (stored in place) and the
#                  partial slot logits  part_j = q[rows] . Hk_new[rows]  (G x M, f32) into a scratch
#                  buffer part [N*H, T, NS, G, M].
#   decode_values  program j owns Hv columns [v_lo, v_hi), VS = cdiv(V, NS). For each token: the slot
#                  logits l = sum_j part_j (summed in the order j = 0 .. NS-1 by every program, so all NS
#                  programs compute the same p bit for bit), p = softmax(scale * l) (slot_mod included),
#                  Hv[:, cols] = e^g Hv[:, cols] + s v[cols]^T (stored in place), o[cols] = Hv[:, cols]^T p.
#
# Race analysis (in-place states): in decode_keys each program reads and writes only its own Hk rows,
# and the logits it needs from the other rows come as partial sums through `part`, never from Hk; in
# decode_values each program reads `part` (complete: written by the previous launch on the same stream)
# and reads/writes only its own Hv columns and o columns. No element of Hk, Hv or o is touched by two
# programs of one launch, so in-place update is race-free without a second state buffer and without
# inter-program synchronisation (which the interpreter, running programs one after another, could not
# provide anyway). It also does not read Hk redundantly (the one-launch alternative that recomputes the
# full logits from Hk_old in every program reads Hk NS times and races with the in-place row writes).
#
# Several tokens (T > 1) work unchanged: the state recurrences do not depend on p (only o does), so
# each row block of Hk and each column block of Hv evolves independently over the T tokens; the
# partial logits of every token go to `part`, and decode_values replays the tokens in order.
# Cost: a second launch (~2-3 us inside a CUDA graph) and the scratch (N*H*T*NS*G*M*4 bytes).


def _split_views():
    q_view = View("(q + i_n * stride_qb + i_tok * stride_qt + (i_h * G) * stride_qh)", "stride_qh", "k_hi", tensor="q")
    k_view = View("(k + i_n * stride_kb + i_tok * stride_kt + i_h * stride_kh)", "0", "k_hi", tensor="k")
    v_view = View("(v + i_n * stride_vb + i_tok * stride_vt + i_h * stride_vh)", "0", "v_hi", tensor="v")
    o_view = View("(o + i_n * stride_ob + i_tok * stride_ot + (i_h * G) * stride_oh)", "stride_oh", "v_hi", tensor="o")
    s_view = _token_view("s", "M", "i_h")
    return q_view, k_view, v_view, o_view, s_view


def _part_view(split: str) -> View:
    """Rows (query heads of the group) of the partial logits of split `split` for token i_tok."""
    return View(f"(part + ((i_nh64 * T + i_tok) * NS + {split}) * G * M)", "M", "M")


def decode_keys(spec: Spec) -> Program:
    """Split decode, launch 1 of 2: this program's Hk rows and their partial slot logits (see above)."""
    b = Builder()
    hk_view = View("hk_base", "M", "M")
    q_view, k_view, _, _, s_view = _split_views()
    with b.loop("i_tok", "0", "T"):
        gate, decay, s_t = _token_gates(b, spec, s_view)
        logits = _update_keys(b, hk_view, k_view, q_view, decay, s_t, "k_lo", "k_hi")
        b.store(_part_view("i_s"), logits, "0", "G")
    return Program("gsa_decode_keys", [q_view, k_view, s_view, gate], b.body).verify()


def decode_values(spec: Spec) -> Program:
    """Split decode, launch 2 of 2: the softmax from the partial logits, this program's Hv columns and o columns."""
    b = Builder()
    hv_view = View("hv_base", "V", "v_hi")
    _, _, v_view, o_view, s_view = _split_views()
    with b.loop("i_tok", "0", "T"):
        gate, decay, s_t = _token_gates(b, spec, s_view)
        logits = b.zeros("logits_acc", ("BG", "BM"))
        with b.loop("i_p", "0", "NS", static=True):  # fixed order: every split gets the same p
            part = b.load("part_tile", _part_view("i_p"), "0", "G", ("BG", "BM"))
            b.map("logits_acc", "{0} + {1}", logits, part)
        probs = softmax_slots(b, logits, DECODE_ROWS)
        _update_values(b, hv_view, v_view, o_view, decay, s_t, probs, "v_lo", "v_hi")
    return Program("gsa_decode_values", [v_view, s_view, gate, o_view], b.body).verify()
