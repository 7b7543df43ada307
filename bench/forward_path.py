"""Lines and functions of the FLUX.2 forward path, measured by running it (issue 19's before/after figure).

Runs a plain `Flux2` forward on the tiny preset in each framework under `sys.setprofile` and counts every
function of the model package (`minflux_torch/` or `minflux_jax/`) it enters: their number (lambdas and
comprehensions not counted as functions), their source lines (the union of their line ranges, so a nested
lambda counts once; signatures and docstrings included) and the code lines among them (no blank, comment or
docstring lines). Run from the repository root, or with --root on another checkout:

    python bench/forward_path.py [--root DIR]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import numpy as np


def _functions(path: Path) -> dict[int, ast.AST]:
    """first line of each function's code object (its first decorator, else its `def`) -> its node."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            first = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
            out.setdefault(first, node)
    return out


def _docstring_lines(path: Path) -> set[int]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    out.update(range(first.lineno, first.end_lineno + 1))
    return out


def measure(package: Path, run) -> tuple[int, int, int, list[str]]:
    """(functions, lines, code lines, names) of what `run()` enters in `package`."""
    seen = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(str(package)):
            seen.add(frame.f_code)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    lines: dict[Path, set[int]] = {}
    for code in seen:
        if code.co_name in ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"):
            continue  # inside a function counted already
        path = Path(code.co_filename)
        node = _functions(path)[code.co_firstlineno]
        lines.setdefault(path, set()).update(range(node.lineno, node.end_lineno + 1))
    n_code = 0
    for path, numbers in lines.items():
        src, doc = path.read_text().splitlines(), _docstring_lines(path)
        n_code += sum(
            1
            for i in numbers
            if i not in doc and src[i - 1].strip() and not src[i - 1].lstrip().startswith("#")
        )
    functions = sorted(
        f"{Path(c.co_filename).stem}.{c.co_qualname}" for c in seen if not c.co_name.startswith("<")
    )
    return len(functions), sum(len(v) for v in lines.values()), n_code, functions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    root = parser.parse_args().root.resolve()
    sys.path.insert(0, str(root))  # the checkout measured, before any installed copy

    import jax.numpy as jnp
    import torch

    import minflux_jax as mj
    import minflux_torch as mt
    from minflux import configs

    cfg = configs.get("flux2-tiny")
    rng = np.random.default_rng(0)
    inputs = {
        "x": rng.standard_normal((1, 9, cfg.in_channels), dtype=np.float32),
        "x_ids": np.zeros((1, 9, 4), np.int64),
        "timesteps": np.full((1,), 0.5, np.float32),
        "ctx": rng.standard_normal((1, 5, cfg.context_in_dim), dtype=np.float32),
        "ctx_ids": np.zeros((1, 5, 4), np.int64),
    }
    if cfg.guidance_embed:
        inputs["guidance"] = np.full((1,), 3.5, np.float32)
    tm, jm = mt.build_model(cfg, seed=0), mj.build_model(cfg, seed=0)
    t_in = {k: torch.from_numpy(v) for k, v in inputs.items()}
    j_in = {k: jnp.asarray(v) for k, v in inputs.items()}
    with torch.no_grad():
        tm(**t_in)  # once first: lazy imports and caches stay out of the count
        rows = {"torch": measure(root / "minflux_torch", lambda: tm(**t_in))}
    jm(**j_in)
    rows["jax"] = measure(root / "minflux_jax", lambda: jm(**j_in))
    for name, (n, total, code, functions) in rows.items():
        print(f"{name}: {n} functions, {total} lines ({code} code lines): {', '.join(functions)}")


if __name__ == "__main__":
    main()
