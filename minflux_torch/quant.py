"""Quantized weights kept quantized in PyTorch: a linear layer that stores the file's packed arrays and
dequantizes them at each call.

`load_model(..., keep_quantized=True)` puts a `QuantLinear` wherever the checkpoint stores a linear weight
quantized (`minflux.quant.Packed`): BFL's FP8R and other scaled fp8 (`fp8.dequantize`), ModelOpt NVFP4, and the
GGUF types below. Its buffers are the file's arrays (`weight_q` the packed weight, as in `fp8.FP8Linear`;
`weight_scale`, `weight_scale_2` under the file's names), so the model holds the quantized size; each call
dequantizes the weight to float32 and then to the model dtype, and multiplies, as diffusers' `BFLFP8RLinear` /
`BFLNVFP4Linear` do without fused kernels (diffusers, src/diffusers/quantizers/bfl/utils.py). The GGUF block
decoders follow the gguf package's numpy ones (ggml-org/llama.cpp, gguf-py/gguf/quants.py) operation for
operation, so the values are bitwise gguf's.
Twin: `minflux_jax/quant.py`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minflux import quant
from minflux_torch import fp8

E2M1 = torch.from_numpy(quant.E2M1)


def _tensor(arr: np.ndarray) -> Tensor:
    """numpy -> torch without a copy; bf16 and fp8 (ml_dtypes) travel as their unsigned bits."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.kind == "V":  # ml_dtypes: bfloat16, float8_e4m3fn, float8_e5m2
        name = {
            "bfloat16": "bfloat16",
            "float8_e4m3fn": "float8_e4m3fn",
            "float8_e5m2": "float8_e5m2",
        }
        bits = torch.from_numpy(arr.view({1: np.uint8, 2: np.int16}[arr.itemsize]))
        return bits.view(getattr(torch, name[arr.dtype.name]))
    return torch.from_numpy(arr)


# ---------------------------------------------------------------------------------------------
# ggml blocks -> float32, one decoder per type: (n, bytes per block) uint8 -> (n, values per block)
# ---------------------------------------------------------------------------------------------


def _f16(b: Tensor) -> Tensor:
    """(n, 2k) little-endian bytes -> (n, k) float32 through float16 (exact)."""
    return b.contiguous().view(torch.float16).float()


def _shifts(*s: int) -> Tensor:
    return torch.tensor(s, dtype=torch.uint8)


def _nibbles(qs: Tensor) -> Tensor:
    """(n, m) bytes -> (n, 2m) 4-bit values: every low nibble, then every high one (ggml's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _bits(qh: Tensor) -> Tensor:
    """(n, 4) bytes of a little-endian uint32 -> its (n, 32) bits, bit 0 first."""
    return ((qh[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(qh.shape[0], 32)


def _q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(b: Tensor) -> Tensor:
    return (_f16(b[:, :2]) * _nibbles(b[:, 4:]).float()) + _f16(b[:, 2:4])


def _q5_0(b: Tensor) -> Tensor:
    q = (_nibbles(b[:, 6:]) | (_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.float()


def _q5_1(b: Tensor) -> Tensor:
    q = (_nibbles(b[:, 8:]) | (_bits(b[:, 4:8]) << 4)).float()
    return (_f16(b[:, :2]) * q) + _f16(b[:, 2:4])


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = (qs.reshape(n, -1, 1, 32) >> _shifts(0, 2, 4, 6).reshape(1, 1, 4, 1)) & 3
    return (dl * q.reshape(n, 16, 16).float() - ml).reshape(n, 256)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts(0, 4).reshape(1, 2, 1)).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts(0, 2, 4, 6).reshape(1, 4, 1)).reshape(n, 16)
    sc = (((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = (qs.reshape(n, -1, 1, 32) >> _shifts(0, 2, 4, 6).reshape(1, 1, 4, 1)).reshape(
        n, 16, 16
    ) & 3
    qh = (hmask.reshape(n, -1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1)) & 1
    qh = qh.reshape(n, 16, 16) ^ 1  # the offset is applied where the mask bit is 0
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, 256)


def _scale_min_k4(scales: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K, Q5_K)."""
    n = scales.shape[0]
    d, m, m_d = scales.reshape(n, 3, 4).split(1, dim=1)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1).reshape(n, 8)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1).reshape(n, 8)
    return sc, mn


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, -1, 1)
    q = (b[:, 16:].reshape(n, -1, 1, 32) >> _shifts(0, 4).reshape(1, 1, 2, 1)) & 0x0F
    return (d * q.reshape(n, -1, 32).float() - dm).reshape(n, 256)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, -1, 1)
    ql = (b[:, 48:].reshape(n, -1, 1, 32) >> _shifts(0, 4).reshape(1, 1, 2, 1)) & 0x0F
    qh = (
        b[:, 16:48].reshape(n, -1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1)
    ) & 1
    q = (ql.reshape(n, -1, 32) | (qh.reshape(n, -1, 32) << 4)).float()
    return (d * q - dm).reshape(n, 256)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    ql = ((ql.reshape(n, -1, 1, 64) >> _shifts(0, 4).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, -1, 32)
    qh = ((qh.reshape(n, -1, 1, 32) >> _shifts(0, 2, 4, 6).reshape(1, 1, 4, 1)) & 3).reshape(
        n, -1, 32
    )
    q = (ql | (qh << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, -1).float()).reshape(n, 256)


GGUF = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


# ---------------------------------------------------------------------------------------------
# Dequantize, and the linear layer that does it at each call
# ---------------------------------------------------------------------------------------------


def _scale(s: Tensor, rows: int, name: str) -> Tensor:
    """A stored scale as float32 that broadcasts over a (rows, ...) tensor: (rows, 1) per row, () per tensor."""
    per_row = quant.per_row(name, tuple(s.shape), rows)
    return s.float().reshape(-1, 1) if per_row else s.float().reshape(())


def dequantize(fmt: str, arrays: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
    """float32 (out, in) weight from the arrays of a `minflux.quant.Packed` (as tensors), bitwise the numpy
    reference `minflux.quant.dequantize`."""
    w = arrays["weight"]
    if fmt == quant.FP8:
        return fp8.dequantize(w, _scale(arrays["weight_scale"], shape[0], "weight_scale"))
    if fmt == quant.NVFP4:
        codes = torch.stack([w & 0x0F, w >> 4], dim=-1).reshape(w.shape[0], -1)  # low nibble first
        s2 = _scale(arrays["weight_scale_2"], shape[0], "weight_scale_2")
        scale = arrays["weight_scale"].float() * s2  # (out, in / 16)
        return E2M1.to(w.device)[codes.long()] * scale.repeat_interleave(quant.NVFP4_BLOCK, dim=1)
    _, size = quant.gguf_sizes(fmt)
    return GGUF[fmt](w.reshape(-1, size)).reshape(shape)


def _buffer(name: str) -> str:
    """The attribute holding a Packed array: `weight_q` for the packed weight (`weight` is the dequantized
    one, which model code may read), the file's name for the scales."""
    return "weight_q" if name == "weight" else name


class QuantLinear(nn.Module):
    """An nn.Linear whose weight stays as the file packs it; each call dequantizes it to the model dtype.

    Buffers: `weight_q` and the scales (the `Packed` arrays); `bias` is the linear's; `weight` is the
    dequantized (out, in) weight in `dtype`, computed when read.
    """

    def __init__(self, linear: nn.Linear, packed: quant.Packed, dtype: torch.dtype, device=None):
        super().__init__()
        self.format, self.shape, self.dtype = packed.format, tuple(packed.shape), dtype
        self.out_features, self.in_features = self.shape
        self.names = tuple(packed.arrays)  # static (hashable: part of the graph definition in JAX)
        for name, arr in packed.arrays.items():
            self.register_buffer(_buffer(name), _tensor(arr).to(device))
        self.bias = linear.bias

    @property
    def weight(self) -> Tensor:
        arrays = {name: getattr(self, _buffer(name)) for name in self.names}
        return dequantize(self.format, arrays, self.shape).to(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


def swap_linears(
    model: nn.Module, packed: dict[str, quant.Packed], dtype: torch.dtype, device=None
) -> dict[str, Tensor]:
    """Replace the nn.Linear `X` by a QuantLinear for every `X.weight` in `packed`, in place; returns the new
    modules' buffers by state-dict key (for a strict load of the rest). Raises ValueError for a key that is not
    a linear weight."""
    out = {}
    for key, p in packed.items():
        name = key.removesuffix(".weight")
        parent, _, child = name.rpartition(".")
        module = model.get_submodule(parent)
        linear = getattr(module, child)
        if not key.endswith(".weight") or not isinstance(linear, nn.Linear):
            raise ValueError(f"{key}: not the weight of a linear layer")
        layer = QuantLinear(linear, p, dtype, device)
        setattr(module, child, layer)
        out.update({f"{name}.{_buffer(n)}": getattr(layer, _buffer(n)) for n in layer.names})
    return out


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the model's QuantLinear layers."""
    return [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (packed arrays at their stored size)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


# ---------------------------------------------------------------------------------------------
# A quantized model against its reference, block by block
# ---------------------------------------------------------------------------------------------


class _Pair(nn.Module):
    """Runs a reference block and its candidate twin on the reference's inputs; returns the reference output
    (so the next block sees it: teacher forcing) and records the candidate's rel-L2."""

    def __init__(self, name: str, reference: nn.Module, candidate: nn.Module, rows: list):
        super().__init__()
        self.name, self.reference, self.candidate, self.rows = name, reference, candidate, rows

    def forward(self, *args, **kw):
        want, got = self.reference(*args, **kw), self.candidate(*args, **kw)
        want_, got_ = (torch.cat(t, 1) if isinstance(t, tuple) else t for t in (want, got))
        self.rows.append({"name": self.name, "rel_l2": _rel_l2(got_, want_)})
        return want


def _rel_l2(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-30))


@torch.inference_mode()
def block_parity(reference: nn.Module, candidate: nn.Module, inputs: dict) -> list[dict]:
    """rel-L2 of each of the candidate's blocks against the reference's on the same inputs (the reference's
    activations feed the next block), then of the whole output: rows {"name", "rel_l2"}. `inputs`: the
    forward's keyword arguments (tensors). The blocks are wrapped for one reference forward, then put back."""
    rows: list[dict] = []
    lists = ("double_blocks", "single_blocks")
    saved = {kind: list(getattr(reference, kind)) for kind in lists}
    try:
        for kind in lists:
            pairs = zip(saved[kind], getattr(candidate, kind), strict=True)
            for i, (ref, cand) in enumerate(pairs):
                getattr(reference, kind)[i] = _Pair(f"{kind}.{i}", ref, cand, rows)
        reference(**inputs)
    finally:
        for kind in lists:
            for i, block in enumerate(saved[kind]):
                getattr(reference, kind)[i] = block
    rows.append({"name": "output", "rel_l2": _rel_l2(candidate(**inputs), reference(**inputs))})
    return rows
