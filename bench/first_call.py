"""A fresh process's first chunk_gsa call (JIT included) and how many configs it benchmarks.

    python bench/first_call.py B,T,H,K,V,M
"""
import sys
import time

import torch

t0 = time.perf_counter()
import triton.testing  # noqa: E402

timed = []
original = triton.testing.do_bench
triton.testing.do_bench = lambda *a, **k: timed.append(1) or original(*a, **k)

from gsa_compile import benchmark, chunk_gsa, tuner  # noqa: E402
from gsa_compile.spec import Spec, GateLayout  # noqa: E402

B, T, H, K, V, M = (int(x) for x in sys.argv[1].split(","))
q, k, v, s, g = benchmark.make_inputs(B, T, H, K, V, M, "slot", torch.bfloat16, "cuda")
key = tuner.TuningKey.make(Spec(GateLayout.SLOT, 64, "bfloat16", K, V, M), T=T, BH=B * H)
config, source = tuner.default_cache().lookup(key)
t1 = time.perf_counter()
o, _ = chunk_gsa(q, k, v, s, g)
torch.cuda.synchronize()
t2 = time.perf_counter()
print(f"lookup: {config.short()} ({source}); first call {t2 - t1:.2f} s (JIT included), "
      f"process start to result {t2 - t0:.2f} s; configs benchmarked: {len(timed)}")
