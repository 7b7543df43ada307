"""Reference images sized as the pipelines prepare them (`minflux.references`), against diffusers' own
`FluxKontextPipeline` and `Flux2KleinPipeline`, run up to the point where they hand the prepared pictures on (their
`prepare_latents`), on tall, wide, tiny, huge and extreme pictures; the output size taken from the first reference;
`minflux generate` with references in both frameworks; references of batch one serving two prompts, against the
pipelines' final latents."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from PIL import Image
from test_inpaint import FLUX1, KLEIN, build_models, nchw, nhwc
from test_reference import diffusers_model

from minflux import configs, family, images, references
from minflux_cli import generate
from minflux_cli.main import main, parser
from minflux_jax import sampling as js
from minflux_torch import sampling as ts

diffusers = pytest.importorskip("diffusers")

SIZES = {"tall": (400, 1000), "wide": (1000, 400), "tiny": (40, 30), "huge": (4000, 3000)}


class Seen(Exception):
    """Raised from inside a diffusers pipeline with what it prepared."""

    def __init__(self, **kw):
        super().__init__("seen")
        self.kw = kw


def picture(path, w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth picture with a little noise (so resampling differences show), saved as PNG."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    smooth = 127 + 100 * np.sin(xx / (w / 7 + 3))[..., None] * np.cos(yy / (h / 5 + 3))[..., None]
    noise = np.random.default_rng(seed).integers(0, 8, (h, w, 1))
    pic = Image.fromarray((smooth + noise).clip(0, 255).astype(np.uint8).repeat(3, -1))
    pic.save(path, compress_level=1)
    return pic


@pytest.fixture(scope="module")
def pipes():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    kontext = diffusers.FluxKontextPipeline(
        scheduler=sched,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=diffusers_model(configs.get("flux1-tiny")),
    )
    klein = diffusers.Flux2KleinPipeline(
        scheduler=sched,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=diffusers_model(configs.get("flux2-tiny")),
        is_distilled=True,
    )
    return kontext, klein


def kontext_prepared(pipe, pic: Image.Image) -> np.ndarray:
    """The reference FluxKontextPipeline passes to `prepare_latents`: (1, 3, h, w) in [-1, 1]."""

    def stop(image, *a, **k):
        raise Seen(image=image)

    pipe.prepare_latents = stop
    with pytest.raises(Seen) as seen:
        pipe(
            image=pic,
            prompt_embeds=torch.zeros(1, 4, 40),
            pooled_prompt_embeds=torch.zeros(1, 24),
            num_inference_steps=1,
            output_type="latent",
        )
    return seen.value.kw["image"].numpy()


def klein_prepared(pipe, pics: list) -> tuple[list[np.ndarray], tuple[int, int]]:
    """The references Flux2KleinPipeline prepares (each (1, 3, h, w)) and the output (width, height) it picks."""
    proc, out = pipe.image_processor, []
    preprocess = proc.preprocess

    def keep(*a, **k):
        out.append(preprocess(*a, **k).numpy())
        return out[-1]

    def stop(*a, height, width, **k):
        raise Seen(size=(width, height))

    proc.preprocess, pipe.prepare_latents = keep, stop
    try:
        with pytest.raises(Seen) as seen:
            pipe(
                image=pics,
                prompt_embeds=torch.zeros(1, 4, 48),
                num_inference_steps=1,
                output_type="latent",
            )
    finally:
        proc.preprocess = preprocess
    return out, seen.value.kw["size"]


def plan_of(argv: list[str]):
    """`minflux generate`'s plan for argv (nothing loaded or run)."""
    return generate.make_plan(parser(only="generate").parse_args(["generate", *argv]))


def test_kontext_resolutions_are_diffusers():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert list(references.KONTEXT_RESOLUTIONS) == list(PREFERRED_KONTEXT_RESOLUTIONS)


@pytest.mark.parametrize("case", list(SIZES))
def test_kontext_matches_flux_kontext_pipeline(case, pipes, tmp_path):
    """Size and pixels of a Kontext reference as FluxKontextPipeline (_auto_resize) prepares it; BFL's CLI then
    generates at that size, and so does `minflux generate` without --width / --height."""
    # (diffusers floors the picture's sides to multiples of 16 before taking its aspect ratio, BFL does not: a
    # tiny 40 x 30 picture is 4:3 to BFL and 2:1 to diffusers; a tiny size that is a multiple of 16 agrees)
    w, h = SIZES[case] if case != "tiny" else (48, 32)
    path = tmp_path / f"{case}.png"
    want = kontext_prepared(pipes[0], picture(path, w, h))
    (size, fitted) = references.plan(path, family.FLUX1)
    ours = references.load(path, fitted)
    assert size == (w, h) and ours.shape == (want.shape[2], want.shape[3], 3)
    np.testing.assert_allclose(ours.transpose(2, 0, 1)[None], want, atol=1e-6)
    plan = plan_of(["--random-weights", "--ae-config", "flux1-ae", "--ref", str(path)])
    assert (plan.width, plan.height) == fitted.size and plan.size_from_ref


@pytest.mark.parametrize(
    "cases", [["tall"], ["wide"], ["huge"], ["wide", "tall"], ["huge", "wide", "tall"]]
)
def test_klein_matches_flux2_klein_pipeline(cases, pipes, tmp_path):
    """Sizes and pixels of 1-3 FLUX.2 references as Flux2KleinPipeline prepares them (area limit, crop to 16),
    and the output size it takes from the first one; `minflux generate` takes the same."""
    paths, pics = [], []
    for i, case in enumerate(cases):
        paths.append(tmp_path / f"{case}.png")
        pics.append(picture(paths[-1], *SIZES[case], seed=i))
    want, size = klein_prepared(pipes[1], pics)
    ours = references.prepare(paths, family.FLUX2)
    assert len(ours) == len(want)
    for a, b in zip(ours, want, strict=True):
        assert a.shape == (b.shape[2], b.shape[3], 3)
        np.testing.assert_allclose(a.transpose(2, 0, 1)[None], b, atol=1e-6)
    argv = ["--random-weights", "--model", "flux2-tiny", "--ae-config", "flux2-ae"]
    plan = plan_of(argv + [a for p in paths for a in ("--ref", str(p))])
    assert (plan.width, plan.height) == size


@pytest.mark.parametrize(
    "size,limit", [((40, 30), "both sides >= 64 pixels"), ((2000, 100), "over 8:1")]
)
def test_flux2_refuses_what_diffusers_refuses(size, limit, pipes, tmp_path):
    """A side under 64 pixels or an aspect ratio over 8: diffusers raises; we refuse in one line naming the file and
    the limit (`minflux generate` too, before anything loads)."""
    path = tmp_path / "odd.png"
    pic = picture(path, *size)
    with pytest.raises(ValueError):
        klein_prepared(pipes[1], [pic])
    with pytest.raises(ValueError, match=rf"odd\.png: {size[0]}x{size[1]}.*{limit}"):
        references.plan(path, family.FLUX2)
    with pytest.raises(generate.UsageError, match=rf"--ref .*odd\.png: .*{limit}"):
        plan_of(
            [
                "--random-weights",
                "--model",
                "flux2-tiny",
                "--ae-config",
                "flux2-ae",
                "--ref",
                str(path),
            ]
        )


def test_small_autoencoders_see_the_same_token_grid():
    """Sizes scale with the autoencoder's pixels per token (4 for the tiny ones): the same tokens."""
    for spec in (family.FLUX1, family.FLUX2):
        for w, h in [(1000, 400), (400, 1000), (640, 640), (3000, 1000)]:
            big, small = (
                references.fit(w // 1, h, spec, 16),
                references.fit(w // 4, h // 4, spec, 4),
            )
            assert references.tokens(big, 16) == references.tokens(small, 4), (spec.name, w, h)
    assert references.tokens(references.fit(4000, 3000, family.FLUX1), 16) == 4070  # 1184 x 880


def test_non_kontext_flux1_presets_take_no_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(
        generate.memory, "check", lambda *a, **k: None
    )  # (12B random weights: only planned)
    path = tmp_path / "r.png"
    picture(path, 64, 64)
    for name in ("flux1-dev", "flux1-schnell", "flux1-fill-dev"):
        with pytest.raises(generate.UsageError, match=rf"--ref: {name} takes no reference images"):
            plan_of(["--random-weights", "--model", name, "--ref", str(path)])
    assert plan_of(["--random-weights", "--model", "flux1-kontext-dev", "--ref", str(path)]).refs


@pytest.mark.slow
def test_generate_with_references_both_frameworks(tmp_path, capsys):
    """`minflux generate` with two references and no size: the picture takes the first reference's size (the tiny
    autoencoder's 4 pixels per token), the sizes are printed, and both frameworks draw the same picture."""
    picture(tmp_path / "a.png", 96, 64)
    picture(tmp_path / "b.png", 50, 70, seed=1)
    out = {}
    for fw in ("torch", "jax"):
        argv = ["generate", "--random-weights", "--model", "flux2-tiny", "--framework", fw]
        argv += ["--ref", str(tmp_path / "a.png"), "--ref", str(tmp_path / "b.png")]
        argv += ["--steps", "2", "--no-progress", "--out", str(tmp_path / f"{fw}.png")]
        assert main(argv) == 0
        said = capsys.readouterr().out
        assert "a.png 96x64 -> 96x64 (384 tokens); b.png 50x70 -> 48x68 (204 tokens)" in said, said
        assert "output 96x64, the first reference's size" in said
        out[fw] = images.load(tmp_path / f"{fw}.png", multiple=1)
    assert out["torch"].shape == (64, 96, 3)
    assert np.abs(out["torch"] - out["jax"]).max() <= 2 / 127.5


# ---------------------------------------------------------------------------------------------
# References of batch one serve every prompt (sampling, against diffusers' pipelines)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory)


@pytest.mark.parametrize("n_refs", [1, 2, 3])
def test_shared_references_match_flux2_klein_pipeline(models, n_refs):
    """Two prompts, 1-3 references of batch one: the final latents of Flux2KleinPipeline (distilled), which repeats
    the references for every prompt, in both frameworks."""
    from test_kv import klein_pipeline

    tm, jm, ref = models["klein"]
    side, steps = 64, 3
    rng = np.random.default_rng(10 + n_refs)
    refs = [rng.standard_normal((1, 128, 4, 4 + i), np.float32) for i in range(n_refs)]
    txt = rng.standard_normal((2, 5, KLEIN.context_in_dim), np.float32)
    want = klein_pipeline(ref, refs, txt, side, steps, kv=False)
    noise = torch.randn(2, 128, side // 16, side // 16, generator=torch.Generator().manual_seed(0))
    kw = {"steps": steps}
    a = ts.sample(
        tm, noise, torch.from_numpy(txt), None, refs=[torch.from_numpy(r) for r in refs], **kw
    )
    b = js.sample(
        jm, nhwc(noise.numpy()), jnp.asarray(txt), None, refs=[nhwc(r) for r in refs], **kw
    )
    ea, eb = rel_l2(a.numpy(), want), rel_l2(nchw(b), want)
    print(
        f"klein, 2 prompts, {n_refs} shared reference(s), vs Flux2KleinPipeline: rel-L2 {ea:.1e} {eb:.1e}"
    )
    assert ea <= 1e-5 and eb <= 1e-5 and rel_l2(want[0], want[1]) > 0.1


def test_shared_reference_matches_flux_kontext_pipeline(models):
    """Two prompts, one Kontext reference (latents given to FluxKontextPipeline, which repeats them)."""
    tm, jm, ref = models["flux1"]
    side, steps = 64, 3
    rng = np.random.default_rng(20)
    latents = rng.standard_normal((1, 16, 8, 12), np.float32)
    txt = rng.standard_normal((2, 5, FLUX1.context_in_dim), np.float32)
    vec = rng.standard_normal((2, FLUX1.vec_in_dim), np.float32)
    pipe = diffusers.FluxKontextPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=ref,
    )
    want = pipe(
        image=torch.from_numpy(latents),
        prompt_embeds=torch.from_numpy(txt),
        pooled_prompt_embeds=torch.from_numpy(vec),
        height=side,
        width=side,
        max_area=side * side,
        num_inference_steps=steps,
        guidance_scale=2.5,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images.numpy()  # packed (2, 16, 64)
    noise = torch.randn(2, 16, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    kw = {"steps": steps, "guidance": 2.5}
    a = ts.sample(
        tm,
        noise,
        torch.from_numpy(txt),
        torch.from_numpy(vec),
        refs=[torch.from_numpy(latents)],
        **kw,
    )
    b = js.sample(
        jm, nhwc(noise.numpy()), jnp.asarray(txt), jnp.asarray(vec), refs=[nhwc(latents)], **kw
    )
    pack = lambda x: ts.pack(torch.from_numpy(np.ascontiguousarray(x)), "flux1").numpy()  # noqa: E731
    ea, eb = rel_l2(pack(a.numpy()), want), rel_l2(pack(nchw(b)), want)
    print(
        f"Kontext, 2 prompts, one shared reference, vs FluxKontextPipeline: rel-L2 {ea:.1e} {eb:.1e}"
    )
    assert ea <= 1e-5 and eb <= 1e-5
