"""LoRA for inference in PyTorch: load an adapter file (diffusers / PEFT or kohya keys) and merge it.

The file formats and the merge arithmetic are framework-free (`minflux/lora.py`); training happens in
JAX (`minflux_jax/lora.py`, the twin, which adds adapter init and the on-the-fly merge used by the step).
"""

from __future__ import annotations

from torch import nn

from minflux import lora
from minflux_torch.load import to_numpy, to_torch


def linear_names(model: nn.Module) -> list[str]:
    """BFL names of every linear layer (the possible LoRA targets)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def merge_lora(model: nn.Module, adapters: dict[str, dict]) -> nn.Module:
    """Add alpha / r * B @ A to each adapted weight, in place; returns the model."""
    sd = {k: to_numpy(v) for k, v in model.state_dict().items()}
    merged = lora.merge(sd, adapters)
    model.load_state_dict({k: to_torch(v) for k, v in merged.items()}, strict=True)
    return model


def load_lora(model: nn.Module, path) -> nn.Module:
    """Merge the LoRA file at `path` into the model's weights, in place."""
    return merge_lora(model, lora.load(path, model.params, linear_names(model)))
