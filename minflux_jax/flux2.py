"""FLUX.2 transformer in Flax NNX: dev, klein 4B/9B (distilled and base).

Follows black-forest-labs/flux2 `src/flux2/model.py`; only what differs from
FLUX.1 lives here: no biases, SwiGLU MLPs, three modulations shared by all
blocks, 4-D RoPE ids. Twin: `minflux_torch/flux2.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from minflux.configs import Flux2Config
from minflux_jax.layers import (
    Array,
    BlockRunner,
    DoubleStreamBlockBase,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    Mod,
    Modulation,
    RefKV,
    SingleStreamBlockBase,
    call_block,
    linear,
    timestep_embedding,
)


class DoubleStreamBlock(DoubleStreamBlockBase):
    """FLUX.2 double block: modulation comes from the model; separate RoPE for image and text."""

    def __call__(
        self,
        img: Array,
        txt: Array,
        pe: Array,
        pe_ctx: Array,
        mod_img: tuple[Mod, Mod],
        mod_txt: tuple[Mod, Mod],
    ) -> tuple[Array, Array]:
        img, txt, _ = self.stream(img, txt, jnp.concatenate((pe_ctx, pe), axis=2), mod_img, mod_txt)
        return img, txt

    def forward_kv(
        self,
        img: Array,
        txt: Array,
        pe: Array,
        pe_ctx: Array,
        mod_img: tuple[Mod, Mod],
        mod_txt: tuple[Mod, Mod],
        kv: RefKV | int,
    ) -> tuple[Array, Array, RefKV]:
        """`__call__` with klein KV (`layers.attention_kv`): also returns the block's reference keys and values."""
        return self.stream(img, txt, jnp.concatenate((pe_ctx, pe), axis=2), mod_img, mod_txt, kv)


class SingleStreamBlock(SingleStreamBlockBase):
    """FLUX.2 single block: modulation from the model."""

    def __call__(self, x: Array, pe: Array, mod: Mod) -> Array:
        x, _ = self.stream(x, pe, mod)
        return x

    def forward_kv(self, x: Array, pe: Array, mod: Mod, kv: RefKV | int) -> tuple[Array, RefKV]:
        """`__call__` with klein KV (`layers.attention_kv`): also returns the block's reference keys and values."""
        return self.stream(x, pe, mod, kv)


@dataclass(frozen=True)
class Flux2Embeds:
    """What `Flux2.embed` hands the blocks: tokens, RoPE, and the three modulations every block shares."""

    img: Array  # (B, Li, D) image tokens
    txt: Array  # (B, Lt, D) text tokens
    vec: Array  # (B, D) time (and guidance): the final layer's modulation input
    pe_x: Array  # (B, 1, Li, D/H/2, 2, 2) RoPE of the image tokens (double blocks)
    pe_ctx: Array  # (B, 1, Lt, D/H/2, 2, 2) RoPE of the text tokens (double blocks)
    pe: Array  # (B, 1, Lt+Li, D/H/2, 2, 2) RoPE of the joint [txt, img] sequence (single blocks)
    mod_img: tuple[Mod, Mod]  # double blocks, image stream: attention's then the MLP's
    mod_txt: tuple[Mod, Mod]  # double blocks, text stream
    mod: Mod  # single blocks


def per_token(mod: Mod, ref: Mod, n: int, n_ref: int) -> Mod:
    """klein KV's modulation of a sequence whose last n_ref tokens are references: `mod` for the first n
    tokens, `ref` (at t = 0) for the references, as diffusers does; each (B, 1, D) -> (B, n + n_ref, D)."""
    out = []
    for m, r in zip(mod, ref, strict=True):
        b, _, d = m.shape
        out.append(
            jnp.concatenate(
                (jnp.broadcast_to(m, (b, n, d)), jnp.broadcast_to(r, (b, n_ref, d))), axis=1
            )
        )
    return tuple(out)


class Flux2(nnx.Module):
    """The FLUX.2 flow transformer on 128-channel patchified latent tokens."""

    def __init__(self, params: Flux2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.params = params
        self.dtype = dtype
        d, bias, gated = params.hidden_size, params.bias, params.gated_mlp
        self.pe_embedder = EmbedND(d // params.num_heads, params.theta, params.axes_dim)
        self.img_in = linear(params.in_channels, d, bias, dtype, rngs)
        self.time_in = MLPEmbedder(256, d, bias=bias, dtype=dtype, rngs=rngs)
        self.txt_in = linear(params.context_in_dim, d, bias, dtype, rngs)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(256, d, bias=bias, dtype=dtype, rngs=rngs)
        self.double_blocks = nnx.List(
            DoubleStreamBlock(
                d,
                params.num_heads,
                params.mlp_ratio,
                qkv_bias=bias,
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
        self.double_stream_modulation_img = Modulation(
            d, double=True, bias=bias, dtype=dtype, rngs=rngs
        )
        self.double_stream_modulation_txt = Modulation(
            d, double=True, bias=bias, dtype=dtype, rngs=rngs
        )
        self.single_stream_modulation = Modulation(
            d, double=False, bias=bias, dtype=dtype, rngs=rngs
        )
        self.final_layer = LastLayer(d, params.in_channels, bias=bias, dtype=dtype, rngs=rngs)

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
        self,
        x: Array,
        x_ids: Array,
        timesteps: Array,
        ctx: Array,
        ctx_ids: Array,
        guidance: Array | None = None,
        n_ref: int = 0,
    ) -> Flux2Embeds:
        """Input projections, RoPE and the shared modulations (arguments as `__call__`'s). With n_ref (klein KV)
        the last n_ref tokens of x are reference images, modulated as clean ones (t = 0) at every step."""
        dtype = self.dtype
        vec = self.time_vec(timesteps, guidance)
        mod_img = self.double_stream_modulation_img(vec)
        mod, _ = self.single_stream_modulation(vec)
        if n_ref:  # klein KV: the image tokens' modulations per token, the references' at t = 0
            ref_vec = self.time_vec(jnp.zeros_like(timesteps), guidance)
            ref_img = self.double_stream_modulation_img(ref_vec)
            ref, _ = self.single_stream_modulation(ref_vec)
            n_img = x.shape[1] - n_ref
            mod_img = tuple(
                per_token(m, r, n_img, n_ref) for m, r in zip(mod_img, ref_img, strict=True)
            )
            mod = per_token(mod, ref, ctx.shape[1] + n_img, n_ref)
        pe_x, pe_ctx = self.pe_embedder(x_ids), self.pe_embedder(ctx_ids)
        return Flux2Embeds(
            img=self.img_in(x.astype(dtype)),
            txt=self.txt_in(ctx.astype(dtype)),
            vec=vec,
            pe_x=pe_x,
            pe_ctx=pe_ctx,
            pe=jnp.concatenate((pe_ctx, pe_x), axis=2),
            mod_img=mod_img,
            mod_txt=self.double_stream_modulation_txt(vec),
            mod=mod,
        )

    def __call__(
        self,
        x: Array,
        x_ids: Array,
        timesteps: Array,
        ctx: Array,
        ctx_ids: Array,
        guidance: Array | None = None,
        *,
        run: BlockRunner = call_block,
    ) -> Array:
        """x (B, Li, 128), x_ids (B, Li, 4), timesteps (B,) in [0, 1], ctx (B, Lt, context_in_dim),
        ctx_ids (B, Lt, 4), guidance (B,) -> (B, Li, 128).
        run: how each block and the final layer is called (`layers.BlockRunner`)."""
        e = self.embed(x, x_ids, timesteps, ctx, ctx_ids, guidance)
        img, txt = e.img, e.txt
        for block in self.double_blocks:
            img, txt = run(
                block,
                img=img,
                txt=txt,
                pe=e.pe_x,
                pe_ctx=e.pe_ctx,
                mod_img=e.mod_img,
                mod_txt=e.mod_txt,
            )
        img = jnp.concatenate((txt, img), axis=1)  # (B, Lt+Li, D)
        for block in self.single_blocks:
            img = run(block, img, pe=e.pe, mod=e.mod)
        return run(self.final_layer, img[:, txt.shape[1] :], e.vec)

    # -----------------------------------------------------------------------------------------
    # FLUX.2 klein KV: the reference tokens' keys and values computed on the first step only
    # -----------------------------------------------------------------------------------------

    def forward_kv(
        self,
        x: Array,
        x_ids: Array,
        timesteps: Array,
        ctx: Array,
        ctx_ids: Array,
        n_ref: int,
        *,
        run: BlockRunner = call_block,
    ) -> tuple[Array, list[RefKV]]:
        """klein KV, first step: `__call__` where the last n_ref tokens of x are reference images, which attend
        only to themselves and are modulated at t = 0 (diffusers `kv_cache_mode="extract"`). Returns the output
        (B, Li, 128), references included, and their keys and values, one RefKV per block (double blocks first),
        for `forward_cached`. run: as `forward`'s, called with each block's `forward_kv`."""
        e = self.embed(x, x_ids, timesteps, ctx, ctx_ids, n_ref=n_ref)
        n = len(self.double_blocks) + len(self.single_blocks)
        return self._blocks_kv(e, [n_ref] * n, run)

    def forward_cached(
        self,
        x: Array,
        x_ids: Array,
        timesteps: Array,
        ctx: Array,
        ctx_ids: Array,
        cache: list[RefKV],
        *,
        run: BlockRunner = call_block,
    ) -> Array:
        """klein KV, later steps: `__call__` on x without the references, every block also attending to their
        keys and values in `cache` (from `forward_kv`; diffusers `kv_cache_mode="cached"`). run: as `forward_kv`'s."""
        out, _ = self._blocks_kv(self.embed(x, x_ids, timesteps, ctx, ctx_ids), cache, run)
        return out

    def _blocks_kv(self, e: Flux2Embeds, kv: list, run: BlockRunner) -> tuple[Array, list[RefKV]]:
        """`__call__`'s loops through the blocks' `forward_kv`, one `kv` each: the output and the new caches."""
        img, txt, cache, n = e.img, e.txt, [], len(self.double_blocks)
        for block, block_kv in zip(self.double_blocks, kv[:n], strict=True):
            img, txt, block_kv = run(
                block.forward_kv,
                img=img,
                txt=txt,
                pe=e.pe_x,
                pe_ctx=e.pe_ctx,
                mod_img=e.mod_img,
                mod_txt=e.mod_txt,
                kv=block_kv,
            )
            cache.append(block_kv)
        img = jnp.concatenate((txt, img), axis=1)  # (B, Lt+Li, D)
        for block, block_kv in zip(self.single_blocks, kv[n:], strict=True):
            img, block_kv = run(block.forward_kv, img, pe=e.pe, mod=e.mod, kv=block_kv)
            cache.append(block_kv)
        return run(self.final_layer, img[:, txt.shape[1] :], e.vec), cache
