"""Correctness on fresh random inputs, then timings of gsa_compile vs fla vs SDPA, in one run.

    python bench/compare.py [--quick] [--out results.json]

Correctness: bf16 (and fp32) chunk_gsa vs the float64 reference for every gate layout.
Timing: triton.testing.do_bench medians; fla's chunk_gsa (fla-core, if importable) and causal
SDPA at the same width (HQ heads of K) side by side. Prints a table last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

import torch
import torch.nn.functional as F

import gsa_compile
from gsa_compile import chunk_gsa, recurrent_gsa

SHAPES = [  # (B, T, H, K=V, M)
    (4, 4096, 4, 512, 64),
    (8, 2048, 16, 128, 64),
    (1, 32768, 4, 512, 64),
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, K, V, M, layout, dtype, device, HQ=None, requires_grad=False):
    HQ = HQ or H
    q = torch.randn(B, T, HQ, K, device=device, dtype=dtype)
    k = torch.randn(B, T, H, K, device=device, dtype=dtype)
    v = torch.randn(B, T, H, V, device=device, dtype=dtype)
    f = torch.randn(B, T, H, M, device=device)
    s = (torch.sigmoid(f) if layout != "abc" else f).to(dtype)
    g = {"slot": lambda: F.logsigmoid(torch.randn(B, T, H, M, device=device)) / 16,
         "head": lambda: F.logsigmoid(torch.randn(B, T, H, device=device)) / 16,
         "decay_head": lambda: -torch.rand(H, device=device) / 16,
         "decay_slot": lambda: -torch.rand(H, M, device=device) / 16,
         "abc": lambda: None}[layout]()
    tensors = [q, k, v, s] + ([g] if g is not None else [])
    for x in tensors:
        x.requires_grad_(requires_grad)
    return q, k, v, s, g


def check_correctness(device, quick):
    rows = []
    B, T, H, K, V, M = (1, 300, 2, 64, 64, 32) if quick else (2, 1000, 4, 128, 96, 64)
    cases = [(layout, 64) for layout in ("slot", "head", "decay_head", "decay_slot", "abc")]
    cases += [("slot", 16), ("slot", 32), ("slot", 128)]
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-4)):
        for layout, chunk in cases:
                q, k, v, s, g = make_inputs(B, T, H, K, V, M, layout, dtype, device, HQ=2 * H)
                h0 = (torch.randn(B, H, K, M, device=device), torch.randn(B, H, M, V, device=device))
                o, (hk, hv) = chunk_gsa(q, k, v, s, g, initial_state=h0, output_final_state=True, chunk_size=chunk)
                ro, (rhk, rhv) = recurrent_gsa(q, k, v, s, g, initial_state=h0, output_final_state=True)
                errs = (rel(o, ro), rel(hk, rhk), rel(hv, rhv))
                ok = all(e <= tol for e in errs) and torch.isfinite(o).all().item()
                rows.append(dict(dtype=str(dtype).split(".")[1], layout=layout, chunk=chunk,
                                 err_o=errs[0], err_hk=errs[1], err_hv=errs[2], tol=tol, ok=ok))
    return rows


def check_compile(device):
    """fullgraph torch.compile (Inductor) with dynamic T: matches eager, compiles once."""
    import torch._dynamo
    torch._dynamo.reset()

    def fn(q, k, v, s, g):
        o, _ = chunk_gsa(q, k, v, s, g)
        return o.float().sum(-1)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    errs = []
    for T in (200, 333):
        q, k, v, s, g = make_inputs(2, T, 2, 64, 64, 32, "slot", torch.bfloat16, device)
        errs.append(rel(compiled(q, k, v, s, g), fn(q, k, v, s, g)))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return dict(rel_err=max(errs), unique_graphs=frames, ok=max(errs) < 1e-3 and frames == 1)


def bench(fn, rep=200):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def time_shapes(device, shapes, backward=False):
    try:
        from fla.ops.gsa import chunk_gsa as fla_chunk_gsa
    except Exception as e:  # fla-core not installed
        print(f"fla unavailable: {e!r}", file=sys.stderr)
        fla_chunk_gsa = None
    rows = []
    for (B, T, H, D, M) in shapes:
        q, k, v, s, g = make_inputs(B, T, H, D, D, M, "slot", torch.bfloat16, device, requires_grad=backward)
        row = dict(B=B, T=T, H=H, K=D, V=D, M=M)
        ours = lambda: chunk_gsa(q, k, v, s, g)[0]
        row["ours_fwd_ms"] = bench(ours)
        if fla_chunk_gsa is not None:
            fla = lambda: fla_chunk_gsa(q, k, v, s, g)[0]
            o_ref = fla()
            row["fla_vs_ours_rel"] = rel(ours(), o_ref)
            row["fla_fwd_ms"] = bench(fla)
        qs, ks, vs = (x.detach().transpose(1, 2).contiguous() for x in (q, k, v))
        row["sdpa_fwd_ms"] = bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
        bytes_moved = sum(x.numel() * x.element_size() for x in (q, k, v, s, g)) + q.numel() * 2
        row["hbm_floor_ms"] = bytes_moved / 4.2e12 * 1e3
        rows.append(row)
        del q, k, v, s, g, qs, ks, vs
        torch.cuda.empty_cache()
    return rows


def environment():
    import triton
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
                torch=torch.__version__, triton=triton.__version__, gsa_compile=gsa_compile.__version__)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args(argv)
    device = "cuda"
    torch.manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    result = dict(environment=environment(), correctness=check_correctness(device, args.quick))
    result["compile"] = check_compile(device)
    print("torch.compile(fullgraph, dynamic):", result["compile"])
    if not args.no_timing:
        result["timing"] = time_shapes(device, SHAPES[:2] if args.quick else SHAPES)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    bad = [r for r in result["correctness"] if not r["ok"]]
    print(f"correctness: {len(result['correctness']) - len(bad)}/{len(result['correctness'])} ok")
    for r in bad:
        print("  FAIL", r)
    worst = {}
    for r in result["correctness"]:
        worst[r["dtype"]] = max(worst.get(r["dtype"], 0), r["err_o"], r["err_hk"], r["err_hv"])
    print("worst relative error per dtype:", {k: f"{v:.2e}" for k, v in worst.items()})
    for r in result.get("timing", []):
        fla = r.get("fla_fwd_ms")
        print(f"B{r['B']} T{r['T']} H{r['H']} K=V={r['K']} M{r['M']}: ours {r['ours_fwd_ms']:.3f} ms"
              + (f" | fla {fla:.3f} ms ({fla / r['ours_fwd_ms']:.2f}x) rel-diff {r['fla_vs_ours_rel']:.1e}" if fla else "")
              + f" | sdpa {r['sdpa_fwd_ms']:.3f} ms | floor {r['hbm_floor_ms']:.3f} ms")
    return 1 if bad or not result["compile"]["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
