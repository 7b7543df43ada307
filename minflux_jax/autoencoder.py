"""The FLUX.1 and FLUX.2 autoencoders in Flax NNX; images are NHWC in [-1, 1].

Follows black-forest-labs/flux `src/flux/modules/autoencoder.py` (FLUX.1, z=16) and
black-forest-labs/flux2 `src/flux2/autoencoder.py` (FLUX.2, z=32): the same
encoder/decoder; FLUX.2 adds 1x1 `quant_conv` / `post_quant_conv` and replaces
FLUX.1's scale/shift by a 2x2 patchify and a frozen BatchNorm. Attribute names are
the official `ae.safetensors` keys; `minflux.keymaps` maps conv kernels
(O,I,kh,kw) <-> (kh,kw,I,O) and norm scales generically. Twin:
`minflux_torch/autoencoder.py` (same classes, order and local names).

Choices, the same in both frameworks:
- `encode` is deterministic: it returns the posterior *mean* (BFL's FLUX.2 and
  `DiagonalGaussian(sample=False)`, diffusers' `latent_dist.mode()`); BFL's FLUX.1
  default samples, which only adds noise of the predicted std.
- the BatchNorm holds only its running statistics (no `num_batches_tracked`, never
  updated by training) and normalises in fp32.
- `tiled_encode` / `tiled_decode` bound memory for large images: overlapping tiles
  on the latent grid, blended linearly across each overlap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from minflux.tiling import ramp, tile_starts

Array = jax.Array

# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def group_norm(channels: int, dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # exact (not fast) variance, as torch; flax's default E[x^2]-E[x]^2 loses digits
    return nnx.GroupNorm(
        channels,
        num_groups=32,
        epsilon=1e-6,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=dtype,
        rngs=rngs,
    )


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """nn.Conv2d's twin (NHWC, kernel (kh, kw, I, O)), with torch's symmetric integer padding."""
    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel_size, kernel_size),
        stride,
        padding=((padding, padding),) * 2,
        dtype=dtype,
        param_dtype=dtype,
        rngs=rngs,
    )


class AttnBlock(nnx.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections (diffusers: linear)."""

    def __init__(self, in_channels: int, *, dtype, rngs: nnx.Rngs):
        self.norm = group_norm(in_channels, dtype, rngs)
        self.q = conv(in_channels, in_channels, 1, 1, 0, dtype, rngs)
        self.k = conv(in_channels, in_channels, 1, 1, 0, dtype, rngs)
        self.v = conv(in_channels, in_channels, 1, 1, 0, dtype, rngs)
        self.proj_out = conv(in_channels, in_channels, 1, 1, 0, dtype, rngs)

    def attention(self, h_: Array) -> Array:
        h_ = self.norm(h_)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, h, w, c = q.shape
        q, k, v = (rearrange(t, "b h w c -> b (h w) 1 c") for t in (q, k, v))
        h_ = jax.nn.dot_product_attention(q, k, v)  # (b, h*w, 1, c), scale 1/sqrt(c)
        return rearrange(h_, "b (h w) 1 c -> b h w c", h=h, w=w)

    def __call__(self, x: Array) -> Array:
        return x + self.proj_out(self.attention(x))


class ResnetBlock(nnx.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1-projected when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, *, dtype, rngs: nnx.Rngs):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels, dtype, rngs)
        self.conv1 = conv(in_channels, out_channels, 3, 1, 1, dtype, rngs)
        self.norm2 = group_norm(out_channels, dtype, rngs)
        self.conv2 = conv(out_channels, out_channels, 3, 1, 1, dtype, rngs)
        if in_channels != out_channels:
            self.nin_shortcut = conv(in_channels, out_channels, 1, 1, 0, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after padding one row and column at the bottom/right (BFL's asymmetric pad)."""

    def __init__(self, in_channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv(in_channels, in_channels, 3, 2, 0, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, in_channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv(in_channels, in_channels, 3, 1, 1, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def mid_block(block_in: int, dtype, rngs: nnx.Rngs) -> nnx.Module:
    """`mid.block_1`, `mid.attn_1`, `mid.block_2` (a bare container, as in BFL)."""
    mid = nnx.Module()
    mid.block_1 = ResnetBlock(block_in, block_in, dtype=dtype, rngs=rngs)
    mid.attn_1 = AttnBlock(block_in, dtype=dtype, rngs=rngs)
    mid.block_2 = ResnetBlock(block_in, block_in, dtype=dtype, rngs=rngs)
    return mid


def run_mid(mid: nnx.Module, h: Array) -> Array:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


# ---------------------------------------------------------------------------------------------
# Encoder and decoder (BFL keeps empty `attn` lists per level; FLUX never fills them, so we omit them)
# ---------------------------------------------------------------------------------------------


class Encoder(nnx.Module):
    """(B, H, W, in_channels) -> moments (B, H/f, W/f, 2*z_channels), f = 2**(len(ch_mult)-1)."""

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        quant_conv: bool = False,
        *,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        if quant_conv:  # FLUX.2
            self.quant_conv = conv(2 * z_channels, 2 * z_channels, 1, 1, 0, dtype, rngs)
        self.conv_in = conv(in_channels, ch, 3, 1, 1, dtype, rngs)
        in_ch_mult = (1, *ch_mult)
        self.down = nnx.List()
        for i_level in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            down = nnx.Module()
            down.block = nnx.List()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, dtype=dtype, rngs=rngs))
                block_in = block_out
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, dtype=dtype, rngs=rngs)
            self.down.append(down)
        self.mid = mid_block(block_in, dtype, rngs)
        self.norm_out = group_norm(block_in, dtype, rngs)
        self.conv_out = conv(block_in, 2 * z_channels, 3, 1, 1, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for block in down.block:
                h = block(h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = run_mid(self.mid, h)
        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return self.quant_conv(h) if hasattr(self, "quant_conv") else h


class Decoder(nnx.Module):
    """(B, h, w, z_channels) -> (B, h*f, w*f, out_ch). `up[i]` is level i, so it runs in reverse order."""

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
        *,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.num_resolutions = len(ch_mult)
        if post_quant_conv:  # FLUX.2
            self.post_quant_conv = conv(z_channels, z_channels, 1, 1, 0, dtype, rngs)
        block_in = ch * ch_mult[-1]
        self.conv_in = conv(z_channels, block_in, 3, 1, 1, dtype, rngs)
        self.mid = mid_block(block_in, dtype, rngs)
        up_levels = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            up = nnx.Module()
            up.block = nnx.List()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, dtype=dtype, rngs=rngs))
                block_in = block_out
            if i_level != 0:
                up.upsample = Upsample(block_in, dtype=dtype, rngs=rngs)
            up_levels.insert(0, up)  # checkpoint order: up.0 is the full-resolution level
        self.up = nnx.List(up_levels)
        self.norm_out = group_norm(block_in, dtype, rngs)
        self.conv_out = conv(block_in, out_ch, 3, 1, 1, dtype, rngs)

    def __call__(self, z: Array) -> Array:
        if hasattr(self, "post_quant_conv"):
            z = self.post_quant_conv(z)
        h = run_mid(self.mid, self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            for block in self.up[i_level].block:
                h = block(h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class BatchNorm(nnx.Module):
    """FLUX.2's latent normaliser: BatchNorm2d(affine=False) in eval mode, as running statistics only."""

    def __init__(self, num_features: int, eps: float, *, dtype):
        self.eps = eps
        self.mean = nnx.BatchStat(
            jnp.zeros(num_features, dtype)
        )  # torch `running_mean` (keymaps.FLAX_NAMES)
        self.var = nnx.BatchStat(jnp.ones(num_features, dtype))

    def stats(self) -> tuple[Array, Array]:
        mean = self.mean[...].astype(jnp.float32)  # (C,), channels last
        return mean, jnp.sqrt(self.var[...].astype(jnp.float32) + self.eps)

    def __call__(self, x: Array) -> Array:  # (B, H, W, C), normalised in fp32
        mean, std = self.stats()
        return ((x.astype(jnp.float32) - mean) / std).astype(x.dtype)

    def inverse(self, z: Array) -> Array:
        mean, std = self.stats()
        return (z.astype(jnp.float32) * std + mean).astype(z.dtype)


# ---------------------------------------------------------------------------------------------
# Tiling: overlapping tiles on the latent grid, blended by linear ramps across each overlap
# ---------------------------------------------------------------------------------------------


def blend_tiles(fn, x: Array, f_in: int, f_out: int, tile: int, overlap: int) -> Array:
    """fn over overlapping tiles of x (NHWC), blended. x has f_in pixels per latent pixel, fn's output f_out."""
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    n_h, n_w = x.shape[1] // f_in, x.shape[2] // f_in  # latent grid
    out, total = None, np.zeros((n_h * f_out, n_w * f_out))
    for y in tile_starts(n_h, tile, overlap):
        for x0 in tile_starts(n_w, tile, overlap):
            h, w = min(tile, n_h), min(tile, n_w)
            # dynamic (not static) slices: one compiled op for every tile position, not one per position
            t = fn(
                jax.lax.dynamic_slice(
                    x, (0, y * f_in, x0 * f_in, 0), (x.shape[0], h * f_in, w * f_in, x.shape[3])
                )
            )
            weight = np.outer(
                ramp(y, h, n_h, overlap, f_out), ramp(x0, w, n_w, overlap, f_out)
            ).astype(np.float32)
            if out is None:
                out = jnp.zeros((t.shape[0], n_h * f_out, n_w * f_out, t.shape[-1]), jnp.float32)
            at = (0, y * f_out, x0 * f_out, 0)
            acc = (
                jax.lax.dynamic_slice(out, at, t.shape) + t.astype(jnp.float32) * weight[:, :, None]
            )
            out = jax.lax.dynamic_update_slice(out, acc, at)
            total[y * f_out : (y + h) * f_out, x0 * f_out : (x0 + w) * f_out] += weight
    return (out / jnp.asarray(total.astype(np.float32))[:, :, None]).astype(t.dtype)


# ---------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------


class AutoEncoder(nnx.Module):
    """FLUX.1 (family "ae1") or FLUX.2 ("ae2") autoencoder: `encode(x)` -> latents, `decode(z)` -> images."""

    def __init__(self, params, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.params = params
        self.dtype = dtype
        self.encoder = Encoder(
            params.resolution,
            params.in_channels,
            params.ch,
            params.ch_mult,
            params.num_res_blocks,
            params.z_channels,
            quant_conv=params.quant_conv,
            dtype=dtype,
            rngs=rngs,
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
            dtype=dtype,
            rngs=rngs,
        )
        self.f = 2 ** (len(params.ch_mult) - 1)  # image pixels per latent pixel
        if params.batch_norm:
            self.ps = params.patch_size
            self.bn = BatchNorm(
                self.ps * self.ps * params.z_channels, eps=params.bn_eps, dtype=dtype
            )

    def normalize(self, mean: Array) -> Array:
        """Posterior mean (B, h, w, z) -> model latents: FLUX.1 scale*(z - shift), FLUX.2 patchify + BatchNorm."""
        if not self.params.batch_norm:
            return self.params.scale_factor * (mean - self.params.shift_factor)
        z = rearrange(
            mean, "b (i pi) (j pj) c -> b i j (c pi pj)", pi=self.ps, pj=self.ps
        )  # (B, h/2, w/2, 4z)
        return self.bn(z)

    def inv_normalize(self, z: Array) -> Array:
        if not self.params.batch_norm:
            return z / self.params.scale_factor + self.params.shift_factor
        return rearrange(
            self.bn.inverse(z), "b i j (c pi pj) -> b (i pi) (j pj) c", pi=self.ps, pj=self.ps
        )

    def check_size(self, height: int, width: int) -> None:
        mult = self.f * (self.ps if self.params.batch_norm else 1)
        if height % mult or width % mult:
            raise ValueError(f"image size {(height, width)} must be a multiple of {mult}")

    def encode_mean(self, x: Array) -> Array:
        """Images (B, H, W, 3) -> posterior mean (B, H/f, W/f, z); the log-variance half is dropped."""
        return jnp.split(self.encoder(x), 2, axis=-1)[0]

    def encode(self, x: Array) -> Array:
        """(B, H, W, 3) in [-1, 1] -> FLUX.1 (B, H/8, W/8, 16) or FLUX.2 (B, H/16, W/16, 128)."""
        self.check_size(*x.shape[1:3])
        return self.normalize(self.encode_mean(x))

    def decode(self, z: Array) -> Array:
        return self.decoder(self.inv_normalize(z))

    def tiled_encode(self, x: Array, tile: int = 64, overlap: int = 16) -> Array:
        """`encode` with bounded memory: tiles of `tile` latent pixels (8x that in the image) sharing `overlap`."""
        self.check_size(*x.shape[1:3])
        return self.normalize(
            blend_tiles(lambda t: _encode_mean(self, t), x, self.f, 1, tile, overlap)
        )

    def tiled_decode(self, z: Array, tile: int = 64, overlap: int = 16) -> Array:
        """`decode` with bounded memory; `tile` and `overlap` in unpatchified latent pixels."""
        return blend_tiles(
            lambda t: _decoder(self, t), self.inv_normalize(z), 1, self.f, tile, overlap
        )

    def __call__(self, x: Array) -> Array:
        return self.decode(self.encode(x))


# One compiled program per tile shape (tiles share a shape, so usually one or two), run tile after tile:
# jitting the whole tiled loop instead would hand XLA every tile at once and lose the memory bound.
@nnx.jit
def _encode_mean(model: AutoEncoder, x: Array) -> Array:
    return model.encode_mean(x)


@nnx.jit
def _decoder(model: AutoEncoder, z: Array) -> Array:
    return model.decoder(z)
