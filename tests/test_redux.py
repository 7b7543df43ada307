"""FLUX.1 Redux against implementations we did not write: transformers' `SiglipVisionModel` and
`SiglipImageProcessor`, diffusers' `ReduxImageEncoder`, `FluxPriorReduxPipeline` and `FluxPipeline`.

Every model is tiny, with seeded random weights, saved as the official Redux repository lays it out
(image_encoder/ with the `vision_model.` prefix, feature_extractor/, image_embedder/, flux1-redux-dev.safetensors);
nothing is downloaded.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from PIL import Image
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch

import minflux_jax as mj
import minflux_torch as mt
from minflux import configs, redux
from minflux.checkpoint import CheckpointError
from minflux_jax import redux as jr
from minflux_jax import sampling as js
from minflux_torch import redux as tr
from minflux_torch import sampling as ts
from minflux_torch.load import to_numpy

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

SIDE, PATCH, TXT = 28, 7, 40  # 16 image tokens; TXT = flux1-tiny's context_in_dim (the T5 width)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Seeded weights with some spread everywhere (norm scales near 1), so every mapping error shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(
                1 + 0.2 * noise if "norm" in name else 0.5 * noise / max(p[0].numel(), 1) ** 0.5
            )


def images(n: int, seed: int = 0) -> list[Image.Image]:
    """Random RGB pictures of odd sizes (the preprocessor resizes them)."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (37 + 5 * i, 45 - 3 * i, 3), dtype=np.uint8))
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A tiny FLUX.1-Redux-dev repo root and the reference modules it was written from."""
    root = tmp_path_factory.mktemp("redux")
    cfg = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=SIDE,
        patch_size=PATCH,
    )
    siglip = transformers.SiglipVisionModel(cfg)
    randomize(siglip)
    siglip.eval().save_pretrained(root / "image_encoder")
    file = (
        root / "image_encoder" / "model.safetensors"
    )  # the official file keeps transformers 4's prefix
    save_file({f"vision_model.{k}": v for k, v in load_file(file).items()}, file)
    proc = transformers.SiglipImageProcessor(size={"height": SIDE, "width": SIDE})
    proc.save_pretrained(root / "feature_extractor")
    embedder = diffusers.pipelines.flux.modeling_flux.ReduxImageEncoder(
        redux_dim=32, txt_in_features=TXT
    )
    randomize(embedder, seed=1)
    embedder.eval().save_pretrained(root / "image_embedder")
    save_file(
        {k: to_numpy(v) for k, v in embedder.state_dict().items()},
        root / "flux1-redux-dev.safetensors",
    )
    return root, siglip, proc, embedder


@pytest.fixture(scope="module")
def encoders(repo):
    return {
        "torch": tr.load_redux(repo[0], torch.float32),
        "jax": jr.load_redux(repo[0], jnp.float32),
    }


def np_(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def test_preprocess_matches_transformers(repo):
    _, _, proc, _ = repo
    ours = redux.Preprocessor.from_file(repo[0] / "feature_extractor" / "preprocessor_config.json")
    assert ours.size == (SIDE, SIDE)
    imgs = images(3)
    want = proc.preprocess(images=imgs, do_resize=True, return_tensors="np", do_convert_rgb=True)[
        "pixel_values"
    ]
    got = ours(imgs)
    print(f"preprocess vs SiglipImageProcessor: max-abs {np.abs(got - want).max():.1e}")
    assert got.shape == want.shape == (3, 3, SIDE, SIDE) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-6


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_siglip_matches_transformers(repo, encoders, framework):
    _, siglip, proc, _ = repo
    pixels = proc.preprocess(images=images(2), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = siglip(pixel_values=pixels).last_hidden_state.numpy()
    ours = encoders[framework].siglip
    got = (
        ours(pixels)
        if framework == "torch"
        else ours(jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)))
    )
    err = rel_l2(np_(got), want)
    print(f"SigLIP {framework} vs transformers SiglipVisionModel: rel-L2 {err:.1e}")
    assert want.shape == (2, (SIDE // PATCH) ** 2, 32) and err <= 1e-5


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_embedder_matches_diffusers(repo, encoders, framework):
    _, _, _, embedder = repo
    x = np.random.default_rng(0).standard_normal((2, 16, 32)).astype(np.float32)
    with torch.no_grad():
        want = embedder(torch.from_numpy(x)).image_embeds.numpy()
    ours = encoders[framework].embedder
    got = ours(torch.from_numpy(x)) if framework == "torch" else ours(jnp.asarray(x))
    err = rel_l2(np_(got), want)
    print(f"Redux embedder {framework} vs diffusers ReduxImageEncoder: rel-L2 {err:.1e}")
    assert want.shape == (2, 16, TXT) and err <= 1e-5


def prior_pipeline(
    repo, n: int, txt: np.ndarray, vec: np.ndarray, scale, pooled_scale, seed: int = 0
):
    """diffusers' FluxPriorReduxPipeline on n images with given prompt embeddings (one prompt for every image)."""
    root, siglip, proc, embedder = repo
    # A CLIP text model only so that the pipeline takes the prompt embeddings given (it is never run).
    clip = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1
        )
    )
    pipe = diffusers.FluxPriorReduxPipeline(
        image_encoder=siglip, feature_extractor=proc, image_embedder=embedder, text_encoder=clip
    )
    out = pipe(
        image=images(n, seed),
        prompt_embeds=torch.from_numpy(txt).repeat(n, 1, 1),
        pooled_prompt_embeds=torch.from_numpy(vec).repeat(n, 1),
        prompt_embeds_scale=scale,
        pooled_prompt_embeds_scale=pooled_scale,
    )
    return out.prompt_embeds.numpy(), out.pooled_prompt_embeds.numpy()


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize(
    "batch, n, scale, pooled_scale",
    [(1, 1, 1.0, 1.0), (1, 2, [1.0, 0.6], [0.8, 0.3]), (2, 2, [1.0, 0.6], [0.8, 0.3])],
)
def test_prompt_matches_prior_redux_pipeline(
    repo, encoders, framework, batch, n, scale, pooled_scale
):
    """The prompt Redux makes; with two prompts each is extended by the same images, as the prior pipeline does
    one prompt at a time."""
    rng = np.random.default_rng(1)
    txt, vec = (
        rng.standard_normal((batch, 5, TXT), np.float32),
        rng.standard_normal((batch, 24), np.float32),
    )
    wants = [
        prior_pipeline(repo, n, txt[i : i + 1], vec[i : i + 1], scale, pooled_scale)
        for i in range(batch)
    ]
    want_txt, want_vec = (np.concatenate(w) for w in zip(*wants, strict=True))
    enc = encoders[framework]
    mod, arr = (tr, torch.from_numpy) if framework == "torch" else (jr, jnp.asarray)
    got_txt, got_vec = mod.redux_prompt(
        arr(txt), arr(vec), enc.encode(images(n)), scale, pooled_scale
    )
    e_txt, e_vec = rel_l2(np_(got_txt), want_txt), rel_l2(np_(got_vec), want_vec)
    print(
        f"Redux prompt {framework}, {batch} prompt(s), {n} image(s) vs FluxPriorReduxPipeline: rel-L2 txt "
        f"{e_txt:.1e} vec {e_vec:.1e}"
    )
    assert want_txt.shape == (batch, 5 + 16, TXT) and e_txt <= 1e-5 and e_vec <= 1e-6


@pytest.mark.parametrize("batch", [1, 2])
def test_end_to_end_against_flux_pipeline(repo, encoders, tmp_path, batch):
    """Redux prompt -> 3 Euler steps of a tiny FLUX.1 dev, ours in both frameworks against FluxPriorReduxPipeline's
    embeddings fed to diffusers' FluxPipeline (final latents). Two prompts share the image's tokens (batch one):
    diffusers' prior pipeline extends each prompt, FluxPipeline draws both."""
    from test_reference import diffusers_model

    cfg = configs.get("flux1-tiny")
    rng = np.random.default_rng(2)
    txt, vec = (
        rng.standard_normal((batch, 5, TXT), np.float32),
        rng.standard_normal((batch, cfg.vec_in_dim), np.float32),
    )
    priors = [
        prior_pipeline(repo, 1, txt[i : i + 1], vec[i : i + 1], 1.0, 1.0) for i in range(batch)
    ]
    p_txt, p_vec = (np.concatenate(p) for p in zip(*priors, strict=True))
    path = tmp_path / "flux1-tiny.safetensors"
    mt.save_model(mt.build_model(cfg, seed=0), path, layout="diffusers")
    ref = diffusers_model(cfg).eval()
    ref.load_state_dict(load_torch(path), strict=True)
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=ref,
    )
    side, steps = 64, 3  # 4 x 4 tokens
    noise = torch.randn(batch, 16, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    want = pipe(
        prompt_embeds=torch.from_numpy(p_txt),
        pooled_prompt_embeds=torch.from_numpy(p_vec),
        height=side,
        width=side,
        num_inference_steps=steps,
        guidance_scale=3.5,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images.numpy()  # packed (B, 16, 64)
    for framework, mod, smp, arr in (
        ("torch", tr, ts, torch.from_numpy),
        ("jax", jr, js, jnp.asarray),
    ):
        t, v = mod.redux_prompt(arr(txt), arr(vec), encoders[framework].encode(images(1)))
        model = (
            mt.load_model(cfg, path, dtype=torch.float32)
            if framework == "torch"
            else mj.load_model(cfg, path, dtype=jnp.float32)
        )
        n = noise if framework == "torch" else jnp.asarray(noise.numpy().transpose(0, 2, 3, 1))
        out = smp.pack(smp.sample(model, n, t, v, steps=steps, guidance=3.5), "flux1")
        err = rel_l2(np_(out), want)
        print(
            f"Redux end to end {framework}, batch {batch}, vs FluxPriorReduxPipeline + FluxPipeline: "
            f"rel-L2 {err:.1e}"
        )
        assert err <= 1e-5


def test_transformers5_layout_and_siglipmodel_config(repo, tmp_path):
    """No `vision_model.` prefix (SiglipVisionModel saved by transformers 5) and a whole SiglipModel config.json
    (vision_config inside) load too; the pooling head is skipped."""
    root = repo[0]
    d = tmp_path / "siglip"
    d.mkdir()
    official = load_file(root / "image_encoder/model.safetensors")
    tensors = {k.removeprefix("vision_model."): v for k, v in official.items()}
    save_file(tensors, d / "model.safetensors")
    raw = json.loads((root / "image_encoder/config.json").read_text())
    (d / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": raw}))
    a = tr.load_siglip(d, torch.float32)
    b = tr.load_siglip(root / "image_encoder", torch.float32)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_errors(repo, tmp_path):
    root = repo[0]
    bad = tmp_path / "bad.safetensors"
    tensors = load_file(root / "flux1-redux-dev.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "redux_down.bias"}, bad)
    for load in (tr.load_embedder, jr.load_embedder):
        with pytest.raises(
            CheckpointError, match=r"bad\.safetensors: missing keys \['redux_down.bias'\]"
        ):
            load(bad)
    save_file({"foo": tensors["redux_up.bias"]}, bad)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: not a Redux embedder"):
        tr.load_embedder(bad)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'clip_vision_model'"):
        tr.load_redux(tmp_path, embedder=root / "flux1-redux-dev.safetensors")
    with pytest.raises(FileNotFoundError, match="no Redux embedder"):
        jr.load_redux(root / "image_encoder")
    with pytest.raises(ValueError, match="scale: 3 scales for 2 images"):
        tr.redux_prompt(torch.zeros(1, 2, TXT), None, torch.zeros(2, 16, TXT), [1, 2, 3])


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_pipeline_redux(repo, encoders, framework, tmp_path):
    """`pipeline.redux` (numpy in and out, image files) against FluxPriorReduxPipeline on the same pictures."""
    from minflux_jax import pipeline as jp
    from minflux_torch import pipeline as tp

    rng = np.random.default_rng(3)
    txt, vec = (
        rng.standard_normal((1, 7, TXT), np.float32),
        rng.standard_normal((1, 24), np.float32),
    )
    files = []
    for i, img in enumerate(images(2, seed=4)):
        img.save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    want_txt, want_vec = prior_pipeline(
        repo, 2, txt, vec, [0.7, 1.0], 1.0, seed=4
    )  # PNG keeps the pixels
    got_txt, got_vec = (tp if framework == "torch" else jp).redux(
        encoders[framework], txt, vec, files, [0.7, 1.0]
    )
    assert isinstance(got_txt, np.ndarray) and got_txt.dtype == np.float32
    e = rel_l2(got_txt, want_txt)
    print(f"pipeline.redux {framework} vs FluxPriorReduxPipeline: rel-L2 {e:.1e}")
    assert e <= 1e-5 and rel_l2(got_vec, want_vec) <= 1e-6


def test_generate_redux_command(repo, tmp_path, monkeypatch):
    """`minflux generate --redux`: both frameworks run it and draw the same picture (same noise and weights), and
    the prompt reaching the transformer carries the image tokens (16 per image here)."""
    from minflux_cli.main import main
    from minflux_jax import pipeline as jp
    from minflux_torch import pipeline as tp

    seen = []
    for module in (tp, jp):
        original = module.generate
        monkeypatch.setattr(
            module,
            "generate",
            lambda m, ae, req, *a, _f=original, **k: (
                seen.append(req.txt.shape),
                _f(m, ae, req, *a, **k),
            )[1],
        )
    images(1, seed=5)[0].save(tmp_path / "style.png")
    out = {}
    for fw in ("torch", "jax"):
        assert (
            main(
                [
                    "generate",
                    "--random-weights",
                    "--model",
                    "flux1-tiny",
                    "--framework",
                    fw,
                    "--steps",
                    "2",
                    "--width",
                    "32",
                    "--height",
                    "32",
                    "--redux",
                    str(tmp_path / "style.png"),
                    "--redux-model",
                    str(repo[0]),
                    "--redux-scale",
                    "0.8",
                    "--no-progress",
                    "--out",
                    str(tmp_path / f"{fw}.png"),
                ]
            )
            == 0
        )
        out[fw] = np.asarray(Image.open(tmp_path / f"{fw}.png"), np.int16)
    assert (
        main(
            [
                "generate",
                "--random-weights",
                "--model",
                "flux1-tiny",
                "--steps",
                "2",
                "--width",
                "32",
                "--height",
                "32",
                "--no-progress",
                "--out",
                str(tmp_path / "plain.png"),
            ]
        )
        == 0
    )
    assert np.abs(out["torch"] - out["jax"]).max() <= 1
    assert seen == [(1, 16 + 16, TXT)] * 2 + [
        (1, 16, TXT)
    ]  # the random prompt's 16 tokens + the image's 16
