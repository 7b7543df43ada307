"""Seeded randomness drawn once, in numpy, so both frameworks see the same numbers: model weights and noise.

A seed and a tensor's name give the same values in PyTorch and JAX, on every device: random-weight models,
`minflux generate --random-weights` and the sampling noise all come from here (never `torch.randn` or
`jax.random`, whose streams differ).
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from minflux import configs, schedules


def tensor(key: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """One float32 weight by a single rule keyed by its BFL name, its own stream per (seed, name).

    Linear and conv weights (>= 2-D): uniform +-1/sqrt(fan_in) (PyTorch's default scale; fan_in = every axis but
    the first). Norm scales, 1-D norm weights and BatchNorm running variances: uniform [0.9, 1.1). Biases,
    running means and the rest: uniform +-0.05.
    """
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    name = key.rsplit(".", 1)[-1]
    if len(shape) >= 2:
        s = 1 / np.sqrt(np.prod(shape[1:]))
        lo, width = -s, 2 * s
    elif name in ("scale", "running_var") or (name == "weight" and "norm" in key):
        lo, width = 0.9, 0.2
    else:
        lo, width = -0.05, 0.1
    arr = rng.random(shape, dtype=np.float32)  # in place: no float64 temporary of a large tensor
    arr *= np.float32(width)
    arr += np.float32(lo)
    return arr


def tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """`tensor` for every key, generated in parallel (numpy fills without the GIL)."""
    keys = list(shapes)
    with ThreadPoolExecutor(min(len(keys), os.cpu_count() or 1) or 1) as pool:
        return dict(zip(keys, pool.map(lambda k: tensor(k, shapes[k], seed), keys), strict=True))


def noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Standard-normal float32 noise of `shape` from `seed`: the same starting latents in both frameworks."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def noise_nchw(
    batch: int, height: int, width: int, family: str, seed: int, pixels_per_token: int = 16
) -> np.ndarray:
    """The sampler's starting latents for a height x width image, (B, C, h, w) float32: FLUX.1 (B, 16, H/8, W/8),
    FLUX.2 (B, 128, H/16, W/16) (`pixels_per_token` 16 for the real autoencoders, less for the tiny ones)."""
    spec = configs.FAMILIES[family]
    h, w = schedules.token_grid(width, height, pixels_per_token)
    return noise((batch, spec.latent_channels, spec.latent_patch * h, spec.latent_patch * w), seed)
