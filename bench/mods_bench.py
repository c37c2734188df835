"""The GatedSlotAttention forward with its element-wise ops fused into the kernels (GSAMods) vs run as
separate torch ops, on the GPU; prints one JSON row per measurement as it goes.

    python bench/mods_bench.py --out bench/results/<date>_h200_mods.json   # H200, bf16, about 2 min
    python bench/mods_bench.py --smoke                                      # CPU interpreter, tiny shapes

Fused: `GatedSlotAttention(fuse_mods=True)`: swish(q), swish(k), silu(v), g = logsigmoid(f) / 8 and
s = 1 - exp(g) happen inside the generated kernels on every load. Unfused: the same layer with
`fuse_mods=False` (the same state_dict), where those are torch ops with their own HBM round trips
(and saved activations under autograd). Rows, per shape (B, T, hidden, heads, slots; K = V =
hidden / heads):

    correctness       fused vs unfused output and gradients (bf16; first shape)
    layer_fwd         layer forward under torch.no_grad (prefill / inference)
    layer_fwd_train   layer forward with autograd recording (training forward), and its peak memory
    gsa_fwd           only the GSA part: chunk_gsa on raw q, k, v, f with mods vs maps + chunk_gsa
    gsa_fwd_gate_only / gsa_fwd_maps_only   the same with only gate_mod + s_from_gate, or only the maps, fused
    layer_gate_fwd / layer_gate_fwd_bwd   the layer with fuse_mods="gate" (only gate_mod and s fused; the
                      maps in torch) against the unfused one: forward (no_grad), forward + backward
    layer_fwd_bwd     forward + backward (first shape only, if the time budget allows)

Times are triton.testing.do_bench medians (ms); `saving_ms` = unfused - fused. On the GPU the gsa_fwd and
layer_fwd_bwd rows also hold each variant's CUDA kernel times over one call (`*_kernels_ms`, torch.profiler),
which say where a difference comes from (state pass, output pass, backward programs, host torch ops). Rows
that would pass `--budget` seconds are skipped (first calls compile the kernels of both variants).
"""
import argparse
import json
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F

from gsa_compile import GatedSlotAttention, GSAMods, chunk_gsa

GPU_SHAPES = [(4, 4096, 2048, 4, 64), (8, 2048, 2048, 16, 64), (1, 32768, 2048, 4, 64)]  # B, T, hidden, heads, M
SMOKE_SHAPES = [(1, 40, 32, 2, 8)]


def parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON result here (rewritten after every row)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    parser.add_argument("--budget", type=float, default=110.0, help="skip rows once this many seconds have passed")
    return parser.parse_args()


class Recorder:
    def __init__(self, out):
        import triton
        self.start, self.out = time.time(), out
        self.result = dict(environment=dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                                            torch=torch.__version__, triton=triton.__version__,
                                            date=time.strftime("%Y-%m-%d %H:%M:%S")), rows=[])

    def elapsed(self):
        return time.time() - self.start

    def __call__(self, **row):
        row["elapsed_s"] = round(self.elapsed(), 1)
        self.result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if self.out:
            with open(self.out, "w") as f:
                json.dump(self.result, f, indent=1)


def timer(smoke):
    if smoke:  # the interpreter: one host-timed call (no warm-up), enough to check the script runs
        def run(fn):
            start = time.perf_counter()
            fn()
            return round((time.perf_counter() - start) * 1e3, 3)
        return run
    import triton.testing
    return lambda fn: round(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"), 4)


def peak_mib(fn, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def layers(hidden, heads, slots, device, dtype, chunk_size):
    """The layer with fuse_mods False, True (all) and 'gate', one state_dict."""
    torch.manual_seed(0)
    made = [GatedSlotAttention(hidden_size=hidden, num_heads=heads, num_slots=slots, fuse_mods=fuse,
                               chunk_size=chunk_size).to(device=device, dtype=dtype) for fuse in (False, True, "gate")]
    for layer in made[1:]:
        layer.load_state_dict(made[0].state_dict())
    return made


def pair(record, bench, step, shape, fused_fn, unfused_fn, kernels=False, **extra):
    fused_ms, unfused_ms = bench(fused_fn), bench(unfused_fn)
    if kernels and torch.cuda.is_available():
        from gsa_compile.benchmark import kernel_shares
        extra.update(fused_kernels_ms=kernel_shares(fused_fn), unfused_kernels_ms=kernel_shares(unfused_fn))
    record(step=step, shape=shape, fused_ms=fused_ms, unfused_ms=unfused_ms,
           saving_ms=round(unfused_ms - fused_ms, 4), speedup=round(unfused_ms / fused_ms, 3), **extra)


def correctness(record, unfused, fused, x):
    outputs, grads = [], []
    for layer in (unfused, fused):
        xi = x.detach().requires_grad_()
        y, _ = layer(xi)
        y.float().square().mean().backward()
        outputs.append(y)
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
        layer.zero_grad(set_to_none=True)
    worst = max(rel(a, b) for a, b in zip(grads[1], grads[0]))
    record(step="correctness", o_rel=rel(outputs[1], outputs[0]), worst_grad_rel=worst)


def measure(record, bench, budget, first, B, T, hidden, heads, slots, device, dtype, smoke):
    """Every row of one shape."""
    shape = dict(B=B, T=T, hidden=hidden, heads=heads, K=hidden // heads, M=slots)
    unfused, fused, gate_fused = layers(hidden, heads, slots, device, dtype, 16 if smoke else None)
    x = torch.randn(B, T, hidden, device=device, dtype=dtype)
    if first:
        correctness(record, unfused, fused, x)
    with torch.no_grad():
        pair(record, bench, "layer_fwd", shape, lambda: fused(x), lambda: unfused(x))
    pair(record, bench, "layer_fwd_train", shape, lambda: fused(x), lambda: unfused(x),
         fused_peak_mib=peak_mib(lambda: fused(x), device), unfused_peak_mib=peak_mib(lambda: unfused(x), device))
    with torch.no_grad():
        pair(record, bench, "layer_gate_fwd", shape, lambda: gate_fused(x), lambda: unfused(x))

    H, K, M = heads, hidden // heads, slots
    q, k, v = (torch.randn(B, T, H, K, device=device, dtype=dtype) for _ in range(3))
    f = torch.randn(B, T, H, M, device=device, dtype=dtype)

    def gsa_unfused():
        g = F.logsigmoid(f) / 8
        return chunk_gsa(F.silu(q), F.silu(k), F.silu(v), (1 - g.exp()).to(dtype), g, 1.0, chunk_size=fused.chunk_size)[0]

    def gsa_fused():
        return chunk_gsa(q, k, v, None, f, 1.0, chunk_size=fused.chunk_size, mods=fused.mods)[0]
    with torch.no_grad():
        pair(record, bench, "gsa_fwd", shape, gsa_fused, gsa_unfused, kernels=True)
        # which fused part costs (session 6: the fused forward was slower): the gate alone, the maps alone
        fns = fused.mods.functions
        gate_only = GSAMods(gate_mod=fns["gate_mod"], s_from_gate=True)
        maps_only = GSAMods(q_map=fns["q_map"], k_map=fns["k_map"], v_map=fns["v_map"])

        def gsa_gate_only():
            return chunk_gsa(F.silu(q), F.silu(k), F.silu(v), None, f, 1.0, chunk_size=fused.chunk_size,
                             mods=gate_only)[0]

        def gsa_maps_only():
            g = F.logsigmoid(f) / 8
            return chunk_gsa(q, k, v, (1 - g.exp()).to(dtype), g, 1.0, chunk_size=fused.chunk_size, mods=maps_only)[0]
        reference = gsa_unfused()
        for step, fn in (("gsa_fwd_gate_only", gsa_gate_only), ("gsa_fwd_maps_only", gsa_maps_only)):
            pair(record, bench, step, shape, fn, gsa_unfused, kernels=True, o_rel=rel(fn(), reference))

    def fwd_bwd(layer):
        def run():
            layer(x)[0].float().square().mean().backward()
            layer.zero_grad(set_to_none=True)
        return run
    if record.elapsed() < budget:
        pair(record, bench, "layer_gate_fwd_bwd", shape, fwd_bwd(gate_fused), fwd_bwd(unfused), kernels=first)
    if first and record.elapsed() < budget:
        pair(record, bench, "layer_fwd_bwd", shape, fwd_bwd(fused), fwd_bwd(unfused), kernels=True,
             fused_peak_mib=peak_mib(fwd_bwd(fused), device), unfused_peak_mib=peak_mib(fwd_bwd(unfused), device))


def main():
    args = parse()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        sys.exit("no CUDA GPU: run with --smoke for the CPU interpreter check")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    record, bench = Recorder(args.out), timer(args.smoke)
    for index, shape in enumerate(SMOKE_SHAPES if args.smoke else GPU_SHAPES):
        if record.elapsed() > args.budget:
            record(step="skipped", shape=list(shape), reason="time budget")
            continue
        measure(record, bench, args.budget, index == 0, *shape, device, dtype, args.smoke)
        if device == "cuda":
            torch.cuda.empty_cache()
    record(step="done")


if __name__ == "__main__":
    main()
