"""Checkpoint conversion, the library behind `minflux convert`: re-lay a checkpoint between the BFL and
diffusers layouts, tensor by tensor.

Every output tensor is a `keymaps.Recipe` (row ranges of source tensors): rows are read lazily with
`Checkpoint.rows` and written one tensor at a time by `checkpoint.write_recipes`, so memory stays near
the largest tensor (about 0.7 GB for the 64 GB FLUX.2-dev file) and the output appears only once it is
complete (temp file, fsync, rename). Which model the file holds, and its width, are read off the key
names and shapes, so no config is needed. Pure numpy: no torch, no jax.
"""

from __future__ import annotations

import time
from pathlib import Path

from minflux import checkpoint, keymaps
from minflux.checkpoint import Checkpoint, CheckpointError

DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32", "fp8": "F8_E4M3"}
EXTRACT = ("transformer", "ae")


def plan(
    src, to: str | None = None, extract: str | None = None
) -> tuple[Checkpoint, dict[str, keymaps.Recipe], str]:
    """Open `src` and work out every output tensor: (checkpoint, recipes by output key, target layout).

    `to` is one of `checkpoint.LAYOUTS`; None picks the other layout (BFL -> diffusers, diffusers -> BFL).
    `extract` ("transformer" or "ae") picks one component of a bundle; None reads the only one a file holds
    (CheckpointError if it holds several).
    """
    if extract is not None and extract not in EXTRACT:
        raise ValueError(f"extract={extract!r}; expected one of {EXTRACT}")
    ckpt = Checkpoint(src, extract or "auto")
    if ckpt.layout is None:
        raise CheckpointError(
            f"{ckpt.path}: unknown layout (neither BFL nor diffusers key names); "
            f"first keys: {sorted(ckpt.meta)[:5]}"
        )
    family = keymaps.infer_family(ckpt.meta)
    if family is None:
        raise CheckpointError(
            f"{ckpt.path}: cannot tell the model from its keys (no FLUX.1, FLUX.2 or "
            f"autoencoder marker); first keys: {sorted(ckpt.meta)[:5]}"
        )
    if family not in keymaps.TABLES:  # hook: a family recognised by infer_family but not yet mapped
        raise CheckpointError(
            f"{ckpt.path}: a {family} checkpoint; no key map for {family} in keymaps.TABLES"
        )
    if to is not None and to not in checkpoint.LAYOUTS:
        raise ValueError(f"to={to!r}; expected one of {checkpoint.LAYOUTS}")
    to = to or ("diffusers" if ckpt.layout == "bfl" else "bfl")
    shapes = ckpt.shapes()
    hidden = keymaps.infer_hidden_size(shapes)
    if family.startswith("flux") and not hidden:
        raise CheckpointError(
            f"{ckpt.path}: no 2-D img_in.weight / x_embedder.weight to read the width from"
        )
    other = "bfl" if ckpt.layout == "diffusers" else "diffusers"
    try:  # map to the other layout even when the target is the source's: that checks every key
        recipes = keymaps.convert(shapes, ckpt.layout, other, family, hidden)
    except KeyError as e:
        key = e.args[0]
        raise CheckpointError(
            f"{ckpt.files[key]}: unexpected key {ckpt.prefix + key!r} for a {family} checkpoint "
            f"in {ckpt.layout} layout"
        ) from None
    for key, r in recipes.items():
        if r.shape and r.shape[0] <= 0:  # a fused tensor too short for its split
            raise CheckpointError(
                f"{ckpt.files[r.pieces[0][0]]}: {r.pieces[0][0]!r} {shapes[r.pieces[0][0]]} "
                f"is too small to split with width {hidden} (it would give {key!r} {r.shape})"
            )
    if (to == "diffusers") == (
        ckpt.layout == "diffusers"
    ):  # same layout: a copy (or a cast, or a prefix)
        recipes = keymaps.convert(shapes, ckpt.layout, ckpt.layout, family, hidden)
    if to == "bfl-prefixed":
        recipes = {keymaps.BFL_PREFIX + k: r for k, r in recipes.items()}
    return ckpt, recipes, to


def convert(
    src,
    dst,
    to: str | None = None,
    dtype: str | None = None,
    progress: bool = False,
    extract: str | None = None,
    digests: bool = True,
) -> dict:
    """Convert `src` (file, directory of shards or shard index; one component of a bundle) to one safetensors
    file `dst` with a SHA-256 digest per tensor in its metadata (unless `digests=False`); returns a summary.

    `dtype` ("bf16", "fp16", "fp32" or None) casts the floating-point tensors; others keep theirs. "fp8" writes
    the linear weights as float8_e4m3fn with a per-tensor F32 `*.weight_scale` (ComfyUI's convention, see
    `checkpoint.write_recipes`); scaled fp8 sources are read dequantized (weight * scale).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {list(DTYPES)}")
    ckpt, recipes, to = plan(src, to, extract)
    dst = Path(dst)
    if dst.is_dir():
        raise CheckpointError(f"{dst}: is a directory; give the output file name")
    if dst.exists() and dst.resolve() in {f.resolve() for f in ckpt.files.values()}:
        raise CheckpointError(f"{dst}: is the input; write the conversion to another file")
    src_dtypes = {k: d for k, (d, _) in ckpt.meta.items()}
    t0 = time.perf_counter()
    with ckpt:
        checkpoint.write_recipes(
            dst,
            recipes,
            ckpt.rows,
            src_dtypes,
            DTYPES.get(dtype),
            progress=progress,
            metadata={"format": "pt"},
            prefix=keymaps.BFL_PREFIX if to == "bfl-prefixed" else "",
            digests=digests,
        )
    return {
        "src": str(ckpt.path),
        "dst": str(dst),
        "from": ckpt.raw_layout,
        "to": to,
        "tensors": len(recipes),
        "bytes": dst.stat().st_size,
        "seconds": time.perf_counter() - t0,
    }
