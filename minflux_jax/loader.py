"""The training data side: a step's batch read, prefetched and placed on the mesh, through grain.

The data set's `global_batch(step, batch_size, part)` (`minflux.data`: in memory, or cached shards streamed from
disk) through grain: a `MapDataset` over steps, each process reading only its part of every global batch
(`grain.sharding.ShardByJaxProcess`), prefetched by background threads (`to_iter_dataset`), so the step does not
wait for the disk. The iterator's state (grain's checkpointable position) is saved with the model.
"""

from __future__ import annotations

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))  # the batch axis over every device


class Batches:
    """The data side of `minflux_jax.trainer.Trainer` (a base class): reads the batches of its data set
    (`self.data`) for its options (`self.opts`: batch_size, prefetch), model (`self.cfg`, `self.guidance`) and
    mesh (`self.mesh`), from its current step (`self.step`); keeps the prefetching iterator in `self._loader` at
    `self._loader_step` and the last batch's shapes in `self.last`."""

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's share of the global batch of micro-step `step` (numpy): the data set reads only that
        part (`grain.sharding.ShardByJaxProcess`), and guidance-distilled models get their guidance value."""
        shard = grain.sharding.ShardByJaxProcess()
        arrays = self.data.global_batch(
            step, self.opts.batch_size, (shard.shard_index, shard.shard_count)
        )
        if self.cfg.guidance_embed:
            arrays["guidance"] = np.full((len(arrays["img"]),), self.guidance, np.float32)
        return arrays

    def place(self, arrays: dict[str, np.ndarray]) -> dict:
        """Local numpy arrays -> global arrays, the batch axis over every device of the mesh."""
        sharding = batch_sharding(self.mesh)
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in arrays.items()}

    def batch(self, step: int) -> dict:
        """The global batch of micro-step `step`, this process's share placed on its devices (read now, not
        prefetched)."""
        return self.place(self.local_batch(step))

    def loader(self, step: int):
        """A grain iterator over the local batches from micro-step `step` on: `MapDataset.range` over steps mapped
        to `local_batch`, read ahead by `prefetch` background threads (`to_iter_dataset`); its state is the next
        step (grain's checkpointable iterator state, which `save` stores)."""
        steps = grain.MapDataset.range(0, 1 << 62).map(self.local_batch)
        if self.opts.prefetch:
            options = grain.ReadOptions(
                num_threads=self.opts.prefetch, prefetch_buffer_size=self.opts.prefetch
            )
        else:
            options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        it = iter(steps.to_iter_dataset(options))
        it.set_state({"next_index": step})
        return it

    def next_batch(self) -> dict:
        """The batch of the current micro-step, from the prefetching loader (rebuilt at the current step when the
        step was changed from outside, e.g. by `restore`)."""
        if self._loader is None or self._loader_step != self.step:
            self._loader, self._loader_step = self.loader(self.step), self.step
        arrays = next(self._loader)
        self._loader_step += 1
        self.last = {k: v.shape for k, v in arrays.items()}  # for the tokens/s and MFU of the step
        return self.place(arrays)

    def loader_state(self) -> dict:
        """The grain iterator's state at the current step (what a resumed loader starts from)."""
        if self._loader is not None and self._loader_step == self.step:
            return self._loader.get_state()
        return {"next_index": self.step}
