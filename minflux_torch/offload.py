"""Block offloading in PyTorch: a transformer larger than the device, its blocks streamed onto it one at a time.

The small parts of the model (embedders, modulations, final layer) stay on the device. Each double and single
block's weights stay off it -- in host memory (pinned, on CUDA), or in the checkpoint file itself, read again
at each use -- and come onto the device just before the block runs and leave right after: the forward calls
every block through a `layers.BlockRunner`, and `Offloader` is one. While block i computes, a worker thread
reads block i + 1 (`minflux.offload.Prefetch`) and, on CUDA, copies it from pinned memory on a second stream
(`non_blocking=True`); the compute stream waits on the copy's event, and each copied tensor is recorded on the
compute stream so the allocator does not hand its memory to the next copy before the block is done. At most
three blocks' weights are on the device: the one computing, the one queued before it, and the next one copying.

Quantized layers compose: with `keep_quantized`, the weights a file stores in fp8 (or NVFP4, GGUF) travel and
sit on the device packed, and `quant.QuantLinear` dequantizes each one in its own forward; a model quantized by
`fp8.quantize_model` moves its fp8 buffers the same way. Nothing here computes: the blocks' own forwards run
unchanged, so an offloaded model gives the same pictures (bitwise: the same kernels on the same weights).

On a CPU there is no separate device: there the point is the process's memory. `load_model` keeps the blocks
in the file (`source="file"`, the default on CPU): each is read, cast (or kept packed) and freed around its
turn, so a model larger than RAM can generate.

    model, offloader = offload.load_model("flux1-dev", "flux1-dev-fp8.safetensors", keep_quantized=True)
    images = pipeline.generate(model, ae, req, offload=offloader)

Twin: `minflux_jax/offload.py`.
"""

from __future__ import annotations

import contextlib
from collections import deque

import numpy as np
import torch
from torch import Tensor, nn

from minflux import checkpoint, configs, offload
from minflux_torch import quant
from minflux_torch.layers import DoubleStreamBlockBase, SingleStreamBlockBase
from minflux_torch.load import MODELS, to_torch

BLOCK_TYPES = (DoubleStreamBlockBase, SingleStreamBlockBase)


def _cast(arr: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A read tensor in the model dtype, as `load.load_model` casts it (floats only)."""
    floating = arr.dtype.kind == "f" or arr.dtype.name == "bfloat16"
    return to_torch(arr).to(dtype=dtype if floating else None)


def _host(packed: dict, plain: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, Tensor]:
    """What `offload.read` returned, as the state-dict tensors of the module the keys belong to: the plain
    tensors cast, the packed arrays under the names `quant.QuantLinear` gives them."""
    host = {k: _cast(a, dtype) for k, a in plain.items()}
    for key, p in packed.items():
        name = key.removesuffix(".weight")
        host.update({f"{name}.{quant._buffer(n)}": quant._tensor(a) for n, a in p.arrays.items()})
    return host


class FileBlocks:
    """The blocks' weights kept in the checkpoint: `blocks(i)` reads block i (packed where the model keeps
    quantized layers) as host tensors, at each use."""

    def __init__(self, reader: checkpoint.BflReader, cfg, dtype: torch.dtype, keep_quantized: bool):
        self.reader, self.dtype, self.keep_quantized = reader, dtype, keep_quantized
        self.names = offload.block_names(cfg)
        _, self.keys = offload.split_keys(reader.keys(), self.names)

    def __call__(self, i: int) -> tuple[dict, dict[str, Tensor]]:
        """(the packed weights, for the block's first use, where its linears become QuantLinears; the state-dict
        tensors of block i on the host)."""
        packed, plain = offload.read(
            self.reader, self.keys[i], self.keep_quantized, self.names[i] + "."
        )
        return packed, _host(packed, plain, self.dtype)


class Offloader:
    """The `layers.BlockRunner` of an offloaded model (from `load_model` or `offload_model`): each block's
    weights fetched ahead onto `device`, put into the block for its call, and released after it.

    `source(i)` gives block i's weights on the host: (packed weights for its first use, state-dict tensors);
    it runs in the worker thread. `trace`, a list, records the moves in order: ("fetch", i) as block i's fetch
    starts, ("run", i), ("release", i). The forward must call the blocks in order (`Offloaded` starts each
    forward at the first); any other module (the final layer) runs as it is."""

    def __init__(
        self, model: nn.Module, device, source, dtype: torch.dtype, trace: list | None = None
    ):
        self.blocks = [*model.double_blocks, *model.single_blocks]
        self.device, self.source, self.dtype = torch.device(device), source, dtype
        # CUDA: copies on their own stream, overlapping the compute stream's work
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.prefetch = offload.Prefetch(len(self.blocks), self._fetch, trace)
        self.cursor, self.inflight, self.swapped = 0, deque(), set()

    def _fetch(self, i: int) -> tuple[dict, dict[str, Tensor], torch.cuda.Event | None]:
        """Block i's weights on the device (worker thread), and the event the copies complete at (CUDA)."""
        packed, host = self.source(i)
        if self.stream is None:
            return packed, {k: v.to(self.device) for k, v in host.items()}, None
        with torch.cuda.stream(self.stream):
            pinned = {k: v if v.is_pinned() else v.pin_memory() for k, v in host.items()}
            weights = {k: v.to(self.device, non_blocking=True) for k, v in pinned.items()}
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return packed, weights, ready

    def restart(self) -> None:
        """A new forward: the next block called is the first."""
        self.cursor = 0

    def __call__(self, fn, /, *args, **kwargs):
        """`fn(*args, **kwargs)`, fn a block or one of its methods (klein KV's `forward_kv`), with the block's
        weights on the device for the call; any other module runs as it is."""
        module = getattr(fn, "__self__", fn)
        # the final layer, resident: the forward ends with it
        if not isinstance(module, BLOCK_TYPES):
            self.restart()
            return fn(*args, **kwargs)
        i, self.cursor = self.cursor, self.cursor + 1
        block = self.blocks[i] if i < len(self.blocks) else None
        if module is not block:
            raise RuntimeError(
                f"offload: block {i} of {len(self.blocks)} expected; the forward ran another"
            )
        # block i - 2 done: at most three blocks' weights on the device
        if len(self.inflight) == 2:
            self.inflight.popleft().synchronize()
        packed, weights, ready = self.prefetch.take(i)
        # its first use: the linears the file packs become QuantLinears
        if packed and i not in self.swapped:
            quant.swap_linears(block, packed, self.dtype, "meta")
            self.swapped.add(i)
        # the compute stream waits for the copies, and the allocator for the block
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for t in weights.values():
                t.record_stream(current)
        block.load_state_dict(weights, strict=True, assign=True)
        del weights
        self.prefetch.log("run", i)
        try:
            return fn(*args, **kwargs)
        finally:
            block.to("meta")  # released: the weights' last reference was the block's
            self.prefetch.log("release", i)
            if self.stream is not None:
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
                self.inflight.append(done)

    def close(self) -> None:
        """Drop the weights fetched ahead (the next forward's first block) and start over."""
        self.prefetch.close()
        self.inflight.clear()
        self.restart()


class Offloaded(nn.Module):
    """`model` as the samplers call it, every block through `run`: `model(**kw)` is the model's forward with
    `run=`, and klein KV's `forward_kv` / `forward_cached` too; `params` and `parameters()` are the model's."""

    def __init__(self, model: nn.Module, run: Offloader):
        super().__init__()
        self.model, self.run = model, run

    @property
    def params(self):
        return self.model.params

    def forward(self, *args, **kwargs):
        self.run.restart()
        return self.model(*args, **kwargs, run=self.run)

    def forward_kv(self, *args, **kwargs):
        self.run.restart()
        return self.model.forward_kv(*args, **kwargs, run=self.run)

    def forward_cached(self, *args, **kwargs):
        self.run.restart()
        return self.model.forward_cached(*args, **kwargs, run=self.run)


@contextlib.contextmanager
def streaming(model: nn.Module, offloader: Offloader | None):
    """The model to sample with: `model` itself, or with an offloader, `Offloaded(model, offloader)`; on leaving,
    the offloader drops what it fetched ahead."""
    if offloader is None:
        yield model
        return
    try:
        yield Offloaded(model, offloader)
    finally:
        offloader.close()


def _load_head(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Every child of the model but the blocks from `tensors` (BFL keys), strictly, child by child."""
    for name, child in model.named_children():
        if name not in offload.BLOCKS:
            prefix = name + "."
            part = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            child.load_state_dict(part, strict=True, assign=True)


def load_model(
    cfg_or_name,
    path,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    keep_quantized: bool = False,
    source: str | None = None,
    trace: list | None = None,
) -> tuple[nn.Module, Offloader]:
    """A transformer checkpoint loaded for offloading: (the model, its `Offloader`, to pass as `run=` or to
    `pipeline.generate(..., offload=)`).

    The parts outside the blocks are loaded onto `device` as `load.load_model` loads them; the blocks stay
    on "meta" and their weights in `source`: "file" (read from `path` again at each use: the default on a CPU,
    where it is what saves memory) or "host" (read once into host memory, pinned on CUDA: the default
    elsewhere). keep_quantized: as `load.load_model` (packed on the device, dequantized layer by layer).
    Raises CheckpointError as `load.load_model` does (a block's NaN / Inf when it is read)."""
    cfg = configs.resolve(cfg_or_name)
    device = torch.device(device)
    with torch.device("meta"):
        model = MODELS[cfg.family](cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    reader = checkpoint.BflReader(path, expected, cfg)
    head, _ = offload.split_keys(reader.keys(), offload.block_names(cfg))
    packed, plain = offload.read(reader, head, keep_quantized)
    state = quant.swap_linears(model, packed, dtype, device)
    state.update({k: _cast(a, dtype).to(device) for k, a in plain.items()})
    _load_head(model, state)
    blocks = FileBlocks(reader, cfg, dtype, keep_quantized)
    source = source or ("file" if device.type == "cpu" else "host")
    if source == "host":  # every block read now, its linears swapped now
        host = []
        for i, block in enumerate([*model.double_blocks, *model.single_blocks]):
            packed, tensors = blocks(i)
            quant.swap_linears(block, packed, dtype, "meta")
            host.append(({}, _pin(tensors, device)))
        blocks = host.__getitem__
    elif source != "file":
        raise ValueError(f"offload source {source!r}: expected 'file' or 'host'")
    return model.eval(), Offloader(model, device, blocks, dtype, trace)


def _pin(tensors: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Host copies of `tensors`, in pinned memory when the device is a CUDA GPU (copies from it are asynchronous)."""
    return {
        k: v.cpu().pin_memory() if device.type == "cuda" else v.cpu() for k, v in tensors.items()
    }


def offload_model(model: nn.Module, trace: list | None = None) -> Offloader:
    """Offload a model in memory (built, loaded, LoRA-merged, `fp8.quantize_model`-ed): its blocks' weights
    move to host memory (pinned on CUDA) and the blocks to "meta"; the rest stays where the model is. Returns
    its `Offloader`."""
    device = next(model.parameters()).device
    host = []
    for block in [*model.double_blocks, *model.single_blocks]:
        host.append(({}, _pin({k: v.detach() for k, v in block.state_dict().items()}, device)))
        block.to("meta")
    dtype = next(model.parameters()).dtype
    return Offloader(model, device, host.__getitem__, dtype, trace)
