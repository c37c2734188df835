"""Re-run recorded failing cases, each in its own process under variants of the environment, to tell a
kernel bug from a flaky or environment-dependent one.

    python bench/fuzz_repro.py tests/gpu_regression_cases.json [--device cuda] [--variants default,plain_tiles]
    python bench/fuzz_repro.py bench/results/<gpu_hardening result>.json      # its fuzz failures

Variants: default (the shared kernel cache), fresh_cache (an empty GSA_COMPILE_CACHE_DIR), slot_tile16 /
kv_tile16 / plain_tiles (fresh cache; GSA_MIN_SLOT_TILE, GSA_MIN_KV_TILE or both = 16: no tensor-core tile
floors, spec.py), blocking (fresh cache and CUDA_LAUNCH_BLOCKING=1), bwd_stages1 / bwd_warps8 (the backward
at chunk 64 with 1 stage / 8 warps). Each process runs its case twice (`repeat_equal`: the same errors both times).
"""
import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"default": {}, "fresh_cache": {"fresh": "1"}, "slot_tile16": {"fresh": "1", "GSA_MIN_SLOT_TILE": "16"},
            "kv_tile16": {"fresh": "1", "GSA_MIN_KV_TILE": "16"},
            "plain_tiles": {"fresh": "1", "GSA_MIN_SLOT_TILE": "16", "GSA_MIN_KV_TILE": "16"},
            "blocking": {"fresh": "1", "CUDA_LAUNCH_BLOCKING": "1"},
            # the backward at chunk 64 with one pipeline stage, or with 8 warps (overrides.backward_override)
            "bwd_stages1": {"fresh": "1", "GSA_BACKWARD_CONFIG": "64,64,64,4,1,8,8"},
            "bwd_warps8": {"fresh": "1", "GSA_BACKWARD_CONFIG": "64,64,64,8,2,8,8"}}


def one(case, device):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    if device == "cpu":
        import conftest  # noqa: F401 - the interpreter's bf16 dot patch
    import differential
    runs = [differential.run_case(case, device) for _ in range(2)]
    return dict(errors=runs[0], failures=differential.failures(case, runs[0]), repeat_equal=runs[0] == runs[1])


def spawn(case, device, variant):
    env = dict(os.environ, PYTHONPATH=ROOT)
    settings = dict(VARIANTS[variant])
    if settings.pop("fresh", None):
        env["GSA_COMPILE_CACHE_DIR"] = tempfile.mkdtemp(prefix="gsa_repro_")
    env.update(settings)
    code = f"import json, sys; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'bench')!r}]; from fuzz_repro import one; " \
           f"print('RESULT', json.dumps(one(json.loads(sys.argv[1]), {device!r})))"
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(case)], env=env, capture_output=True,
                              text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return dict(error="timeout: 300 s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return dict(error=(proc.stderr or proc.stdout)[-1500:])


def load_cases(path):
    """The cases of a cases file, or the fuzz failures of a gpu_hardening.py result."""
    with open(path) as f:
        data = json.load(f)
    if isinstance(data.get("cases"), list):
        return data["cases"]
    return [failure["case"] for failure in data.get("cases", {}).get("fuzz", {}).get("failures", [])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", help="a cases file ({'cases': [...]}, e.g. tests/gpu_regression_cases.json) or "
                        "a gpu_hardening.py JSON (its fuzz failures are re-run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--case", type=int, help="only this failure (its index)")
    parser.add_argument("--vary", default="", help="also run the case with one field changed at a time: "
                        "'memory=contiguous;mods=none;group=1' (values parsed as JSON where they parse)")
    parser.add_argument("--out")
    args = parser.parse_args()
    cases = load_cases(args.result)
    if args.case is not None:
        cases = [cases[args.case]]
    for change in filter(None, args.vary.split(";")):
        field, value = change.split("=", 1)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        cases += [dict(c, **{field: value}, varied=change) for c in cases if "varied" not in c]
    jobs = [(i, v) for i in range(len(cases)) for v in args.variants.split(",")]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: spawn(cases[job[0]], args.device, job[1]), jobs))
    rows = [dict(case=i, variant=v, **r) for (i, v), r in zip(jobs, results)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(cases=cases, rows=rows), f, indent=1)
    for row in rows:
        c = cases[row["case"]]
        label = f"{row['case']} {c['dtype']:8} {c['layout']:5} M{c['M']:<3} T{c['T']:<4} {row['variant']:12}" \
                f" {c.get('varied', ''):18}"
        if "error" in row:
            print(label, "ERROR", row["error"][-300:].replace("\n", " | "))
        else:
            print(label, "fail" if row["failures"] else "ok  ", "repeat_equal" if row["repeat_equal"] else "REPEAT DIFFERS",
                  {k: float(f"{v:.3g}") for k, v in row["errors"].items()})


if __name__ == "__main__":
    main()
