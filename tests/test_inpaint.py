"""Inpainting with the ordinary models against diffusers' pipelines, which we did not write:
`FluxInpaintPipeline` (FLUX.1 dev / schnell / Krea) and `Flux2KleinInpaintPipeline` (FLUX.2 klein).

Tiny transformers with seeded random weights: ours load the BFL file, diffusers' the diffusers-layout file our key
map wrote from the same weights. The pipelines take latents directly (no autoencoder run) and the same seeded
noise; the final latents must agree in both of our frameworks.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from safetensors.torch import load_file
from test_reference import diffusers_model

import minflux_jax as mj
import minflux_torch as mt
from minflux import configs
from minflux_jax import sampling as js
from minflux_torch import sampling as ts

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.flux.pipeline_flux_inpaint import FluxInpaintPipeline  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein_inpaint import Flux2KleinInpaintPipeline  # noqa: E402

FLUX1 = configs.get("flux1-tiny")  # guidance-distilled, like dev
KLEIN = dataclasses.replace(
    configs.get("flux2-tiny"), guidance_embed=False
)  # klein: no guidance embedder


def pixel_mask(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(1, 1, h, w) in [0, 1]: the left third kept (0), the rest random per pixel, so binarisation, the pixel each
    latent samples and the bilinear weights all matter."""
    m = np.random.default_rng(seed).uniform(size=(1, 1, h, w)).astype(np.float32)
    m[..., : w // 3] = 0.2
    return m


def nhwc(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def nchw(x) -> np.ndarray:
    return np.array(x).transpose(0, 3, 1, 2)


def build_models(tmp_path_factory) -> dict:
    """cfg name -> (torch model, jax model, diffusers transformer), the same random weights."""
    out = {}
    for name, cfg in (("flux1", FLUX1), ("klein", KLEIN)):
        d = tmp_path_factory.mktemp(name)
        tm = mt.build_model(cfg, seed=0)
        mt.save_model(tm, d / "bfl.safetensors")
        mt.save_model(tm, d / "diffusers.safetensors", layout="diffusers")
        ref = diffusers_model(cfg).eval()
        ref.load_state_dict(load_file(d / "diffusers.safetensors"), strict=True)
        out[name] = tm.eval(), mj.load_model(cfg, d / "bfl.safetensors", dtype=jnp.float32), ref
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory)


def diffusers_mask_latents(m: np.ndarray, family: str) -> np.ndarray:
    """A pixel mask (1, 1, H, W) through the diffusers pipeline's own mask path (binarise, then
    `prepare_mask_latents`): FluxInpaintPipeline's (B, L, 64) for "flux1", Flux2KleinInpaintPipeline's (B, L, 1)
    for "flux2"."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    h, w = m.shape[-2:]
    if family == "flux1":
        proc = VaeImageProcessor(
            vae_scale_factor=16,
            vae_latent_channels=16,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )
        fake = SimpleNamespace(vae_scale_factor=8, _pack_latents=FluxPipeline._pack_latents)
        want, _ = FluxInpaintPipeline.prepare_mask_latents(
            fake,
            proc.preprocess(torch.from_numpy(m), height=h, width=w),
            torch.zeros(1, 16, h // 8, w // 8),
            1,
            16,
            1,
            h,
            w,
            torch.float32,
            "cpu",
            None,
        )
        return want.numpy()
    proc = Flux2ImageProcessor(
        vae_scale_factor=16,
        vae_latent_channels=32,
        do_normalize=False,
        do_binarize=True,
        do_convert_rgb=False,
        do_convert_grayscale=True,
    )
    fake = SimpleNamespace(
        vae_scale_factor=8, _pack_latents=Flux2KleinInpaintPipeline._pack_latents
    )
    want = Flux2KleinInpaintPipeline.prepare_mask_latents(
        fake,
        proc.preprocess(torch.from_numpy(m), height=h, width=w),
        1,
        1,
        h,
        w,
        torch.float32,
        "cpu",
    )
    return want.numpy()


def test_masks_match_diffusers():
    """`inpaint_mask` against each pipeline's own mask path (binarise, then prepare_mask_latents), both frameworks."""
    h, w = 64, 96
    m = pixel_mask(h, w)
    want = diffusers_mask_latents(m, "flux1")
    assert want.shape == (1, h * w // 256, 64)
    np.testing.assert_array_equal(
        ts.inpaint_mask(torch.from_numpy(m), "flux1", mode="center").numpy(), want
    )
    np.testing.assert_array_equal(
        np.asarray(js.inpaint_mask(nhwc(m), "flux1", mode="center")), want
    )

    want = diffusers_mask_latents(m, "flux2")
    assert (
        want.shape == (1, h * w // 256, 1)
        and 0 < want.mean() < 1
        and ((want > 0) & (want < 1)).any()
    )
    np.testing.assert_allclose(
        ts.inpaint_mask(torch.from_numpy(m), "flux2", mode="center").numpy(), want, atol=1e-7
    )
    np.testing.assert_allclose(
        np.asarray(js.inpaint_mask(nhwc(m), "flux2", mode="center")), want, atol=1e-7
    )


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_flux1_inpaint_matches_diffusers(models, strength):
    tm, jm, ref = models["flux1"]
    side, steps, lt = 64, 4, 5  # 8 x 8 latents, 4 x 4 tokens
    rng = np.random.default_rng(1)
    init = rng.standard_normal((1, 16, side // 8, side // 8), np.float32)
    txt = rng.standard_normal((1, lt, FLUX1.context_in_dim), np.float32)
    vec = rng.standard_normal((1, FLUX1.vec_in_dim), np.float32)
    mask = pixel_mask(side, side)
    pipe = FluxInpaintPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=ref,
    )
    want = pipe(
        prompt_embeds=torch.from_numpy(txt),
        pooled_prompt_embeds=torch.from_numpy(vec),
        image=torch.from_numpy(init),
        mask_image=torch.from_numpy(mask),
        masked_image_latents=torch.from_numpy(init),
        height=side,
        width=side,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=3.5,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images.numpy()  # packed (1, 16, 64)
    noise = torch.randn(
        init.shape, generator=torch.Generator().manual_seed(0)
    )  # the pipeline's draw
    a = ts.sample_inpaint(
        tm,
        noise,
        torch.from_numpy(txt),
        torch.from_numpy(init),
        torch.from_numpy(mask),
        torch.from_numpy(vec),
        steps=steps,
        strength=strength,
        guidance=3.5,
        mask_mode="center",  # diffusers' mask sampling
    )
    b = js.sample_inpaint(
        jm,
        nhwc(noise.numpy()),
        jnp.asarray(txt),
        nhwc(init),
        nhwc(mask),
        jnp.asarray(vec),
        steps=steps,
        strength=strength,
        guidance=3.5,
        mask_mode="center",  # diffusers' mask sampling
    )
    a_tok, b_tok = ts.pack(a, "flux1").numpy(), ts.pack(torch.from_numpy(nchw(b)), "flux1").numpy()
    ea, eb = rel_l2(a_tok, want), rel_l2(b_tok, want)
    print(
        f"FLUX.1 inpaint strength {strength} vs FluxInpaintPipeline: rel-L2 torch {ea:.1e} jax {eb:.1e}"
    )
    assert ea <= 1e-5 and eb <= 1e-5
    keep = (
        ts.inpaint_mask(torch.from_numpy(mask), "flux1", mode="center").numpy() == 0
    )  # the known region ends as init, exactly
    assert keep.any() and np.array_equal(
        a_tok[keep], ts.pack(torch.from_numpy(init), "flux1").numpy()[keep]
    )
    assert (
        rel_l2(a_tok[~keep], ts.pack(torch.from_numpy(init), "flux1").numpy()[~keep]) > 0.1
    )  # the rest moved


@pytest.mark.parametrize(
    "case,batch", [("distilled", 1), ("cfg+reference", 1), ("distilled", 2), ("cfg+reference", 2)]
)
def test_klein_inpaint_matches_diffusers(models, case, batch):
    """Final latents against Flux2KleinInpaintPipeline. With two prompts the init image (reference 0) and the
    extra reference, of batch one, serve both (diffusers repeats them; ours get the init latents as a batch of
    two, as a caller who expanded them would: the case that crashed)."""
    tm, jm, ref = models["klein"]
    h = w = 4  # tokens; 64 x 64 pixels
    steps, lt, strength = 4, 5, 0.8
    rng = np.random.default_rng(2)
    init = rng.standard_normal(
        (1, 128, h, w), np.float32
    )  # normalised, patchified: our autoencoder's latents
    txt = rng.standard_normal((batch, lt, KLEIN.context_in_dim), np.float32)
    neg = rng.standard_normal((batch, lt, KLEIN.context_in_dim), np.float32)
    extra = rng.standard_normal((1, 128, 2, 3), np.float32)
    mask = pixel_mask(16 * h, 16 * w, seed=3)
    vae = diffusers.AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1
    )
    vae.bn.running_mean.copy_(torch.from_numpy(rng.standard_normal(128).astype(np.float32)))
    vae.bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, 128).astype(np.float32)))
    mean, std = (
        vae.bn.running_mean.view(1, -1, 1, 1),
        torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + 1e-4),
    )
    raw = lambda x: torch.from_numpy(x) * std + mean  # the pipeline normalises latents itself
    cfg = case != "distilled"
    pipe = Flux2KleinInpaintPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=ref,
        is_distilled=not cfg,
    )
    out = pipe(
        prompt_embeds=torch.from_numpy(txt),
        negative_prompt_embeds=torch.from_numpy(neg) if cfg else None,
        image=raw(init),
        image_reference=raw(extra) if cfg else None,
        mask_image=torch.from_numpy(mask),
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=2.5 if cfg else 1.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images  # (B, 32, 2h, 2w)
    want = ((Flux2KleinInpaintPipeline._patchify_latents(out) - mean) / std).numpy()
    noise = torch.randn((batch, *init.shape[1:]), generator=torch.Generator().manual_seed(0))
    init_b = np.repeat(init, batch, axis=0)
    opts = {"steps": steps, "strength": strength, "cfg_scale": 2.5 if cfg else 1.0}
    opts["mask_mode"] = "center"  # diffusers' mask sampling
    a = ts.sample_inpaint(
        tm,
        noise,
        torch.from_numpy(txt),
        torch.from_numpy(init_b),
        torch.from_numpy(mask),
        neg_txt=torch.from_numpy(neg) if cfg else None,
        refs=[torch.from_numpy(extra)] if cfg else (),
        **opts,
    ).numpy()
    b = nchw(
        js.sample_inpaint(
            jm,
            nhwc(noise.numpy()),
            jnp.asarray(txt),
            nhwc(init_b),
            nhwc(mask),
            neg_txt=jnp.asarray(neg) if cfg else None,
            refs=[nhwc(extra)] if cfg else (),
            **opts,
        )
    )
    ea, eb = rel_l2(a, want), rel_l2(b, want)
    print(
        f"klein inpaint ({case}, batch {batch}) vs Flux2KleinInpaintPipeline: rel-L2 torch {ea:.1e} "
        f"jax {eb:.1e}"
    )
    assert ea <= 1e-5 and eb <= 1e-5
    m = (
        ts.inpaint_mask(torch.from_numpy(mask), "flux2", mode="center")
        .numpy()[0, :, 0]
        .reshape(h, w)
    )
    for i in range(batch):
        assert (
            np.abs(a[i][:, m == 0] - init[0][:, m == 0]).max() <= 1e-6
        )  # known tokens end as init
        assert rel_l2(a[i][:, m == 1], init[0][:, m == 1]) > 0.1


def test_inpaint_errors(models):
    tm = models["flux1"][0]
    noise, txt = torch.zeros(1, 16, 8, 8), torch.zeros(1, 5, FLUX1.context_in_dim)
    with pytest.raises(ValueError, match="mask .* does not cover the 4 x 4 token grid"):
        ts.sample_inpaint(tm, noise, txt, noise, torch.zeros(1, 1, 32, 32), guidance=3.5)
    with pytest.raises(ValueError, match="init latents .* and noise .* differ"):
        ts.sample_inpaint(
            tm, noise, txt, torch.zeros(1, 16, 4, 8), torch.zeros(1, 1, 64, 64), guidance=3.5
        )


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_pipeline_inpaint_torch_vs_jax(name):
    """`pipeline.generate` with init + mask on an ordinary model: the same picture in both frameworks, and (PyTorch)
    an all-keep mask gives back exactly the init image's autoencoder round trip."""
    from minflux_jax import pipeline as jp
    from minflux_torch import pipeline as tp

    cfg = dataclasses.replace(configs.get(name), guidance_embed=False)
    ae_name = "flux1-ae-tiny" if cfg.family == "flux1" else "flux2-ae-tiny"
    models = {
        "torch": (mt.build_model(cfg, seed=0), mt.build_model(ae_name, seed=1)),
        "jax": (mj.build_model(cfg, seed=0), mj.build_model(ae_name, seed=1)),
    }
    rng = np.random.default_rng(4)
    side = 32
    init = rng.uniform(-1, 1, (side, side, 3)).astype(np.float32)
    mask = pixel_mask(side, side, seed=5)[0].transpose(1, 2, 0)  # (H, W, 1)
    txt = rng.standard_normal((1, 5, cfg.context_in_dim), np.float32)
    vec = rng.standard_normal((1, cfg.vec_in_dim), np.float32) if cfg.family == "flux1" else None
    out = {}
    for fw, pipe in (("torch", tp), ("jax", jp)):
        model, ae = models[fw]
        kw = {"width": side, "height": side, "steps": 3, "strength": 0.9, "init": init}
        out[fw] = pipe.generate(model, ae, txt, vec, mask=mask, **kw)
        if fw == "torch":
            keep = pipe.generate(model, ae, txt, vec, mask=np.zeros_like(mask), **kw)
            np.testing.assert_array_equal(keep, pipe.decode(ae, pipe.encode(ae, init[None])))
    diff = np.abs(out["torch"].astype(int) - out["jax"].astype(int))
    print(f"pipeline inpaint {name}: torch vs jax max |diff| {diff.max()} (uint8)")
    assert out["torch"].shape == (1, side, side, 3) and diff.max() <= 1


def test_generate_inpaint_command(tmp_path):
    """`minflux generate --init --mask` with ordinary models: both frameworks, the same picture, and the pixels
    outside the mask stay close to the init image (they are re-noised and blended back at each step)."""
    from PIL import Image

    from minflux_cli.main import main

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    for model in ("flux1-tiny", "flux2-tiny"):
        out = {}
        for fw in ("torch", "jax"):
            path = tmp_path / f"{model}-{fw}.png"
            assert (
                main(
                    [
                        "generate",
                        "--random-weights",
                        "--model",
                        model,
                        "--framework",
                        fw,
                        "--steps",
                        "3",
                        "--width",
                        "32",
                        "--height",
                        "32",
                        "--init",
                        str(tmp_path / "init.png"),
                        "--mask",
                        str(tmp_path / "mask.png"),
                        "--strength",
                        "0.9",
                        "--no-progress",
                        "--out",
                        str(path),
                    ]
                )
                == 0
            )
            out[fw] = np.asarray(Image.open(path), np.int16)
        assert np.abs(out["torch"] - out["jax"]).max() <= 1, model
