"""FLUX.2 transformer in PyTorch: dev, klein 4B/9B (distilled and base).

Follows black-forest-labs/flux2 `src/flux2/model.py`; only what differs from
FLUX.1 lives here: no biases, SwiGLU MLPs, three modulations shared by all
blocks, 4-D RoPE ids. Twin: `minflux_jax/flux2.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minflux.configs import Flux2Config
from minflux_torch.layers import (
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
    timestep_embedding,
)


class DoubleStreamBlock(DoubleStreamBlockBase):
    """FLUX.2 double block: modulation comes from the model; separate RoPE for image and text."""

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        pe: Tensor,
        pe_ctx: Tensor,
        mod_img: tuple[Mod, Mod],
        mod_txt: tuple[Mod, Mod],
    ) -> tuple[Tensor, Tensor]:
        img, txt, _ = self.stream(img, txt, torch.cat((pe_ctx, pe), dim=2), mod_img, mod_txt)
        return img, txt

    def forward_kv(
        self,
        img: Tensor,
        txt: Tensor,
        pe: Tensor,
        pe_ctx: Tensor,
        mod_img: tuple[Mod, Mod],
        mod_txt: tuple[Mod, Mod],
        kv: RefKV | int,
    ) -> tuple[Tensor, Tensor, RefKV]:
        """`forward` with klein KV (`layers.attention_kv`): also returns the block's reference keys and values."""
        return self.stream(img, txt, torch.cat((pe_ctx, pe), dim=2), mod_img, mod_txt, kv)


class SingleStreamBlock(SingleStreamBlockBase):
    """FLUX.2 single block: modulation from the model."""

    def forward(self, x: Tensor, pe: Tensor, mod: Mod) -> Tensor:
        x, _ = self.stream(x, pe, mod)
        return x

    def forward_kv(self, x: Tensor, pe: Tensor, mod: Mod, kv: RefKV | int) -> tuple[Tensor, RefKV]:
        """`forward` with klein KV (`layers.attention_kv`): also returns the block's reference keys and values."""
        return self.stream(x, pe, mod, kv)


@dataclass(frozen=True)
class Flux2Embeds:
    """What `Flux2.embed` hands the blocks: tokens, RoPE, and the three modulations every block shares."""

    img: Tensor  # (B, Li, D) image tokens
    txt: Tensor  # (B, Lt, D) text tokens
    vec: Tensor  # (B, D) time (and guidance): the final layer's modulation input
    pe_x: Tensor  # (B, 1, Li, D/H/2, 2, 2) RoPE of the image tokens (double blocks)
    pe_ctx: Tensor  # (B, 1, Lt, D/H/2, 2, 2) RoPE of the text tokens (double blocks)
    pe: Tensor  # (B, 1, Lt+Li, D/H/2, 2, 2) RoPE of the joint [txt, img] sequence (single blocks)
    mod_img: tuple[Mod, Mod]  # double blocks, image stream: attention's then the MLP's
    mod_txt: tuple[Mod, Mod]  # double blocks, text stream
    mod: Mod  # single blocks


def per_token(mod: Mod, ref: Mod, n: int, n_ref: int) -> Mod:
    """klein KV's modulation of a sequence whose last n_ref tokens are references: `mod` for the first n
    tokens, `ref` (at t = 0) for the references, as diffusers does; each (B, 1, D) -> (B, n + n_ref, D)."""
    out = []
    for m, r in zip(mod, ref, strict=True):
        b, _, d = m.shape
        out.append(torch.cat((m.expand(b, n, d), r.expand(b, n_ref, d)), dim=1))
    return tuple(out)


class Flux2(nn.Module):
    """The FLUX.2 flow transformer on 128-channel patchified latent tokens."""

    def __init__(self, params: Flux2Config):
        super().__init__()
        self.params = params
        d, bias, gated = params.hidden_size, params.bias, params.gated_mlp
        self.pe_embedder = EmbedND(d // params.num_heads, params.theta, params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, d, bias=bias)
        self.time_in = MLPEmbedder(256, d, bias=bias)
        self.txt_in = nn.Linear(params.context_in_dim, d, bias=bias)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(256, d, bias=bias)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(
                d, params.num_heads, params.mlp_ratio, qkv_bias=bias, bias=bias, gated_mlp=gated
            )
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, params.num_heads, params.mlp_ratio, bias=bias, gated_mlp=gated)
            for _ in range(params.depth_single_blocks)
        )
        self.double_stream_modulation_img = Modulation(d, double=True, bias=bias)
        self.double_stream_modulation_txt = Modulation(d, double=True, bias=bias)
        self.single_stream_modulation = Modulation(d, double=False, bias=bias)
        self.final_layer = LastLayer(d, params.in_channels, bias=bias)

    def time_vec(self, timesteps: Tensor, guidance: Tensor | None) -> Tensor:
        """The time (and guidance) embedding every modulation reads: (B,) -> (B, hidden)."""
        dtype = self.img_in.weight.dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError(
                    "this FLUX.2 model is guidance-distilled: pass guidance=(B,) values"
                )
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        return vec

    def embed(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        guidance: Tensor | None = None,
        n_ref: int = 0,
    ) -> Flux2Embeds:
        """Input projections, RoPE and the shared modulations (arguments as `forward`'s). With n_ref (klein KV)
        the last n_ref tokens of x are reference images, modulated as clean ones (t = 0) at every step."""
        dtype = self.img_in.weight.dtype
        vec = self.time_vec(timesteps, guidance)
        mod_img = self.double_stream_modulation_img(vec)
        mod, _ = self.single_stream_modulation(vec)
        if n_ref:  # klein KV: the image tokens' modulations per token, the references' at t = 0
            ref_vec = self.time_vec(torch.zeros_like(timesteps), guidance)
            ref_img = self.double_stream_modulation_img(ref_vec)
            ref, _ = self.single_stream_modulation(ref_vec)
            n_img = x.shape[1] - n_ref
            mod_img = tuple(
                per_token(m, r, n_img, n_ref) for m, r in zip(mod_img, ref_img, strict=True)
            )
            mod = per_token(mod, ref, ctx.shape[1] + n_img, n_ref)
        pe_x, pe_ctx = self.pe_embedder(x_ids), self.pe_embedder(ctx_ids)
        return Flux2Embeds(
            img=self.img_in(x.to(dtype)),
            txt=self.txt_in(ctx.to(dtype)),
            vec=vec,
            pe_x=pe_x,
            pe_ctx=pe_ctx,
            pe=torch.cat((pe_ctx, pe_x), dim=2),
            mod_img=mod_img,
            mod_txt=self.double_stream_modulation_txt(vec),
            mod=mod,
        )

    def forward(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        guidance: Tensor | None = None,
        *,
        run: BlockRunner = call_block,
    ) -> Tensor:
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
        img = torch.cat((txt, img), dim=1)  # (B, Lt+Li, D)
        for block in self.single_blocks:
            img = run(block, img, pe=e.pe, mod=e.mod)
        return run(self.final_layer, img[:, txt.shape[1] :], e.vec)

    # -----------------------------------------------------------------------------------------
    # FLUX.2 klein KV: the reference tokens' keys and values computed on the first step only
    # -----------------------------------------------------------------------------------------

    def forward_kv(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        n_ref: int,
        *,
        run: BlockRunner = call_block,
    ) -> tuple[Tensor, list[RefKV]]:
        """klein KV, first step: `forward` where the last n_ref tokens of x are reference images, which attend
        only to themselves and are modulated at t = 0 (diffusers `kv_cache_mode="extract"`). Returns the output
        (B, Li, 128), references included, and their keys and values, one RefKV per block (double blocks first),
        for `forward_cached`. run: as `forward`'s, called with each block's `forward_kv`."""
        e = self.embed(x, x_ids, timesteps, ctx, ctx_ids, n_ref=n_ref)
        n = len(self.double_blocks) + len(self.single_blocks)
        return self._blocks_kv(e, [n_ref] * n, run)

    def forward_cached(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        cache: list[RefKV],
        *,
        run: BlockRunner = call_block,
    ) -> Tensor:
        """klein KV, later steps: `forward` on x without the references, every block also attending to their
        keys and values in `cache` (from `forward_kv`; diffusers `kv_cache_mode="cached"`). run: as `forward_kv`'s."""
        out, _ = self._blocks_kv(self.embed(x, x_ids, timesteps, ctx, ctx_ids), cache, run)
        return out

    def _blocks_kv(self, e: Flux2Embeds, kv: list, run: BlockRunner) -> tuple[Tensor, list[RefKV]]:
        """`forward`'s loops through the blocks' `forward_kv`, one `kv` each: the output and the new caches."""
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
        img = torch.cat((txt, img), dim=1)  # (B, Lt+Li, D)
        for block, block_kv in zip(self.single_blocks, kv[n:], strict=True):
            img, block_kv = run(block.forward_kv, img, pe=e.pe, mod=e.mod, kv=block_kv)
            cache.append(block_kv)
        return run(self.final_layer, img[:, txt.shape[1] :], e.vec), cache
