"""The fused forward for small heads (K, V <= FUSED_MAX_DIM), opt-in (GSA_FUSED_FORWARD=1) until timed.

One program per (sequence, kv head, BV columns of V) carries Hk [K, M] and its columns of Hv [M, BV] in f32
registers through its chunks: per chunk it writes its columns of o as the output pass does
(programs.chunk_output, from the states it holds), then updates both states as the state pass does (each
program of a head makes the same Hk: the logits need all of it). No chunk states cross HBM: at B8 T2048 H16
K=V=128 M64 the forward's bytes would fall from ~983 MB (gate, state and output passes) to ~0.58 GB (the gate
pass, then q, k, v, s, gc, w read once and o written): bench/NOTES.md, session 21. It needs >= ~100
(sequence, head) pairs to fill an H200 (programs walk their chunks in order), query heads equal to kv heads
(G = 1), and no mods. The operands match the unfused kernels' (the states rounded to the input dtype in the
products, as the bf16 chunk states are), so with one K tile the outputs do too, bit for bit
(tests/test_fused.py). The rare chunks whose gates do not factor (blocks.FactoredChunk) are not done here:
the program stores their start states, and programs.output_pass_exact writes their o (the exact form's
registers counted for the whole kernel: ptxas, sm_90a, K=V=128 M64 bf16, chunk 32, 8 warps, 1 stage: 568 B
of spills with it inside, 208 with the stores instead). The time is not measured yet.
"""
from __future__ import annotations

from .blocks import ChunkGates, chunk_rows, chunk_state, seq_view
from .ir import Builder, Program, View
from .programs import OutputViews, chunk_output, chunk_total
from .spec import Spec

FUSED_MAX_DIM = 128  # K and V up to this: Hk and Hv in f32 are 2 * 128 * M * 4 bytes (64 KB at M = 64)


def eligible(spec: Spec) -> bool:
    """Whether fused_pass can run `spec`'s forward: K, V <= FUSED_MAX_DIM, G = 1, no mods."""
    return spec.K <= FUSED_MAX_DIM and spec.V <= FUSED_MAX_DIM and spec.group == 1 and not spec.mods


def fused_pass(spec: Spec) -> Program:
    """Per (sequence, kv head, V tile): the chunk walk of the state pass with the output pass inside it."""
    b = Builder()
    views, w_view = OutputViews(spec), seq_view("w", "M")
    if spec.initial_state:
        hk = b.load("hk", View("hk_init_base", "M", "M"), "0", "K", ("BK", "BM"))
        hv = b.load("hv", View("hv_init_base", "V", "V"), "0", "M", ("BM", "BV"), col0="v_start")
    else:
        hk, hv = b.zeros("hk", ("BK", "BM")), b.zeros("hv", ("BM", "BV"))
    total = b.load("g_total", chunk_total("0"), "0", "n_chunks", ("BM",))
    with b.loop("i_c", "0", "n_chunks"):
        b.map("t0", "bos + i_c * BT", dtype="i64", shape=())
        gates = ChunkGates(b, views.s, views.gc)
        q = chunk_rows(b, "q_c", views.q, "BK", "0", "in")
        k = chunk_rows(b, "k_c", views.k, "BK", "0", "in")
        x, a = b.dot("l_x_c", q, hk), b.dot("l_a_c", q, k, trans_b=True)

        def store_states():  # a chunk whose gates do not factor: its o comes from programs.output_pass_exact
            b.store(chunk_state("hk"), hk, "0", "K", when="i_v == 0")
            b.store(chunk_state("hv"), hv, "0", "M", col0="v_start")
        chunk_output(b, spec, views, gates, x, a, lambda: hv, ("v_start", "v_start + BV"), exact=store_states)
        w = chunk_rows(b, "w_c", w_view)
        ahead = b.load("g_next", chunk_total("i_c + 1"), "i_c + 1", "n_chunks", ("BM",))  # in flight meanwhile
        hk = b.dot("hk", k, w, trans_a=True,
                   acc=b.map("hk", "{0} * tl.exp2({1})", hk, b.expand("b_last", total, "None, :")))
        v = chunk_rows(b, "v_s", views.v, "BV", "v_start", "in")
        hv = b.dot("hv", w, v, trans_a=True,
                   acc=b.map("hv", "{0} * tl.exp2({1})", hv, b.expand("decay_col", total, ":, None")))
        b.map("g_total", "{0}", ahead)  # the next step's b_last (the same tile name: loop-carried)
    b.store(View("hk_final_base", "M", "M"), hk, "0", "K", when="i_v == 0")
    b.store(View("hv_final_base", "V", "V"), hv, "0", "M", col0="v_start")
    return Program("gsa_fused_pass", views.all() + [w_view], b.body).verify()
