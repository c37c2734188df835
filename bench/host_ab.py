"""Host time per eager call of the gsa_compile on PYTHONPATH, for A/B runs of two trees on one GPU machine
(bench/NOTES.md "Session 16": an old tree in an untracked directory against the working tree, interleaved):

    PYTHONPATH=<tree> python bench/host_ab.py B,T,H,D,M [label]

Prints one JSON line: per forward and forward+backward, the host ms per call (a loop of 50 calls with no
synchronisation, the best of 5), the do_bench median and the kernels' GPU time (torch.profiler)."""
import json
import sys
import time

import torch
import triton.testing

from gsa_compile import benchmark as bm
from gsa_compile import chunk_gsa

B, T, H, D, M = (int(x) for x in sys.argv[1].split(","))
inputs = bm.make_inputs(B, T, H, D, D, M, "slot", torch.bfloat16, "cuda", requires_grad=True)
do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
runs = {"fwd": lambda: chunk_gsa(*inputs)[0], "fwd+bwd": bm._fwd_bwd(lambda: chunk_gsa(*inputs)[0], inputs, do)}
row = {"tree": sys.argv[2] if len(sys.argv) > 2 else "", "shape": sys.argv[1]}
for name, fn in runs.items():
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(50):
            fn()
        best.append((time.perf_counter() - start) / 50 * 1e3)
        torch.cuda.synchronize()
    row[name + "_host_ms"] = round(min(best), 4)
    row[name + "_do_bench_ms"] = round(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"), 4)
    row[name + "_kernels_ms"] = round(sum(bm.kernel_shares(fn).values()), 4)
print(json.dumps(row))
