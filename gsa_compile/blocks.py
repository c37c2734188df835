"""Building blocks shared by the forward and backward programs: gated products inside a chunk.

Every intra-chunk term of GSA (and of its gradient) couples a row t and a row j <= t of the same
chunk through 2^(b_t - b_j) per slot, with b the chunk-local cumulative log2 gate (non-increasing).
Rows are grouped in sub-chunks of BC; sub-chunk J has chunk rows J*BC .. J*BC + BC - 1.

- Different sub-chunks (j in J, t after J): the factor splits at r_J = b at J's last row,
      2^(b_t - b_j) = after_J[t] * within_J[j],  after_J = 2^(b_t - r_J) <= 1,  within_J = 2^(r_J - b_j) <= 1,
  so these terms are chunk-level matrix products, one per J (`ChunkGates.off_diagonal`).
- The same sub-chunk: exact pairwise factors, summed in a sweep over its rows j (`SubChunk`), reading
  the columns of chunk-level products that the program stored to its f32 scratch rows (Triton cannot
  slice a register tile; a barrier makes the other threads' stores visible).
No exponent is ever positive in that exact form. Most chunks need none of it: where the chunk's gates
span little enough, every pair factors through one reference per slot (`FactoredChunk`, below), with
exponents bounded in magnitude, and the intra-chunk terms are matrix products over the whole chunk.
"""
from __future__ import annotations

import contextlib
import dataclasses

from . import mods
from .ir import Builder, SlotIndex, Tile, View

LOG2E = "1.4426950408889634"
ROWS = "tl.arange(0, BT)[:, None]"  # chunk-local row index of a [BT, ...] tile
INSIDE_J = f"(({ROWS} >= J * BC) & ({ROWS} < (J + 1) * BC))"  # the rows of sub-chunk J


def seq_view(name: str, cols: str, base: str = "", row_stride: str = "") -> View:
    """Token rows of a [.., T, .., cols] tensor for the current batch row and head."""
    return View(base or f"{name}_base", row_stride or f"stride_{name}t", cols, tensor=name)


def input_view(spec, name: str, cols: str) -> View:
    """Token rows of input `name` for a program after the gate pass: where the Spec's mods store its mapped
    value (mods.STORED_MAPS), launch passes the gate pass's copy in its place, read as is (no map)."""
    return dataclasses.replace(seq_view(name, cols), mapped=name in mods.stored(spec.mods))


def mapped_copy(name: str, cols: str) -> View:
    """Where the gate pass stores mapped input `name`: the kernel argument `mapped_<name>`, a contiguous
    [B, T, H, cols] buffer in the input dtype (the kv head's rows, like gc)."""
    return View(f"(mapped_{name} + (i_b * T * H + i_h) * {cols})", f"H * {cols}", cols, tensor=name, mapped=True)


def last_row(end: str) -> str:
    """The chunk's last row before `end`. Never below t0: a program past the last chunk of a packed batch
    has eos = bos (every load masked off) and must not form an address before its tensor (bos - 1 < 0)."""
    return f"tl.maximum(tl.minimum({end}, eos) - 1, t0)"


def chunk_row(tensor: str, i_c: str = "i_c") -> View:
    """Chunk i_c's row [BM] of a [chunk rows, H, M] buffer (indexed like the chunk states)."""
    return View(f"({tensor} + ((boc + {i_c}) * H + i_h) * M)", "0", "M")


def scratch_view(name: str, cols: str) -> View:
    """Rows of a contiguous f32 buffer [B, T, heads, cols] (cols M or BT) for this program's head."""
    return View(f"{name}_base", "stride_pt" if cols == "M" else "stride_at", cols)


def chunk_state(kind: str, transposed: bool = False) -> View:
    """The state at the start (or, for gradients, the end) of chunk i_c.

    hk [K, M] / hv [M, V] from `<kind>_chunks`; transposed views read hk^T [M, K] or hv^T [V, M].
    `boc` is the chunk row of the sequence's first chunk.
    """
    rows, cols = {"hk": ("K", "M"), "hv": ("M", "V"), "dhk": ("K", "M"), "dhv": ("M", "V")}[kind]
    base = f"({kind}_chunks + ((boc + i_c) * H + i_h) * ({rows} * {cols}))"
    if transposed:
        return View(base, "1", rows, col_stride=cols)
    return View(base, cols, cols)


def chunk_rows(b: Builder, name: str, view: View, cols: str = "BM", col0: str = "0", dtype: str = "f32"):
    return b.load(name, view, "t0", "eos", ("BT", cols), col0=col0, dtype=dtype)


def chunk_products(b: Builder, p: str, left: View, right: View, state: View, dim: str, block: str):
    """left_c State [BT, BM] and left_c right_c^T [BT, BT] for the chunk, in one loop over `dim`."""
    inter, pairs = b.zeros(p + "x_c", ("BT", "BM")), b.zeros(p + "a_c", ("BT", "BT"))
    with b.loop(p + "c0", "0", dim, step=block):
        x = chunk_rows(b, p + "left_c", left, block, p + "c0", "in")
        y = chunk_rows(b, p + "right_c", right, block, p + "c0", "in")
        h = b.load(p + "state", state, p + "c0", dim, (block, "BM"))
        b.dot(p + "x_c", x, h, acc=inter)
        b.dot(p + "a_c", x, y, trans_b=True, acc=pairs)
    return inter, pairs


class ChunkGates:
    """The chunk's gate tiles b (gc_c) and s (s_c), [BT, BM], and the factors between sub-chunks."""

    def __init__(self, b: Builder, s: View, gc: View):
        self.b, self.s_view, self.gc_view = b, s, gc
        self.gc = chunk_rows(b, "gc_c", gc)
        self.s = chunk_rows(b, "s_c", s)

    @contextlib.contextmanager
    def off_diagonal(self):
        """A static loop over the sub-chunks J but the last; yields J's factors (`Block`)."""
        b = self.b
        with b.loop("J", "0", "BT // BC - 1", static=True):
            last = b.load("r_J", self.gc_view, last_row("t0 + (J + 1) * BC"), "eos", ("BM",))
            r = b.expand("r_row", last, "None, :")
            within = b.map("s_within", f"tl.where({INSIDE_J}, {{0}} * tl.exp2(tl.minimum({{1}} - {{2}}, 0.0)), 0.0)",
                           self.s, r, self.gc)
            after = b.map("after", f"tl.where({ROWS} >= (J + 1) * BC, tl.exp2(tl.minimum({{0}} - {{1}}, 0.0)), 0.0)",
                          self.gc, r)
            yield Block(r, within, after)

    def gated_rows(self, name, pairs, acc, blk: "Block"):
        """acc[t] += sum_{j in J} pairs[t, j] s_j 2^(b_t - b_j) for the rows t after J."""
        b = self.b
        return b.map(name, "{0} + {1} * {2}", acc, b.dot(name + "_J", pairs, blk.s_within), blk.after)

    def gated_cols(self, name, pairs, weights, acc, blk: "Block"):
        """acc[j] += sum_{t after J} pairs[t, j] weights_t 2^(b_t - b_j) for the rows j in J."""
        b = self.b
        y = b.dot(name + "_J", pairs, b.map(name + "_after", "{0} * {1}", weights, blk.after), trans_a=True)
        return b.map(name, f"{{0}} + tl.where({INSIDE_J}, {{1}} * tl.exp2(tl.minimum({{2}} - {{3}}, 0.0)), 0.0)",
                     acc, y, blk.r, self.gc)

    def attention(self, name, weights, acc, blk: "Block"):
        """acc[t, j] += sum_m weights_t[m] s_j[m] 2^(b_t - b_j)[m] for the rows t after J, j in J."""
        b = self.b
        weighted = b.map(name + "_after", "{0} * {1}", weights, blk.after)
        return b.map(name, "{0} + {1}", acc, b.dot(name + "_J", weighted, blk.s_within, trans_b=True))


@dataclasses.dataclass
class Block:
    """Sub-chunk J's factors: r = b at its last row [1, BM]; s_within = s 2^(r - b) on J's rows, 0
    elsewhere; after = 2^(b - r) on the rows after J, 0 elsewhere (both [BT, BM])."""
    r: Tile
    s_within: Tile
    after: Tile


def diagonal_blocks(b: Builder, name: str, view: View):
    """A [BT, BT] scratch matrix of which only the causal parts of the BC x BC diagonal blocks were stored."""
    x = chunk_rows(b, name, view, "BT")
    cols = "tl.arange(0, BT)[None, :]"
    return b.map(name, f"tl.where(({cols} // BC == {ROWS} // BC) & ({cols} <= {ROWS}), {{0}}, 0.0)", x)


def intra_decay(b: Builder, gc_i, p: str = ""):
    """d[t, j, m] = 2^(b_t - b_j) for j <= t inside one sub-chunk, else 0: [BC, BC, BM]."""
    causal = b.map(p + "causal", "(tl.arange(0, BC)[:, None] >= tl.arange(0, BC)[None, :])[:, :, None]",
                   dtype="i1", shape=("BC", "BC", "1"))
    rows = b.expand(p + "gc_rows", gc_i, ":, None, :")
    cols = b.expand(p + "gc_cols", gc_i, "None, :, :")
    return b.map(p + "decay", "tl.where({0}, tl.exp2(tl.minimum({1} - {2}, 0.0)), 0.0)", causal, rows, cols)


@dataclasses.dataclass
class Column:
    """Row j of a sub-chunk in a sweep (`SubChunk.columns`): s_j [1, BM] and decay [BC, BM], 2^(b_t - b_j)
    for the sub-chunk's rows t >= j, 0 for t < j."""
    s: Tile
    decay: Tile


# the output pass's sweep is unrolled up to this chunk size: faster at 32 on the H200 (0.667 against 0.852 ms
# as a loop, bench/NOTES.md session 11); at chunk 64 ptxas (bench/ptxas_report.py, B8 T2048 H16 K=V=128)
# gives the unrolled form 132 B of spills against 44 and 136 s of compile against 22, at 128 567 s against 90
UNROLLED_SWEEP_MAX_CHUNK = 32


class SubChunk:
    """Rows ts:ts+BC of sub-chunk J (a static loop over J opened by `loop`) and their pairwise terms, in
    one of two forms (`form`, Spec.subchunk) with the same terms:
    - "pairwise": [BC, BC, BM] tiles, one product each (`scores`, `attention`, `key_scores`);
    - "sweep": BC steps over the sub-chunk's rows j (`columns`), each of [BC, BM] terms in the registers'
      own layout, unrolled (`unrolled`) or as a loop.
    On the H200 (sessions 9 and 11, bench/NOTES.md) the pairwise tiles' broadcasts and reductions go through
    shared memory (the output pass at B8 T2048 H16 K=V=128: shared-memory wavefronts 79 % of peak); the
    sweep took that output pass from 0.964 to 0.671 ms (unrolled) and the slot backward from 1.47 to 1.30
    ms (a loop: unrolled, 1.75). In the Triton interpreter the sweep costs ~2-3x the pairwise form (many
    small operations)."""

    def __init__(self, b: Builder, s: View, gc: View, form: str, unrolled: bool = False):
        self.b, self.s, self.gc = b, s, gc
        self.sweep, self.unrolled = form == "sweep", unrolled

    @contextlib.contextmanager
    def loop(self):
        """The static loop over the sub-chunks J (J's rows' gates: gc_i [BC, BM])."""
        with self.b.loop("J", "0", "BT // BC", static=True):
            self.b.map("ts", "t0 + J * BC", dtype="i64", shape=())
            self.gc_i = self.rows(self.gc, "gc_i", "ts")
            self._pairwise, self._blocks = None, {}
            yield

    def rows(self, view, name, t="ts", cols="BM", col0="0", dtype="f32"):
        return self.b.load(name, view, t, "eos", ("BC", cols), col0=col0, dtype=dtype)

    def diagonal_scores(self, products):
        """products [(prefix, name, view)], view a [BT, BT] scratch matrix of pairs: per product, [BC, BM]:
        sum_{j <= t in the sub-chunk} pairs[t, j] s_j 2^(b_t - b_j)."""
        b = self.b
        if self.sweep:
            accs = [b.zeros(p + "diag", ("BC", "BM")) for p, _, _ in products]
            with self.columns() as col:
                accs = [self.column_score(p + "diag", acc, self.column(name + "_j", view), col)
                        for acc, (p, name, view) in zip(accs, products)]
            return accs
        s3, decay = self.pairwise()
        return [self.scores(p, self.block(name, view), s3, decay) for p, name, view in products]

    def store_mixes(self, attention, key_scores=None):
        """attention [(prefix, weights [BC, BM], view)]: per item, the [BC, BC] diagonal block of
        sum_m weights_t[m] s_j[m] 2^(b_t - b_j)[m] (j <= t) into columns J * BC.. of the [BT, BT] view;
        key_scores (name, view, [(pairs name, pairs view, weights)]): for key rows j, [BM]:
        sum_{t >= j} sum over the items of pairs[t, j] weights_t 2^(b_t - b_j), into rows of the [BT, BM] view."""
        b = self.b
        name, key_view, items = key_scores or (None, None, ())
        if self.sweep:
            with self.columns() as col:
                for p, weights, view in attention:
                    self.store_column(view, self.column_attention(p + "att_j", weights, col))
                if items:
                    args = [x for pairs, pairs_view, weights in items
                            for x in (self.column(pairs + "_j", pairs_view), weights)]
                    expr = " + ".join(f"{{{2 * i}}} * {{{2 * i + 1}}}" for i in range(len(items)))
                    self.store_row(key_view, self.column_key_score(name + "_j", b.map(name + "_w", expr, *args), col))
            return
        s3, decay = self.pairwise()
        for p, weights, view in attention:
            b.store(view, self.attention(p, weights, s3, decay), "ts", "eos", col0="J * BC")
        if items:
            terms = [self.key_scores(f"{name}{i}_", self.block(pairs, pairs_view), weights, decay)
                     for i, (pairs, pairs_view, weights) in enumerate(items)]
            b.store(key_view, b.map(name + "_i", " + ".join(f"{{{i}}}" for i in range(len(terms))), *terms), "ts", "eos")

    # the pairwise form
    def pairwise(self):
        """(s3 [1, BC, BM], decay [BC, BC, BM]) of the sub-chunk, made once per J."""
        if self._pairwise is None:
            self._pairwise = (self.b.expand("s3", self.rows(self.s, "s_i", "ts"), "None, :, :"),
                              intra_decay(self.b, self.gc_i))
        return self._pairwise

    def block(self, name, view):
        """The [BC, BC] diagonal block of a [BT, BT] scratch matrix (name_ii), loaded once per J."""
        if name not in self._blocks:
            self._blocks[name] = self.b.load(name + "_ii", view, "ts", "eos", ("BC", "BC"), col0="J * BC")
        return self._blocks[name]

    def scores(self, p, pairs_ii, s3, decay):
        """[BC, BM]: sum_{j <= t in the sub-chunk} pairs[t, j] s_j 2^(b_t - b_j)."""
        b = self.b
        terms = b.map(p + "terms", "{0} * {1} * {2}", b.expand(p + "a3", pairs_ii, ":, :, None"), s3, decay)
        return b.reduce(p + "diag", terms, 1)

    def attention(self, p, weights, s3, decay):
        """[BC, BC]: sum_m weights_t[m] s_j[m] 2^(b_t[m] - b_j[m]) for j <= t in the sub-chunk."""
        b = self.b
        return b.reduce(p + "att_ii", b.map(p + "att3", "{0} * {1} * {2}", b.expand(p + "w3", weights, ":, None, :"),
                                            s3, decay), 2)

    def key_scores(self, p, pairs_ii, weights, decay):
        """[BC, BM] for key rows j: sum_{t >= j in the sub-chunk} pairs[t, j] weights_t 2^(b_t - b_j)."""
        b = self.b
        terms = b.map(p + "terms", "{0} * {1} * {2}", b.expand(p + "a3", pairs_ii, ":, :, None"),
                      b.expand(p + "w3", weights, ":, None, :"), decay)
        return b.reduce(p + "diag", terms, 0)

    # the sweep form
    @contextlib.contextmanager
    def columns(self):
        """A loop over the sub-chunk's rows j = ts + jj (static if `unrolled`); yields j's `Column` (its s
        and gate rows are loaded again per j: L1 hits, where a row of a register tile could only be taken
        through shared memory)."""
        b = self.b
        with b.loop("jj", "0", "BC", static=self.unrolled):
            s_j = b.expand("s_j", b.load("s_j_row", self.s, "ts + jj", "eos", ("BM",)), "None, :")
            gc_j = b.expand("gc_j", b.load("gc_j_row", self.gc, "ts + jj", "eos", ("BM",)), "None, :")
            decay = b.map("decay_j", "tl.where(tl.arange(0, BC)[:, None] >= jj, tl.exp2(tl.minimum({0} - {1}, 0.0)), 0.0)",
                          self.gc_i, gc_j)
            yield Column(s_j, decay)

    @staticmethod
    def _column_view(view: View) -> View:
        """Column J * BC + jj of a [BT, BT] scratch view, read or written along the sub-chunk's rows."""
        return View(view.name, "1", "eos", col_stride=view.row_stride)

    def column(self, name, view):
        """pairs[t, j] of a [BT, BT] scratch view for the sub-chunk's rows t: [BC, 1]."""
        column = self.b.load(name + "_col", self._column_view(view), "J * BC + jj", "BT", ("BC",), col0="ts")
        return self.b.expand(name, column, ":, None")

    def store_column(self, view, x):
        """x [BC] as column j of a [BT, BT] scratch view (rows ts:ts+BC)."""
        self.b.store(self._column_view(view), x, "J * BC + jj", "BT", col0="ts")

    def column_score(self, name, acc, pairs_j, col: Column):
        """acc [BC, BM] += pairs[t, j] s_j 2^(b_t - b_j) (rows t >= j): `scores`, one j at a time."""
        return self.b.map(name, "{0} + {1} * {2} * {3}", acc, pairs_j, col.s, col.decay)

    def column_attention(self, name, weights, col: Column):
        """[BC]: sum_m weights_t[m] s_j[m] 2^(b_t - b_j)[m] for rows t >= j (0 above): column j of `attention`."""
        return self.b.reduce(name, self.b.map(name + "_terms", "{0} * {1} * {2}", weights, col.s, col.decay), 1)

    def column_key_score(self, name, terms, col: Column):
        """[BM]: sum_{t >= j} terms_t 2^(b_t - b_j) for key row j, terms [BC, BM] the sum of pairs[t, j]
        weights_t over the products (row j of `key_scores`)."""
        return self.b.reduce(name, self.b.map(name + "_terms", "{0} * {1}", terms, col.decay), 0)

    def store_row(self, view, x):
        """x [BM] as row j = ts + jj of a [BT, BM] scratch view."""
        self.b.store(view, x, "ts + jj", "eos")


# The factored form of a whole chunk (`FactoredChunk`): where the spread of its gates allows, every
# intra-chunk factor splits through one reference per slot, r = min_t b / 2 (b <= 0), as
#     2^(b_t - b_j) = up[t] * down[j],   up = 2^(b - r),   down = 2^(r - b),
# both exponents in [-spread / 2, spread / 2] with spread = max over slots of -min_t b (log2 units). At
# spread <= FACTOR_SPREAD_MAX every factor is a normal f32 between 2^-64 and 2^64 (2^64 of headroom left
# for the sums of |q k s| they scale, bf16's range being f32's), so the intra-chunk terms are matrix
# products over the chunk: no sub-chunks, no sweeps, no scratch rows. Elsewhere (strong gates, resets)
# the kernels run the exact sub-chunk form (`SubChunk`). 128 = 89 nats per chunk: a mean log gate of
# -2.8 per token at chunk 32, -1.4 at 64 (fla's layer: logsigmoid(x) / 8).
FACTOR_SPREAD_MAX = 128.0


def per_chunk_form(b: Builder, spec, gates: "ChunkGates", factored_form, exact_form):
    """Emit the intra-chunk terms of a program in the form each chunk allows: `factored_form(FactoredChunk)`
    where the chunk's gates factor and `exact_form()` elsewhere, or `exact_form()` for every chunk where
    spec.factored is False (GSA_FACTORED=0)."""
    if not spec.factored:
        exact_form()
        return
    chunk = FactoredChunk(b, gates)
    with b.when(chunk.condition):
        factored_form(chunk)
    with b.when(chunk.otherwise):
        exact_form()


class FactoredChunk:
    """The factored form's condition and terms for the chunk of `gates` (ChunkGates)."""

    def __init__(self, b: Builder, gates: ChunkGates):
        self.b, self.gates = b, gates
        low = b.reduce("gate_low", gates.gc, 0, "min")  # [BM]: min_t b (masked rows and slots read 0)
        spread = b.reduce("gate_spread", b.map("neg_low", "-{0}", low), 0, "max")
        self.condition = f"{spread.name} <= {FACTOR_SPREAD_MAX}"
        self.otherwise = f"not ({self.condition})"  # nan gates take the exact form
        self._low = low

    def factors(self):
        """(up, down, s * down) [BT, BM], made inside the branch that uses them."""
        b = self.b
        ref = b.expand("gate_ref", b.map("gate_ref_row", "{0} * 0.5", self._low), "None, :")
        up = b.map("up", "tl.exp2({0} - {1})", self.gates.gc, ref)
        down = b.map("down", "tl.exp2({0} - {1})", ref, self.gates.gc)
        return up, down, b.map("s_down", "{0} * {1}", self.gates.s, down)

    @staticmethod
    def causal(b: Builder, name: str, x):
        """x [BT, BT] with the pairs j > t set to 0."""
        return b.map(name, f"tl.where({ROWS} >= tl.arange(0, BT)[None, :], {{0}}, 0.0)", x)

    def gated_rows(self, name, pairs, acc, up, s_down, precise=False):
        """acc[t] += sum_{j <= t} pairs[t, j] s_j 2^(b_t - b_j): the whole chunk's `scores`. `precise`: in
        tf32 for half-precision inputs (the slot backward's dl = p (dp - <p, dp>) cancels what these sums
        share; the output pass keeps the input dtype: tf32 there doubled its spills at chunk 64 and cost
        0.14 ms at B8 T2048 H16 K=V=128, bench/NOTES.md session 15)."""
        b = self.b
        intra = b.dot(name + "_intra", self.causal(b, name + "_pairs", pairs), s_down,
                      operand_dtype="f32" if precise else "in")
        return b.map(name, "{0} + {1} * {2}", acc, intra, up)

    def attention(self, name, weights, up, s_down):
        """[BT, BT]: sum_m weights_t[m] s_j[m] 2^(b_t - b_j)[m] for j <= t: the whole chunk's `attention`
        (in tf32 for half-precision inputs: these products are summed in f32 by the exact form, and bf16
        operands doubled the bf16 forward test's error)."""
        b = self.b
        mixed = b.dot(name + "_all", b.map(name + "_up", "{0} * {1}", weights, up), s_down, trans_b=True,
                      operand_dtype="f32")
        return self.causal(b, name, mixed)

    def key_scores(self, name, items, up, down):
        """[BT, BM] for key rows j: sum_{t >= j} sum over items (pairs, weights) of pairs[t, j] weights_t
        2^(b_t - b_j): the whole chunk's `SubChunk.key_scores` and `ChunkGates.gated_cols` together."""
        b, acc = self.b, None
        for i, (pairs, weights) in enumerate(items):
            acc = b.dot(name + "_sum", self.causal(b, f"{name}_pairs{i}", pairs),
                        b.map(f"{name}_up{i}", "{0} * {1}", weights, up), trans_a=True, acc=acc, operand_dtype="f32")
        return b.map(name, "{0} * {1}", acc, down)


CHUNK_ROWS = SlotIndex(b="i_n", h="i_hq", t="(ts - bos + tl.arange(0, BC))[:, None]")  # slot_mod's b, h, t
ALL_CHUNK_ROWS = SlotIndex(b="i_n", h="i_hq", t="(t0 - bos + tl.arange(0, BT))[:, None]")  # the same, [BT, BM] tiles


def softmax_slots(b: Builder, acc, index: SlotIndex = CHUNK_ROWS):
    """p = softmax over the M valid slots of scale * acc (exp2, with scale_log2 = scale * log2 e)."""
    valid = b.map("slot_valid", "(tl.arange(0, BM) < M)[None, :]", dtype="i1", shape=("1", "BM"))
    logits = b.map("logits", "tl.where({1}, {0} * scale_log2, float('-inf'))", acc, valid)
    logits = b.slot_mod("logits", logits, acc, index)  # the Spec's slot_mod, if any (mods.py)
    top = b.expand("top", b.reduce("row_max", logits, 1, "max"), ":, None")
    e = b.map("e", "tl.exp2({0} - {1})", logits, top)
    total = b.expand("total", b.reduce("row_sum", e, 1), ":, None")
    return b.map("probs", "{0} / {1}", e, total)


def slot_mod_backward(b: Builder, spec, acc, dl, index: SlotIndex = CHUNK_ROWS, row0: str = "ts"):
    """dl = dL/d(modded logits) -> dL/d(logits) through the Spec's slot_mod (no-op without one).

    Per float captured leaf of the slot_mod, also stores dl * d slot_mod / d leaf into `mod_terms`
    ([B, T, HQ, leaves, M], f32) for the host to scatter into the captured tensors' gradients."""
    n = mods.slot_leaf_count(spec.mods)
    for leaf in range(n):
        term = b.slot_mod(f"mod_term{leaf}", dl, acc, index, mode="term", leaf=leaf)
        terms = View(f"(mod_terms + ((i_b * T * HQ + i_hq) * {n} + {leaf}) * M)", f"HQ * {n} * M", "M")
        b.store(terms, term, row0, "eos")
    return b.slot_mod(dl.name, dl, acc, index, mode="grad")
