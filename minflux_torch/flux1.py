"""FLUX.1 transformer in PyTorch: dev, schnell, Kontext, Krea, Fill/Canny/Depth.

Follows black-forest-labs/flux `src/flux/model.py` and `src/flux/modules/layers.py`;
only what differs from FLUX.2 lives here (layers.py has the rest).
Twin: `minflux_jax/flux1.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minflux.configs import FluxConfig
from minflux_torch.layers import (
    BlockRunner,
    DoubleStreamBlockBase,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    Modulation,
    SingleStreamBlockBase,
    call_block,
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
    ):
        super().__init__(
            hidden_size, num_heads, mlp_ratio, qkv_bias=qkv_bias, bias=bias, gated_mlp=gated_mlp
        )
        self.img_mod = Modulation(hidden_size, double=True, bias=bias)
        self.txt_mod = Modulation(hidden_size, double=True, bias=bias)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        img, txt, _ = self.stream(img, txt, pe, self.img_mod(vec), self.txt_mod(vec))
        return img, txt


class SingleStreamBlock(SingleStreamBlockBase):
    """FLUX.1 single block: its own `modulation`."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, *, bias: bool, gated_mlp: bool
    ):
        super().__init__(hidden_size, num_heads, mlp_ratio, bias=bias, gated_mlp=gated_mlp)
        self.modulation = Modulation(hidden_size, double=False, bias=bias)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        mod, _ = self.modulation(vec)
        x, _ = self.stream(x, pe, mod)
        return x


@dataclass(frozen=True)
class FluxEmbeds:
    """What `Flux.embed` hands the blocks."""

    img: Tensor  # (B, Li, D) image tokens
    txt: Tensor  # (B, Lt, D) text tokens
    vec: Tensor  # (B, D) time, guidance and pooled text: every modulation's input
    pe: Tensor  # (B, 1, Lt+Li, D/H/2, 2, 2) RoPE of the joint [txt, img] sequence


class Flux(nn.Module):
    """The FLUX.1 flow transformer on packed 2x2 latent tokens."""

    def __init__(self, params: FluxConfig):
        super().__init__()
        self.params = params
        d, bias, gated = params.hidden_size, params.bias, params.gated_mlp
        self.pe_embedder = EmbedND(d // params.num_heads, params.theta, params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, d, bias=bias)
        self.time_in = MLPEmbedder(256, d, bias=bias)
        self.vector_in = MLPEmbedder(params.vec_in_dim, d, bias=bias)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(256, d, bias=bias)
        self.txt_in = nn.Linear(params.context_in_dim, d, bias=bias)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(
                d,
                params.num_heads,
                params.mlp_ratio,
                qkv_bias=params.qkv_bias,
                bias=bias,
                gated_mlp=gated,
            )
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, params.num_heads, params.mlp_ratio, bias=bias, gated_mlp=gated)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(d, params.out_channels, bias=bias)

    def embed(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
    ) -> FluxEmbeds:
        """Input projections, the conditioning vector and RoPE (arguments as `forward`'s)."""
        dtype = self.img_in.weight.dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError(
                    "this FLUX.1 model is guidance-distilled: pass guidance=(B,) values"
                )
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        return FluxEmbeds(
            img=self.img_in(img.to(dtype)),
            txt=self.txt_in(txt.to(dtype)),
            vec=vec,
            pe=self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)),
        )

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        *,
        run: BlockRunner = call_block,
    ) -> Tensor:
        """img (B, Li, in_channels), img_ids (B, Li, 3), txt (B, Lt, 4096), txt_ids (B, Lt, 3),
        timesteps (B,) in [0, 1], y (B, 768), guidance (B,) -> (B, Li, out_channels).
        run: how each block and the final layer is called (`layers.BlockRunner`)."""
        e = self.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        img, txt = e.img, e.txt
        for block in self.double_blocks:
            img, txt = run(block, img=img, txt=txt, vec=e.vec, pe=e.pe)
        img = torch.cat((txt, img), dim=1)  # (B, Lt+Li, D)
        for block in self.single_blocks:
            img = run(block, img, vec=e.vec, pe=e.pe)
        return run(self.final_layer, img[:, txt.shape[1] :], e.vec)
