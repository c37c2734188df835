"""Issue 6: the segmented state pass (GSA_STATE_SEGMENTS, gsa_compile/segments.py) timed per setting.

    python bench/segments_bench.py [--out FILE.json] [--shape B,T,H,D,M] [--settings default,off,auto,4,8,16] [--smoke]

Default shape B1 T32768 H4 K=V=512 M64, bf16, slot gates, the tuned launch config. The variable is read
per call, so one process runs every setting, in order. Per setting: the state pass alone
(launch.state_pass), chunk_gsa's forward and forward+backward (do_bench medians), the kernels' times
over one forward+backward (the state pass, the state backward, everything that is not a gsa_ kernel:
the segments' host-side torch ops land there), and the largest relative difference of o, the final
states and the gradients from the first setting's (bf16 chunk states: ~1e-3 is rounding).
--smoke: tiny shapes on the CPU interpreter with host timers (checks the script, times nothing).
--variant NAME:VAR=VALUE[;VAR=VALUE]: also run every setting with those environment variables (launch
overrides read per call: GSA_MAXNREG, GSA_PROGRAM_WARPS, GSA_BACKWARD_CONFIG, GSA_FORWARD_CONFIG; repeatable), e.g.
    --variant base: --variant reg168:GSA_MAXNREG=output_pass=168 --variant slot8:GSA_BACKWARD_CONFIG=32,128,128,4,3,8,8
Each row also has the forward's kernels alone (fwd_*_kernel_ms).
"""
import argparse
import json
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from gsa_compile import benchmark as bm  # noqa: E402
from gsa_compile import chunk_gsa, launch, overrides, segments  # noqa: E402
from gsa_compile.spec import GateLayout  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out")
parser.add_argument("--shape", default="1,32768,4,512,64")
parser.add_argument("--settings", default="default,off,auto,4,8,16")
parser.add_argument("--smoke", action="store_true")
parser.add_argument("--variant", action="append", default=[], help="NAME:VAR=VALUE[;VAR=VALUE...] (see the doc)")
args = parser.parse_args()
B, T, H, D, M = (int(x) for x in ("1,150,2,16,8" if args.smoke else args.shape).split(","))
device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
chunk = 16 if args.smoke else launch.AUTO


def timed(fn):
    if device == "cuda":
        return bm.bench(fn)
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def kernels(fn, prefix=""):
    if device != "cuda":
        return {}
    shares = bm.kernel_shares(fn)
    times = {f"{prefix}{name[4:]}_kernel_ms": shares.get(name, 0.0) for name in KERNELS}
    times[f"{prefix}other_kernel_ms"] = round(sum(t for name, t in shares.items() if not name.startswith("gsa_")), 4)
    return times


KERNELS = tuple(f"gsa_{name}" for name in overrides.PROGRAM_NAMES  # the generated kernels' names
                + ("segment_scan", "segment_scan_reverse"))


torch.manual_seed(0)
q, k, v, s, g = bm.make_inputs(B, T, H, D, D, M, "slot", dtype, device, requires_grad=True)
leaves = [q, k, v, s, g]
do = torch.randn(B, T, H, D, device=device, dtype=dtype)
weights = [torch.randn(B, H, D, M, device=device), torch.randn(B, H, M, D, device=device)]


def forward():
    return chunk_gsa(q, k, v, s, g, output_final_state=True, chunk_size=chunk or None)  # None: the tuned config


def fwd_bwd():
    for x in leaves:
        x.grad = None
    o, (hk, hv) = forward()
    ((o.float() * do.float()).sum() + (hk * weights[0]).sum() + (hv * weights[1]).sum()).backward()
    return o.detach(), hk.detach(), hv.detach()


def state_pass_alone():
    call = launch.Call(q, k, v, s, None, None, chunk, GateLayout.SLOT, None, lambda kernel: kernel)
    return lambda: launch.state_pass(call, k.detach(), v.detach(), s.detach(), g.detach(), None, None), call


def variants():
    """[(name, {variable: value})] from --variant (default: one variant without overrides)."""
    parsed = []
    for text in args.variant or ["base:"]:
        name, _, assignments = text.partition(":")
        pairs = [a.partition("=") for a in assignments.split(";") if a]
        if not name or any(not var or not eq for var, eq, _ in pairs):
            parser.error(f"--variant {text!r}: expected NAME:VAR=VALUE[;VAR=VALUE...]")
        parsed.append((name, {var: value for var, _, value in pairs}))
    return parsed


result = dict(environment=bm.environment(), shape=f"B{B} T{T} H{H} K=V={D} M{M}", dtype=str(dtype), rows=[])
first = None
for (variant, env), setting in ((v, st) for v in variants() for st in args.settings.split(",")):
    saved = {var: os.environ.get(var) for var in env}
    os.environ.update(env)
    if setting == "default":  # the variable unset: segments.requested's default (on a GPU: S >= 4 or none)
        os.environ.pop(segments.ENV, None)
    else:
        os.environ[segments.ENV] = setting
    started = time.time()
    run_state, call = state_pass_alone()
    row = dict(variant=variant, env=env, setting=setting, S=segments.requested(call), chunk=call.spec.chunk_size,
               state_pass_ms=timed(run_state), fwd_ms=timed(lambda: forward()), fwdbwd_ms=timed(fwd_bwd))
    row.update(kernels(fwd_bwd))
    row.update(kernels(forward, "fwd_"))  # the forward's alone
    outputs = list(fwd_bwd()) + [x.grad for x in leaves]
    if first is None:
        first = [x.detach().clone() for x in outputs]
    diffs = [bm.rel(a, b) for a, b in zip(outputs, first)]  # NaN (an inf or NaN anywhere) must not hide in max()
    row["max_rel_diff"] = float("nan") if any(d != d for d in diffs) else max(diffs)
    row["rel_diffs"] = dict(zip(("o", "hk", "hv", "dq", "dk", "dv", "ds", "dg"), diffs))
    row["elapsed_s"] = round(time.time() - started, 1)
    result["rows"].append(row)
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    for var, value in saved.items():  # the next variant starts from the environment this one found
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value

print(f"\n{result['shape']} {dtype} ({result['environment']['gpu']}, torch {result['environment']['torch']}, "
      f"triton {result['environment']['triton']})")
columns = [name[4:] for name in KERNELS] + ["other"]
print(f"{'variant':>10} {'setting':>8} {'S':>3} {'chunk':>5} | {'state pass':>10} {'fwd':>8} {'fwd+bwd':>8} | "
      + " ".join(f"{'k:' + c[:8]:>10}" for c in columns) + f" | {'max diff':>8}")
for r in result["rows"]:
    print(f"{r['variant']:>10} {r['setting']:>8} {r['S']:>3} {r['chunk']:>5} | {r['state_pass_ms']:>10.3f} "
          f"{r['fwd_ms']:>8.3f} {r['fwdbwd_ms']:>8.3f} | "
          + " ".join(f"{r.get(c + '_kernel_ms', float('nan')):>10.3f}" for c in columns)
          + f" | {r['max_rel_diff']:>8.1e}")
print("(ms; k: kernel time summed over one forward+backward, by name; max diff vs the first row)")
if device == "cuda":
    print("\nthe forward's kernels alone (ms): " + " ".join(f"{c[:10]:>10}" for c in columns))
    for r in result["rows"]:
        print(f"{r['variant']:>10} {r['setting']:>8}  " + " ".join(
            f"{r.get('fwd_' + c + '_kernel_ms', float('nan')):>10.3f}" for c in columns)
            + f"  total {sum(r.get('fwd_' + c + '_kernel_ms', 0.0) for c in columns):.3f}")
