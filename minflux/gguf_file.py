"""GGUF files (ggml's format, as ComfyUI-GGUF / city96 write FLUX transformers), read through the gguf package.

`parse` turns a GGUF file's header into the entries `minflux.checkpoint` reads safetensors headers into, so a
GGUF file goes through the one reading path (`Checkpoint`: components, layouts, recipes, `BflReader`, convert,
parity): plain F32 / F16 / BF16 / F64 tensors read like safetensors ones; quantized ones are `U8` rows of ggml
blocks with their ggml type, which `Checkpoint` dequantizes with the gguf package (`minflux.quant`) or hands to
the frameworks packed. The header is read with gguf-py's `GGUFReader` (ggml-org/llama.cpp, gguf-py/gguf/
gguf_reader.py); the tensor data is read later with plain file reads (no memory map left open). Key names are
the file's: BFL names for ComfyUI-GGUF's FLUX files, bare or behind a component prefix.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from minflux import quant
from minflux.errors import CheckpointError

MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    """Whether a file starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


class _Reader(gguf.GGUFReader):
    """gguf's reader, with each tensor checked (type, row blocks, extent) before it builds them, so the error
    names the tensor."""

    def __init__(self, path: Path):
        self.where = path
        super().__init__(path, "r")

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        for field in fields:
            # parts as `_get_tensor_info_field` lays them out
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise CheckpointError(
                    f"{self.where}: tensor {name!r} has unknown GGML type {int(raw_dtype[0])}"
                ) from None
            if qtype.name not in quant.GGUF_PLAIN and not quant.gguf_dequantizable(qtype.name):
                raise CheckpointError(
                    f"{self.where}: tensor {name!r} has GGML type {qtype.name}, which the gguf package "
                    f"cannot dequantize"
                )
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            if len(dims) == 0 or int(dims[0]) % block:
                row = int(dims[0]) if len(dims) else 0
                raise CheckpointError(
                    f"{self.where}: tensor {name!r} ({qtype.name}) has rows of {row} values, not a whole "
                    f"number of {qtype.name} blocks of {block}"
                )
            end = start_offs + int(offset[0]) + int(np.prod(dims, dtype=object)) // block * size
            if end > len(self.data):
                raise CheckpointError(
                    f"{self.where}: truncated: tensor {name!r} ends at byte {end}, the file has "
                    f"{len(self.data)}"
                )
        super()._build_tensors(start_offs, fields)


def parse(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Entries of a GGUF file as `checkpoint.parse_header` gives them: ({key: {"dtype", "shape", "start",
    "nbytes"} (+ "ggml", "logical" for quantized tensors)}, string metadata).

    A quantized tensor's entry is dtype "U8" of shape (rows, bytes per row), "ggml" its type name and "logical"
    its numpy shape. Raises CheckpointError naming the file (and the tensor) for: a bad magic, version or
    header (what gguf's reader rejects), an unknown ggml type or one gguf cannot dequantize, rows that are not
    whole blocks, a tensor past the end of the file (truncated), and tensors whose data overlap.
    """
    try:
        reader = _Reader(path)
    except CheckpointError:
        raise
    except (ValueError, KeyError, IndexError, OverflowError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path}: corrupt or truncated GGUF header ({type(e).__name__}: {e})"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    entries, spans = {}, []
    for t in reader.tensors:
        name, qtype = t.name, t.tensor_type.name
        shape = tuple(
            int(d) for d in reversed(t.shape.tolist())
        )  # ggml lists the fastest axis first
        if qtype in quant.GGUF_PLAIN:
            entry = {"dtype": quant.GGUF_PLAIN[qtype], "shape": shape}
        elif qtype.startswith(
            "I"
        ):  # I8 ... I64: integers, refused as weights by the reader's dtype check
            entry = {"dtype": qtype, "shape": shape}
        else:
            block, size = quant.gguf_sizes(qtype)
            stored = (*shape[:-1], shape[-1] // block * size)
            entry = {"dtype": "U8", "shape": stored, "ggml": qtype, "logical": shape}
        entry.update(start=int(t.data_offset), nbytes=int(t.n_bytes))
        entries[name] = entry
        spans.append((entry["start"], entry["start"] + entry["nbytes"], name))
    for (a0, b0, k0), (a1, _, k1) in zip(sorted(spans), sorted(spans)[1:], strict=False):
        if a1 < b0:
            raise CheckpointError(
                f"{path}: corrupt GGUF: tensor {k1!r} at byte {a1} overlaps {k0!r} [{a0}, {b0})"
            )
    meta = {
        k: str(f.contents())
        for k, f in reader.fields.items()
        if f.types == [gguf.GGUFValueType.STRING] and not k.startswith("GGUF.")
    }
    del reader  # closes the memory map once its arrays are gone
    return entries, meta


def write(path, tensors: dict[str, tuple[str, np.ndarray]], arch: str = "flux") -> None:
    """Write a GGUF file: {name: (ggml type name, array)}, the array float for plain types ("F32", "F16",
    "BF16") or the uint8 blocks gguf's `quantize` returns. For tests and benchmarks (no command writes GGUF):
    written in place by gguf's writer, as ComfyUI-GGUF writes FLUX files (`general.architecture`)."""
    w = gguf.GGUFWriter(path=None, arch=arch)
    for name, (qtype, arr) in tensors.items():
        if qtype == "BF16":
            arr = gguf.quants.quantize(np.asarray(arr, np.float32), quant.GGML.BF16)
        elif qtype in ("F32", "F16"):
            arr = np.asarray(arr, np.float32 if qtype == "F32" else np.float16)
        w.add_tensor(name, arr, raw_dtype=quant.GGML[qtype])
    w.write_header_to_file(path=Path(path))
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
