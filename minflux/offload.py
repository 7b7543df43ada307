"""Block offloading, the framework-free part: which keys are a block's, reading them, and fetching ahead.

`generate --offload blocks` runs a transformer whose blocks do not all fit: the small parts (embedders,
modulations, final layer) stay on the device, and each double and single block's weights come onto it just
before its turn and leave after it, the next block's fetched while the current one computes (a worker thread
here; on a GPU the frameworks also copy on their own stream). The frameworks' runners
(`minflux_torch/offload.py`, `minflux_jax/offload.py`) supply what a fetch does; this module holds what they
share: the block order the forward follows, the reading of a block's tensors from a checkpoint (kept packed
where the model keeps quantized layers), and `Prefetch`, the one-ahead schedule the tests check.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from minflux import quant
from minflux.checkpoint import BflReader

# the forward runs every double block, then every single block, then the final layer
BLOCKS = ("double_blocks", "single_blocks")


def block_names(cfg) -> list[str]:
    """The blocks of a transformer config in the order its forward runs them: "double_blocks.0", ...,
    "single_blocks.N"."""
    counts = (cfg.depth, cfg.depth_single_blocks)
    return [f"{kind}.{i}" for kind, n in zip(BLOCKS, counts, strict=True) for i in range(n)]


def split_keys(keys, names: list[str]) -> tuple[list[str], list[list[str]]]:
    """BFL keys -> (the keys outside every block, each block's keys in the order of `names`)."""
    index = {name: i for i, name in enumerate(names)}
    head, blocks = [], [[] for _ in names]
    for key in keys:
        kind, _, rest = key.partition(".")
        i = index.get(f"{kind}.{rest.partition('.')[0]}") if kind in BLOCKS else None
        (head if i is None else blocks[i]).append(key)
    return head, blocks


def read(
    reader: BflReader, keys: list[str], keep_quantized: bool, prefix: str = ""
) -> tuple[dict[str, quant.Packed], dict[str, np.ndarray]]:
    """Tensors `keys` of a checkpoint, keyed without `prefix`: (the weights kept packed, the others).

    With `keep_quantized`, a linear weight the file stores quantized in a format the frameworks keep
    (`quant.KEPT`) comes back packed, as `load_model(..., keep_quantized=True)` keeps it; every other tensor
    is read as `BflReader.read` reads it (fp8 widened to float32, exactly). Plain file reads, not a memory
    map: pages read through a map stay in the process's RSS until it is unmapped. Raises CheckpointError as
    `BflReader.read` / `packed` do (NaN / Inf, a truncated file)."""
    packed, plain = {}, {}
    for key in keys:
        p = reader.packed(key) if keep_quantized else None
        if p is not None and p.format in quant.KEPT:
            packed[key.removeprefix(prefix)] = p
        else:
            plain[key.removeprefix(prefix)] = reader.read(key)
    return packed, plain


class Prefetch:
    """Items fetched one ahead in a worker thread: `take(i)` waits for item i (fetching it now if it was not
    fetched ahead), then starts fetching item i + 1 (item 0 after the last: the next forward's first block),
    so item i + 1 is read and moved while item i is in use. At most two items are held: the one in use and
    the next. `fetch(i)` runs in the worker; what it raises, `take` raises. `trace`, a list, records
    ("fetch", i) as each fetch starts, for the tests (the runners add ("run", i) and ("release", i))."""

    def __init__(self, count: int, fetch: Callable[[int], Any], trace: list | None = None):
        self.count, self.fetch, self.trace = count, fetch, trace
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="minflux-offload")
        self.pending: dict[int, Future] = {}

    def log(self, event: str, i: int) -> None:
        if self.trace is not None:
            self.trace.append((event, i))

    def _start(self, i: int) -> Future:
        self.log("fetch", i)
        return self.worker.submit(self.fetch, i)

    def take(self, i: int) -> Any:
        """Item i, once fetched; the fetch of item i + 1 started."""
        item = self.pending.pop(i, None) or self._start(i)
        try:
            out = item.result()
        except BaseException:
            self.close()
            raise
        nxt = (i + 1) % self.count
        if nxt not in self.pending:
            self.pending[nxt] = self._start(nxt)
        return out

    def close(self) -> None:
        """Drop what was fetched ahead (waiting for a fetch under way); the worker stays usable."""
        for item in self.pending.values():
            if not item.cancel():
                item.exception()  # a fetch under way: waited for, its result (or error) dropped
        self.pending.clear()
