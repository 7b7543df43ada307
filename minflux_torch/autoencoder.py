"""The FLUX.1 and FLUX.2 autoencoders in PyTorch; images are NCHW in [-1, 1].

Follows black-forest-labs/flux `src/flux/modules/autoencoder.py` (FLUX.1, z=16) and
black-forest-labs/flux2 `src/flux2/autoencoder.py` (FLUX.2, z=32): the same
encoder/decoder; FLUX.2 adds 1x1 `quant_conv` / `post_quant_conv` and replaces
FLUX.1's scale/shift by a 2x2 patchify and a frozen BatchNorm. Attribute names are
the official `ae.safetensors` keys. Twin: `minflux_jax/autoencoder.py`.

Choices, the same in both frameworks:
- `encode` is deterministic: it returns the posterior *mean* (BFL's FLUX.2 and
  `DiagonalGaussian(sample=False)`, diffusers' `latent_dist.mode()`); BFL's FLUX.1
  default samples, which only adds noise of the predicted std.
- the BatchNorm holds only its running statistics (no `num_batches_tracked`, never
  updated by `train()`) and normalises in fp32.
- `tiled_encode` / `tiled_decode` bound memory for large images: overlapping tiles
  on the latent grid, blended linearly across each overlap.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from minflux.tiling import ramp, tile_starts

# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections (diffusers: linear)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = group_norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def attention(self, h_: Tensor) -> Tensor:
        h_ = self.norm(h_)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q, k, v = (rearrange(t, "b c h w -> b 1 (h w) c") for t in (q, k, v))
        h_ = nn.functional.scaled_dot_product_attention(q, k, v)  # (b, 1, h*w, c), scale 1/sqrt(c)
        return rearrange(h_, "b 1 (h w) c -> b c h w", h=h, w=w)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj_out(self.attention(x))


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1-projected when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(
                in_channels, out_channels, kernel_size=1, stride=1, padding=0
            )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one row and column at the bottom/right (BFL's asymmetric pad)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(block_in: int) -> nn.Module:
    """`mid.block_1`, `mid.attn_1`, `mid.block_2` (a bare container, as in BFL)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(block_in, block_in)
    mid.attn_1 = AttnBlock(block_in)
    mid.block_2 = ResnetBlock(block_in, block_in)
    return mid


def run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


# ---------------------------------------------------------------------------------------------
# Encoder and decoder (BFL keeps empty `attn` lists per level; FLUX never fills them, so we omit them)
# ---------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f), f = 2**(len(ch_mult)-1)."""

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        quant_conv: bool = False,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        if quant_conv:  # FLUX.2
            self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, kernel_size=1)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = mid_block(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for block in down.block:
                h = block(h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = run_mid(self.mid, h)
        h = self.conv_out(nn.functional.silu(self.norm_out(h)))
        return self.quant_conv(h) if hasattr(self, "quant_conv") else h


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h*f, w*f). `up[i]` is level i, so it runs in reverse order."""

    def __init__(
        self,
        ch: int,
        out_ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        in_channels: int,
        resolution: int,
        z_channels: int,
        post_quant_conv: bool = False,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        if post_quant_conv:  # FLUX.2
            self.post_quant_conv = nn.Conv2d(z_channels, z_channels, kernel_size=1)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = mid_block(block_in)
        up_levels = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            if i_level != 0:
                up.upsample = Upsample(block_in)
            up_levels.insert(0, up)  # checkpoint order: up.0 is the full-resolution level
        self.up = nn.ModuleList(up_levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        if hasattr(self, "post_quant_conv"):
            z = self.post_quant_conv(z)
        h = run_mid(self.mid, self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            for block in self.up[i_level].block:
                h = block(h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


class BatchNorm(nn.Module):
    """FLUX.2's latent normaliser: BatchNorm2d(affine=False) in eval mode, as running statistics only."""

    def __init__(self, num_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def stats(self) -> tuple[Tensor, Tensor]:
        mean = self.running_mean.float()[:, None, None]  # (C, 1, 1)
        return mean, torch.sqrt(self.running_var.float()[:, None, None] + self.eps)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W), normalised in fp32
        mean, std = self.stats()
        return ((x.float() - mean) / std).to(x.dtype)

    def inverse(self, z: Tensor) -> Tensor:
        mean, std = self.stats()
        return (z.float() * std + mean).to(z.dtype)


# ---------------------------------------------------------------------------------------------
# Tiling: overlapping tiles on the latent grid, blended by linear ramps across each overlap
# ---------------------------------------------------------------------------------------------


def blend_tiles(fn, x: Tensor, f_in: int, f_out: int, tile: int, overlap: int) -> Tensor:
    """fn over overlapping tiles of x (NCHW), blended. x has f_in pixels per latent pixel, fn's output f_out."""
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    n_h, n_w = x.shape[-2] // f_in, x.shape[-1] // f_in  # latent grid
    out, total = None, np.zeros((n_h * f_out, n_w * f_out))
    for y in tile_starts(n_h, tile, overlap):
        for x0 in tile_starts(n_w, tile, overlap):
            h, w = min(tile, n_h), min(tile, n_w)
            t = fn(x[..., y * f_in : (y + h) * f_in, x0 * f_in : (x0 + w) * f_in])
            weight = np.outer(
                ramp(y, h, n_h, overlap, f_out), ramp(x0, w, n_w, overlap, f_out)
            ).astype(np.float32)
            if out is None:
                out = torch.zeros(
                    (*t.shape[:-2], n_h * f_out, n_w * f_out), dtype=torch.float32, device=t.device
                )
            out[..., y * f_out : (y + h) * f_out, x0 * f_out : (x0 + w) * f_out] += (
                t.float() * torch.from_numpy(weight).to(t.device)
            )
            total[y * f_out : (y + h) * f_out, x0 * f_out : (x0 + w) * f_out] += weight
    return (out / torch.from_numpy(total.astype(np.float32)).to(out.device)).to(t.dtype)


# ---------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------


class AutoEncoder(nn.Module):
    """FLUX.1 (family "ae1") or FLUX.2 ("ae2") autoencoder: `encode(x)` -> latents, `decode(z)` -> images."""

    def __init__(self, params):
        super().__init__()
        self.params = params
        self.encoder = Encoder(
            params.resolution,
            params.in_channels,
            params.ch,
            params.ch_mult,
            params.num_res_blocks,
            params.z_channels,
            quant_conv=params.quant_conv,
        )
        self.decoder = Decoder(
            params.ch,
            params.out_ch,
            params.ch_mult,
            params.num_res_blocks,
            params.in_channels,
            params.resolution,
            params.z_channels,
            post_quant_conv=params.quant_conv,
        )
        self.f = 2 ** (len(params.ch_mult) - 1)  # image pixels per latent pixel
        if params.batch_norm:
            self.ps = params.patch_size
            self.bn = BatchNorm(self.ps * self.ps * params.z_channels, eps=params.bn_eps)

    def normalize(self, mean: Tensor) -> Tensor:
        """Posterior mean (B, z, h, w) -> model latents: FLUX.1 scale*(z - shift), FLUX.2 patchify + BatchNorm."""
        if not self.params.batch_norm:
            return self.params.scale_factor * (mean - self.params.shift_factor)
        z = rearrange(
            mean, "b c (i pi) (j pj) -> b (c pi pj) i j", pi=self.ps, pj=self.ps
        )  # (B, 4z, h/2, w/2)
        return self.bn(z)

    def inv_normalize(self, z: Tensor) -> Tensor:
        if not self.params.batch_norm:
            return z / self.params.scale_factor + self.params.shift_factor
        return rearrange(
            self.bn.inverse(z), "b (c pi pj) i j -> b c (i pi) (j pj)", pi=self.ps, pj=self.ps
        )

    def check_size(self, height: int, width: int) -> None:
        mult = self.f * (self.ps if self.params.batch_norm else 1)
        if height % mult or width % mult:
            raise ValueError(f"image size {(height, width)} must be a multiple of {mult}")

    def encode_mean(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> posterior mean (B, z, H/f, W/f); the log-variance half is dropped."""
        return self.encoder(x).chunk(2, dim=1)[0]

    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> FLUX.1 (B, 16, H/8, W/8) or FLUX.2 (B, 128, H/16, W/16)."""
        self.check_size(*x.shape[-2:])
        return self.normalize(self.encode_mean(x))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.inv_normalize(z))

    def tiled_encode(self, x: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """`encode` with bounded memory: tiles of `tile` latent pixels (8x that in the image) sharing `overlap`."""
        self.check_size(*x.shape[-2:])
        return self.normalize(blend_tiles(self.encode_mean, x, self.f, 1, tile, overlap))

    def tiled_decode(self, z: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """`decode` with bounded memory; `tile` and `overlap` in unpatchified latent pixels."""
        return blend_tiles(self.decoder, self.inv_normalize(z), 1, self.f, tile, overlap)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
