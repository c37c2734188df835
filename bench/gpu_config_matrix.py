"""Which launch configs fault on this GPU: each (dtype, M, chunk, BK=BV, warps) runs a dense and a packed
forward+backward in its own process (CUDA_LAUNCH_BLOCKING=1, so a fault names its kernel and cannot
poison the others), several at once.

    python bench/gpu_config_matrix.py [--jobs 8] [--T 1024] [--sanitize] [--out FILE.json]

Found on the H200 in session 4: bf16, M=32, K=V=64, chunk 64, BK=BV=64, 4 warps, 2 stages faults with an
illegal memory access (float32 does not; the CPU interpreter's bounds checker finds nothing). Since then
bf16/fp16 pad the slot tile to 64 (spec.MIN_TENSOR_CORE_SLOT_TILE), unverified: --slot-tiles 16,64 runs
every config with the plain rule and with the padding.
`--sanitize` re-runs the first faulting config under `compute-sanitizer --tool memcheck` and keeps
the head of its report (the kernel, the instruction offset, the address).
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CHILD = r"""
import sys, torch
from gsa_compile import benchmark as bm, launch
from gsa_compile.spec import GateLayout, TileConfig
dtype, M, BT, BK, warps, T = sys.argv[1], *map(int, sys.argv[2:])
K = V = 64
config = TileConfig(BK=BK, BV=BK, num_warps=warps, num_stages=2)
for varlen in (False, True):
    q, k, v, s, g = bm.make_inputs(1, T, 2, K, V, M, "slot", getattr(torch, dtype), "cuda")
    cu = torch.tensor([0, T // 3, T // 3 + 5, T], device="cuda", dtype=torch.int32) if varlen else None
    where = "varlen" if varlen else "dense"
    print(where, "forward", flush=True)
    o, hk, hv = launch.forward(q, k, v, s, g, 0.125, None, None, cu, BT, GateLayout.SLOT, config=config)
    torch.cuda.synchronize()
    print(where, "backward", flush=True)
    launch.backward(torch.randn_like(o), None, None, q, k, v, s, g, 0.125, None, None, cu, BT, GateLayout.SLOT,
                    config=config)
    torch.cuda.synchronize()
print("ok", flush=True)
"""


def run(case, T, sanitize=False):
    dtype, M, BT, BK, warps, tile = case
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", GSA_STATE_SEGMENTS="off", GSA_MIN_SLOT_TILE=str(tile))
    command = [sys.executable, "-c", CHILD, dtype, str(M), str(BT), str(BK), str(warps), str(T)]
    if sanitize:
        command = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "5", *command]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    lines = done.stdout.strip().splitlines()
    status = "ok" if lines and lines[-1] == "ok" else f"FAULT in {lines[-1] if lines else 'start'}"
    error = next((line for line in reversed(done.stderr.splitlines()) if "Error" in line), "")
    return dict(dtype=dtype, M=M, chunk=BT, block=BK, warps=warps, min_slot_tile=tile, status=status,
                error=error[-200:], log=(done.stdout + done.stderr)[-4000:] if sanitize else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--slots", default="16,32,64")
    parser.add_argument("--chunks", default="16,32,64,128")
    parser.add_argument("--blocks", default="64")
    parser.add_argument("--warps", default="4")
    parser.add_argument("--slot-tiles", default="16,64", help="GSA_MIN_SLOT_TILE values (64: the padding that "
                        "main applies to bf16/fp16 since the crash; 16: the plain rule)")
    parser.add_argument("--sanitize", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    cases = list(itertools.product(args.dtypes.split(","), ints(args.slots), ints(args.chunks), ints(args.blocks),
                                   ints(args.warps), ints(args.slot_tiles)))
    def run_and_print(case):
        row = run(case, args.T)
        print(f"done: {case} {row['status']} {row['error']}", flush=True)  # visible if the call is cut short
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_and_print, cases))
    faults = [r for r in rows if r["status"] != "ok"]
    if args.sanitize and faults:
        first = faults[0]
        case = (first["dtype"], first["M"], first["chunk"], first["block"], first["warps"], first["min_slot_tile"])
        first["sanitizer"] = run(case, args.T, sanitize=True)["log"]
        print(first["sanitizer"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(T=args.T, rows=rows), f, indent=1)
    print(f"\nT={args.T}, K=V=64, 2 stages: {len(faults)} of {len(rows)} configs fault")
    print(f"{'dtype':<9} {'M':>3} {'chunk':>5} {'BK=BV':>5} {'warps':>5} {'BM>=':>4} | status")
    for r in rows:
        print(f"{r['dtype']:<9} {r['M']:>3} {r['chunk']:>5} {r['block']:>5} {r['warps']:>5} {r['min_slot_tile']:>4} | "
              f"{r['status']} {r['error']}")


if __name__ == "__main__":
    main()
