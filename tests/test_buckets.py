"""Aspect-ratio buckets (`minflux.buckets`): the bucket table's bounds, nearest bucket and cover crop, and a
reference through the float path `minflux cache` takes, against diffusers' own FLUX.2 image processor (the sizes
themselves: `test_references.py`)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from minflux import buckets, family, images, references

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("size,step,aspect", [(512, 64, 4.0), (1024, 64, 2.0), (32, 16, 4.0)])
def test_bucket_table_is_bounded_and_symmetric(size, step, aspect):
    table = buckets.make_buckets(size, step, aspect)
    assert (size, size) in table and len(set(table)) == len(table)
    for w, h in table:
        assert w % step == 0 and h % step == 0 and w * h <= size * size
        assert max(w / h, h / w) <= aspect and (h, w) in table
        # a landscape bucket has the tallest height for its width: one step more would pass the area
        assert w < h or w * (h + step) > size * size
    ratios = [w / h for w, h in table]
    assert ratios == sorted(ratios)
    with pytest.raises(ValueError, match="at least the step"):
        buckets.make_buckets(8, 16)


def test_nearest_bucket_and_cover_crop():
    table = buckets.make_buckets(512, 64, 4.0)
    assert buckets.nearest_bucket(1000, 1000, table) == (512, 512)
    w, h = buckets.nearest_bucket(2000, 1000, table)
    assert (w, h) == (704, 320)  # aspect 2.2, the nearest to 2 in log ratio (640 x 384 is 1.67)
    fit = buckets.cover(2000, 1000, (w, h))
    assert fit.size == (704, 320) and fit.resize == (
        704,
        352,
    )  # covers: the width fits, the height is cut
    assert fit.crop == (0, 16, 704, 320)
    assert buckets.kept(2000, 1000, fit) == pytest.approx(320 / 352)
    assert (
        buckets.kept(2000, 1000, buckets.square_crop(2000, 1000, 512)) == 0.5
    )  # what cache did before
    # tall images mirror wide ones
    assert buckets.nearest_bucket(1000, 2000, table) == (320, 704)


def test_apply_resizes_in_float_and_crops_the_centre():
    y, x = np.mgrid[:40, :80].astype(np.float32)
    pixels = np.stack([x / 79 * 2 - 1, y / 39 * 2 - 1, np.zeros_like(x)], -1)  # ramps in [-1, 1]
    fit = buckets.cover(80, 40, (32, 32))
    out = buckets.apply(pixels, fit)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    assert fit.resize == (64, 32) and fit.crop == (16, 0, 32, 32)
    # the middle half of the horizontal ramp: from about -0.5 to 0.5, the range kept (no ringing outside it)
    assert -0.6 < out[16, 0, 0] < -0.4 and 0.4 < out[16, -1, 0] < 0.6
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("size", [(640, 480), (1500, 1100), (300, 97), (2048, 512)])
def test_flux2_reference_matches_diffusers_image_processor(size, tmp_path):
    """`minflux cache`'s path for a reference: the size `minflux.references.fit` gives, resized in float by
    `buckets.apply`. Flux2KleinPipeline prepares a reference by check_image_input, _resize_to_target_area above
    1024^2 pixels, then preprocess(height, width floored to 16, resize_mode="crop"); ours gives the same size and
    pixels (8-bit rounding apart: diffusers resizes uint8 pictures, `apply` resizes floats)."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    w, h = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    smooth = (127 + 100 * np.sin(xx / 37.0)[..., None] * np.cos(yy / 23.0)[..., None]).repeat(3, -1)
    pic = Image.fromarray((smooth + rng.integers(0, 8, (h, w, 3))).astype(np.uint8))
    pic.save(tmp_path / "ref.png")
    proc = Flux2ImageProcessor()
    img = proc.check_image_input(pic)
    if w * h > 1024 * 1024:
        img = proc._resize_to_target_area(img, 1024 * 1024)
    ew, eh = img.size[0] // 16 * 16, img.size[1] // 16 * 16
    expected = proc.preprocess(img, height=eh, width=ew, resize_mode="crop")[0].numpy()
    fit = references.fit(w, h, family.FLUX2)
    ours = buckets.apply(images.load(tmp_path / "ref.png", multiple=1), fit)
    assert fit.size == (ew, eh)
    diff = np.abs(ours.transpose(2, 0, 1) - expected)
    assert diff.mean() < 1.5 / 127.5 and diff.max() < 6 / 127.5, (diff.mean(), diff.max())
