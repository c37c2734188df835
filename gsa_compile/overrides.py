"""Launch overrides from environment variables, for experiments and A/B timings of eager calls (launch.py
reads them per call): forced forward / backward / decode launch values, register caps per program, the
output pass's form of the sub-chunk terms (with its per-device default) and the factored form's switch.
Each parser raises ValueError naming the variable and the expected form."""
from __future__ import annotations

import os

from . import programs, programs_backward
from .spec import TileConfig

# GSA_BACKWARD_CONFIG="BT,BK,BV,warps,stages,slot_warps,slot_BC" forces the backward's launch (it recomputes
# the forward's states, so its chunk size is free): bench/backward_sweep.py times such variants.
BACKWARD_CONFIG_ENV = "GSA_BACKWARD_CONFIG"


# GSA_FORWARD_CONFIG="BT,BK,BV,warps,stages" forces the forward's launch, whatever the tuning file says (A/B
# timings of two kernel versions at one config while the tuning entries of one of them are stale).
FORWARD_CONFIG_ENV = "GSA_FORWARD_CONFIG"
# GSA_DECODE_CONFIG="BK,BV,warps" forces the decode kernels' tiles and warps (bench/decode_bench.py --configs).
DECODE_CONFIG_ENV = "GSA_DECODE_CONFIG"


def _env_ints(name: str, fields: str):
    """The comma-separated integers of environment variable `name` (one per field of `fields`), or None."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        numbers = [int(x) for x in value.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) != len(fields.split(",")):
        raise ValueError(f"{name}={value!r}: expected {len(fields.split(','))} integers {fields}")
    return numbers


# GSA_MAXNREG="output_pass=168,slot_backward=128" caps the registers per thread of those programs (Triton's
# maxnreg): more resident programs per SM at the price of spills (bench/NOTES.md, session 8: the output pass
# compiles to 248 registers at B8 T2048 H16 K=V=128, 2 programs of 4 warps per SM; at 168, 3, spilling
# ~260 bytes per thread). An experiment's knob for eager calls, like the two above.
MAXNREG_ENV = "GSA_MAXNREG"
PROGRAM_NAMES = tuple(b.__name__ for b in programs.FORWARD_PROGRAMS + programs_backward.BACKWARD_PROGRAMS
                      + programs_backward.GATE_BACKWARD_PROGRAMS)


def _program_items(name: str, allowed) -> dict:
    """{program name: integer} from the variable `name` ("program=value" items, each value in `allowed`)."""
    value, items = os.environ.get(name, "").strip(), {}
    for item in filter(None, (x.strip() for x in value.split(","))):
        program, _, number = item.partition("=")
        if program not in PROGRAM_NAMES or not number.isdigit() or int(number) not in allowed:
            raise ValueError(f"{name}={value!r}: expected program=value items, programs {PROGRAM_NAMES}, "
                             f"values in {allowed}")
        items[program] = int(number)
    return items


def maxnreg_override() -> dict:
    """{program name: register cap} from GSA_MAXNREG."""
    return _program_items(MAXNREG_ENV, range(24, 256))


# GSA_PROGRAM_WARPS="gate_pass=8" launches those programs with that many warps, whatever the config's (the gate
# pass at B8 T2048 H16 K=V=128 moves its bytes at 77 % of the copy rate with 4 warps of 128 registers: session
# 18's ncu). An experiment's knob, like GSA_MAXNREG, with which it combines.
PROGRAM_WARPS_ENV = "GSA_PROGRAM_WARPS"


def warps_override() -> dict:
    """{program name: warps} from GSA_PROGRAM_WARPS."""
    return _program_items(PROGRAM_WARPS_ENV, (1, 2, 4, 8, 16))


def forward_override():
    """(chunk_size, TileConfig) from GSA_FORWARD_CONFIG, or None."""
    value = _env_ints(FORWARD_CONFIG_ENV, "BT,BK,BV,warps,stages")
    if value is None:
        return None
    BT, BK, BV, warps, stages = value
    return BT, TileConfig(BK=BK, BV=BV, num_warps=warps, num_stages=stages)


def decode_override():
    """(BK, BV, warps) of the decode kernels from GSA_DECODE_CONFIG, or None."""
    return _env_ints(DECODE_CONFIG_ENV, "BK,BV,warps")


def backward_override():
    """(chunk_size, TileConfig, (slot warps, slot BC)) from GSA_BACKWARD_CONFIG, or None."""
    value = _env_ints(BACKWARD_CONFIG_ENV, "BT,BK,BV,warps,stages,slot_warps,slot_BC")
    if value is None:
        return None
    BT, BK, BV, warps, stages, slot_warps, slot_bc = value
    return BT, TileConfig(BK=BK, BV=BV, num_warps=warps, num_stages=stages), (slot_warps, slot_bc)


# GSA_SUBCHUNK=sweep|pairwise forces the form of the sub-chunk terms (spec.Spec.subchunk).
SUBCHUNK_FORMS = ("sweep", "pairwise")
SUBCHUNK_ENV = "GSA_SUBCHUNK"


def subchunk_form(device) -> str:
    """The output pass's and slot backward's sub-chunk terms: GSA_SUBCHUNK, else "sweep" on a GPU
    (blocks.SubChunk: shared memory bound the pairwise form there) and "pairwise" on CPU tensors, i.e. in
    the Triton interpreter, where the sweep's many small operations make a call 1.5-2x as slow
    (tests/test_subchunk.py runs the sweep on CPU)."""
    value = os.environ.get(SUBCHUNK_ENV, "").strip().lower()
    if value in SUBCHUNK_FORMS:
        return value
    if value:
        raise ValueError(f"{SUBCHUNK_ENV}={value!r}: expected one of {SUBCHUNK_FORMS}")
    return "sweep" if device.type == "cuda" else "pairwise"


# GSA_FACTORED=0 turns the output pass's factored form off (spec.Spec.factored): every chunk then runs the exact
# sub-chunk form, as before session 15 (A/B timings; the tests of the sub-chunk forms).
FACTORED_ENV = "GSA_FACTORED"


def factored_form() -> bool:
    """Whether the output pass may factor a chunk's gates (GSA_FACTORED, default 1)."""
    value = os.environ.get(FACTORED_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{FACTORED_ENV}={value!r}: expected 0 or 1")
    return value != "0"


# what a forward or backward call's plan reads
CALL_ENVS = (FORWARD_CONFIG_ENV, MAXNREG_ENV, PROGRAM_WARPS_ENV, SUBCHUNK_ENV, FACTORED_ENV)


def call_environment() -> tuple:
    """The values of the variables a call's launch plan reads (launch.Call memoises plans by them)."""
    return tuple(os.environ.get(name) for name in CALL_ENVS)
