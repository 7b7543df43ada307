"""BFL <-> diffusers key maps: exact inversion, agreement with diffusers' own converters and model classes,
and the shapes of the official checkpoints, for the tiny presets (real tensors) and every full-size preset
(abstract: torch meta device / `nnx.eval_shape`, no memory)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

from minflux import configs, keymaps
from minflux_torch.load import MODELS, build_model, to_numpy

FULL = [
    n
    for n, c in configs.PRESETS.items()
    if getattr(c, "family", None) in ("flux1", "flux2") and "tiny" not in n
]


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of an array, so comparisons are bitwise (bf16 as uint16; -0.0 != 0.0, NaN == NaN)."""
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


@functools.cache
def meta_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """BFL key -> shape of our PyTorch model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = MODELS[cfg.family](cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@functools.cache
def diffusers_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """diffusers key -> shape of diffusers' own model class with the preset's dims, on the meta device."""
    import diffusers

    common = dict(
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=tuple(cfg.axes_dim),
    )
    with torch.device("meta"):
        if cfg.family == "flux1":
            assert cfg.mlp_ratio == 4.0 and cfg.qkv_bias  # what FluxTransformer2DModel hard-codes
            model = diffusers.FluxTransformer2DModel(
                out_channels=cfg.out_channels, pooled_projection_dim=cfg.vec_in_dim, **common
            )
        else:
            model = diffusers.Flux2Transformer2DModel(
                mlp_ratio=cfg.mlp_ratio, rope_theta=cfg.theta, **common
            )
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def compose(recipe: keymaps.Recipe, inner: dict[str, keymaps.Recipe]) -> list[tuple[str, int, int]]:
    """The row ranges of the original tensors that `recipe` (over `inner`'s outputs) reads, merged."""
    out = []
    for key, a, b in recipe.pieces:
        offset = 0
        for src, s, e in inner[key].pieces:
            lo, hi = max(a, offset), min(b, offset + e - s)
            if lo < hi:
                piece = (src, s + lo - offset, s + hi - offset)
                if out and out[-1][0] == src and out[-1][2] == piece[1]:
                    out[-1] = (src, out[-1][1], piece[2])
                else:
                    out.append(piece)
            offset += e - s
    return out


def recipe_shapes(recipes: dict[str, keymaps.Recipe]) -> dict[str, tuple[int, ...]]:
    return {k: r.shape for k, r in recipes.items()}


# ---------------------------------------------------------------------------------------------
# Tiny presets: real tensors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_round_trip_is_bitwise(name):
    cfg = configs.get(name)
    bfl = {
        k: to_numpy(v)
        for k, v in build_model(cfg, seed=1, dtype=torch.bfloat16).state_dict().items()
    }
    shapes = {k: v.shape for k, v in bfl.items()}
    diff_recipes = keymaps.to_diffusers(shapes, cfg.family, cfg.hidden_size)
    diff = {k: keymaps.apply(r, lambda key, a, b: bfl[key][a:b]) for k, r in diff_recipes.items()}
    back_recipes = keymaps.to_bfl(recipe_shapes(diff_recipes), cfg.family)
    back = {k: keymaps.apply(r, lambda key, a, b: diff[key][a:b]) for k, r in back_recipes.items()}
    assert set(back) == set(bfl) and len(diff) > len(bfl)  # the fused tensors were really split
    for k, v in bfl.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert np.array_equal(bits(back[k]), bits(v)), k


@pytest.mark.parametrize("guidance", [True, False])
def test_flux2_matches_diffusers_converter(guidance):
    from diffusers.loaders.single_file_utils import (
        convert_flux2_transformer_checkpoint_to_diffusers,
    )

    cfg = dataclasses.replace(configs.get("flux2-tiny"), guidance_embed=guidance)
    sd = build_model(cfg, seed=2).state_dict()
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(sd))
    bfl = {k: v.numpy() for k, v in sd.items()}
    recipes = keymaps.to_diffusers({k: v.shape for k, v in bfl.items()}, "flux2", cfg.hidden_size)
    assert set(recipes) == set(theirs)
    for k, r in recipes.items():
        ours = keymaps.apply(r, lambda key, a, b: bfl[key][a:b])
        assert np.array_equal(bits(ours), bits(theirs[k].numpy())), k
    # and back: our inverse map reproduces the BFL tensors from diffusers' output
    back = keymaps.to_bfl({k: tuple(v.shape) for k, v in theirs.items()}, "flux2")
    for k, r in back.items():
        assert np.array_equal(
            bits(keymaps.apply(r, lambda key, a, b: theirs[key][a:b].numpy())), bits(bfl[k])
        ), k


@pytest.mark.parametrize("guidance", [True, False])
def test_flux1_matches_diffusers_converter(guidance):
    """diffusers' FLUX.1 converter hard-codes width 3072 and MLP ratio 4, so this runs at full width with one
    block of each kind, on row-tagged tensors: every element of row r of the i-th tensor holds i * 2**16 + r,
    made with expand() so the inputs cost no memory (only the converter's concatenations allocate)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    cfg = dataclasses.replace(
        configs.get("flux1-dev"), depth=1, depth_single_blocks=1, guidance_embed=guidance
    )
    shapes = meta_shapes(cfg)
    tags = {
        k: torch.arange(s[0], dtype=torch.int32) + i * 2**16
        for i, (k, s) in enumerate(sorted(shapes.items()))
    }
    tagged = {k: tags[k].view(-1, *[1] * (len(s) - 1)).expand(s) for k, s in shapes.items()}
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(tagged))
    as_np = {
        k: np.broadcast_to(tags[k].numpy().reshape(-1, *[1] * (len(s) - 1)), s)
        for k, s in shapes.items()
    }
    recipes = keymaps.to_diffusers(shapes, "flux1", cfg.hidden_size)
    assert set(recipes) == set(theirs)
    for k, r in recipes.items():
        ours = keymaps.apply(r, lambda key, a, b: as_np[key][a:b])
        assert ours.shape == tuple(theirs[k].shape) and np.array_equal(ours, theirs[k].numpy()), k


def test_unknown_key_raises():
    shapes = dict(meta_shapes(configs.get("flux2-tiny")))
    shapes["double_blocks.0.img_attn.bogus.weight"] = (4, 4)
    with pytest.raises(KeyError, match="bogus"):
        keymaps.to_diffusers(shapes, "flux2", 64)
    with pytest.raises(KeyError, match="bogus"):
        keymaps.to_bfl({"transformer_blocks.0.attn.bogus.weight": (4, 4)}, "flux2")


# ---------------------------------------------------------------------------------------------
# Every full-size preset, abstractly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FULL)
def test_full_size_keys_invert_exactly(name):
    cfg = configs.get(name)
    shapes = meta_shapes(cfg)
    diff = keymaps.to_diffusers(shapes, cfg.family, cfg.hidden_size)
    back = keymaps.to_bfl(recipe_shapes(diff), cfg.family)
    assert set(back) == set(shapes)
    for k, s in shapes.items():
        assert back[k].shape == s, k
        assert compose(back[k], diff) == [(k, 0, s[0])], k  # every row comes back to where it was


@pytest.mark.parametrize("name", FULL)
def test_full_size_matches_diffusers_model(name):
    cfg = configs.get(name)
    ours = recipe_shapes(keymaps.to_diffusers(meta_shapes(cfg), cfg.family, cfg.hidden_size))
    theirs = diffusers_shapes(cfg)
    assert sorted(set(ours) ^ set(theirs)) == []
    assert {k: s for k, s in ours.items() if s != theirs[k]} == {}


@pytest.mark.parametrize("name", FULL)
def test_full_size_layout_and_family_detection(name):
    cfg = configs.get(name)
    shapes = meta_shapes(cfg)
    diff = recipe_shapes(keymaps.to_diffusers(shapes, cfg.family, cfg.hidden_size))
    prefixed = {keymaps.BFL_PREFIX + k: s for k, s in shapes.items()}
    for keys, layout in ((shapes, "bfl"), (prefixed, "bfl-prefixed"), (diff, "diffusers")):
        assert keymaps.detect_layout(keys) == layout
        assert keymaps.infer_family(keys) == cfg.family
        assert keymaps.infer_hidden_size(keys) == cfg.hidden_size


@pytest.mark.parametrize(
    "name", [n for n, c in configs.PRESETS.items() if getattr(c, "family", "").startswith("ae")]
)
def test_autoencoder_family_detection(name):
    """The hook `minflux convert` relies on: autoencoder files are recognised in both layouts."""
    cfg = configs.get(name)
    shapes = meta_shapes(cfg)
    diff = recipe_shapes(keymaps.to_diffusers(shapes, cfg.family, 0))
    for keys, layout in ((shapes, "bfl"), (diff, "diffusers")):
        assert keymaps.detect_layout(keys) == layout
        assert keymaps.infer_family(keys) == cfg.family
        assert keymaps.infer_hidden_size(keys) == 0


def _distinct_full_configs():
    seen = {}
    for name in FULL:
        seen.setdefault(
            dataclasses.replace(configs.get(name), depth=1, depth_single_blocks=1), name
        )
    return [pytest.param(cfg, id=name) for cfg, name in seen.items()]


@pytest.mark.parametrize("cfg", _distinct_full_configs())
def test_full_width_jax_abstract_matches_torch(cfg):
    """Full width, one block of each kind (the blocks repeat; JAX tracing all 57 FLUX.1 blocks takes ~20 s)."""
    from flax import nnx

    from minflux_jax.load import MODELS as JAX_MODELS
    from minflux_jax.load import torch_shapes

    model = nnx.eval_shape(lambda: JAX_MODELS[cfg.family](cfg, rngs=nnx.Rngs(0)))
    assert torch_shapes(model) == meta_shapes(cfg)


# Shapes of the official checkpoints (the safetensors headers of the released files).
OFFICIAL = [
    ("flux1-dev", "double_blocks.0.img_attn.qkv.weight", (9216, 3072)),
    ("flux1-dev", "double_blocks.18.img_mod.lin.weight", (18432, 3072)),
    ("flux1-dev", "single_blocks.37.linear1.weight", (21504, 3072)),
    ("flux1-dev", "single_blocks.0.linear2.weight", (3072, 15360)),
    ("flux1-dev", "final_layer.adaLN_modulation.1.weight", (6144, 3072)),
    ("flux1-dev", "vector_in.in_layer.weight", (3072, 768)),
    ("flux1-dev", "txt_in.weight", (3072, 4096)),
    ("flux1-dev", "guidance_in.in_layer.weight", (3072, 256)),
    ("flux1-fill-dev", "img_in.weight", (3072, 384)),
    ("flux1-canny-dev", "img_in.weight", (3072, 128)),
    ("flux2-dev", "single_blocks.0.linear1.weight", (6144 * 3 + 2 * 18432, 6144)),
    ("flux2-dev", "single_blocks.47.linear2.weight", (6144, 6144 + 18432)),
    ("flux2-dev", "double_blocks.7.img_mlp.0.weight", (2 * 18432, 6144)),
    ("flux2-dev", "double_stream_modulation_img.lin.weight", (6 * 6144, 6144)),
    ("flux2-dev", "single_stream_modulation.lin.weight", (3 * 6144, 6144)),
    ("flux2-dev", "txt_in.weight", (6144, 15360)),
    ("flux2-dev", "img_in.weight", (6144, 128)),
    ("flux2-klein-4b", "txt_in.weight", (3072, 7680)),
    ("flux2-klein-9b", "txt_in.weight", (4096, 12288)),
]


@pytest.mark.parametrize(("name", "key", "shape"), OFFICIAL)
def test_official_shapes(name, key, shape):
    assert meta_shapes(configs.get(name))[key] == shape


def test_every_full_preset_is_checked():
    assert {"flux1-dev", "flux1-schnell", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b"} <= set(
        FULL
    )
    assert "guidance_in.in_layer.weight" not in meta_shapes(configs.get("flux1-schnell"))
    assert "guidance_in.in_layer.weight" not in meta_shapes(configs.get("flux2-klein-4b"))
