"""Block offloading in JAX / Flax NNX: a transformer larger than the device, its blocks streamed onto it one at a
time.

The small parts of the model (embedders, modulations, final layer) stay on the device. Each double and single
block's weights stay off it -- in host memory (the device's "pinned_host" memory kind where it has one), or in
the checkpoint file itself, read again at each use -- and come onto the device just before the block runs and
leave right after: the forward calls every block through a `layers.BlockRunner`, and `Offloader` is one. While
block i computes, a worker thread reads block i + 1 (`minflux.offload.Prefetch`) and `jax.device_put`s it
(asynchronous: the copy overlaps the compute already dispatched). Each block runs as one compiled program with
its weights as arguments, one program per block structure and input shapes shared by every block of that kind,
so streaming compiles nothing per block or per step. At most three blocks' weights are on the device: the one
computing, the one queued before it, and the next one copying.

The sampler's loops are compiled whole (`sampling._denoise_loop`), which a runner that reads files cannot run
inside: `streaming` runs them as Python loops (`jax.disable_jit`), and the runner compiles each block call
itself. The embedders then run op by op; the blocks, which hold nearly all the work, compiled.

Quantized layers compose: with `keep_quantized`, the weights a file stores in fp8 (or NVFP4, GGUF) travel and
sit on the device packed, and `quant.QuantLinear` dequantizes each one inside the block's program. Nothing here
computes: the blocks' own forwards run unchanged. The pictures equal those without offloading to within fp32
rounding, not bitwise: XLA compiles the whole loop as one program without offloading and each block as its own
with it, and fuses differently across those boundaries.

On a CPU there is no separate device: there the point is the process's memory. `load_model` keeps the blocks
in the file (`source="file"`, the default on CPU): each is read, cast (or kept packed) and freed around its
turn, so a model larger than RAM can generate.

    model, offloader = offload.load_model("flux1-dev", "flux1-dev-fp8.safetensors", keep_quantized=True)
    images = pipeline.generate(model, ae, req, offload=offloader)

Twin: `minflux_torch/offload.py`.
"""

from __future__ import annotations

import contextlib
from collections import deque
from functools import partial

import jax
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from minflux import checkpoint, configs, keymaps, offload
from minflux_jax import load as jload
from minflux_jax import quant
from minflux_jax.layers import DoubleStreamBlockBase, SingleStreamBlockBase

BLOCK_TYPES = (DoubleStreamBlockBase, SingleStreamBlockBase)


@partial(jax.jit, static_argnames=("graphdef", "method", "static"))
def _call(graphdef, state, method: str, static: tuple, args, kwargs):
    """`module.method(*args, **kwargs, **dict(static))` for the module `graphdef` + `state`, compiled: one
    program per module structure and input shapes (the `jit_call` of `parity.frameworks`). `static`: the
    Python ints among the keywords (klein KV's n_ref slices by it)."""
    return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs, **dict(static))


def _path(key: str) -> tuple:
    """A state-dict key as a Flax path: "img_mlp.0.weight_q" -> ("img_mlp", 0, "weight_q")."""
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def _layout(block: nnx.Module) -> dict[str, tuple[tuple, str, np.dtype]]:
    """PyTorch/BFL key -> (Flax path, Flax parameter name, dtype) for each parameter of `block`."""
    flat = dict(nnx.to_flat_state(nnx.state(block, jload.STATE)))
    return {k: (p, param, flat[p].dtype) for p, (k, param) in jload.torch_keys(block).items()}


def _host(packed: dict, plain: dict[str, np.ndarray], layout: dict) -> dict[tuple, np.ndarray]:
    """What `offload.read` returned, as the Flax state of the module the keys belong to: the plain tensors laid
    out and cast as `load.assign` does, the packed arrays under the names `quant.QuantLinear` gives them."""
    host = {}
    for key, arr in plain.items():
        path, param, dtype = layout[key]
        host[path] = np.asarray(keymaps.torch_to_flax(arr, param), dtype=dtype)
    for key, p in packed.items():
        name = key.removesuffix(".weight")
        host.update({_path(f"{name}.{quant._buffer(n)}"): a for n, a in p.arrays.items()})
    return host


class FileBlocks:
    """The blocks' weights kept in the checkpoint: `blocks(i)` reads block i (packed where the model keeps
    quantized layers) as host arrays, at each use."""

    def __init__(self, reader: checkpoint.BflReader, model: nnx.Module, keep_quantized: bool):
        self.reader, self.keep_quantized = reader, keep_quantized
        self.names = offload.block_names(model.params)
        _, self.keys = offload.split_keys(reader.keys(), self.names)
        self.layouts = [_layout(b) for b in [*model.double_blocks, *model.single_blocks]]

    def __call__(self, i: int) -> tuple[dict, dict[tuple, np.ndarray]]:
        """(the packed weights, for the block's first use, where its linears become QuantLinears; the Flax state
        of block i on the host, by path)."""
        packed, plain = offload.read(
            self.reader, self.keys[i], self.keep_quantized, self.names[i] + "."
        )
        return packed, _host(packed, plain, self.layouts[i])


def _swapped(block: nnx.Module, packed: dict, dtype) -> nnx.GraphDef:
    """The structure of `block` with the linears `packed` holds as QuantLinears (a copy: the block stays)."""
    block = nnx.clone(block)
    quant.swap_linears(block, packed, dtype)
    return nnx.graphdef(block)


class Offloader:
    """The `layers.BlockRunner` of an offloaded model (from `load_model` or `offload_model`): each block's
    weights fetched ahead onto the device and passed to the block's compiled program, then released.

    `source(i)` gives block i's weights on the host: (packed weights for its first use, Flax state by path);
    it runs in the worker thread. `trace`, a list, records the moves in order: ("fetch", i) as block i's fetch
    starts, ("run", i), ("release", i). The forward must call the blocks in order (`Offloaded` starts each
    forward at the first); any other module (the final layer) runs as it is, compiled."""

    def __init__(self, model: nnx.Module, source, dtype, trace: list | None = None):
        blocks = [*model.double_blocks, *model.single_blocks]
        # the runner keeps the blocks' structures: the sampler hands it copies (nnx.merge)
        self.kinds = [type(b) for b in blocks]
        self.graphdefs = [nnx.graphdef(b) for b in blocks]
        self.abstract = blocks
        self.device = jax.devices()[0]
        self.source, self.dtype = source, dtype
        self.prefetch = offload.Prefetch(len(blocks), self._fetch, trace)
        self.cursor, self.inflight, self.swapped = 0, deque(), set()

    def _fetch(self, i: int) -> tuple[dict, list, list]:
        """Block i's weights on the device (worker thread; the copies run asynchronously)."""
        packed, host = self.source(i)
        paths = list(host)
        return (
            packed,
            paths,
            jax.device_put([host[p] for p in paths], SingleDeviceSharding(self.device)),
        )

    def restart(self) -> None:
        """A new forward: the next block called is the first."""
        self.cursor = 0

    def __call__(self, fn, /, *args, **kwargs):
        """`fn(*args, **kwargs)`, fn a block or one of its methods (klein KV's `forward_kv`), compiled, with the
        block's weights on the device for the call; any other module runs as it is, compiled."""
        module = getattr(fn, "__self__", fn)
        method = fn.__name__ if module is not fn else "__call__"
        static = tuple((k, v) for k, v in kwargs.items() if isinstance(v, int))
        kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, int)}
        # compiled, also where `streaming` runs the sampler's loop eagerly
        with jax.disable_jit(False):
            # the final layer, resident: the forward ends with it
            if not isinstance(module, BLOCK_TYPES):
                self.restart()
                return _call(*nnx.split(module), method, static, args, kwargs)
            i, self.cursor = self.cursor, self.cursor + 1
            if i >= len(self.kinds) or type(module) is not self.kinds[i]:
                raise RuntimeError(
                    f"offload: block {i} of {len(self.kinds)} expected; the forward ran another"
                )
            # block i - 2 done: at most three blocks' weights on the device
            if len(self.inflight) == 2:
                jax.block_until_ready(self.inflight.popleft())
            packed, paths, weights = self.prefetch.take(i)
            # its first use: the linears the file packs become QuantLinears
            if packed and i not in self.swapped:
                self.graphdefs[i] = _swapped(self.abstract[i], packed, self.dtype)
                self.swapped.add(i)
            state = nnx.from_flat_state(list(zip(paths, weights, strict=True)))
            del weights
            self.prefetch.log("run", i)
            out = _call(self.graphdefs[i], state, method, static, args, kwargs)
            del state  # released: freed once the block's program is done with it
            self.prefetch.log("release", i)
            self.inflight.append(out)
            return out

    def close(self) -> None:
        """Drop the weights fetched ahead (the next forward's first block) and start over."""
        self.prefetch.close()
        self.inflight.clear()
        self.restart()


class Offloaded(nnx.Module):
    """`model` as the samplers call it, every block through `run`: `model(**kw)` is the model's forward with
    `run=`, and klein KV's `forward_kv` / `forward_cached` too; `params` is the model's."""

    def __init__(self, model: nnx.Module, run: Offloader):
        self.model, self.run, self.params = model, run, model.params

    def __call__(self, *args, **kwargs):
        self.run.restart()
        return self.model(*args, **kwargs, run=self.run)

    def forward_kv(self, *args, **kwargs):
        self.run.restart()
        return self.model.forward_kv(*args, **kwargs, run=self.run)

    def forward_cached(self, *args, **kwargs):
        self.run.restart()
        return self.model.forward_cached(*args, **kwargs, run=self.run)


@contextlib.contextmanager
def streaming(model: nnx.Module, offloader: Offloader | None):
    """The model to sample with: `model` itself, or with an offloader, `Offloaded(model, offloader)`, the sampler's
    compiled loops then run as Python loops (`jax.disable_jit`; the runner compiles each block call); on leaving,
    the offloader drops what it fetched ahead."""
    if offloader is None:
        yield model
        return
    try:
        with jax.disable_jit():
            yield Offloaded(model, offloader)
    finally:
        offloader.close()


def _load_head(model: nnx.Module, tensors: dict[str, np.ndarray]) -> None:
    """Every child of the model but the blocks from `tensors` (BFL keys), strictly, child by child."""
    for name, child in vars(model).items():
        if isinstance(child, nnx.Module) and name not in offload.BLOCKS:
            prefix = name + "."
            jload.assign(
                child, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )


def load_model(
    cfg_or_name,
    path,
    dtype=jax.numpy.bfloat16,
    keep_quantized: bool = False,
    source: str | None = None,
    trace: list | None = None,
) -> tuple[nnx.Module, Offloader]:
    """A transformer checkpoint loaded for offloading: (the model, its `Offloader`, to pass as `run=` or to
    `pipeline.generate(..., offload=)`).

    The parts outside the blocks are loaded onto the default device as `load.load_model` loads them; the blocks
    stay abstract and their weights in `source`: "file" (read from `path` again at each use: the default on a
    CPU, where it is what saves memory) or "host" (read once into host memory, the device's "pinned_host" kind
    where it has one: the default elsewhere). keep_quantized: as `load.load_model` (packed on the device,
    dequantized layer by layer). Raises CheckpointError as `load.load_model` does (a block's NaN / Inf when it
    is read)."""
    cfg = configs.resolve(cfg_or_name)
    model = jload.abstract_model(cfg, dtype)
    reader = checkpoint.BflReader(path, jload.torch_shapes(model), cfg)
    head, _ = offload.split_keys(reader.keys(), offload.block_names(cfg))
    packed, plain = offload.read(reader, head, keep_quantized)
    quant.swap_linears(model, packed, dtype)
    _load_head(model, plain)
    blocks = FileBlocks(reader, model, keep_quantized)
    source = source or ("file" if jax.devices()[0].platform == "cpu" else "host")
    if source == "host":  # every block read now, its linears swapped now
        host = []
        for i, block in enumerate([*model.double_blocks, *model.single_blocks]):
            packed, arrays = blocks(i)
            quant.swap_linears(block, packed, dtype)
            nnx.update(block, jax.tree.map(_abstract, nnx.state(block)))
            host.append(({}, _pin(arrays)))
        blocks = host.__getitem__
    elif source != "file":
        raise ValueError(f"offload source {source!r}: expected 'file' or 'host'")
    return model, Offloader(model, blocks, dtype, trace)


def _abstract(a) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype)


def _pin(arrays: dict) -> dict:
    """Host copies of `arrays`, in the default device's "pinned_host" memory where it has that kind (copies
    from it are asynchronous), else numpy."""
    device = jax.devices()[0]
    if "pinned_host" not in {m.kind for m in device.addressable_memories()}:
        return {p: np.asarray(a) for p, a in arrays.items()}
    paths = list(arrays)
    pinned = jax.device_put(
        [arrays[p] for p in paths], SingleDeviceSharding(device, memory_kind="pinned_host")
    )
    return dict(zip(paths, pinned, strict=True))


def offload_model(model: nnx.Module, trace: list | None = None) -> Offloader:
    """Offload a model in memory (built, loaded, LoRA-merged, `fp8.quantize_model`-ed): its blocks' weights
    move to host memory (pinned where the device has it) and the blocks become abstract; the rest stays where
    it is. Returns its `Offloader`."""
    host = []
    for block in [*model.double_blocks, *model.single_blocks]:
        state = nnx.state(block)
        host.append(({}, _pin({p: v[...] for p, v in nnx.to_flat_state(state)})))
        nnx.update(block, jax.tree.map(_abstract, state))
    return Offloader(model, host.__getitem__, model.dtype, trace)
