"""Whole tiny FLUX.1 / FLUX.2 transformers: PyTorch vs JAX from the same BFL and diffusers files."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2, transformer_inputs
from twins import out

import minflux_jax as mj
import minflux_torch as mt
from minflux import configs

DT = {"fp32": (torch.float32, jnp.float32), "bf16": (torch.bfloat16, jnp.bfloat16)}


def forward_both(name, path, dtype, inputs):
    tm, jm = (
        mt.load_model(name, path, dtype=DT[dtype][0]),
        mj.load_model(name, path, dtype=DT[dtype][1]),
    )
    with torch.inference_mode():
        a = tm(**{k: None if v is None else torch.from_numpy(v) for k, v in inputs.items()})
    b = jm(**{k: None if v is None else jnp.asarray(v) for k, v in inputs.items()})
    return out(a), out(b)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["bfl", "bfl-prefixed", "diffusers"])
@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_whole_model_fp32(name, layout, tiny_checkpoint, rng):
    inputs = transformer_inputs(configs.get(name), rng)
    a, b = forward_both(name, tiny_checkpoint(name, layout), "fp32", inputs)
    assert rel_l2(b, a) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_whole_model_bf16(name, tiny_checkpoint, rng):
    """bf16 against each framework's own fp32 run, and across frameworks (DESIGN.md: whole model 5e-2)."""
    inputs = transformer_inputs(configs.get(name), rng)
    path = tiny_checkpoint(name, "bfl")
    ref_t, ref_j = forward_both(name, path, "fp32", inputs)
    a, b = forward_both(name, path, "bf16", inputs)
    assert rel_l2(a, ref_t) < 5e-2 and rel_l2(b, ref_j) < 5e-2
    assert rel_l2(b, a) < 5e-2
    assert rel_l2(b, a) > 0  # bf16 really ran in bf16


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_guidance_required(name, tiny_checkpoint, rng):
    inputs = transformer_inputs(configs.get(name), rng) | {"guidance": None}
    with pytest.raises(ValueError, match="guidance"):
        forward_both(name, tiny_checkpoint(name, "bfl"), "fp32", inputs)


# one preset per distinct architecture (dev, Kontext and Krea share theirs, as do the klein base models)
DISTINCT = list(
    {
        configs.get(n): n
        for n in reversed(configs.names())
        if configs.get(n).family in ("flux1", "flux2") and "tiny" not in n
    }.values()
)


@pytest.mark.parametrize("name", DISTINCT)
def test_presets_build_abstractly(name):
    """Every preset builds in both frameworks without memory, with identical BFL keys and shapes."""
    from flax import nnx

    from minflux_jax.load import MODELS, abstract_model, torch_shapes

    cfg = configs.get(name)
    with torch.device("meta"):
        t = mt.load.MODELS[cfg.family](cfg)
    j = abstract_model(cfg, jnp.bfloat16)
    full = (
        nnx.eval_shape(lambda: MODELS[cfg.family](cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
        if cfg.depth < 9
        else j
    )
    assert torch_shapes(full) == torch_shapes(
        j
    )  # block-by-block assembly = one trace (checked where cheap)
    assert {k: tuple(v.shape) for k, v in t.state_dict().items()} == torch_shapes(j)


def test_schnell_has_no_guidance_and_fill_is_wider():
    with torch.device("meta"):
        schnell = mt.load.MODELS["flux1"](configs.get("flux1-schnell"))
        fill = mt.load.MODELS["flux1"](configs.get("flux1-fill-dev"))
    assert not any(k.startswith("guidance_in") for k in schnell.state_dict())
    assert tuple(fill.img_in.weight.shape) == (3072, 384) and tuple(
        fill.final_layer.linear.weight.shape
    ) == (64, 3072)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(KeyError, match="flux2-klein-4b"):
        configs.get("flux3-giant")
    assert len(np.unique(configs.names())) == len(configs.names())


def test_jax_assign_copies_its_inputs():
    """A JAX model must not alias the arrays it was loaded from (they may be a live PyTorch tensor's memory)."""
    from flax import nnx

    from minflux_jax.load import assign
    from minflux_torch.load import to_numpy

    t = torch.nn.Linear(256, 512)
    j = nnx.Linear(256, 512, rngs=nnx.Rngs(0))
    assign(j, {k: to_numpy(v) for k, v in t.state_dict().items()})
    before = np.asarray(j.bias[...]).copy()
    with torch.no_grad():
        t.bias.add_(1.0)
    assert np.array_equal(np.asarray(j.bias[...]), before)
