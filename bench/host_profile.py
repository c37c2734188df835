"""Where an eager call's host time goes: wall time per call against the GPU time of its kernels,
and a cProfile of many calls (top functions by own time and by cumulative time).

    python bench/host_profile.py [--shape B,T,H,D,M] [--calls 200] [--out FILE.json]

`--stub-kernels` replaces every generated kernel by a launcher that does nothing, so the host path alone
is timed (any machine; on a CPU the backward's torch ops still run for real, on CPU tensors).
`--timeline` also prints, per run, the median host time between consecutive kernel launches of one call
started on an idle GPU (synchronised before each sample, so a full launch queue never blocks the host;
with real kernels minus --stub-kernels, the cost of the launches themselves). Session 13 found shape 1's
forward+backward host bound this way (bench/NOTES.md).

Rows: fwd, fwd+bwd, and decode (recurrent_step in place: one token of each sequence, float32 states). `host_ms` is the wall time per call with the GPU never waited on inside the
loop (a launch-bound call shows host_ms > kernels_ms); `kernels_ms` is the sum of its CUDA kernels'
times from torch.profiler. A CPU run (interpreter) prints the cProfile only: its times are the
interpreter's, not the launch path's.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import pstats
import statistics
import time

import torch

from gsa_compile import benchmark as bm
from gsa_compile import chunk_gsa, launch, recurrent_step


def per_call_ms(fn, calls, sync):
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e3


def top(fn, calls, sort, lines=25):
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats(sort).print_stats(lines)
    return text.getvalue()


class NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels():
    """From now on every generated kernel is still generated and cached, but its launch does nothing."""
    from gsa_compile import codegen
    real = codegen.kernel
    codegen.kernel = lambda builder, spec: (real(builder, spec), NoLaunch())[1]


def timeline(fn, calls, sync):
    """{"i previous -> launch": median ms} between the generated kernels' launches of one call (and from its
    start, to its end), each call started on an idle device."""
    marks, run = [], launch.Call.run

    def spy(self, builder, grid, *args, **extra):
        marks.append((builder.__name__, time.perf_counter()))
        return run(self, builder, grid, *args, **extra)

    launch.Call.run = spy
    samples = collections.defaultdict(list)
    try:
        for _ in range(calls):
            sync()
            marks.clear()
            start = time.perf_counter()
            fn()
            points = [("start", start)] + marks + [("end", time.perf_counter())]
            for i, ((before, t0), (after, t1)) in enumerate(zip(points, points[1:])):
                samples[f"{i:2d} {before} -> {after}"].append(t1 - t0)
            samples["   total"].append(points[-1][1] - start)
    finally:
        launch.Call.run = run
    return {key: round(statistics.median(xs) * 1e3, 4) for key, xs in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1,512,4,128,64", help="B,T,H,D,M (K = V = D)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", default=None)
    parser.add_argument("--stub-kernels", action="store_true", help="launch nothing: time the host path alone")
    parser.add_argument("--timeline", action="store_true", help="host time between launches (see the doc)")
    args = parser.parse_args()
    if args.stub_kernels:
        stub_kernels()
    B, T, H, D, M = (int(x) for x in args.shape.split(","))
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    calls = args.calls if cuda or args.stub_kernels else 3
    inputs = bm.make_inputs(B, T, H, D, D, M, "slot", dtype, device, requires_grad=True)
    do = torch.randn(B, T, H, D, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runs = {"fwd": lambda: chunk_gsa(*inputs)[0], "fwd+bwd": bm._fwd_bwd(lambda: chunk_gsa(*inputs)[0], inputs, do)}
    step = [x[:, :1].detach() for x in inputs]  # one token of each input: the decode step, B sequences
    state = (torch.zeros(B, H, D, M, device=device), torch.zeros(B, H, M, D, device=device))
    runs["decode"] = lambda: recurrent_step(*step, state=state, inplace=True)[0]
    rows = []
    for name, fn in runs.items():
        row = dict(run=name, shape=args.shape, host_ms=per_call_ms(fn, calls, sync))
        if cuda:
            row["kernels_ms"] = round(sum(bm.kernel_shares(fn).values()), 4)
            row["do_bench_ms"] = bm.bench(fn)
        if args.timeline:
            row["timeline_ms"] = timeline(fn, min(calls, 50), sync)
            print(f"== {name}: host time between launches (median ms of {min(calls, 50)} calls from an idle device)")
            for key, ms in row["timeline_ms"].items():
                print(f"  {key:<52} {ms:8.4f}")
        for sort in ("tottime", "cumulative"):
            print(f"== {name}: cProfile of {calls} calls, by {sort}")
            print(top(fn, calls, sort))
        rows.append(row)
    print(f"{'run':<8} | {'host ms/call':>12} | {'kernels ms':>10} | {'do_bench ms':>11}")
    for r in rows:
        print(f"{r['run']:<8} | {r['host_ms']:12.3f} | {r.get('kernels_ms', float('nan')):10.3f} | "
              f"{r.get('do_bench_ms', float('nan')):11.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=bm.environment(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
