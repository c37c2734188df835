"""Hardening run on one GPU: huge shapes, many short sequences without a host synchronisation, CUDA
graphs, determinism and a long differential fuzz. Prints one JSON line per case as it finishes and
rewrites the --out summary after each; a per-case time guard (SIGALRM) stops a case that runs too long.

    python bench/gpu_hardening.py --out bench/results/<date>_h200_hardening.json     # ~3-4 min on an H200
    python bench/gpu_hardening.py --smoke                                            # CPU interpreter, tiny

Cases (bf16, slot gates, chunk 64, K = V = 128, M = 64 unless said; most share one set of kernels):
    regressions     the bf16/fp16 cases that failed on the H200 before (tests/gpu_regression_cases.json),
                    each in its own process, against float64 at the fuzz's tolerances (session 7: K or
                    V = 32 gave wrong values or an illegal memory access; spec.py's tile floors since).
    long_sequence   B=1, T=2^20, H=4: forward and backward finite; outputs and (upstream gradient on the
                    prefix only) every gradient on the first P tokens against the float64 reference, the
                    gradients past P exactly 0; the last L outputs and the final states against the
                    reference continued from the kernels' own state at T - L.
    big_offsets     head_first [1, 8, T, 128] with 7 * T * 128 > 2^31 (the last head's offset needs int64;
                    2.46e9 elements per input), forward only (~60 GiB): per-head runs against the big run
                    (0.0 = bit for bit), the far end of the last head against the reference, and the
                    [B, T, H, D] layout of the same tensors against the head_first one.
    big_offsets_backward  the same at K = V = 512 (T = 599,296; 2.45e9 elements per q, k, v, o and their
                    gradients), forward + backward: heads 0 and 7 alone give the big run's dq, dk, dv, ds,
                    dg bit for bit. Both big cases run the state pass unsegmented (GSA_STATE_SEGMENTS=off),
                    as the per-head runs must take the same one.
    many_sequences  10,000 packed sequences of 1-17 tokens (slot and ABC): forward + backward under
                    torch.cuda.set_sync_debug_mode("error") after one validating call; 16 sequences
                    against separate calls and the float64 reference.
    graph_forward   chunk_gsa captured in a CUDA graph (tuned config; and varlen with a static
                    cu_seqlens), replayed with new inputs (and a new packing) copied into the static buffers.
    graph_backward  forward + autograd.grad captured; replays equal eager.
    graph_decode    recurrent_step(inplace=True) captured; replayed token by token equals eager decode.
    determinism     two runs (dense and varlen ABC with GQA and states, forward + backward) bitwise equal,
                    and equal again under torch.use_deterministic_algorithms(True).
    fuzz            tests/differential.py's explore over the Spec space at GPU sizes for --fuzz-seconds
                    (hypothesis draws the Specs when installed, else a seeded random.Random): Specs and
                    cases tried, worst error per dtype, every case above its tolerance, every crash.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import random
import signal
import sys
import time
import unittest.mock

import torch

from hardening_common import (CHUNK, DIMS, ROOT, _device, _finite, _free, _tolerance,  # noqa: E402
                              differential, make, rel)
# main() runs each case by its name in this module's globals
from hardening_graphs import determinism, graph_backward, graph_decode, graph_forward  # noqa: E402, F401

from gsa_compile import chunk_gsa, recurrent_gsa, segments  # noqa: E402


# ------------------------------------------------------------------------------------------------ sizes

def long_sequence(small=False):
    B, T, H, P, L = (1, 300, 2, 64, 48) if small else (1, 1 << 20, 4, 1024, 256)
    K, V, M = (16, 16, 8) if small else (DIMS["K"], DIMS["V"], DIMS["M"])
    x = make(B, T, H, H, K, V, M, seed=1)
    o, (hk, hv) = chunk_gsa(*x, output_final_state=True, chunk_size=CHUNK)
    result = dict(T=T, H=H, K=K, V=V, M=M, forward_finite=_finite(o, hk, hv))
    do = torch.randn(o.shape, device=o.device, generator=torch.Generator(o.device).manual_seed(2)).to(o.dtype)
    grads = torch.autograd.grad(o, x, do, retain_graph=True)
    result["backward_finite"] = _finite(*grads)
    del grads  # (dg's sums over chunks are float64: gate_gradient.later_totals)
    # the prefix: upstream gradient on the first P tokens only
    do_prefix = torch.zeros_like(do)
    do_prefix[:, :P] = do[:, :P]
    grads = torch.autograd.grad(o, x, do_prefix)
    result["grads_past_prefix_zero"] = all(bool((d[:, P:] == 0).all()) for d in grads)
    ref = [t[:, :P].detach().double().requires_grad_() for t in x]
    o_ref, _ = recurrent_gsa(*ref)
    ref_grads = torch.autograd.grad(o_ref, ref, do[:, :P].double())
    result["prefix_o"] = rel(o[:, :P], o_ref)
    result["prefix_grads"] = {n: rel(a[:, :P], b) for n, a, b in zip("qkvs", grads, ref_grads)}
    terms = ref_grads[4].abs() + (ref[3] * ref_grads[3]).abs()  # dg against the size of what it sums
    result["prefix_grads"]["g"] = differential.rel_err(grads[4][:, :P], ref_grads[4], scale=terms)
    del grads, ref, ref_grads
    # the far end: the reference continued from the kernels' state at T - L
    with torch.no_grad():
        _, state = chunk_gsa(*(t[:, :T - L] for t in x), output_final_state=True, chunk_size=CHUNK)
        o_end, (rhk, rhv) = recurrent_gsa(*(t[:, T - L:] for t in x), initial_state=state, output_final_state=True)
    result.update(end_o=rel(o[:, T - L:], o_end), final_hk=rel(hk, rhk), final_hv=rel(hv, rhv))
    errors = [result["prefix_o"], result["end_o"], result["final_hk"], result["final_hv"]]
    grads_ok = all(e <= _tolerance("d" + n) for n, e in result["prefix_grads"].items())
    result["ok"] = (result["forward_finite"] and result["backward_finite"] and result["grads_past_prefix_zero"]
                    and all(e <= _tolerance("o") for e in errors) and grads_ok)
    return result


def big_offsets(small=False):
    """head_first inputs where (last head) x (head stride) passes 2^31: forward only."""
    H, K, V, M, L = 8, DIMS["K"], DIMS["V"], DIMS["M"], 256
    T = 64 * -(-(2 ** 31) // (64 * (H - 1) * K)) + 64 if not small else 200
    x = make(1, T, H, H, K, V, M, seed=3, requires_grad=False, head_first=True)
    result = dict(T=T, H=H, elements_per_input=H * T * K, last_head_offset=(H - 1) * T * K)
    with torch.no_grad(), unsegmented():
        o, (hk, hv) = chunk_gsa(*x, output_final_state=True, chunk_size=CHUNK, head_first=True)  # o [1, H, T, V]
        result["finite"] = _finite(o, hk, hv)
        equal = {}
        for h in (0, H - 1):
            part = [t[:, h:h + 1] for t in x]  # views: the same memory, head index 0
            o_h, (hk_h, hv_h) = chunk_gsa(*part, output_final_state=True, chunk_size=CHUNK, head_first=True)
            equal[h] = max(rel(a, b) for a, b in ((o_h, o[:, h:h + 1]), (hk_h, hk[:, h:h + 1]), (hv_h, hv[:, h:h + 1])))
            if h == H - 1:
                _, state = chunk_gsa(*(t[:, :, :T - L] for t in part), output_final_state=True, chunk_size=CHUNK,
                                     head_first=True)
                o_ref, _ = recurrent_gsa(*(t[:, :, T - L:].transpose(1, 2) for t in part), initial_state=state)
                result["last_head_end_o"] = rel(o[:, h:h + 1, T - L:].transpose(1, 2), o_ref)
            del o_h, hk_h, hv_h
        result["per_head_runs_vs_big_run"] = equal  # 0.0: bit for bit
        standard = [t.transpose(1, 2).contiguous() for t in x]  # [1, T, H, D]: the same values
        del x, part, state
        _free()
        o_std, _ = chunk_gsa(*standard, chunk_size=CHUNK)
        result["standard_layout_vs_head_first"] = rel(o_std, o.transpose(1, 2))  # 0.0: bit for bit
    result["ok"] = (result["finite"] and max(equal.values()) <= 1e-6 and result["standard_layout_vs_head_first"] <= 1e-6
                    and result["last_head_end_o"] <= _tolerance("o"))
    return result


def unsegmented():
    """GSA_STATE_SEGMENTS=off: the per-head runs below must use the same state pass as the big run (the
    segmented default would pick another segment count for one head: other rounding, not bit for bit)."""
    return unittest.mock.patch.dict(os.environ, {segments.ENV: "off"})


def big_offsets_backward(small=False):
    """The backward where (last head) x (head stride) passes 2^31 (head_first q, k, v, o and their
    gradients, K = V = 512 to fit the backward's memory, ~70 GB): heads 0 and H-1 run alone on views of
    the same memory must give the big run's gradients bit for bit."""
    H, K, V, M = 8, 512, 512, 64
    T = 64 * -(-(2 ** 31) // (64 * (H - 1) * K)) + 64 if not small else 200
    x = make(1, T, H, H, K, V, M, seed=4, requires_grad=False, head_first=True)
    leaves = [t.requires_grad_() for t in x]
    result = dict(T=T, H=H, K=K, elements_per_input=H * T * K, last_head_offset=(H - 1) * T * K)
    gen = torch.Generator(device=_device()).manual_seed(5)
    with unsegmented():
        o, _ = chunk_gsa(*leaves, chunk_size=CHUNK, head_first=True)  # o [1, H, T, V]
        do = torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype)
        grads = torch.autograd.grad(o, leaves, do)
        del o
        result["finite"] = _finite(*grads)
        equal = {}
        for h in (0, H - 1):
            part = [t.detach()[:, h:h + 1].requires_grad_() for t in leaves]  # views of the same memory
            o_h, _ = chunk_gsa(*part, chunk_size=CHUNK, head_first=True)
            grads_h = torch.autograd.grad(o_h, part, do[:, h:h + 1])
            equal[h] = {name: rel(a, b[:, h:h + 1]) for name, a, b in zip("qkvsg", grads_h, grads)}
            del o_h, grads_h, part
    result["per_head_grads_vs_big_run"] = equal  # 0.0: bit for bit
    result["ok"] = result["finite"] and max(e for row in equal.values() for e in row.values()) <= 1e-6
    return result


def _short_packing(n, seed, longest=17):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (n,), generator=gen)
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


@contextlib.contextmanager
def sync_errors():
    """CUDA: any host synchronisation inside raises (torch.cuda.set_sync_debug_mode('error'))."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def many_sequences(small=False):
    N, H = (300 if torch.cuda.is_available() else 20, 2) if small else (10_000, 4)
    K, V, M = (16, 16, 8) if small else (DIMS["K"], DIMS["V"], DIMS["M"])
    cu_host = _short_packing(N, seed=4)
    cu = cu_host.to(device=_device(), dtype=torch.int32)
    T = int(cu_host[-1])
    result = dict(sequences=N, T=T, sync_check=torch.cuda.is_available())
    for layout in ("slot", "abc"):
        x = make(1, T, H, H, K, V, M, seed=5, layout=layout)
        do = torch.randn(x[0].shape[:3] + (V,), device=x[0].device, dtype=x[0].dtype)
        if torch.cuda.is_available():  # compiles, and reads cu_seqlens once
            o, _ = chunk_gsa(*x, cu_seqlens=cu, chunk_size=CHUNK)
            torch.autograd.grad(o, [t for t in x if t is not None], do)
        try:
            with sync_errors():
                o, (hk, hv) = chunk_gsa(*x, cu_seqlens=cu, output_final_state=True, chunk_size=CHUNK)
                grads = torch.autograd.grad(o, [t for t in x if t is not None], do)
            result[f"{layout}_no_sync"] = True if torch.cuda.is_available() else None  # None: not checked
        except RuntimeError as error:
            result[f"{layout}_no_sync"], result[f"{layout}_sync_error"] = False, str(error)[:300]
            o, (hk, hv) = chunk_gsa(*x, cu_seqlens=cu, output_final_state=True, chunk_size=CHUNK)
            grads = torch.autograd.grad(o, [t for t in x if t is not None], do)
        result[f"{layout}_finite"] = _finite(o, hk, hv, *grads)
        worst_alone, worst_ref = 0.0, 0.0
        for n in random.Random(6).sample(range(N), 16):
            a, b = int(cu_host[n]), int(cu_host[n + 1])
            part = [None if t is None else t[:, a:b].detach() for t in x]
            with torch.no_grad():
                alone, _ = chunk_gsa(*part, chunk_size=CHUNK)
                reference, _ = recurrent_gsa(*part)
            worst_alone = max(worst_alone, rel(o[:, a:b], alone))
            worst_ref = max(worst_ref, rel(o[:, a:b], reference))
        result[f"{layout}_vs_separate_calls"], result[f"{layout}_vs_reference"] = worst_alone, worst_ref
        del x, o, grads
    result["ok"] = all(result[f"{lay}_no_sync"] is not False and result[f"{lay}_finite"]
                       and max(result[f"{lay}_vs_reference"], result[f"{lay}_vs_separate_calls"]) <= _tolerance("o")
                       for lay in ("slot", "abc"))
    return result


# ------------------------------------------------------------------------------------------------ fuzz

GPU_DIMS = dict(K=(32, 64, 128), V=(32, 64, 128), M=(16, 32, 64))


def regressions(small=False):
    """The bf16/fp16 cases that failed on the H200 (tests/gpu_regression_cases.json), each in its own process
    (an illegal memory access ends a process's CUDA context), vs float64 at the fuzz's tolerances."""
    if not torch.cuda.is_available():
        return dict(ok=True, skipped="CUDA only (the interpreter passes these cases)")
    import concurrent.futures

    import fuzz_repro
    cases = fuzz_repro.load_cases(ROOT / "tests" / "gpu_regression_cases.json")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda case: fuzz_repro.spawn(case, "cuda", "default"), cases))
    failed = [dict(case=i, **({"error": run["error"][-300:]} if "error" in run else {"above": run["failures"]}))
              for i, run in enumerate(runs) if "error" in run or run["failures"] or not run["repeat_equal"]]
    worst = max((v for run in runs for k, v in run.get("errors", {}).items() if k != "finite"), default=None)
    return dict(ok=not failed, cases=len(cases), failed=failed, worst_error=worst)


def fuzz(seconds, small=False, seed=0, jobs=1):
    """differential.explore at GPU sizes (on CPU: the interpreter's budget, no bf16), in `jobs` processes."""
    on_gpu = torch.cuda.is_available()
    cap = None if on_gpu else differential.INTERPRETER_COST_CAP
    return differential.explore(seconds, _device(), seed=seed, variants=6 if on_gpu else 3, cost_cap=cap, jobs=jobs,
                                max_t=600 if on_gpu else 150,
                                dims=GPU_DIMS if on_gpu else differential.SMALL_DIMS,
                                dtypes=tuple(differential.DTYPES) if on_gpu else ("float32", "float16"))


# ------------------------------------------------------------------------------------------------ main

# (name, time limit in s): about twice a cold run's time (session 8: 89, 32, 64, 87, 56, 0, 15, 1, 27 s)
# and more for those that compile most: the sub-chunk sweeps compile ~3x slower (session 11, cold:
# regressions passed in 218 s, long_sequence in 80 s; big_offsets and many_sequences ran past 150 s). All
# of them no longer fit one 600 s device call: split them with --only (bench/gpu_session.sh hardening_*).
CASES = [("regressions", 300), ("long_sequence", 150), ("big_offsets", 360), ("big_offsets_backward", 400),
         ("many_sequences", 360), ("graph_backward", 30), ("graph_forward", 40), ("graph_decode", 25),
         ("determinism", 120)]


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """Raise CaseTimeout in the main thread after `seconds` (checked between Python bytecodes)."""
    def expire(signum, frame):
        raise CaseTimeout(f"over its time limit of {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _environment():
    from gsa_compile import benchmark
    env = benchmark.environment()
    with contextlib.suppress(Exception):
        import subprocess
        env["commit"] = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=5).stdout.strip()  # -dirty: a working tree off HEAD
    return env


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON summary path (rewritten after each case)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU (CUDA-only cases skipped)")
    parser.add_argument("--budget", type=float, default=225.0, help="wall seconds for everything")
    parser.add_argument("--fuzz-seconds", type=float, default=90.0)
    parser.add_argument("--fuzz-jobs", type=int, default=None,
                        help="fuzz processes (default: half the CPUs, at most 8, on a GPU; 1 on CPU): cold compiles dominate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="run only these cases (names as in the docstring)")
    args = parser.parse_args(argv)
    start = time.time()
    result = dict(environment=_environment(), smoke=args.smoke, cases={})

    def save(name, row):
        row["seconds"] = round(time.time() - start - row.get("started", 0), 1)
        result["cases"][name] = row
        print(json.dumps({name: row}, default=str), flush=True)
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(result, indent=1, default=str))

    fuzz_reserve = 0 if args.only and "fuzz" not in args.only else min(args.fuzz_seconds, 60.0)
    for name, limit in CASES:
        if args.only and name not in args.only:
            continue
        began = time.time() - start
        left = args.budget - began - fuzz_reserve
        if left < 10:
            save(name, dict(ok=False, skipped=f"budget: {left:.0f} s left", started=began))
            continue
        try:
            with time_limit(min(limit, left)):
                row = globals()[name](small=args.smoke)
        except Exception as error:  # noqa: BLE001 - one failing case must not stop the others
            row = dict(ok=False, error=f"{type(error).__name__}: {error}"[:1000])
        row["started"] = began
        save(name, row)
        _free()
    if not args.only or "fuzz" in args.only:
        began = time.time() - start
        seconds = max(0.0, min(args.fuzz_seconds, args.budget - began - 5))
        try:
            with time_limit(seconds + max(30.0, seconds / 4) + 60):  # explore ends its processes by then
                jobs = args.fuzz_jobs or (min(8, max(1, (os.cpu_count() or 2) // 2)) if torch.cuda.is_available() else 1)
                row = fuzz(seconds, small=args.smoke, seed=args.seed, jobs=jobs)
        except Exception as error:  # noqa: BLE001
            row = dict(ok=False, error=f"{type(error).__name__}: {error}"[:1000])
        row["started"] = began
        save("fuzz", row)
    result["ok"] = all(row.get("ok") for row in result["cases"].values())
    result["total_seconds"] = round(time.time() - start, 1)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(dict(ok=result["ok"], total_seconds=result["total_seconds"],
                          failed=[n for n, r in result["cases"].items() if not r.get("ok")])), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
