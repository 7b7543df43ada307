"""fp8 inference in JAX / Flax NNX: float8_e4m3fn weights with scales, activations quantised on the fly.

Each block linear that sees tokens (qkv, proj, MLPs, linear1/2: the LoRA targets of `minflux.lora`) becomes an
`FP8Linear`: its kernel is stored as e4m3 values q and an fp32 scale s with W ~ q * s, per tensor or per output
column (the kernel is (in, out)); each call quantises its input the same way (per tensor or per token) and
multiplies dequantised fp8 values, dot(q_x * s_x, q_w * s_w). On an NVIDIA Hopper GPU XLA's GEMM rewriter turns
exactly this pattern (convert from f8, times a scale, into a dot) into cuBLASLt's fp8 GEMM (the route of
flax's `fp8_ops` and Praxis); elsewhere it computes the same numbers in fp32 (fake quantisation). Scales: s =
amax / 448, the largest finite e4m3 value. Embedders, modulations and the final layer stay in the model dtype.
Twin: `minflux_torch/fp8.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minflux import lora
from minflux_jax.lora import linear_names

Array = jax.Array
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value


def quantize(x: Array, axis: int | None = None) -> tuple[Array, Array]:
    """x -> (q float8_e4m3fn, scale fp32) with x ~ q * scale; one scale (axis None) or one per slice along the
    other axes (amax over `axis`, kept as a size-1 axis). Rounds to nearest even; clamps at +-448 first (a cast
    of anything larger would be NaN)."""
    amax = jnp.max(jnp.abs(x)) if axis is None else jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    scale = jnp.maximum(amax.astype(jnp.float32), 1e-12) * (
        1 / E4M3_MAX
    )  # not / 448: XLA makes that this product
    q = jnp.clip(x.astype(jnp.float32) / scale, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    return q, scale


def dequantize(q: Array, scale: Array) -> Array:
    """q * scale in fp32."""
    return q.astype(jnp.float32) * scale


class FP8Weight(nnx.Variable):
    """An fp8 kernel or its scale: state that is not trained."""


class FP8Linear(nnx.Module):
    """An nnx.Linear in fp8: kernel (in, out) as e4m3 + scale, input quantised per call; output in the model dtype."""

    def __init__(self, linear: nnx.Linear, scaling: str = "tensor"):
        if scaling not in ("tensor", "row"):
            raise ValueError(f"fp8 scaling {scaling!r}: expected 'tensor' or 'row'")
        self.scaling = scaling
        self.axis = (
            -1 if scaling == "row" else None
        )  # row: a scale per output column (kernel) / per token (input)
        kernel_q, kernel_scale = quantize(linear.kernel[...], 0 if scaling == "row" else None)
        self.kernel_q = FP8Weight(kernel_q)  # (in, out)
        self.kernel_scale = FP8Weight(kernel_scale)  # () or (1, out)
        self.bias = linear.bias
        self.out_dtype = linear.kernel.dtype

    def __call__(self, x: Array) -> Array:
        shape = x.shape
        xq, xs = quantize(x.reshape(-1, shape[-1]), self.axis)  # (M, in), () or (M, 1)
        # default precision: XLA's fp8 rewrite of the pattern is for default-precision dots
        y = jnp.dot(
            dequantize(xq, xs),
            dequantize(self.kernel_q[...], self.kernel_scale[...]),
            preferred_element_type=jnp.float32,
        ).astype(self.out_dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y.reshape(*shape[:-1], -1)


def quantize_model(model: nnx.Module, scaling: str = "tensor") -> nnx.Module:
    """Swap every token-wise block linear (the `minflux.lora.DEFAULT_TARGETS`) for an FP8Linear, in place."""
    names = lora.targets(linear_names(model))
    for name in names:
        *parents, child = name.split(".")
        module = model
        for p in parents:
            module = module[int(p)] if p.isdigit() else getattr(module, p)
        if child.isdigit():
            module[int(child)] = FP8Linear(module[int(child)], scaling)
        else:
            setattr(module, child, FP8Linear(getattr(module, child), scaling))
    return model
