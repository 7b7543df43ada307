"""Qwen3 / Mistral decoder (FLUX.2's `ctx`: hidden states of three layers stacked) in Flax NNX.

Follows transformers `models/qwen3/modeling_qwen3.py` and `models/mistral/modeling_mistral.py` (Qwen3Model,
MistralModel): attribute names are the checkpoint keys (`embed_tokens`, `layers.N.self_attn.q_proj`,
`...self_attn.q_norm` (Qwen3 only), `...mlp.gate_proj`, `...input_layernorm`). Grouped-query attention, RoPE in
the rotate-half layout, RMSNorm, SwiGLU. Only the first max(layers) layers are built: FLUX.2 reads hidden_states
(9, 18, 27) of Qwen3 and (10, 20, 30) of Mistral, never the final norm. Twin: `minflux_torch/text/decoder.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from minflux.text import DecoderConfig
from minflux_jax.layers import Array, linear


class RMSNorm(nnx.Module):
    """transformers' Qwen3RMSNorm / MistralRMSNorm: normalise in fp32, cast back, then scale by `weight`."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones(dim, dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h**2, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)


def rope_cos_sin(length: int, head_dim: int, theta: float, dtype) -> tuple[Array, Array]:
    """cos, sin (L, head_dim) for positions 0..L-1: angles in fp32, then cast to the activations' dtype as
    transformers does. The inverse frequencies come from float64 so both frameworks share one table."""
    inv_freq = jnp.asarray(
        (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)
    )
    freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None]  # (L, D/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # (L, D)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x (B, H, L, D) rotated in the rotate-half layout (pairs are (i, i + D/2), not interleaved)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
    """GQA self-attention: num_key_value_heads k/v heads, each shared by num_heads / num_kv consecutive q heads."""

    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = linear(d, cfg.num_attention_heads * hd, False, dtype, rngs)
        self.k_proj = linear(d, cfg.num_key_value_heads * hd, False, dtype, rngs)
        self.v_proj = linear(d, cfg.num_key_value_heads * hd, False, dtype, rngs)
        self.o_proj = linear(cfg.num_attention_heads * hd, d, False, dtype, rngs)
        if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim before RoPE
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x: Array, cos: Array, sin: Array, allowed: Array) -> Array:
        q = rearrange(self.q_proj(x), "B L (H D) -> B L H D", D=self.cfg.head_dim)
        k = rearrange(self.k_proj(x), "B L (H D) -> B L H D", D=self.cfg.head_dim)
        v = rearrange(self.v_proj(x), "B L (H D) -> B L H D", D=self.cfg.head_dim)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.swapaxes(1, 2), cos, sin), apply_rope(k.swapaxes(1, 2), cos, sin)
        n_rep = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        k, v = jnp.repeat(k, n_rep, axis=1), jnp.repeat(v, n_rep, axis=2)
        # A query with no allowed key (a pad before the prompt, with left padding) gives zeros, as torch's CPU SDPA
        # does and transformers inherits; done explicitly (attend anywhere, then zero) so no kernel can give NaN.
        some = allowed.any(axis=-1, keepdims=True)  # (B, 1, L, 1)
        x = jax.nn.dot_product_attention(
            q.swapaxes(1, 2), k.swapaxes(1, 2), v, mask=allowed | ~some
        )
        x = x * rearrange(
            some, "B 1 L 1 -> B L 1 1"
        )  # jax.nn.dot_product_attention works in (B, L, H, D)
        return self.o_proj(rearrange(x, "B L H D -> B L (H D)"))


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, False, dtype, rngs)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, False, dtype, rngs)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, False, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x: Array, cos: Array, sin: Array, allowed: Array) -> Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_padding_mask(mask: Array) -> Array:
    """Causal and key-padding mask (B, L) -> allowed (B, 1, L, L) bool."""
    length = mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return causal[None, None] & mask.astype(bool)[:, None, None, :]


class DecoderModel(nnx.Module):
    """input_ids, attention_mask (B, L) -> hidden_states[k] for k in `layers`, stacked: (B, L, len(layers) * D)."""

    def __init__(
        self, cfg: DecoderConfig, layers: tuple[int, ...], *, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.cfg, self.out_layers = cfg, tuple(layers)
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List(
            DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(max(layers))
        )

    def __call__(self, input_ids: Array, attention_mask: Array) -> Array:
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(x.shape[1], self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        allowed = causal_padding_mask(attention_mask)
        hidden = {
            0: x
        }  # hidden_states[k] = the residual stream after k layers; keep only the stacked ones
        for k, layer in enumerate(self.layers, start=1):
            x = layer(x, cos, sin, allowed)
            if k in self.out_layers:
                hidden[k] = x
        return rearrange(
            jnp.stack([hidden[k] for k in self.out_layers], axis=1), "B C L D -> B L (C D)"
        )
