"""FLUX.2 transformer in PyTorch: dev, klein 4B/9B (distilled and base).

Follows black-forest-labs/flux2 `src/flux2/model.py`; only what differs from
FLUX.1 lives here: no biases, SwiGLU MLPs, three modulations shared by all
blocks, 4-D RoPE ids. Twin: `minflux_jax/flux2.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from minflux.configs import Flux2Config
from minflux_torch.layers import (
    DoubleStreamBlockBase,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    Modulation,
    RefKV,
    SingleStreamBlockBase,
    Trunk,
    call_block,
    timestep_embedding,
)


class DoubleStreamBlock(DoubleStreamBlockBase):
    """FLUX.2 double block: modulation comes from the model; separate RoPE for image and text."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__(hidden_size, num_heads, mlp_ratio, Flux2Config, qkv_bias=Flux2Config.bias)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        pe: Tensor,
        pe_ctx: Tensor,
        mod_img,
        mod_txt,
        kv: RefKV | None = None,
    ) -> tuple[Tensor, Tensor]:
        return self.stream(img, txt, torch.cat((pe_ctx, pe), dim=2), mod_img, mod_txt, kv)


class SingleStreamBlock(SingleStreamBlockBase):
    """FLUX.2 single block: SwiGLU MLP, modulation from the model."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__(hidden_size, num_heads, mlp_ratio, Flux2Config)

    def forward(self, x: Tensor, pe: Tensor, mod, kv: RefKV | None = None) -> Tensor:
        return self.stream(x, pe, mod, kv)


class Flux2(Trunk):
    """The FLUX.2 flow transformer on 128-channel patchified latent tokens."""

    def __init__(self, params: Flux2Config):
        super().__init__()
        self.params = params
        d = params.hidden_size
        self.pe_embedder = EmbedND(d // params.num_heads, params.theta, params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, d, bias=params.bias)
        self.time_in = MLPEmbedder(256, d, bias=params.bias)
        self.txt_in = nn.Linear(params.context_in_dim, d, bias=params.bias)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(256, d, bias=params.bias)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(d, params.num_heads, params.mlp_ratio) for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.double_stream_modulation_img = Modulation(d, double=True, bias=params.bias)
        self.double_stream_modulation_txt = Modulation(d, double=True, bias=params.bias)
        self.single_stream_modulation = Modulation(d, double=False, bias=params.bias)
        self.final_layer = LastLayer(d, params.in_channels, bias=params.bias)

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
        self, x, x_ids, timesteps, ctx, ctx_ids, guidance=None, n_ref: int = 0
    ) -> tuple[Tensor, Tensor, dict]:
        """Input projections and the shared modulations; returns img, txt and the blocks' inputs. With n_ref (klein
        KV) the last n_ref tokens of x are reference images, modulated as clean ones (t = 0) at every step."""
        dtype = self.img_in.weight.dtype
        vec = self.time_vec(timesteps, guidance)
        pe_x, pe_ctx = self.pe_embedder(x_ids), self.pe_embedder(ctx_ids)
        mod_img, mod = self.double_stream_modulation_img(vec), self.single_stream_modulation(vec)[0]
        if (
            n_ref
        ):  # per-token modulation: (B, 1, D) for the image tokens, then the references' (diffusers)
            ref_vec = self.time_vec(torch.zeros_like(timesteps), guidance)
            ref_img, ref = (
                self.double_stream_modulation_img(ref_vec),
                self.single_stream_modulation(ref_vec)[0],
            )
            tokens = lambda m, r, n: torch.cat(
                (m.expand(-1, n, -1), r.expand(-1, n_ref, -1)), dim=1
            )
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
            "single": {"pe": torch.cat((pe_ctx, pe_x), dim=2), "mod": mod},
        }
        return self.img_in(x.to(dtype)), self.txt_in(ctx.to(dtype)), kw

    def kv_caches(self, n_ref: int) -> list[RefKV]:
        """Empty klein KV caches, one per block (double blocks first), for `n_ref` reference tokens."""
        return [RefKV(n_ref) for _ in range(len(self.double_blocks) + len(self.single_blocks))]

    def forward(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        guidance: Tensor | None = None,
        kv: list[RefKV] | None = None,
        *,
        run_block=call_block,
    ) -> Tensor:
        """x (B, Li, 128), x_ids (B, Li, 4), timesteps (B,) in [0, 1], ctx (B, Lt, context_in_dim),
        ctx_ids (B, Lt, 4), guidance (B,) -> (B, Li, 128). run_block: the hook that runs each block (see `Trunk`).

        kv (klein KV, from `kv_caches`): empty, the last n_ref tokens of x are reference images that attend only to
        themselves and their keys and values are kept; filled, x holds no references and attends to the kept ones.
        """
        n_ref = kv[0].n_ref if kv is not None and kv[0].k is None else 0
        return self.trunk(
            *self.embed(x, x_ids, timesteps, ctx, ctx_ids, guidance, n_ref), run_block, kv
        )
