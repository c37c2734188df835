"""Context parallelism simulated on one device: one rank of R against one GPU on the whole sequence.

    python bench/cp_sim.py --out bench/results/DATE_h200_cp_sim.json          # H200: ~2-4 min
    python bench/cp_sim.py --smoke                                           # CPU, Triton interpreter

1. Correctness: `SimulatedGroup` runs R ranks one after the other on this device (the same code as
   the distributed path, messages through in-memory queues) and is compared with chunk_gsa on the
   whole sequence: outputs, final states and the gradients of q, k, v, s, g (float32 and bf16; a
   sequence split over 4 ranks, and packed ABC sequences crossing rank boundaries).
2. Timing, B=1 H=4 K=V=512 M=64 bf16 slot gates, for each T and R (T_r = T / R):
     full     chunk_gsa on T tokens (what one GPU does without context parallelism)
     local    chunk_gsa on T_r tokens (one rank's share with no context-parallel overhead)
     rank     chunk_gsa_cp on T_r tokens as an "inside" rank (no sequence starts in its slice, the
              slowest kind: state pass + combine + forward with the incoming state; backward: two
              chunk_backward calls), neighbours answering at once (`IsolatedRank`)
     combine  one `combine` (A S + F) of the state scan, measured
     hop      one message of B H (K M + M V) float32 values, modelled: --hop-latency-us plus
              bytes / --hop-gbps (one GPU cannot measure NVLink; change the model to your system)
   predicted step of R GPUs = rank + (R - 1) (hop + combine) forward, + 2 (R - 1) (hop + combine)
   for forward+backward (the state chain runs once each way); speedup = full / predicted,
   efficiency = speedup / R, cp overhead = rank / local, ideal efficiency = full / (R local).
Rows print as they finish (JSON lines) and --out is rewritten after each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gsa_compile import benchmark as bm
from gsa_compile import chunk_gsa
from gsa_compile.context_parallel import (
    IsolatedRank,
    SimulatedGroup,
    chunk_gsa_cp,
    combine,
)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


class Recorder:
    def __init__(self, out, config):
        self.out, self.start = out, time.time()
        self.result = {"environment": bm.environment(), "config": config, "rows": []}

    def __call__(self, **row):
        row["elapsed_s"] = round(time.time() - self.start, 1)
        self.result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if self.out:
            with open(self.out, "w") as f:
                json.dump(self.result, f, indent=1)


def timed(fn):
    """Milliseconds: do_bench median on GPU (None if it runs out of memory), one host-timed call in
    the interpreter."""
    if GPU:
        try:
            return bm.bench(fn)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def ratio(a, b):
    return None if a is None or b is None else a / b


def leaves(inputs, stop=None):
    """Leaf views of the first `stop` tokens (no copy) that require grad."""
    out = []
    for x in inputs:
        if x is not None and x.dim() >= 3:
            x = x[:, :stop]
        out.append(None if x is None else x.detach().requires_grad_())
    return out


def weighted_loss(o, hk, hv, weights):
    return (o.float() * weights[0]).sum() + (hk * weights[1]).sum() + (hv * weights[2]).sum()


def run_simulated(inputs, lengths, cu_seqlens, weights):
    """R ranks in rank order, backwards in reverse order: (o, hk, hv, gradients) assembled over ranks."""
    sim, offsets = SimulatedGroup(len(lengths)), [sum(lengths[:r]) for r in range(len(lengths) + 1)]
    runs = []
    for r in range(len(lengths)):
        part = [x if x is None or x.dim() < 3 else x[:, offsets[r]:offsets[r + 1]].detach().requires_grad_()
                for x in inputs]
        o, (hk, hv) = chunk_gsa_cp(*part, group=sim.rank(r), output_final_state=True, cu_seqlens=cu_seqlens,
                                   rank_lengths=lengths)
        runs.append((part, o, hk, hv))
    grads = [None] * len(lengths)
    for r in reversed(range(len(lengths))):
        part, o, hk, hv = runs[r]
        wanted = [x for x in part if x is not None]
        loss = weighted_loss(o, hk, hv, (weights[0][:, offsets[r]:offsets[r + 1]], *weights[1:]))
        grads[r] = torch.autograd.grad(loss, wanted)
    o = torch.cat([run[1] for run in runs], 1)
    hk, hv = sum(run[2] for run in runs), sum(run[3] for run in runs)
    merged = [torch.cat(parts, 1) if parts[0].dim() >= 3 else sum(parts) for parts in zip(*grads)]
    return o, hk, hv, merged


def check_correctness(record, dims, dtype, layout, lengths, cu_values):
    _, H, K, V, M = dims
    torch.manual_seed(torch.seed() % 2**31)
    cu = None if cu_values is None else torch.tensor(cu_values, dtype=torch.int32, device=DEVICE)
    inputs = bm.make_inputs(1, sum(lengths), H, K, V, M, layout, dtype, DEVICE)
    full = leaves(inputs)
    o, (hk, hv) = chunk_gsa(*full, output_final_state=True, cu_seqlens=cu)
    weights = [torch.randn(x.shape, device=DEVICE) for x in (o, hk, hv)]
    grads = torch.autograd.grad(weighted_loss(o, hk, hv, weights), [x for x in full if x is not None])
    got = run_simulated(inputs, lengths, cu, weights)
    errors = {"o": bm.rel(got[0], o), "hk": bm.rel(got[1], hk), "hv": bm.rel(got[2], hv)}
    names = [n for n, x in zip("qkvsg", inputs) if x is not None]
    errors.update({f"d{n}": bm.rel(a, b) for n, a, b in zip(names, got[3], grads)})
    record(step="correctness: SimulatedGroup vs chunk_gsa on the whole sequence", dtype=str(dtype).split(".")[-1],
           layout=layout, lengths=lengths, cu_seqlens=cu_values, worst=max(errors.values()), **errors)


def state_bytes(H, K, V, M):
    return H * M * (K + V) * 4


def time_lengths(record, args, dims):
    B, H, K, V, M = dims
    dtype = torch.float32 if args.smoke else torch.bfloat16
    chunk = 16 if args.smoke else None
    hop_ms = (args.hop_latency_us + state_bytes(H, K, V, M) / (args.hop_gbps * 1e3)) * 1e-3
    state = (torch.randn(B, H, K, M, device=DEVICE), torch.randn(B, H, M, V, device=DEVICE))
    local_state = tuple(torch.randn_like(x) for x in state)
    log_a = -torch.rand(B, H, M, device=DEVICE)
    combine_ms = timed(lambda: combine(state, log_a, local_state))
    cache = {}

    def per_rank(inputs, t_r, R):
        """(local fwd, local fwd+bwd, rank fwd, rank fwd+bwd) in ms on the first t_r tokens."""
        if t_r in cache:
            return cache[t_r]
        x = leaves(inputs, t_r)
        wanted = [a for a in x if a is not None]
        do = torch.randn(B, t_r, H, V, device=DEVICE, dtype=dtype)
        link = IsolatedRank(1, max(R, 3))  # rank 1 of >= 3: receives and sends, no sequence start
        lengths = [t_r] * max(R, 3)

        def local():
            return chunk_gsa(*x, chunk_size=chunk)[0]

        def rank():
            return chunk_gsa_cp(*x, group=link, chunk_size=chunk, rank_lengths=lengths)[0]

        times = []
        for fn in (local, rank):
            times.append(timed(fn))
            times.append(timed(lambda fn=fn: torch.autograd.grad(fn(), wanted, do)) if args.backward else None)
        cache[t_r] = times
        return times

    def full(inputs, T):
        """(fwd, fwd+bwd) in ms of chunk_gsa on all T tokens."""
        x = leaves(inputs)
        wanted, do = [a for a in x if a is not None], torch.randn(B, T, H, V, device=DEVICE, dtype=dtype)
        forward = timed(lambda: chunk_gsa(*x, chunk_size=chunk)[0])
        if not args.backward:
            return forward, None
        return forward, timed(lambda: torch.autograd.grad(chunk_gsa(*x, chunk_size=chunk)[0], wanted, do))

    for T in args.lengths:
        inputs = bm.make_inputs(B, T, H, K, V, M, "slot", dtype, DEVICE)
        full_fwd, full_fb = full(inputs, T)
        record(step="full", T=T, fwd_ms=full_fwd, fwd_bwd_ms=full_fb)
        for R in args.ranks:
            if T % R:
                continue
            local_f, local_fb, rank_f, rank_fb = per_rank(inputs, T // R, R)
            row = {"step": "rank", "T": T, "R": R, "T_r": T // R, "combine_ms": combine_ms, "hop_ms_modelled": hop_ms,
                   "state_bytes": state_bytes(H, K, V, M)}
            chain = (R - 1) * (hop_ms + combine_ms)
            for suffix, full, local, rank, chains in (("fwd", full_fwd, local_f, rank_f, 1),
                                                      ("fwd_bwd", full_fb, local_fb, rank_fb, 2)):
                if suffix == "fwd_bwd" and not args.backward:
                    continue
                predicted = None if rank is None else rank + chains * chain
                speedup = ratio(full, predicted)
                row.update({f"local_{suffix}_ms": local, f"rank_{suffix}_ms": rank, f"predicted_{suffix}_ms": predicted,
                            f"cp_overhead_{suffix}": ratio(rank, local), f"speedup_{suffix}": speedup,
                            f"efficiency_{suffix}": ratio(speedup, R),
                            f"ideal_efficiency_{suffix}": ratio(full, None if local is None else R * local)})
            record(**{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        del inputs
        if GPU:
            torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    parser.add_argument("--out", help="JSON file, rewritten after every row")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="comma-separated T (default 131072,262144,524288,1048576)")
    parser.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="comma-separated R (default 2,4,8)")
    parser.add_argument("--no-backward", dest="backward", action="store_false")
    parser.add_argument("--hop-latency-us", type=float, default=20.0)
    parser.add_argument("--hop-gbps", type=float, default=100.0, help="GB/s of one point-to-point message")
    args = parser.parse_args(argv)
    if not GPU and not args.smoke:
        parser.error("no CUDA device: run with --smoke (Triton interpreter, tiny shapes)")
    dims = (1, 1, 16, 16, 16) if args.smoke else (1, 4, 512, 512, 64)  # B, H, K, V, M
    args.lengths = args.lengths or ([64, 128] if args.smoke else [131072, 262144, 524288, 1048576])
    args.ranks = args.ranks or ([2, 4] if args.smoke else [2, 4, 8])
    record = Recorder(args.out, {k: v for k, v in vars(args).items() if k != "out"} | {"B_H_K_V_M": dims})

    short = [16, 20, 12, 16] if args.smoke else [2048, 3000, 1096, 2048]
    crossing = [0, 10, 48, 52, 64] if args.smoke else [0, 1000, 6000, 6144, 8192]
    for dtype in (torch.float32,) if args.smoke else (torch.float32, torch.bfloat16):
        check_correctness(record, dims, dtype, "slot", short, None)
        check_correctness(record, dims, dtype, "abc", short, crossing)
    time_lengths(record, args, dims)
    return 0


if __name__ == "__main__":
    sys.exit(main())
