"""Shared fixtures: tiny presets, seeded inputs, precision flags, error measures."""

from __future__ import annotations

import os

import numpy as np
import pytest

from minflux import memory

os.environ.setdefault(
    "MINFLUX_JAX_CACHE", "off"
)  # commands under test compile afresh: no user cache written
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes: one PyTorch thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
memory.use_xla_cpu_memory_scheduler()  # the XLA flags `minflux` runs with, before JAX starts


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| in float64, after checking both are finite (NaNs fail, never masked)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all() and np.isfinite(b).all(), "non-finite values"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(preset, layout) -> path of a seeded checkpoint written by the PyTorch save path."""
    import minflux_torch as mt

    cache = {}

    def make(name: str, layout: str = "bfl"):
        if (name, layout) not in cache:
            path = tmp_path_factory.mktemp("ckpt") / f"{name}-{layout}.safetensors"
            mt.save_model(mt.build_model(name, seed=0), path, layout=layout)
            cache[name, layout] = path
        return cache[name, layout]

    return make


def transformer_inputs(cfg, rng, batch: int = 2, side: int = 4, txt_len: int = 6) -> dict:
    """Seeded forward inputs (numpy, BFL keyword names) for a tiny transformer."""
    from parity.transformer import make_inputs

    out = make_inputs(
        cfg, resolution=16 * side, txt_len=txt_len, batch=batch, seed=int(rng.integers(1 << 30))
    )
    return out


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is width x height RGB, with almost no pixel data: what a decompression bomb
    looks like to a reader that trusts the header."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one test process per core, at most 4 (each holds a few GB)."""
    return max(1, min(os.cpu_count() or 1, 4))
