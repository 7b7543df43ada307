"""minflux in JAX / Flax NNX: FLUX.1 and FLUX.2 with the official checkpoint names."""

from minflux_jax.load import build_model, load_model, save_model
from minflux_jax.lora import load_lora

__all__ = ["build_model", "load_lora", "load_model", "save_model"]
