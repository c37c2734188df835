"""bench/model_bench.py --smoke runs (tiny model, CPU interpreter, ours only) and writes its JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_model_bench_smoke(tmp_path):
    out = tmp_path / "model.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "model_bench.py"), "--smoke", "--out", str(out)],
                            check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if "error" in r or "skipped" in r], rows
    parts = {(r["part"].split()[0], r["model"], r.get("mode")) for r in rows}
    assert {("train", "ours", "eager"), ("train", "ours", "fullgraph"), ("decode", "ours", "eager")} <= parts
    assert next(r for r in rows if r.get("mode") == "fullgraph")["graph_breaks"] == 0
    assert all(r["tokens_per_s"] > 0 for r in rows if "tokens_per_s" in r)
    assert result.stdout.splitlines()[-1].startswith("decode B2")  # the table comes last
