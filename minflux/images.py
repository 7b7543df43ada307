"""Image files <-> numpy arrays in [-1, 1] (HWC), the one reader and writer every framework and command uses.

PNG, JPEG, WebP and every other format PIL reads. Layout changes (NCHW for PyTorch, NHWC for JAX) happen in
the twins' `image.py`; the pixels themselves are computed here once, so both frameworks see identical inputs.

Reading is checked where the file enters (`open_image`): the pixel count is read from the header and refused
over `MAX_PIXELS` before anything is decoded (one line, not PIL's DecompressionBombError); the camera's EXIF
orientation is applied (as diffusers' `load_image`); 16-bit and 32-bit greyscale keep their values (PIL's
own conversion clips them to 255); palette, CMYK and other modes go through PIL's conversions; transparent
pixels are composited over white (pictures) or black (masks: transparent = keep), not left at the hidden
colour underneath. Writing is atomic (`minflux.files`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from minflux import files
from minflux.inputs import InputError

# 2^27 pixels (134 MP, e.g. 11585 x 11585): beyond any camera, and 1.6 GB as float32 RGB. PIL refuses twice
# its own 89 MP with DecompressionBombError; we refuse earlier, and say so in a line.
MAX_PIXELS = 1 << 27
_WIDE = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # modes whose values go past 255


def open_image(path, max_pixels: int = MAX_PIXELS):
    """A PIL image of file `path`, upright (EXIF orientation applied), its size checked before decoding.

    Raises `InputError` (a ValueError and a CheckpointError) naming the file: not an image PIL reads, over
    `max_pixels` pixels, or truncated / corrupt data.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    own_limit, Image.MAX_IMAGE_PIXELS = (
        Image.MAX_IMAGE_PIXELS,
        None,
    )  # the size is checked below, in a line
    try:
        im = Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{path}: not an image PIL can read ({e.__class__.__name__})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = own_limit
    if im.width * im.height > max_pixels:
        im.close()
        raise InputError(
            f"{path}: {im.width} x {im.height} pixels ({im.width * im.height / 1e6:.0f} MP) is over the "
            f"{max_pixels / 1e6:.0f} MP limit for an input image; scale it down first"
        )
    try:
        with im:
            im.load()
            upright = ImageOps.exif_transpose(im)
            return upright if upright is not None else im
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise InputError(f"{path}: a damaged image ({e})") from None


def metadata(path) -> dict[str, str]:
    """The text chunks of an image file (a PNG's tEXt / iTXt: what `save(..., metadata=...)` wrote); {} when it
    has none. Raises `InputError` naming the file, as `open_image`."""
    with open_image(path) as im:
        return {k: str(v) for k, v in im.info.items() if isinstance(v, str)}


def _planes(im, gray: bool, background: float):
    """`im` as 8-bit "RGB" / "L" (PIL's own conversions), or, for modes past 8 bits, a list of float32 "F"
    planes in [0, 1] (3 for a picture, 1 for a mask), so no value is clipped. Alpha: composited over
    `background` (0 black, 1 white)."""
    from PIL import Image

    if im.mode in _WIDE:
        a = np.asarray(im).astype(np.float32)
        top = (
            1.0
            if im.mode == "F"
            else 65535.0
            if im.mode.startswith("I;16") or a.max() <= 65535
            else 2**31 - 1
        )
        plane = Image.fromarray(np.clip(a / top, 0.0, 1.0), "F")
        return [plane] if gray else [plane] * 3
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        under = Image.new("RGBA", im.size, (round(255 * background),) * 3 + (255,))
        im = Image.alpha_composite(under, rgba)
    return im.convert("L" if gray else "RGB")


def _apply(img, fn):
    return [fn(p) for p in img] if isinstance(img, list) else fn(img)


def _size_of(img) -> tuple[int, int]:
    return (img[0] if isinstance(img, list) else img).size


def load(
    path,
    size: tuple[int, int] | None = None,
    multiple: int = 16,
    max_pixels: int | None = None,
    square: bool = False,
    gray: bool = False,
    limit: int = MAX_PIXELS,
) -> np.ndarray:
    """An image file as float32 (H, W, 3) in [-1, 1] (gray: (H, W, 1) in [0, 1], for masks).

    `square` centre-crops to a square first. size (w, h): then resized to exactly that (Lanczos). Otherwise an
    image over `max_pixels` is scaled down to it, then centre-cropped to a multiple of `multiple` pixels per side.
    8-bit images are resized in 8 bits, as PIL / diffusers do; 16-bit ones as floats, keeping their precision.
    Raises `InputError` (a ValueError) naming the file: not an image, over `limit` pixels (`open_image`),
    smaller than `multiple`.
    """
    from PIL import Image

    with open_image(path, limit) as im:
        img = _planes(im, gray, background=0.0 if gray else 1.0)
    lanczos = Image.Resampling.LANCZOS
    w, h = _size_of(img)
    if square:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = _apply(img, lambda p: p.crop((left, top, left + s, top + s)))
    if size is not None:
        img = _apply(img, lambda p: p.resize(size, lanczos))
    else:
        if max_pixels and w * h > max_pixels:
            scale = (max_pixels / (w * h)) ** 0.5
            img = _apply(img, lambda p: p.resize((int(w * scale), int(h * scale)), lanczos))
            w, h = _size_of(img)
        cw, ch = w // multiple * multiple, h // multiple * multiple
        if not cw or not ch:
            raise InputError(f"{path}: {w}x{h} is smaller than {multiple} pixels")
        left, top = (w - cw) // 2, (h - ch) // 2
        img = _apply(img, lambda p: p.crop((left, top, left + cw, top + ch)))
    if isinstance(img, list):  # float planes in [0, 1] (Lanczos may overshoot a little: clipped)
        a = np.clip(np.stack([np.asarray(p, np.float32) for p in img], -1), 0.0, 1.0)
        return a if gray else a * 2.0 - 1.0
    a = np.asarray(img, np.float32)
    return a[..., None] / 255.0 if gray else a / 127.5 - 1.0


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8, clipped and rounded (BFL truncates with `.byte()`; rounding is unbiased). Raises
    FloatingPointError for NaN or Inf values (an overflowed sampler), which would otherwise become black pixels."""
    x = np.asarray(x, np.float32)
    if not np.isfinite(x).all():
        raise FloatingPointError(
            f"the picture holds NaN or Inf values ({np.count_nonzero(~np.isfinite(x))} of {x.size}): "
            "the computation overflowed"
        )
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def encode(
    image: np.ndarray, suffix: str = ".png", metadata: dict[str, str] | None = None
) -> bytes:
    """(H, W, 3) uint8, or floats in [-1, 1], as the bytes of an image file (format from `suffix`).

    `metadata`: text chunks for a PNG (what was drawn, with which settings); ignored by other formats.
    """
    from PIL import Image, PngImagePlugin

    fmt = Image.registered_extensions().get(suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(
            f"{suffix!r}: not an image file suffix PIL writes (.png, .jpg, .webp, ...)"
        )
    kw = {}
    if metadata and fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for k, v in metadata.items():
            info.add_itxt(k, str(v))
        kw["pnginfo"] = info
    buf = io.BytesIO()
    Image.fromarray(image if image.dtype == np.uint8 else to_uint8(image)).save(
        buf, format=fmt, **kw
    )
    return buf.getvalue()


def save(image: np.ndarray, path, metadata: dict[str, str] | None = None) -> Path:
    """(H, W, 3) uint8, or floats in [-1, 1], -> an image file (format from the suffix); the folder is made.

    Written atomically (`minflux.files.write_bytes`): an existing picture stays whole until the new one is
    complete. Raises `OutputError` naming the path (no space, read-only, permissions, a name too long).
    """
    path = Path(path)
    data = encode(image, path.suffix, metadata)
    files.make_folders(path.parent)
    files.write_bytes(path, data)
    return path
