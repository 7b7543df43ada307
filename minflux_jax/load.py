"""Build, load and save models in Flax NNX. Twin: `minflux_torch/load.py`.

Loading is driven by the target model's own abstract state (`nnx.eval_shape`):
each Flax parameter path gets its PyTorch/BFL key and layout from the generic
rules in `minflux.keymaps` (module class + parameter name), never from a
hand-written function per layer.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minflux import checkpoint, configs, keymaps, random
from minflux_jax.autoencoder import AutoEncoder
from minflux_jax.flux1 import Flux
from minflux_jax.flux2 import Flux2

MODELS: dict[str, type[nnx.Module]] = {
    "flux1": Flux,
    "flux2": Flux2,
    "ae1": AutoEncoder,
    "ae2": AutoEncoder,
}
STATE = (nnx.Param, nnx.BatchStat)  # what a checkpoint holds


def torch_keys(model: nnx.Module) -> dict[tuple, tuple[str, str]]:
    """Flax state path -> (PyTorch/BFL key, Flax parameter name), by the rules in `keymaps.FLAX_NAMES`."""
    classes = {
        path: type(m).__name__ for path, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)
    }
    out = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, STATE)):
        module, param = path[:-1], path[-1]
        out[path] = (
            ".".join(map(str, (*module, keymaps.flax_rule(classes[module], param)))),
            param,
        )
    return out


def torch_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """The PyTorch/BFL key and shape of every parameter of `module`."""
    flat = dict(nnx.to_flat_state(nnx.state(module, STATE)))
    return {
        key: _torch_shape(flat[path].shape, param)
        for path, (key, param) in torch_keys(module).items()
    }


def _torch_shape(flax_shape: tuple[int, ...], param: str) -> tuple[int, ...]:
    # a broadcast view costs no memory; the layout rule gives the PyTorch shape
    return keymaps.flax_to_torch(np.broadcast_to(np.empty((), np.int8), flax_shape), param).shape


def assign(module: nnx.Module, tensors) -> None:
    """Set every parameter of `module` (concrete or abstract) from PyTorch-layout tensors, strictly.

    `tensors` maps keys relative to `module` to numpy arrays, or is an iterable of (key, array) that is
    consumed one tensor at a time (each becomes a device array before the next is read).
    """
    names = torch_keys(module)
    by_key = {key: (path, param) for path, (key, param) in names.items()}
    flat = dict(nnx.to_flat_state(nnx.state(module, STATE)))
    values, unexpected = {}, []
    for key, arr in tensors.items() if hasattr(tensors, "items") else tensors:
        if key not in by_key:
            unexpected.append(key)
            continue
        path, param = by_key[key]
        if keymaps.torch_to_flax(arr, param).shape != flat[path].shape:
            raise checkpoint.CheckpointError(
                f"{type(module).__name__}: {key}: expected "
                f"{_torch_shape(flat[path].shape, param)}, found {arr.shape}"
            )
        # a numpy copy (on CPU a device array may alias its numpy buffer, e.g. a live PyTorch tensor's memory),
        # cast and put on the device without a compiled program per shape (jnp.array(..., dtype) compiles one)
        values[path] = jax.device_put(
            host_copy(keymaps.torch_to_flax(arr, param), flat[path].dtype)
        )
    missing = sorted(names[p][0] for p in set(names) - set(values))
    if missing or unexpected:
        raise checkpoint.CheckpointError(
            f"{type(module).__name__}: missing keys {missing[:10]}, "
            f"unexpected keys {sorted(unexpected)[:10]}"
        )
    nnx.update(module, nnx.from_flat_state(list(values.items())))


COPY_PARALLEL = 1 << 24  # elements: larger tensors are copied by every core, a block of rows each
COPY_TILE = 256  # a 2-D copy goes tile by tile: a transposed read stays in the cache (4x faster than copyto)


def host_copy(arr: np.ndarray, dtype) -> np.ndarray:
    """`arr` (any strides, e.g. a transposed view) cast to `dtype` in a new C-contiguous, 64-byte-aligned buffer.

    XLA's CPU client adopts such a buffer as the device array without a copy; an unaligned one (numpy's own
    allocations are 16-byte aligned) or a Fortran-ordered one it copies again, transposing at under 1 GB/s
    (1.2 of 2.8 s of a 1 GB bf16 load). On a GPU the buffer is what travels. 2-D tensors are copied a tile at a
    time, large ones by every core (numpy releases the GIL).
    """
    dtype = np.dtype(dtype)
    raw = np.empty(arr.size * dtype.itemsize + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start : start + arr.size * dtype.itemsize].view(dtype).reshape(arr.shape)
    if arr.ndim != 2 or arr.flags.c_contiguous:
        np.copyto(out, arr, casting="unsafe")
        return out
    t = COPY_TILE

    def rows(i0: int, i1: int) -> None:
        for i in range(i0, i1, t):
            for j in range(0, arr.shape[1], t):
                np.copyto(
                    out[i : min(i + t, i1), j : j + t],
                    arr[i : min(i + t, i1), j : j + t],
                    casting="unsafe",
                )

    workers = min(os.cpu_count() or 1, arr.size // COPY_PARALLEL + 1)
    bounds = np.linspace(0, arr.shape[0], workers + 1).astype(int)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(rows, bounds[:-1], bounds[1:]))
    return out


def abstract_model(cfg_or_name, dtype=jnp.float32) -> nnx.Module:
    """The model with ShapeDtypeStructs for values (no memory), as `nnx.eval_shape` of its constructor.

    Transformers are traced one block at a time and assembled: in flax 0.12 one trace of the whole
    model costs time quadratic in its depth (each rngs draw inside a trace formats an error message that
    walks the whole trace), 18 s for FLUX.1-dev against 1 s this way.
    """
    cfg = configs.resolve(cfg_or_name)
    build = lambda c: nnx.eval_shape(lambda: MODELS[cfg.family](c, dtype=dtype, rngs=nnx.Rngs(0)))  # noqa: E731
    if not hasattr(cfg, "depth"):
        return build(cfg)
    model = build(dataclasses.replace(cfg, depth=0, depth_single_blocks=0))
    one = build(dataclasses.replace(cfg, depth=1, depth_single_blocks=1))
    model.double_blocks = nnx.List([nnx.clone(one.double_blocks[0]) for _ in range(cfg.depth)])
    model.single_blocks = nnx.List(
        [nnx.clone(one.single_blocks[0]) for _ in range(cfg.depth_single_blocks)]
    )
    model.params = cfg
    return model


def build_model(cfg_or_name, seed: int = 0, dtype=jnp.float32) -> nnx.Module:
    """A model with seeded random weights (`minflux.random`, numpy): the same values `minflux_torch.build_model`
    gives for the same seed, so a random-weight model computes the same numbers in both frameworks."""
    model = abstract_model(cfg_or_name, dtype)
    assign(model, random.tensors(torch_shapes(model), seed))
    return model


def init_model(cfg_or_name, seed: int = 0, dtype=jnp.float32) -> nnx.Module:
    """A model with Flax's own initialisers (seeded): the starting point of training from scratch."""
    cfg = configs.resolve(cfg_or_name)
    return MODELS[cfg.family](cfg, dtype=dtype, rngs=nnx.Rngs(seed))


def load_model(
    cfg_or_name, path, dtype=jnp.bfloat16, verify: bool = False, keep_quantized: bool = False
) -> nnx.Module:
    """Load a checkpoint: BFL or diffusers names, bare or behind a component prefix, alone or in a bundle; one
    file, a directory of shards or a shard index; bf16 / fp16 / fp32 / fp8 (plain or scaled), NVFP4, GGUF.

    Every tensor is dequantized and cast to `dtype`, or with `keep_quantized` the linear weights a file stores
    quantized stay packed in `minflux_jax.quant.QuantLinear` layers that dequantize inside the forward (the
    model holds the file's size). `verify` checks each tensor against the SHA-256 its writer recorded (minflux
    convert / save_model). Raises CheckpointError naming the file and the key (see `checkpoint.BflReader`).
    """
    cfg = configs.resolve(cfg_or_name)
    model = abstract_model(cfg, dtype)
    reader = checkpoint.BflReader(path, torch_shapes(model), cfg, verify)
    from minflux_jax import quant  # here, not on top: quant -> fp8 -> lora -> load

    packed = reader.packed_weights() if keep_quantized else {}
    kept = set(packed)
    for key in list(packed):  # one at a time: each file array freed once its device copy exists
        quant.swap_linears(model, {key: packed.pop(key)}, dtype)
    assign(model, ((k, reader.read(k)) for k in reader.keys() if k not in kept))
    return model


def save_model(model: nnx.Module, path, layout: str = "bfl") -> None:
    """Write a model's weights as safetensors in `layout` ("bfl", "bfl-prefixed" or "diffusers"), atomically,
    with a SHA-256 digest per tensor in the metadata (checked by `load_model(..., verify=True)`)."""
    from minflux_jax import quant

    if quant.quantized_layers(model):
        raise ValueError(
            "the model keeps quantized layers (keep_quantized=True): load it dequantized to save it"
        )
    checkpoint.save_bfl(path, state_dict(model), model.params, layout)


def state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
    """PyTorch-layout numpy tensors of every parameter, keyed like the PyTorch twin's state_dict."""
    flat = dict(nnx.to_flat_state(nnx.state(module, STATE)))
    return {
        key: np.asarray(keymaps.flax_to_torch(np.asarray(jax.device_get(flat[p][...])), param))
        for p, (key, param) in torch_keys(module).items()
    }
