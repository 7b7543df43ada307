"""Inpainting masks: which latents (FLUX.1) or tokens (FLUX.2) a pixel mask repaints, and by how much (numpy).

The rule both frameworks' `sampling.inpaint_mask` follow, written once in numpy for the checks made before a model
loads (`minflux generate` refuses a mask that repaints nothing) and for counting. A pixel mask is (H, W) or
(H, W, 1) in [0, 1], 1 = repaint. One unit of the blend is a latent of `factor` pixels (FLUX.1; its tokens pack 2 x 2
latents) or a token of 2 x `factor` pixels (FLUX.2), `factor` being the autoencoder's downsampling (8; 2 for the
tiny test autoencoders). Two modes (`MODES`):

- "max" (the default): a unit is repainted as much as the most repainted pixel of its patch (max-pooling), so a
  stroke thinner than a patch still repaints it, and soft masks keep their fractional values. stable-diffusion.cpp
  made this fix after users found thin strokes ignored.
- "center": as diffusers' inpainting pipelines, for exact agreement with them: binarised at 0.5, then FLUX.1
  (`FluxInpaintPipeline`) samples one pixel per latent (its top-left one), FLUX.2 (`Flux2KleinInpaintPipeline`)
  resizes bilinearly to the token grid (the mean of the 2 x 2 pixels at each token's centre). A 1-4 pixel stroke
  or a 6 x 6 dot usually falls between the sampled pixels and repaints nothing.
"""

from __future__ import annotations

import numpy as np

from minflux.family import Family

MODES = ("max", "center")


def unit(spec: Family, factor: int) -> int:
    """Pixels per side of one blend unit: a latent (FLUX.1) or a token (FLUX.2)."""
    return 2 * factor // spec.latent_patch


def weights(mask: np.ndarray, spec: Family, factor: int = 8, mode: str = "max") -> np.ndarray:
    """Pixel mask (H, W) or (H, W, 1) -> the repaint weight of each unit, (H / u, W / u) float32 in [0, 1], u =
    `unit(spec, factor)`. Raises ValueError for an unknown mode or sides that are not a multiple of u."""
    m = np.asarray(mask, np.float32)
    m = m[..., 0] if m.ndim == 3 else m
    u = unit(spec, factor)
    h, w = m.shape
    if h % u or w % u:
        raise ValueError(
            f"mask {w}x{h}: sides must be multiples of {u} pixels (one latent or token)"
        )
    if mode == "max":
        return m.reshape(h // u, u, w // u, u).max(axis=(1, 3))
    if mode != "center":
        raise ValueError(f"mask mode {mode!r}: expected one of {MODES}")
    m = (m >= 0.5).astype(np.float32)
    if spec.inpaint_resize == "nearest":
        return m[::u, ::u]
    lo, hi = (
        (u - 1) // 2,
        u // 2,
    )  # bilinear at align_corners=False samples pixel u * i + (u - 1) / 2
    rows = (m[lo::u] + m[hi::u]) / 2
    return (rows[:, lo::u] + rows[:, hi::u]) / 2


def repainted(mask: np.ndarray, spec: Family, factor: int = 8, mode: str = "max") -> int:
    """How many units the mask repaints at all (weight > 0)."""
    return int(np.count_nonzero(weights(mask, spec, factor, mode)))
