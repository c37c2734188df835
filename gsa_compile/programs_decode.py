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


def decode_step(spec: Spec) -> Program:
    b = Builder()
    hk_view, hv_view = View("hk_base", "M", "M"), View("hv_base", "V", "V")
    q_view = _token_view("q", "K", "i_h * G", rows="stride_qh")
    o_view = _token_view("o", "V", "i_h * G", rows="stride_oh")
    k_view, v_view, s_view = (_token_view(n, c, "i_h") for n, c in (("k", "K"), ("v", "V"), ("s", "M")))
    gate = gate_view(spec.layout)
    with b.loop("i_tok", "0", "T"):
        b.map("g_base", "g + i_n * stride_gb + i_tok * stride_gt + i_h * stride_gh", dtype="ptr", shape=())
        g_t = b.load("g_t", gate, "0", "1", ("BM",))
        decay = b.map("decay", "tl.exp2({0} * " + LOG2E + ")", g_t)
        if mods.derived_from(spec.mods, "s") == "g":  # s_from_gate: s from the mapped gate, not another map
            s_t = b.derive("s_t", g_t, "s")
        else:
            s_t = b.load("s_t", s_view, "0", "1", ("BM",))
        logits = b.zeros("logits_acc", ("BG", "BM"))
        with b.loop("k0", "0", "K", step="BK"):
            hk = b.load("hk_tile", hk_view, "k0", "K", ("BK", "BM"))
            k_t = b.expand("k_col", b.load("k_t", k_view, "0", "1", ("BK",), col0="k0"), ":, None")
            hk = b.map("hk_tile", "{0} * {1} + {2} * {3}", hk, b.expand("decay_row", decay, "None, :"),
                       k_t, b.expand("s_row", s_t, "None, :"))
            b.store(hk_view, hk, "k0", "K")
            q = b.load("q_g", q_view, "0", "G", ("BG", "BK"), col0="k0")
            terms = b.map("qk_terms", "{0} * {1}", b.expand("q3", q, ":, :, None"), b.expand("hk3", hk, "None, :, :"))
            b.map("logits_acc", "{0} + {1}", logits, b.reduce("qk", terms, 1))
        probs = softmax_slots(b, logits, DECODE_ROWS)
        with b.loop("v0", "0", "V", step="BV"):
            hv = b.load("hv_tile", hv_view, "0", "M", ("BM", "BV"), col0="v0")
            v_t = b.expand("v_row", b.load("v_t", v_view, "0", "1", ("BV",), col0="v0"), "None, :")
            hv = b.map("hv_tile", "{0} * {1} + {2} * {3}", hv, b.expand("decay_col", decay, ":, None"),
                       b.expand("s_col", s_t, ":, None"), v_t)
            b.store(hv_view, hv, "0", "M", col0="v0")
            terms = b.map("pv_terms", "{0} * {1}", b.expand("p3", probs, ":, :, None"), b.expand("hv3", hv, "None, :, :"))
            b.store(o_view, b.reduce("o_g", terms, 1), "0", "G", col0="v0")
    return Program("gsa_decode_step", [q_view, k_view, v_view, s_view, gate, o_view], b.body).verify()
