"""Long sequences on the GPU vs the float64 reference, with the state pass segmented by default and off:
the eager default path (segments.requested) must be as accurate as the unsegmented one.

    python bench/gpu_long_check.py [--T 8192] [--dims H,K,V,M] [--layouts ...] [--dtypes ...] [--out FILE.json]
    python bench/gpu_long_check.py --T 4096 --dims 4,512,512,64 --layouts slot --dtypes bfloat16 \
        --packed no --settings default        # the tuned configs of a benchmark shape (B = 1)

Rows: layout x dtype x (dense | varlen) x GSA_STATE_SEGMENTS (unset = the default, off); columns: the
segments used, relative errors (norm) of o, the final states and every gradient against recurrent_gsa
in float64 on fresh random inputs.
"""
import argparse
import json
import os

import torch

from gsa_compile import benchmark as bm
from gsa_compile import chunk_gsa, launch, recurrent_gsa, segments
from gsa_compile.spec import GateLayout

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--T", type=int, default=8192 if torch.cuda.is_available() else 80)
parser.add_argument("--dims", default="2,64,64,64", help="H,K,V,M (bf16 with M=32 faults on the H200: see "
                    "bench/results/2026-11-29_h200_s4_ncu_longcheck_crash.md)")
parser.add_argument("--layouts", default="slot,head")
parser.add_argument("--dtypes", default="float32,bfloat16")
parser.add_argument("--packed", default="no,yes", help="dense (no) and/or three packed sequences (yes)")
parser.add_argument("--settings", default="default,off", help="GSA_STATE_SEGMENTS values; default = unset")
parser.add_argument("--out", default=None)
args = parser.parse_args()
H, K, V, M = (int(x) for x in args.dims.split(","))
device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke of this script (interpreter)
rows = []
torch.manual_seed(torch.seed() % 2**31)
for layout in args.layouts.split(","):
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        for varlen in (flag == "yes" for flag in args.packed.split(",")):
            q, k, v, s, g = bm.make_inputs(1, args.T, H, K, V, M, layout, dtype, device)
            cu = torch.tensor([0, args.T // 3, args.T // 3 + 5, args.T], device=device, dtype=torch.int32) if varlen else None
            leaves = [x.detach().double().requires_grad_() for x in (q, k, v, s, g)]
            ref_o, (ref_hk, ref_hv) = recurrent_gsa(*leaves, output_final_state=True, cu_seqlens=cu)
            weights = [torch.randn_like(x) for x in (ref_o, ref_hk, ref_hv)]
            sum((a * w).sum() for a, w in zip((ref_o, ref_hk, ref_hv), weights)).backward()
            for setting in ("" if x == "default" else x for x in args.settings.split(",")):
                if setting:
                    os.environ[segments.ENV] = setting
                else:
                    os.environ.pop(segments.ENV, None)
                ours = [x.detach().clone().requires_grad_() for x in (q, k, v, s, g)]
                o, (hk, hv) = chunk_gsa(*ours, output_final_state=True, cu_seqlens=cu)
                sum((a.double() * w).sum() for a, w in zip((o, hk, hv), weights)).backward()
                call = launch.Call(q, k, v, s, None, cu, launch.AUTO, GateLayout(layout), None, lambda kernel: kernel)
                errors = {name: bm.rel(a, b) for name, a, b in zip(("o", "hk", "hv"), (o, hk, hv), (ref_o, ref_hk, ref_hv))}
                errors.update({f"d{n}": bm.rel(a.grad, b.grad) for n, a, b in zip("qkvsg", ours, leaves)})
                row = dict(layout=layout, dtype=str(dtype).replace("torch.", ""), varlen=varlen,
                           setting=setting or "default", S=segments.requested(call), **errors)
                rows.append(row)
                print(json.dumps(row), flush=True)
os.environ.pop(segments.ENV, None)
if args.out:
    with open(args.out, "w") as f:
        json.dump(dict(environment=bm.environment(), T=args.T, shape=dict(H=H, K=K, V=V, M=M), rows=rows), f, indent=1)
names = ["o", "hk", "hv", "dq", "dk", "dv", "ds", "dg"]
print(f"\nT={args.T} H{H} K={K} V={V} M{M}: relative error (norm) vs float64 recurrent_gsa")
print(f"{'layout':<6} {'dtype':<9} {'varlen':<6} {'setting':<8} {'S':>3} | " + " ".join(f"{n:>8}" for n in names))
for r in rows:
    print(f"{r['layout']:<6} {r['dtype']:<9} {str(r['varlen']):<6} {r['setting']:<8} {r['S']:>3} | "
          + " ".join(f"{r[n]:8.1e}" for n in names))
