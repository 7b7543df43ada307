"""Sampling: schedules and token/id helpers against diffusers' pipelines, the Euler loop across
frameworks, JAX's compile-once loop, and `minflux generate` end to end.

References we did not write: diffusers' `FlowMatchEulerDiscreteScheduler` with each FLUX pipeline's mu
(`calculate_shift`, `compute_empirical_mu`) and the pipelines' static helpers (`_pack_latents`,
`_prepare_latent_image_ids`, `_prepare_text_ids`, `_prepare_image_ids`, `prepare_mask_latents`, ...).
Trajectories compare PyTorch with JAX on the same weights (a saved tiny checkpoint) and the same noise.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2

import minflux_jax as mj
import minflux_torch as mt
from minflux import configs, schedules
from minflux_cli import main as cli
from minflux_jax import sampling as js
from minflux_torch import sampling as ts

# fp32 CPU, per step, the DESIGN bound for tiny whole models. Measured over 6 steps (pytest -s prints it):
# rel-L2 <= 3.0e-7 (true CFG), <= 1.8e-7 (Fill), <= 8.3e-8 (Canny/Depth), <= 9e-8 (Kontext, FLUX.2 references);
# max-abs <= 2e-6.
TRAJECTORY_RTOL = 1e-5


def nchw_to_nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


# ---------------------------------------------------------------------------------------------
# Schedules: equal to diffusers' scheduler fed each pipeline's mu
# ---------------------------------------------------------------------------------------------


def diffusers_sigmas(steps: int, mu: float | None) -> np.ndarray:
    """The sigmas FluxPipeline / Flux2Pipeline integrate over (with the terminal 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    dynamic = mu is not None  # schnell's scheduler: no dynamic shifting, shift 1
    sched = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=dynamic,
        shift=3.0 if dynamic else 1.0,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched.sigmas.numpy()


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("seq_len", [64, 256, 1024, 4096, 6000])
def test_flux1_schedule_matches_diffusers(steps, seq_len):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    ours = np.array(schedules.get_schedule(steps, seq_len, "flux1"))
    ref = diffusers_sigmas(steps, calculate_shift(seq_len))
    assert ours.shape == ref.shape == (steps + 1,)
    assert np.abs(ours - ref).max() <= 1e-6
    # schnell: unshifted
    ours = np.array(schedules.get_schedule(steps, seq_len, "flux1", shift=False))
    assert np.abs(ours - diffusers_sigmas(steps, None)).max() <= 1e-6


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("seq_len", [64, 256, 1024, 4096, 4300, 4301, 8192])
def test_flux2_schedule_matches_diffusers(steps, seq_len):
    from diffusers.pipelines.flux2 import pipeline_flux2, pipeline_flux2_klein

    mu = pipeline_flux2.compute_empirical_mu(seq_len, steps)
    assert (
        schedules.compute_empirical_mu(seq_len, steps)
        == mu
        == pipeline_flux2_klein.compute_empirical_mu(seq_len, steps)
    )
    ours = np.array(schedules.get_schedule(steps, seq_len, "flux2"))
    assert np.abs(ours - diffusers_sigmas(steps, mu)).max() <= 1e-6


def test_schedule_shape_and_shift_direction():
    """Shifting moves every interior time toward noise; more tokens shift more (FLUX.1 mu 0.5 -> 1.15)."""
    flat = np.array(schedules.get_schedule(10, 256, "flux1", shift=False))
    small, big = (np.array(schedules.get_schedule(10, n, "flux1")) for n in (256, 4096))
    assert flat[0] == small[0] == 1.0 and flat[-1] == small[-1] == 0.0
    assert (np.diff(small) < 0).all()
    assert (small[1:-1] > flat[1:-1]).all() and (big[1:-1] > small[1:-1]).all()
    assert (
        schedules.get_lin_function()(256) == pytest.approx(0.5)
        and schedules.get_lin_function()(4096) == 1.15
    )


@pytest.mark.parametrize("steps,strength", [(28, 0.6), (28, 1.0), (4, 0.95), (10, 0.33), (50, 0.8)])
def test_strength_start_matches_diffusers(steps, strength):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=0.8)
    timesteps, n = FluxImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=sched), steps, strength, "cpu"
    )
    start = schedules.strength_start(steps, strength)
    assert steps - start == n == len(timesteps)


def test_size_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        schedules.check_size(1000, 1024)
    with pytest.raises(ValueError, match="multiple of 16"):
        schedules.token_grid(1024, 0)
    assert schedules.token_grid(1024, 768) == (48, 64)


# ---------------------------------------------------------------------------------------------
# Packing and position ids: bitwise equal to diffusers' helpers, in both frameworks
# ---------------------------------------------------------------------------------------------


def test_flux1_pack_unpack_ids_match_diffusers():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux_kontext import FluxKontextPipeline

    b, h, w = 2, 3, 5  # token grid; latents are (B, 16, 2h, 2w), the image 16h x 16w pixels
    lat = torch.randn(b, 16, 2 * h, 2 * w)
    ref = FluxPipeline._pack_latents(lat, b, 16, 2 * h, 2 * w)
    assert torch.equal(ts.pack(lat, "flux1"), ref)
    assert np.array_equal(np.asarray(js.pack(nchw_to_nhwc(lat), "flux1")), ref.numpy())

    tokens = torch.randn(b, h * w, 64)
    ref = FluxPipeline._unpack_latents(tokens, 16 * h, 16 * w, 8)
    assert torch.equal(ts.unpack(tokens, h, w, "flux1"), ref)
    assert np.array_equal(
        np.asarray(js.unpack(jnp.asarray(tokens.numpy()), h, w, "flux1")),
        ref.permute(0, 2, 3, 1).numpy(),
    )

    ref = FluxPipeline._prepare_latent_image_ids(b, h, w, "cpu", torch.float32)  # (h*w, 3)
    for ours in (
        ts.image_ids(b, h, w, "flux1").numpy(),
        np.asarray(js.image_ids(b, h, w, "flux1")),
    ):
        assert ours.shape == (b, h * w, 3) and (ours == ref.numpy()).all()
    for ours in (ts.text_ids(b, 7, "flux1").numpy(), np.asarray(js.text_ids(b, 7, "flux1"))):
        assert ours.shape == (b, 7, 3) and not ours.any()

    # Kontext: the reference's ids are the image's with t = 1
    ref_ids = FluxKontextPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)
    ref_ids[..., 0] = 1
    ref_lat = torch.randn(1, 16, 2 * h, 2 * w)
    tok_t, ids_t = ts.reference_tokens([ref_lat], "flux1")
    tok_j, ids_j = js.reference_tokens([nchw_to_nhwc(ref_lat)], "flux1")
    assert torch.equal(tok_t, FluxPipeline._pack_latents(ref_lat, 1, 16, 2 * h, 2 * w))
    assert np.array_equal(np.asarray(tok_j), tok_t.numpy())
    assert (ids_t[0].numpy() == ref_ids.numpy()).all() and (
        np.asarray(ids_j)[0] == ref_ids.numpy()
    ).all()


def test_flux2_pack_unpack_ids_match_diffusers():
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    b, h, w = 2, 3, 5
    lat = torch.randn(b, 128, h, w)
    ref = Flux2Pipeline._pack_latents(lat)
    assert torch.equal(ts.pack(lat, "flux2"), ref)
    assert np.array_equal(np.asarray(js.pack(nchw_to_nhwc(lat), "flux2")), ref.numpy())

    ids = Flux2Pipeline._prepare_latent_ids(lat)  # (B, h*w, 4), int64
    for ours in (
        ts.image_ids(b, h, w, "flux2").numpy(),
        np.asarray(js.image_ids(b, h, w, "flux2")),
    ):
        assert ours.shape == tuple(ids.shape) and (ours == ids.numpy()).all()
    unpacked = Flux2Pipeline._unpack_latents_with_ids(ref, ids)
    assert torch.equal(ts.unpack(ref, h, w, "flux2"), unpacked)
    assert np.array_equal(
        np.asarray(js.unpack(jnp.asarray(ref.numpy()), h, w, "flux2")),
        unpacked.permute(0, 2, 3, 1).numpy(),
    )

    txt = torch.randn(b, 7, 48)
    ref_txt_ids = Flux2Pipeline._prepare_text_ids(txt)
    for ours in (ts.text_ids(b, 7, "flux2").numpy(), np.asarray(js.text_ids(b, 7, "flux2"))):
        assert ours.shape == tuple(ref_txt_ids.shape) and (ours == ref_txt_ids.numpy()).all()

    # multi-reference: t = 10, 20, ..., each reference at its own size
    refs = [torch.randn(1, 128, 2, 4), torch.randn(1, 128, 3, 3), torch.randn(1, 128, 1, 2)]
    ref_ids = Flux2Pipeline._prepare_image_ids(refs)
    tok_t, ids_t = ts.reference_tokens(refs, "flux2")
    tok_j, ids_j = js.reference_tokens([nchw_to_nhwc(r) for r in refs], "flux2")
    assert torch.equal(tok_t, torch.cat([Flux2Pipeline._pack_latents(r) for r in refs], dim=1))
    assert np.array_equal(np.asarray(tok_j), tok_t.numpy())
    assert (ids_t.numpy() == ref_ids.numpy()).all() and (np.asarray(ids_j) == ref_ids.numpy()).all()
    assert sorted(set(ids_t[0, :, 0].tolist())) == [10, 20, 30]


def test_fill_conditioning_matches_diffusers():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux_fill import FluxFillPipeline

    b, hp, wp = 1, 32, 48  # pixels
    masked = torch.randn(b, 16, hp // 8, wp // 8)  # the encoded masked image
    mask = (torch.rand(b, 1, hp, wp) > 0.5).float()
    fake = SimpleNamespace(
        vae_scale_factor=8,
        _pack_latents=FluxPipeline._pack_latents,
        vae=SimpleNamespace(config=SimpleNamespace(shift_factor=0.0, scaling_factor=1.0)),
    )
    mask_ref, masked_ref = FluxFillPipeline.prepare_mask_latents(
        fake, mask, masked, b, 16, 1, hp, wp, torch.float32, "cpu", None
    )
    ref = torch.cat((masked_ref, mask_ref), dim=-1)  # as FluxFillPipeline concatenates them
    ours_t = ts.fill_conditioning(masked, mask)
    ours_j = js.fill_conditioning(nchw_to_nhwc(masked), nchw_to_nhwc(mask))
    assert ours_t.shape == (b, (hp // 16) * (wp // 16), 320)
    assert torch.equal(ours_t, ref)
    assert np.array_equal(np.asarray(ours_j), ref.numpy())


def test_noise_shapes_and_seeds():
    shapes = (("flux1", (1, 16, 8, 12), (1, 8, 12, 16)), ("flux2", (1, 128, 4, 6), (1, 4, 6, 128)))
    for family, tshape, jshape in shapes:
        a, b = ts.get_noise(1, 64, 96, family, seed=3), ts.get_noise(1, 64, 96, family, seed=3)
        assert a.shape == tshape and torch.equal(a, b)
        assert not torch.equal(a, ts.get_noise(1, 64, 96, family, seed=4))
        j = js.get_noise(1, 64, 96, family, seed=3)
        assert j.shape == jshape and np.array_equal(
            np.asarray(j), np.asarray(js.get_noise(1, 64, 96, family, 3))
        )
        # the same numbers in both frameworks (NCHW vs NHWC): one picture per seed, whichever framework draws it
        assert np.array_equal(np.asarray(j), a.permute(0, 2, 3, 1).numpy())
    with pytest.raises(ValueError, match="multiple of 16"):
        ts.get_noise(1, 72, 64, "flux1", seed=0)


# ---------------------------------------------------------------------------------------------
# The Euler loop: PyTorch and JAX trajectories from the same weights and noise
# ---------------------------------------------------------------------------------------------

_F1, _F2 = configs.get("flux1-tiny"), configs.get("flux2-tiny")
_SHALLOW = {"depth": 1, "depth_single_blocks": 1}  # one block of each kind: compiles faster
SCENARIOS = {
    "flux1-dev-kontext": (
        _F1,
        {"guidance": 3.5, "refs": 1},
    ),  # guidance embedding + a reference at t=1
    "flux1-fill": (
        dataclasses.replace(_F1, in_channels=384, **_SHALLOW),
        {"guidance": 30.0, "fill": True},
    ),
    "flux1-canny": (
        dataclasses.replace(_F1, in_channels=128, **_SHALLOW),
        {"guidance": 30.0, "fill": True},
    ),
    "flux2-dev-2refs": (_F2, {"guidance": 4.0, "refs": 2}),  # references at t=10, 20
    "flux2-klein-base-cfg": (
        dataclasses.replace(_F2, guidance_embed=False, **_SHALLOW),
        {"cfg": 4.0},
    ),  # true CFG
}


def _models(cfg, tmp_path):
    """The same random weights in both frameworks, through a saved BFL checkpoint."""
    tm = mt.build_model(cfg, seed=0)
    path = tmp_path / "tiny.safetensors"
    mt.save_model(tm, path)
    return tm, mj.load_model(cfg, path, dtype=jnp.float32)


def _inputs(cfg, opts, h=3, w=4, lt=5, seed=0) -> dict:
    """numpy inputs for `denoise` (tokens and ids), the same for both frameworks."""
    rng = np.random.default_rng(seed)
    fam = cfg.family
    out_c = cfg.out_channels if fam == "flux1" else cfg.in_channels
    kw = {
        "img": rng.standard_normal((1, h * w, out_c), np.float32),
        "img_ids": ts.image_ids(1, h, w, fam).numpy(),
        "txt": rng.standard_normal((1, lt, cfg.context_in_dim), np.float32),
        "txt_ids": ts.text_ids(1, lt, fam).numpy(),
    }
    if fam == "flux1":
        kw["vec"] = rng.standard_normal((1, cfg.vec_in_dim), np.float32)
    if opts.get("refs"):
        refs = [
            torch.from_numpy(
                rng.standard_normal(
                    (1, configs.FAMILIES[fam].latent_channels, 2 + i, 4), np.float32
                )
            )
            for i in range(opts["refs"])
        ]
        tok, ids = ts.reference_tokens(refs, fam)
        kw["img_cond_seq"], kw["img_cond_seq_ids"] = tok.numpy(), ids.numpy()
    if opts.get("fill"):
        kw["img_cond"] = rng.standard_normal((1, h * w, cfg.in_channels - out_c), np.float32)
    if opts.get("cfg"):
        kw["neg_txt"] = rng.standard_normal((1, lt, cfg.context_in_dim), np.float32)
        if fam == "flux1":
            kw["neg_vec"] = rng.standard_normal((1, cfg.vec_in_dim), np.float32)
    return kw


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_trajectory_torch_vs_jax(name, tmp_path):
    cfg, opts = SCENARIOS[name]
    tm, jm = _models(cfg, tmp_path)
    kw = _inputs(cfg, opts)
    steps = 6
    timesteps = schedules.get_schedule(steps, 12, cfg.family)
    scalars = {"guidance": opts.get("guidance"), "cfg_scale": opts.get("cfg", 1.0)}
    kw_t, kw_j = (
        {k: torch.from_numpy(v) for k, v in kw.items()},
        {k: jnp.asarray(v) for k, v in kw.items()},
    )
    a = ts.denoise(tm, timesteps=timesteps, trajectory=True, **scalars, **kw_t)
    b = js.denoise(jm, timesteps=timesteps, trajectory=True, **scalars, **kw_j)
    a, b = a.numpy(), np.asarray(b)
    assert a.shape == b.shape == (steps + 1, *kw["img"].shape)
    errs = [rel_l2(b[i], a[i]) for i in range(steps + 1)]
    print(
        f"{name}: rel-L2 per step {' '.join(f'{e:.1e}' for e in errs)}, "
        f"final max-abs {np.abs(a[-1] - b[-1]).max():.1e}"
    )
    assert max(errs) <= TRAJECTORY_RTOL, errs
    assert rel_l2(a[-1], a[0]) > 0.1  # the latents moved: agreement is not the trivial kind


def test_euler_loop_matches_diffusers_scheduler():
    """Our loop against diffusers' FlowMatchEulerDiscreteScheduler stepping the same model (FluxPipeline's loop:
    timesteps are sigma * 1000, the model sees timestep / 1000)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    tm = mt.build_model("flux1-tiny", seed=0)
    kw = {k: torch.from_numpy(v) for k, v in _inputs(configs.get("flux1-tiny"), {}).items()}
    steps, seq_len = 5, kw["img"].shape[1]
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    x, g = kw["img"].clone(), torch.full((1,), 3.5)
    with torch.inference_mode():
        for t in sched.timesteps:
            v = ts.predict(
                tm, x, kw["img_ids"], kw["txt"], kw["txt_ids"], t.expand(1) / 1000, kw["vec"], g
            )
            x = sched.step(v, t, x, return_dict=False)[0]
    ours = ts.denoise(
        tm, timesteps=schedules.get_schedule(steps, seq_len, "flux1"), guidance=3.5, **kw
    )
    print(f"Euler loop vs diffusers scheduler: rel-L2 {rel_l2(ours, x):.1e}")
    assert rel_l2(ours, x) <= 1e-5 and rel_l2(x, kw["img"]) > 0.1


def test_sample_torch_vs_jax_img2img(tmp_path):
    """`sample` end to end (packing, ids, schedule, img2img start) from the same noise in NCHW / NHWC."""
    cfg = configs.get("flux2-tiny")
    tm, jm = _models(cfg, tmp_path)
    noise, init = ts.get_noise(1, 48, 64, "flux2", seed=1), ts.get_noise(1, 48, 64, "flux2", seed=2)
    txt = torch.randn(1, 5, cfg.context_in_dim)
    kw = {"steps": 5, "guidance": 4.0, "strength": 0.6}
    a = ts.sample(tm, noise, txt, init=init, **kw)
    b = js.sample(jm, nchw_to_nhwc(noise), jnp.asarray(txt.numpy()), init=nchw_to_nhwc(init), **kw)
    assert rel_l2(np.asarray(b), a.permute(0, 2, 3, 1).numpy()) <= TRAJECTORY_RTOL
    full = ts.sample(tm, noise, txt, **{**kw, "strength": 1.0}, init=init)
    assert rel_l2(full, a) > 1e-3  # strength matters


@pytest.mark.slow
def test_img2img_with_shared_references_is_each_rows_single_run(tmp_path):
    """img2img with two prompts and an init image and two references of batch one (no diffusers pipeline takes
    references with a strength): each row equals the run of its prompt and noise alone, in both frameworks."""
    cfg = configs.get("flux2-tiny")
    tm, jm = _models(cfg, tmp_path)
    noise, init = ts.get_noise(2, 32, 32, "flux2", seed=1), ts.get_noise(1, 32, 32, "flux2", seed=2)
    refs = [ts.get_noise(1, 32, 48, "flux2", seed=3), ts.get_noise(1, 48, 32, "flux2", seed=4)]
    txt = torch.randn(2, 5, cfg.context_in_dim, generator=torch.Generator().manual_seed(0))
    kw = {"steps": 3, "guidance": 4.0, "strength": 0.7}
    a = ts.sample(tm, noise, txt, init=init, refs=refs, **kw)
    b = js.sample(
        jm,
        nchw_to_nhwc(noise),
        jnp.asarray(txt.numpy()),
        init=nchw_to_nhwc(init),
        refs=[nchw_to_nhwc(r) for r in refs],
        **kw,
    )
    assert rel_l2(np.asarray(b), a.permute(0, 2, 3, 1).numpy()) <= TRAJECTORY_RTOL
    for i in range(2):
        one = ts.sample(tm, noise[i : i + 1], txt[i : i + 1], init=init, refs=refs, **kw)
        assert rel_l2(a[i : i + 1], one) <= 1e-6
    assert rel_l2(a[0], a[1]) > 0.1


def test_cfg_and_guidance_change_the_result(tmp_path):
    """The CFG scale and the guidance value reach the model (PyTorch; JAX agrees by the trajectory test)."""
    cfg, opts = SCENARIOS["flux2-klein-base-cfg"]
    tm = mt.build_model(cfg, seed=0)
    kw = {k: torch.from_numpy(v) for k, v in _inputs(cfg, opts).items()}
    timesteps = schedules.get_schedule(3, 12, "flux2")
    one, four = (ts.denoise(tm, timesteps=timesteps, cfg_scale=s, **kw) for s in (1.0, 4.0))
    pos_only = ts.denoise(
        tm, timesteps=timesteps, **{k: v for k, v in kw.items() if k != "neg_txt"}
    )
    assert rel_l2(one, pos_only) < 1e-6 and rel_l2(four, one) > 1e-3
    tm = mt.build_model("flux1-tiny", seed=0)
    kw = {k: torch.from_numpy(v) for k, v in _inputs(configs.get("flux1-tiny"), {}).items()}
    g1, g2 = (ts.denoise(tm, timesteps=timesteps, guidance=g, **kw) for g in (1.0, 4.0))
    assert rel_l2(g1, g2) > 1e-4
    with pytest.raises(ValueError, match="guidance-distilled"):
        ts.denoise(tm, timesteps=timesteps, **kw)


# ---------------------------------------------------------------------------------------------
# JAX: the loop compiles once per shapes
# ---------------------------------------------------------------------------------------------


def test_jax_loop_compiles_once(tmp_path):
    cfg = dataclasses.replace(configs.get("flux1-tiny"), **_SHALLOW)
    jm = _models(cfg, tmp_path)[1]
    kw = {
        k: jnp.asarray(v) for k, v in _inputs(cfg, {}, h=2, w=7, lt=3).items()
    }  # shapes no other test uses
    before = js.TRACES["denoise"]
    out1 = js.denoise(jm, timesteps=schedules.get_schedule(4, 14, "flux1"), guidance=3.5, **kw)
    assert js.TRACES["denoise"] == before + 1
    # new values of the same shapes: latents, text, guidance, schedule, progress bar on
    kw2 = {**kw, "img": kw["img"] + 1.0, "txt": kw["txt"] * 0.5}
    out2 = js.denoise(
        jm, timesteps=schedules.get_schedule(4, 9999, "flux1"), guidance=2.0, progress=True, **kw2
    )
    assert js.TRACES["denoise"] == before + 1, (
        "the second call with the same shapes recompiled the loop"
    )
    assert rel_l2(out1, out2) > 1e-3
    # the counter does see a retrace: a different step count is a new shape
    js.denoise(jm, timesteps=schedules.get_schedule(3, 14, "flux1"), guidance=3.5, **kw)
    assert js.TRACES["denoise"] == before + 2


# ---------------------------------------------------------------------------------------------
# minflux generate
# ---------------------------------------------------------------------------------------------


def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path))


@pytest.mark.parametrize("framework,model", [("torch", "flux1-tiny"), ("jax", "flux2-tiny")])
def test_generate_random_weights_writes_png(framework, model, tmp_path):
    out = tmp_path / "sub" / "img.png"
    rc = cli.main(
        [
            "generate",
            "--random-weights",
            "--framework",
            framework,
            "--model",
            model,
            "--steps",
            "2",
            "--width",
            "48",
            "--height",
            "32",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0 and out.exists()
    img = _png(out)
    assert img.shape == (32, 48, 3) and img.dtype == np.uint8 and img.std() > 0


def test_generate_refs_and_img2img_torch(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 24)), ("b.png", (32, 32)), ("init.png", (50, 30))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            tmp_path / name
        )
    out = tmp_path / "out.png"
    rc = cli.main(
        [
            "generate",
            "--random-weights",
            "--model",
            "flux2-tiny",
            "--steps",
            "3",
            "--width",
            "32",
            "--height",
            "32",
            "--ref",
            str(tmp_path / "a.png"),
            "--ref",
            str(tmp_path / "b.png"),
            "--init",
            str(tmp_path / "init.png"),
            "--strength",
            "0.7",
            "--cfg",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0 and _png(out).shape == (32, 32, 3)


@pytest.mark.slow
def test_generate_fill_and_kontext_torch(tmp_path, monkeypatch):
    """Inpainting with a tiny Fill-shaped model (a preset added for the test) and a Kontext reference (sized to
    Kontext's preferred resolution: 64 x 64 tokens with the tiny autoencoder)."""
    from PIL import Image

    # 64 image + 64 masked-image channels + the mask folded f x f (f: the tiny autoencoder's downsampling), then 2x2
    f = 2 ** (len(configs.get("flux1-ae-tiny").ch_mult) - 1)
    monkeypatch.setitem(
        configs.PRESETS, "flux1-fill-tiny", dataclasses.replace(_F1, in_channels=128 + 4 * f * f)
    )
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = [
        "generate",
        "--random-weights",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--no-progress",
    ]
    assert (
        cli.main(
            common
            + [
                "--model",
                "flux1-fill-tiny",
                "--init",
                str(tmp_path / "img.png"),
                "--mask",
                str(tmp_path / "mask.png"),
                "--out",
                str(tmp_path / "fill.png"),
            ]
        )
        == 0
    )
    assert (
        cli.main(
            common
            + [
                "--model",
                "flux1-tiny",
                "--ref",
                str(tmp_path / "img.png"),
                "--out",
                str(tmp_path / "kontext.png"),
            ]
        )
        == 0
    )
    assert _png(tmp_path / "fill.png").shape == _png(tmp_path / "kontext.png").shape == (32, 32, 3)


def test_generate_control(tmp_path, monkeypatch, capsys):
    """FLUX.1 Canny/Depth through generate: the control image is encoded, packed and fed as 64 extra channels
    in both frameworks (whose loops agree on such a model: the flux1-canny trajectory scenario), and it
    changes the picture."""
    from PIL import Image

    monkeypatch.setitem(
        configs.PRESETS, "flux1-canny-tiny", dataclasses.replace(_F1, in_channels=128)
    )
    f = _tiny_files(tmp_path)
    mt.save_model(mt.build_model("flux1-canny-tiny", seed=3), tmp_path / "canny.safetensors")
    rng = np.random.default_rng(0)
    for name in (
        "edges-a.png",
        "edges-b.png",
    ):  # any size: resized to the output like BFL's prepare_control
        Image.fromarray(rng.integers(0, 255, (40, 24, 3), dtype=np.uint8)).save(tmp_path / name)
    base = [
        "generate",
        "--model",
        "flux1-canny-tiny",
        "--transformer",
        str(tmp_path / "canny.safetensors"),
        "--ae",
        str(f["ae1"]),
        "--embeddings",
        str(f["emb"]),
        "--steps",
        "3",
        "--width",
        "32",
        "--height",
        "32",
        "--no-progress",
        "--dtype",
        "fp32",
    ]
    out = {}
    for fw, edges in (("torch", "a"), ("jax", "a"), ("torch", "b")):
        path = tmp_path / f"{fw}-{edges}.png"
        assert (
            cli.main(
                base
                + [
                    "--framework",
                    fw,
                    "--control",
                    str(tmp_path / f"edges-{edges}.png"),
                    "--out",
                    str(path),
                ]
            )
            == 0
        )
        out[fw, edges] = _png(path).astype(int)
    # the same noise (numpy) and weights: the same picture in both frameworks, up to fp32 rounding
    assert np.abs(out["jax", "a"] - out["torch", "a"]).max() <= 1
    assert np.abs(out["torch", "a"] - out["torch", "b"]).mean() > 1  # the control reaches the model

    def error(args) -> str:
        capsys.readouterr()
        assert cli.main(args) == 2
        return capsys.readouterr().err

    assert "pass --control IMAGE" in error(base)
    assert "--control needs a FLUX.1 Canny/Depth model" in error(
        [
            "generate",
            "--model",
            "flux1-tiny",
            "--random-weights",
            "--control",
            str(tmp_path / "edges-a.png"),
        ]
    )


def _tiny_files(tmp_path) -> dict:
    """A tiny FLUX.1 transformer, FLUX.1 and FLUX.2 autoencoders, and embeddings, in BFL layout."""
    from safetensors.numpy import save_file

    files = {
        "t1": tmp_path / "flux1.safetensors",
        "ae1": tmp_path / "ae1.safetensors",
        "ae2": tmp_path / "ae2.safetensors",
        "emb": tmp_path / "emb.safetensors",
    }
    mt.save_model(mt.build_model("flux1-tiny"), files["t1"])
    mt.save_model(mt.build_model("flux1-ae-tiny"), files["ae1"])
    mt.save_model(mt.build_model("flux2-ae-tiny"), files["ae2"])
    cfg = configs.get("flux1-tiny")
    save_file(
        {
            "txt": np.ones((4, cfg.context_in_dim), np.float32),
            "vec": np.ones((1, cfg.vec_in_dim), np.float32),
        },
        files["emb"],
    )
    rng = np.random.default_rng(0)  # two prompts, and a negative one
    save_file(
        {
            "txt": rng.standard_normal((2, 4, cfg.context_in_dim), np.float32),
            "vec": rng.standard_normal((2, cfg.vec_in_dim), np.float32),
        },
        tmp_path / "two.safetensors",
    )
    save_file(
        {
            "txt": np.zeros((1, 4, cfg.context_in_dim), np.float32),
            "vec": np.zeros((1, cfg.vec_in_dim), np.float32),
        },
        tmp_path / "neg.safetensors",
    )
    return files


def test_generate_from_files_and_errors(tmp_path, capsys):
    f = _tiny_files(tmp_path)
    base = [
        "generate",
        "--model",
        "flux1-tiny",
        "--transformer",
        str(f["t1"]),
        "--ae",
        str(f["ae1"]),
        "--embeddings",
        str(f["emb"]),
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--no-progress",
        "--dtype",
        "fp32",
        "--out",
        str(tmp_path / "ok.png"),
    ]
    assert cli.main(base) == 0 and _png(tmp_path / "ok.png").shape == (32, 32, 3)
    # two prompts -> two images; true CFG with a negative prompt from its own file
    assert (
        cli.main(
            base
            + [
                "--embeddings",
                str(tmp_path / "two.safetensors"),
                "--cfg",
                "3",
                "--neg-embeddings",
                str(tmp_path / "neg.safetensors"),
                "--out",
                str(tmp_path / "two.png"),
            ]
        )
        == 0
    )
    two = [_png(tmp_path / f"two-{i}.png") for i in range(2)]
    assert two[0].shape == two[1].shape == (32, 32, 3) and not np.array_equal(two[0], two[1])

    def error(args) -> str:
        capsys.readouterr()
        assert cli.main(args) == 2
        return capsys.readouterr().err

    assert "multiple of 16" in error(base + ["--width", "40"])
    assert "no such file" in error(base + ["--embeddings", str(tmp_path / "missing.safetensors")])
    assert "no such file" in error(base + ["--ref", str(tmp_path / "missing.png")])
    assert "different families" in error(base + ["--ae", str(f["ae2"])])
    assert "FLUX.1" in error(
        [
            "generate",
            "--model",
            "flux2-tiny",
            "--transformer",
            str(f["t1"]),
            "--ae",
            str(f["ae2"]),
            "--embeddings",
            str(f["emb"]),
        ]
    )
    assert "--transformer is required" in error(["generate", "--model", "flux1-tiny"])
    assert "unknown preset 'flux3-huge'" in error(
        ["generate", "--model", "flux3-huge", "--random-weights"]
    )
    assert "--neg-embeddings is required" in error(base + ["--cfg", "3"])
    assert "'vec'" in error(base + ["--embeddings", str(f["ae1"])])  # not an embedding file
    assert "--mask needs --init IMAGE" in error(base + ["--mask", str(f["emb"])])
