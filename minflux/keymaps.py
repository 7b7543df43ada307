"""Key maps between checkpoint layouts, as data.

1. BFL <-> diffusers. Every conversion between the two layouts only selects,
   reorders and concatenates *rows* (the first axis) of tensors, so one output
   tensor is described by a `Recipe`: a list of row ranges of source tensors
   plus the output shape. That makes conversion bit-exact by construction,
   exactly invertible, and streamable tensor by tensor. Each family is one
   table of module renames; three kinds of rule cover the exceptions:
     "split"  fused BFL tensor <-> several diffusers tensors (qkv; FLUX.1's
              single-block linear1 = [q, k, v, mlp]): every part but the last
              has `hidden_size` rows, the last takes the rest;
     "swap"   BFL's final layer is (shift, scale), diffusers' is (scale, shift);
     "same"   a rename;
     "rev"    a rename whose first block index counts the other way: BFL's
              decoder `up.N` is diffusers' `up_blocks.(n-1-N)`, n from the keys;
     "linear" BFL's 1x1 conv weight (O, I, 1, 1) <-> diffusers' linear (O, I).
   `num_batches_tracked` (torch BatchNorm's update counter; no minflux model
   holds one, inference never reads it) is dropped by every conversion.
   RMSNorm weights are `scale` in BFL and `weight` in diffusers.
2. PyTorch <-> Flax: generic rules keyed by the Flax module class and
   parameter name (2-D kernel transposed, 4-D conv kernel (O,I,kh,kw) <->
   (kh,kw,I,O), norm `weight` <-> `scale`, BatchNorm running stats), driven by
   the target model's own state; see `flax_rule`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------
# BFL <-> diffusers tables: (BFL module, diffusers module(s), kind). "{}" is a block index.
# ---------------------------------------------------------------------------------------------

_ATTN = [  # the double block's attention, identical in both families
    (
        "double_blocks.{}.img_attn.qkv",
        (
            "transformer_blocks.{}.attn.to_q",
            "transformer_blocks.{}.attn.to_k",
            "transformer_blocks.{}.attn.to_v",
        ),
        "split",
    ),
    (
        "double_blocks.{}.txt_attn.qkv",
        (
            "transformer_blocks.{}.attn.add_q_proj",
            "transformer_blocks.{}.attn.add_k_proj",
            "transformer_blocks.{}.attn.add_v_proj",
        ),
        "split",
    ),
    ("double_blocks.{}.img_attn.norm.query_norm", "transformer_blocks.{}.attn.norm_q", "same"),
    ("double_blocks.{}.img_attn.norm.key_norm", "transformer_blocks.{}.attn.norm_k", "same"),
    (
        "double_blocks.{}.txt_attn.norm.query_norm",
        "transformer_blocks.{}.attn.norm_added_q",
        "same",
    ),
    ("double_blocks.{}.txt_attn.norm.key_norm", "transformer_blocks.{}.attn.norm_added_k", "same"),
    ("double_blocks.{}.img_attn.proj", "transformer_blocks.{}.attn.to_out.0", "same"),
    ("double_blocks.{}.txt_attn.proj", "transformer_blocks.{}.attn.to_add_out", "same"),
    ("img_in", "x_embedder", "same"),
    ("txt_in", "context_embedder", "same"),
    ("final_layer.linear", "proj_out", "same"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear", "swap"),
]


def _resnet(bfl: str, diff: str, kind: str = "same") -> list[tuple]:
    """A VAE ResnetBlock: BFL's `nin_shortcut` is diffusers' `conv_shortcut`."""
    names = [
        ("norm1", "norm1"),
        ("conv1", "conv1"),
        ("norm2", "norm2"),
        ("conv2", "conv2"),
        ("nin_shortcut", "conv_shortcut"),
    ]
    return [(f"{bfl}.{a}", f"{diff}.{b}", kind) for a, b in names]


def _vae_side(side: str) -> list[tuple]:
    """What the encoder and the decoder share: conv_in, the mid block, norm_out, conv_out."""
    mid, dmid = f"{side}.mid", f"{side}.mid_block"
    return [
        (f"{side}.conv_in", f"{side}.conv_in", "same"),
        *_resnet(f"{mid}.block_1", f"{dmid}.resnets.0"),
        *_resnet(f"{mid}.block_2", f"{dmid}.resnets.1"),
        (f"{mid}.attn_1.norm", f"{dmid}.attentions.0.group_norm", "same"),
        (f"{mid}.attn_1.q", f"{dmid}.attentions.0.to_q", "linear"),
        (f"{mid}.attn_1.k", f"{dmid}.attentions.0.to_k", "linear"),
        (f"{mid}.attn_1.v", f"{dmid}.attentions.0.to_v", "linear"),
        (f"{mid}.attn_1.proj_out", f"{dmid}.attentions.0.to_out.0", "linear"),
        (f"{side}.norm_out", f"{side}.conv_norm_out", "same"),
        (f"{side}.conv_out", f"{side}.conv_out", "same"),
    ]


_VAE = [  # FLUX.1's autoencoder (diffusers AutoencoderKL); FLUX.2's adds quant convs and the BatchNorm
    *_vae_side("encoder"),
    *_resnet("encoder.down.{}.block.{}", "encoder.down_blocks.{}.resnets.{}"),
    ("encoder.down.{}.downsample.conv", "encoder.down_blocks.{}.downsamplers.0.conv", "same"),
    *_vae_side("decoder"),
    *_resnet("decoder.up.{}.block.{}", "decoder.up_blocks.{}.resnets.{}", "rev"),
    ("decoder.up.{}.upsample.conv", "decoder.up_blocks.{}.upsamplers.0.conv", "rev"),
]

TABLES: dict[str, list[tuple]] = {
    "ae1": _VAE,
    "ae2": _VAE
    + [  # diffusers AutoencoderKLFlux2 keeps the quant convs at the top level
        ("encoder.quant_conv", "quant_conv", "same"),
        ("decoder.post_quant_conv", "post_quant_conv", "same"),
        ("bn", "bn", "same"),
    ],
    "flux1": _ATTN
    + [
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1", "same"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2", "same"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1", "same"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2", "same"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1", "same"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2", "same"),
        ("double_blocks.{}.img_mod.lin", "transformer_blocks.{}.norm1.linear", "same"),
        ("double_blocks.{}.txt_mod.lin", "transformer_blocks.{}.norm1_context.linear", "same"),
        ("double_blocks.{}.img_mlp.0", "transformer_blocks.{}.ff.net.0.proj", "same"),
        ("double_blocks.{}.img_mlp.2", "transformer_blocks.{}.ff.net.2", "same"),
        ("double_blocks.{}.txt_mlp.0", "transformer_blocks.{}.ff_context.net.0.proj", "same"),
        ("double_blocks.{}.txt_mlp.2", "transformer_blocks.{}.ff_context.net.2", "same"),
        ("single_blocks.{}.modulation.lin", "single_transformer_blocks.{}.norm.linear", "same"),
        (
            "single_blocks.{}.linear1",
            (
                "single_transformer_blocks.{}.attn.to_q",
                "single_transformer_blocks.{}.attn.to_k",
                "single_transformer_blocks.{}.attn.to_v",
                "single_transformer_blocks.{}.proj_mlp",
            ),
            "split",
        ),
        ("single_blocks.{}.linear2", "single_transformer_blocks.{}.proj_out", "same"),
        ("single_blocks.{}.norm.query_norm", "single_transformer_blocks.{}.attn.norm_q", "same"),
        ("single_blocks.{}.norm.key_norm", "single_transformer_blocks.{}.attn.norm_k", "same"),
    ],
    "flux2": _ATTN
    + [
        ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1", "same"),
        ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2", "same"),
        ("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1", "same"),
        ("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2", "same"),
        ("double_stream_modulation_img.lin", "double_stream_modulation_img.linear", "same"),
        ("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear", "same"),
        ("single_stream_modulation.lin", "single_stream_modulation.linear", "same"),
        ("double_blocks.{}.img_mlp.0", "transformer_blocks.{}.ff.linear_in", "same"),
        ("double_blocks.{}.img_mlp.2", "transformer_blocks.{}.ff.linear_out", "same"),
        ("double_blocks.{}.txt_mlp.0", "transformer_blocks.{}.ff_context.linear_in", "same"),
        ("double_blocks.{}.txt_mlp.2", "transformer_blocks.{}.ff_context.linear_out", "same"),
        ("single_blocks.{}.linear1", "single_transformer_blocks.{}.attn.to_qkv_mlp_proj", "same"),
        ("single_blocks.{}.linear2", "single_transformer_blocks.{}.attn.to_out", "same"),
        ("single_blocks.{}.norm.query_norm", "single_transformer_blocks.{}.attn.norm_q", "same"),
        ("single_blocks.{}.norm.key_norm", "single_transformer_blocks.{}.attn.norm_k", "same"),
    ],
}

# Keys that tell the layouts apart, and the prefix some BFL exports carry (ComfyUI-style files).
BFL_PREFIX = "model.diffusion_model."
_DIFFUSERS_MARKERS = (
    "x_embedder.",
    "transformer_blocks.",
    "encoder.down_blocks.",
    "decoder.up_blocks.",
)
_BFL_MARKERS = ("img_in.", "double_blocks.", "encoder.down.", "decoder.up.")


def detect_layout(keys) -> str | None:
    """ "bfl", "bfl-prefixed" or "diffusers" from the key names; None when none fits."""
    keys = list(keys)
    if keys and all(k.startswith(BFL_PREFIX) for k in keys):
        return "bfl-prefixed"
    if any(k.startswith(_DIFFUSERS_MARKERS) for k in keys):
        return "diffusers"
    if any(k.startswith(_BFL_MARKERS) for k in keys):
        return "bfl"
    return None


# All-in-one files (ComfyUI / Forge / SwarmUI "checkpoints", BFL-style bundles) put each component under a
# prefix; a component is recognised under a prefix by one of its marker keys (either layout).
COMPONENTS = {
    "transformer": (
        ("model.diffusion_model.", "diffusion_model.", "transformer."),
        ("img_in.", "x_embedder.", "double_blocks.", "transformer_blocks."),
    ),
    "ae": (("vae.", "first_stage_model."), ("encoder.", "decoder.")),
}
# Prefixes of the other parts bundles carry (text encoders); never read as a model component.
OTHER_PREFIXES = (
    "text_encoders.",
    "text_encoder.",
    "text_encoder_2.",
    "cond_stage_model.",
    "conditioner.",
)


def find_component(keys, component: str) -> str | None:
    """The prefix `component` ("transformer" or "ae") sits under in `keys` ("" for none), or None if absent."""
    prefixes, markers = COMPONENTS[component]
    for prefix in (*prefixes, ""):
        if any(k.startswith(prefix) and k[len(prefix) :].startswith(markers) for k in keys):
            return prefix
    return None


def component_keys(keys, prefix: str) -> list[str]:
    """The keys under `prefix`; for "" the keys under no known component or text-encoder prefix."""
    if prefix:
        return [k for k in keys if k.startswith(prefix)]
    known = (*(p for ps, _ in COMPONENTS.values() for p in ps), *OTHER_PREFIXES)
    return [k for k in keys if not k.startswith(known)]


# Which model a file holds, from key names alone (either layout): the first family with a marker key.
# The autoencoders are recognised here too; converting them needs their entry in TABLES.
FAMILY_MARKERS = (
    (
        "flux2",
        ("double_stream_modulation_img.",),
    ),  # FLUX.2's shared modulation, same name in both layouts
    ("flux1", ("vector_in.", "time_text_embed.text_embedder.")),  # FLUX.1's pooled CLIP vector
    ("ae2", ("bn.running_mean",)),  # FLUX.2 VAE: BatchNorm statistics of the patchified latents
    ("ae1", ("encoder.", "decoder.")),
)


def infer_family(keys) -> str | None:
    """ "flux1", "flux2", "ae1" or "ae2" from the key names; None when none fits."""
    keys = [k.removeprefix(BFL_PREFIX) for k in keys]
    for family, markers in FAMILY_MARKERS:
        if any(k.startswith(markers) for k in keys):
            return family
    return None


# (key, axis) pairs whose size is the transformer width, in both layouts: image and text input projections,
# the time embedder's output, the final projection's input
WIDTH_KEYS = (
    ("img_in.weight", 0),
    ("txt_in.weight", 0),
    ("time_in.out_layer.weight", 0),
    ("final_layer.linear.weight", 1),
    ("x_embedder.weight", 0),
    ("context_embedder.weight", 0),
    ("time_text_embed.timestep_embedder.linear_2.weight", 0),
    ("time_guidance_embed.timestep_embedder.linear_2.weight", 0),
    ("proj_out.weight", 1),
)


def infer_hidden_size(shapes: dict[str, tuple]) -> int:
    """The transformer width, the size most of WIDTH_KEYS agree on (so one damaged tensor does not decide);
    0 when there is none."""
    shapes = {k.removeprefix(BFL_PREFIX): s for k, s in shapes.items()}
    votes = [shapes[k][axis] for k, axis in WIDTH_KEYS if k in shapes and len(shapes[k]) == 2]
    return max(set(votes), key=votes.count) if votes else 0


# ---------------------------------------------------------------------------------------------
# Recipes: how to build each output tensor from row ranges of source tensors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Output tensor = concat(source[key][start:stop] for key, start, stop in pieces).reshape(shape)."""

    pieces: tuple[tuple[str, int, int], ...]
    shape: tuple[int, ...]


def _compile(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)") + r"\.(\w+)$")


def _rules(family: str, reverse: bool):
    """[(pattern on the source module, source template, destination template(s), kind)]."""
    for bfl, diff, kind in TABLES[family]:
        diff = (diff,) if isinstance(diff, str) else diff
        if reverse:
            for i, d in enumerate(diff):
                yield _compile(d), bfl, i, len(diff), kind
        else:
            yield _compile(bfl), bfl, diff, None, kind


def _param(module: str, param: str, to_bfl: bool) -> str:
    # RMSNorm: BFL `scale`, diffusers `weight`.
    if module.endswith(("query_norm", "key_norm")):
        return "scale" if to_bfl else "weight"
    return param


def _rev_count(keys, rules) -> int:
    """n for the "rev" rules: one more than the largest block index they match in `keys`."""
    found = [
        int(m.group(1))
        for k in keys
        for pattern, *_, kind in rules
        if kind == "rev" and (m := pattern.match(k))
    ]
    return max(found, default=-1) + 1


def _indices(idx: list[str], kind: str, n_rev: int) -> list[str]:
    return [str(n_rev - 1 - int(idx[0])), *idx[1:]] if kind == "rev" else idx


def to_diffusers(shapes: dict[str, tuple], family: str, hidden_size: int) -> dict[str, Recipe]:
    """Recipes for every diffusers tensor, from BFL tensors of the given shapes."""
    out: dict[str, Recipe] = {}
    rules = list(_rules(family, reverse=False))
    n_rev = _rev_count(shapes, rules)
    for key, shape in shapes.items():
        for pattern, bfl, diff, _, kind in rules:
            if m := pattern.match(key):
                *idx, param = m.groups()
                idx = _indices(idx, kind, n_rev)
                names = [d.format(*idx) + "." + _param(bfl, param, False) for d in diff]
                rows = shape[0]
                if kind == "split":
                    bounds = [i * hidden_size for i in range(len(names))] + [rows]
                    for name, a, b in zip(names, bounds, bounds[1:], strict=False):
                        out[name] = Recipe(((key, a, b),), (b - a, *shape[1:]))
                elif kind == "swap":
                    out[names[0]] = Recipe(((key, rows // 2, rows), (key, 0, rows // 2)), shape)
                elif kind == "linear" and len(shape) == 4:  # (O, I, 1, 1) -> (O, I)
                    out[names[0]] = Recipe(((key, 0, rows),), shape[:2])
                else:
                    out[names[0]] = Recipe(((key, 0, rows),), shape)
                break
        else:
            raise KeyError(key)
    return out


def to_bfl(shapes: dict[str, tuple], family: str) -> dict[str, Recipe]:
    """Recipes for every BFL tensor, from diffusers tensors of the given shapes."""
    parts: dict[str, list] = {}
    rules = list(_rules(family, reverse=True))
    n_rev = _rev_count(shapes, rules)
    for key, shape in shapes.items():
        for pattern, bfl, i, _, kind in rules:
            if m := pattern.match(key):
                *idx, param = m.groups()
                idx = _indices(idx, kind, n_rev)
                name = bfl.format(*idx) + "." + _param(bfl, param, True)
                parts.setdefault(name, []).append((i, key, shape, kind))
                break
        else:
            raise KeyError(key)
    out = {}
    for name, ps in parts.items():
        ps.sort()
        (_, key, shape, kind) = ps[0]
        rows = sum(p[2][0] for p in ps)
        if kind == "swap":
            pieces = ((key, rows // 2, rows), (key, 0, rows // 2))
        else:
            pieces = tuple((k, 0, s[0]) for _, k, s, _ in ps)
        if kind == "linear" and len(shape) == 2:  # (O, I) -> (O, I, 1, 1)
            shape = (*shape, 1, 1)
        out[name] = Recipe(pieces, (rows, *shape[1:]))
    return out


SKIPPED = ("num_batches_tracked",)  # torch BatchNorm's update counter: no minflux model holds one


def identity(shapes: dict[str, tuple]) -> dict[str, Recipe]:
    return {k: Recipe(((k, 0, s[0] if s else 1),), s) for k, s in shapes.items()}


def convert(
    shapes: dict[str, tuple], src: str, dst: str, family: str, hidden_size: int
) -> dict[str, Recipe]:
    """Recipes from layout `src` to layout `dst` ("bfl" or "diffusers"); SKIPPED tensors are dropped."""
    shapes = {k: s for k, s in shapes.items() if k.rsplit(".", 1)[-1] not in SKIPPED}
    if src == dst:
        return identity(shapes)
    return to_diffusers(shapes, family, hidden_size) if src == "bfl" else to_bfl(shapes, family)


def apply(recipe: Recipe, rows) -> np.ndarray:
    """Build one tensor; `rows(key, start, stop)` returns rows of a source tensor."""
    parts = [rows(k, a, b) for k, a, b in recipe.pieces]  # a 0-d tensor is the one piece (k, 0, 1)
    arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return arr.reshape(recipe.shape)


# ---------------------------------------------------------------------------------------------
# PyTorch <-> Flax
# ---------------------------------------------------------------------------------------------

# (Flax module class, Flax parameter) -> PyTorch parameter; anything not listed keeps its name.
FLAX_NAMES = {
    ("Linear", "kernel"): "weight",
    ("Conv", "kernel"): "weight",
    ("Embed", "embedding"): "weight",
    ("LayerNorm", "scale"): "weight",
    ("GroupNorm", "scale"): "weight",
    ("BatchNorm", "scale"): "weight",
    ("BatchNorm", "mean"): "running_mean",
    ("BatchNorm", "var"): "running_var",
}


def flax_rule(module_class: str, param: str) -> str:
    """The PyTorch name of Flax parameter `param` of a module of class `module_class`."""
    return FLAX_NAMES.get((module_class, param), param)


def torch_to_flax(array: np.ndarray, flax_param: str) -> np.ndarray:
    """Lay out a PyTorch tensor as Flax stores it: Linear (O,I) -> (I,O); Conv (O,I,kh,kw) -> (kh,kw,I,O)."""
    if flax_param == "kernel":
        return array.T if array.ndim == 2 else array.transpose(2, 3, 1, 0)
    return array


def flax_to_torch(array: np.ndarray, flax_param: str) -> np.ndarray:
    """The inverse of `torch_to_flax`."""
    if flax_param == "kernel":
        return array.T if array.ndim == 2 else array.transpose(3, 2, 0, 1)
    return array
