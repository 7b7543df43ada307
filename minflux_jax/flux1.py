"""FLUX.1 transformer in Flax NNX: dev, schnell, Kontext, Krea, Fill/Canny/Depth.

Follows black-forest-labs/flux `src/flux/model.py` and `src/flux/modules/layers.py`;
only what differs from FLUX.2 lives here (layers.py has the rest).
Twin: `minflux_torch/flux1.py`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from minflux.configs import FluxConfig
from minflux_jax.layers import (
    Array,
    DoubleStreamBlockBase,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    Modulation,
    SingleStreamBlockBase,
    Trunk,
    call_block,
    linear,
    timestep_embedding,
)


class DoubleStreamBlock(DoubleStreamBlockBase):
    """FLUX.1 double block: each stream owns its modulation (`img_mod`, `txt_mod`)."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, *, dtype, rngs
    ):
        super().__init__(
            hidden_size, num_heads, mlp_ratio, FluxConfig, qkv_bias, dtype=dtype, rngs=rngs
        )
        self.img_mod = Modulation(hidden_size, double=True, dtype=dtype, rngs=rngs)
        self.txt_mod = Modulation(hidden_size, double=True, dtype=dtype, rngs=rngs)

    def __call__(self, img: Array, txt: Array, vec: Array, pe: Array) -> tuple[Array, Array]:
        return self.stream(img, txt, pe, self.img_mod(vec), self.txt_mod(vec))


class SingleStreamBlock(SingleStreamBlockBase):
    """FLUX.1 single block: GELU(tanh) MLP, its own `modulation`."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, *, dtype, rngs):
        super().__init__(hidden_size, num_heads, mlp_ratio, FluxConfig, dtype=dtype, rngs=rngs)
        self.modulation = Modulation(hidden_size, double=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, vec: Array, pe: Array) -> Array:
        mod, _ = self.modulation(vec)
        return self.stream(x, pe, mod)


class Flux(Trunk):
    """The FLUX.1 flow transformer on packed 2x2 latent tokens."""

    def __init__(self, params: FluxConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.params = params
        self.dtype = dtype
        d = params.hidden_size
        self.pe_embedder = EmbedND(d // params.num_heads, params.theta, params.axes_dim)
        self.img_in = linear(params.in_channels, d, True, dtype, rngs)
        self.time_in = MLPEmbedder(256, d, dtype=dtype, rngs=rngs)
        self.vector_in = MLPEmbedder(params.vec_in_dim, d, dtype=dtype, rngs=rngs)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(256, d, dtype=dtype, rngs=rngs)
        self.txt_in = linear(params.context_in_dim, d, True, dtype, rngs)
        self.double_blocks = nnx.List(
            DoubleStreamBlock(
                d, params.num_heads, params.mlp_ratio, params.qkv_bias, dtype=dtype, rngs=rngs
            )
            for _ in range(params.depth)
        )
        self.single_blocks = nnx.List(
            SingleStreamBlock(d, params.num_heads, params.mlp_ratio, dtype=dtype, rngs=rngs)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(d, params.out_channels, dtype=dtype, rngs=rngs)

    def embed(
        self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None
    ) -> tuple[Array, Array, dict]:
        """Input projections; returns img, txt and the blocks' keyword arguments."""
        dtype = self.dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).astype(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError(
                    "this FLUX.1 model is guidance-distilled: pass guidance=(B,) values"
                )
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).astype(dtype))
        vec = vec + self.vector_in(y.astype(dtype))
        pe = self.pe_embedder(jnp.concatenate((txt_ids, img_ids), axis=1))  # ids of [txt, img]
        kw = {"vec": vec, "pe": pe}
        return (
            self.img_in(img.astype(dtype)),
            self.txt_in(txt.astype(dtype)),
            {"vec": vec, "double": kw, "single": kw},
        )

    def __call__(
        self,
        img: Array,
        img_ids: Array,
        txt: Array,
        txt_ids: Array,
        timesteps: Array,
        y: Array,
        guidance: Array | None = None,
        *,
        run_block=call_block,
    ) -> Array:
        """img (B, Li, in_channels), img_ids (B, Li, 3), txt (B, Lt, 4096), txt_ids (B, Lt, 3),
        timesteps (B,) in [0, 1], y (B, 768), guidance (B,) -> (B, Li, out_channels).
        run_block: the hook that runs each block (see `Trunk`)."""
        return self.trunk(
            *self.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance), run_block
        )
