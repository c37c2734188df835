"""`python -m gsa_compile check` runs and passes."""
import subprocess
import sys

import pytest

from gsa_compile.__main__ import main


def test_check_passes(capsys):
    assert main(["check", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "CUDA:" in out and "FAIL" not in out
    for layout in ("slot", "head", "decay_head", "decay_slot", "abc", "abc + varlen"):
        assert f"\n{layout} " in out


def test_check_fails_loudly(monkeypatch, capsys):
    import gsa_compile.__main__ as cli
    monkeypatch.setattr(cli, "CHECK_TOL", 0.0)
    assert main(["check", "--seed", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_requires_a_command():
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "gsa_compile", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "check" in result.stdout
