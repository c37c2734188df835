"""`python -m gsa_compile tune`: tune the standard shapes on this GPU and record the winners.

For each shape: the search space of tuning_search.search_space, compiled first in parallel worker processes
(each runs the forward of one config at the tuning shape: the compiled kernels land in Triton's
on-disk cache; a config whose kernels fail to compile or launch, e.g. out of shared memory, or
fault, is dropped without harming the timing process), then tuning_search.tune (validated against the
default config, timed replayed from a CUDA graph: `kernel_time`) in this process; the winners' backward is
checked the same way (else the default is kept). Winners go to the user cache, or with --ship to
autotune/<GPU>.json.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
from typing import Optional

import torch

from . import launch, tuner, tuning_search
from .benchmark import SHAPES, make_inputs
from .spec import GateLayout, Spec

QUICK_SPACE = dict(chunk_sizes=(64, 128), blocks=(64, 128), warps=(4, 8), stages=(1, 2))
# the default. (32, 64) x (128,) took 94-113 s for the 3 standard shapes on the H200 (bench/results/
# *tune_s4.txt); chunk 128 with 128-wide tiles exceeds shared memory. Chunk 16 with 64-wide tiles was
# never tried there: ptxas (bench/ptxas_report.py) gives its output pass 168 registers instead of 255,
# i.e. 3 CTAs per SM instead of 2 (bench/NOTES.md, session 4), so it joins the search (~2.7x the configs).
STANDARD_SPACE = dict(chunk_sizes=(16, 32, 64), blocks=(64, 128), warps=(4, 8), stages=(2, 3))


def parse_shape(text: str):
    """"B,T,H,K,V,M" -> tuple of ints."""
    values = tuple(int(x) for x in text.split(","))
    if len(values) != 6:
        raise ValueError(f"--shapes takes B,T,H,K,V,M, got {text!r}")
    return values


def _space_options(args) -> dict:
    """search_space keyword arguments from --quick and the explicit --chunk-sizes/--blocks/... lists."""
    options = dict(QUICK_SPACE if args.quick else STANDARD_SPACE)
    for name in ("chunk_sizes", "blocks", "warps", "stages"):
        value = getattr(args, name)
        if value:
            options[name] = tuple(int(x) for x in value.split(","))
    return options


def _try_config(job) -> Optional[str]:
    """In a fresh worker process: one config's forward (or, with `backward`, forward and backward),
    once, at the tuning shape. This compiles its kernels into the shared on-disk caches, and a config
    that fails to compile or launch (out of shared memory, or a fault, which would poison the CUDA
    context) fails here rather than in the timing process. Returns None, or why the config fails."""
    layout, dtype_name, shape, config, backward, *slot_warps = job  # slot_warps: a backward entry's (its warps)
    try:
        B, T, H, K, V, M = shape
        inputs = make_inputs(B, T, H, K, V, M, layout, getattr(torch, dtype_name), "cuda")
        o = launch.forward(*inputs, K ** -0.5, None, None, None, config.chunk_size, GateLayout(layout),
                           config.tile_config())[0]
        if backward:
            launch.backward(torch.ones_like(o), None, None, *inputs, K ** -0.5, None, None, None, config.chunk_size,
                            GateLayout(layout), config.tile_config(), slot_warps=slot_warps[0] if slot_warps else None)
        torch.cuda.synchronize()
        return None
    except Exception as err:  # noqa: BLE001 - OutOfResources, compile errors, faults: the config is dropped
        return f"{type(err).__name__}: {err}"[:300]


def try_configs(jobs_list, jobs: Optional[int] = None) -> list:
    """_try_config for each job, each in its own process, `jobs` at a time (default: one per CPU)."""
    context = multiprocessing.get_context("spawn")
    workers = min(jobs or os.cpu_count() or 1, len(jobs_list))
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context, max_tasks_per_child=1) as pool:
        return list(pool.map(_try_config, jobs_list))


def kernel_time(fn) -> float:
    """ms per call of `fn` replayed from a CUDA graph (median): the kernels' time without the host's launch path.
    do_bench of the eager call measures the host instead wherever the host is the slower of the two: on session
    17's H200 machine it timed every backward config at B4 T4096 H4 K=V=512 at ~1.0-1.2 ms and kept one whose
    kernels take 0.19 ms longer than the config it replaced (bench/NOTES.md, session 17)."""
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


KEY_MAXNREG_CAPS = (128,)  # the key backward's register caps the backward's tuner tries (TileConfig.key_maxnreg)


def tune_shape(B, T, H, K, V, M, layout="slot", dtype=torch.bfloat16, space=None, jobs=None, direction="forward"):
    """Tune one shape's forward, or its backward (a TuningKey with direction "backward": it recomputes the
    forward's states, so any chunk size and tiles will do; every backward kernel, the slot backward
    included, runs with the config's warps, and the gradients of q, k, v, s must match the default
    config's: dg follows from them in the gate backward; the winner is then timed again beside itself with each
    of KEY_MAXNREG_CAPS on the key backward). Returns (TuneResult, the job that checks the winner's
    backward: a forward's config also runs the backward when no backward entry exists)."""
    backward = direction == "backward"
    spec_like = Spec(GateLayout(layout), 64, launch.DTYPE_NAMES[dtype], K, V, M, group=1)
    key = tuner.TuningKey.make(spec_like, T=T, BH=B * H, direction=direction)
    space = tuning_search.search_space(spec_like, **(space or {}))
    shape, dtype_name = (B, T, H, K, V, M), launch.DTYPE_NAMES[dtype]
    job = lambda c: (layout, dtype_name, shape, c, backward, *([c.num_warps] if backward else []))  # noqa: E731
    errors = try_configs([job(c) for c in space], jobs)
    candidates = [c for c, err in zip(space, errors) if err is None]
    dropped = [(c, err) for c, err in zip(space, errors) if err is not None]
    for config, reason in dropped:
        print(f"{key.to_str()}: dropped {config.short()}: {reason}", flush=True)
    if space[0] not in candidates:
        raise RuntimeError(f"the default config fails on {key.to_str()}: {errors[0]}")
    q, k, v, s, g = make_inputs(B, T, H, K, V, M, layout, dtype, "cuda")
    do = torch.randn_like(q) if backward else None

    def run(config):
        if backward:
            return launch.backward(do, None, None, q, k, v, s, g, K ** -0.5, None, None, None, config.chunk_size,
                                   GateLayout(layout), config.tile_config(), slot_warps=config.num_warps)[:4]
        return launch.forward(q, k, v, s, g, K ** -0.5, None, None, None, config.chunk_size, GateLayout(layout),
                              config.tile_config())[0]

    result = tuning_search.tune(key, candidates, run, bench=kernel_time, progress=True)
    if backward and result.refused is None:  # the key backward's register caps, tried on the winner only
        capped = [dataclasses.replace(result.best, key_maxnreg=cap) for cap in KEY_MAXNREG_CAPS]
        second = tuning_search.tune(key, capped, run, bench=kernel_time, reference_config=result.best)
        result.trials.extend(second.trials[1:])
        if second.best != result.best:  # faster than the winner timed again beside it
            result.best, result.best_ms = second.best, second.best_ms
    result.trials.extend(tuning_search.Trial(config, "skipped", None, reason) for config, reason in dropped)
    return result, (layout, dtype_name, shape, result.best, True)


def main(args) -> int:
    if not torch.cuda.is_available():
        print("tune needs a CUDA GPU: it times kernels with device events (nothing to do on the CPU)")
        return 2
    shapes = [parse_shape(x) for x in args.shapes] if args.shapes else [(B, T, H, D, D, M) for B, T, H, D, M in SHAPES]
    space = _space_options(args)
    start = time.perf_counter()
    results = []

    def keep(result):  # record a tuned (not refused) entry, and list it in the table
        if result.refused is None:
            tuner.default_cache().record(result.key, result.best, result.best_ms, result.default_ms, shipped=args.ship)
        results.append(result)

    forward = args.direction in ("forward", "both")
    tuned = [tune_shape(*shape, layout=args.layout, space=space, jobs=args.jobs) for shape in shapes if forward]
    # the forward chose; the backward runs with the same config: check it, else keep the default
    checks = try_configs([check for _, check in tuned], args.jobs) if tuned else []
    for (result, _), problem in zip(tuned, checks):
        if problem is not None and result.refused is None:
            print(f"{result.key.to_str()}: {result.best.short()} fails in the backward ({problem}); "
                  "keeping the default")
            result.trials.append(tuning_search.Trial(result.best, "skipped", None, f"backward: {problem}"))
            result.best, result.best_ms = result.trials[0].config, result.default_ms
        keep(result)
    for shape in shapes if args.direction in ("backward", "both") else ():
        keep(tune_shape(*shape, layout=args.layout, space=space, jobs=args.jobs, direction="backward")[0])
    for result in results:  # every config's time: what the winner beat, for the notes
        timed = sorted((t for t in result.trials if t.time_ms is not None), key=lambda t: t.time_ms)
        print(f"{result.key.to_str()}: " + ", ".join(f"{t.config.short()} {t.time_ms:.4f}" for t in timed))
    print(tuning_search.format_table(results))
    print(f"tuned {len(results)} shapes in {time.perf_counter() - start:.0f} s")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--shapes", nargs="*", help="B,T,H,K,V,M each (default: the benchmark shapes)")
    parser.add_argument("--layout", default="slot", choices=[x.value for x in GateLayout if x is not GateLayout.ABC])
    parser.add_argument("--quick", action="store_true", help=f"a 16-config space: {QUICK_SPACE} (default: "
                        f"{STANDARD_SPACE} and the default config; widen it with the lists below)")
    for name, help_text in (("chunk-sizes", "chunk sizes"), ("blocks", "BK/BV tiles"), ("warps", "num_warps"),
                            ("stages", "num_stages")):
        parser.add_argument(f"--{name}", default=None, help=f"comma-separated {help_text} to search")
    parser.add_argument("--ship", action="store_true", help="write autotune/<GPU>.json instead of the user cache")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    parser.add_argument("--direction", choices=("forward", "backward", "both"), default="both",
                        help="tune the forward, the backward (its own entries: it recomputes the forward's "
                             "states, so its chunk size is free), or both (default)")
