"""Build a PyTorch module and its Flax twin with the same weights (PyTorch's init, copied by the loader's rules)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from minflux_jax.load import assign
from minflux_torch.load import to_numpy

DTYPES = {"fp32": (torch.float32, jnp.float32), "bf16": (torch.bfloat16, jnp.bfloat16)}


def twins(torch_cls, jax_cls, *args, dtype: str = "fp32", seed: int = 0, **kwargs):
    """(torch module, jax module) sharing weights; norm scales are randomised so they matter."""
    tdt, jdt = DTYPES[dtype]
    torch.manual_seed(seed)
    t = torch_cls(*args, **kwargs)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if name.endswith("scale") or p.ndim == 1:  # ones / zeros by default: make them count
                p.copy_(
                    1 + 0.1 * torch.randn_like(p)
                    if name.endswith("scale")
                    else 0.1 * torch.randn_like(p)
                )
    t = t.to(tdt).eval()
    j = jax_cls(*args, **kwargs, dtype=jdt, rngs=nnx.Rngs(0))
    assign(j, {k: to_numpy(v) for k, v in t.state_dict().items()})
    return t, j


def inputs(rng: np.random.Generator, *shapes, dtype: str = "fp32"):
    """Seeded standard-normal arrays, as (torch tensors, jax arrays) of the same values."""
    tdt, jdt = DTYPES[dtype]
    arrs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    return [torch.from_numpy(a).to(tdt) for a in arrs], [jnp.asarray(a, jdt) for a in arrs]


def out(x) -> np.ndarray:
    """Any output (torch or jax, any dtype) as float64 numpy."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().numpy().astype(np.float64)
    return np.asarray(jax.device_get(jnp.asarray(x, jnp.float32)), np.float64)
