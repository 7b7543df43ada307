"""Where the parity suite's weights come from: a checkpoint read lazily, or seeded random tensors.

Both hand out BFL-layout numpy tensors for a set of keys, so a run holds one block's weights at a time.
"""

from __future__ import annotations

import numpy as np

from minflux import checkpoint, random


class CheckpointWeights:
    """A checkpoint in any supported layout, validated against the model's keys and shapes up front."""

    def __init__(self, path, cfg, expected: dict[str, tuple[int, ...]], verify: bool = False):
        self.reader = checkpoint.BflReader(path, expected, cfg, verify)
        # path, layout and the dtypes read (e.g. F8_E4M3, scaled)
        self.description = self.reader.describe()

    def read(self, keys) -> dict[str, np.ndarray]:
        return {k: self.reader.read(k) for k in keys}


class RandomWeights:
    """Seeded random tensors of the model's shapes (`minflux.random`): each key its own stream, any subset
    reproducible, the same values `build_model(seed=...)` gives in both frameworks."""

    def __init__(self, cfg, expected: dict[str, tuple[int, ...]], seed: int = 0):
        self.expected, self.seed = expected, seed
        self.description = f"random weights (seed {seed})"

    def read(self, keys) -> dict[str, np.ndarray]:
        return random.tensors({k: self.expected[k] for k in keys}, self.seed)


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
