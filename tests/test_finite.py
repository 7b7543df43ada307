"""`checkpoint.check_finite` reads NaN and Inf off the raw bits: it must agree with `np.isfinite` of the float32
conversion on every bit pattern of the 8- and 16-bit formats, and on the special values of float32 / float64."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from minflux import checkpoint
from minflux.checkpoint import CheckpointError


def flags(arr: np.ndarray) -> np.ndarray:
    """check_finite on each element alone: True where it raises."""
    out = []
    for x in arr.reshape(-1):
        try:
            checkpoint.check_finite(np.array([x]), "k", "f")
            out.append(False)
        except CheckpointError:
            out.append(True)
    return np.array(out)


@pytest.mark.parametrize(
    "dtype, view",
    [
        (ml_dtypes.bfloat16, np.uint16),
        (np.float16, np.uint16),
        (ml_dtypes.float8_e4m3fn, np.uint8),
        (ml_dtypes.float8_e5m2, np.uint8),
    ],
)
def test_every_bit_pattern_agrees_with_the_float_conversion(dtype, view):
    every = np.arange(np.iinfo(view).max + 1, dtype=np.int64).astype(view).view(dtype)
    want = ~np.isfinite(every.astype(np.float32))
    assert want.any() and not want.all()  # the formats do hold both
    np.testing.assert_array_equal(flags(every), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values_of_wide_floats(dtype):
    info = np.finfo(dtype)
    uint = np.uint32 if dtype == np.float32 else np.uint64
    nans = np.array(
        [0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0x7FBFFFFF]
        if dtype == np.float32
        else [0x7FF0000000000001, 0x7FF8000000000000, 0xFFFFFFFFFFFFFFFF],
        uint,
    ).view(dtype)  # signalling, quiet, negative, largest-payload NaNs
    values = np.concatenate(
        [
            np.array(
                [0.0, -0.0, 1.0, info.max, -info.max, info.tiny, info.smallest_subnormal], dtype
            ),
            np.array([np.inf, -np.inf], dtype),
            nans,
        ]
    )
    np.testing.assert_array_equal(flags(values), ~np.isfinite(values))


def test_whole_tensors_split_across_pieces_and_threads(monkeypatch):
    """One NaN anywhere in a tensor larger than a piece, and a tensor checked by several threads."""
    monkeypatch.setattr(checkpoint, "_FINITE_CHUNK", 64)
    monkeypatch.setattr(checkpoint, "_FINITE_PARALLEL", 256)
    arr = np.random.default_rng(0).standard_normal((40, 25)).astype(ml_dtypes.bfloat16)
    checkpoint.check_finite(arr, "k", "f")  # finite: passes
    checkpoint.check_finite(arr.T, "k", "f")  # a strided view too
    for i in (0, 63, 64, 500, 999):
        bad = arr.copy()
        bad.reshape(-1)[i] = np.inf if i % 2 else np.nan
        with pytest.raises(CheckpointError, match=r"f: tensor 'k' holds NaN or Inf values"):
            checkpoint.check_finite(bad, "k", "f")
    checkpoint.check_finite(np.array([1, 2], np.int64), "k", "f")  # not a float: not checked
    checkpoint.check_finite(np.zeros((0, 3), np.float32), "k", "f")  # empty
