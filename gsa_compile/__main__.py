"""Command line: `python -m gsa_compile <command>`.

    check   compare the float64 references with each other and the generated kernels (forward and
            gradients) with them, on fresh random inputs (exit 1 on failure)
    show    print the generated Triton source (or the tile IR) of the kernels of one Spec
    bench   on a GPU: correctness, torch.compile and timings vs fla and SDPA (a CPU smoke without one)
    tune    on a GPU: tune the standard shapes and record the winning launch configs

Each command is a function `cmd_<name>(args) -> int` (the exit code) plus an entry in COMMANDS
that adds its arguments to its sub-parser.
"""
from __future__ import annotations

import argparse
import random
import sys

import torch

from . import codegen, programs, programs_backward
from .api import chunk_gsa
from .reference import parallel_gsa, recurrent_gsa
from .spec import SUPPORTED_CHUNK_SIZES, GateLayout, Spec, parse_gate_layout

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


KERNEL_PROBLEM = dict(B=1, T=40, HQ=2, H=1, K=16, V=16, M=8)
KERNEL_TOL = 1e-4  # float32 kernels vs the float64 reference, relative (norm) error


def _check_kernels(gen) -> bool:
    """chunk_gsa (float32) vs recurrent_gsa: o, final states and every gradient, each gate layout."""
    where = "GPU" if torch.cuda.is_available() else "CPU, Triton interpreter"
    print(f"kernels: chunk_gsa float32 ({where}) vs recurrent_gsa float64, {KERNEL_PROBLEM}, chunk 16")
    print(f"{'layout':<22} | {'o / states':>13} | {'worst grad':>14} | result")
    ok = True
    device = "cuda" if torch.cuda.is_available() else "cpu"
    old = CHECK_PROBLEM.copy()
    CHECK_PROBLEM.update(KERNEL_PROBLEM)
    try:
        for layout in GateLayout:
            kwargs = _problem(layout, gen)
            leaves = {n: x.float().to(device).requires_grad_() for n, x in kwargs.items() if isinstance(x, torch.Tensor)}
            hk0, hv0 = (x.float().to(device).requires_grad_() for x in kwargs["initial_state"])
            o, (hk, hv) = chunk_gsa(**leaves, initial_state=(hk0, hv0), output_final_state=True, chunk_size=16)
            ref_leaves = {n: x.detach().double().requires_grad_() for n, x in leaves.items()}
            rhk0, rhv0 = (x.detach().double().requires_grad_() for x in (hk0, hv0))
            ro, (rhk, rhv) = recurrent_gsa(**ref_leaves, initial_state=(rhk0, rhv0), output_final_state=True)
            weights = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (ro, rhk, rhv)]
            sum(((a * w.to(a.device)).sum() for a, w in zip((o, hk, hv), weights))).backward()
            sum(((a * w).sum() for a, w in zip((ro, rhk, rhv), weights))).backward()
            norm = lambda x, ref: ((x.detach().double().cpu() - ref.detach()).norm() / ref.detach().norm()).item()
            values = max(norm(a, b) for a, b in zip((o, hk, hv), (ro, rhk, rhv)))
            pairs = list(zip(leaves.values(), ref_leaves.values())) + [(hk0, rhk0), (hv0, rhv0)]
            grads = max(norm(a.grad, b.grad) for a, b in pairs)
            ok &= _row(layout.value, [values, grads, 0.0], KERNEL_TOL)
    finally:
        CHECK_PROBLEM.clear()
        CHECK_PROBLEM.update(old)
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
    ok &= _check_kernels(gen)
    print("check:", "all passed" if ok else "FAILED")
    return 0 if ok else 1


def _check_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: fresh)")


# -- show ------------------------------------------------------------------------------------

SHOWN_PROGRAMS = {f.__name__: f for f in programs.FORWARD_PROGRAMS + programs_backward.BACKWARD_PROGRAMS
                  + programs_backward.GATE_BACKWARD_PROGRAMS}


def cmd_show(args) -> int:
    layout = parse_gate_layout(args.gate)
    if layout is GateLayout.ABC:
        print("# ABC: the normaliser runs before the kernels, which then see the 'slot' layout")
        layout = GateLayout.SLOT
    spec = Spec(layout=layout, chunk_size=args.chunk_size, dtype=args.dtype, K=args.K, V=args.V, M=args.M,
                group=args.group, varlen=args.varlen, initial_state=args.initial_state, final_state=True)
    names = list(SHOWN_PROGRAMS) if args.program == "all" else [args.program]
    for name in names:
        builder = SHOWN_PROGRAMS[name]
        print(builder(spec).pretty() if args.ir else codegen.source(builder, spec))
    return 0


def _show_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk-size", type=int, default=64, choices=SUPPORTED_CHUNK_SIZES)
    parser.add_argument("--gate", default="slot", help="slot | head | decay_head | decay_slot | abc")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--K", type=int, default=128)
    parser.add_argument("--V", type=int, default=128)
    parser.add_argument("--M", type=int, default=64)
    parser.add_argument("--group", type=int, default=1, help="query heads per kv head (GQA)")
    parser.add_argument("--varlen", action="store_true")
    parser.add_argument("--initial-state", action="store_true")
    parser.add_argument("--program", default="all", choices=["all"] + list(SHOWN_PROGRAMS))
    parser.add_argument("--ir", action="store_true", help="print the tile IR instead of the Triton source")


# -- bench -----------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    from . import benchmark
    if not torch.cuda.is_available():
        return benchmark.cpu_smoke()
    return benchmark.run(quick=args.quick, out=args.out, timing=not args.no_timing,
                         sweep_lengths=benchmark.SWEEP_LENGTHS if args.sweep else ())


def _bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller correctness problem, two shapes")
    parser.add_argument("--out", default=None, help="write the full results as JSON here")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time T = 512 ... 65536 and plot it (next to --out)")


def _tuning():
    from . import tuning_cli
    return tuning_cli


# -- dispatch --------------------------------------------------------------------------------

# name -> (function(args) -> exit code, add_arguments(parser), one-line help)
COMMANDS = {
    "check": (cmd_check, _check_args, "compare the references and the kernels on random inputs"),
    "show": (cmd_show, _show_args, "print the generated Triton source or tile IR of one Spec"),
    "bench": (cmd_bench, _bench_args, "correctness and timings vs fla and SDPA on the GPU"),
    "tune": (lambda args: _tuning().main(args), lambda parser: _tuning().add_arguments(parser),
             "tune launch configs on this GPU (see autotune/README.md)"),
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
