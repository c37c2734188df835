"""Decode timings on the GPU: one token against fp32 states, ours (in place) vs fla's fused_recurrent_gsa.

    python bench/decode_bench.py [--out decode.json] [--splits auto,1,2,4,8]

For each batch size: correctness of one step vs the float64 reference, then the median time of
one step with `triton.testing.do_bench` (host launch overhead included) and with
`do_bench_cudagraph` (the step captured in a CUDA graph, as a serving loop would run it).
--splits: one row per value of NS, the programs per (sequence, kv head) of the split decode
(GSA_DECODE_SPLITS; "auto" = launch_decode.decode_splits' choice, 1 = the one-launch kernel).
--configs "64,64,4;128,128,8": one row per tile config BK,BV,warps of the decode kernels as well
(GSA_DECODE_CONFIG; "default" = launch_decode.decode_tiles' choice: 128-wide tiles and 8 warps for NS = 1,
32-wide and 4 warps for the split decode).
State read+write floor: B*H*(K*M + M*V)*4 bytes * 2 / 4.2 TB/s; `copy_graph_ms` is what the GPU takes
to read and write those bytes in practice (hk and hv copied into other buffers, in a CUDA graph).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton.testing

from gsa_compile import benchmark as bm
from gsa_compile import launch_decode, overrides, recurrent_gsa, recurrent_step


def inputs(B, H, K, V, M, dtype=torch.bfloat16):
    q, k, v = (torch.randn(B, 1, H, d, device="cuda", dtype=dtype) for d in (K, K, V))
    s = torch.sigmoid(torch.randn(B, 1, H, M, device="cuda")).to(dtype)
    g = (F.logsigmoid(torch.randn(B, 1, H, M, device="cuda")) / 16)
    hk = torch.randn(B, H, K, M, device="cuda") * 0.1
    hv = torch.randn(B, H, M, V, device="cuda") * 0.1
    return q, k, v, s, g, hk, hv


def measure(shape, splits, fused_recurrent_gsa):
    B, H, K, V, M = (int(x) for x in shape.split(","))
    q, k, v, s, g, hk, hv = inputs(B, H, K, V, M)
    ro, (rhk, rhv) = recurrent_gsa(*(x.double() for x in (q, k, v, s, g)),
                                   initial_state=(hk.double(), hv.double()), output_final_state=True)
    hk1, hv1 = hk.clone(), hv.clone()
    o, _ = recurrent_step(q, k, v, s, g, state=(hk1, hv1), inplace=True)
    row = dict(B=B, H=H, K=K, V=V, M=M, splits=splits, NS=launch_decode.decode_splits(B * H, K, V, q.device),
               o_err=bm.rel(o, ro), hk_err=bm.rel(hk1, rhk), hv_err=bm.rel(hv1, rhv))
    step = lambda: recurrent_step(q, k, v, s, g, state=(hk1, hv1), inplace=True)
    raw = lambda: torch.ops.gsa.recurrent_step_(q, k, v, s, g, K ** -0.5, hk1, hv1, "slot")
    row["ours_ms"] = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
    row["ours_op_ms"] = triton.testing.do_bench(raw, warmup=25, rep=200, return_mode="median")
    with torch.cuda.stream(torch.cuda.Stream()):
        row["ours_graph_ms"] = triton.testing.do_bench_cudagraph(raw, rep=200, return_mode="median")
    row["floor_ms"] = B * H * (K * M + M * V) * 4 * 2 / 4.2e12 * 1e3
    hk2, hv2 = torch.empty_like(hk1), torch.empty_like(hv1)
    copy = lambda: (hk2.copy_(hk1), hv2.copy_(hv1))  # noqa: E731 - the state bytes read and written once
    with torch.cuda.stream(torch.cuda.Stream()):
        row["copy_graph_ms"] = triton.testing.do_bench_cudagraph(copy, rep=200, return_mode="median")
    print(json.dumps(row), flush=True)
    if fused_recurrent_gsa is not None:
        state = (hk.clone(), hv.clone())
        fo, _ = fused_recurrent_gsa(q, k, v, s, g, initial_state=state, output_final_state=True)
        row["fla_o_err"] = bm.rel(fo, ro)
        fla = lambda: fused_recurrent_gsa(q, k, v, s, g, initial_state=state, output_final_state=True)
        row["fla_ms"] = triton.testing.do_bench(fla, warmup=25, rep=200, return_mode="median")
        with torch.cuda.stream(torch.cuda.Stream()):
            row["fla_graph_ms"] = triton.testing.do_bench_cudagraph(fla, rep=200, return_mode="median")
    print(json.dumps(row), flush=True)
    return row


def set_env(name, value):
    """value `auto` / `default` clears the override."""
    if value in ("auto", "default"):
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--shapes", default="64,4,512,512,64;1,4,512,512,64")
    parser.add_argument("--splits", default="auto", help="comma list of NS values or auto (split decode)")
    parser.add_argument("--configs", default="default",
                        help="';' list of BK,BV,warps for the decode kernels (GSA_DECODE_CONFIG) or default")
    args = parser.parse_args()
    try:
        from fla.ops.gsa import fused_recurrent_gsa
    except Exception as exc:
        print(f"fla unavailable: {exc!r}", flush=True)
        fused_recurrent_gsa = None
    result = dict(environment=bm.environment(), rows=[])
    for shape in args.shapes.split(";"):
        runs = [(c, n) for c in args.configs.split(";") for n in args.splits.split(",")]
        for n, (config, splits) in enumerate(runs):
            set_env(launch_decode.DECODE_SPLITS_ENV, splits)
            set_env(overrides.DECODE_CONFIG_ENV, config)
            row = measure(shape, splits, fused_recurrent_gsa if n == 0 else None)
            row["config"] = config
            result["rows"].append(row)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
    set_env(launch_decode.DECODE_SPLITS_ENV, "auto")
    set_env(overrides.DECODE_CONFIG_ENV, "default")
    print(f"{'shape':<26} {'NS':>4} {'BK,BV,warps':>11} {'ours':>8} {'op':>8} {'graph':>8} {'fla':>8} {'fla gr':>8} "
          f"{'floor':>8} {'copy':>8}")
    for r in result["rows"]:
        print(f"B{r['B']} H{r['H']} K{r['K']} V{r['V']} M{r['M']:<6} {r['NS']:>4} {r['config']:>11} "
              f"{r['ours_ms']:8.4f} {r['ours_op_ms']:8.4f} "
              f"{r['ours_graph_ms']:8.4f} {r.get('fla_ms', float('nan')):8.4f} {r.get('fla_graph_ms', float('nan')):8.4f} "
              f"{r['floor_ms']:8.4f} {r.get('copy_graph_ms', float('nan')):8.4f}")


if __name__ == "__main__":
    main()
