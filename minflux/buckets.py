"""Aspect-ratio buckets for training images (numpy + PIL).

Buckets follow kohya-ss sd-scripts `library/model_util.make_bucket_resolutions` (also musubi-tuner, SimpleTuner and
diffusers' `train_dreambooth_lora_flux2_klein_img2img.py`): for each width in steps of `step` pixels, the tallest
height in steps of `step` whose area stays within size x size, kept while the aspect ratio is bounded; an image goes
to the bucket of the nearest aspect ratio, is resized to cover it and centre-cropped (`cover`). Every batch is one
bucket, so sides differ between batches but never inside one.

Reference images of edit pairs are sized by `minflux.references` (the pipelines' rules), which returns a `Fit` too.

A `Fit` (resize, then crop) is what `apply` performs on float pixels; nothing here imports a framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fit:
    """How one image becomes its training size: resized (Lanczos) to `resize` = (w, h), then the box `crop` =
    (left, top, width, height) cut out of the result."""

    resize: tuple[int, int]
    crop: tuple[int, int, int, int]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the result."""
        return self.crop[2], self.crop[3]


# ---------------------------------------------------------------------------------------------
# Buckets
# ---------------------------------------------------------------------------------------------


def make_buckets(size: int, step: int, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """The buckets for images of about size x size pixels: (width, height) pairs, sides multiples of `step`
    (a multiple of the model's pixels per token), area at most size x size, aspect ratio at most `max_aspect`;
    sorted from the tallest to the widest. Raises ValueError when no bucket fits (size < step, max_aspect < 1).

    kohya-ss `make_bucket_resolutions`: each width w takes the tallest height h with w x h <= size^2.
    """
    if size < step or step < 1:
        raise ValueError(f"bucket size {size} must be at least the step {step} (>= 1)")
    if not max_aspect >= 1.0:
        raise ValueError(f"max aspect ratio {max_aspect} must be >= 1")
    area, out = size * size, set()
    for w in range(step, area // step + 1, step):
        h = area // w // step * step
        if step <= h <= w and w / h <= max_aspect:  # landscape, and its portrait mirror
            out |= {(w, h), (h, w)}
    return sorted(out, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log ratio: 2:1 is as far from 1:1 as 1:2); on a tie
    the larger one."""
    r = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


def cover(width: int, height: int, bucket: tuple[int, int]) -> Fit:
    """Resize a width x height image to cover `bucket` (aspect ratio kept), then centre-crop the rest."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    return Fit((rw, rh), ((rw - bw) // 2, (rh - bh) // 2, bw, bh))


def kept(width: int, height: int, fit: Fit) -> float:
    """The share of the image's pixels that survive `fit`'s crop (1.0: nothing cut)."""
    rw, rh = fit.resize
    return fit.crop[2] * fit.crop[3] / (rw * rh)


def square_crop(width: int, height: int, size: int) -> Fit:
    """A square crop of the shorter side resized to size x size: what `minflux cache` did before buckets."""
    s = min(width, height)
    scale = size / s
    rw, rh = max(size, round(width * scale)), max(size, round(height * scale))
    return Fit((rw, rh), ((rw - size) // 2, (rh - size) // 2, size, size))


# ---------------------------------------------------------------------------------------------
# Applying a fit to pixels
# ---------------------------------------------------------------------------------------------


def apply(pixels: np.ndarray, fit: Fit) -> np.ndarray:
    """Float pixels (H, W, C) -> (h, w, C) of `fit`: each channel resized by PIL's Lanczos in float32 (no 8-bit
    rounding), then cropped."""
    from PIL import Image

    rw, rh = fit.resize
    if (pixels.shape[1], pixels.shape[0]) != (rw, rh):
        lo, hi = float(pixels.min()), float(pixels.max())  # Lanczos rings: keep the input's range
        pixels = np.stack(
            [
                np.asarray(
                    Image.fromarray(np.ascontiguousarray(pixels[..., c], np.float32)).resize(
                        (rw, rh), Image.Resampling.LANCZOS
                    )
                )
                for c in range(pixels.shape[2])
            ],
            axis=-1,
        ).clip(lo, hi)
    left, top, w, h = fit.crop
    return np.ascontiguousarray(pixels[top : top + h, left : left + w], np.float32)
