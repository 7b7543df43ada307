"""Image files <-> numpy arrays in [-1, 1] (HWC), the one reader and writer every framework and command uses.

PNG, JPEG, WebP and every other format PIL reads. Layout changes (NCHW for PyTorch, NHWC for JAX) happen in
the twins' `image.py`; the pixels themselves are computed here once, so both frameworks see identical inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load(
    path,
    size: tuple[int, int] | None = None,
    multiple: int = 16,
    max_pixels: int | None = None,
    square: bool = False,
    gray: bool = False,
) -> np.ndarray:
    """An image file as float32 (H, W, 3) in [-1, 1] (gray: (H, W, 1) in [0, 1], for masks).

    `square` centre-crops to a square first. size (w, h): then resized to exactly that (Lanczos). Otherwise an
    image over `max_pixels` is scaled down to it, then centre-cropped to a multiple of `multiple` pixels per side.
    Raises ValueError naming the file when it cannot be read as an image or is smaller than `multiple`.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            img = im.convert("L" if gray else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not an image PIL can read ({e.__class__.__name__})") from None
    if square:
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if size is not None:
        img = img.resize(size, Image.Resampling.LANCZOS)
    else:
        if max_pixels and img.width * img.height > max_pixels:
            scale = (max_pixels / (img.width * img.height)) ** 0.5
            img = img.resize(
                (int(img.width * scale), int(img.height * scale)), Image.Resampling.LANCZOS
            )
        w, h = img.width // multiple * multiple, img.height // multiple * multiple
        if not w or not h:
            raise ValueError(f"{path}: {img.width}x{img.height} is smaller than {multiple} pixels")
        left, top = (img.width - w) // 2, (img.height - h) // 2
        img = img.crop((left, top, left + w, top + h))
    a = np.asarray(img, np.float32)
    return a[..., None] / 255.0 if gray else a / 127.5 - 1.0


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8, clipped and rounded (BFL truncates with `.byte()`; rounding is unbiased)."""
    return np.round((np.clip(np.asarray(x, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def save(image: np.ndarray, path) -> Path:
    """(H, W, 3) uint8, or floats in [-1, 1], -> an image file (format from the suffix); the folder is made."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image if image.dtype == np.uint8 else to_uint8(image)).save(path)
    return path
