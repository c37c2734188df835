"""Warm fla's chunk_gsa (compiles and first-use autotuning) for the benchmark shapes, ahead of a timing run.

fla autotunes each of its kernels on first use; on the H200 that took more than 200-250 s for the three
benchmark shapes (sessions 3 and 4), longer than the device calls had left. Start this in the background
at the beginning of a GPU session, in its own process session so it outlives the call that starts it
(the machine keeps ~/.triton/cache, and with TRITON_CACHE_AUTOTUNING=1 Triton keeps the autotuning
results on disk too):

    setsid nohup env TRITON_CACHE_AUTOTUNING=1 PYTHONPATH=/tmp/site:$PWD python bench/fla_warm.py \\
        > /tmp/fla_warm.log 2>&1 < /dev/null &

`bench/gpu_session.sh fla_warm` starts one process per distinct fla autotuning key (fla keys its kernels on
H, K, V and the chunk size, not on B or T: the first and third benchmark shapes share theirs), each with
its own log /tmp/fla_warm_N.log. Then do other work (it shares the GPU: time nothing meanwhile) and, once
every log says `done` (`gpu_session.sh fla_wait`), time with `python -m gsa_compile bench`; `fla_pack` keeps
the results for a later machine (bench/fla_autotune/).
"""
import argparse
import time

import torch

from gsa_compile import benchmark as bm

MODEL_SHAPE = (8, 2048, 4, 256, 64)  # bench/model_bench.py's layer: 4 heads, K = V = 256, 64 slots


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="all", help="'all' or ';'-separated B,T,H,K=V,M (one process per "
                        "shape runs fla's autotuning of that shape's kernels beside the others)")
    args = parser.parse_args()
    shapes = [*bm.SHAPES, MODEL_SHAPE] if args.shapes == "all" else [
        tuple(int(x) for x in item.split(",")) for item in args.shapes.split(";")]
    start = time.time()
    fla = bm.fla_chunk_gsa()
    if fla is None:
        raise SystemExit("fla-core does not import here (carry .whl and put it on PYTHONPATH)")
    for B, T, H, D, M in shapes:
        inputs = bm.make_inputs(B, T, H, D, D, M, "slot", torch.bfloat16, "cuda", requires_grad=True)
        do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
        bm._fwd_bwd(lambda: fla(*inputs)[0], inputs, do)()
        torch.cuda.synchronize()
        print(f"warmed B{B} T{T} H{H} K=V={D} M{M} at {time.time() - start:.0f} s", flush=True)
        del inputs, do
        torch.cuda.empty_cache()
    print(f"done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
