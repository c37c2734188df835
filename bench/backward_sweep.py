"""Time the backward's launch variants (GSA_BACKWARD_CONFIG) on the GPU: the backward recomputes the
forward's states, so its chunk size, tiles and warps need not be the forward's tuned ones.

    python bench/backward_sweep.py [--shapes B,T,H,D,M ...] [--configs "BT,BK,BV,w,s,slot_w,slot_BC;..."] [--out F]

For each shape: the default (no override) and each config: fwd+bwd median (do_bench), the backward
kernels' times of one fwd+bwd (torch.profiler, gsa_* only, the two state passes together), and the
largest relative difference of any gradient from the default's (bf16: rounding of another chunking).
"""
import argparse
import json
import math
import os
import time

import torch

from gsa_compile import benchmark as bm
from gsa_compile import chunk_gsa, overrides

CONFIGS = ("16,64,64,4,2,4,8;16,64,64,4,2,8,8;16,128,128,4,2,8,16;32,64,64,4,2,8,8;32,128,128,8,2,8,8;"
           "32,128,128,4,3,4,8;64,64,64,4,2,8,8")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shapes", nargs="*", default=[",".join(map(str, s)) for s in bm.SHAPES])
parser.add_argument("--configs", default=CONFIGS)
parser.add_argument("--out", default=None)
args = parser.parse_args()


def nan_max(values):
    values = list(values)
    return math.nan if any(math.isnan(x) for x in values) else max(values)


rows, environment = [], bm.environment()  # once: it asks nvidia-smi for other processes on the GPU
for shape in args.shapes:
    B, T, H, D, M = (int(x) for x in shape.split(","))
    torch.manual_seed(0)
    inputs = bm.make_inputs(B, T, H, D, D, M, "slot", torch.bfloat16, "cuda", requires_grad=True)
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    step = bm._fwd_bwd(lambda: chunk_gsa(*inputs)[0], inputs, do)
    base = None
    for config in ["default"] + args.configs.split(";"):
        started = time.time()
        if config == "default":
            os.environ.pop(overrides.BACKWARD_CONFIG_ENV, None)
        else:
            os.environ[overrides.BACKWARD_CONFIG_ENV] = config
        row = dict(shape=shape, config=config)
        try:
            step()
            grads = [x.grad.clone() for x in inputs]
            if base is None:
                base = grads
            row["max_grad_diff"] = nan_max(bm.rel(a, b) for a, b in zip(grads, base))
            row["fwdbwd_ms"] = bm.bench(step)
            shares = bm.kernel_shares(step)
            row["kernels"] = {name: t for name, t in shares.items() if name.startswith("gsa_")}
        except Exception as error:  # a config that does not compile or fit: recorded, the sweep goes on
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        row["elapsed_s"] = round(time.time() - started, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(environment=environment, rows=rows), f, indent=1)
    os.environ.pop(overrides.BACKWARD_CONFIG_ENV, None)

print(f"\n{'shape':<20} {'config':<22} | {'fwd+bwd':>8} | {'slot bwd':>8} {'state x2':>8} {'st.bwd':>8} "
      f"{'key bwd':>8} | grad diff")
for r in rows:
    k = r.get("kernels", {})
    print(f"{r['shape']:<20} {r['config']:<22} | {r.get('fwdbwd_ms', math.nan):8.3f} | "
          + " ".join(f"{k.get(n, math.nan):8.3f}" for n in ("gsa_slot_backward", "gsa_state_pass",
                                                           "gsa_state_backward", "gsa_key_backward"))
          + f" | {r.get('max_grad_diff', math.nan):.1e} {r.get('error', '')}")
