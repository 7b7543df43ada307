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


def test_readme_commands_use_real_flags():
    """Every `minflux CMD ...` line of the README's shell blocks (and docs/) names a command and flags that
    command has: a renamed or removed flag fails here, not for a reader."""
    import shlex

    from minflux_cli.main import COMMANDS, parser

    texts = [(ROOT / "README.md").read_text()] + [
        p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))
    ]
    lines = [
        line.split("#")[0]
        for text in texts
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
        for line in block.replace("\\\n", " ").splitlines()
    ]
    commands = [shlex.split(line) for line in lines if line.strip().startswith("minflux ")]
    assert len(commands) > 20
    for argv in commands:
        words = [w for w in argv[1:] if w != "--verbose"]
        assert words[0] in COMMANDS, argv
        sub = next(a for a in parser(only=words[0])._subparsers._group_actions).choices[words[0]]
        known = {s for action in sub._actions for s in action.option_strings}
        unknown = [
            w.split("=")[0] for w in words if w.startswith("--") and w.split("=")[0] not in known
        ]
        assert not unknown, f"{shlex.join(argv)}: no such flag {unknown[0]}"
