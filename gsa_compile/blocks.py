"""Building blocks shared by the forward and backward programs: gated products inside a chunk.

Every intra-chunk term of GSA (and of its gradient) couples a row t and a row j of the same chunk
through 2^(b_t - b_j) per slot, with b the chunk-local cumulative log2 gate. Rows are grouped in
sub-chunks of BC: between sub-chunks i > j the factor is split at r = b(row before sub-chunk i),
so both halves are <= 1; inside a sub-chunk it is computed pairwise as a [BC, BC, BM] tile.

Sub-chunk i has rows ts:ts+BC, sub-chunk j rows tj:tj+BC (tj is defined by the caller's loop).
`prefix` keeps the tile names of different uses in one program apart.
"""
from __future__ import annotations

from . import mods
from .ir import Builder, SlotIndex, View

LOG2E = "1.4426950408889634"


def seq_view(name: str, cols: str, base: str = "", row_stride: str = "") -> View:
    """Token rows of a [.., T, .., cols] tensor for the current batch row and head."""
    return View(base or f"{name}_base", row_stride or f"stride_{name}t", cols, tensor=name)


def chunk_state(kind: str, transposed: bool = False) -> View:
    """The f32 state at the start (or, for gradients, the end) of chunk i_c.

    hk [K, M] / hv [M, V] from `<kind>_chunks`; transposed views read hk^T [M, K] or hv^T [V, M].
    `boc` is the chunk row of the sequence's first chunk.
    """
    rows, cols = {"hk": ("K", "M"), "hv": ("M", "V"), "dhk": ("K", "M"), "dhv": ("M", "V")}[kind]
    base = f"({kind}_chunks + ((boc + i_c) * H + i_h) * ({rows} * {cols}))"
    if transposed:
        return View(base, "1", rows, col_stride=cols)
    return View(base, cols, cols)


def intra_decay(b: Builder, gc_i, p: str = ""):
    """d[t, j, m] = 2^(b_t - b_j) for j <= t inside one sub-chunk, else 0: [BC, BC, BM]."""
    causal = b.map(p + "causal", "(tl.arange(0, BC)[:, None] >= tl.arange(0, BC)[None, :])[:, :, None]",
                   dtype="i1", shape=("BC", "BC", "1"))
    rows = b.expand(p + "gc_rows", gc_i, ":, None, :")
    cols = b.expand(p + "gc_cols", gc_i, "None, :, :")
    return b.map(p + "decay", "tl.where({0}, tl.exp2(tl.minimum({1} - {2}, 0.0)), 0.0)", causal, rows, cols)


def reference_row(b: Builder, gc_view: View, p: str = ""):
    """r = b at the row just before sub-chunk i (b is non-increasing: b_t <= r <= b_j)."""
    return b.expand(p + "r_row", b.load(p + "r", gc_view, "ts - 1", "eos", ("BM",)), "None, :")


class SubChunk:
    def __init__(self, b: Builder, s: View, gc: View):
        self.b, self.s, self.gc = b, s, gc

    def rows(self, view, name, t, cols="BM", col0="0", dtype="f32"):
        return self.b.load(name, view, t, "eos", ("BC", cols), col0=col0, dtype=dtype)

    def pair(self, name, left: View, right: View, ti, tj, dim, block):
        """[BC, BC] = left[ti rows] right[tj rows]^T, summed over `dim` in tiles of `block`."""
        b = self.b
        acc = b.zeros(name, ("BC", "BC"))
        with b.loop(name + "_c0", "0", dim, step=block):
            x = self.rows(left, name + "_l", ti, block, name + "_c0", "in")
            y = self.rows(right, name + "_r", tj, block, name + "_c0", "in")
            b.dot(name, x, y, trans_b=True, acc=acc)
        return acc

    def gated_scores(self, p, left: View, right: View, state: View, dim, block, gc_i):
        """[BC, BM]: 2^b_t (left_t State) + sum_{j<=t} (left_t . right_j) s_j 2^(b_t - b_j).

        (q, k, Hk) gives the slot logits; (do, v, Hv^T) gives dp."""
        b = self.b
        acc = b.zeros(p + "acc", ("BC", "BM"))
        with b.loop(p + "c0", "0", dim, step=block):
            x = self.rows(left, p + "x_i", "ts", block, p + "c0", "in")
            h = b.load(p + "state", state, p + "c0", dim, (block, "BM"))
            b.dot(p + "acc", x, h, acc=acc)
        acc = b.map(p + "acc", "{0} * tl.exp2({1})", acc, gc_i)
        with b.loop("j_s", "0", "i_s"):
            b.map("tj", "t0 + j_s * BC", dtype="i64", shape=())
            r = reference_row(b, self.gc, p)
            a = self.pair(p + "a", left, right, "ts", "tj", dim, block)
            w = b.map(p + "w", "{0} * tl.exp2({1} - {2})", self.rows(self.s, p + "s_j", "tj"), r,
                      self.rows(self.gc, p + "gc_j", "tj"))
            inter = b.dot(p + "inter", a, w)
            acc = b.map(p + "acc", "{0} + {1} * tl.exp2(tl.minimum({2} - {3}, 0.0))", acc, inter, gc_i, r)
        a3 = b.expand(p + "a3", self.pair(p + "a_ii", left, right, "ts", "ts", dim, block), ":, :, None")
        s3 = b.expand(p + "s3", self.rows(self.s, p + "s_i", "ts"), "None, :, :")
        diag = b.reduce(p + "diag", b.map(p + "terms", "{0} * {1} * {2}", a3, s3, intra_decay(b, gc_i, p)), 1)
        return b.map(p + "acc", "{0} + {1}", acc, diag)

    def diag_attention(self, p, weights, gc_i):
        """[BC, BC]: sum_m weights_t[m] s_j[m] 2^(b_t[m] - b_j[m]) for t >= j inside sub-chunk i."""
        b = self.b
        w3 = b.expand(p + "w3", weights, ":, None, :")
        s3 = b.expand(p + "s3", self.rows(self.s, p + "s_i", "ts"), "None, :, :")
        return b.reduce(p + "att_ii", b.map(p + "att3", "{0} * {1} * {2}", w3, s3, intra_decay(b, gc_i, p)), 2)

    def off_diag_attention(self, p, weights, gc_i):
        """[BC, BC] for sub-chunk i against an earlier sub-chunk j (both factors <= 1)."""
        b = self.b
        r = reference_row(b, self.gc, p)
        wr = b.map(p + "w_r", "{0} * tl.exp2(tl.minimum({1} - {2}, 0.0))", weights, gc_i, r)
        sr = b.map(p + "s_r", "{0} * tl.exp2({1} - {2})", self.rows(self.s, p + "s_j", "tj"), r,
                   self.rows(self.gc, p + "gc_j", "tj"))
        return b.dot(p + "att", wr, sr, trans_b=True)

    def gated_mix(self, p, weights, gc_i, att_ii, value: View, state: View, col0, block):
        """[BC, block]: (weights 2^b) State[:, col0:] + sum_{j<=t} att[t, j] value_j.

        (p, Hv, v) gives o; (scale * dlogits, Hk^T, k) gives dq."""
        b = self.b
        h = b.load(p + "state", state, "0", "M", ("BM", block), col0=col0)
        out = b.dot(p + "out", b.map(p + "w_decayed", "{0} * tl.exp2({1})", weights, gc_i), h)
        with b.loop("j_s", "0", "i_s"):
            b.map("tj", "t0 + j_s * BC", dtype="i64", shape=())
            att = self.off_diag_attention(p, weights, gc_i)
            b.dot(p + "out", att, self.rows(value, p + "value_j", "tj", block, col0, "in"), acc=out)
        return b.dot(p + "out", att_ii, self.rows(value, p + "value_i", "ts", block, col0, "in"), acc=out)


CHUNK_ROWS = SlotIndex(b="i_n", h="i_hq", t="(ts - bos + tl.arange(0, BC))[:, None]")  # slot_mod's b, h, t


def softmax_slots(b: Builder, acc, index: SlotIndex = CHUNK_ROWS):
    """p = softmax over the M valid slots of scale * acc (exp2, with scale_log2 = scale * log2 e)."""
    valid = b.map("slot_valid", "(tl.arange(0, BM) < M)[None, :]", dtype="i1", shape=("1", "BM"))
    logits = b.map("logits", "tl.where({1}, {0} * scale_log2, float('-inf'))", acc, valid)
    logits = b.slot_mod("logits", logits, acc, index)  # the Spec's slot_mod, if any (mods.py)
    top = b.expand("top", b.reduce("row_max", logits, 1, "max"), ":, None")
    e = b.map("e", "tl.exp2({0} - {1})", logits, top)
    total = b.expand("total", b.reduce("row_sum", e, 1), ":, None")
    return b.map("probs", "{0} / {1}", e, total)


def slot_mod_backward(b: Builder, spec, acc, dl, index: SlotIndex = CHUNK_ROWS):
    """dl = dL/d(modded logits) -> dL/d(logits) through the Spec's slot_mod (no-op without one).

    Per float captured leaf of the slot_mod, also stores dl * d slot_mod / d leaf into `mod_terms`
    ([B, T, HQ, leaves, M], f32) for the host to scatter into the captured tensors' gradients."""
    n = mods.slot_leaf_count(spec.mods)
    for leaf in range(n):
        term = b.slot_mod(f"mod_term{leaf}", dl, acc, index, mode="term", leaf=leaf)
        b.store(View(f"(mod_terms + ((i_b * T * HQ + i_hq) * {n} + {leaf}) * M)", f"HQ * {n} * M", "M"), term, "ts", "eos")
    return b.slot_mod(dl.name, dl, acc, index, mode="grad")
