"""bench/mods_bench.py --smoke runs (tiny shapes, CPU interpreter): its fused layer really is fused and agrees."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mods_bench_smoke(tmp_path):
    out = tmp_path / "mods.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "mods_bench.py"), "--smoke", "--out", str(out)],
                            check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["step"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"correctness", "layer_fwd", "layer_fwd_train", "gsa_fwd", "layer_fwd_bwd", "done"} <= set(rows)
    # fused and unfused differ only by rounding (fp32): 0.0 would mean the "fused" layer ran the torch ops
    assert 0 < rows["correctness"]["o_rel"] < 1e-4 and rows["correctness"]["worst_grad_rel"] < 1e-3
