"""Images <-> arrays in [-1, 1] for the autoencoder, in JAX (NHWC). Twin: `minflux_torch/image.py`.

The pixels come from `minflux.images` (numpy), so both frameworks see bit-identical inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from minflux import images
from minflux.images import to_uint8  # noqa: F401  (re-exported)


def load_image(path, multiple: int = 16) -> jax.Array:
    """An image file -> (1, H, W, 3) float32 in [-1, 1], centre-cropped to a multiple of `multiple` pixels
    (16: the FLUX latent grid after the 2x2 patchify); `minflux.images.load`."""
    return jnp.asarray(images.load(path, multiple=multiple))[None]


def save_image(x: jax.Array, path) -> None:
    """(1, H, W, 3) or (H, W, 3) in [-1, 1] -> an image file (format from the suffix, e.g. .png)."""
    x = np.asarray(jax.device_get(x)).astype(np.float32)
    images.save(x[0] if x.ndim == 4 else x, path)
