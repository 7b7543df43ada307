"""Quantized weights as files store them, and the numpy reference that dequantizes them.

A quantized tensor is a `Packed`: its format, its logical (dequantized) shape, and the arrays the file holds
for it, under the file's own names. Formats read (docs/checkpoints.md has the key names and who writes them):

  "fp8"    float8 `weight` (e4m3fn or e5m2) and a float `weight_scale` per tensor or per output row:
           w = f32(weight) * f32(scale). BFL's FP8R is the per-row case ([N] fp32 scales; diffusers'
           `dequantize_fp8r`); ComfyUI's scaled fp8 and ModelOpt's fp8 are per tensor.
  "nvfp4"  NVIDIA ModelOpt NVFP4, as diffusers 0.42's `quantizers/bfl` reads BFL's releases: `weight` uint8
           [N, K/2], two E2M1 codes per byte, the even element in the low nibble; `weight_scale` float8_e4m3fn
           [N, K/16], one per block of 16; `weight_scale_2` fp32, one value (or one per row, after rows of
           tensors with different global scales are concatenated):
           w = E2M1[code] * (f32(weight_scale) * weight_scale_2), as diffusers' `dequantize_nvfp4`.
  GGUF     a ggml type name ("Q8_0", "Q4_K", ...): `weight` holds the raw ggml blocks of each row, uint8
           [N, K / block * bytes per block]; dequantized by the gguf package (gguf-py, `gguf.quants.dequantize`).

The frameworks' quantized linear layers (`minflux_torch/quant.py`, `minflux_jax/quant.py`) compute the same
numbers from the same arrays inside the forward; this module is what they are checked against.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import gguf
import numpy as np

from minflux.errors import CheckpointError

FP8 = "fp8"
NVFP4 = "nvfp4"
NVFP4_BLOCK = 16  # values per E4M3 block scale
# E2M1 values by their 4-bit code: bit 3 the sign, bits 2-0 the magnitude (as diffusers' E2M1_LUT)
E2M1 = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    np.float32,
)
GGML = gguf.GGMLQuantizationType
# ggml types stored as plain floats: read like safetensors tensors, never "quantized"
GGUF_PLAIN = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64"}
# Byte offsets of the fp16 fields of one block (d, and dmin / m where the type has one), per ggml type whose
# blocks the frameworks dequantize inside the forward (ggml-common.h, block_q*). Every weight of such a block
# is (fp16 field) x (small integer) (+ fp16 field), exact in fp32: it is finite exactly when these are.
GGUF_FP16_FIELDS = {
    "Q8_0": (0,),
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
# what the frameworks' QuantLinear layers decode inside the forward (minflux_torch/quant.py, minflux_jax/quant.py)
KEPT = (FP8, NVFP4, *GGUF_FP16_FIELDS)


def gguf_sizes(qtype: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type name."""
    return gguf.GGML_QUANT_SIZES[GGML[qtype]]


@functools.cache
def gguf_dequantizable(qtype: str) -> bool:
    """Whether the gguf package has a numpy dequantizer for a ggml type name (tried on one zero block)."""
    if qtype in GGUF_PLAIN:
        return True
    try:
        gguf.quants.dequantize(np.zeros((1, gguf_sizes(qtype)[1]), np.uint8), GGML[qtype])
    except NotImplementedError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Packed:
    """A quantized tensor: `format`, logical `shape` (rows first) and the stored `arrays` by the file's names.

    An array is per row when its first axis has the tensor's rows (the weight always is); others (a per-tensor
    scale) hold for every row.
    """

    format: str
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray]

    def per_row(self, name: str) -> bool:
        return per_row(name, self.arrays[name].shape, self.shape[0])

    def rows(self, start: int, stop: int) -> Packed:
        """Rows [start, stop) (the per-tensor arrays whole)."""
        arrays = {n: a[start:stop] if self.per_row(n) else a for n, a in self.arrays.items()}
        return Packed(self.format, (stop - start, *self.shape[1:]), arrays)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def kind(self) -> str:
        """What reports call it: "fp8 (per row)", "nvfp4", "Q4_K"."""
        if self.format == FP8:
            return f"{FP8} ({'per row' if self.per_row('weight_scale') else 'per tensor'})"
        return self.format


def per_row(name: str, shape: tuple[int, ...], rows: int) -> bool:
    """Whether a stored array of `shape` holds one entry per row of a tensor with `rows` rows."""
    size = math.prod(shape)
    return name == "weight" or (len(shape) >= 1 and shape[0] == rows and (size > 1 or rows == 1))


def _as_row_scale(p: Packed, name: str) -> np.ndarray:
    """A scale as one float32 value per row (exact: every stored scale dtype widens to float32)."""
    arr = p.arrays[name].astype(np.float32)
    return arr.reshape(p.shape[0]) if p.per_row(name) else np.full(p.shape[0], arr.reshape(()))


def concat(parts: list[Packed]) -> Packed | None:
    """The rows of `parts` stacked (as a fused qkv is built from diffusers' q, k, v); None when they cannot be
    (different formats or widths). Scales that differ between parts become per-row scales, which dequantize to
    the same values."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if any(p.format != first.format or p.shape[1:] != first.shape[1:] for p in parts):
        return None
    if any(
        set(p.arrays) != set(first.arrays)
        or p.arrays["weight"].dtype != first.arrays["weight"].dtype
        for p in parts
    ):
        return None
    arrays = {}
    for name in first.arrays:
        per_row = [p.per_row(name) for p in parts]
        if name != "weight" and not any(per_row):
            if all(np.array_equal(p.arrays[name], first.arrays[name]) for p in parts):
                arrays[name] = first.arrays[name]  # one global scale for every part: kept as it is
                continue
        if name == "weight" or (all(per_row) and len({p.arrays[name].dtype for p in parts}) == 1):
            arrays[name] = np.concatenate([p.arrays[name] for p in parts])
        else:
            arrays[name] = np.concatenate([_as_row_scale(p, name) for p in parts])
    rows = sum(p.shape[0] for p in parts)
    return Packed(first.format, (rows, *first.shape[1:]), arrays)


@functools.cache
def _byte_table(dtype: np.dtype) -> np.ndarray:
    """float32 value of each of the 256 codes of a one-byte float dtype (fp8, ml_dtypes' own conversion)."""
    return np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32)


def to_float32(arr: np.ndarray) -> np.ndarray:
    """float32 values of any float array; fp8 through a 256-entry table (the same values as ml_dtypes' cast,
    several times faster)."""
    if arr.dtype.itemsize == 1 and arr.dtype.kind == "V":
        return _byte_table(arr.dtype)[arr.view(np.uint8)]
    return arr.astype(np.float32)


def dequantize(p: Packed) -> np.ndarray:
    """The float32 values of a packed tensor, computed as the reference implementations do (see the module
    docstring): bit for bit diffusers' `dequantize_fp8r` / `dequantize_nvfp4` and gguf's `dequantize`."""
    w = p.arrays["weight"]
    if p.format == FP8:
        s = to_float32(p.arrays["weight_scale"])
        s = s.reshape((-1,) + (1,) * (w.ndim - 1)) if p.per_row("weight_scale") else s.reshape(())
        out = to_float32(w)
        return np.multiply(out, s, out=out)
    if p.format == NVFP4:
        codes = np.stack([w & 0x0F, w >> 4], axis=-1).reshape(w.shape[0], -1)  # low nibble first
        s2 = p.arrays["weight_scale_2"].astype(np.float32)
        s2 = s2.reshape(-1, 1) if p.per_row("weight_scale_2") else s2.reshape(())
        scale = to_float32(p.arrays["weight_scale"]) * s2  # (N, K/16)
        values = E2M1[codes].reshape(w.shape[0], -1, NVFP4_BLOCK)
        return np.multiply(values, scale[..., None], out=values).reshape(w.shape[0], -1)
    return gguf.quants.dequantize(w, GGML[p.format]).reshape(p.shape)


def _has_codes(codes: np.ndarray, which: np.ndarray) -> bool:
    """Whether any byte of `codes` is one of `which`, 1 MB at a time (the temporaries stay in cache)."""
    flat = codes.reshape(-1)
    for i in range(0, flat.size, 1 << 20):
        piece = flat[i : i + (1 << 20)]
        if any((piece == c).any() for c in which):
            return True
    return False


def check_finite(p: Packed, key: str, where) -> None:
    """CheckpointError naming `where` and `key` when a packed tensor would dequantize to NaN or Inf, checked on
    the stored arrays (no dequantized copy) for the formats the frameworks keep packed."""
    bad = False
    for arr in p.arrays.values():
        # floats, bf16 and fp8 (ml_dtypes); not E2M1 codes or ggml blocks (uint8)
        if arr.dtype.itemsize == 1 and arr.dtype.kind == "V":  # fp8: NaN / Inf by code
            bad |= _has_codes(
                arr.view(np.uint8), np.flatnonzero(~np.isfinite(_byte_table(arr.dtype)))
            )
        elif arr.dtype.kind not in "iub":
            bad |= not np.isfinite(to_float32(arr)).all()
    if p.format in GGUF_FP16_FIELDS:
        _, size = gguf_sizes(p.format)
        blocks = p.arrays["weight"].reshape(-1, size)
        for off in GGUF_FP16_FIELDS[p.format]:
            bad |= not np.isfinite(
                np.ascontiguousarray(blocks[:, off : off + 2]).view(np.float16)
            ).all()
    elif p.format not in (FP8, NVFP4):
        bad |= not np.isfinite(dequantize(p)).all()
    if bad:
        raise CheckpointError(f"{where}: tensor {key!r} ({p.kind}) holds NaN or Inf values")


def nbytes(shape: tuple[int, int], fmt: str, row_scales: bool = True) -> int:
    """Bytes a 2-D weight of `shape` takes packed in `fmt` ("fp8", "nvfp4", a ggml type, or "BF16" / "F32")."""
    n, k = shape
    if fmt == FP8:
        return n * k + 4 * (n if row_scales else 1)
    if fmt == NVFP4:
        return n * k // 2 + n * k // NVFP4_BLOCK + 4
    if fmt in ("BF16", "F16"):
        return 2 * n * k
    if fmt == "F32":
        return 4 * n * k
    block, size = gguf_sizes(fmt)
    return n * math.ceil(k / block) * size
