"""Readability figures of the code base, for before/after comparisons of refactors (issue 19).

Prints: the largest McCabe complexities (ruff C901), the longest parameter lists, the `family ==`
comparisons outside the family table, the share of lines over 100 characters, and the twins' line
similarity (difflib ratio of `minflux_torch/X.py` against `minflux_jax/X.py` with the framework names
normalised). Run from the repository root, or with --root on another checkout:

    python bench/code_metrics.py [--root DIR]
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import re
import subprocess
from pathlib import Path

PACKAGES = ("minflux", "minflux_torch", "minflux_jax", "minflux_cli", "parity")
TWINS = ("flux1", "flux2", "layers", "sampling", "pipeline")
FAMILY_TABLE = ("minflux/family.py",)  # where `family ==` belongs, once it exists


def sources(root: Path) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def complexities(root: Path, top: int) -> list[tuple[int, str]]:
    out = subprocess.run(
        ["ruff", "check", "--isolated", "--select", "C901", "--output-format", "json"]
        + ["--config", "lint.mccabe.max-complexity=1"]
        + [str(root / p) for p in PACKAGES],
        capture_output=True,
        text=True,
    ).stdout
    rows = []
    for d in json.loads(out or "[]"):
        m = re.search(r"`(.+)` is too complex \((\d+) > 1\)", d["message"])
        if m:
            rows.append((int(m.group(2)), f"{Path(d['filename']).relative_to(root)}:{m.group(1)}"))
    return sorted(rows, reverse=True)[:top]


def parameter_lists(root: Path, top: int) -> list[tuple[int, str]]:
    rows = []
    for path in sources(root):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                n = len([x for x in names if x not in ("self", "cls")])
                rows.append((n, f"{path.relative_to(root)}:{node.name}"))
    return sorted(rows, reverse=True)[:top]


def family_comparisons(root: Path) -> list[str]:
    pattern = re.compile(r"family\s*(==|!=|in\s)|==\s*[\"']flux[12][\"']")
    hits = []
    for path in sources(root):
        rel = str(path.relative_to(root))
        if rel in FAMILY_TABLE:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                hits.append(f"{rel}:{i}")
    return hits


def long_lines(root: Path) -> tuple[int, int]:
    lines = [line for p in sources(root) for line in p.read_text().splitlines()]
    return sum(len(line) > 100 for line in lines), len(lines)


def _normalised(text: str) -> list[str]:
    text = re.sub(r"\b(torch|jnp|jax|nnx|nn|Tensor|jax\.Array)\b", "FW", text)
    return [line.strip() for line in text.splitlines() if line.strip()]


def twin_similarity(root: Path) -> dict[str, float]:
    out = {}
    for name in TWINS:
        a, b = root / "minflux_torch" / f"{name}.py", root / "minflux_jax" / f"{name}.py"
        if a.exists() and b.exists():
            sm = difflib.SequenceMatcher(
                None, _normalised(a.read_text()), _normalised(b.read_text())
            )
            out[name] = round(sm.ratio(), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    root = args.root.resolve()
    print("largest complexities (ruff C901):")
    for n, where in complexities(root, args.top):
        print(f"  {n:3d}  {where}")
    print("longest parameter lists:")
    for n, where in parameter_lists(root, args.top):
        print(f"  {n:3d}  {where}")
    hits = family_comparisons(root)
    print(f"family comparisons outside the family table: {len(hits)}")
    for h in hits:
        print(f"  {h}")
    n, total = long_lines(root)
    print(f"lines over 100 characters: {n} of {total} ({100 * n / total:.1f}%)")
    print("twin similarity (difflib ratio, torch vs jax):", twin_similarity(root))


if __name__ == "__main__":
    main()
