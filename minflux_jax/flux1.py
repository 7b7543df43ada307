"""FLUX.1 transformer in Flax NNX: dev, schnell, Kontext, Krea, Fill/Canny/Depth.

Follows black-forest-labs/flux `src/flux/model.py` and `src/flux/modules/layers.py`;
only what differs from FLUX.2 lives here (layers.py has the rest).
Twin: `minflux_torch/flux1.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from minflux.configs import FluxConfig
from minflux_jax.layers import (
    Array,
    BlockRunner,
    DoubleStreamBlockBase,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    Modulation,
    SingleStreamBlockBase,
    call_block,
    linear,
    timestep_embedding,
)


class DoubleStreamBlock(DoubleStreamBlockBase):
    """FLUX.1 double block: each stream owns its modulation (`img_mod`, `txt_mod`)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        qkv_bias: bool,
        bias: bool,
        gated_mlp: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            hidden_size,
            num_heads,
            mlp_ratio,
            qkv_bias=qkv_bias,
            bias=bias,
            gated_mlp=gated_mlp,
            dtype=dtype,
            rngs=rngs,
        )
        self.img_mod = Modulation(hidden_size, double=True, bias=bias, dtype=dtype, rngs=rngs)
        self.txt_mod = Modulation(hidden_size, double=True, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, img: Array, txt: Array, vec: Array, pe: Array) -> tuple[Array, Array]:
        img, txt, _ = self.stream(img, txt, pe, self.img_mod(vec), self.txt_mod(vec))
        return img, txt


class SingleStreamBlock(SingleStreamBlockBase):
    """FLUX.1 single block: its own `modulation`."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        bias: bool,
        gated_mlp: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            hidden_size,
            num_heads,
            mlp_ratio,
            bias=bias,
            gated_mlp=gated_mlp,
            dtype=dtype,
            rngs=rngs,
        )
        self.modulation = Modulation(hidden_size, double=False, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, vec: Array, pe: Array) -> Array:
        mod, _ = self.modulation(vec)
        x, _ = self.stream(x, pe, mod)
        return x


@dataclass(frozen=True)
class FluxEmbeds:
    """What `Flux.embed` hands the blocks."""

    img: Array  # (B, Li, D) image tokens
    txt: Array  # (B, Lt, D) text tokens
    vec: Array  # (B, D) time, guidance and pooled text: every modulation's input
    pe: Array  # (B, 1, Lt+Li, D/H/2, 2, 2) RoPE of the joint [txt, img] sequence


class Flux(nnx.Module):
    """The FLUX.1 flow transformer on packed 2x2 latent tokens."""

    def __init__(self, params: FluxConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.params = params
        self.dtype = dtype
        d, bias, gated = params.hidden_size, params.bias, params.gated_mlp
        self.pe_embedder = EmbedND(d // params.num_heads, params.theta, params.axes_dim)
        self.img_in = linear(params.in_channels, d, bias, dtype, rngs)
        self.time_in = MLPEmbedder(256, d, bias=bias, dtype=dtype, rngs=rngs)
        self.vector_in = MLPEmbedder(params.vec_in_dim, d, bias=bias, dtype=dtype, rngs=rngs)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(256, d, bias=bias, dtype=dtype, rngs=rngs)
        self.txt_in = linear(params.context_in_dim, d, bias, dtype, rngs)
        self.double_blocks = nnx.List(
            DoubleStreamBlock(
                d,
                params.num_heads,
                params.mlp_ratio,
                qkv_bias=params.qkv_bias,
                bias=bias,
                gated_mlp=gated,
                dtype=dtype,
                rngs=rngs,
            )
            for _ in range(params.depth)
        )
        self.single_blocks = nnx.List(
            SingleStreamBlock(
                d,
                params.num_heads,
                params.mlp_ratio,
                bias=bias,
                gated_mlp=gated,
                dtype=dtype,
                rngs=rngs,
            )
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(d, params.out_channels, bias=bias, dtype=dtype, rngs=rngs)

    def embed(
        self,
        img: Array,
        img_ids: Array,
        txt: Array,
        txt_ids: Array,
        timesteps: Array,
        y: Array,
        guidance: Array | None = None,
    ) -> FluxEmbeds:
        """Input projections, the conditioning vector and RoPE (arguments as `__call__`'s)."""
        dtype = self.dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).astype(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError(
                    "this FLUX.1 model is guidance-distilled: pass guidance=(B,) values"
                )
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).astype(dtype))
        vec = vec + self.vector_in(y.astype(dtype))
        return FluxEmbeds(
            img=self.img_in(img.astype(dtype)),
            txt=self.txt_in(txt.astype(dtype)),
            vec=vec,
            pe=self.pe_embedder(jnp.concatenate((txt_ids, img_ids), axis=1)),
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
        run: BlockRunner = call_block,
    ) -> Array:
        """img (B, Li, in_channels), img_ids (B, Li, 3), txt (B, Lt, 4096), txt_ids (B, Lt, 3),
        timesteps (B,) in [0, 1], y (B, 768), guidance (B,) -> (B, Li, out_channels).
        run: how each block and the final layer is called (`layers.BlockRunner`)."""
        e = self.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        img, txt = e.img, e.txt
        for block in self.double_blocks:
            img, txt = run(block, img=img, txt=txt, vec=e.vec, pe=e.pe)
        img = jnp.concatenate((txt, img), axis=1)  # (B, Lt+Li, D)
        for block in self.single_blocks:
            img = run(block, img, vec=e.vec, pe=e.pe)
        return run(self.final_layer, img[:, txt.shape[1] :], e.vec)
