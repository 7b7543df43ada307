"""Position ids of image and text tokens (numpy), the one definition both frameworks and every command use.

BFL flux `sampling.prepare` (FLUX.1: image rows (t, row, col), text all zero) and flux2 `prc_img` / `prc_txt`
(FLUX.2: image rows (t, row, col, 0), text rows (0, 0, 0, l)). Ids are small integers, exact in fp32.
"""

from __future__ import annotations

import numpy as np

from minflux import family


def image_ids(batch: int, h: int, w: int, axes: int, t: float = 0) -> np.ndarray:
    """(batch, h*w, axes) float32: rows (t, row, col[, 0]) of an h x w token grid, row-major."""
    ids = np.zeros((h, w, axes), np.float32)
    ids[..., 0] = t
    ids[..., 1], ids[..., 2] = np.arange(h)[:, None], np.arange(w)[None, :]
    return np.broadcast_to(ids.reshape(1, h * w, axes), (batch, h * w, axes)).copy()


def text_ids(batch: int, length: int, axes: int, axis: int | None = None) -> np.ndarray:
    """(batch, length, axes) float32: zeros (FLUX.1), or token l numbered l along `axis` (FLUX.2: axis 3)."""
    ids = np.zeros((batch, length, axes), np.float32)
    if axis is not None:
        ids[..., axis] = np.arange(length)
    return ids


def for_config(cfg, batch: int, h: int, w: int, txt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(img_ids, txt_ids) of a transformer config for an h x w token grid and txt_len text tokens
    (the family table's id axes: 3 for FLUX.1, 4 for FLUX.2)."""
    spec = family.of(cfg)
    return image_ids(batch, h, w, spec.id_axes), text_ids(
        batch, txt_len, spec.id_axes, spec.text_id_axis
    )
