"""The layers of DESIGN.md, checked: the core imports no framework, each layer imports only the ones below it,
and every PyTorch module has its JAX twin."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the minflux packages it may import (lower layers only)
ALLOWED = {
    "minflux": {"minflux"},
    "minflux_torch": {"minflux", "minflux_torch"},
    "minflux_jax": {"minflux", "minflux_jax"},
    "parity": {"minflux", "minflux_torch", "minflux_jax", "parity"},
    "minflux_cli": {"minflux", "minflux_torch", "minflux_jax", "parity", "minflux_cli"},
}
FRAMEWORKS = ("torch", "jax", "jaxlib", "flax", "optax", "orbax")


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth of the file (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", list(ALLOWED))
def test_layers_import_only_downward(package):
    wrong = {}
    for path in modules(package):
        bad = {n for n in imported(path) if n in ALLOWED and n not in ALLOWED[package]}
        if package == "minflux":
            bad |= {n for n in imported(path) if n in FRAMEWORKS}
        if bad:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert not wrong, f"imports against the layering: {wrong}"


def test_core_imports_without_frameworks():
    """Every module under minflux/ imports with torch, jax, flax, optax and orbax made unimportable."""
    names = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in modules("minflux")]
    names = [n.removesuffix(".__init__") for n in names]
    code = (
        "import importlib, sys\n"
        f"for f in {FRAMEWORKS!r}: sys.modules[f] = None  # any import of them raises ImportError\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "print(len(sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(names) >= 12  # configs keymaps checkpoint ... : the test does look at them


# minflux trains through JAX; minflux_torch/train.py is the step's reference
JAX_ONLY = {Path("trainer.py"), Path("loader.py"), Path("runlog.py"), Path("checkpoints.py")}


def test_every_module_has_its_twin():
    twins = [
        {p.relative_to(ROOT / pkg) for p in modules(pkg) if p.name != "__init__.py"}
        for pkg in ("minflux_torch", "minflux_jax")
    ]
    twins[1] -= JAX_ONLY
    assert twins[0] == twins[1], (
        f"torch only: {sorted(twins[0] - twins[1])}; jax only: {sorted(twins[1] - twins[0])}"
    )
