"""T5 v1.1 encoder (FLUX.1's `txt`: T5-XXL, 4096 wide) in Flax NNX.

Follows transformers `models/t5/modeling_t5.py` (T5EncoderModel): attribute names are the checkpoint keys
(`shared`, `encoder.block.N.layer.0.SelfAttention.q`, `...layer.1.DenseReluDense.wi_0`, ...). T5 quirks kept:
no 1/sqrt(d) attention scale (folded into the init), a relative position bias computed by block 0 and shared by
all blocks, an RMS-style LayerNorm without mean or bias, gated tanh-GELU feed-forward, no biases at all.
Twin: `minflux_torch/text/t5.py`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from minflux.text import T5Config
from minflux_jax.layers import Array, linear


def relative_position_bucket(
    relative_position: Array, num_buckets: int, max_distance: int
) -> Array:
    """Bidirectional buckets: half per direction, exact below num_buckets/4, then log-spaced up to max_distance."""
    num_buckets //= 2
    buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
    relative_position = jnp.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # fp32 log as transformers computes it: the integer floors at bucket boundaries depend on it.
    large = max_exact + (
        jnp.log(relative_position.astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, relative_position, large)


class T5LayerNorm(nnx.Module):
    """RMS norm without mean subtraction or bias, computed in fp32."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones(dim, dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        variance = jnp.mean(x.astype(jnp.float32) ** 2, axis=-1, keepdims=True)
        weight = self.weight[...]
        return weight * (x.astype(jnp.float32) * jax.lax.rsqrt(variance + self.eps)).astype(
            weight.dtype
        )


class T5Attention(nnx.Module):
    """Unscaled multi-head self-attention with an additive relative position bias."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        inner = cfg.num_heads * cfg.d_kv
        self.q = linear(cfg.d_model, inner, False, dtype, rngs)
        self.k = linear(cfg.d_model, inner, False, dtype, rngs)
        self.v = linear(cfg.d_model, inner, False, dtype, rngs)
        self.o = linear(inner, cfg.d_model, False, dtype, rngs)
        if has_relative_attention_bias:
            self.relative_attention_bias = nnx.Embed(
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                dtype=dtype,
                param_dtype=dtype,
                rngs=rngs,
            )

    def compute_bias(self, length: int) -> Array:  # -> (1, H, L, L)
        pos = jnp.arange(length)
        bucket = relative_position_bucket(
            pos[None, :] - pos[:, None],
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        )  # (L query, L key)
        return rearrange(self.relative_attention_bias(bucket), "Lq Lk H -> 1 H Lq Lk")

    def __call__(self, x: Array, position_bias: Array) -> Array:
        q, k, v = (
            rearrange(lin(x), "B L (H D) -> B H L D", H=self.cfg.num_heads)
            for lin in (self.q, self.k, self.v)
        )
        scores = q @ k.swapaxes(-1, -2) + position_bias  # (B, H, L, L), no 1/sqrt(D)
        attn = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(scores.dtype)
        return self.o(rearrange(attn @ v, "B H L D -> B L (H D)"))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, *, dtype, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias, dtype=dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)

    def __call__(self, x: Array, position_bias: Array) -> Array:
        return x + self.SelfAttention(self.layer_norm(x), position_bias)


class T5DenseGatedActDense(nnx.Module):
    """gelu_tanh(wi_0 x) * wi_1 x -> wo."""

    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        self.wi_0 = linear(cfg.d_model, cfg.d_ff, False, dtype, rngs)
        self.wi_1 = linear(cfg.d_model, cfg.d_ff, False, dtype, rngs)
        self.wo = linear(cfg.d_ff, cfg.d_model, False, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        self.DenseReluDense = T5DenseGatedActDense(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, *, dtype, rngs: nnx.Rngs):
        self.layer = nnx.List(
            [
                T5LayerSelfAttention(cfg, has_relative_attention_bias, dtype=dtype, rngs=rngs),
                T5LayerFF(cfg, dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, x: Array, position_bias: Array) -> Array:
        return self.layer[1](self.layer[0](x, position_bias))


class T5Stack(nnx.Module):
    """The encoder blocks and final norm; the token embedding is the parent's `shared` (a tied weight)."""

    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        self.block = nnx.List(
            T5Block(cfg, has_relative_attention_bias=i == 0, dtype=dtype, rngs=rngs)
            for i in range(cfg.num_layers)
        )
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        position_bias = self.block[0].layer[0].SelfAttention.compute_bias(x.shape[1])
        for block in self.block:
            x = block(x, position_bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nnx.Module):
    """input_ids (B, L) -> last_hidden_state (B, L, d_model). FLUX passes no attention mask."""

    def __init__(self, cfg: T5Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.shared = nnx.Embed(
            cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.encoder = T5Stack(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: Array) -> Array:
        return self.encoder(self.shared(input_ids))
