"""Command line: `python -m gsa_compile <command>`.

    check   run the float64 references on fresh random inputs and compare them (exit 1 on failure)

Each command is a function `cmd_<name>(args) -> int` (the exit code) plus an entry in COMMANDS
that adds its arguments to its sub-parser.
"""
from __future__ import annotations

import argparse
import random
import sys

import torch

from .reference import parallel_gsa, recurrent_gsa
from .spec import GateLayout

# -- check -----------------------------------------------------------------------------------

CHECK_PROBLEM = dict(B=2, T=64, HQ=4, H=2, K=32, V=32, M=16)
CHECK_TOL = 1e-10  # max |difference| / max |reference|, float64


def _gate(layout: GateLayout, B, T, H, M, gen):
    f64 = dict(generator=gen, dtype=torch.float64)
    return {GateLayout.SLOT: lambda: torch.nn.functional.logsigmoid(torch.randn(B, T, H, M, **f64)),
            GateLayout.HEAD: lambda: torch.nn.functional.logsigmoid(torch.randn(B, T, H, **f64)),
            GateLayout.DECAY_HEAD: lambda: -torch.rand(H, **f64),
            GateLayout.DECAY_SLOT: lambda: -torch.rand(H, M, **f64),
            GateLayout.ABC: lambda: None}[layout]()


def _problem(layout: GateLayout, gen, varlen=False):
    """Fresh random float64 inputs (with an initial state) as keyword arguments of a GSA call."""
    B, T, HQ, H, K, V, M = (CHECK_PROBLEM[x] for x in "B T HQ H K V M".split())
    cu = None
    if varlen:  # B sequences of random lengths packed into one row
        cut = torch.randint(1, B * T, (1,), generator=gen).item()
        cu, B, T = torch.tensor([0, cut, B * T]), 1, B * T
    N = B if cu is None else len(cu) - 1
    f64 = dict(generator=gen, dtype=torch.float64)
    return dict(q=torch.randn(B, T, HQ, K, **f64), k=torch.randn(B, T, H, K, **f64),
                v=torch.randn(B, T, H, V, **f64), s=torch.randn(B, T, H, M, **f64),
                g=_gate(layout, B, T, H, M, gen),
                initial_state=(torch.randn(N, H, K, M, **f64), torch.randn(N, H, M, V, **f64)),
                output_final_state=True, cu_seqlens=cu)


def _rel(x, ref) -> float:
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def _row(name, diffs, tol):
    ok = all(d < tol for d in diffs)
    print(f"{name:<22} | {diffs[0]:>13.3e} | {max(diffs[1:]):>14.3e} | {'pass' if ok else 'FAIL'}")
    return ok


def _check_reference(gen) -> bool:
    """recurrent_gsa vs parallel_gsa: every gate layout, initial + final state, and varlen."""
    print(f"reference: recurrent_gsa vs parallel_gsa, float64, {CHECK_PROBLEM}, initial + final state")
    print(f"diff = max |recurrent - parallel| / max |recurrent|, pass if < {CHECK_TOL:g}")
    print(f"{'layout':<22} | {'max |o diff|':>13} | {'max state diff':>14} | result")
    ok = True
    cases = [(layout.value, layout, False) for layout in GateLayout]
    cases += [(f"{layout.value} + varlen", layout, True) for layout in GateLayout]
    for name, layout, varlen in cases:
        kwargs = _problem(layout, gen, varlen)
        o_rec, (hk_rec, hv_rec) = recurrent_gsa(**kwargs)
        o_par, (hk_par, hv_par) = parallel_gsa(**kwargs)
        ok &= _row(name, [_rel(o_par, o_rec), _rel(hk_par, hk_rec), _rel(hv_par, hv_rec)], CHECK_TOL)
    return ok


def _environment() -> None:
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # triton missing or broken: the references still run
        triton_version = f"unavailable ({type(exc).__name__}: {exc})"
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "not available"
    print(f"torch {torch.__version__} | triton {triton_version} | CUDA: {cuda}")


def cmd_check(args) -> int:
    _environment()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"inputs: fresh random, seed {seed} (rerun with --seed {seed})")
    gen = torch.Generator().manual_seed(seed)
    ok = _check_reference(gen)
    print("check:", "all passed" if ok else "FAILED")
    return 0 if ok else 1


def _check_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: fresh)")


# -- dispatch --------------------------------------------------------------------------------

# name -> (function(args) -> exit code, add_arguments(parser), one-line help)
COMMANDS = {
    "check": (cmd_check, _check_args, "compare the references (and later the kernels) on random inputs"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gsa_compile", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, add_arguments, help_text) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][0](args)


if __name__ == "__main__":
    sys.exit(main())
