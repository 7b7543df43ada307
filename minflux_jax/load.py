"""Build, load and save models in Flax NNX. Twin: `minflux_torch/load.py`.

Loading is driven by the target model's own abstract state (`nnx.eval_shape`):
each Flax parameter path gets its PyTorch/BFL key and layout from the generic
rules in `minflux.keymaps` (module class + parameter name), never from a
hand-written function per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minflux import checkpoint, configs, keymaps
from minflux_jax.flux1 import Flux
from minflux_jax.flux2 import Flux2

MODELS: dict[str, type[nnx.Module]] = {"flux1": Flux, "flux2": Flux2}
STATE = (nnx.Param, nnx.BatchStat)  # what a checkpoint holds


def torch_keys(model: nnx.Module) -> dict[tuple, tuple[str, str]]:
    """Flax state path -> (PyTorch/BFL key, Flax parameter name), by the rules in `keymaps.FLAX_NAMES`."""
    classes = {path: type(m).__name__ for path, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}
    out = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, STATE)):
        module, param = path[:-1], path[-1]
        out[path] = (".".join(map(str, (*module, keymaps.flax_rule(classes[module], param)))), param)
    return out


def build_model(cfg_or_name, seed: int = 0, dtype=jnp.float32) -> nnx.Module:
    """A model with random weights (Flax's default init, seeded)."""
    cfg = configs.resolve(cfg_or_name)
    return MODELS[cfg.family](cfg, dtype=dtype, rngs=nnx.Rngs(seed))


def load_model(cfg_or_name, path, dtype=jnp.bfloat16) -> nnx.Module:
    """Load a checkpoint (BFL, prefixed BFL or diffusers layout; file or directory of shards)."""
    cfg = configs.resolve(cfg_or_name)
    abstract = nnx.eval_shape(lambda: MODELS[cfg.family](cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    names = torch_keys(abstract)
    flat = dict(nnx.to_flat_state(nnx.state(abstract, STATE)))
    by_key = {key: (path, param) for path, (key, param) in names.items()}
    expected = {key: keymaps.flax_to_torch(np.broadcast_to(np.empty((), np.int8), flat[path].shape), param).shape
                for path, (key, param) in names.items()}
    values = {}
    for key, arr in checkpoint.read_bfl(path, expected, cfg):
        p, param = by_key[key]
        values[p] = jnp.asarray(keymaps.torch_to_flax(arr, param), dtype=flat[p].dtype)
    for p, var in nnx.to_flat_state(state):
        if p in values:
            var.set_value(values[p])
    return nnx.merge(graphdef, state)


def save_model(model: nnx.Module, path, layout: str = "bfl") -> None:
    """Write a model's weights as safetensors in `layout` ("bfl", "bfl-prefixed" or "diffusers")."""
    flat = dict(nnx.to_flat_state(nnx.state(model, STATE)))
    tensors = {key: np.asarray(keymaps.flax_to_torch(np.asarray(jax.device_get(flat[p][...])), param))
               for p, (key, param) in torch_keys(model).items()}
    checkpoint.save_bfl(path, tensors, model.params, layout)
