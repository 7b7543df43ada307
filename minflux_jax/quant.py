"""Quantized weights kept quantized in JAX / Flax NNX: a linear layer that holds the file's packed arrays and
dequantizes them inside the (jitted) forward.

`load_model(..., keep_quantized=True)` puts a `QuantLinear` wherever the checkpoint stores a linear weight
quantized (`minflux.quant.Packed`): BFL's FP8R and other scaled fp8 (`fp8.dequantize`), ModelOpt NVFP4, and the
GGUF types below. Its arrays are the file's (`weight_q` the packed weight, as in `fp8.FP8Linear`;
`weight_scale`, `weight_scale_2` under the file's names; `QuantWeight` variables, not trained), so the model holds
the quantized size; each call dequantizes the weight to
float32 and then to the model dtype, and multiplies, as diffusers' `BFLFP8RLinear` / `BFLNVFP4Linear` do without
fused kernels (diffusers, src/diffusers/quantizers/bfl/utils.py). The GGUF block decoders follow the gguf
package's numpy ones (ggml-org/llama.cpp, gguf-py/gguf/quants.py) operation for operation: every product in
them is exact in float32, so XLA fusing a multiply and an add into an FMA changes no bit.
Twin: `minflux_torch/quant.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minflux import quant
from minflux_jax import fp8

Array = jax.Array
E2M1 = np.asarray(quant.E2M1)


def _tensor(arr: np.ndarray) -> Array:
    """numpy -> a device array of the same dtype (bf16 and fp8 from ml_dtypes included), copied."""
    return jax.device_put(np.array(arr, copy=True))


# ---------------------------------------------------------------------------------------------
# ggml blocks -> float32, one decoder per type: (n, bytes per block) uint8 -> (n, values per block)
# ---------------------------------------------------------------------------------------------


def _f16(b: Array) -> Array:
    """(n, 2k) little-endian bytes -> (n, k) float32 through float16 (exact)."""
    n = b.shape[0]
    return jax.lax.bitcast_convert_type(b.reshape(n, -1, 2), jnp.float16).astype(jnp.float32)


def _shifts(*s: int) -> Array:
    return jnp.array(s, jnp.uint8)


def _nibbles(qs: Array) -> Array:
    """(n, m) bytes -> (n, 2m) 4-bit values: every low nibble, then every high one (ggml's order)."""
    return jnp.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits(qh: Array) -> Array:
    """(n, 4) bytes of a little-endian uint32 -> its (n, 32) bits, bit 0 first."""
    return ((qh[:, :, None] >> jnp.arange(8, dtype=jnp.uint8)) & 1).reshape(qh.shape[0], 32)


def _q8_0(b: Array) -> Array:
    return jax.lax.bitcast_convert_type(b[:, 2:], jnp.int8).astype(jnp.float32) * _f16(b[:, :2])


def _q4_0(b: Array) -> Array:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).astype(jnp.int8) - 8).astype(jnp.float32)


def _q4_1(b: Array) -> Array:
    return (_f16(b[:, :2]) * _nibbles(b[:, 4:]).astype(jnp.float32)) + _f16(b[:, 2:4])


def _q5_0(b: Array) -> Array:
    q = (_nibbles(b[:, 6:]) | (_bits(b[:, 2:6]) << 4)).astype(jnp.int8) - 16
    return _f16(b[:, :2]) * q.astype(jnp.float32)


def _q5_1(b: Array) -> Array:
    q = (_nibbles(b[:, 8:]) | (_bits(b[:, 4:8]) << 4)).astype(jnp.float32)
    return (_f16(b[:, :2]) * q) + _f16(b[:, 2:4])


def _q2_k(b: Array) -> Array:
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).astype(jnp.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).astype(jnp.float32)).reshape(n, 16, 1)
    q = (qs.reshape(n, -1, 1, 32) >> _shifts(0, 2, 4, 6).reshape(1, 1, 4, 1)) & 3
    return (dl * q.reshape(n, 16, 16).astype(jnp.float32) - ml).reshape(n, 256)


def _q3_k(b: Array) -> Array:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts(0, 4).reshape(1, 2, 1)).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts(0, 2, 4, 6).reshape(1, 4, 1)).reshape(n, 16)
    sc = (((low & 0x0F) | ((high & 0x03) << 4)).astype(jnp.int8) - 32).astype(jnp.float32)
    dl = (d * sc).reshape(n, 16, 1)
    ql = (qs.reshape(n, -1, 1, 32) >> _shifts(0, 2, 4, 6).reshape(1, 1, 4, 1)).reshape(
        n, 16, 16
    ) & 3
    qh = (hmask.reshape(n, -1, 1, 32) >> jnp.arange(8, dtype=jnp.uint8).reshape(1, 1, 8, 1)) & 1
    qh = qh.reshape(n, 16, 16) ^ 1  # the offset is applied where the mask bit is 0
    q = (ql.astype(jnp.int8) - (qh << 2).astype(jnp.int8)).astype(jnp.float32)
    return (dl * q).reshape(n, 256)


def _scale_min_k4(scales: Array) -> tuple[Array, Array]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K, Q5_K)."""
    n = scales.shape[0]
    d, m, m_d = jnp.split(scales.reshape(n, 3, 4), 3, axis=1)
    sc = jnp.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1).reshape(n, 8)
    mn = jnp.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1).reshape(n, 8)
    return sc, mn


def _q4_k(b: Array) -> Array:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.astype(jnp.float32)).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.astype(jnp.float32)).reshape(n, -1, 1)
    q = (b[:, 16:].reshape(n, -1, 1, 32) >> _shifts(0, 4).reshape(1, 1, 2, 1)) & 0x0F
    return (d * q.reshape(n, -1, 32).astype(jnp.float32) - dm).reshape(n, 256)


def _q5_k(b: Array) -> Array:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.astype(jnp.float32)).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.astype(jnp.float32)).reshape(n, -1, 1)
    ql = (b[:, 48:].reshape(n, -1, 1, 32) >> _shifts(0, 4).reshape(1, 1, 2, 1)) & 0x0F
    qh = (
        b[:, 16:48].reshape(n, -1, 1, 32) >> jnp.arange(8, dtype=jnp.uint8).reshape(1, 1, 8, 1)
    ) & 1
    q = (ql.reshape(n, -1, 32) | (qh.reshape(n, -1, 32) << 4)).astype(jnp.float32)
    return (d * q - dm).reshape(n, 256)


def _q6_k(b: Array) -> Array:
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    d = (d * jax.lax.bitcast_convert_type(scales, jnp.int8).astype(jnp.float32)).reshape(n, 16, 1)
    ql = ((ql.reshape(n, -1, 1, 64) >> _shifts(0, 4).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, -1, 32)
    qh = ((qh.reshape(n, -1, 1, 32) >> _shifts(0, 2, 4, 6).reshape(1, 1, 4, 1)) & 3).reshape(
        n, -1, 32
    )
    q = (ql | (qh << 4)).astype(jnp.int8) - 32
    return (d * q.reshape(n, 16, -1).astype(jnp.float32)).reshape(n, 256)


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


def _scale(s: Array, rows: int, name: str) -> Array:
    """A stored scale as float32 that broadcasts over a (rows, ...) tensor: (rows, 1) per row, () per tensor."""
    per_row = quant.per_row(name, tuple(s.shape), rows)
    return s.astype(jnp.float32).reshape(-1, 1) if per_row else s.astype(jnp.float32).reshape(())


def dequantize(fmt: str, arrays: dict[str, Array], shape: tuple[int, int]) -> Array:
    """float32 (out, in) weight from the arrays of a `minflux.quant.Packed`, bitwise the numpy reference
    `minflux.quant.dequantize`."""
    w = arrays["weight"]
    if fmt == quant.FP8:
        return fp8.dequantize(w, _scale(arrays["weight_scale"], shape[0], "weight_scale"))
    if fmt == quant.NVFP4:
        codes = jnp.stack([w & 0x0F, w >> 4], axis=-1).reshape(w.shape[0], -1)  # low nibble first
        s2 = _scale(arrays["weight_scale_2"], shape[0], "weight_scale_2")
        scale = arrays["weight_scale"].astype(jnp.float32) * s2  # (out, in / 16)
        return jnp.asarray(E2M1)[codes.astype(jnp.int32)] * jnp.repeat(
            scale, quant.NVFP4_BLOCK, axis=1
        )
    _, size = quant.gguf_sizes(fmt)
    return GGUF[fmt](w.reshape(-1, size)).reshape(shape)


class QuantWeight(nnx.Variable):
    """A packed weight or one of its scales: state that is not trained."""


def _buffer(name: str) -> str:
    """The attribute holding a Packed array: `weight_q` for the packed weight (`weight` is the dequantized
    one, which model code may read), the file's name for the scales."""
    return "weight_q" if name == "weight" else name


class QuantLinear(nnx.Module):
    """An nnx.Linear whose weight stays as the file packs it; each call dequantizes it to the model dtype.

    Variables: `weight_q` and the scales (the `Packed` arrays, (out, ...) like the file, not transposed);
    `bias` is the linear's; `weight` is the dequantized (out, in) weight in `dtype`, computed when read.
    """

    def __init__(self, linear: nnx.Linear, packed: quant.Packed, dtype):
        self.format, self.shape, self.dtype = packed.format, tuple(packed.shape), dtype
        self.out_features, self.in_features = self.shape
        self.names = tuple(packed.arrays)  # static (hashable: part of the graph definition in JAX)
        for name, arr in packed.arrays.items():
            setattr(self, _buffer(name), QuantWeight(_tensor(arr)))
        self.bias = linear.bias

    @property
    def weight(self) -> Array:
        arrays = {name: getattr(self, _buffer(name))[...] for name in self.names}
        return dequantize(self.format, arrays, self.shape).astype(self.dtype)

    def __call__(self, x: Array) -> Array:
        packed = {name: getattr(self, _buffer(name))[...] for name in self.names}
        # Tied to x, the dequantization stays at the call: inside a compiled sampling loop XLA would otherwise
        # hoist every weight's (loop-invariant) dequantization out of the loop and hold them all at once.
        packed, x = jax.lax.optimization_barrier((packed, x))
        w = dequantize(self.format, packed, self.shape).astype(self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), w, (((x.ndim - 1,), (1,)), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def swap_linears(model: nnx.Module, packed: dict[str, quant.Packed], dtype) -> dict[str, Array]:
    """Replace the nnx.Linear `X` by a QuantLinear for every `X.weight` in `packed`, in place; returns the new
    modules' arrays by PyTorch state-dict key. Raises ValueError for a key that is not a linear weight."""
    out = {}
    for key, p in packed.items():
        name = key.removesuffix(".weight")
        *parents, child = name.split(".")
        module = model
        for part in parents:
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        linear = module[int(child)] if child.isdigit() else getattr(module, child)
        if not key.endswith(".weight") or not isinstance(linear, nnx.Linear):
            raise ValueError(f"{key}: not the weight of a linear layer")
        layer = QuantLinear(linear, p, dtype)
        if child.isdigit():
            module[int(child)] = layer
        else:
            setattr(module, child, layer)
        out.update({f"{name}.{_buffer(n)}": getattr(layer, _buffer(n))[...] for n in layer.names})
    return out


def quantized_layers(model: nnx.Module) -> list[str]:
    """Names of the model's QuantLinear layers."""
    return [".".join(map(str, p)) for p, m in nnx.iter_graph(model) if isinstance(m, QuantLinear)]


def resident_bytes(model: nnx.Module) -> int:
    """Bytes of every array the model holds (packed arrays at their stored size)."""
    leaves = jax.tree.leaves(nnx.state(model))
    return sum(a.size * a.dtype.itemsize for a in leaves if hasattr(a, "dtype"))


# ---------------------------------------------------------------------------------------------
# A quantized model against its reference, block by block
# ---------------------------------------------------------------------------------------------


class _Pair(nnx.Module):
    """Runs a reference block and its candidate twin on the reference's inputs; returns the reference output
    (so the next block sees it: teacher forcing) and records the candidate's rel-L2."""

    def __init__(self, name: str, reference: nnx.Module, candidate: nnx.Module, rows: list):
        self.name, self.reference, self.candidate, self.rows = name, reference, candidate, rows

    def __call__(self, *args, **kw):
        want, got = self.reference(*args, **kw), self.candidate(*args, **kw)
        want_, got_ = (jnp.concatenate(t, 1) if isinstance(t, tuple) else t for t in (want, got))
        self.rows.append({"name": self.name, "rel_l2": _rel_l2(got_, want_)})
        return want


def _rel_l2(a: Array, b: Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))


def block_parity(reference: nnx.Module, candidate: nnx.Module, inputs: dict) -> list[dict]:
    """rel-L2 of each of the candidate's blocks against the reference's on the same inputs (the reference's
    activations feed the next block), then of the whole output: rows {"name", "rel_l2"}. `inputs`: the
    forward's keyword arguments (arrays). Runs eagerly (each block's figure is read as it runs); the blocks
    are wrapped for one reference forward, then put back."""
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
