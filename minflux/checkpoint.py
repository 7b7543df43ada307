"""safetensors IO: lazy reads over files as users hold them, strict checks, atomic writes.

Every failure raises `CheckpointError` naming the file and the cause. Tensors are numpy arrays (bf16 as
`ml_dtypes.bfloat16`, fp8 as `ml_dtypes.float8_e4m3fn` / `float8_e5m2`), read one at a time, so a checkpoint
larger than memory can be converted or streamed block by block. What is read (see docs/checkpoints.md):

- one file, a directory of shards, or a shard index (`*.safetensors.index.json`, which then decides which
  shard holds which key);
- one component of a bundle: the transformer under `model.diffusion_model.`, `diffusion_model.` or
  `transformer.`, the autoencoder under `vae.` or `first_stage_model.` (or either with no prefix);
- fp8 weights, plain or scaled: a `X.scale_weight` (ComfyUI's legacy scaled fp8) or `X.weight_scale` (ComfyUI's
  quantized format, NVIDIA ModelOpt, compressed-tensors, BFL's FP8R) beside `X.weight` is folded in,
  weight = fp8 * scale, per tensor or per row;
- NVFP4 (ModelOpt's layout, BFL's NVFP4 releases): uint8 `X.weight` with `X.weight_scale` (E4M3 per 16) and
  `X.weight_scale_2`; and GGUF files (`minflux.gguf_file`), their quantized tensors dequantized by the gguf
  package. Quantized tensors read as F32 (`rows`), or packed as stored (`packed`, `minflux.quant.Packed`).

The header checks follow the reference reader, safetensors' `Metadata::validate` (huggingface/safetensors,
safetensors/src/tensor.rs), and go further where it is lenient (repeated keys, nesting).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from minflux import configs, gguf_file, keymaps, quant
from minflux.errors import CheckpointError
from minflux.files import atomic_write, remove_stale_temp_files, temp_name  # noqa: F401 (re-exported)

log = logging.getLogger("minflux")

FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", *FP8_DTYPES}
_ST_TO_NP = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": "bfloat16",  # ml_dtypes' names: imported on first use (a second of start-up, see `_ml`)
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
MAX_HEADER = 100_000_000  # bytes, as safetensors' MAX_HEADER_SIZE
DIGEST_PREFIX = "sha256:"  # `__metadata__` entry "sha256:KEY" = hex SHA-256 of KEY's stored bytes


def _ml(name: str):
    """An ml_dtypes type by name. ml_dtypes is imported here, not with the module: importing it takes about a
    second, which `minflux --help` and every argument error would otherwise wait for."""
    import ml_dtypes

    return getattr(ml_dtypes, name)


def np_dtype(name: str) -> np.dtype:
    """numpy dtype for a safetensors dtype name ("BF16" -> ml_dtypes.bfloat16, "F8_E4M3" -> float8_e4m3fn)."""
    t = _ST_TO_NP[name]
    return np.dtype(_ml(t) if isinstance(t, str) else t)


def st_dtype(dtype) -> str:
    """safetensors dtype name for a numpy dtype."""
    dtype = np.dtype(dtype)
    for k in _ST_TO_NP:
        if np_dtype(k) == dtype:
            return k
    raise ValueError(f"dtype {dtype.name} cannot be written to safetensors")


# ---------------------------------------------------------------------------------------------
# Reading: the header, checked at least as strictly as safetensors does
# ---------------------------------------------------------------------------------------------

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _no_repeats(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise CheckpointError(
            f"repeated key {next(k for k, n in Counter(keys).items() if n > 1)!r}"
        )
    return dict(pairs)


def _uint(x) -> bool:
    return type(x) is int and 0 <= x < 1 << 64  # not bool, not float: JSON integers only, as usize


def _check_entry(key: str, info) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, start, stop) of one header entry, or a ValueError saying what is wrong."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError("an entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_TO_NP:
        raise ValueError(f"dtype {dtype!r} is none of {sorted(_ST_TO_NP)}")
    if not isinstance(shape, list) or not all(_uint(d) for d in shape):
        raise ValueError(f"shape {shape!r} is no list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_uint(o) for o in offsets):
        raise ValueError(f"data_offsets {offsets!r} is no pair of non-negative integers")
    return dtype, tuple(shape), offsets[0], offsets[1]


def parse_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and validate a safetensors header: ({key: {"dtype", "shape", "start", "nbytes"}}, metadata).

    "start" is the absolute file offset of a tensor's data. Raises CheckpointError naming the file (and the key)
    for: no header, a header length past the file or over 100 MB, bytes that are not UTF-8 JSON, nesting deeper
    than a header has, repeated keys, entries without an integer shape and offset pair, unknown dtypes,
    offsets that do not tile the data area from 0 to its end without gaps or overlaps, sizes that disagree with
    shape x dtype, and metadata that is not string -> string.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if (
                head.startswith((b"PK\x03\x04", b"\x80")) and n > size - 8
            ):  # zip (torch.save) or a bare pickle
                raise CheckpointError(
                    f"{path}: a PyTorch pickle (.pt / .bin / .ckpt), not safetensors (pickles can "
                    f"run code: minflux never loads them; save it as safetensors first)"
                )
            if n > min(size - 8, MAX_HEADER):
                raise CheckpointError(
                    f"{path}: corrupt header (header length {n}, file size {size})"
                )
            raw = f.read(n)
    except OSError as e:  # a directory, no permission, ...
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    # A header is at most 3 deep ({key: {field: [int]}}); count brackets outside strings before parsing,
    # so a hostile nesting never reaches the recursive JSON parser.
    skeleton = np.frombuffer(_STRING.sub(b'""', raw), np.uint8)
    depth = np.cumsum((skeleton == ord("{")) | (skeleton == ord("[")), dtype=np.int64) - np.cumsum(
        (skeleton == ord("}")) | (skeleton == ord("]")), dtype=np.int64
    )
    if depth.size and depth.max() > 3:
        raise CheckpointError(
            f"{path}: corrupt header (JSON nested {int(depth.max())} deep; a header has 3 levels)"
        )
    try:
        header = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_repeats,
            parse_constant=lambda c: _no_constant(c),
        )
    except CheckpointError as e:
        raise CheckpointError(f"{path}: corrupt header ({e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: corrupt header (a JSON {type(header).__name__}, not an object)"
        )
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: corrupt header (__metadata__ must map strings to strings)")
    entries, spans = {}, []
    for key, info in header.items():
        try:
            key.encode(
                "utf-8"
            )  # a lone surrogate escape (\ud800) is valid to Python's json, not to serde
            dtype, shape, a, b = _check_entry(key, info)
        except (ValueError, UnicodeEncodeError) as e:
            raise CheckpointError(f"{path}: corrupt header entry for {key!r}: {e}") from None
        nbytes = int(np.prod(shape, dtype=object)) * np_dtype(dtype).itemsize
        if b - a != nbytes:
            raise CheckpointError(
                f"{path}: corrupt header: {key!r} is {dtype} {shape} ({nbytes} bytes) "
                f"but spans data offsets [{a}, {b})"
            )
        entries[key] = {"dtype": dtype, "shape": shape, "start": 8 + n + a, "nbytes": nbytes}
        spans.append((a, b, key))
    end, prev = (
        0,
        None,
    )  # the tensors must tile the data area: sorted by offset, each starts where the last ended
    for a, b, key in sorted(spans):
        if a != end:
            what = (
                f"overlaps {prev[2]!r} at [{prev[0]}, {prev[1]})"
                if a < end
                else f"leaves {a - end} bytes unused"
            )
            raise CheckpointError(
                f"{path}: corrupt header: {key!r} at data offsets [{a}, {b}) {what}"
            )
        end, prev = b, (a, b, key)
    if 8 + n + end != size:
        last = max(spans)[2] if spans else None
        what = "truncated" if 8 + n + end > size else "corrupt: bytes after the last tensor"
        raise CheckpointError(
            f"{path}: {what}: the header needs {8 + n + end} bytes (up to the end of "
            f"{last!r}), the file has {size}"
        )
    return entries, meta


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def read_header(path) -> dict[str, dict]:
    """The validated tensor entries of a safetensors file (see `parse_header`)."""
    return parse_header(Path(path))[0]


# ---------------------------------------------------------------------------------------------
# Reading: files, shards and indexes, components, fp8 scales
# ---------------------------------------------------------------------------------------------

SCALES = (
    ".scale_weight",
    ".weight_scale",
)  # fp8 weight scales: ComfyUI legacy; ComfyUI / ModelOpt / vLLM
# ModelOpt NVFP4's global scale, beside `.weight_scale` (its block scales)
NVFP4_SCALE = ".weight_scale_2"
SKIPPED_AUX = (
    ".scale_input",
    ".input_scale",
    ".comfy_quant",
)  # activation scales, per-layer format tags
MARKERS = ("scaled_fp8",)  # ComfyUI's legacy marker tensor (its dtype names the fp8 format)


def _shards(path: Path) -> tuple[list[Path], dict[str, str] | None, Path | None, list[str]]:
    """(files to read, index weight map or None, index file, notices) for a file, directory or index json."""
    index = path if path.is_file() and path.name.endswith(".index.json") else None
    if path.is_dir():
        indexes = sorted(p for p in path.glob("*.safetensors.index.json") if p.is_file())
        if len(indexes) > 1:
            raise CheckpointError(
                f"{path}: several shard indexes ({', '.join(p.name for p in indexes)}); "
                f"pass the one to read"
            )
        index = indexes[0] if indexes else None
    elif index is None:
        return [path], None, None, []
    directory = index.parent if index is not None else path
    found = sorted(directory.glob("*.safetensors"))
    if index is None:
        if not found:
            raise CheckpointError(f"{path}: directory holds no *.safetensors files")
        for p in found:
            if not p.is_file():
                raise CheckpointError(
                    f"{p}: not a file (a shard directory holds *.safetensors files)"
                )
        return found, None, None, []
    try:
        weight_map = json.loads(index.read_text("utf-8"), object_pairs_hook=_no_repeats)[
            "weight_map"
        ]
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise ValueError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError, RecursionError, CheckpointError) as e:
        raise CheckpointError(f"{index}: not a shard index ({type(e).__name__}: {e})") from None
    named = sorted(set(weight_map.values()))
    for name in named:
        if Path(name).name != name:
            raise CheckpointError(f"{index}: names shard {name!r} outside its directory")
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: missing (named by {index.name})")
    ignored = [p.name for p in found if p.name not in set(named)]
    notices = (
        [
            f"{index}: ignored {len(ignored)} file(s) the index does not name: {', '.join(ignored[:5])}"
            f"{' ...' if len(ignored) > 5 else ''}"
        ]
        if ignored
        else []
    )
    return [directory / n for n in named], weight_map, index, notices


class Checkpoint:
    """Lazy view of one safetensors file, a directory of shards or a shard index, as logical tensors.

    `component` picks what is read: None reads every key (a `model.diffusion_model.` prefix on all of them is
    stripped); "transformer" or "ae" reads that component of a bundle, its prefix stripped, other keys
    ignored (counted in one notice); "auto" reads the only component a file holds. fp8 weights with a stored
    scale read as F32, weight = fp8 * scale. `meta` maps each logical key to (dtype, shape); `files` to its file.
    Raises CheckpointError naming the file (and the key) for anything `parse_header` rejects, a missing path,
    a shard the index names that is missing, a key the index places in a shard that lacks it, a key in two
    shards, a component the file does not hold, and a scale whose shape is neither per tensor nor per row.
    Notices (skipped tensors) are logged as warnings unless `quiet`; `notices` keeps them either way.
    """

    def __init__(self, path: str | os.PathLike, component: str | None = None, quiet: bool = False):
        self.path = Path(path)
        self._handles: dict[Path, object] = {}
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        files, weight_map, index, self.notices = _shards(self.path)
        stored: dict[str, tuple[Path, dict]] = {}  # raw key -> (file, header entry)
        self.digests: dict[str, str] = {}  # raw key -> hex digest recorded by the writer
        extra = 0
        for file in files:
            gguf = gguf_file.is_gguf(file) or file.suffix == ".gguf"
            entries, meta = gguf_file.parse(file) if gguf else parse_header(file)
            for key, info in entries.items():
                if weight_map is not None and weight_map.get(key) != file.name:
                    extra += 1  # the index places it elsewhere (or nowhere): it decides
                    continue
                if key in stored:
                    raise CheckpointError(f"{file}: key {key!r} also in {stored[key][0]}")
                stored[key] = (file, info)
                if DIGEST_PREFIX + key in meta:
                    self.digests[key] = meta[DIGEST_PREFIX + key]
        if weight_map is not None:
            lost = [k for k in weight_map if k not in stored]
            if lost:
                raise CheckpointError(
                    f"{index.parent / weight_map[lost[0]]}: has no tensor {lost[0]!r}, which "
                    f"{index.name} places there ({len(lost)} such keys)"
                )
            if extra:
                self.notices.append(
                    f"{index}: ignored {extra} tensor(s) in shards that the index places elsewhere"
                )
        self.stored = stored
        self._select(component)
        # quiet: a header check before the real read (which says them), so no notice precedes a refusal or repeats
        for notice in [] if quiet else self.notices:
            log.warning("notice: %s", notice)

    def _select(self, component: str | None) -> None:
        keys = list(self.stored)
        if component == "auto":
            found = [c for c in keymaps.COMPONENTS if keymaps.find_component(keys, c) is not None]
            if len(found) > 1:
                where = ", ".join(f"{c} under {keymaps.find_component(keys, c)!r}" for c in found)
                raise CheckpointError(
                    f"{self.path}: holds several components ({where}); pick one to extract"
                )
            component = found[0] if found else None
        if component is None:
            self.prefix = (
                keymaps.BFL_PREFIX
                if keys and all(k.startswith(keymaps.BFL_PREFIX) for k in keys)
                else ""
            )
            chosen = keys
        else:
            prefix = keymaps.find_component(keys, component)
            if prefix is None:
                what = "autoencoder" if component == "ae" else component
                raise CheckpointError(
                    f"{self.path}: unknown layout: no {what} "
                    f"(no {' / '.join(keymaps.COMPONENTS[component][1])} keys under any of the "
                    f"prefixes {keymaps.COMPONENTS[component][0]} or none); "
                    f"first keys: {sorted(keys)[:5]}"
                )
            self.prefix, chosen = prefix, keymaps.component_keys(keys, prefix)
            if len(chosen) < len(keys):
                others = Counter(k.split(".", 1)[0] + "." for k in keys if k not in set(chosen))
                what = "autoencoder" if component == "ae" else component
                self.notices.append(
                    f"{self.path}: read the {what} under {prefix!r}; ignored "
                    f"{len(keys) - len(chosen)} other tensor(s) ("
                    + ", ".join(f"{p}: {n}" for p, n in others.most_common(5))
                    + ")"
                )
        self.component = component
        # logical key -> raw key; quantized weights with their scales (`self.quant`), auxiliary tensors dropped
        names = {k[len(self.prefix) :]: k for k in chosen}
        scales = (*SCALES, NVFP4_SCALE)
        self.sources, self.quant, aux = {}, {}, 0
        for name, raw in names.items():
            if name.endswith(scales) or name.endswith(SKIPPED_AUX) or name in MARKERS:
                if name.endswith(scales) and name.rsplit(".", 1)[0] + ".weight" not in names:
                    raise CheckpointError(
                        f"{self.stored[raw][0]}: scale {raw!r} has no weight beside it"
                    )
                aux += not name.endswith(scales)
                continue
            self.sources[name] = raw
            found = self._quantized(name, names)
            if found is not None:
                self.quant[name] = found
        if aux:
            self.notices.append(
                f"{self.path}: skipped {aux} activation scale(s) and format tag(s) "
                f"(scale_input, input_scale, comfy_quant, scaled_fp8): not needed to compute"
            )
        self.files = {k: self.stored[r][0] for k, r in self.sources.items()}
        self.meta = {
            k: ("F32", self._logical_shape(k)) if k in self.quant else self._stored_meta(r)
            for k, r in self.sources.items()
        }
        self.raw_layout = keymaps.detect_layout(self.meta)
        self.layout = self.raw_layout
        if self.prefix == keymaps.BFL_PREFIX and self.layout == "bfl":
            self.raw_layout = "bfl-prefixed"
        elif self.prefix and self.layout:
            self.raw_layout = f"{self.layout} under {self.prefix!r}"

    def _stored_meta(self, raw: str) -> tuple[str, tuple[int, ...]]:
        return self.stored[raw][1]["dtype"], self.stored[raw][1]["shape"]

    def _logical_shape(self, key: str) -> tuple[int, ...]:
        fmt, arrays = self.quant[key]
        info = self.stored[arrays["weight"]][1]
        if fmt == quant.NVFP4:  # two E2M1 values per byte
            return (info["shape"][0], 2 * info["shape"][1])
        return info.get("logical", info["shape"])

    def _quantized(self, name: str, names: dict[str, str]) -> tuple[str, dict[str, str]] | None:
        """(format, {array name: raw key}) for a quantized tensor, None for a plain one; checks the layout."""
        raw = names[name]
        info = self.stored[raw][1]
        if "ggml" in info:
            return info["ggml"], {"weight": raw}
        base = name.removesuffix("weight")
        if not name.endswith(".weight"):
            return None
        if base + NVFP4_SCALE[1:] in names:
            arrays = {"weight": raw, "weight_scale": names.get(base + "weight_scale")}
            arrays["weight_scale_2"] = names[base + NVFP4_SCALE[1:]]
            self._check_nvfp4(arrays)
            return quant.NVFP4, arrays
        scale = next((names[base + s[1:]] for s in SCALES if base + s[1:] in names), None)
        if scale is None:
            return None
        self._check_scale(raw, scale)
        return quant.FP8, {"weight": raw, "weight_scale": scale}

    def _check_nvfp4(self, arrays: dict[str, str | None]) -> None:
        raw = arrays["weight"]
        file, w = self.stored[raw]
        if arrays["weight_scale"] is None:
            raise CheckpointError(
                f"{file}: {raw!r} has {arrays['weight_scale_2']!r} but no weight_scale beside it "
                f"(NVFP4 needs both)"
            )
        s, s2 = (self.stored[arrays[n]][1] for n in ("weight_scale", "weight_scale_2"))
        rows, cols = w["shape"] if len(w["shape"]) == 2 else (0, 0)
        want = (rows, 2 * cols // quant.NVFP4_BLOCK)
        if w["dtype"] != "U8" or len(w["shape"]) != 2 or (2 * cols) % quant.NVFP4_BLOCK:
            raise CheckpointError(
                f"{file}: {raw!r} is {w['dtype']} {w['shape']}; an NVFP4 weight is U8 (rows, in / 2) "
                f"with in a multiple of {quant.NVFP4_BLOCK}"
            )
        if s["dtype"] != "F8_E4M3" or tuple(s["shape"]) != want:
            raise CheckpointError(
                f"{file}: scale {arrays['weight_scale']!r} is {s['dtype']} {s['shape']} for NVFP4 weight "
                f"{raw!r} {w['shape']}; expected F8_E4M3 {want} (one per {quant.NVFP4_BLOCK} values)"
            )
        n = int(np.prod(s2["shape"], dtype=np.int64))
        if s2["dtype"] not in FLOAT_DTYPES or n != 1:
            raise CheckpointError(
                f"{file}: scale {arrays['weight_scale_2']!r} is {s2['dtype']} {s2['shape']}; "
                f"expected one float (NVFP4's global scale)"
            )

    def _check_scale(self, raw: str, scale: str) -> None:
        file, w = self.stored[raw]
        s = self.stored[scale][1]
        rows = w["shape"][0] if w["shape"] else 1
        if w["dtype"] not in FP8_DTYPES or s["dtype"] not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{file}: {raw!r} is {w['dtype']} with scale {scale!r} {s['dtype']}; "
                f"expected an fp8 weight and a float scale"
            )
        n = int(np.prod(s["shape"], dtype=np.int64))
        if not (n == 1 or (n == rows and s["shape"] in ((rows,), (rows, 1)))):
            raise CheckpointError(
                f"{file}: scale {scale!r} has shape {s['shape']} for weight {w['shape']}; "
                f"read are per-tensor (one value) and per-row ({rows} or ({rows}, 1)) scales"
            )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s for k, (_, s) in self.meta.items()}

    def dtypes(self) -> str:
        """What the file stores, for reports: e.g. "F8_E4M3 x60 (scaled by weight_scale), BF16 x23", "NVFP4 x40",
        "GGUF Q4_K x60"."""

        def what(key: str, raw: str) -> tuple[str, str]:  # (what is stored, a note)
            fmt, arrays = self.quant.get(key, (None, {}))
            if fmt == quant.FP8:
                scale = arrays["weight_scale"].rsplit(".", 1)[1]
                return self.stored[raw][1]["dtype"], f" (scaled by {scale})"
            if fmt == quant.NVFP4:
                return "NVFP4", ""
            return (f"GGUF {fmt}" if fmt else self.stored[raw][1]["dtype"]), ""

        counts = Counter(what(k, r) for k, r in self.sources.items())
        return ", ".join(f"{d} x{n}{note}" for (d, note), n in counts.most_common())

    def _raw_rows(self, raw: str, start: int, stop: int) -> np.ndarray:
        file, info = self.stored[raw]
        shape = info["shape"]
        arr = np.empty((stop - start, *shape[1:]) if shape else (), np_dtype(info["dtype"]))
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * arr.itemsize
        buf = memoryview(arr.reshape(-1).view(np.uint8))
        if file not in self._handles:
            self._handles[file] = open(file, "rb")  # kept open for the next rows
        f, done = self._handles[file], 0
        f.seek(info["start"] + start * row_bytes)
        while done < len(buf) and (n := f.readinto(buf[done:])):
            done += n
        if done < len(buf):
            raise CheckpointError(
                f"{file}: truncated while reading {raw!r} (got {done} of {len(buf)} bytes)"
            )
        return arr

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor (the whole tensor for 0-d ones), read without the rest.

        Plain reads straight into a fresh array, not a memory map: mapped pages stay resident (and count
        in RSS) until the map closes, so converting a 64 GB file through mmap looks like a 64 GB process.
        A quantized tensor (scaled fp8, NVFP4, GGUF) comes back dequantized to float32 (`minflux.quant.dequantize`).
        """
        shape = self.meta[key][1]
        if not 0 <= start <= stop <= (shape[0] if shape else 1):
            raise ValueError(f"rows [{start}, {stop}) of {key!r} {shape}")
        if key in self.quant:
            return quant.dequantize(self.packed(key, start, stop))
        return self._raw_rows(self.sources[key], start, stop)

    def packed(self, key: str, start: int, stop: int) -> quant.Packed:
        """Rows [start, stop) of a quantized tensor (a key of `self.quant`) as stored, not dequantized."""
        fmt, arrays = self.quant[key]
        logical = self.meta[key][1]
        out = {}
        for name, raw in arrays.items():
            stored = self.stored[raw][1]["shape"]
            rows = (
                (start, stop)
                if quant.per_row(name, stored, logical[0])
                else (0, stored[0] if stored else 1)
            )
            out[name] = self._raw_rows(raw, *rows)
        return quant.Packed(fmt, (stop - start, *logical[1:]), out)

    def get(self, key: str) -> np.ndarray:
        shape = self.meta[key][1]
        return self.rows(key, 0, shape[0] if shape else 1)

    def verify(self, key: str) -> None:
        """Check the digests the writer recorded for a tensor (and its scale); CheckpointError naming the tensor
        that fails or has none. Reads the stored bytes in 64 MB pieces."""
        for raw in dict.fromkeys((self.sources[key], *self.quant.get(key, (None, {}))[1].values())):
            file, info = self.stored[raw]
            if raw not in self.digests:
                raise CheckpointError(
                    f"{file}: no digest recorded for {raw!r} (verify needs a file written by "
                    f"minflux convert or save_model)"
                )
            h, f = hashlib.sha256(), open(file, "rb")
            with f:
                f.seek(info["start"])
                left = info["nbytes"]
                while left:
                    piece = f.read(min(left, 1 << 26))
                    if not piece:
                        raise CheckpointError(f"{file}: truncated while reading {raw!r}")
                    h.update(piece)
                    left -= len(piece)
            if h.hexdigest() != self.digests[raw]:
                raise CheckpointError(
                    f"{file}: tensor {raw!r} does not match its recorded digest "
                    f"(the file changed after it was written)"
                )

    def close(self) -> None:
        for f in getattr(
            self, "_handles", {}
        ).values():  # also from __del__ after a failed __init__
            f.close()
        self._handles = {}

    __del__ = (
        close  # the open files go with the Checkpoint (readers that stream it never call close)
    )

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# NaN and Inf, read off the raw bits: with the sign bit cleared, a value is NaN or Inf exactly when its bits
# are >= the smallest non-finite pattern (exponent all ones, mantissa zero: Inf). float8_e4m3fn has no Inf and
# one NaN per sign, S.1111.111 (0x7F). dtype name -> (unsigned view, sign-clearing mask, smallest non-finite).
_NONFINITE_BITS = {
    "float64": (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    "float32": (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    "float16": (np.uint16, 0x7FFF, 0x7C00),
    "bfloat16": (np.uint16, 0x7FFF, 0x7F80),
    "float8_e4m3fn": (np.uint8, 0x7F, 0x7F),
    "float8_e5m2": (np.uint8, 0x7F, 0x7C),
}
_FINITE_CHUNK = 1 << 20  # elements per piece: the masked copy of a piece stays in the CPU's cache
_FINITE_PARALLEL = 1 << 24  # tensors this large are checked by every core (numpy releases the GIL)


def _nonfinite(bits: np.ndarray, mask: int, first: int) -> bool:
    """Whether any element of the flat unsigned view `bits` is NaN or Inf, a cache-sized piece at a time."""
    buf = np.empty(min(bits.size, _FINITE_CHUNK), bits.dtype)
    for start in range(0, bits.size, _FINITE_CHUNK):
        piece = bits[start : start + _FINITE_CHUNK]
        np.bitwise_and(piece, bits.dtype.type(mask), out=buf[: piece.size])
        if buf[: piece.size].max() >= first:
            return True
    return False


def check_finite(arr: np.ndarray, key: str, where) -> None:
    """Raise CheckpointError "WHERE: tensor KEY holds NaN or Inf values" if a float tensor holds any.

    Tests the stored bits (exact, and about 6x cheaper than converting bf16 / fp16 / fp8 to float32 to call
    `np.isfinite`); a large tensor is split across the cores. Non-float tensors pass; float formats not in
    `_NONFINITE_BITS` are converted to float32 and tested with `np.isfinite`.
    """
    spec = _NONFINITE_BITS.get(arr.dtype.name)
    if spec is None:
        ml = arr.dtype.kind == "V" and "float" in arr.dtype.name  # another ml_dtypes float format
        if (arr.dtype.kind == "f" or ml) and not np.isfinite(arr.astype(np.float32)).all():
            raise CheckpointError(f"{where}: tensor {key!r} holds NaN or Inf values")
        return
    view, mask, first = spec
    bits = np.ascontiguousarray(arr).reshape(-1).view(view)
    if bits.size == 0:
        return
    workers = min(os.cpu_count() or 1, bits.size // _FINITE_PARALLEL + 1)
    if workers > 1:
        pieces = np.array_split(bits, workers)
        with ThreadPoolExecutor(workers) as pool:
            bad = any(pool.map(lambda p: _nonfinite(p, mask, first), pieces))
    else:
        bad = _nonfinite(bits, mask, first)
    if bad:
        raise CheckpointError(f"{where}: tensor {key!r} holds NaN or Inf values")


def refuse_lora(path) -> None:
    """Raise CheckpointError when `path` is a LoRA file (low-rank A/B pairs) where a model checkpoint is wanted:
    said in those words, before any key list."""
    from minflux import lora  # (lora imports this module)

    if lora.is_lora(path):
        raise CheckpointError(
            f"{path}: a LoRA file (low-rank A/B pairs), not a model checkpoint; pass it with --lora "
            "(train: --init-lora)"
        )


def check_holds(ckpt: Checkpoint, cfg, name: str = "the model") -> None:
    """Raise CheckpointError "PATH holds a FLUX.2 transformer of width 64; NAME needs a FLUX.1 transformer of width
    3072" when the file's component is of another family or width than `cfg`: said before any key list. Files whose
    family cannot be told from the keys pass (the key check that follows names what is wrong). A LoRA file is
    refused as one (`refuse_lora`)."""
    refuse_lora(ckpt.path)
    found = keymaps.infer_family(ckpt.meta)
    width = keymaps.infer_hidden_size(ckpt.shapes()) if found in configs.FAMILIES else 0
    want = getattr(cfg, "hidden_size", 0)
    if found is not None and (found != cfg.family or (width and want and width != want)):
        raise CheckpointError(
            f"{ckpt.path} holds {configs.describe(found, width)}; {name} needs "
            f"{configs.describe(cfg.family, want)}"
        )


class BflReader:
    """A checkpoint in any layout, seen as BFL-layout tensors and checked against `expected` shapes up front.

    The model's own component is read from a bundle (the transformer for FLUX configs, the autoencoder for
    autoencoder configs). Raises CheckpointError naming the file for an unknown layout, missing or unexpected
    keys, shape mismatches (expected and found) and non-float dtypes; `read` raises for NaN/Inf values and,
    with `verify`, for a tensor whose bytes do not match the digest its writer recorded. fp8 tensors are read
    as float32 (exact), for the framework to cast to the requested dtype.
    """

    def __init__(self, path, expected: dict[str, tuple[int, ...]], cfg, verify: bool = False):
        family = cfg.family
        refuse_lora(path)
        ckpt = Checkpoint(path, "ae" if family.startswith("ae") else "transformer")
        if ckpt.layout is None:
            raise CheckpointError(
                f"{ckpt.path}: unknown layout (neither BFL nor diffusers key names); "
                f"first keys: {sorted(ckpt.meta)[:5]}"
            )
        check_holds(ckpt, cfg)
        try:
            recipes = keymaps.convert(
                ckpt.shapes(), ckpt.layout, "bfl", family, getattr(cfg, "hidden_size", 0)
            )
        except KeyError as e:
            raise CheckpointError(
                f"{ckpt.path}: unexpected key {ckpt.prefix + e.args[0]!r} for a {family} "
                f"checkpoint in {ckpt.layout} layout"
            ) from None
        missing, unexpected = (
            sorted(set(expected) - set(recipes)),
            sorted(set(recipes) - set(expected)),
        )
        if missing or unexpected:
            raise CheckpointError(
                f"{ckpt.path} ({ckpt.layout} layout): missing keys {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}; unexpected keys {unexpected[:10]}"
                f"{' ...' if len(unexpected) > 10 else ''}"
            )
        bad = [
            f"{k}: expected {expected[k]}, found {r.shape}"
            for k, r in recipes.items()
            if r.shape != expected[k]
        ]
        if bad:
            raise CheckpointError(f"{ckpt.path}: shape mismatch: " + "; ".join(bad[:10]))
        for recipe in recipes.values():
            for src, _, _ in recipe.pieces:
                dtype = ckpt.meta[src][0]
                if dtype not in FLOAT_DTYPES:
                    raise CheckpointError(
                        f"{ckpt.files[src]}: tensor {ckpt.sources[src]!r} has dtype {dtype}, "
                        f"expected a float dtype"
                    )
        self.ckpt, self.recipes, self.verify = ckpt, recipes, verify

    def keys(self) -> list[str]:
        return list(self.recipes)

    def describe(self) -> str:
        """Where the tensors come from, for reports: path, layout, prefix and stored dtypes."""
        return f"{self.ckpt.path} ({self.ckpt.raw_layout} layout; {self.ckpt.dtypes()})"

    def read(self, key: str) -> np.ndarray:
        recipe = self.recipes[key]
        if self.verify:
            for src in dict.fromkeys(k for k, _, _ in recipe.pieces):
                self.ckpt.verify(src)
        arr = keymaps.apply(recipe, self.ckpt.rows)
        if arr.dtype.itemsize == 1:  # fp8: every value is exact in float32 (and in bf16 / fp16)
            arr = arr.astype(np.float32)
        check_finite(arr, key, self.ckpt.path)
        return arr

    def packed(self, key: str) -> quant.Packed | None:
        """A quantized 2-D weight as the file stores it (the rows of its tensors stacked as the recipe says), for
        a model that keeps it quantized; None for a plain tensor, or for one whose pieces cannot be stacked packed
        (mixed formats): `read` gives those dequantized. Raises CheckpointError for NaN / Inf values."""
        recipe = self.recipes[key]
        if len(recipe.shape) != 2 or not all(s in self.ckpt.quant for s, _, _ in recipe.pieces):
            return None
        if self.verify:
            for src in dict.fromkeys(k for k, _, _ in recipe.pieces):
                self.ckpt.verify(src)
        p = quant.concat([self.ckpt.packed(src, a, b) for src, a, b in recipe.pieces])
        if p is None or p.shape != recipe.shape:
            return None
        quant.check_finite(p, key, self.ckpt.path)
        return p

    def packed_weights(self) -> dict[str, quant.Packed]:
        """Every weight the frameworks can keep quantized (`packed`, in a format of `quant.KEPT`), by key. One
        notice line names what is not kept: weights dequantized instead (other GGUF types, pieces that do not
        stack) and the linear weights the file stores unquantized."""
        out, other, plain = {}, Counter(), []
        for key, recipe in self.recipes.items():
            p = self.packed(key)
            if p is not None and p.format in quant.KEPT:
                out[key] = p
            elif any(s in self.ckpt.quant for s, _, _ in recipe.pieces):
                other[p.kind if p is not None else "mixed pieces"] += 1
            elif key.endswith(".weight") and len(recipe.shape) == 2:
                plain.append(key.removesuffix(".weight"))
        if other or plain:
            log.warning(
                "notice: %s: kept %d weight(s) quantized; dequantized on load: %s; stored unquantized: %d "
                "linear weight(s)%s",
                self.ckpt.path,
                len(out),
                ", ".join(f"{k} x{n}" for k, n in other.most_common()) or "none",
                len(plain),
                f" ({', '.join(plain[:6])}{' ...' if len(plain) > 6 else ''})" if plain else "",
            )
        return out

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return ((key, self.read(key)) for key in self.recipes)


def read_bfl(
    path, expected: dict[str, tuple[int, ...]], cfg, verify: bool = False
) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (key, tensor) pairs of a checkpoint in BFL layout; checks as `BflReader`, before the first read."""
    return iter(BflReader(path, expected, cfg, verify))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _header_blob(specs, metadata: dict[str, str]) -> tuple[bytes, int]:
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for key, (dtype, shape) in specs.items():
        n = int(np.prod(shape, dtype=np.int64)) * np_dtype(dtype).itemsize
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob, offset


def write_safetensors(
    path,
    specs: dict[str, tuple[str, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
    progress: bool = False,
    digests: bool = False,
) -> None:
    """Write tensors one at a time, so memory stays near the largest tensor; atomic (temp, fsync, rename).

    `specs` maps key -> (safetensors dtype, shape); `produce(key)` returns that tensor. The temp file is
    `.NAME.tmp-PID` beside `path`; it is removed on any failure, on Ctrl-C and on SIGTERM, and one left by a
    killed process is removed by the next write to `path`. With `digests`, `__metadata__` records the SHA-256
    of each tensor's bytes as "sha256:KEY" (the header is rewritten in place once they are known: same length).
    Raises CheckpointError naming the file for OS errors and for a produced tensor unlike its spec.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    if digests:
        metadata.update(
            {DIGEST_PREFIX + key: "0" * 64 for key in specs}
        )  # placeholders, as long as the digests
    head, total = _header_blob(specs, metadata)
    bar = None
    if progress:
        from tqdm import tqdm

        # disable=None: drawn on a terminal only (a log file gets no carriage-return lines)
        bar = tqdm(
            total=total,
            desc=f"writing {path.name}",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=None,
        )
    try:
        with ThreadPoolExecutor(1) as hasher, atomic_write(path) as f:
            f.write(head)
            for key in specs:
                arr = np.asarray(produce(key))
                # keeps 0-d tensors 0-d
                arr = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
                dtype, shape = specs[key]
                if arr.dtype != np_dtype(dtype) or tuple(arr.shape) != tuple(shape):
                    raise CheckpointError(
                        f"{path}: tensor {key!r} is {arr.dtype} {arr.shape}, "
                        f"declared {dtype} {tuple(shape)}"
                    )
                data = memoryview(arr.reshape(-1).view(np.uint8))
                # hashing and writing both release the GIL: the digest costs no time beside the write
                digest = hasher.submit(hashlib.sha256, data) if digests else None
                f.write(data)
                if digest is not None:
                    metadata[DIGEST_PREFIX + key] = digest.result().hexdigest()
                if bar is not None:
                    bar.update(arr.nbytes)
                # before the next produce(): one tensor in memory at a time, not two
                del arr, data
            if digests:
                final, _ = _header_blob(specs, metadata)
                # same keys, digests as long as their placeholders
                assert len(final) == len(head)
                f.seek(0)
                f.write(final)
    except BaseException:
        if bar is not None:  # erased, so the error line that follows stands alone
            bar.leave = False
        raise
    finally:
        if bar is not None:
            bar.close()


LAYOUTS = ("bfl", "bfl-prefixed", "diffusers")


def save_bfl(path, tensors: dict[str, np.ndarray], cfg, layout: str = "bfl") -> None:
    """Write BFL-layout numpy tensors of a model with config `cfg` as `layout` (one of LAYOUTS), with digests."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    recipes = keymaps.convert(
        shapes,
        "bfl",
        "diffusers" if layout == "diffusers" else "bfl",
        cfg.family,
        getattr(cfg, "hidden_size", 0),
    )
    if layout == "bfl-prefixed":
        recipes = {keymaps.BFL_PREFIX + k: r for k, r in recipes.items()}
    write_recipes(
        path,
        recipes,
        lambda k, a, b: tensors[k][a:b] if tensors[k].ndim else tensors[k],
        {k: st_dtype(v.dtype) for k, v in tensors.items()},
    )


# ---------------------------------------------------------------------------------------------
# fp8 with per-tensor scales, as written by `minflux convert --dtype fp8`
# ---------------------------------------------------------------------------------------------

FP8_MAX = 448.0  # ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max
FP8_SCALE = ".weight_scale"  # written beside each fp8 weight: ComfyUI's quantized format (also ModelOpt, vLLM)


def quantize_fp8(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float8_e4m3fn weight, float32 0-d scale) with weight * scale ~ arr: scale = amax / 448, round to nearest."""
    a = np.array(arr, np.float32)  # a copy, divided in place: one fp32 copy of the tensor at a time
    amax = max(float(a.max()), -float(a.min())) if a.size else 0.0  # |a|.max() without another copy
    scale = np.float32(amax / FP8_MAX if amax > 0 else 1.0)
    np.divide(a, scale, out=a)
    return a.astype(np_dtype("F8_E4M3")), np.array(scale, np.float32)


def _quantized(key: str, shape: tuple[int, ...]) -> bool:
    return (
        key.endswith(".weight") and len(shape) == 2
    )  # the linear layers: where the parameters are


def write_recipes(
    path,
    recipes: dict[str, keymaps.Recipe],
    rows,
    src_dtypes: dict[str, str],
    dtype: str | None = None,
    progress: bool = False,
    metadata: dict[str, str] | None = None,
    prefix: str = "",
    digests: bool = True,
) -> None:
    """Write every recipe's tensor, optionally cast to `dtype` (a safetensors name, floats only), with digests.

    dtype "F8_E4M3" quantizes the 2-D `*.weight` tensors (the linear layers) with a per-tensor scale stored as
    `*.weight_scale` (F32, 0-d) and lists them in `__metadata__["_quantization_metadata"]` (ComfyUI's
    convention; layer names without the component `prefix`); the other tensors keep their dtype.
    """
    fp8 = dtype == "F8_E4M3"

    def out_dtype(key, recipe):
        src = src_dtypes[recipe.pieces[0][0]]
        if not dtype or src not in FLOAT_DTYPES:
            return src
        return ("F8_E4M3" if _quantized(key, recipe.shape) else src) if fp8 else dtype

    specs, scales = {}, {}
    for k, r in recipes.items():
        specs[k] = (out_dtype(k, r), r.shape)
        if fp8 and specs[k][0] == "F8_E4M3":
            specs[k.removesuffix(".weight") + FP8_SCALE] = ("F32", ())
            scales[k.removesuffix(".weight") + FP8_SCALE] = None
    metadata = dict(metadata or {})
    if scales:
        layers = {
            k.removeprefix(prefix).removesuffix(FP8_SCALE): {"format": "float8_e4m3fn"}
            for k in scales
        }
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})

    def produce(key):
        if key in scales:  # written right after its weight, which computed it
            return scales[key]
        arr = keymaps.apply(recipes[key], rows)
        if fp8 and specs[key][0] == "F8_E4M3" and key.removesuffix(".weight") + FP8_SCALE in scales:
            if arr.dtype == np_dtype("F8_E4M3"):  # already fp8 without a scale: kept, scale 1
                arr, scale = arr, np.array(1, np.float32)
            else:
                check_finite(arr, key, path)
                arr, scale = quantize_fp8(arr)
            scales[key.removesuffix(".weight") + FP8_SCALE] = scale
            return arr
        return arr.astype(
            np_dtype(specs[key][0]), copy=False
        )  # no second copy when no cast is needed

    write_safetensors(path, specs, produce, metadata=metadata, progress=progress, digests=digests)
