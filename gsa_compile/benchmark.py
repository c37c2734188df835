"""One GPU run: correctness on fresh random inputs, then gsa_compile vs fla vs SDPA side by side.

    python -m gsa_compile bench [--quick] [--out results.json]

1. correctness: bf16/fp32 chunk_gsa outputs, final states and gradients vs the float64 reference;
2. torch.compile(fullgraph=True, dynamic=True) of a forward and of a training step;
3. timings (triton.testing.do_bench medians; inputs larger than L2): forward and forward+backward of
   ours, fla's chunk_gsa (if fla-core imports) and causal SDPA at the same model width (heads of 128),
   with the peak memory of forward+backward and each kernel's share of our time; the kernels' GPU time
   alone, and ours and fla's replayed from a CUDA graph (the host's launch path out of the loop).
A table is printed last.
"""
from __future__ import annotations

import datetime
import json
import sys

import torch
import torch.nn.functional as F

SHAPES = [(4, 4096, 4, 512, 64), (8, 2048, 16, 128, 64), (1, 32768, 4, 512, 64)]  # B, T, H, K=V, M
LAYOUTS = ("slot", "head", "decay_head", "decay_slot", "abc")
CORRECTNESS = dict(quick=(1, 200, 2, 128, 128, 64), full=(2, 400, 2, 128, 128, 64))  # B, T, H, K, V, M
COMPILE_LENGTHS = (200, 333)
SDPA_HEAD_DIM = 128


def rel(a, b, scale=None, floor=1e-30):
    """||a - b|| / max(||scale||, floor), in float64, scale = b by default."""
    norm = (b if scale is None else scale).double().norm().clamp_min(floor)
    return ((a.double() - b.double()).norm() / norm).item()


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
    for x in (q, k, v, s, g):
        if x is not None:
            x.requires_grad_(requires_grad)
    return q, k, v, s, g


CORRECTNESS_CASES = [("bfloat16", layout, 64) for layout in LAYOUTS] + [("bfloat16", "slot", 128), ("float32", "slot", 64)]


def check_correctness(device, quick, cases=CORRECTNESS_CASES):
    """Values and gradients vs recurrent_gsa (float64) on fresh inputs; bf16 tolerances 1e-2 (values),
    2e-2 (gradients), 1e-1 (the gate's gradient, measured against the summed magnitudes of its per-token
    terms, as README's Guarantees: a decay's dg is a sum over every token whose terms cancel)."""
    from . import chunk_gsa, recurrent_gsa
    from .reference import gate_gradient_scale
    B, T, H, K, V, M = CORRECTNESS["quick" if quick else "full"]
    rows = []
    for dtype_name, layout, chunk in cases:
        dtype = getattr(torch, dtype_name)
        inputs = make_inputs(B, T, H, K, V, M, layout, dtype, device, HQ=2 * H, requires_grad=True)
        h0 = [torch.randn(B, H, K, M, device=device).requires_grad_(), torch.randn(B, H, M, V, device=device).requires_grad_()]
        o, (hk, hv) = chunk_gsa(*inputs, initial_state=tuple(h0), output_final_state=True, chunk_size=chunk)
        ref_in = [x.detach().double().requires_grad_() if x is not None else None for x in list(inputs) + h0]
        ro, (rhk, rhv) = recurrent_gsa(*ref_in[:5], initial_state=tuple(ref_in[5:]), output_final_state=True)
        weights = [torch.randn_like(x) for x in (ro, rhk, rhv)]
        sum((a.double() * w).sum() for a, w in zip((o, hk, hv), weights)).backward()
        sum((a * w).sum() for a, w in zip((ro, rhk, rhv), weights)).backward()
        value_err = max(rel(a, b) for a, b in zip((o, hk, hv), (ro, rhk, rhv)))
        pairs = [(a, b) for a, b in zip(list(inputs) + h0, ref_in) if a is not None]
        gate = inputs[4]
        grad_err = max(rel(a.grad, b.grad) for a, b in pairs if a is not gate)
        gate_err = 0.0 if gate is None else rel(gate.grad, ref_in[4].grad, gate_gradient_scale(
            *ref_in[:5], weights, initial_state=tuple(ref_in[5:])))
        finite = all(torch.isfinite(a.grad).all().item() for a, _ in pairs) and torch.isfinite(o).all().item()
        tol = (1e-2, 2e-2, 1e-1) if dtype_name != "float32" else (1e-4, 1e-4, 1e-4)
        rows.append(dict(dtype=dtype_name, layout=layout, chunk=chunk, value_err=value_err, grad_err=grad_err,
                         gate_grad_err=gate_err,
                         ok=finite and value_err <= tol[0] and grad_err <= tol[1] and gate_err <= tol[2]))
    return rows


def check_compile(device):
    """Forward with dynamic T, and a training step, under torch.compile(fullgraph=True)."""
    import torch._dynamo
    from . import chunk_gsa
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def forward(q, k, v, s, g):
        return chunk_gsa(q, k, v, s, g)[0].float().sum(-1)

    compiled = torch.compile(forward, fullgraph=True, dynamic=True)
    errs = []
    for T in COMPILE_LENGTHS:
        inputs = make_inputs(2, T, 2, 64, 64, 32, "slot", torch.bfloat16, device)
        errs.append(rel(compiled(*inputs), forward(*inputs)))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def loss_fn(q, k, v, s, g):
        return chunk_gsa(q, k, v, s, g)[0].float().pow(2).mean()

    inputs = make_inputs(2, 256, 2, 64, 64, 32, "slot", torch.bfloat16, device, requires_grad=True)
    torch.compile(loss_fn, fullgraph=True)(*inputs).backward()  # compiled forward and backward graphs
    compiled_grads = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    loss_fn(*inputs).backward()
    grad_err = max(rel(a, x.grad) for a, x in zip(compiled_grads, inputs))
    return dict(forward_rel_err=max(errs), unique_graphs=graphs, train_step_grad_err=grad_err,
                ok=max(errs) < 1e-3 and graphs == 1 and grad_err < 1e-3)


def bench(fn, rep=100):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def bench_graph(fn, rep=100):
    """The median of `fn` replayed from a CUDA graph (triton.testing.do_bench_cudagraph; no L2 flush): the
    host's launch path out of the loop, as a graph-captured training step runs. None (reason on stderr) where
    `fn` does not capture."""
    import triton.testing
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    except Exception as exc:  # a peer's kernels that do not capture
        print(f"no CUDA graph timing: {exc!r}"[:300], file=sys.stderr)
        return None


def _fwd_bwd(fn, inputs, do):
    def run():
        for x in inputs:
            x.grad = None
        fn().backward(do)
    return run


def peak_memory(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def kernel_shares(fn):
    """Each CUDA kernel's total time (ms) over one call, by name."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    shares = {}
    for event in prof.key_averages():  # names cut to 60 characters: torch's kernels share long prefixes, so sum
        if event.device_time_total > 0:
            shares[event.key[:60]] = shares.get(event.key[:60], 0.0) + event.device_time_total / 1e3
    return {name: round(ms, 4) for name, ms in shares.items()}


def kernel_total(shares: dict) -> float:
    """The GPU time of one call's kernels (a kernel_shares dict summed), host excluded: where a call is bound
    by its host time (a slow host, few or small kernels) its wall time says little about the kernels, and
    the host's speed varies between machines and runs (fla's shape-1 forward: 0.68-1.43 ms across sessions
    8-10 with the same wheel and autotuning pack)."""
    return round(sum(shares.values()), 4)


def fla_chunk_gsa():
    """fla's chunk_gsa, or None (with the reason on stderr) where fla-core does not import."""
    try:
        from fla.ops.gsa import chunk_gsa
        return chunk_gsa
    except Exception as exc:  # fla-core not installed here
        print(f"fla unavailable: {exc!r}", file=sys.stderr)
        return None


def sdpa_inputs(B, T, H, D, device):
    """Causal SDPA at the same model width H * D, in heads of 128 (FlashAttention's head dims stop at 256)."""
    qs, ks, vs = (torch.randn(B, H * D // SDPA_HEAD_DIM, T, SDPA_HEAD_DIM, device=device, dtype=torch.bfloat16,
                              requires_grad=True) for _ in range(3))
    return (lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)), (qs, ks, vs), torch.randn_like(qs)


def time_shapes(device, shapes):
    from . import chunk_gsa
    fla_gsa = fla_chunk_gsa()
    rows = []
    for (B, T, H, D, M) in shapes:
        inputs = make_inputs(B, T, H, D, D, M, "slot", torch.bfloat16, device, requires_grad=True)
        do = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
        row = dict(B=B, T=T, H=H, K=D, V=D, M=M)
        ours = lambda: chunk_gsa(*inputs)[0]
        row["ours_fwd_ms"] = bench(ours)
        row["ours_fwdbwd_ms"] = bench(_fwd_bwd(ours, inputs, do))
        row["ours_fwdbwd_peak_mib"] = peak_memory(_fwd_bwd(ours, inputs, do))
        row["ours_kernels_fwdbwd_ms"] = kernel_shares(_fwd_bwd(ours, inputs, do))
        row["ours_kernels_fwd_total_ms"] = kernel_total(kernel_shares(ours))
        row["ours_kernels_fwdbwd_total_ms"] = kernel_total(row["ours_kernels_fwdbwd_ms"])
        row["ours_fwd_graph_ms"] = bench_graph(ours)
        row["ours_fwdbwd_graph_ms"] = bench_graph(_fwd_bwd(ours, inputs, do))
        kept = _fwd_bwd(lambda: chunk_gsa(*inputs, checkpoint_level=0)[0], inputs, do)  # the states kept, not recomputed
        row["ours_kept_fwdbwd_ms"] = bench(kept)
        row["ours_kept_kernels_fwdbwd_total_ms"] = kernel_total(kernel_shares(kept))
        if fla_gsa is not None:
            fla = lambda: fla_gsa(*inputs)[0]
            row["fla_vs_ours_rel"] = rel(ours(), fla())
            row["fla_fwd_ms"] = bench(fla)
            row["fla_fwdbwd_ms"] = bench(_fwd_bwd(fla, inputs, do))
            row["fla_fwdbwd_peak_mib"] = peak_memory(_fwd_bwd(fla, inputs, do))
            row["fla_kernels_fwd_total_ms"] = kernel_total(kernel_shares(fla))
            row["fla_kernels_fwdbwd_total_ms"] = kernel_total(kernel_shares(_fwd_bwd(fla, inputs, do)))
        sdpa, sdpa_args, sdpa_do = sdpa_inputs(B, T, H, D, device)
        row["sdpa_fwd_ms"] = bench(sdpa)
        row["sdpa_fwdbwd_ms"] = bench(_fwd_bwd(sdpa, sdpa_args, sdpa_do))
        first_read = sum(x.numel() * x.element_size() for x in inputs) + do.numel() * do.element_size()
        row["hbm_floor_fwd_ms"] = first_read / 4.2e12 * 1e3  # read q, k, v, s, g once, write o once
        if fla_gsa is not None:  # last: a failed capture is the one timing that could disturb the next
            row["fla_fwd_graph_ms"] = bench_graph(fla)
            row["fla_fwdbwd_graph_ms"] = bench_graph(_fwd_bwd(fla, inputs, do))
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


SWEEP_LENGTHS = (512, 2048, 8192, 16384, 32768, 65536)
SWEEP_SHAPE = (1, 4, 512, 64)  # B, H, K = V, M


def sweep(device, lengths=SWEEP_LENGTHS):
    """Forward and forward+backward times against T: ours, fla's and causal SDPA's (same width), each as an
    eager call (do_bench: the host's launch path included) and replayed from a CUDA graph (`*_graph_ms`: the
    kernels alone, where the eager call is host bound); fla's graph replays last (see time_shapes)."""
    from . import chunk_gsa
    fla = fla_chunk_gsa()
    B, H, D, M = SWEEP_SHAPE
    rows = []
    for T in lengths:
        inputs = make_inputs(B, T, H, D, D, M, "slot", torch.bfloat16, device, requires_grad=True)
        do = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
        runs = {"ours": (lambda: chunk_gsa(*inputs)[0], inputs, do)}
        if fla is not None:
            runs["fla"] = (lambda: fla(*inputs)[0], inputs, do)
        runs["sdpa"] = sdpa_inputs(B, T, H, D, device)
        row = dict(B=B, T=T, H=H, K=D, V=D, M=M)
        for name, (fn, args, grad) in runs.items():
            row[f"{name}_fwd_ms"] = bench(fn)
            row[f"{name}_fwdbwd_ms"] = bench(_fwd_bwd(fn, args, grad))
        for name in sorted(runs, key=lambda n: n == "fla"):
            fn, args, grad = runs[name]
            row[f"{name}_fwd_graph_ms"] = bench_graph(fn)
            row[f"{name}_fwdbwd_graph_ms"] = bench_graph(_fwd_bwd(fn, args, grad))
        print(json.dumps(row), flush=True)
        rows.append(row)
        inputs = do = runs = None  # this length's tensors freed before the next length's
        torch.cuda.empty_cache()
    return rows


def plot_sweep(rows, path):
    """Time against T (log-log), forward and forward+backward side by side, as a PNG: eager calls solid, CUDA
    graph replays (where timed) dashed in the same colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind, title in zip(axes, ("fwd", "fwdbwd"), ("forward", "forward + backward")):
        for name in ("ours", "fla", "sdpa"):
            label = {"ours": "gsa_compile", "sdpa": "SDPA causal"}.get(name, name)
            points = [(r["T"], r[f"{name}_{kind}_ms"]) for r in rows if f"{name}_{kind}_ms" in r]
            if points:
                line, = ax.plot(*zip(*points), marker="o", label=label + " (eager)")
                replays = [(r["T"], r[f"{name}_{kind}_graph_ms"]) for r in rows if r.get(f"{name}_{kind}_graph_ms")]
                if replays:
                    ax.plot(*zip(*replays), marker="x", linestyle="--", color=line.get_color(),
                            label=label + " (CUDA graph)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{title}, B1 H4 K=V=512 M64 bf16")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def environment():
    import triton
    from . import __version__, tuner
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                torch=torch.__version__, triton=triton.__version__, gsa_compile=__version__,
                kernel_source_hash=tuner.source_hash(),  # names the kernels even where .git is absent or stale
                other_gpu_processes=other_gpu_processes())


def other_gpu_processes():
    """[[pid, MiB], ...] of other processes holding GPU memory (nvidia-smi), [] for none, None where nvidia-smi
    does not answer (no GPU). A timing taken beside one shares the GPU: session 5's bench ran beside fla's
    autotuning. Recorded with every environment() and around the bench's timings."""
    import os
    import subprocess
    try:
        done = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_compute_apps(done.stdout, os.getpid()) if done.returncode == 0 else None


def parse_compute_apps(text: str, own_pid: int):
    """nvidia-smi's `pid, used_memory` CSV lines -> [[pid, MiB or None]] without `own_pid`."""
    rows = []
    for line in text.splitlines():
        pid, _, mib = (part.strip() for part in line.partition(","))
        if pid.isdigit() and int(pid) != own_pid:
            rows.append([int(pid), int(mib) if mib.isdigit() else None])
    return rows


def _row_label(r) -> str:
    return f"B{r['B']} T{r['T']} H{r['H']} K=V={r['K']} M{r['M']:<4}"


def _ours_vs_fla(r, key: str) -> str:
    """The 'ours fla fla/ours' cells of the forward and the forward+backward, read from r[key] with {n} = ours,
    fla and {kind} = fwd, fwdbwd; a missing or None value prints as nan."""
    cells = []
    for kind in ("fwd", "fwdbwd"):
        mine, theirs = (r.get(key.format(n=n, kind=kind)) for n in ("ours", "fla"))
        mine, theirs = (float("nan") if x is None else x for x in (mine, theirs))
        cells.append(f"{mine:9.3f} {theirs:9.3f} {theirs / mine:5.2f}")
    return " | ".join(cells)


def print_table(result):
    shared = [x for x in (result["environment"].get("other_gpu_processes"),
                          result.get("other_gpu_processes_after_timing")) if x]
    if shared:
        print(f"WARNING: other processes held the GPU during this run (pid, MiB): {shared}; the timings are not clean")
    bad = [r for r in result["correctness"] if not r["ok"]]
    print(f"correctness: {len(result['correctness']) - len(bad)}/{len(result['correctness'])} ok")
    for r in result["correctness"]:
        print(f"  {r['dtype']:<9} {r['layout']:<11} chunk {r['chunk']:<4} values {r['value_err']:.1e}  "
              f"grads {r['grad_err']:.1e}  dg {r.get('gate_grad_err', float('nan')):.1e}  {'ok' if r['ok'] else 'FAIL'}")
    print("torch.compile:", {k: v for k, v in result["compile"].items() if k != "error"})
    print(f"{'shape':<28} | {'ours fwd':>9} {'fla fwd':>9} {'x':>5} | {'ours f+b':>9} {'fla f+b':>9} {'x':>5} | "
          f"{'sdpa fwd':>9} {'sdpa f+b':>9} | {'mem ours':>9} {'mem fla':>9} | floor")
    for r in result.get("timing", []):
        fla_f, fla_fb = r.get("fla_fwd_ms", float("nan")), r.get("fla_fwdbwd_ms", float("nan"))
        print(f"{_row_label(r)} | {r['ours_fwd_ms']:9.3f} {fla_f:9.3f} "
              f"{fla_f / r['ours_fwd_ms']:5.2f} | {r['ours_fwdbwd_ms']:9.3f} {fla_fb:9.3f} {fla_fb / r['ours_fwdbwd_ms']:5.2f} | "
              f"{r['sdpa_fwd_ms']:9.3f} {r['sdpa_fwdbwd_ms']:9.3f} | {r['ours_fwdbwd_peak_mib']:9.0f} "
              f"{r.get('fla_fwdbwd_peak_mib', float('nan')):9.0f} | {r['hbm_floor_fwd_ms']:.3f}")
    if any("ours_kernels_fwd_total_ms" in r for r in result.get("timing", [])):
        print("kept: ours with checkpoint_level=0 (the forward's chunk states kept for a backward at its chunk size)")
        print(f"{'GPU kernel time (host excluded)':<28} | {'ours fwd':>9} {'fla fwd':>9} {'x':>5} | {'ours f+b':>9} "
              f"{'fla f+b':>9} {'x':>5} | {'kept f+b':>9} {'wall':>9}")
        for r in result["timing"]:
            kept = (f"{r.get('ours_kept_kernels_fwdbwd_total_ms', float('nan')):9.3f} "
                    f"{r.get('ours_kept_fwdbwd_ms', float('nan')):9.3f}")
            print(f"{_row_label(r)} | {_ours_vs_fla(r, '{n}_kernels_{kind}_total_ms')} | {kept}")
    if any("ours_fwdbwd_graph_ms" in r for r in result.get("timing", [])):
        print(f"{'CUDA graph replay (no host)':<28} | {'ours fwd':>9} {'fla fwd':>9} {'x':>5} | {'ours f+b':>9} "
              f"{'fla f+b':>9} {'x':>5}")
        for r in result["timing"]:
            print(f"{_row_label(r)} | {_ours_vs_fla(r, '{n}_{kind}_graph_ms')}")
    for suffix, title in (("", "eager"), ("_graph", "CUDA graph replay")) if result.get("sweep") else ():
        print(f"{'T (' + title + ')':>24} | " + " ".join(f"{n + ' ' + k:>12}" for n in ("ours", "fla", "sdpa")
                                                      for k in ("fwd", "f+b")))
        for r in result["sweep"]:
            print(f"{r['T']:>24} | " + " ".join(f"{r.get(f'{n}_{k}{suffix}_ms') or float('nan'):12.3f}"
                                              for n in ("ours", "fla", "sdpa") for k in ("fwd", "fwdbwd")))
    return not bad and result["compile"]["ok"]


def _task(name, arg):
    """One unit of parallel work (in a fresh process; its compiles land in the shared Triton cache).
    A failure comes back as text: tracebacks do not pickle."""
    import traceback
    try:
        return _run_task(name, arg)
    except Exception:
        text = traceback.format_exc()
        print(text, file=sys.stderr)
        if name == "correctness":
            return [dict(dtype=c[0], layout=c[1], chunk=c[2], value_err=float("nan"), grad_err=float("nan"),
                         gate_grad_err=float("nan"),
                         ok=False, error=text[-2000:]) for c in arg[1]]
        return dict(ok=False, error=text[-2000:])


def _run_task(name, arg):
    torch.manual_seed(torch.seed() % 2**31)
    if name == "correctness":
        return check_correctness("cuda", *arg)
    if name == "compile":
        return check_compile("cuda")
    if name == "warm":  # compile the timed kernels (forward and backward) on a small problem
        from . import chunk_gsa
        B, T, H, D, M = arg
        inputs = make_inputs(1, 512, H, D, D, M, "slot", torch.bfloat16, "cuda", requires_grad=True)
        chunk_gsa(*inputs)[0].float().sum().backward()
        torch.cuda.synchronize()
        return None
    raise ValueError(name)


def run(quick=False, out=None, timing=True, jobs=6, sweep_lengths=()):
    """The whole GPU run; returns the exit code. Checks run in `jobs` processes to overlap compiles."""
    import concurrent.futures
    import multiprocessing
    tasks = [("correctness", (quick, [case])) for case in CORRECTNESS_CASES] + [("compile", None)]
    tasks += [("warm", shape) for shape in {(1, 1, s[2], s[3], s[4]) for s in SHAPES}] if timing else []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        results = list(pool.map(_task, *zip(*tasks)))
    result = dict(environment=environment(),
                  correctness=[row for (name, _), rows in zip(tasks, results) if name == "correctness" for row in rows],
                  compile=results[len(CORRECTNESS_CASES)])

    def save():  # after every stage: a run cut short by a time limit keeps what it measured
        if out:
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
    save()
    if timing:
        torch.manual_seed(torch.seed() % 2**31)  # fresh inputs every run
        result["timing"] = time_shapes("cuda", SHAPES[:2] if quick else SHAPES)
        result["other_gpu_processes_after_timing"] = other_gpu_processes()
        save()
    if sweep_lengths:
        result["sweep"] = sweep("cuda", sweep_lengths)
        save()
        if out:
            try:
                plot_sweep(result["sweep"], out.rsplit(".", 1)[0] + "_sweep.png")
            except ImportError as exc:  # matplotlib missing: the numbers are in the JSON
                print(f"no plot: {exc!r}", file=sys.stderr)
    return 0 if print_table(result) else 1


def cpu_smoke():
    """No GPU: a small forward+backward through the interpreter, timed on the host (not a benchmark)."""
    import time
    from . import chunk_gsa
    inputs = make_inputs(1, 64, 2, 32, 32, 16, "slot", torch.float32, "cpu", requires_grad=True)
    start = time.perf_counter()
    o, _ = chunk_gsa(*inputs, chunk_size=32)
    o.sum().backward()
    print(f"no CUDA device: ran a T=64 forward+backward in the Triton interpreter in "
          f"{time.perf_counter() - start:.1f} s (interpreter speed says nothing about GPU speed)")
    return 0
