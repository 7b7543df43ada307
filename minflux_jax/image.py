"""Images <-> arrays in [-1, 1] for the autoencoder, in JAX (NHWC). Twin: `minflux_torch/image.py`.

PNG and every other format PIL reads; the conversions are numpy, so both frameworks
produce bit-identical pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


def load_image(path, multiple: int = 16) -> jax.Array:
    """An image file -> (1, H, W, 3) float32 in [-1, 1], centre-cropped to a multiple of `multiple` pixels
    (16: the FLUX latent grid after the 2x2 patchify)."""
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    h, w = img.shape[0] // multiple * multiple, img.shape[1] // multiple * multiple
    if not h or not w:
        raise ValueError(f"{path}: image {img.shape[1]}x{img.shape[0]} is smaller than {multiple} pixels")
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    img = img[top : top + h, left : left + w] / 127.5 - 1.0
    return jnp.asarray(img)[None]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8, clipped and rounded (BFL truncates with `.byte()`; rounding is unbiased)."""
    return np.round((np.clip(x.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def save_image(x: jax.Array, path) -> None:
    """(1, H, W, 3) or (H, W, 3) in [-1, 1] -> an image file (format from the suffix, e.g. .png)."""
    x = np.asarray(jax.device_get(x)).astype(np.float32)
    x = x[0] if x.ndim == 4 else x
    Image.fromarray(to_uint8(x)).save(path)
