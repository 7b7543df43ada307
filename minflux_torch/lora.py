"""LoRA for inference in PyTorch: merge LoRA files of any common format into a model, in place.

Reading the formats and the merge arithmetic are framework-free (`minflux/lora.py`); training happens in JAX
(`minflux_jax/lora.py`, the twin, which adds adapter init and the on-the-fly merge the step uses).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from minflux import lora
from minflux_torch.load import to_numpy, to_torch


def linear_names(model: nn.Module) -> list[str]:
    """BFL names of every linear layer (the possible LoRA targets)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def merge_lora(model: nn.Module, loras, scale: float = 1.0) -> nn.Module:
    """Add LoRA(s) to the model's weights in place, one tensor at a time (`minflux.lora.merged`); returns it."""
    sd = model.state_dict()  # tensors that share the parameters' memory
    with torch.no_grad():
        for key, arr in lora.merged(lambda k: to_numpy(sd[k]), sd.keys(), loras, scale):
            sd[key].copy_(to_torch(arr))
    return model


def widen_input(model: nn.Module, width: int) -> nn.Module:
    """`img_in` with `width` input channels, the new columns zero, and `model.params.in_channels` to match: what
    BFL's Canny / Depth LoRAs need on a FLUX.1-dev model (as diffusers expands `x_embedder` for them)."""
    old = model.img_in
    new = nn.Linear(
        width,
        old.out_features,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_features] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    model.img_in = new
    model.params = dataclasses.replace(model.params, in_channels=width)
    return model


def load_lora(model: nn.Module, paths, scale=1.0, component: str = "transformer") -> nn.Module:
    """Merge one LoRA file or several into the model's weights, in place; returns the model.

    paths: a path or a list of paths; scale: the strength, one float or one per file (as diffusers'
    `fuse_lora(lora_scale=)`: the update is scale * alpha / r * B @ A). Formats read (detected from the keys):
    diffusers / PEFT (with diffusers' or PEFT's alpha metadata or `.alpha` keys), kohya over BFL or diffusers
    names, XLabs, `diffusion_model.` BFL names (ai-toolkit, ComfyUI), BFL control LoRAs (full tensors replace
    the model's; a wider `img_in` widens the model's, see `widen_input`). component: "transformer"; "clip" or
    "t5" for a text encoder of minflux (the file's `lora_te1_` / `text_encoder.` or `lora_te2_` /
    `text_encoder_2.` parts), whose parts the transformer's load only counts (one warning). Raises
    CheckpointError naming file and key.
    """
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cfg = model.params if component == "transformer" else None
    loras = lora.load(paths, cfg, shapes, scale, component)
    width = lora.input_width(loras)
    if width and width > model.params.in_channels:
        widen_input(model, width)
    return merge_lora(model, loras)
