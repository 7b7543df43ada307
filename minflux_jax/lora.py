"""LoRA in JAX: adapters for training (init, the merged weights the step uses) and merging files for inference.

Adapters are a pytree `{BFL module: {"lora_A": (r, in), "lora_B": (out, r)}}` in PyTorch layout, so the
file formats and the merge arithmetic are shared with PyTorch (`minflux/lora.py`); the step never touches
the model's classes: `LoRA.effective` returns the base weights with s * (B @ A)^T added to each targeted
kernel, which is the unmerged LoRA forward W x + s B A x computed as (W + s B A) x. Twin:
`minflux_torch/lora.py` (inference only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minflux import keymaps, lora
from minflux_jax.layers import linear
from minflux_jax.load import STATE, torch_keys, torch_shapes

Array = jax.Array


def linear_names(model: nnx.Module) -> list[str]:
    """BFL names of every linear layer (the possible LoRA targets)."""
    classes = {
        path: type(m).__name__ for path, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)
    }
    return [
        key.removesuffix(".weight")
        for path, (key, param) in torch_keys(model).items()
        if param == "kernel" and classes[path[:-1]] == "Linear"
    ]


def merge_lora(model: nnx.Module, loras, scale: float = 1.0) -> nnx.Module:
    """Add LoRA(s) to the model's weights in place, one tensor at a time (`minflux.lora.merged`); returns it."""
    paths = {key: (path, param) for path, (key, param) in torch_keys(model).items()}
    flat = dict(nnx.to_flat_state(nnx.state(model, STATE)))  # variables of the model itself
    get = lambda k: keymaps.flax_to_torch(
        np.asarray(jax.device_get(flat[paths[k][0]][...])), paths[k][1]
    )  # noqa: E731
    for key, arr in lora.merged(get, paths.keys(), loras, scale):
        path, param = paths[key]
        value = jnp.asarray(keymaps.torch_to_flax(arr, param), flat[path].dtype)
        nnx.update(model, nnx.from_flat_state([(path, value)]))
    return model


def widen_input(model: nnx.Module, width: int) -> nnx.Module:
    """`img_in` with `width` input channels, the new columns zero, and `model.params.in_channels` to match: what
    BFL's Canny / Depth LoRAs need on a FLUX.1-dev model (as diffusers expands `x_embedder` for them)."""
    old = model.img_in
    new = linear(width, old.out_features, old.bias is not None, old.kernel.dtype, nnx.Rngs(0))
    new.kernel[...] = (
        jnp.zeros_like(new.kernel[...]).at[: old.in_features].set(old.kernel[...])
    )  # (in, out)
    if old.bias is not None:
        new.bias[...] = old.bias[...]
    model.img_in = new
    model.params = dataclasses.replace(model.params, in_channels=width)
    return model


def load_lora(model: nnx.Module, paths, scale=1.0, component: str = "transformer") -> nnx.Module:
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
    shapes = torch_shapes(model)
    cfg = model.params if component == "transformer" else None
    loras = lora.load(paths, cfg, shapes, scale, component)
    width = lora.input_width(loras)
    if width and width > model.params.in_channels:
        widen_input(model, width)
    return merge_lora(model, loras)


@dataclass(frozen=True)
class LoRA:
    """Which modules carry adapters, their rank and alpha (static; the arrays live in the train state)."""

    modules: tuple[str, ...]
    rank: int = 16
    alpha: float = 16.0

    @classmethod
    def from_file(cls, path, cfg) -> tuple[LoRA, dict]:
        """(LoRA, starting adapters) from any readable LoRA file (`train --init-lora`): its modules and rank
        become the run's; alpha = rank, the file's scales folded into B (`minflux.lora.to_adapters`)."""
        start = lora.to_adapters(lora.read(path, cfg), lora.linear_shapes(cfg))
        rank = next(iter(start.values()))["lora_A"].shape[0]
        return cls(tuple(start), rank, float(rank)), start

    def init(
        self, key: Array, frozen: dict[str, Array], dtype=jnp.float32, start: dict | None = None
    ) -> dict[str, dict[str, Array]]:
        """A ~ U(+-1/sqrt(in)) (PEFT's kaiming-uniform bound), B = 0: training starts at the base model.
        start: adapters to begin from instead (`from_file`), cast to dtype."""
        if start is not None:
            return {
                m: {k: jnp.asarray(start[m][k], dtype) for k in ("lora_A", "lora_B")}
                for m in self.modules
            }
        out = {}
        for i, m in enumerate(self.modules):
            d_in, d_out = frozen[m + ".weight"].shape  # Flax kernel (in, out)
            a = (
                jax.random.uniform(jax.random.fold_in(key, i), (self.rank, d_in), dtype, -1, 1)
                / d_in**0.5
            )
            out[m] = {"lora_A": a, "lora_B": jnp.zeros((d_out, self.rank), dtype)}
        return out

    def effective(self, frozen: dict[str, Array], adapters: dict) -> dict[str, Array]:
        """The base weights with every adapter added (differentiable in the adapters)."""
        out = dict(frozen)
        for m, a in adapters.items():
            w = frozen[m + ".weight"]
            out[m + ".weight"] = w + (
                self.alpha / self.rank * (a["lora_B"] @ a["lora_A"])
            ).T.astype(w.dtype)
        return out

    def export(self, adapters: dict) -> dict[str, dict]:
        """numpy adapters with alpha, for `minflux.lora.save`."""
        return {
            m: {
                "lora_A": np.asarray(a["lora_A"]),
                "lora_B": np.asarray(a["lora_B"]),
                "alpha": self.alpha,
            }
            for m, a in jax.device_get(adapters).items()
        }
