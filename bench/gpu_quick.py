"""A short GPU check that prints as it goes (for a nearly spent device budget): bf16 forward and
gradient correctness on one Spec, then forward and forward+backward timings that reuse its kernels.

    python bench/gpu_quick.py OUT.json
"""
import json
import sys
import time

import torch

from gsa_compile import benchmark as bm
from gsa_compile import chunk_gsa, recurrent_gsa

start = time.time()
out = sys.argv[1] if len(sys.argv) > 1 else None
result = dict(environment=bm.environment(), steps=[])


def record(**row):
    row["elapsed_s"] = round(time.time() - start, 1)
    result["steps"].append(row)
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


torch.manual_seed(torch.seed() % 2**31)
for layout in ("slot", "abc"):
    B, T, H, K, V, M = 1, 300, 2, 128, 128, 64
    inputs = bm.make_inputs(B, T, H, K, V, M, layout, torch.bfloat16, "cuda", requires_grad=True)
    o, (hk, hv) = chunk_gsa(*inputs, output_final_state=True)
    ref = [x.detach().double().requires_grad_() if x is not None else None for x in inputs]
    ro, (rhk, rhv) = recurrent_gsa(*ref, output_final_state=True)
    w = [torch.randn_like(x) for x in (ro, rhk, rhv)]
    sum((a.double() * b).sum() for a, b in zip((o, hk, hv), w)).backward()
    sum((a * b).sum() for a, b in zip((ro, rhk, rhv), w)).backward()
    grads = {n: bm.rel(a.grad, b.grad) for n, a, b in zip("qkvsg", inputs, ref) if a is not None}
    record(step="correctness bf16 chunk 64", layout=layout, o=bm.rel(o, ro), hk=bm.rel(hk, rhk), hv=bm.rel(hv, rhv), **grads)

for (B, T, H, D, M) in [bm.SHAPES[1], bm.SHAPES[0], bm.SHAPES[2]]:
    inputs = bm.make_inputs(B, T, H, D, D, M, "slot", torch.bfloat16, "cuda", requires_grad=True)
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    ours = lambda: chunk_gsa(*inputs)[0]
    row = dict(step="timing", shape=f"B{B} T{T} H{H} K=V={D} M{M}", ours_fwd_ms=bm.bench(ours))
    row["kernels_fwd_ms"] = bm.kernel_shares(ours)
    record(**row)
    row["ours_fwdbwd_ms"] = bm.bench(bm._fwd_bwd(ours, inputs, do))
    row["ours_fwdbwd_peak_mib"] = bm.peak_memory(bm._fwd_bwd(ours, inputs, do))
    row["kernels_fwdbwd_ms"] = bm.kernel_shares(bm._fwd_bwd(ours, inputs, do))
    record(**row)
    torch.cuda.empty_cache()
