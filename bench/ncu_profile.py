"""One forward+backward of chunk_gsa between cudaProfilerStart/Stop, for Nsight Compute (the H200 machines
here run ncu on Firecracker; leave the clocks alone):

    ncu --clock-control none --profile-from-start off -k regex:gsa_ \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        python bench/ncu_profile.py --shape 8,2048,16,128,64

Warm-up calls (compiles, tuning lookups) run before the profiled range; every kernel of the profiled
call is reported once (the backward recomputes the state pass, so it appears twice).
"""
import argparse

import torch

from gsa_compile import benchmark as bm
from gsa_compile import chunk_gsa

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shape", default="8,2048,16,128,64", help="B,T,H,D,M (K = V = D), bf16, slot gates")
parser.add_argument("--forward-only", action="store_true")
args = parser.parse_args()
B, T, H, D, M = (int(x) for x in args.shape.split(","))
inputs = bm.make_inputs(B, T, H, D, D, M, "slot", torch.bfloat16, "cuda", requires_grad=True)
do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
step = (lambda: chunk_gsa(*inputs)[0]) if args.forward_only else bm._fwd_bwd(lambda: chunk_gsa(*inputs)[0], inputs, do)
for _ in range(2):
    step()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
step()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
