"""checkpoint_level 0 (keep the forward's chunk states for the backward) against the default (recompute them).

    python bench/checkpoint_bench.py [--shapes B,T,H,D,M ...] [--out FILE.json] [--smoke]

Per shape (bf16, slot gates, K = V = D) and level: forward+backward do_bench median, the kernels' GPU time over
one forward+backward (host excluded), the peak memory of a forward+backward above the inputs, and the largest
relative difference of o and every gradient from the default's (the kept backward runs at the forward's chunk
size and config, the default at the backward's tuned ones, so bf16 rounding differs). Prints a table last.
--smoke: a tiny float32 shape on the CPU interpreter (checks the script, times nothing).
"""
import argparse
import json
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from gsa_compile import benchmark as bm  # noqa: E402
from gsa_compile import chunk_gsa  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--shapes", nargs="+", default=["4,4096,4,512,64", "8,2048,16,128,64", "1,32768,4,512,64"])
parser.add_argument("--out")
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()
device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
shapes = ["1,40,2,16,8"] if args.smoke else args.shapes
LEVELS = (None, 0)


def run_level(inputs, do, level):
    chunk = {"chunk_size": 16} if args.smoke else {}
    fn = bm._fwd_bwd(lambda: chunk_gsa(*inputs, checkpoint_level=level, **chunk)[0], inputs, do)
    fn()
    results = [chunk_gsa(*inputs, checkpoint_level=level, **chunk)[0].detach()] + [x.grad.clone() for x in inputs]
    if device == "cpu":
        start = time.perf_counter()
        fn()
        return dict(fwdbwd_ms=(time.perf_counter() - start) * 1e3), results
    return dict(fwdbwd_ms=round(bm.bench(fn), 4), kernels_ms=bm.kernel_total(bm.kernel_shares(fn)),
                peak_mib=round(bm.peak_memory(fn), 1)), results


rows = []
for shape in shapes:
    B, T, H, D, M = (int(x) for x in shape.split(","))
    inputs = bm.make_inputs(B, T, H, D, D, M, "slot", dtype, device, requires_grad=True)
    do = torch.randn(B, T, H, D, device=device, dtype=dtype)
    baseline = None
    for level in LEVELS:
        row, results = run_level(inputs, do, level)
        if baseline is None:
            baseline = results
        names = ("o", "dq", "dk", "dv", "ds", "dg")
        row.update(shape=shape, level=level, diff_from_default={n: bm.rel(r, b) for n, r, b in zip(names, results, baseline)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    del inputs, do, baseline, results
    if device == "cuda":
        torch.cuda.empty_cache()

if args.out:
    with open(args.out, "w") as f:
        json.dump(dict(environment=bm.environment(), rows=rows), f, indent=1)
print(f"{'shape':20s} {'level':>5s} {'fwd+bwd ms':>10s} {'kernels ms':>10s} {'peak MiB':>9s} {'max diff':>9s}")
for r in rows:
    print(f"{r['shape']:20s} {str(r['level']):>5s} {r['fwdbwd_ms']:10.3f} {r.get('kernels_ms', float('nan')):10.3f} "
          f"{r.get('peak_mib', float('nan')):9.0f} {max(r['diff_from_default'].values()):9.2e}")
