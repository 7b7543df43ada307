"""FLUX.2 klein KV against diffusers, which we did not write: the transformer's KV modes (`kv_cache_mode`
"extract" / "cached", `Flux2KVAttnProcessor`, `Flux2KVCache`) and `Flux2KleinKVPipeline`'s final latents; and our
cached run against our uncached masked run, in both frameworks.

Tiny klein-shaped transformer (no guidance embedder) with seeded random weights: ours load the BFL file,
diffusers' the diffusers-layout file our key map wrote. The pipeline's reference latents are ours, handed to it
in place of its autoencoder's (its packing, ids, KV loop and schedule are its own).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from PIL import Image
from safetensors.torch import load_file
from test_reference import diffusers_model

import minflux_jax as mj
import minflux_torch as mt
from minflux import configs
from minflux_jax import sampling as js
from minflux_torch import sampling as ts

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.flux2.pipeline_flux2_klein_kv import Flux2KleinKVPipeline  # noqa: E402

KV = dataclasses.replace(configs.get("flux2-tiny"), guidance_embed=False, ref_kv=True)


def nhwc(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(torch model, jax model, diffusers transformer with the KV attention processors), the same weights."""
    d = tmp_path_factory.mktemp("kv")
    tm = mt.build_model(KV, seed=0)
    mt.save_model(tm, d / "bfl.safetensors")
    mt.save_model(tm, d / "diffusers.safetensors", layout="diffusers")
    ref = diffusers_model(KV).eval()
    ref.load_state_dict(load_file(d / "diffusers.safetensors"), strict=True)
    return tm.eval(), mj.load_model(KV, d / "bfl.safetensors", dtype=jnp.float32), ref


@pytest.mark.slow
def test_forward_extract_and_cached_match_diffusers(models):
    """One step with the references (their keys and values kept), then one without them, against the
    diffusers transformer in "extract" and "cached" modes, both frameworks."""
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )

    tm, jm, ref = models
    for block in ref.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in ref.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    rng = np.random.default_rng(0)
    h, w, lt = 3, 4, 5
    img = rng.standard_normal((1, h * w, 128), np.float32)
    img2 = rng.standard_normal((1, h * w, 128), np.float32)
    refs = [
        torch.from_numpy(rng.standard_normal((1, 128, 2, 3), np.float32)),
        torch.from_numpy(rng.standard_normal((1, 128, 3, 2), np.float32)),
    ]
    ref_tok, ref_ids = (a.numpy() for a in ts.reference_tokens(refs, "flux2"))
    txt = rng.standard_normal((1, lt, KV.context_in_dim), np.float32)
    img_ids, txt_ids = ts.image_ids(1, h, w, "flux2").numpy(), ts.text_ids(1, lt, "flux2").numpy()
    t1, t2 = np.array([0.9], np.float32), np.array([0.4], np.float32)
    T = torch.from_numpy
    with torch.inference_mode():  # diffusers: references first, [ref, img]
        want1, cache = ref(
            hidden_states=T(np.concatenate((ref_tok, img), 1)),
            encoder_hidden_states=T(txt),
            timestep=T(t1),
            img_ids=T(np.concatenate((ref_ids, img_ids), 1)),
            txt_ids=T(txt_ids),
            return_dict=False,
            kv_cache_mode="extract",
            num_ref_tokens=ref_tok.shape[1],
        )
        want2 = ref(
            hidden_states=T(img2),
            encoder_hidden_states=T(txt),
            timestep=T(t2),
            img_ids=T(img_ids),
            txt_ids=T(txt_ids),
            return_dict=False,
            kv_cache=cache,
            kv_cache_mode="cached",
        )[0]
        want1 = want1.numpy()  # diffusers returns the image tokens only
        # ours: references last, [img, ref]
        a1, kv = tm.forward_kv(
            x=T(np.concatenate((img, ref_tok), 1)),
            x_ids=T(np.concatenate((img_ids, ref_ids), 1)),
            timesteps=T(t1),
            ctx=T(txt),
            ctx_ids=T(txt_ids),
            n_ref=ref_tok.shape[1],
        )
        a1 = a1[:, : h * w]
        a2 = tm.forward_cached(
            x=T(img2), x_ids=T(img_ids), timesteps=T(t2), ctx=T(txt), ctx_ids=T(txt_ids), cache=kv
        )
    J = jnp.asarray
    b1, kv = jm.forward_kv(
        x=J(np.concatenate((img, ref_tok), 1)),
        x_ids=J(np.concatenate((img_ids, ref_ids), 1)),
        timesteps=J(t1),
        ctx=J(txt),
        ctx_ids=J(txt_ids),
        n_ref=ref_tok.shape[1],
    )
    b1 = b1[:, : h * w]
    b2 = jm.forward_cached(
        x=J(img2), x_ids=J(img_ids), timesteps=J(t2), ctx=J(txt), ctx_ids=J(txt_ids), cache=kv
    )
    errs = [
        rel_l2(a1.numpy(), want1),
        rel_l2(a2.numpy(), want2.numpy()),
        rel_l2(np.asarray(b1), want1),
        rel_l2(np.asarray(b2), want2.numpy()),
    ]
    print(
        "klein KV forward vs diffusers (extract torch, cached torch, extract jax, cached jax): "
        + " ".join(f"{e:.1e}" for e in errs)
    )
    assert max(errs) <= 1e-5
    plain = tm(
        x=T(img2), x_ids=T(img_ids), timesteps=T(t2), ctx=T(txt), ctx_ids=T(txt_ids)
    ).detach()
    assert (
        rel_l2(plain.numpy(), want2.numpy()) > 1e-3
    )  # the cached references matter (far above the errors)


def klein_pipeline(
    ref_model, refs: list[np.ndarray], txt: np.ndarray, side: int, steps: int, kv: bool = True
) -> np.ndarray:
    """diffusers' Flux2KleinKVPipeline (kv) or Flux2KleinPipeline (distilled) with our reference latents in place
    of its autoencoder's; its final latents normalised and patchified back to our (B, 128, h, w). txt (B, L, D):
    the pipeline repeats the references for every prompt, and draws the batch's noise from one generator."""
    vae = diffusers.AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1
    )
    rng = np.random.default_rng(9)
    vae.bn.running_mean.copy_(torch.from_numpy(rng.standard_normal(128).astype(np.float32)))
    vae.bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, 128).astype(np.float32)))
    parts = {
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, shift=3.0
        ),
        "vae": vae,
        "text_encoder": None,
        "tokenizer": None,
        "transformer": ref_model,
    }
    pipe = (
        Flux2KleinKVPipeline(**parts)
        if kv
        else diffusers.Flux2KleinPipeline(**parts, is_distilled=True)
    )
    given = iter(refs)
    pipe._encode_vae_image = lambda image, generator: torch.from_numpy(next(given))
    # The pictures only set each reference's size (16 pixels per token); their latents are the ones given.
    pictures = [Image.new("RGB", (16 * r.shape[3], 16 * r.shape[2])) for r in refs]
    out = pipe(
        image=pictures,
        prompt_embeds=torch.from_numpy(txt),
        height=side,
        width=side,
        num_inference_steps=steps,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    mean, std = (
        vae.bn.running_mean.view(1, -1, 1, 1),
        torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + 1e-4),
    )
    return ((Flux2KleinKVPipeline._patchify_latents(out) - mean) / std).numpy()


@pytest.mark.parametrize("batch,n_refs", [(1, 1), (1, 2), (2, 1), (2, 3)])
def test_kv_pipeline_matches_diffusers(models, batch, n_refs):
    """Final latents against Flux2KleinKVPipeline; with two prompts the references of batch one serve both."""
    tm, jm, ref = models
    side, steps = 64, 4  # 4 x 4 tokens
    rng = np.random.default_rng(n_refs)
    refs = [
        rng.standard_normal((1, 128, 4, 4 + i), np.float32) for i in range(n_refs)
    ]  # diffusers: >= 64 px
    txt = rng.standard_normal((batch, 5, KV.context_in_dim), np.float32)
    want = klein_pipeline(ref, refs, txt, side, steps)
    noise = torch.randn(
        batch, 128, side // 16, side // 16, generator=torch.Generator().manual_seed(0)
    )
    a = ts.sample_kv(
        tm, noise, torch.from_numpy(txt), [torch.from_numpy(r) for r in refs], steps=steps
    ).numpy()
    b = js.sample_kv(
        jm, nhwc(noise.numpy()), jnp.asarray(txt), [nhwc(r) for r in refs], steps=steps
    )
    b = np.array(b).transpose(0, 3, 1, 2)
    ea, eb = rel_l2(a, want), rel_l2(b, want)
    print(
        f"klein KV, batch {batch}, {n_refs} reference(s), vs Flux2KleinKVPipeline: rel-L2 torch {ea:.1e} "
        f"jax {eb:.1e}"
    )
    assert ea <= 1e-4 and eb <= 1e-4
    assert rel_l2(a, noise.numpy()) > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cached_equals_uncached(models, framework):
    """The cached run (references computed once) against the masked run that recomputes them every step."""
    tm, jm, _ = models
    rng = np.random.default_rng(5)
    refs = [
        rng.standard_normal((1, 128, 3, 3), np.float32),
        rng.standard_normal((1, 128, 2, 4), np.float32),
    ]
    txt = rng.standard_normal(
        (2, 5, KV.context_in_dim), np.float32
    )  # a batch of two prompts, one set of refs
    noise = rng.standard_normal((2, 128, 4, 4), np.float32)
    if framework == "torch":
        run = lambda cached: ts.sample_kv(
            tm,
            torch.from_numpy(noise),
            torch.from_numpy(txt),
            [torch.from_numpy(r) for r in refs],
            steps=4,
            cached=cached,
        ).numpy()
    else:
        run = lambda cached: np.asarray(
            js.sample_kv(
                jm, nhwc(noise), jnp.asarray(txt), [nhwc(r) for r in refs], steps=4, cached=cached
            )
        )
    cached, masked = run(True), run(False)
    err = rel_l2(cached, masked)
    print(f"klein KV {framework}: cached vs uncached masked rel-L2 {err:.1e}")
    assert err <= 1e-6


def test_kv_preset_and_errors(models):
    kv, klein = configs.get("flux2-klein-9b-kv"), configs.get("flux2-klein-9b")
    assert (
        kv.ref_kv and dataclasses.replace(kv, ref_kv=False) == klein
    )  # the same weights layout as klein 9B
    tm = models[0]
    noise, txt = torch.zeros(1, 128, 2, 2), torch.zeros(1, 3, KV.context_in_dim)
    with pytest.raises(ValueError, match="needs at least one reference"):
        ts.sample_kv(tm, noise, txt, [])
    with pytest.raises(ValueError, match="takes no guidance"):
        ts.sample_kv(mt.build_model("flux2-tiny", seed=0), noise, txt, [noise])


def test_pipeline_uses_kv_for_kv_models():
    """`pipeline.generate` with references on a klein KV model runs the cached loop: the same picture in both
    frameworks, and (PyTorch) the picture of `sample_kv` decoded, not of the ordinary reference path."""
    from minflux_jax import pipeline as jp
    from minflux_torch import pipeline as tp

    rng = np.random.default_rng(6)
    side = 32
    ref = rng.uniform(-1, 1, (32, 48, 3)).astype(np.float32)
    txt = rng.standard_normal((1, 5, KV.context_in_dim), np.float32)
    kw = {"width": side, "height": side, "steps": 3, "refs": [ref], "seed": 3}
    tm, ae = mt.build_model(KV, seed=0), mt.build_model("flux2-ae-tiny", seed=1)
    a = tp.generate(tm, ae, txt, **kw)
    b = jp.generate(mj.build_model(KV, seed=0), mj.build_model("flux2-ae-tiny", seed=1), txt, **kw)
    diff = np.abs(a.astype(int) - b.astype(int)).max()
    print(f"pipeline klein KV: torch vs jax max |diff| {diff} (uint8)")
    assert diff <= 1
    noise = ts.get_noise(1, side, side, "flux2", 3, pixels_per_token=4)
    lat = ts.sample_kv(tm, noise, torch.from_numpy(txt), [tp.encode(ae, ref[None])], steps=3)
    np.testing.assert_array_equal(a, tp.decode(ae, lat))
    plain = ts.sample(tm, noise, torch.from_numpy(txt), steps=3, refs=[tp.encode(ae, ref[None])])
    assert not np.array_equal(a, tp.decode(ae, plain))
