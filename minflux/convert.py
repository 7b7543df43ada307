"""Checkpoint conversion, the library behind `minflux convert`: re-lay a checkpoint between the BFL and
diffusers layouts, tensor by tensor.

Every output tensor is a `keymaps.Recipe` (row ranges of source tensors): rows are read lazily with
`Checkpoint.rows` and written one tensor at a time by `checkpoint.write_recipes`, so memory stays near
the largest tensor (about 0.7 GB for the 64 GB FLUX.2-dev file) and the output appears only once it is
complete (temp file, fsync, rename). Which model the file holds, and its width, are read off the key
names and shapes, so no config is needed. Pure numpy: no torch, no jax.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from minflux import checkpoint, configs, files, keymaps
from minflux.checkpoint import Checkpoint, CheckpointError
from minflux.family import FAMILIES

DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32", "fp8": "F8_E4M3"}
EXTRACT = ("transformer", "ae")


# ---------------------------------------------------------------------------------------------
# What a complete checkpoint holds: every module of the family's key table, in every block
# ---------------------------------------------------------------------------------------------

# Modules a complete checkpoint may lack: the guidance embedder (schnell, klein), the 1x1 shortcut of a VAE
# block whose width does not change, the VAE's last down- and first up-sampling level.
OPTIONAL = ("guidance_in.", ".nin_shortcut", ".downsample.conv", ".upsample.conv")


def _params(module: str, family: str) -> set[str]:
    """The tensors a module of `family` holds: RMSNorm `scale`; BatchNorm statistics; else weight (+ bias)."""
    if module.endswith(("query_norm", "key_norm")):
        return {"scale"}
    if module == "bn":
        return {"running_mean", "running_var"}
    # FLUX.2's linear layers have no bias; the autoencoders' convolutions all have one
    bias = FAMILIES[family].bias if family in FAMILIES else True
    return {"weight", "bias"} if bias else {"weight"}


def missing_keys(shapes: dict[str, tuple[int, ...]], family: str) -> list[str]:
    """BFL keys a complete `family` checkpoint with these blocks holds and `shapes` (BFL keys) lacks.

    Read off `keymaps.TABLES` (every module either layout names), not a preset: the block counts are the
    file's own (indices 0..n-1 in every block stream, as many inner blocks at every VAE level), so a
    checkpoint of any depth is complete when no block lacks a module and no module lacks a tensor.
    """
    seen: dict[str, dict[tuple[str, ...], set[str]]] = {}
    for bfl, _, _ in keymaps.TABLES[family]:
        pattern = re.compile(re.escape(bfl).replace(r"\{\}", r"(\d+)") + r"\.(\w+)$")
        for key in shapes:
            if m := pattern.match(key):
                *idx, param = m.groups()
                seen.setdefault(bfl, {}).setdefault(tuple(idx), set()).add(param)
    # per block stream (the text before the first index): the indices every module must cover
    outer: dict[str, set[int]] = {}
    inner: dict[str, set[int]] = {}
    for bfl, found in seen.items():
        if "{}" in bfl:
            stream = bfl.split("{}")[0]
            outer.setdefault(stream, set()).update(int(i[0]) for i in found)
            inner.setdefault(stream, set()).update(int(i[1]) for i in found if len(i) > 1)
    missing = []
    for bfl, _, _ in keymaps.TABLES[family]:
        found = seen.get(bfl, {})
        optional = any(o in bfl for o in OPTIONAL)
        if optional and not found:
            continue
        if "{}" not in bfl:
            wanted = [()]
        else:
            stream = bfl.split("{}")[0]
            firsts = range(max(outer.get(stream) or {-1}) + 1)
            seconds = range(max(inner.get(stream) or {-1}) + 1)
            wanted = (
                [(str(i),) for i in firsts]
                if bfl.count("{}") == 1
                else [(str(i), str(j)) for i in firsts for j in seconds]
            )
        if optional:  # present somewhere: complete where present
            wanted = [i for i in wanted if i in found]
        for idx in wanted:
            module = bfl.format(*idx)
            for param in sorted(_params(module, family) - found.get(idx, set())):
                missing.append(f"{module}.{param}")
    return missing


def missing_pieces(shapes: dict[str, tuple[int, ...]], family: str) -> list[str]:
    """diffusers keys that a fused BFL tensor needs beside the ones `shapes` (diffusers keys) holds: a block with
    `to_k` and `to_v` but no `to_q` (BFL's qkv is their concatenation)."""
    missing = []
    for _, diff, kind in keymaps.TABLES[family]:
        if kind != "split":
            continue
        found = []
        for d in diff:
            pattern = re.compile(re.escape(d).replace(r"\{\}", r"(\d+)") + r"\.(\w+)$")
            found.append({m.groups() for k in shapes if (m := pattern.match(k))})
        every = set().union(*found)
        for d, have in zip(diff, found, strict=True):
            missing += [f"{d.format(*i[:-1])}.{i[-1]}" for i in sorted(every - have)]
    return missing


def check_complete(
    ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]], family: str, width: int
) -> None:
    """Raise CheckpointError naming the file and the first missing keys when `shapes` (BFL keys of `ckpt`) is not
    a complete `family` checkpoint (`missing_keys`; diffusers files: `missing_pieces` first, in their names), or
    when blocks of one stream disagree in shape."""
    missing = missing_keys(shapes, family)
    if ckpt.layout == "diffusers":
        missing = missing_pieces(ckpt.shapes(), family) + missing
    what = configs.describe(family, width)
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise CheckpointError(
            f"{ckpt.path}: an incomplete {what.removeprefix('a ')}: missing "
            f"{', '.join(map(repr, missing[:4]))}{more}"
        )
    if family in FAMILIES:  # transformer blocks of one stream are alike
        first: dict[str, tuple[str, tuple]] = {}
        for key, shape in shapes.items():
            generic = re.sub(r"^(double_blocks|single_blocks)\.\d+\.", r"\1.N.", key)
            if generic != key:
                was = first.setdefault(generic, (key, tuple(shape)))
                if was[1] != tuple(shape):
                    raise CheckpointError(
                        f"{ckpt.path}: {key!r} is {tuple(shape)}, but {was[0]!r} is {was[1]}: "
                        "blocks of one kind must be alike"
                    )


def _finite(arr: np.ndarray) -> bool:
    """No NaN or Inf, checked in chunks (no float32 copy of a whole bf16 / fp8 tensor): an all-ones exponent
    field is the mark of both, in every IEEE-like format (float8_e4m3fn: all-ones exponent and mantissa)."""
    flat = arr.reshape(-1)
    name = checkpoint.st_dtype(arr.dtype) if arr.dtype.kind not in "biu" else ""
    masks = {"BF16": (np.uint16, 0x7F80, 0x7F80), "F16": (np.uint16, 0x7C00, 0x7C00)}
    masks |= {"F8_E4M3": (np.uint8, 0x7F, 0x7F), "F8_E5M2": (np.uint8, 0x7C, 0x7C)}
    step = 1 << 24
    for start in range(0, flat.size, step):
        part = flat[start : start + step]
        if name in masks:
            view, mask, bad = masks[name]
            if ((part.view(view) & mask) == bad).any():
                return False
        elif name in ("F32", "F64") and not np.isfinite(part).all():
            return False
    return True


def plan(
    src, to: str | None = None, extract: str | None = None
) -> tuple[Checkpoint, dict[str, keymaps.Recipe], str]:
    """Open `src` and work out every output tensor: (checkpoint, recipes by output key, target layout).

    `to` is one of `checkpoint.LAYOUTS`; None picks the other layout (BFL -> diffusers, diffusers -> BFL).
    `extract` ("transformer" or "ae") picks one component of a bundle; None reads the only one a file holds
    (CheckpointError if it holds several). Raises CheckpointError naming the file for a LoRA file, an unknown
    layout or family, an unexpected key, an integer tensor, and an incomplete checkpoint (`check_complete`).
    """
    if extract is not None and extract not in EXTRACT:
        raise ValueError(f"extract={extract!r}; expected one of {EXTRACT}")
    checkpoint.refuse_lora(src)
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
    for key, (dtype, _) in ckpt.meta.items():
        if dtype not in checkpoint.FLOAT_DTYPES and key.rsplit(".", 1)[-1] not in keymaps.SKIPPED:
            raise CheckpointError(
                f"{ckpt.files[key]}: tensor {ckpt.sources[key]!r} is {dtype}; FLUX weights are floating "
                "point (F32, F16, BF16, fp8): a damaged or foreign file"
            )
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
    bfl_shapes = (
        {k: r.shape for k, r in recipes.items()} if ckpt.layout == "diffusers" else dict(shapes)
    )
    check_complete(ckpt, bfl_shapes, family, hidden)
    # same layout: a copy (or a cast, or a prefix)
    if (to == "diffusers") == (ckpt.layout == "diffusers"):
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
    Before anything is written, `dst` is checked (`files.check_output`: writable, a regular file, room for the
    output's size); while writing, every tensor is checked for NaN / Inf. Raises CheckpointError (or its
    `OutputError`) naming the file; `dst` is left as it was on any failure.
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
    files.check_output(dst, size=_output_bytes(recipes, src_dtypes, DTYPES.get(dtype)))

    def rows(
        key: str, start: int, stop: int
    ) -> np.ndarray:  # every value read is checked: no NaN / Inf
        arr = ckpt.rows(key, start, stop)
        if not _finite(arr):
            raise CheckpointError(
                f"{ckpt.files[key]}: tensor {ckpt.sources[key]!r} holds NaN or Inf values"
            )
        return arr

    t0 = time.perf_counter()
    with ckpt:
        checkpoint.write_recipes(
            dst,
            recipes,
            rows,
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


def _output_bytes(
    recipes: dict[str, keymaps.Recipe], src_dtypes: dict[str, str], dtype: str | None
) -> int:
    """The size of the converted file (to within its header): each tensor in the target or its source dtype."""
    total = 0
    for r in recipes.values():
        name = dtype or src_dtypes[r.pieces[0][0]]
        total += int(np.prod(r.shape, dtype=np.int64)) * checkpoint.np_dtype(name).itemsize
    return total
