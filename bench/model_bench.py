"""The example LM (examples/gsa_lm.py) with our GatedSlotAttention vs the same model with fla's layer.

    python bench/model_bench.py --out bench/results/<date>_h200_model.json   # H200; needs fla importable
    python bench/model_bench.py --smoke                                      # CPU interpreter, ours only

Both models are GSALM (embedding -> N x [RMSNorm, attention, RMSNorm, SwiGLU MLP] -> head) with the
same config; only `block.attn` differs (fla.layers.GatedSlotAttention, behind a small adapter for our
layer's call signature). fla's model gets our model's state_dict, so the two are the same function:
`check` records the relative difference of their losses, logits and first-layer attention outputs.

Rows (times are medians of CUDA-event timings after warmup):
    train    forward + backward + AdamW step on [B, T + 1] tokens, bf16 autocast over fp32 parameters
             (fla's fused norm+linear reads the autocast dtype). Ours: torch.compile(fullgraph=True) of
             lm_loss, and eager. fla: eager, and torch.compile (not fullgraph: fla's chunk_gsa is
             @torch.compiler.disable) if it compiles; else the error is recorded.
    prefill  the prompt through the chunked kernels with use_cache=True (bf16 parameters, no_grad)
    decode   one token per step through the recurrent path and the caches (ours: GSACache; fla: its
             Cache from fla.models.utils), eager for both (no CUDA graph), bf16 parameters.
Each row is written as it completes; a failing row records its error and the rest still run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

START = time.time()  # --budget counts from here, imports included

import torch  # noqa: E402

if not torch.cuda.is_available():  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gsa_compile import benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gsa_lm", ROOT / "examples" / "gsa_lm.py")
lm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lm)

GPU = dict(vocab=32000, hidden=1024, layers=4, heads=4, slots=64, batch=8, seq=2048, chunk_size=None,
           prefill=512, decode_batches=(1, 64), decode_steps=32, decode_reps=5, warmup=3, iters=10)
OVERRIDES = ("batch", "seq", "layers", "hidden", "heads")  # config keys a command-line option may set
SMOKE = dict(vocab=64, hidden=32, layers=1, heads=2, slots=8, batch=2, seq=32, chunk_size=16,
             prefill=8, decode_batches=(1, 2), decode_steps=2, decode_reps=1, warmup=0, iters=1)
COMPILE_COST_S = 40  # a guess at a cold torch.compile of the training step: later starts are skipped
NORM_EPS = 1e-5  # fla's g_norm always uses eps=1e-5 (rms_norm_linear without eps); the block norms match it


class ListCache(list):
    """Stand-in for fla's Cache with the three calls fla's layer makes (len, [i], update), used only
    when fla.models.utils.Cache does not import or construct (it subclasses transformers' Cache)."""

    def update(self, layer_idx, offset=1, **states):
        while len(self) <= layer_idx:
            self.append(dict(recurrent_state=None, attn_state=None, conv_state=None, ffn_state=None))
        self[layer_idx].update({k: v for k, v in states.items() if v is not None and k != "cache_kwargs"})
        return self[layer_idx]


def float32_gate(fla_gsa_module):
    """Make fla's layer hand its gate to chunk_gsa / fused_recurrent_gsa in float32, as our benchmarks and
    fla_warm.py call them. fla's layer computes `logsigmoid(f_proj(x)) / normalizer` under autocast and so
    passes a bf16 gate; Triton's autotuner keys on argument dtypes, so the bf16 gate reaches keys that no
    warm-up covered and fla autotunes every kernel afresh (minutes a key; session 6's first fla training
    step never finished). The cast is exact (bf16 -> fp32), fla's kernels accumulate the gate in fp32
    either way, and the extra bytes (B T H M x 2) are < 0.1 % of a training step's."""
    for name in ("chunk_gsa", "fused_recurrent_gsa"):
        native = getattr(fla_gsa_module, name)

        def with_float32_gate(*args, native=native, g=None, **kwargs):
            return native(*args, g=None if g is None else g.float(), **kwargs)
        setattr(fla_gsa_module, name, with_float32_gate)


def load_fla(use_fla, native_gate=False):
    """(adapted fla layer class, info dict) or (None, info with the reason fla is skipped)."""
    if not use_fla:
        return None, dict(skipped="--smoke / --no-fla: ours only")
    if not torch.cuda.is_available():
        return None, dict(skipped="no CUDA GPU (fla's kernels need one)")
    try:
        import fla
        from fla.layers import GatedSlotAttention as FlaGSA
    except Exception as exc:  # noqa: BLE001 - any import failure means: run ours only
        return None, dict(skipped=f"fla does not import: {exc!r}")
    info = dict(version=getattr(fla, "__version__", "?"), path=os.path.dirname(fla.__file__),
                gate_dtype="the layer's own (bf16 under autocast)" if native_gate else "float32 (float32_gate)")
    if not native_gate:
        float32_gate(importlib.import_module("fla.layers.gsa"))
    with contextlib.suppress(ImportError):
        import transformers
        info["transformers"] = transformers.__version__
    try:
        from fla.models.utils import Cache
        Cache()
        info["cache"] = "fla.models.utils.Cache"
    except Exception as exc:  # noqa: BLE001
        Cache, info["cache"] = ListCache, f"ListCache (fla.models.utils.Cache failed: {exc!r})"

    class FlaAttention(FlaGSA):
        """fla's layer with our layer's call: (x, attention_mask, cache, use_cache) -> (o, cache).
        fla keys one cache object by layer_idx; each block here gets its own (fla's Cache grows to any index)."""

        def forward(self, x, attention_mask=None, cache=None, use_cache=False):
            if use_cache and cache is None:
                cache = Cache()
            o, _, cache = super().forward(x, attention_mask=attention_mask, past_key_values=cache, use_cache=use_cache)
            return o, cache
    return FlaAttention, info


def build(cfg, attn_cls=None):
    model = lm.GSALM(cfg["vocab"], cfg["hidden"], cfg["layers"], cfg["heads"], num_slots=cfg["slots"],
                     norm_eps=NORM_EPS, chunk_size=cfg["chunk_size"])
    if attn_cls is not None:
        for i, block in enumerate(model.layers):
            block.attn = attn_cls(hidden_size=cfg["hidden"], num_heads=cfg["heads"], num_slots=cfg["slots"],
                                  norm_eps=NORM_EPS, layer_idx=i)
    return model


class Bench:
    """Times, records rows (rewriting --out after each) and keeps going when one part fails."""

    def __init__(self, args, cfg, device):
        self.args, self.cfg, self.device, self.start = args, cfg, device, START
        self.result = dict(environment=benchmark.environment(), config=cfg, rows=[])
        self.result["environment"]["python"] = sys.version.split()[0]

    def record(self, **row):
        row["elapsed_s"] = round(time.time() - self.start, 1)
        self.result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if self.args.out:
            with open(self.args.out, "w") as f:
                json.dump(self.result, f, indent=1)

    def part(self, name, model, fn, *fn_args, cost_s=0.0, **row):
        """Run fn(*fn_args) -> dict of measurements, or record why not: it would start later than
        --budget less its expected cost_s (compiles), or it raised."""
        row = dict(part=name, model=model, **row)
        wanted = self.args.models.split(",")
        if not (set(wanted) >= {"ours", "fla"} if model == "both" else model in wanted):
            return None
        if time.time() - self.start + cost_s > self.args.budget:
            return self.record(**row, skipped=f"time budget {self.args.budget:.0f} s")
        print(f"[{time.time() - self.start:.0f} s] {name} {model} {row.get('mode', '')}", flush=True)
        try:
            self.record(**row, **fn(*fn_args))
        except Exception as exc:  # noqa: BLE001 - record and go on with the other parts
            traceback.print_exc()
            self.record(**row, error=repr(exc)[:500])
        finally:
            if self.device == "cuda":
                torch.cuda.empty_cache()

    def time_ms(self, fn, warmup, iters):
        """Median milliseconds of fn() (CUDA events on the GPU, perf_counter on the CPU) and peak MiB."""
        for _ in range(warmup):
            fn()
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        marks = []
        for _ in range(iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                marks.append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                marks.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            torch.cuda.synchronize()
            marks = [start.elapsed_time(end) for start, end in marks]
        peak = round(torch.cuda.max_memory_allocated() / 2 ** 20) if cuda else None
        return statistics.median(marks), peak

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device == "cuda" else contextlib.nullcontext()


def check(bench, ours, fla, tokens):
    """Relative differences between the two models on the same batch (training precision, no_grad)."""
    with torch.no_grad(), bench.autocast():
        loss = [lm.lm_loss(m, tokens).item() for m in (ours, fla)]
        logits = [m(tokens)[0] for m in (ours, fla)]
        x = ours.layers[0].attn_norm(ours.embeddings(tokens))
        attn = [m.layers[0].attn(x)[0] for m in (ours, fla)]
    return dict(loss_ours=loss[0], loss_fla=loss[1], loss_rel=abs(loss[0] - loss[1]) / abs(loss[1]),
                logits_rel=benchmark.rel(*logits), attn_rel=benchmark.rel(*attn))


def train(bench, model, tokens, mode):
    """One AdamW step per call. mode: eager | fullgraph | compiled (torch.compile of lm_loss, graph breaks allowed)."""
    from torch._dynamo.utils import counters
    row, loss_fn = {}, lm.lm_loss
    if mode != "eager":
        torch._dynamo.reset()
        counters.clear()
        backend = "inductor" if bench.device == "cuda" else "aot_eager"
        loss_fn = torch.compile(lm.lm_loss, fullgraph=mode == "fullgraph", backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=bench.device == "cuda")

    def step():
        with bench.autocast():
            return lm.train_step(model, optimizer, tokens, loss_fn)
    start = time.time()
    row["first_loss"] = step()
    row["first_step_s"] = round(time.time() - start, 2)  # includes torch.compile and kernel JIT / autotuning
    if mode != "eager":
        row.update(graph_breaks=sum(counters["graph_break"].values()), graphs=counters["stats"]["unique_graphs"],
                   break_reasons=sorted(counters["graph_break"])[:5])
    ms, row["peak_mib"] = bench.time_ms(step, bench.cfg["warmup"], bench.cfg["iters"])
    B, T = tokens.shape
    return dict(row, ms=ms, tokens_per_s=B * (T - 1) / ms * 1e3)


def decode_setup(model, prompt):
    with torch.no_grad():
        logits, caches = model(prompt, use_cache=True)
    return [logits[:, -1:].argmax(-1), caches]


def prefill(bench, model, prompt):
    with torch.no_grad():
        ms, peak = bench.time_ms(lambda: model(prompt, use_cache=True), 1, bench.cfg["decode_reps"])
    return dict(ms=ms, tokens_per_s=prompt.numel() / ms * 1e3, peak_mib=peak)


def decode(bench, model, prompt):
    """Greedy decode_steps tokens per timed call, from the caches of a prefill of the prompt."""
    state, n = decode_setup(model, prompt), bench.cfg["decode_steps"]

    @torch.no_grad()
    def steps():
        token, caches = state
        for _ in range(n):
            logits, caches = model(token, caches=caches, use_cache=True)
            token = logits[:, -1:].argmax(-1)
        state[:] = [token, caches]
    ms, peak = bench.time_ms(steps, 1, bench.cfg["decode_reps"])
    return dict(ms=ms / n, tokens_per_s=prompt.shape[0] * n / ms * 1e3, peak_mib=peak)


def decode_check(ours, fla, prompt, n=4):
    """Relative difference of the logits of n teacher-forced decode steps after the prefill."""
    forced = torch.randint_like(prompt[:, :n], 1, ours.lm_head.out_features)
    outs = []
    for model in (ours, fla):
        (_, caches), logits = decode_setup(model, prompt), []
        with torch.no_grad():
            for t in range(n):
                step_logits, caches = model(forced[:, t:t + 1], caches=caches, use_cache=True)
                logits.append(step_logits)
        outs.append(torch.cat(logits, 1))
    return dict(decode_logits_rel=benchmark.rel(*outs))


def print_table(result):
    for row in result["rows"]:
        if row["model"] == "both":  # the checks: relative differences ours vs fla
            print(f"{row['part']}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in row.items() if k not in ("part", "model", "elapsed_s")))
    rows = [r for r in result["rows"] if r["model"] != "both" and ("ms" in r or "error" in r or "skipped" in r)]
    nan = float("nan")
    best = {}  # part -> ours' best tokens/s, for the speedup column of fla's rows
    for r in rows:
        if r["model"] == "ours":
            best[r["part"]] = max(best.get(r["part"], 0), r.get("tokens_per_s", 0))
    print(f"{'part':<20} {'model':<5} {'mode':<10} {'ms/step':>9} {'tokens/s':>11} {'peak MiB':>9} "
          f"{'ours best/this':>14}  note")
    for r in rows:
        breaks = f"{r['graph_breaks']} graph breaks" if "graph_breaks" in r else ""
        note = r.get("error") or r.get("skipped") or breaks
        speedup = best.get(r["part"], nan) / r["tokens_per_s"] if r["model"] == "fla" and "tokens_per_s" in r else nan
        print(f"{r['part']:<20} {r['model']:<5} {r.get('mode', ''):<10} {r.get('ms', nan):9.3f} "
              f"{r.get('tokens_per_s', nan):11.0f} {r.get('peak_mib') or nan:9.0f} {speedup:14.2f}  {note[:80]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON result here (rewritten after every row)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU (Triton interpreter), ours only")
    parser.add_argument("--no-fla", action="store_true", help="ours only")
    parser.add_argument("--models", default="ours,fla", help="which models' parts run (fla's state_dict still "
                        "comes from ours); `--models fla --warm` warms fla's kernels and autotuning for this config")
    parser.add_argument("--warm", action="store_true", help="one untimed-quality iteration per part (warming)")
    parser.add_argument("--fla-native-gate", action="store_true", help="leave fla's layer passing its bf16 "
                        "gate (default: cast to float32, the dtype fla_warm.py tunes; see float32_gate)")
    parser.add_argument("--budget", type=float, default=140.0, help="skip parts that would start after this many s")
    for key in OVERRIDES:
        parser.add_argument(f"--{key}", type=int, help=f"override the config's {key}")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        sys.exit("no CUDA GPU: run with --smoke for the CPU interpreter check")
    cfg = dict(SMOKE if args.smoke else GPU, **{k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
    if args.warm:
        cfg.update(warmup=0, iters=1, decode_steps=2, decode_reps=1)
    bench = Bench(args, cfg, device)
    fla_cls, bench.result["environment"]["fla"] = load_fla(not (args.smoke or args.no_fla)
                                                           and "fla" in args.models.split(","),
                                                           args.fla_native_gate)
    print("fla:", bench.result["environment"]["fla"], flush=True)

    torch.manual_seed(0)
    models = {"ours": build(cfg).to(device)}
    if fla_cls is not None:
        try:  # fla's model is ours with fla's layers, loaded with our state_dict (strict: same names and shapes)
            models["fla"] = build(cfg, fla_cls).to(device)
            models["fla"].load_state_dict(models["ours"].state_dict())
        except Exception as exc:  # noqa: BLE001
            models.pop("fla", None)
            bench.record(part="build", model="fla", error=repr(exc)[:500])
    inference = {name: copy.deepcopy(m).to(torch.bfloat16 if device == "cuda" else torch.float32)
                 for name, m in models.items()}  # decode models: bf16 parameters, initial weights
    tokens = torch.randint(1, cfg["vocab"], (cfg["batch"], cfg["seq"] + 1), device=device)
    shape = f"B{cfg['batch']} T{cfg['seq']}"
    if "fla" in models:
        bench.part("check", "both", check, bench, models["ours"], models["fla"], tokens)

    for name, mode in [("ours", "eager"), ("ours", "fullgraph"), ("fla", "eager")]:
        if name in models:
            bench.part(f"train {shape}", name, train, bench, models[name], tokens, mode, mode=mode,
                       cost_s=COMPILE_COST_S if mode != "eager" else 0)
    for B in cfg["decode_batches"]:
        prompt = torch.randint(1, cfg["vocab"], (B, cfg["prefill"]), device=device)
        if "fla" in models:
            bench.part(f"decode check B{B}", "both", decode_check, inference["ours"], inference["fla"], prompt)
        for name, model in inference.items():
            bench.part(f"prefill B{B} T{cfg['prefill']}", name, prefill, bench, model, prompt, mode="eager")
            bench.part(f"decode B{B}", name, decode, bench, model, prompt, mode="eager")
    if "fla" in models:  # last: the least certain part (fla's layer under torch.compile)
        bench.part(f"train {shape}", "fla", train, bench, models["fla"], tokens, "compiled", mode="compiled",
                   cost_s=COMPILE_COST_S)
    print_table(bench.result)
    return bench.result


if __name__ == "__main__":
    main()
