"""The two sides of a parity run: abstract models whose parts are materialised one stage at a time.

A stage is a set of BFL keys (the "head": embedders + final layer; or one block). Its weights are read,
loaded into a PyTorch module and a Flax module, used, and dropped, so a run never holds two whole models.
"""

from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from flax import nnx

import minflux_jax.load as jload
import minflux_torch.load as tload

DTYPES = {"fp32": (torch.float32, jnp.float32), "bf16": (torch.bfloat16, jnp.bfloat16)}
NP_DTYPES = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16}


def nbytes(tensors: dict[str, np.ndarray], dtype: str) -> int:
    return sum(int(np.prod(v.shape)) for v in tensors.values()) * (4 if dtype == "fp32" else 2)


class TorchSide:
    def __init__(self, cfg, dtype: str, device: str):
        self.cfg, self.dtype, self.device = cfg, DTYPES[dtype][0], torch.device(device)
        with torch.device("meta"):
            self.model = tload.MODELS[cfg.family](cfg).to(self.dtype)
        self.expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}

    def materialise(
        self, module: torch.nn.Module, tensors: dict[str, np.ndarray]
    ) -> torch.nn.Module:
        module.to_empty(device=self.device)
        module.load_state_dict({k: tload.to_torch(v) for k, v in tensors.items()}, strict=True)
        return module.eval()

    def input(self, arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)

    @staticmethod
    def output(t) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    def to_numpy(self, tree, cache: dict | None = None):
        """PyTorch tensors -> numpy, exactly (bf16 bits preserved); a tensor seen before (by identity, in
        `cache`) is converted once."""
        cache = {} if cache is None else cache

        def one(t):
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) not in cache:
                cache[id(t)] = (t, tload.to_numpy(t))  # the tensor is kept so its id stays its own
            return cache[id(t)][1]

        return jax.tree.map(one, tree)


@functools.lru_cache(maxsize=8)
def _abstract_model(cfg, dtype, device):
    """One abstract model per (config, dtype, device) in a process: tracing a model's constructor is slow,
    and every user restores what it assigns (`JaxSide.materialise` works on clones)."""
    with jax.default_device(device):
        return jload.abstract_model(cfg, dtype)


class JaxSide:
    def __init__(self, cfg, dtype: str, device: str):
        self.cfg, self.dtype, self.np_dtype = cfg, DTYPES[dtype][1], NP_DTYPES[dtype]
        self.device = jax.devices("gpu" if device.startswith("cuda") else "cpu")[0]
        self.model = _abstract_model(cfg, self.dtype, self.device)

    def cast(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Weights in the run's dtype, cast in numpy (round to nearest even, as XLA): a cast by JAX would
        compile one conversion program per shape."""
        return {k: np.asarray(v, self.np_dtype) for k, v in tensors.items()}

    def assign(self, module: nnx.Module, tensors: dict[str, np.ndarray]) -> None:
        with jax.default_device(self.device):
            jload.assign(module, self.cast(tensors))

    def materialise(self, module: nnx.Module, tensors: dict[str, np.ndarray]) -> nnx.Module:
        module = nnx.clone(module)  # the abstract original stays abstract
        self.assign(module, tensors)
        return module

    def input(self, arr: np.ndarray, cast: bool = False) -> jax.Array:
        """numpy -> an array on this side's device; with cast, in the run's dtype (cast in numpy)."""
        return jax.device_put(np.asarray(arr, self.np_dtype) if cast else arr, self.device)

    def from_numpy(self, tree, cache: dict | None = None):
        """numpy arrays -> arrays on this side's device (committed, like every array the run computes, so a
        compiled block serves PyTorch's inputs and JAX's own alike); one seen before, by identity, once."""
        cache = {} if cache is None else cache

        def one(a):
            if not isinstance(a, np.ndarray):
                return a
            if id(a) not in cache:
                cache[id(a)] = (a, jax.device_put(a, self.device))
            return cache[id(a)][1]

        return jax.tree.map(one, tree)

    @staticmethod
    def output(a) -> np.ndarray:
        # bf16 widened in numpy: exact, and nothing to compile
        return np.asarray(jax.device_get(a), np.float32)


@partial(jax.jit, static_argnums=0)
def _run(graphdef, state, args, kwargs):
    return nnx.merge(graphdef, state)(*args, **kwargs)


def jit_call(module, *args, **kwargs):
    """`module(*args, **kwargs)` compiled: one program per module structure and input shapes, shared by every
    block of one shape and by the teacher-forced and free-running calls (eager JAX would compile every op
    separately). jax.jit over the split module: its dispatch costs less than nnx.jit's state bookkeeping."""
    return _run(*nnx.split(module), args, kwargs)


def strip(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in tensors.items()}
