"""Images <-> tensors in [-1, 1] for the autoencoder, in PyTorch (NCHW). Twin: `minflux_jax/image.py`.

The pixels come from `minflux.images` (numpy), so both frameworks see bit-identical inputs.
"""

from __future__ import annotations

import numpy as np
import torch

from minflux import images
from minflux.images import to_uint8  # noqa: F401  (re-exported)


def load_image(path, multiple: int = 16) -> torch.Tensor:
    """An image file -> (1, 3, H, W) float32 in [-1, 1], centre-cropped to a multiple of `multiple` pixels
    (16: the FLUX latent grid after the 2x2 patchify); `minflux.images.load`."""
    return torch.from_numpy(
        np.ascontiguousarray(images.load(path, multiple=multiple).transpose(2, 0, 1))
    )[None]


def save_image(x: torch.Tensor, path) -> None:
    """(1, 3, H, W) or (3, H, W) in [-1, 1] -> an image file (format from the suffix, e.g. .png)."""
    x = x.detach().float().cpu().numpy()
    images.save((x[0] if x.ndim == 4 else x).transpose(1, 2, 0), path)
