"""The two sides of a parity run: abstract models whose parts are materialised one stage at a time.

A stage is a set of BFL keys (the "head": embedders + final layer; or one block). Its weights are read,
loaded into a PyTorch module and a Flax module, used, and dropped, so a run never holds two whole models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import minflux_jax.load as jload
import minflux_torch.load as tload

DTYPES = {"fp32": (torch.float32, jnp.float32), "bf16": (torch.bfloat16, jnp.bfloat16)}


def nbytes(tensors: dict[str, np.ndarray], dtype: str) -> int:
    return sum(int(np.prod(v.shape)) for v in tensors.values()) * (4 if dtype == "fp32" else 2)


class TorchSide:
    def __init__(self, cfg, dtype: str, device: str):
        self.cfg, self.dtype, self.device = cfg, DTYPES[dtype][0], torch.device(device)
        with torch.device("meta"):
            self.model = tload.MODELS[cfg.family](cfg).to(self.dtype)
        self.expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}

    def materialise(self, module: torch.nn.Module, tensors: dict[str, np.ndarray]) -> torch.nn.Module:
        module.to_empty(device=self.device)
        module.load_state_dict({k: tload.to_torch(v) for k, v in tensors.items()}, strict=True)
        return module.eval()

    def input(self, arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)

    @staticmethod
    def output(t) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    def to_jax(self, tree):
        """Hand PyTorch tensors to JAX exactly (bf16 bits preserved)."""
        return jax.tree.map(lambda t: jnp.asarray(tload.to_numpy(t)) if isinstance(t, torch.Tensor) else t, tree)


class JaxSide:
    def __init__(self, cfg, dtype: str, device: str):
        self.cfg, self.dtype = cfg, DTYPES[dtype][1]
        self.device = jax.devices("gpu" if device.startswith("cuda") else "cpu")[0]
        with jax.default_device(self.device):
            self.model = jload.abstract_model(cfg, self.dtype)

    def materialise(self, module: nnx.Module, tensors: dict[str, np.ndarray]) -> nnx.Module:
        module = nnx.clone(module)  # the abstract original stays abstract
        with jax.default_device(self.device):
            jload.assign(module, tensors)
        return module

    def input(self, arr: np.ndarray) -> jax.Array:
        return jax.device_put(jnp.asarray(arr), self.device)

    @staticmethod
    def output(a) -> np.ndarray:
        return np.asarray(jax.device_get(a.astype(jnp.float32)))


def strip(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in tensors.items()}
