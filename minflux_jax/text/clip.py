"""CLIP text tower (FLUX.1's `vec`: CLIP-L pooled output, 768 wide) in Flax NNX.

Follows transformers `models/clip/modeling_clip.py` (CLIPTextTransformer, the `text_model` of CLIPTextModel):
attribute names are the checkpoint keys (`embeddings.token_embedding`, `encoder.layers.N.self_attn.q_proj`,
`...mlp.fc1`, `final_layer_norm`). Pre-norm blocks, causal attention, quick_gelu; the pooled output is the final
hidden state at the first EOS token. Twin: `minflux_torch/text/clip.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from minflux.text import CLIPTextConfig
from minflux_jax.layers import Array, linear


def layer_norm(dim: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """nn.LayerNorm's twin: exact (not fast) variance."""
    return nnx.LayerNorm(
        dim, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=dtype, rngs=rngs
    )


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.position_embedding = nnx.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )

    def __call__(self, input_ids: Array) -> Array:  # (B, L) -> (B, L, D)
        return (
            self.token_embedding(input_ids)
            + self.position_embedding.embedding[...][: input_ids.shape[1]]
        )


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention with biases and the 1/sqrt(D) scale."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj = linear(d, d, True, dtype, rngs)
        self.k_proj = linear(d, d, True, dtype, rngs)
        self.v_proj = linear(d, d, True, dtype, rngs)
        self.out_proj = linear(d, d, True, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        # jax.nn.dot_product_attention takes (B, L, H, D).
        q, k, v = (
            rearrange(lin(x), "B L (H D) -> B L H D", H=self.num_heads)
            for lin in (self.q_proj, self.k_proj, self.v_proj)
        )
        x = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(x, "B L H D -> B L (H D)"))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, True, dtype, rngs)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, True, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        x = self.fc1(x)
        return self.fc2(x * jax.nn.sigmoid(1.702 * x))  # quick_gelu


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm1 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)
        self.mlp = CLIPMLP(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List(
            CLIPEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)
        )

    def __call__(self, x: Array) -> Array:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nnx.Module):
    """input_ids (B, L) -> (last_hidden_state (B, L, D), pooled (B, D)). FLUX passes no attention mask."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs)
        self.final_layer_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)

    def __call__(self, input_ids: Array) -> tuple[Array, Array]:
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids)))
        # Legacy configs (eos_token_id 2, as CLIP-L's) pool at argmax(ids): EOS is the largest id in the vocab.
        eos = (
            input_ids
            if self.cfg.eos_token_id == 2
            else (input_ids == self.cfg.eos_token_id).astype(jnp.int32)
        )
        return x, x[jnp.arange(x.shape[0]), jnp.argmax(eos, axis=-1)]
