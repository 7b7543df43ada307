"""Shared fixtures: tiny presets, seeded inputs, precision flags, error measures."""

from __future__ import annotations

import numpy as np
import pytest


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| in float64, after checking both are finite (NaNs fail, never masked)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all() and np.isfinite(b).all(), "non-finite values"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
