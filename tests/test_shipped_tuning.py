"""The shipped tuning files still describe the kernels this code generates: every entry's
kernel_text_hash equals the hash of the Triton source codegen renders for its key now. A change to the
templates, IR or codegen that alters a tuned kernel fails here: re-run `python -m gsa_compile tune --ship`
on that GPU (or drop the entry) in the same change."""
import json
from pathlib import Path

import pytest

from gsa_compile import tuner
from gsa_compile.tuner import LaunchConfig, TuningKey

SHIPPED = sorted((Path(tuner.__file__).resolve().parents[1] / "autotune").glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_entries_match_the_generated_kernels(path):
    doc = json.loads(path.read_text())
    assert doc["format"] == tuner.FORMAT and doc["entries"]
    stale = []
    for text, entry in doc["entries"].items():
        key, config = TuningKey.from_str(text), LaunchConfig.from_json(entry["config"])
        assert "kernel_text_hash" in entry, f"{text}: no kernel_text_hash"
        if entry["kernel_text_hash"] != tuner.kernel_text_hash(key, config.chunk_size):
            stale.append(text)
    assert not stale, f"{path.name}: entries tuned for other kernels (tune them again): {stale}"


def test_shipped_h200_file_is_read_whole(monkeypatch):
    """Under the shipped header's environment, every shipped H200 entry is used (none ignored)."""
    path = Path(tuner.__file__).resolve().parents[1] / "autotune" / "NVIDIA_H200.json"
    doc = json.loads(path.read_text())
    env = tuner.Environment(**dict(doc["header"], source_hash="another package version"))
    assert len(tuner.read_entries(path, env)) == len(doc["entries"])
