"""Error measures and the tolerance table of DESIGN.md ("Numerics and tolerances")."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# (dtype, scope) -> relative-L2 bound. Scope "block": the same inputs fed to both frameworks;
# "model": a whole forward (free-running), where errors accumulate.
BOUNDS = {
    ("fp32", "block"): 1e-5,
    ("fp32", "model"): 1e-5,  # tiny configs on CPU; full size and CUDA get `FULL_SIZE_MODEL`
    ("bf16", "block"): 1e-2,
    ("bf16", "model"): 5e-2,
}
FULL_SIZE_MODEL = 1e-4


def bound(dtype: str, scope: str, device: str = "cpu", tiny: bool = True) -> float:
    if dtype == "fp32" and scope == "model" and (device != "cpu" or not tiny):
        return FULL_SIZE_MODEL
    return BOUNDS[(dtype, scope)]


@dataclass
class Row:
    """One comparison: JAX output `a` against PyTorch output `b` at one block boundary."""

    name: str
    mode: str  # "teacher" (same inputs) | "free" (each framework runs on its own) | "trajectory"
    dtype: str
    bound: float
    finite: bool
    max_abs: float
    rel_l2: float
    max_rel: float  # max |a - b| / max |b|
    cosine: float
    worst_index: list[int]
    passed: bool
    depth: int = 0  # position along the model, for the plot
    error: str | None = None  # why the JAX side could not run this stage, if it could not

    def as_dict(self) -> dict:
        return asdict(self)


def compare(name: str, mode: str, a, b, dtype: str, bound_: float, depth: int = 0) -> Row:
    """Compare JAX `a` with PyTorch `b` (any arrays of one shape). Non-finite values fail, never masked."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ: JAX {a.shape} vs PyTorch {b.shape}")
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    if not finite:
        nan = float("nan")
        return Row(name, mode, dtype, bound_, False, nan, nan, nan, nan, [], False, depth)
    diff = np.abs(a - b)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
    # sums of products in numpy, not BLAS (norm, vdot): on a busy machine BLAS's threads cost ms per small call
    nb, na, nd = (float(np.sqrt(np.sum(x * x))) for x in (b, a, diff))
    rel = nd / nb if nb > 0 else float(nd > 0)
    cos = float(np.sum(a * b) / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = max_abs / float(np.abs(b).max()) if diff.size and np.abs(b).max() > 0 else max_abs
    return Row(
        name,
        mode,
        dtype,
        bound_,
        True,
        max_abs,
        rel,
        max_rel,
        cos,
        [int(i) for i in worst],
        rel <= bound_,
        depth,
    )
