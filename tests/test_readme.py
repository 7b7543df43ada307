"""The README is true: its Python snippets run as written, and `minflux --help` lists every command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_python_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "the README has no Python snippet"
    for code in blocks:
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600
        )
        assert r.returncode == 0, f"README snippet failed:\n{code}\n{r.stderr[-3000:]}"


def test_help_lists_every_command(capsys):
    from minflux_cli.main import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS) and {
        "parity",
        "convert",
        "generate",
        "train",
        "cache",
    } <= set(COMMANDS)
