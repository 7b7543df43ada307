"""Where the tiles of a tiled VAE encode/decode go and how they are blended; framework-free (numpy).

Used by `minflux_torch/autoencoder.py` and `minflux_jax/autoencoder.py` alike, so both tile identically.
"""

from __future__ import annotations

import numpy as np


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start of each tile along an axis of n latent pixels; the last tile ends flush with the edge."""
    if n <= tile:
        return [0]
    return sorted(set(range(0, n - tile, tile - overlap)) | {n - tile})


def ramp(start: int, length: int, n: int, overlap: int, f: int) -> np.ndarray:
    """Blend weights (length*f,) of one tile: ramps over `overlap*f` pixels at edges shared with a neighbour."""
    i = np.arange(length * f) + 0.5
    w = np.ones(length * f)
    if start > 0:
        w = np.minimum(w, i / (overlap * f))
    if start + length < n:
        w = np.minimum(w, (length * f - i) / (overlap * f))
    return w
