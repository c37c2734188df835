"""The bench scripts' --smoke modes run (tiny shapes, CPU interpreter) and write the JSON they promise."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Runs a bench script as `python bench/<script>` would (its directory first on sys.path), after conftest's
# test-only interpreter patches (CI time).
WITH_TEST_PATCHES = ("import runpy, sys; sys.path[:0] = sys.argv[1:3]; import conftest; sys.argv = sys.argv[3:]; "
                     "runpy.run_path(sys.argv[0], run_name='__main__')")


def run_smoke(script: str, tmp_path):
    """`python bench/<script> --smoke --out <json>` in a fresh process: (its stdout, the parsed JSON)."""
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-c", WITH_TEST_PATCHES, str(ROOT / "bench"), str(ROOT / "tests"),
               str(ROOT / "bench" / script), "--smoke", "--out", str(out)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text())


def test_mods_bench_smoke(tmp_path):
    """Its fused layer really is fused and agrees with the unfused one."""
    _, data = run_smoke("mods_bench.py", tmp_path)
    rows = {r["step"]: r for r in data["rows"]}
    assert {"correctness", "layer_fwd", "layer_fwd_train", "gsa_fwd", "layer_fwd_bwd", "done"} <= set(rows)
    # fused and unfused differ only by rounding (fp32): 0.0 would mean the "fused" layer ran the torch ops
    assert 0 < rows["correctness"]["o_rel"] < 1e-4 and rows["correctness"]["worst_grad_rel"] < 1e-3


def test_checkpoint_bench_smoke(tmp_path):
    """checkpoint_level 0 beside the default: both rows, and on the interpreter (one chunk size for both
    directions) the kept states give the default's outputs and gradients bit for bit."""
    stdout, data = run_smoke("checkpoint_bench.py", tmp_path)
    rows = data["rows"]
    assert [r["level"] for r in rows] == [None, 0]
    assert all(set(r["diff_from_default"]) == {"o", "dq", "dk", "dv", "ds", "dg"} for r in rows)
    assert all(d == 0.0 for d in rows[1]["diff_from_default"].values())
    assert stdout.splitlines()[-1].split()[:2] == ["1,40,2,16,8", "0"]  # the table comes last


def test_model_bench_smoke(tmp_path):
    """Tiny model, ours only: training (eager and fullgraph, no graph break) and decode rows."""
    stdout, data = run_smoke("model_bench.py", tmp_path)
    rows = data["rows"]
    assert not [r for r in rows if "error" in r or "skipped" in r], rows
    parts = {(r["part"].split()[0], r["model"], r.get("mode")) for r in rows}
    assert {("train", "ours", "eager"), ("train", "ours", "fullgraph"), ("decode", "ours", "eager")} <= parts
    assert next(r for r in rows if r.get("mode") == "fullgraph")["graph_breaks"] == 0
    assert all(r["tokens_per_s"] > 0 for r in rows if "tokens_per_s" in r)
    assert stdout.splitlines()[-1].startswith("decode B2")  # the table comes last


def test_host_profile_stub_kernels(tmp_path):
    """bench/host_profile.py --stub-kernels times the host path alone (no kernel runs) and writes its rows."""
    out = tmp_path / "host.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "host_profile.py"), "--stub-kernels", "--calls", "3",
                             "--shape", "1,64,2,32,16", "--out", str(out)],
                            check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["run"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fwd", "fwd+bwd", "decode"} and all(r["host_ms"] > 0 for r in rows.values())


def test_other_gpu_processes_are_recorded():
    """The benchmarks record other processes holding the GPU (a timing beside one is not clean): parsed from
    nvidia-smi's CSV without this process; None where nvidia-smi does not answer."""
    from gsa_compile import benchmark
    text = "4242, 1500\n 17, 320\nNo running processes found\n99, [N/A]\n"
    assert benchmark.parse_compute_apps(text, own_pid=17) == [[4242, 1500], [99, None]]
    assert benchmark.parse_compute_apps("", own_pid=1) == []
    found = benchmark.environment()["other_gpu_processes"]
    assert found is None or all(pid != os.getpid() for pid, _ in found)


def test_fuzz_repro_reads_both_case_files(tmp_path):
    """bench/fuzz_repro.py re-runs the recorded GPU failures (tests/gpu_regression_cases.json) or a
    gpu_hardening.py result's fuzz failures; every recorded case is a complete differential case."""
    sys.path.insert(0, str(ROOT / "bench"))
    import fuzz_repro
    sys.path.insert(0, str(ROOT / "tests"))
    import differential
    cases = fuzz_repro.load_cases(ROOT / "tests" / "gpu_regression_cases.json")
    assert len(cases) == 10 and all(c["dtype"] in ("bfloat16", "float16") for c in cases)
    fields = set(differential.draw_case(lambda label, options: options[0]))
    assert all(fields <= set(c) for c in cases)
    hardening = tmp_path / "hardening.json"
    hardening.write_text(json.dumps({"cases": {"fuzz": {"failures": [{"case": cases[0], "above_tolerance": {}}]}}}))
    assert fuzz_repro.load_cases(hardening) == cases[:1]
    assert all(set(v) - {"fresh"} <= {"GSA_MIN_SLOT_TILE", "GSA_MIN_KV_TILE", "CUDA_LAUNCH_BLOCKING",
                                      "GSA_BACKWARD_CONFIG"} for v in fuzz_repro.VARIANTS.values())


def test_bench_table_prints_kernel_times(capsys):
    """`python -m gsa_compile bench`'s table: wall times, then the kernels' GPU time per call (host
    excluded: fla's wall time varied 2x between runs of the same kernels), with fla absent or present."""
    from gsa_compile import benchmark
    row = dict(B=4, T=4096, H=4, K=512, V=512, M=64, ours_fwd_ms=0.5, ours_fwdbwd_ms=2.0, ours_fwdbwd_peak_mib=780.0,
               sdpa_fwd_ms=0.5, sdpa_fwdbwd_ms=2.0, hbm_floor_fwd_ms=0.07, ours_kernels_fwd_total_ms=0.4,
               ours_kernels_fwdbwd_total_ms=1.8, ours_kept_kernels_fwdbwd_total_ms=1.6, ours_kept_fwdbwd_ms=1.7)
    with_fla = dict(row, fla_fwd_ms=1.0, fla_fwdbwd_ms=3.0, fla_fwdbwd_peak_mib=600.0, fla_kernels_fwd_total_ms=0.6,
                    fla_kernels_fwdbwd_total_ms=2.7)
    correct = [dict(dtype="bfloat16", layout="slot", chunk=64, value_err=1e-3, grad_err=2e-3, gate_grad_err=1e-3,
                    ok=True)]
    result = dict(environment={}, correctness=correct, compile=dict(ok=True), timing=[row, with_fla])
    assert benchmark.print_table(result)
    lines = capsys.readouterr().out.splitlines()
    kernel_rows = lines[lines.index(next(x for x in lines if x.startswith("GPU kernel time"))) + 1:]
    assert len(kernel_rows) == 2 and "nan" in kernel_rows[0]
    assert kernel_rows[1].split("|")[1].split() == ["0.400", "0.600", "1.50"]
    assert kernel_rows[1].split("|")[2].split() == ["1.800", "2.700", "1.50"]
    assert kernel_rows[1].split("|")[3].split() == ["1.600", "1.700"]
