"""FLUX.2 transformer in Flax NNX: dev, klein 4B/9B (distilled and base).

Follows black-forest-labs/flux2 `src/flux2/model.py`; only what differs from
FLUX.1 lives here: no biases, SwiGLU MLPs, three modulations shared by all
blocks, 4-D RoPE ids. Twin: `minflux_torch/flux2.py`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from minflux.configs import Flux2Config
from minflux_jax.layers import (
    Array,
    DoubleStreamBlockBase,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    Modulation,
    RefKV,
    SingleStreamBlockBase,
    Trunk,
    call_block,
    linear,
    timestep_embedding,
)


class DoubleStreamBlock(DoubleStreamBlockBase):
    """FLUX.2 double block: modulation comes from the model; separate RoPE for image and text."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, *, dtype, rngs):
        super().__init__(
            hidden_size,
            num_heads,
            mlp_ratio,
            Flux2Config,
            qkv_bias=Flux2Config.bias,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(
        self,
        img: Array,
        txt: Array,
        pe: Array,
        pe_ctx: Array,
        mod_img,
        mod_txt,
        kv: RefKV | None = None,
    ) -> tuple[Array, Array]:
        return self.stream(img, txt, jnp.concatenate((pe_ctx, pe), axis=2), mod_img, mod_txt, kv)


class SingleStreamBlock(SingleStreamBlockBase):
    """FLUX.2 single block: SwiGLU MLP, modulation from the model."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, *, dtype, rngs):
        super().__init__(hidden_size, num_heads, mlp_ratio, Flux2Config, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, pe: Array, mod, kv: RefKV | None = None) -> Array:
        return self.stream(x, pe, mod, kv)


class Flux2(Trunk):
    """The FLUX.2 flow transformer on 128-channel patchified latent tokens."""

    def __init__(self, params: Flux2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.params = params
        self.dtype = dtype
        d = params.hidden_size
        self.pe_embedder = EmbedND(d // params.num_heads, params.theta, params.axes_dim)
        self.img_in = linear(params.in_channels, d, params.bias, dtype, rngs)
        self.time_in = MLPEmbedder(256, d, bias=params.bias, dtype=dtype, rngs=rngs)
        self.txt_in = linear(params.context_in_dim, d, params.bias, dtype, rngs)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(256, d, bias=params.bias, dtype=dtype, rngs=rngs)
        self.double_blocks = nnx.List(
            DoubleStreamBlock(d, params.num_heads, params.mlp_ratio, dtype=dtype, rngs=rngs)
            for _ in range(params.depth)
        )
        self.single_blocks = nnx.List(
            SingleStreamBlock(d, params.num_heads, params.mlp_ratio, dtype=dtype, rngs=rngs)
            for _ in range(params.depth_single_blocks)
        )
        self.double_stream_modulation_img = Modulation(
            d, double=True, bias=params.bias, dtype=dtype, rngs=rngs
        )
        self.double_stream_modulation_txt = Modulation(
            d, double=True, bias=params.bias, dtype=dtype, rngs=rngs
        )
        self.single_stream_modulation = Modulation(
            d, double=False, bias=params.bias, dtype=dtype, rngs=rngs
        )
        self.final_layer = LastLayer(
            d, params.in_channels, bias=params.bias, dtype=dtype, rngs=rngs
        )

    def time_vec(self, timesteps: Array, guidance: Array | None) -> Array:
        """The time (and guidance) embedding every modulation reads: (B,) -> (B, hidden)."""
        dtype = self.dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).astype(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError(
                    "this FLUX.2 model is guidance-distilled: pass guidance=(B,) values"
                )
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).astype(dtype))
        return vec

    def embed(
        self, x, x_ids, timesteps, ctx, ctx_ids, guidance=None, n_ref: int = 0
    ) -> tuple[Array, Array, dict]:
        """Input projections and the shared modulations; returns img, txt and the blocks' inputs. With n_ref (klein
        KV) the last n_ref tokens of x are reference images, modulated as clean ones (t = 0) at every step."""
        dtype = self.dtype
        vec = self.time_vec(timesteps, guidance)
        pe_x, pe_ctx = self.pe_embedder(x_ids), self.pe_embedder(ctx_ids)
        mod_img, mod = self.double_stream_modulation_img(vec), self.single_stream_modulation(vec)[0]
        if (
            n_ref
        ):  # per-token modulation: (B, 1, D) for the image tokens, then the references' (diffusers)
            ref_vec = self.time_vec(jnp.zeros_like(timesteps), guidance)
            ref_img, ref = (
                self.double_stream_modulation_img(ref_vec),
                self.single_stream_modulation(ref_vec)[0],
            )
            expand = lambda m, n: jnp.broadcast_to(m, (m.shape[0], n, m.shape[2]))
            tokens = lambda m, r, n: jnp.concatenate((expand(m, n), expand(r, n_ref)), axis=1)
            n_img = x.shape[1] - n_ref
            mod_img = tuple(
                tuple(map(tokens, a, b, [n_img] * 3)) for a, b in zip(mod_img, ref_img, strict=True)
            )
            mod = tuple(map(tokens, mod, ref, [ctx.shape[1] + n_img] * 3))
        kw = {
            "vec": vec,
            "double": {
                "pe": pe_x,
                "pe_ctx": pe_ctx,
                "mod_img": mod_img,
                "mod_txt": self.double_stream_modulation_txt(vec),
            },
            "single": {"pe": jnp.concatenate((pe_ctx, pe_x), axis=2), "mod": mod},
        }
        return self.img_in(x.astype(dtype)), self.txt_in(ctx.astype(dtype)), kw

    def kv_caches(self, n_ref: int) -> list[RefKV]:
        """Empty klein KV caches, one per block (double blocks first), for `n_ref` reference tokens."""
        return [RefKV(n_ref) for _ in range(len(self.double_blocks) + len(self.single_blocks))]

    def __call__(
        self,
        x: Array,
        x_ids: Array,
        timesteps: Array,
        ctx: Array,
        ctx_ids: Array,
        guidance: Array | None = None,
        kv: list[RefKV] | None = None,
        *,
        run_block=call_block,
    ) -> Array:
        """x (B, Li, 128), x_ids (B, Li, 4), timesteps (B,) in [0, 1], ctx (B, Lt, context_in_dim),
        ctx_ids (B, Lt, 4), guidance (B,) -> (B, Li, 128). run_block: the hook that runs each block (see `Trunk`).

        kv (klein KV, from `kv_caches`): empty, the last n_ref tokens of x are reference images that attend only to
        themselves and their keys and values are kept; filled, x holds no references and attends to the kept ones.
        """
        n_ref = kv[0].n_ref if kv is not None and kv[0].k is None else 0
        return self.trunk(
            *self.embed(x, x_ids, timesteps, ctx, ctx_ids, guidance, n_ref), run_block, kv
        )
