"""Warm fla's chunk_gsa (compiles and first-use autotuning) for the benchmark shapes, ahead of a timing run.

fla autotunes each of its kernels on first use; on the H200 that took more than 200-250 s for the three
benchmark shapes (sessions 3 and 4), longer than the device calls had left. Start this in the background
at the beginning of a GPU session, in its own process session so it outlives the call that starts it
(the machine keeps ~/.triton/cache, and with TRITON_CACHE_AUTOTUNING=1 Triton keeps the autotuning
results on disk too):

    setsid nohup env TRITON_CACHE_AUTOTUNING=1 PYTHONPATH=/tmp/site:$PWD python bench/fla_warm.py \\
        > /tmp/fla_warm.log 2>&1 < /dev/null &

then do other work (it shares the GPU: time nothing meanwhile) and, once /tmp/fla_warm.log says
`done`, time with `TRITON_CACHE_AUTOTUNING=1 python -m gsa_compile bench` in a later call.
"""
import time

import torch

from gsa_compile import benchmark as bm

start = time.time()
fla = bm.fla_chunk_gsa()
if fla is None:
    raise SystemExit("fla-core does not import here (carry .whl and put it on PYTHONPATH)")
for B, T, H, D, M in bm.SHAPES:
    inputs = bm.make_inputs(B, T, H, D, D, M, "slot", torch.bfloat16, "cuda", requires_grad=True)
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    bm._fwd_bwd(lambda: fla(*inputs)[0], inputs, do)()
    torch.cuda.synchronize()
    print(f"warmed B{B} T{T} H{H} K=V={D} M{M} at {time.time() - start:.0f} s", flush=True)
    del inputs, do
    torch.cuda.empty_cache()
print(f"done in {time.time() - start:.0f} s", flush=True)
