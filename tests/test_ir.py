"""The tile IR's verifier (gsa_compile/ir.py): names, types, and stale tiles.

A name may be assigned again with the same type (loop-carried tiles); the generated code then has one
variable, so a builder that still holds the Tile of an earlier assignment would read the later value. The
verifier refuses such a use (a first version of session 20's paired state backward read scaled weights
where it meant the unscaled ones this way, and only the gradient tests caught it)."""
import itertools

import pytest

from gsa_compile import ir, programs, programs_backward, programs_decode
from gsa_compile.spec import GateLayout, Spec

ROWS = ir.View("x_base", "stride_xt", "BM")


def _program(build):
    b = ir.Builder()
    build(b)
    return ir.Program("p", [ROWS], b.body)


def test_a_stale_tile_is_refused():
    def build(b):
        w = b.load("w", ROWS, "t0", "eos", ("BT", "BM"))
        b.map("w", "{0} * 2.0", w)  # w's name now holds the scaled value
        b.store(ROWS, b.map("y", "{0} + 1.0", w), "t0", "eos")  # meant the unscaled w
    with pytest.raises(ir.IRError, match="assigned again since"):
        _program(build).verify()


def test_rebinding_the_new_tile_passes():
    def build(b):
        w = b.load("w", ROWS, "t0", "eos", ("BT", "BM"))
        w = b.map("w", "{0} * 2.0", w)
        b.store(ROWS, w, "t0", "eos")
    _program(build).verify()


def test_loop_carried_tiles_pass():
    """The carried tile read before the body re-assigns it, and either assignment after the loop."""
    def build(b):
        acc = b.zeros("acc", ("BT", "BM"))
        before = acc
        with b.loop("i", "0", "4"):
            x = b.load("x", ROWS, "t0 + i", "eos", ("BT", "BM"))
            acc = b.map("acc", "{0} + {1}", acc, x)
        b.store(ROWS, acc, "t0", "eos")
        b.store(ROWS, before, "t0", "eos")  # the same variable: the loop may not have run
    _program(build).verify()


def test_a_stale_tile_inside_a_loop_body_is_refused():
    def build(b):
        acc = b.zeros("acc", ("BT", "BM"))
        with b.loop("i", "0", "4"):
            b.map("acc", "{0} * 0.5", acc)
            b.map("y", "{0} + 1.0", acc)  # the body re-assigned acc before this use
    with pytest.raises(ir.IRError, match="assigned again since"):
        _program(build).verify()


@pytest.mark.parametrize("layout", ["slot", "head", "decay_head", "decay_slot"])
def test_every_program_verifies(layout):
    """Every builder, over the spec switches that change its structure (Program.verify runs in each)."""
    builders = (programs.gate_pass, programs.state_pass, programs.output_pass, programs.segment_scan,
                programs.segment_scan_reverse, programs_backward.slot_backward, programs_backward.state_backward,
                programs_backward.key_backward, programs_backward.gate_backward, programs_backward.gate_backward_later,
                programs_decode.decode_step, programs_decode.decode_keys, programs_decode.decode_values)
    for chunk, init, varlen, factored, states, subchunk, group in itertools.product(
            [16, 32, 64, 128], [False, True], [False, True], [True, False], [True, False], ["sweep", "pairwise"],
            [1, 2]):
        spec = Spec(layout=GateLayout(layout), chunk_size=chunk, dtype="bfloat16", K=64, V=64, M=64, group=group,
                    varlen=varlen, initial_state=init, final_state=True, factored=factored, chunk_states=states,
                    subchunk=subchunk)
        for build in builders:
            build(spec)
