"""safetensors IO: lazy reads over one file or a directory of shards, strict checks, atomic writes.

Every failure raises `CheckpointError` naming the file and the cause. Tensors
are numpy arrays (bf16 as `ml_dtypes.bfloat16`), read one at a time, so a
checkpoint larger than memory can be converted or streamed block by block.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from minflux import keymaps

FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
_ST_TO_NP = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class CheckpointError(Exception):
    """A checkpoint could not be read, written or matched to a model; the message says where and why."""


def np_dtype(name: str) -> np.dtype:
    """numpy dtype for a safetensors dtype name ("BF16" -> ml_dtypes.bfloat16)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "BF16" else np.dtype(_ST_TO_NP[name])


def st_dtype(dtype) -> str:
    """safetensors dtype name for a numpy dtype."""
    name = np.dtype(dtype).name
    for k, v in _ST_TO_NP.items():
        if v == name:
            return k
    raise ValueError(f"dtype {name} cannot be written to safetensors")


def read_header(path: Path) -> dict:
    """Parse and validate a safetensors header; truncated or corrupt files raise CheckpointError.

    Each entry gains "start": the absolute file offset of its data.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path}: corrupt header (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt header (a JSON {type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    for key, info in header.items():  # we read data by offset ourselves, so check what safetensors would
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype(dtype).itemsize
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt header entry for {key!r}: {info!r} ({e!r})") from None
        if not 0 <= a <= b or b - a != nbytes or min(shape, default=0) < 0:
            raise CheckpointError(f"{path}: corrupt header: {key!r} is {dtype} {shape} ({nbytes} bytes) "
                                  f"but spans data offsets [{a}, {b})")
        info["start"] = 8 + n + a
    last = max(header, key=lambda k: header[k]["data_offsets"][1], default=None)
    end = header[last]["data_offsets"][1] if last is not None else 0
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: the header needs {8 + n + end} bytes (up to the end of "
                              f"{last!r}), the file has {size}")
    return header


class Checkpoint:
    """Lazy view of one safetensors file or a directory of shards; BFL's `model.diffusion_model.` prefix,
    if present, is stripped from the keys."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        files = sorted(self.path.glob("*.safetensors")) if self.path.is_dir() else [self.path]
        if not files:
            raise CheckpointError(f"{self.path}: directory holds no *.safetensors files")
        self.files: dict[str, Path] = {}  # key -> file
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}  # key -> (dtype, shape)
        self.starts: dict[str, int] = {}  # key -> file offset of its data
        for file in files:
            for key, info in read_header(file).items():
                if key in self.meta:
                    raise CheckpointError(f"{file}: key {key!r} also in {self.files[key]}")
                self.files[key], self.meta[key] = file, (info["dtype"], tuple(info["shape"]))
                self.starts[key] = info["start"]
        self.raw_layout = keymaps.detect_layout(self.meta)
        self.prefix = keymaps.BFL_PREFIX if self.raw_layout == "bfl-prefixed" else ""
        if self.prefix:
            self.files = {k.removeprefix(self.prefix): v for k, v in self.files.items()}
            self.meta = {k.removeprefix(self.prefix): v for k, v in self.meta.items()}
            self.starts = {k.removeprefix(self.prefix): v for k, v in self.starts.items()}
        self.layout = {"bfl-prefixed": "bfl"}.get(self.raw_layout, self.raw_layout)
        self._handles: dict[Path, object] = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s for k, (_, s) in self.meta.items()}

    def _open(self, key: str):
        file = self.files[key]
        if file not in self._handles:
            self._handles[file] = open(file, "rb")  # kept open for the next rows
        return self._handles[file]

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor (the whole tensor for 0-d ones), read without the rest.

        Plain reads straight into a fresh array, not a memory map: mapped pages stay resident (and count
        in RSS) until the map closes, so converting a 64 GB file through mmap looks like a 64 GB process.
        """
        dtype, shape = self.meta[key]
        if not 0 <= start <= stop <= (shape[0] if shape else 1):
            raise ValueError(f"rows [{start}, {stop}) of {key!r} {shape}")
        arr = np.empty((stop - start, *shape[1:]) if shape else (), np_dtype(dtype))
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * arr.itemsize
        buf = memoryview(arr.reshape(-1).view(np.uint8))
        f, done = self._open(key), 0
        f.seek(self.starts[key] + start * row_bytes)
        while done < len(buf) and (n := f.readinto(buf[done:])):
            done += n
        if done < len(buf):
            raise CheckpointError(f"{self.files[key]}: truncated while reading {key!r} "
                                  f"(got {done} of {len(buf)} bytes)")
        return arr

    def get(self, key: str) -> np.ndarray:
        shape = self.meta[key][1]
        return self.rows(key, 0, shape[0] if shape else 1)

    def close(self) -> None:
        for f in getattr(self, "_handles", {}).values():  # also from __del__ after a failed __init__
            f.close()
        self._handles = {}

    __del__ = close  # the open files go with the Checkpoint (readers that stream it never call close)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_finite(arr: np.ndarray, key: str, where) -> None:
    if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
        if not np.isfinite(arr.astype(np.float32) if arr.dtype.name == "bfloat16" else arr).all():
            raise CheckpointError(f"{where}: tensor {key!r} holds NaN or Inf values")


class BflReader:
    """A checkpoint in any layout, seen as BFL-layout tensors and checked against `expected` shapes up front.

    Raises CheckpointError naming the file for an unknown layout, missing or unexpected keys, shape
    mismatches (expected and found) and non-float dtypes; `read` raises for NaN/Inf values.
    """

    def __init__(self, path, expected: dict[str, tuple[int, ...]], cfg):
        ckpt, family = Checkpoint(path), cfg.family
        if ckpt.layout is None:
            raise CheckpointError(f"{ckpt.path}: unknown layout (neither BFL nor diffusers key names); "
                                  f"first keys: {sorted(ckpt.meta)[:5]}")
        try:
            recipes = keymaps.convert(ckpt.shapes(), ckpt.layout, "bfl", family, getattr(cfg, "hidden_size", 0))
        except KeyError as e:
            raise CheckpointError(f"{ckpt.path}: unexpected key {e.args[0]!r} for a {family} "
                                  f"checkpoint in {ckpt.layout} layout") from None
        missing, unexpected = sorted(set(expected) - set(recipes)), sorted(set(recipes) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{ckpt.path} ({ckpt.layout} layout): missing keys {missing[:10]}"
                                  f"{' ...' if len(missing) > 10 else ''}; unexpected keys {unexpected[:10]}"
                                  f"{' ...' if len(unexpected) > 10 else ''}")
        bad = [f"{k}: expected {expected[k]}, found {r.shape}" for k, r in recipes.items() if r.shape != expected[k]]
        if bad:
            raise CheckpointError(f"{ckpt.path}: shape mismatch: " + "; ".join(bad[:10]))
        for recipe in recipes.values():
            for src, _, _ in recipe.pieces:
                dtype = ckpt.meta[src][0]
                if dtype not in FLOAT_DTYPES:
                    raise CheckpointError(f"{ckpt.path}: tensor {src!r} has dtype {dtype}, expected a float dtype")
        self.ckpt, self.recipes = ckpt, recipes

    def keys(self) -> list[str]:
        return list(self.recipes)

    def read(self, key: str) -> np.ndarray:
        arr = keymaps.apply(self.recipes[key], self.ckpt.rows)
        check_finite(arr, key, self.ckpt.path)
        return arr

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return ((key, self.read(key)) for key in self.recipes)


def read_bfl(path, expected: dict[str, tuple[int, ...]], cfg) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (key, tensor) pairs of a checkpoint in BFL layout; checks as `BflReader`, before the first read."""
    return iter(BflReader(path, expected, cfg))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_safetensors(path, specs: dict[str, tuple[str, tuple[int, ...]]], produce: Callable[[str], np.ndarray],
                      metadata: dict[str, str] | None = None, progress: bool = False) -> None:
    """Write tensors one at a time, so memory stays near the largest tensor; atomic (temp, fsync, rename).

    `specs` maps key -> (safetensors dtype, shape); `produce(key)` returns that tensor.
    """
    path = Path(path)
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for key, (dtype, shape) in specs.items():
        n = int(np.prod(shape, dtype=np.int64)) * np_dtype(dtype).itemsize
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=offset, desc=f"writing {path.name}", unit="B", unit_scale=True, unit_divisor=1024)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for key in specs:
                arr = np.asarray(produce(key))
                arr = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)  # keeps 0-d tensors 0-d
                dtype, shape = specs[key]
                if arr.dtype != np_dtype(dtype) or tuple(arr.shape) != tuple(shape):
                    raise CheckpointError(f"{path}: tensor {key!r} is {arr.dtype} {arr.shape}, "
                                          f"declared {dtype} {tuple(shape)}")
                f.write(memoryview(arr.reshape(-1).view(np.uint8)))
                if bar is not None:
                    bar.update(arr.nbytes)
                del arr  # before the next produce(): one tensor in memory at a time, not two
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:  # no space, no such directory, permissions: one clear line
        raise CheckpointError(f"{path}: writing failed: {e}") from None
    finally:
        if bar is not None:
            bar.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


LAYOUTS = ("bfl", "bfl-prefixed", "diffusers")


def save_bfl(path, tensors: dict[str, np.ndarray], cfg, layout: str = "bfl") -> None:
    """Write BFL-layout numpy tensors of a model with config `cfg` as `layout` (one of LAYOUTS)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    recipes = keymaps.convert(shapes, "bfl", "diffusers" if layout == "diffusers" else "bfl", cfg.family,
                              getattr(cfg, "hidden_size", 0))
    if layout == "bfl-prefixed":
        recipes = {keymaps.BFL_PREFIX + k: r for k, r in recipes.items()}
    write_recipes(path, recipes, lambda k, a, b: tensors[k][a:b] if tensors[k].ndim else tensors[k],
                  {k: st_dtype(v.dtype) for k, v in tensors.items()})


def write_recipes(path, recipes: dict[str, keymaps.Recipe], rows, src_dtypes: dict[str, str],
                  dtype: str | None = None, progress: bool = False, metadata: dict[str, str] | None = None) -> None:
    """Write every recipe's tensor, optionally cast to `dtype` (a safetensors name, floats only)."""

    def out_dtype(recipe):
        src = src_dtypes[recipe.pieces[0][0]]
        return dtype if dtype and src in FLOAT_DTYPES else src

    specs = {k: (out_dtype(r), r.shape) for k, r in recipes.items()}
    # copy=False: no second copy of the largest tensor when no cast is needed
    write_safetensors(path, specs,
                      lambda k: keymaps.apply(recipes[k], rows).astype(np_dtype(specs[k][0]), copy=False),
                      metadata=metadata, progress=progress)
