"""Where the parity suite's weights come from: a checkpoint read lazily, or seeded random tensors.

Both hand out BFL-layout numpy tensors for a set of keys, so a run holds one block's weights at a time.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from minflux import checkpoint


class CheckpointWeights:
    """A checkpoint in any supported layout, validated against the model's keys and shapes up front."""

    def __init__(self, path, cfg, expected: dict[str, tuple[int, ...]]):
        self.reader = checkpoint.BflReader(path, expected, cfg)
        self.description = f"{path} ({self.reader.ckpt.raw_layout} layout)"

    def read(self, keys) -> dict[str, np.ndarray]:
        return {k: self.reader.read(k) for k in keys}


class RandomWeights:
    """Seeded random tensors of the model's shapes: each key gets its own stream, so any subset is reproducible."""

    def __init__(self, cfg, expected: dict[str, tuple[int, ...]], seed: int = 0):
        self.expected, self.seed = expected, seed
        self.description = f"random weights (seed {seed})"

    def read(self, keys) -> dict[str, np.ndarray]:
        keys = list(keys)
        with ThreadPoolExecutor(min(len(keys), os.cpu_count() or 1) or 1) as pool:  # numpy fills without the GIL
            return dict(zip(keys, pool.map(self.tensor, keys), strict=True))

    def tensor(self, k: str) -> np.ndarray:
        shape = self.expected[k]
        rng = np.random.default_rng([self.seed, zlib.crc32(k.encode())])
        if k.endswith("scale"):  # RMSNorm: around one
            lo, width = 0.9, 0.2
        else:  # weights fan-in scaled, like PyTorch's default init; biases and the rest small
            s = 1 / np.sqrt(np.prod(shape[1:])) if len(shape) >= 2 else 0.05
            lo, width = -s, 2 * s
        arr = rng.random(shape, dtype=np.float32)  # uniform in [lo, lo + width), generated in fp32, in place
        arr *= np.float32(width)
        arr += np.float32(lo)
        return arr


class Perturbed:
    """Another source with the tensors under `prefix` changed by a relative `amount` (tests use it on one side)."""

    def __init__(self, source, prefix: str, amount: float = 1e-3):
        self.source, self.prefix, self.amount = source, prefix, amount
        self.description = f"{source.description}, {prefix} perturbed by {amount}"

    def read(self, keys) -> dict[str, np.ndarray]:
        out = self.source.read(keys)
        for k, v in out.items():
            if k.startswith(self.prefix):
                out[k] = (v.astype(np.float32) * (1 + self.amount)).astype(v.dtype)
        return out
