"""FLUX.1 transformer in PyTorch: dev, schnell, Kontext, Krea, Fill/Canny/Depth.

Follows black-forest-labs/flux `src/flux/model.py` and `src/flux/modules/layers.py`;
only what differs from FLUX.2 lives here (layers.py has the rest).
Twin: `minflux_jax/flux1.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from minflux.configs import FluxConfig
from minflux_torch.layers import (
    DoubleStreamBlockBase,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    Modulation,
    SingleStreamBlockBase,
    Trunk,
    call_block,
    timestep_embedding,
)


class DoubleStreamBlock(DoubleStreamBlockBase):
    """FLUX.1 double block: each stream owns its modulation (`img_mod`, `txt_mod`)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__(hidden_size, num_heads, mlp_ratio, FluxConfig, qkv_bias)
        self.img_mod = Modulation(hidden_size, double=True)
        self.txt_mod = Modulation(hidden_size, double=True)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        return self.stream(img, txt, pe, self.img_mod(vec), self.txt_mod(vec))


class SingleStreamBlock(SingleStreamBlockBase):
    """FLUX.1 single block: GELU(tanh) MLP, its own `modulation`."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__(hidden_size, num_heads, mlp_ratio, FluxConfig)
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        mod, _ = self.modulation(vec)
        return self.stream(x, pe, mod)


class Flux(Trunk):
    """The FLUX.1 flow transformer on packed 2x2 latent tokens."""

    def __init__(self, params: FluxConfig):
        super().__init__()
        self.params = params
        d = params.hidden_size
        self.pe_embedder = EmbedND(d // params.num_heads, params.theta, params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, d)
        self.time_in = MLPEmbedder(256, d)
        self.vector_in = MLPEmbedder(params.vec_in_dim, d)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(256, d)
        self.txt_in = nn.Linear(params.context_in_dim, d)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(d, params.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(d, params.out_channels)

    def embed(
        self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None
    ) -> tuple[Tensor, Tensor, dict]:
        """Input projections; returns img, txt and the blocks' keyword arguments."""
        dtype = self.img_in.weight.dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError(
                    "this FLUX.1 model is guidance-distilled: pass guidance=(B,) values"
                )
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))  # ids of [txt, img]
        kw = {"vec": vec, "pe": pe}
        return (
            self.img_in(img.to(dtype)),
            self.txt_in(txt.to(dtype)),
            {"vec": vec, "double": kw, "single": kw},
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
        run_block=call_block,
    ) -> Tensor:
        """img (B, Li, in_channels), img_ids (B, Li, 3), txt (B, Lt, 4096), txt_ids (B, Lt, 3),
        timesteps (B,) in [0, 1], y (B, 768), guidance (B,) -> (B, Li, out_channels).
        run_block: the hook that runs each block (see `Trunk`)."""
        return self.trunk(
            *self.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance), run_block
        )
