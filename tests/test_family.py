"""The family table (`minflux.family`): its sampling defaults and position ids against diffusers' pipelines,
and the configs' earlier behaviour attributes, now aliases of the table, keep their values."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from minflux import configs, family, ids, schedules


def _default(pipeline: str, arg: str):
    import diffusers

    return inspect.signature(getattr(diffusers, pipeline).__call__).parameters[arg].default


@pytest.mark.parametrize(
    "pipeline,arg,ours",
    [
        ("FluxPipeline", "guidance_scale", family.FLUX1.guidance),
        ("FluxPipeline", "num_inference_steps", family.FLUX1.steps),
        ("FluxInpaintPipeline", "strength", family.FLUX1.inpaint_strength),
        ("FluxFillPipeline", "guidance_scale", family.default_guidance("flux1-fill-dev", None)),
        ("Flux2Pipeline", "guidance_scale", family.FLUX2.guidance),
        ("Flux2Pipeline", "num_inference_steps", family.FLUX2.steps),
        ("Flux2KleinInpaintPipeline", "strength", family.FLUX2.inpaint_strength),
        ("Flux2KleinKVPipeline", "num_inference_steps", family.DISTILLED_STEPS),
    ],
)
def test_defaults_match_diffusers(pipeline, arg, ours):
    assert ours == _default(pipeline, arg)


def test_default_steps_and_guidance_follow_the_model():
    """Distilled models (no guidance embedder, no true CFG) default to 4 steps; presets override guidance."""
    assert family.default_steps(configs.get("flux1-schnell")) == family.DISTILLED_STEPS
    assert family.default_steps(configs.get("flux2-klein-4b"), true_cfg=True) == 50
    assert family.default_steps(configs.get("flux1-dev")) == 28
    assert family.default_guidance("flux1-kontext-dev", configs.get("flux1-kontext-dev")) == 2.5
    assert family.default_guidance("flux2-tiny", configs.get("flux2-tiny")) == 4.0


def test_ids_match_diffusers():
    """`ids.for_config` reads the id axes and the text-id axis from the table: FLUX.1's 3 axes with zero text
    ids (`FluxPipeline`), FLUX.2's 4 axes with text token l at (0, 0, 0, l) (`Flux2Pipeline`)."""
    from diffusers import Flux2Pipeline, FluxPipeline

    img, txt = ids.for_config(configs.get("flux1-tiny"), 1, 3, 5, 7)
    want = FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(img[0], want)
    np.testing.assert_array_equal(txt, np.zeros((1, 7, 3), np.float32))
    img, txt = ids.for_config(configs.get("flux2-tiny"), 2, 3, 5, 7)
    want = Flux2Pipeline._prepare_latent_ids(torch.zeros(2, 128, 3, 5)).numpy()
    np.testing.assert_array_equal(img, want)
    np.testing.assert_array_equal(
        txt, Flux2Pipeline._prepare_text_ids(torch.zeros(2, 7, 48)).numpy()
    )


def test_reference_times_match_diffusers():
    """Reference i's t id: FLUX.2 10 + 10 i (`Flux2Pipeline._prepare_image_ids`); Kontext 1."""
    from diffusers import Flux2Pipeline

    refs = [torch.zeros(1, 128, 2, 2) for _ in range(3)]
    t = Flux2Pipeline._prepare_image_ids(refs)[0, :, 0].numpy()
    assert t.tolist() == [family.FLUX2.ref_time(i) for i in range(3) for _ in range(4)]
    assert family.FLUX1.ref_time(0) == 1 and family.FLUX1.max_refs == 1


def test_schedule_shift_from_the_table():
    """schnell (no guidance embedder) samples unshifted; every FLUX.2 model shifts, even asked not to."""
    lin = np.linspace(1.0, 0.0, 5).tolist()
    schnell = configs.get("flux1-schnell")
    assert not family.of(schnell).shifts_schedule(schnell)
    assert schedules.get_schedule(4, 256, "flux1", shift=False) == lin
    assert schedules.get_schedule(4, 256, "flux2", shift=False) != lin
    with pytest.raises(ValueError, match="unknown family 'flux3'"):
        schedules.get_schedule(4, 256, "flux3")


# The behaviour attributes the configs had before the table (main at a62e4a8), for code that still reads them.
OLD = {
    "gated_mlp": (False, True),
    "bias": (True, False),
    "shared_modulation": (False, True),
    "latent_channels": (16, 128),
    "latent_patch": (2, 1),
    "id_axes": (3, 4),
    "text_id_axis": (None, 3),
    "max_refs": (1, None),
    "inpaint_resize": ("nearest", "bilinear"),
    "inpaint_init_ref": (False, True),
    "forward_names": (
        ("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance"),
        ("x", "x_ids", "ctx", "ctx_ids", "timesteps", None, "guidance"),
    ),
}


@pytest.mark.parametrize("attr", list(OLD))
def test_config_aliases_keep_their_values(attr):
    for cls, inst, want in zip(
        (configs.FluxConfig, configs.Flux2Config),
        (configs.get("flux1-dev"), configs.get("flux2-klein-4b")),
        OLD[attr],
        strict=True,
    ):
        assert getattr(cls, attr) == want and getattr(inst, attr) == want
        assert getattr(configs.FAMILIES[cls.family], attr) == want


def test_config_alias_methods_and_autoencoders():
    f1, f2 = configs.get("flux1-schnell"), configs.get("flux2-klein-4b")
    assert (f1.ref_time(0), f2.ref_time(2)) == (1, 30)
    assert (f1.shifts_schedule, configs.get("flux1-dev").shifts_schedule, f2.shifts_schedule) == (
        False,
        True,
        True,
    )
    assert f2.forward_kwargs(1, 2, 3, 4, 5, 6, 7) == {
        "x": 1,
        "x_ids": 2,
        "ctx": 3,
        "ctx_ids": 4,
        "timesteps": 5,
        "guidance": 7,
    }
    assert configs.FluxConfig.vec_in_dim == 768 and configs.Flux2Config.vec_in_dim is None
    ae1, ae2 = configs.get("flux1-ae"), configs.get("flux2-ae")
    assert (ae1.quant_conv, ae1.batch_norm, ae2.quant_conv, ae2.batch_norm) == (False,) * 2 + (
        True,
    ) * 2
    assert configs.describe("flux2", 64) == "a FLUX.2 transformer of width 64"
    assert configs.describe("ae1") == "a FLUX.1 autoencoder"
    assert configs.input_kind(configs.get("flux1-fill-dev")) == "fill"
    assert configs.input_kind(configs.get("flux1-canny-dev")) == "control"


def test_axes_must_match_the_id_axes():
    bad = dataclasses.replace(configs.get("flux2-tiny"), axes_dim=(8, 12, 12))
    with pytest.raises(
        ValueError, match=r"axes_dim \(8, 12, 12\) must have one entry per position-id axis \(4\)"
    ):
        configs.resolve(bad)
