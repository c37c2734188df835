"""The autotuner's search: the configs it tries, pruning by resources, and validated timing.

    candidates = prune(search_space(spec), footprint_fits(kernels))
    result = tune(key, candidates, run)                    # run(config) -> output tensor(s)
    tuner.default_cache().record(key, result.best, result.best_ms, result.default_ms)

The keys, the files and their cache are gsa_compile.tuner's; `python -m gsa_compile tune` (tuning_cli.py) drives
both for the benchmark shapes.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import math
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.utils._pytree as pytree

from .tuner import DEFAULT_CONFIG, LaunchConfig, TuningKey


def search_space(spec_like, chunk_sizes=(32, 64, 128), blocks=(32, 64, 128), warps=(4, 8),
                 stages=(1, 2, 3)) -> list[LaunchConfig]:
    """Distinct configs for anything with K and V (Spec, TuningKey, Problem); the default first.
    One tile size serves K and V (BK = BV before clamping to the head dims)."""
    configs = [LaunchConfig(chunk_size=c, BK=blk, BV=blk, num_warps=w, num_stages=n)
               for c, blk, w, n in itertools.product(chunk_sizes, blocks, warps, stages)]
    return list(dict.fromkeys(c.normalized(spec_like.K, spec_like.V) for c in [DEFAULT_CONFIG] + configs))


def prune(candidates: Iterable[LaunchConfig], fits: Callable[[LaunchConfig], bool]) -> list[LaunchConfig]:
    """Keep the candidates `fits` accepts; one whose check raises (e.g. cannot compile) is dropped."""
    kept = []
    for cfg in candidates:
        with contextlib.suppress(Exception):  # what cannot compile cannot launch
            if fits(cfg):
                kept.append(cfg)
    return kept


def footprint_fits(kernels: Callable[[LaunchConfig], Iterable[tuple]], footprint: Optional[Callable] = None,
                   arch: int = 90) -> Callable[[LaunchConfig], bool]:
    """A `fits` for prune(): kernels(cfg) yields (builder, spec, constexprs) per kernel of a call; cfg
    fits when all do on sm_`arch`. footprint defaults to resources.footprint (memoised here)."""
    if footprint is None:
        from .resources import footprint
    memo: dict = {}

    def fits(cfg: LaunchConfig) -> bool:
        for builder, spec, constexprs in kernels(cfg):
            k = (builder, spec, tuple(sorted(constexprs.items())), cfg.num_warps, cfg.num_stages)
            if k not in memo:
                memo[k] = bool(footprint(builder, spec, constexprs, cfg.tile_config(), arch=arch).fits)
            if not memo[k]:
                return False
        return True
    return fits


TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float64: 1e-9}
# status: "timed" | "skipped" (raised) | "rejected" (wrong or non-finite output); time_ms None unless timed
Trial = collections.namedtuple("Trial", "config status time_ms note")


@dataclasses.dataclass
class TuneResult:
    key: TuningKey
    best: LaunchConfig
    best_ms: float
    default_ms: float
    refused: Optional[str] = None  # why nothing ran (compile trace, graph capture)
    trials: list = dataclasses.field(default_factory=list)  # the reference first

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)

    @property
    def speedup(self) -> float:
        return self.default_ms / self.best_ms if self.best_ms > 0 else math.nan


def tuning_forbidden() -> Optional[str]:
    """Why tuning must not run now (a torch.compile trace, a CUDA graph capture), else None."""
    if torch.compiler.is_compiling():
        return "inside a torch.compile trace"
    with contextlib.suppress(Exception):  # CPU builds have no capture API
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return "inside a CUDA graph capture"
    return None


def compare(out, ref, rtol: Optional[float] = None) -> Optional[str]:
    """None when the outputs (tensors in any nesting of tuples/lists) have the reference's structure
    and shapes, are finite and each has max |out - ref| / max |ref| <= tol; else why not."""
    (outs, tree), (refs, ref_tree) = pytree.tree_flatten(out), pytree.tree_flatten(ref)
    shapes = [[None if x is None else tuple(x.shape) for x in xs] for xs in (outs, refs)]
    if tree != ref_tree or shapes[0] != shapes[1]:
        return f"outputs {shapes[0]}, expected {shapes[1]}"
    for i, (x, r) in enumerate((x, r) for x, r in zip(outs, refs) if x is not None):
        x, r64, tol = x.detach().double(), r.detach().double(), TOLERANCE.get(r.dtype, 1e-2) if rtol is None else rtol
        if not torch.isfinite(x).all():
            return f"output {i}: non-finite values"
        err = ((x - r64).abs().max() / r64.abs().max().clamp_min(1e-30)).item() if x.numel() else 0.0
        if not err <= tol:
            return f"output {i}: relative error {err:.2e} > {tol:.0e}"
    return None


def tune(key: TuningKey, candidates: Sequence[LaunchConfig], run: Callable[[LaunchConfig], object],
         bench: Optional[Callable[[Callable[[], object]], float]] = None,
         reference_config: LaunchConfig = DEFAULT_CONFIG, rtol: Optional[float] = None,
         progress: bool = False) -> TuneResult:
    """Run the reference config, then each candidate: its outputs must match the reference's
    (compare()) before bench() times it; the fastest wins, ties keep the reference. One that raises
    is skipped, a wrong one rejected. Inside a compile trace or graph capture nothing runs.
    bench(fn) -> ms defaults to triton.testing.do_bench(fn, return_mode="median") (device events)."""
    reason = tuning_forbidden()
    if reason is not None:
        return TuneResult(key, reference_config, math.nan, math.nan, refused=reason)
    if bench is None:
        import triton.testing
        bench = functools.partial(triton.testing.do_bench, return_mode="median")
    # the default must work (its failure is a bug and propagates); cloned in case run reuses buffers
    ref = pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, run(reference_config))
    default_ms = float(bench(lambda: run(reference_config)))
    result = TuneResult(key, reference_config, default_ms, default_ms,
                        trials=[Trial(reference_config, "timed", default_ms, "reference")])
    todo = [c for c in candidates if c != reference_config]
    if progress:  # tqdm when installed, else one printed line per candidate
        try:
            from tqdm.auto import tqdm
            todo = tqdm(todo, desc=key.to_str(), leave=False)
        except ImportError:
            items = todo
            todo = (print(f"{key.to_str()}: {i}/{len(items)} {c.short()}", flush=True) or c
                    for i, c in enumerate(items, 1))
    for cfg in todo:
        try:
            bad = compare(run(cfg), ref, rtol)
            ms = None if bad else float(bench(lambda cfg=cfg: run(cfg)))
            if ms is not None and not ms > 0:
                raise RuntimeError(f"benchmark returned {ms}")
        except Exception as err:  # noqa: BLE001 - OutOfResources, compile errors, launch failures
            result.trials.append(Trial(cfg, "skipped", None, f"{type(err).__name__}: {err}"[:300]))
            continue
        result.trials.append(Trial(cfg, "rejected" if bad else "timed", ms, bad or ""))
        if ms is not None and ms < result.best_ms:
            result.best, result.best_ms = cfg, ms
    return result


def format_table(results: Sequence[TuneResult]) -> str:
    """The final table of `python -m gsa_compile tune`: spec, best config, times, speedup."""
    rows = [("spec", "best config", "best ms", "default ms", "speedup", "timed/skipped/rejected")]
    rows += [(r.key.to_str(), r.best.short() + (f" ({r.refused})" if r.refused else ""), f"{r.best_ms:.4f}",
              f"{r.default_ms:.4f}", f"{r.speedup:.2f}x", f"{r.count('timed')}/{r.count('skipped')}/{r.count('rejected')}")
             for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines[:1] + ["-+-".join("-" * w for w in widths)] + lines[1:])
