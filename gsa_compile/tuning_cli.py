"""`python -m gsa_compile tune`: tune the standard shapes on this GPU and record the winners.

For each shape: the search space of tuner.search_space, pruned to configs whose generated kernels
fit in shared memory (compiled for this GPU's architecture without launching), then tuner.tune
(validated against the default config, timed with do_bench). Winners go to the user cache, or with
--ship to autotune/<GPU>.json to be committed.
"""
from __future__ import annotations

import torch

from . import launch, programs, tuner
from .benchmark import SHAPES, make_inputs
from .spec import GateLayout, Spec

QUICK_SPACE = dict(chunk_sizes=(64, 128), blocks=(64, 128), warps=(4, 8), stages=(1, 2))


def parse_shape(text: str):
    """"B,T,H,K,V,M" -> tuple of ints."""
    values = tuple(int(x) for x in text.split(","))
    if len(values) != 6:
        raise ValueError(f"--shapes takes B,T,H,K,V,M, got {text!r}")
    return values


def _kernels(spec_like: Spec):
    """config -> [(builder, spec, constexprs)] of the forward, for shared-memory pruning."""
    def kernels(config: tuner.LaunchConfig):
        spec = Spec(spec_like.layout, config.chunk_size, spec_like.dtype, spec_like.K, spec_like.V, spec_like.M,
                    spec_like.group, final_state=True)
        consts = launch.kernel_constants(spec, config.tile_config())
        return [(builder, spec, consts[builder.__name__]) for builder in programs.FORWARD_PROGRAMS]
    return kernels


def _space_options(args) -> dict:
    """search_space keyword arguments from --quick and the explicit --chunk-sizes/--blocks/... lists."""
    options = dict(QUICK_SPACE) if args.quick else {}
    for name in ("chunk_sizes", "blocks", "warps", "stages"):
        value = getattr(args, name)
        if value:
            options[name] = tuple(int(x) for x in value.split(","))
    return options


def tune_shape(B, T, H, K, V, M, layout="slot", dtype=torch.bfloat16, space=None, ship=False):
    q, k, v, s, g = make_inputs(B, T, H, K, V, M, layout, dtype, "cuda")
    spec_like = Spec(GateLayout(layout), 64, launch.DTYPE_NAMES[dtype], K, V, M, group=1)
    key = tuner.TuningKey.make(spec_like, T=T, BH=B * H)
    arch = int("%d%d" % torch.cuda.get_device_capability())
    space = tuner.search_space(spec_like, **(space or {}))
    fits = tuner.footprint_fits(_kernels(spec_like), arch=arch)
    candidates = tuner.prune(space, fits)

    def run(config):
        return launch.forward(q, k, v, s, g, K ** -0.5, None, None, None, config.chunk_size, GateLayout(layout),
                              config.tile_config())[0]

    result = tuner.tune(key, candidates, run, progress=True)
    if result.refused is None:
        tuner.default_cache().record(key, result.best, result.best_ms, result.default_ms, shipped=ship)
    return result


def main(args) -> int:
    if not torch.cuda.is_available():
        print("tune needs a CUDA GPU: it times kernels with device events (nothing to do on the CPU)")
        return 2
    shapes = [parse_shape(x) for x in args.shapes] if args.shapes else [(B, T, H, D, D, M) for B, T, H, D, M in SHAPES]
    space = _space_options(args)
    results = [tune_shape(*shape, layout=args.layout, space=space, ship=args.ship) for shape in shapes]
    print(tuner.format_table(results))
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--shapes", nargs="*", help="B,T,H,K,V,M each (default: the benchmark shapes)")
    parser.add_argument("--layout", default="slot", choices=[x.value for x in GateLayout if x is not GateLayout.ABC])
    parser.add_argument("--quick", action="store_true", help=f"a 16-config space: {QUICK_SPACE}")
    for name, help_text in (("chunk-sizes", "chunk sizes"), ("blocks", "BK/BV tiles"), ("warps", "num_warps"),
                            ("stages", "num_stages")):
        parser.add_argument(f"--{name}", default=None, help=f"comma-separated {help_text} to search")
    parser.add_argument("--ship", action="store_true", help="write autotune/<GPU>.json instead of the user cache")
