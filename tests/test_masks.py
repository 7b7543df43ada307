"""Inpainting masks (`minflux.masks`, `sampling.inpaint_mask` in both frameworks): "max" mode against PyTorch's
own max-pooling, "center" mode against diffusers' inpainting pipelines, the thin strokes diffusers' sampling
loses, soft masks, and a picture that changes where a thin stroke asks (the agreement of whole inpainting runs with
diffusers, in center mode: `test_inpaint.py`)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import minflux_jax as mj
import minflux_torch as mt
from minflux import configs, family, masks
from minflux.request import Request
from minflux_jax import pipeline as jp
from minflux_jax import sampling as js
from minflux_torch import pipeline as tp
from minflux_torch import sampling as ts

diffusers = pytest.importorskip("diffusers")


def thin_strokes() -> np.ndarray:
    """Issue 20's mask: 64 x 64 with strokes 1, 2, 3 and 4 pixels wide and a 6 x 6 dot, none on a pixel that
    diffusers samples (FLUX.1: each 8 x 8 latent's top-left pixel; FLUX.2: the 2 x 2 at a token's centre)."""
    m = np.zeros((64, 64), np.float32)
    m[3, :] = 1  # 1 pixel
    m[17:19, 4:60] = 1  # 2
    m[:, 41:44] = 1  # 3
    m[49:53, 2:30] = 1  # 4
    m[25:31, 25:31] = 1  # the dot
    return m


def pooled(mask: np.ndarray, unit: int) -> np.ndarray:
    """PyTorch's max_pool2d over unit x unit patches: (H / unit, W / unit)."""
    return torch.nn.functional.max_pool2d(torch.from_numpy(mask)[None, None], unit)[0, 0].numpy()


def packed(per_latent: np.ndarray) -> np.ndarray:
    """FLUX.1: one weight per latent on its 16 channels, packed 2 x 2 as diffusers packs latents: (1, L, 64)."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    h, w = per_latent.shape
    lat = torch.from_numpy(per_latent)[None, None].expand(1, 16, h, w)
    return FluxPipeline._pack_latents(lat, 1, 16, h, w).numpy()


@pytest.mark.parametrize("factor", [8, 2])
def test_max_mode_is_max_pooling(factor):
    """Both frameworks' `inpaint_mask(..., "max")` and the numpy rule against torch's max_pool2d, on a soft mask."""
    rng = np.random.default_rng(0)
    m = (rng.uniform(size=(64, 96)) ** 6).astype(np.float32)  # mostly near 0, some near 1
    m[:, :32] = 0
    for name, unit in (("flux1", factor), ("flux2", 2 * factor)):
        spec = family.get(name)
        want = pooled(m, unit)
        np.testing.assert_array_equal(masks.weights(m, spec, factor, "max"), want)
        want = packed(want) if name == "flux1" else want.reshape(1, -1, 1)
        got_t = ts.inpaint_mask(torch.from_numpy(m)[None, None], name, factor, "max").numpy()
        got_j = np.asarray(js.inpaint_mask(jnp.asarray(m)[None, ..., None], name, factor, "max"))
        np.testing.assert_array_equal(got_t, want)
        np.testing.assert_array_equal(got_j, want)


def test_center_mode_is_diffusers():
    """The numpy rule in center mode against FluxInpaintPipeline's and Flux2KleinInpaintPipeline's mask paths."""
    from test_inpaint import diffusers_mask_latents

    h, w = 64, 96
    m = np.random.default_rng(1).uniform(size=(1, 1, h, w)).astype(np.float32)
    ours = masks.weights(m[0, 0], family.FLUX1, 8, "center")
    np.testing.assert_array_equal(packed(ours), diffusers_mask_latents(m, "flux1"))
    ours = masks.weights(m[0, 0], family.FLUX2, 8, "center")
    np.testing.assert_allclose(
        ours.reshape(1, -1, 1), diffusers_mask_latents(m, "flux2"), atol=1e-7
    )


def test_thin_strokes_repaint_in_max_mode():
    """The thin-stroke mask repaints nothing as diffusers samples it, and every latent / token a stroke touches
    by default (max); the counts are the closing note's figures."""
    m = thin_strokes()
    counts = {}
    for spec, unit in ((family.FLUX1, 8), (family.FLUX2, 16)):
        assert masks.repainted(m, spec, 8, "center") == 0
        touched = pooled(m, unit) > 0
        np.testing.assert_array_equal(masks.weights(m, spec, 8, "max") > 0, touched)
        counts[spec.name] = (masks.repainted(m, spec, 8, "max"), touched.size)
    print(f"thin strokes, repainted (max mode; center: 0): {counts}")
    assert counts == {"flux1": (27, 64), "flux2": (12, 16)}


def test_soft_masks_keep_their_values():
    """A patch at 0.3 is repainted at 0.3 (max); diffusers' binarisation drops it (center)."""
    m = np.zeros((32, 32), np.float32)
    m[8:16, 8:16] = 0.3
    m[9, 9] = 0.45
    for spec in (family.FLUX1, family.FLUX2):
        assert masks.weights(m, spec, 8, "max").max() == pytest.approx(0.45)
        assert masks.weights(m, spec, 8, "max")[masks.weights(m, spec, 8, "max") > 0].min() >= 0.3
        assert masks.repainted(m, spec, 8, "center") == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_a_thin_stroke_changes_the_picture(name):
    """`pipeline.generate` with 1-pixel strokes that fall between the pixels diffusers samples (the tiny
    autoencoder: 2-pixel latents, 4-pixel tokens): center mode returns the all-keep picture (the stroke is lost);
    max mode repaints along it, the same picture in both frameworks."""
    cfg = dataclasses.replace(configs.get(name), guidance_embed=False)
    ae_name = f"{cfg.family}-ae-tiny"
    rng = np.random.default_rng(4)
    side = 32
    init = rng.uniform(-1, 1, (side, side, 3)).astype(np.float32)
    stroke = np.zeros((side, side, 1), np.float32)
    stroke[:, 7] = stroke[11, :] = 1  # odd columns and rows, at 3 of 4 within a token
    txt = rng.standard_normal((1, 5, cfg.context_in_dim), np.float32)
    vec = rng.standard_normal((1, cfg.vec_in_dim), np.float32) if cfg.family == "flux1" else None
    kw = {"txt": txt, "vec": vec, "width": side, "height": side, "steps": 2, "init": init}
    kw["strength"] = 0.9
    out = {}
    for fw, pipe, pkg in (("torch", tp, mt), ("jax", jp, mj)):
        model, ae = pkg.build_model(cfg, seed=0), pkg.build_model(ae_name, seed=1)
        for mode in ("center", "max"):
            out[fw, mode] = pipe.generate(model, ae, Request(mask=stroke, mask_mode=mode, **kw))
        if fw == "torch":
            keep = pipe.generate(model, ae, Request(mask=0 * stroke, **kw))
    np.testing.assert_array_equal(out["torch", "center"], keep)
    moved = np.abs(out["torch", "max"].astype(int) - keep)
    assert moved[:, :, 7].max() > 20 and moved[:, 11, :].max() > 20, moved.max()
    assert np.abs(out["torch", "max"].astype(int) - out["jax", "max"]).max() <= 1
