"""Reference images sized as the official pipelines prepare them, per family: one function for `minflux generate`
and `minflux cache` (numpy + PIL, no framework).

The rule and its limits are the family table's (`Family.ref_rule`, `ref_area`, `ref_min_side`, `ref_max_aspect`):

- "kontext" (FLUX.1 Kontext): BFL flux `src/flux/sampling.py` `prepare_kontext` and diffusers
  `FluxKontextPipeline.__call__` (`_auto_resize=True`): the preferred resolution (`KONTEXT_RESOLUTIONS`, BFL's
  `PREFERED_KONTEXT_RESOLUTIONS`) of the nearest aspect ratio, sides multiples of 16, the picture stretched to it
  (Lanczos) and never cropped. BFL's `cli_kontext.py` then generates at that size when none is given.
- "area" (FLUX.2): BFL flux2 `src/flux2/sampling.py` `default_prep` (`cap_min_pixels`, `cap_pixels`,
  `center_crop_to_multiple_of_x`) and diffusers `Flux2KleinPipeline.__call__` (`Flux2ImageProcessor.
  check_image_input`, `_resize_to_target_area`, `preprocess(..., resize_mode="crop")`): refused with a side
  under 64 pixels or an aspect ratio over 8; scaled down (Lanczos) to 1024^2 pixels when larger; centre-cropped
  to multiples of 16. diffusers takes the output size from the first reference when none is given. (BFL's own
  `encode_image_refs` allows one reference 2024^2 pixels; we follow diffusers' single budget, which is BFL's for
  several references and costs a quarter of the tokens.)

Pixel sizes are those of the real autoencoders (16 pixels per token). An autoencoder of p pixels per token (the
tiny test ones: 4) scales every size by p / 16, so a reference has the same token grid whatever the autoencoder.
Pixels are resized in 8 bits as PIL, BFL and diffusers do (`images.load`; 16-bit pictures as floats).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from minflux import images
from minflux.buckets import Fit
from minflux.family import Family
from minflux.inputs import InputError

# BFL flux `src/flux/sampling.py` PREFERED_KONTEXT_RESOLUTIONS == diffusers PREFERRED_KONTEXT_RESOLUTIONS: (w, h)
KONTEXT_RESOLUTIONS = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)
REAL_PIXELS_PER_TOKEN = 16  # the sizes above and in the family table are for the real autoencoders


def fit(
    width: int, height: int, spec: Family, pixels_per_token: int = 16, area: int | None = None
) -> Fit:
    """How a width x height reference becomes what the model sees: resize to `Fit.resize`, then crop
    `Fit.crop` (module docstring). `area`: pixels per reference instead of the family's (`minflux cache
    --ref-area`; Kontext scales its preferred resolution to it). Raises ValueError ("WxH: ...", naming the
    limit) for a reference the family refuses."""
    ppt = pixels_per_token
    scale = ppt / REAL_PIXELS_PER_TOKEN
    if spec.ref_rule == "kontext":
        aspect = width / height
        _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
        s = scale if area is None else math.sqrt(area / spec.ref_area)
        w, h = max(ppt, int(w * s) // ppt * ppt), max(ppt, int(h * s) // ppt * ppt)
        return Fit((w, h), (0, 0, w, h))  # stretched, never cropped
    if spec.ref_rule != "area":
        raise ValueError(f"reference rule {spec.ref_rule!r}: expected 'kontext' or 'area'")
    side = int(spec.ref_min_side * scale)
    if min(width, height) < side:
        raise ValueError(
            f"{width}x{height} is too small for a {spec.refs_model} reference (both sides >= {side} pixels)"
        )
    if max(width / height, height / width) > spec.ref_max_aspect:
        raise ValueError(
            f"{width}x{height}: aspect ratio {max(width / height, height / width):.1f}:1 is over "
            f"{spec.ref_max_aspect:g}:1, the limit for a {spec.refs_model} reference"
        )
    limit = round(spec.ref_area * scale * scale) if area is None else area
    rw, rh = width, height
    if rw * rh > limit:  # BFL `cap_pixels`, diffusers `_resize_to_target_area`: truncated sides
        s = math.sqrt(limit / (rw * rh))
        rw, rh = int(rw * s), int(rh * s)
    w, h = rw // ppt * ppt, rh // ppt * ppt
    if not w or not h:
        raise ValueError(f"{width}x{height} is smaller than {ppt} pixels once scaled")
    return Fit((rw, rh), ((rw - w) // 2, (rh - h) // 2, w, h))


def size(path) -> tuple[int, int]:
    """(width, height) of an image file, upright (EXIF orientation applied); `InputError` naming the file."""
    with images.open_image(path) as im:
        return im.size


def plan(
    path, spec: Family, pixels_per_token: int = 16, area: int | None = None
) -> tuple[tuple[int, int], Fit]:
    """The size of reference file `path` and its `fit`; `InputError` naming the file (unreadable, refused)."""
    w, h = size(path)
    try:
        return (w, h), fit(w, h, spec, pixels_per_token, area)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None


def load(path, fitted: Fit) -> np.ndarray:
    """Reference file `path` prepared by `fitted` (from `plan`): float32 (h, w, 3) in [-1, 1], resized with
    Lanczos in 8 bits (as PIL / BFL / diffusers), then cropped."""
    pixels = images.load(path, size=fitted.resize, multiple=1)
    left, top, w, h = fitted.crop
    return np.ascontiguousarray(pixels[top : top + h, left : left + w])


def prepare(
    paths, spec: Family, pixels_per_token: int = 16, area: int | None = None
) -> list[np.ndarray]:
    """Reference files as the model takes them (`plan`, then `load`), in order."""
    return [load(p, plan(p, spec, pixels_per_token, area)[1]) for p in paths]


def tokens(fitted: Fit, pixels_per_token: int = 16) -> int:
    """The transformer tokens of a prepared reference."""
    w, h = fitted.size
    return (w // pixels_per_token) * (h // pixels_per_token)


def describe(path, original: tuple[int, int], fitted: Fit, pixels_per_token: int = 16) -> str:
    """ "a.png 1000x400 -> 1568x672 (4116 tokens)" """
    (w, h), (fw, fh) = original, fitted.size
    return f"{Path(path).name} {w}x{h} -> {fw}x{fh} ({tokens(fitted, pixels_per_token)} tokens)"
