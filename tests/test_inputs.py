"""Input files checked where they enter: images (`minflux.images.load`) and captions (`minflux.inputs`).

Pictures are compared with what diffusers' `load_image` (EXIF orientation, RGB) and numpy's own arithmetic
give; captions with Python's codecs. Every refusal is one `InputError` (a CheckpointError and a ValueError)
naming the file.
"""

from __future__ import annotations

import codecs

import numpy as np
import pytest
from conftest import png_header
from PIL import Image

from minflux import images
from minflux.inputs import InputError, read_caption


def test_16_bit_greyscale_keeps_its_values(tmp_path):
    """A 16-bit PNG (mode I;16) used to be clipped to 255 by PIL's conversion: 93% white."""
    a = np.linspace(0, 65535, 48 * 32).reshape(32, 48).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got = images.load(tmp_path / "g16.png", (48, 32))
    want = a.astype(np.float32) / 65535 * 2 - 1
    assert np.abs(got - want[..., None]).max() < 1e-6 and got.shape == (32, 48, 3)
    assert (got > 0.99).mean() < 0.02
    mask = images.load(tmp_path / "g16.png", (48, 32), gray=True)
    assert np.abs(mask[..., 0] - a / 65535).max() < 1e-6


def test_8_bit_pictures_as_diffusers_loads_them(tmp_path):
    """RGB and an EXIF-rotated JPEG (a phone's portrait photo): the pixels of diffusers' `load_image`."""
    load_image = pytest.importorskip("diffusers.utils").load_image
    rng = np.random.default_rng(0)
    pic = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    pic.save(tmp_path / "rotated.jpg", exif=exif)
    pic.save(tmp_path / "plain.png")
    for name in ("plain.png", "rotated.jpg"):
        ref = load_image(str(tmp_path / name))
        want = np.asarray(ref.resize((32, 48), Image.Resampling.LANCZOS), np.float32) / 127.5 - 1
        got = images.load(tmp_path / name, (32, 48))
        assert got.shape == want.shape and np.array_equal(got, want), name
    assert images.load(tmp_path / "rotated.jpg", multiple=16).shape == (64, 48, 3)  # upright


def test_transparency_is_composited_not_dropped(tmp_path):
    """Transparent pixels show white (a picture) or black (a mask: keep), as a viewer shows them, not the colour
    hidden under them. RGBA, LA and a palette image with a transparent index."""
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200  # red under everything
    rgba[..., 3] = np.linspace(0, 255, 16, dtype=np.uint8)[None, :]  # alpha ramps left to right
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    a = rgba[..., 3:4] / 255.0
    want = (rgba[..., :3] * a + 255 * (1 - a)) / 127.5 - 1
    got = images.load(tmp_path / "rgba.png", (16, 16))
    assert np.abs(got - want).max() <= 1.01 / 127.5  # (PIL rounds the blend)
    la = Image.fromarray(np.stack([np.full((16, 16), 90, np.uint8), rgba[..., 3]], -1), "LA")
    la.save(tmp_path / "la.png")
    want = (90 * a[..., 0] + 255 * (1 - a[..., 0])) / 127.5 - 1
    assert np.abs(images.load(tmp_path / "la.png", (16, 16))[..., 0] - want).max() <= 1.01 / 127.5
    assert (
        np.abs(
            images.load(tmp_path / "la.png", (16, 16), gray=True)[..., 0] - 90 * a[..., 0] / 255
        ).max()
        < 0.01
    )
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(0, (0, 0, 8, 16))  # left half: index 0, transparent
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png")
    got = images.load(tmp_path / "pal.png", (16, 16))
    assert np.allclose(got[:, :8], 1.0) and np.allclose(got[:, 8:], [-1, -1, 1])


def test_cmyk_as_pil_converts_it(tmp_path):
    rng = np.random.default_rng(1)
    cmyk = Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "CMYK")
    cmyk.save(tmp_path / "c.tif")
    want = np.asarray(cmyk.convert("RGB"), np.float32) / 127.5 - 1
    assert np.array_equal(images.load(tmp_path / "c.tif", (16, 16)), want)


def test_oversized_and_damaged_images_are_one_line(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(20000, 20000))
    with pytest.raises(
        InputError, match=r"bomb.png: 20000 x 20000 pixels \(400 MP\) is over the 134 MP limit"
    ):
        images.load(tmp_path / "bomb.png")
    with pytest.raises(
        InputError, match="over the 0 MP limit"
    ):  # the limit is the caller's to lower
        images.load(tmp_path / "bomb.png", limit=1000)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.png: a damaged image"):
        images.load(tmp_path / "cut.png")
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(ValueError, match="text.png: not an image PIL can read"):
        images.load(tmp_path / "text.png")


CAPTION = "ein Café am Fluss, 夕暮れ 🌇"


@pytest.mark.parametrize(
    "encoded",
    [
        CAPTION.encode("utf-8"),
        codecs.BOM_UTF8 + CAPTION.encode("utf-8"),  # Windows Notepad's "UTF-8 with BOM"
        codecs.BOM_UTF16_LE + CAPTION.encode("utf-16-le"),  # Notepad's "Unicode"
        codecs.BOM_UTF16_BE + CAPTION.encode("utf-16-be"),
        codecs.BOM_UTF32_LE + CAPTION.encode("utf-32-le"),
        ("  " + CAPTION + "\r\n").encode("utf-8"),
    ],
)
def test_captions_in_every_unicode_encoding(encoded, tmp_path):
    (tmp_path / "c.txt").write_bytes(encoded)
    assert read_caption(tmp_path / "c.txt") == CAPTION


@pytest.mark.parametrize(
    "encoded,cause",
    [
        (
            "café".encode("latin-1"),
            r"not UTF-8 text \(byte 0xe9 at offset 3\); save the caption as UTF-8",
        ),
        (b"a\x00b\x00", "holds NUL characters"),
        (codecs.BOM_UTF16_LE + b"\x00\xd8", "not UTF-16 text"),  # an unpaired surrogate
        (b"x" * ((1 << 20) + 1), "is no caption"),
    ],
)
def test_unreadable_captions_are_one_line(encoded, cause, tmp_path):
    (tmp_path / "c.txt").write_bytes(encoded)
    with pytest.raises(InputError, match=cause) as e:
        read_caption(tmp_path / "c.txt")
    assert str(e.value).startswith(f"{tmp_path / 'c.txt'}: ") and "\n" not in str(e.value)
    with pytest.raises(InputError, match="cannot read the caption"):
        read_caption(tmp_path / "missing.txt")
