"""Training on edit pairs against diffusers' training scripts: one step's loss and gradients for FLUX.1 Kontext
(`examples/dreambooth/train_dreambooth_lora_flux_kontext.py`) and FLUX.2 klein
(`train_dreambooth_lora_flux2_klein_img2img.py`), in both of our frameworks.

The reference is written from diffusers' pieces, as those scripts use them: its transformers, its pipelines' packing
and position-id helpers (`FluxKontextPipeline._pack_latents` / `_prepare_latent_image_ids` with the reference's ids at
t = 1; `Flux2KleinPipeline._pack_latents` / `_prepare_latent_ids` / `_prepare_image_ids` / `_unpack_latents_with_ids`),
and the scripts' loss: noisy = (1 - sigma) x + sigma noise, the reference latents appended to the sequence, the
prediction trimmed to the target's tokens, MSE against noise - x. Ours: the batch `minflux cache` writes (tokens,
ids at `cfg.ref_time`), through `train.flow_loss` / `train.loss_fn`. Same weights, noise and times; fp32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from safetensors.torch import load_file
from test_reference import diffusers_model

import minflux_jax as mj
import minflux_torch as mt
from minflux import configs, ids, keymaps
from minflux_jax import train as jtrain
from minflux_jax.load import assign, torch_keys
from minflux_torch import sampling as tsampling
from minflux_torch import train as ttrain
from minflux_torch.load import to_numpy

diffusers = pytest.importorskip("diffusers")
# fp32 rel-L2 of the loss, of the gradients (all parameters as one vector) and of each parameter's gradient.
# Measured (CPU, 2026-12): Kontext loss 0 (torch) / 1.0e-7 (JAX), gradients 1.3e-6, worst parameter 8.2e-6 (torch) /
# 7.8e-6 (JAX), double_blocks.1.txt_mlp.0.bias; klein (1 and 2 references) loss <= 1.0e-7, gradients <= 3.4e-7,
# worst parameter <= 2.4e-6. Where the rest comes from: the time and guidance sinusoids (t x 1000, guidance x 1000:
# arguments up to 2500 rad, where one ulp of a frequency moves sin / cos by ~1e-4). Our frequency table is BFL's
# formula with its fp32 exponent and a correctly rounded exp (`layers._freqs`); torch's fp32 exp, which BFL's code
# and diffusers' (`get_timestep_embedding`, bitwise BFL's) use, is one ulp off that in 3 of the 128 frequencies
# (`test_time_frequencies_are_bfls`). With torch's own table substituted on both sides the worst parameter is
# 7.5e-7 (torch) / 1.5e-6 (JAX): the rest is the exp library's last bit, a property of the fp32 formula itself.
# (Before, the table kept the exponent in float64: 87 of 128 frequencies up to 7 ulps off BFL's, and guidance_in's
# gradient 3.2e-5 off diffusers'.)
BOUND = 1e-5
PARAM_BOUND = 1e-5

KONTEXT = configs.get("flux1-tiny")  # FLUX.1 Kontext is FLUX.1 dev's shape, guidance-distilled
KLEIN = dataclasses.replace(configs.get("flux2-tiny"), guidance_embed=False)  # klein: no guidance


def models(cfg, tmp_path):
    """Ours (PyTorch, and JAX with the same weights; norm scales randomised) and diffusers' from the same file."""
    torch.manual_seed(0)
    tm = mt.build_model(cfg, seed=0)
    with torch.no_grad():
        for k, p in tm.named_parameters():
            if k.endswith("scale"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    mt.save_model(tm, tmp_path / "diffusers.safetensors", layout="diffusers")
    ref = diffusers_model(cfg)
    ref.load_state_dict(load_file(tmp_path / "diffusers.safetensors"), strict=True)
    jm = mj.build_model(cfg, seed=1)
    assign(jm, {k: to_numpy(v).copy() for k, v in tm.state_dict().items()})
    return tm, jm, ref


def diffusers_grads_as_bfl(ref, cfg) -> dict[str, np.ndarray]:
    """diffusers' gradients under BFL names, through our key map's recipes (fused qkv, swapped norm_out, ...):
    a gradient maps like the weight it belongs to."""
    grads = {k: p.grad.numpy() for k, p in ref.named_parameters()}
    recipes = keymaps.convert(
        {k: g.shape for k, g in grads.items()}, "diffusers", "bfl", cfg.family, cfg.hidden_size
    )
    return {k: keymaps.apply(r, lambda key, a, b: grads[key][a:b]) for k, r in recipes.items()}


def ours(tm, jm, cfg, batch: dict, noise: np.ndarray, t: np.ndarray):
    """(loss, {BFL key: grad}) from the PyTorch twin and from JAX, on the same batch, noise and times."""
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}
    tm.zero_grad(set_to_none=True)
    t_loss = ttrain.flow_loss(tm, tb, torch.from_numpy(noise), torch.from_numpy(t))
    t_loss.backward()
    t_grads = {k: p.grad.numpy().copy() for k, p in tm.named_parameters()}
    graphdef, params, paths = jtrain.split_params(jm)
    loss, grads = jax.jit(
        lambda p, b, n, tt: jax.value_and_grad(jtrain.loss_fn)(p, {}, graphdef, paths, b, n, tt)
    )(params, {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(noise), jnp.asarray(t))
    layout = {key: param for key, param in torch_keys(jm).values()}
    j_grads = {k: keymaps.flax_to_torch(np.asarray(g), layout[k]) for k, g in grads.items()}
    return (float(t_loss.detach()), t_grads), (float(loss), j_grads)


def check(name, expected_loss, expected, results):
    """Loss, gradients (all parameters as one vector) and each parameter's gradient within BOUND, in both of our
    frameworks (what is left, at most 8.2e-6: the sinusoids' exp, see BOUND)."""
    for fw, (loss, grads) in zip(("torch", "jax"), results, strict=True):
        assert set(grads) == set(expected)
        errs = {k: rel_l2(grads[k], expected[k]) for k in expected}
        worst = max(errs, key=errs.get)
        whole = rel_l2(
            np.concatenate([grads[k].ravel() for k in expected]),
            np.concatenate([expected[k].ravel() for k in expected]),
        )
        loss_err = abs(loss - expected_loss) / abs(expected_loss)
        print(
            f"{name} {fw}: loss rel {loss_err:.1e}, gradients rel-L2 {whole:.1e}, worst parameter "
            f"{errs[worst]:.1e} ({worst})"
        )
        assert loss_err < BOUND
        assert whole < BOUND
        assert errs[worst] < PARAM_BOUND, (worst, errs[worst])


@pytest.mark.slow
def test_kontext_step_matches_diffusers_training_script(tmp_path):
    cfg, rng = KONTEXT, np.random.default_rng(0)
    tm, jm, ref = models(cfg, tmp_path)
    b, (h, w), (hc, wc), lt = 2, (8, 12), (12, 8), 5  # latent sizes (16 channels, packed 2 x 2)
    x = rng.standard_normal((b, 16, h, w)).astype(np.float32)  # model_input (scaled latents)
    cond = rng.standard_normal((b, 16, hc, wc)).astype(np.float32)  # cond_model_input
    noise = rng.standard_normal(x.shape).astype(np.float32)
    sigmas = np.array([0.3, 0.85], np.float32)  # timesteps / 1000
    txt = rng.standard_normal((b, lt, cfg.context_in_dim)).astype(np.float32)
    vec = rng.standard_normal((b, cfg.vec_in_dim)).astype(np.float32)
    guidance = np.full(b, 2.5, np.float32)

    # diffusers, as train_dreambooth_lora_flux_kontext.py
    pipe = diffusers.FluxKontextPipeline
    T = torch.from_numpy
    s = T(sigmas)[:, None, None, None]
    noisy = (1.0 - s) * T(x) + s * T(noise)
    packed = pipe._pack_latents(noisy, b, 16, h, w)
    packed_cond = pipe._pack_latents(T(cond), b, 16, hc, wc)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    cond_ids = pipe._prepare_latent_image_ids(b, hc // 2, wc // 2, "cpu", torch.float32)
    cond_ids[..., 0] = 1
    pred = ref(
        hidden_states=torch.cat([packed, packed_cond], dim=1),
        timestep=T(sigmas),
        guidance=T(guidance),
        pooled_projections=T(vec),
        encoder_hidden_states=T(txt),
        txt_ids=torch.zeros(lt, 3),
        img_ids=torch.cat([img_ids, cond_ids], dim=0),
        return_dict=False,
    )[0][:, : packed.shape[1]]
    pred = pipe._unpack_latents(pred, height=h * 8, width=w * 8, vae_scale_factor=8)
    loss = torch.mean(((pred.float() - (T(noise) - T(x)).float()) ** 2).reshape(b, -1), 1).mean()
    loss.backward()
    expected = diffusers_grads_as_bfl(ref, cfg)

    # ours: the batch as minflux cache writes it
    pack = lambda a: tsampling.pack(torch.from_numpy(a), "flux1").numpy()  # noqa: E731
    img_ids, txt_ids = ids.for_config(cfg, b, h // 2, w // 2, lt)
    batch = {
        "img": pack(x),
        "img_ids": img_ids,
        "txt": txt,
        "txt_ids": txt_ids,
        "vec": vec,
        "guidance": guidance,
        "ref": pack(cond),
        "ref_ids": ids.image_ids(b, hc // 2, wc // 2, 3, cfg.ref_time(0)),
    }
    check("kontext", float(loss.detach()), expected, ours(tm, jm, cfg, batch, pack(noise), sigmas))


@pytest.mark.slow
@pytest.mark.parametrize("n_refs", [1, 2])
def test_klein_step_matches_diffusers_training_script(tmp_path, n_refs):
    cfg, rng = KLEIN, np.random.default_rng(1)
    tm, jm, ref = models(cfg, tmp_path)
    b, (h, w), lt = 2, (4, 6), 5  # patchified latents (128 channels)
    sizes = [(6, 4), (3, 5)][:n_refs]
    x = rng.standard_normal((b, 128, h, w)).astype(np.float32)
    conds = [rng.standard_normal((b, 128, hc, wc)).astype(np.float32) for hc, wc in sizes]
    noise = rng.standard_normal(x.shape).astype(np.float32)
    sigmas = np.array([0.6, 0.15], np.float32)
    txt = rng.standard_normal((b, lt, cfg.context_in_dim)).astype(np.float32)

    # diffusers, as train_dreambooth_lora_flux2_klein_img2img.py (several references: the pipeline's ids)
    pipe = diffusers.Flux2KleinPipeline
    T = torch.from_numpy
    s = T(sigmas)[:, None, None, None]
    noisy = (1.0 - s) * T(x) + s * T(noise)
    x_ids = pipe._prepare_latent_ids(T(x))
    cond_ids = pipe._prepare_image_ids([T(c[0:1]) for c in conds]).expand(b, -1, -1)
    packed = pipe._pack_latents(noisy)
    pred = ref(
        hidden_states=torch.cat([packed, *[pipe._pack_latents(T(c)) for c in conds]], dim=1),
        timestep=T(sigmas),
        guidance=None,
        encoder_hidden_states=T(txt),
        txt_ids=pipe._prepare_text_ids(T(txt)),
        img_ids=torch.cat([x_ids, cond_ids], dim=1),
        return_dict=False,
    )[0][:, : packed.shape[1]]
    pred = pipe._unpack_latents_with_ids(pred, x_ids)
    loss = torch.mean(((pred.float() - (T(noise) - T(x)).float()) ** 2).reshape(b, -1), 1).mean()
    loss.backward()
    expected = diffusers_grads_as_bfl(ref, cfg)

    pack = lambda a: tsampling.pack(torch.from_numpy(a), "flux2").numpy()  # noqa: E731
    img_ids, txt_ids = ids.for_config(cfg, b, h, w, lt)
    batch = {
        "img": pack(x),
        "img_ids": img_ids,
        "txt": txt,
        "txt_ids": txt_ids,
        "ref": np.concatenate([pack(c) for c in conds], axis=1),
        "ref_ids": np.concatenate(
            [ids.image_ids(b, hc, wc, 4, cfg.ref_time(i)) for i, (hc, wc) in enumerate(sizes)],
            axis=1,
        ),
    }
    check(
        f"klein {n_refs} ref",
        float(loss.detach()),
        expected,
        ours(tm, jm, cfg, batch, pack(noise), sigmas),
    )


def test_time_frequencies_are_bfls():
    """The time / guidance embedding's frequencies (`layers._freqs`, one table for both frameworks) are BFL's
    `timestep_embedding` formula evaluated in fp32 as BFL's code and diffusers' `get_timestep_embedding` evaluate
    it (torch, bitwise the same in both), up to the last bit of torch's exp: at most one ulp, in a few entries."""
    import math

    from diffusers.models.embeddings import get_timestep_embedding

    from minflux_jax.layers import _freqs as jax_freqs
    from minflux_torch.layers import _freqs

    half, max_period = 128, 10_000
    bfl = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half
    ).numpy()
    # diffusers' arguments at t = 1 (cos half first with flip_sin_to_cos): its frequencies, bitwise BFL's
    ones = get_timestep_embedding(
        torch.ones(1), 2 * half, flip_sin_to_cos=True, downscale_freq_shift=0
    )
    np.testing.assert_array_equal(ones[0, :half].numpy(), torch.cos(torch.from_numpy(bfl)).numpy())
    ours = _freqs(half, max_period)
    np.testing.assert_array_equal(ours, jax_freqs(half, max_period))
    ulps = np.abs(ours.view(np.int32) - bfl.view(np.int32))
    assert ulps.max() <= 1 and (ulps > 0).sum() <= 8, (ulps.max(), (ulps > 0).sum())


def test_control_channels_are_concatenated_and_only_target_tokens_count():
    """FLUX.1 Fill / Canny / Depth: img_cond joins each token's channels (the model's in_channels), the loss is over
    the target's own channels and tokens; the twins agree on it."""
    cfg = dataclasses.replace(
        KONTEXT, in_channels=128
    )  # Canny / Depth: 64 image + 64 control channels
    tm = mt.build_model(cfg, seed=0)
    jm = mj.build_model(cfg, seed=1)
    assign(jm, {k: to_numpy(v).copy() for k, v in tm.state_dict().items()})
    rng = np.random.default_rng(2)
    img_ids, txt_ids = ids.for_config(cfg, 2, 3, 4, 5)
    batch = {
        "img": rng.standard_normal((2, 12, 64)).astype(np.float32),
        "img_cond": rng.standard_normal((2, 12, 64)).astype(np.float32),
        "img_ids": img_ids,
        "txt": rng.standard_normal((2, 5, cfg.context_in_dim)).astype(np.float32),
        "txt_ids": txt_ids,
        "vec": rng.standard_normal((2, cfg.vec_in_dim)).astype(np.float32),
        "guidance": np.full(2, 30.0, np.float32),
    }
    noise, t = rng.standard_normal((2, 12, 64)).astype(np.float32), np.array([0.2, 0.7], np.float32)
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        x = (1 - tb["img"].new_tensor(t)[:, None, None]) * tb["img"] + torch.from_numpy(t)[
            :, None, None
        ] * torch.from_numpy(noise)
        pred = tm(
            img=torch.cat([x, tb["img_cond"]], -1),
            img_ids=tb["img_ids"],
            txt=tb["txt"],
            txt_ids=tb["txt_ids"],
            timesteps=torch.from_numpy(t),
            y=tb["vec"],
            guidance=tb["guidance"],
        )
        expected = torch.mean((pred - (torch.from_numpy(noise) - tb["img"])) ** 2)
        got = ttrain.flow_loss(tm, tb, torch.from_numpy(noise), torch.from_numpy(t))
    assert abs(float(got) / float(expected) - 1) < 1e-6
    graphdef, params, paths = jtrain.split_params(jm)
    j = jtrain.loss_fn(
        params,
        {},
        graphdef,
        paths,
        {k: jnp.asarray(v) for k, v in batch.items()},
        jnp.asarray(noise),
        jnp.asarray(t),
    )
    assert abs(float(j) / float(expected) - 1) < BOUND
