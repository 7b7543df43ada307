"""`minflux cache`: images + captions -> latent shards, checked against the other framework's encoders,
then trained on with `minflux train --data`."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_l2
from PIL import Image
from test_generate_text import QWEN_LAYERS, files  # noqa: F401  (the fixture)

from minflux import configs
from minflux.data import LatentShards
from minflux.images import load as load_image
from minflux_cli import main as cli


def make_images(folder, n=3, captions=True):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(
            folder / f"im{i}.png"
        )
        if captions:
            (folder / f"im{i}.txt").write_text(
                ["a red circle", "a blue square", "ünïcode ✓ caption"][i % 3]
            )
    return folder


def cache_args(files, model, images, out, framework):  # noqa: F811
    enc = (
        ["--text-encoder", str(files["flux1-enc"]), "--max-length", "20"]
        if model == "flux1-tiny"
        else ["--text-encoder", str(files["flux2-enc"]), *QWEN_LAYERS, "--max-length", "40"]
    )
    return [
        "cache",
        str(images),
        str(out),
        "--model",
        model,
        "--ae",
        str(files[model.replace("-tiny", "-ae-tiny")]),
        "--size",
        "32",
        "--framework",
        framework,
        "--shard-size",
        "2",
        *enc,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("model,framework", [("flux2-tiny", "torch"), ("flux1-tiny", "jax")])
def test_cache_matches_the_other_framework_and_trains(files, tmp_path, model, framework):  # noqa: F811
    import jax.numpy as jnp

    import minflux_jax as mj
    import minflux_torch as mt
    from minflux_jax import sampling as js
    from minflux_jax import text as jt
    from minflux_torch import sampling as ts
    from minflux_torch import text as tt

    images = make_images(tmp_path / "images")
    out = tmp_path / "cache"
    assert cli.main(cache_args(files, model, images, out, framework)) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "empty_caption.safetensors",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    data = LatentShards(out)
    cfg, ae = configs.get(model), configs.get(model.replace("-tiny", "-ae-tiny"))
    side = 32 // (
        2 ** (len(ae.ch_mult) - 1) * 2
    )  # autoencoder downsampling, then 2x2 (pack or patchify)
    assert len(data) == 3 and data.arrays["img"].shape[1:] == (side * side, cfg.in_channels)
    # the latents and embeddings again, by the *other* framework's autoencoder and text encoder
    pix = np.stack([load_image(images / f"im{i}.png", (32, 32), square=True) for i in range(3)])
    ae_cfg = model.replace("-tiny", "-ae-tiny")
    caps = [(images / f"im{i}.txt").read_text().strip() for i in range(3)] + [
        ""
    ]  # + the empty prompt
    kw = {"max_length": 20} if model == "flux1-tiny" else {"max_length": 40, "layers": (1, 2, 3)}
    kind = "flux1" if model == "flux1-tiny" else "qwen3"
    enc_dir = files["flux1-enc" if model == "flux1-tiny" else "flux2-enc"]
    if framework == "torch":
        ae = mj.load_model(ae_cfg, files[ae_cfg], dtype=jnp.float32)
        ref_img = np.asarray(js.pack(ae.encode(jnp.asarray(pix)), cfg.family))
        ref_txt = {
            k: np.asarray(v)
            for k, v in jt.encode_prompts(kind, enc_dir, caps, jnp.float32, **kw).items()
        }
    else:
        import torch

        ae = mt.load_model(ae_cfg, files[ae_cfg], dtype=torch.float32)
        with torch.inference_mode():
            ref_img = ts.pack(
                ae.encode(torch.from_numpy(pix.transpose(0, 3, 1, 2).copy())), cfg.family
            ).numpy()
        ref_txt = {
            k: v.float().numpy()
            for k, v in tt.encode_prompts(kind, enc_dir, caps, torch.float32, **kw).items()
        }
    assert rel_l2(data.arrays["img"], ref_img) < 1e-5
    ref_txt = {k: ref_txt[k] for k in ("txt", "ctx", "vec") if k in ref_txt}
    ref_txt["txt"] = ref_txt.pop("ctx", ref_txt.get("txt"))
    assert rel_l2(data.arrays["txt"], ref_txt["txt"][:3]) < 1e-5
    if model == "flux1-tiny":
        assert rel_l2(data.arrays["vec"], ref_txt["vec"][:3]) < 1e-5
    # the empty prompt's embedding, which caption dropout puts in place of some captions
    dropping = LatentShards(out, caption_dropout=0.5)
    for k, v in dropping.empty.items():
        assert rel_l2(v, ref_txt[k][3]) < 1e-5, k
    batch = dropping.batch(0, 8)
    dropped = dropping.dropped(0, 8)
    assert 0 < dropped.sum() < 8
    assert (batch["txt"][dropped] == dropping.empty["txt"]).all() and (
        batch["txt"][~dropped] != 0
    ).any()
    # and `minflux train` fine-tunes on it, with caption dropout
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--config",
                model,
                "--data",
                str(out),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--caption-dropout",
                "0.2",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert (run / "model.safetensors").is_file()


def test_cache_errors(files, tmp_path, capsys):  # noqa: F811
    images = make_images(tmp_path / "images", captions=False)
    assert cli.main(cache_args(files, "flux2-tiny", images, tmp_path / "out", "torch")) == 2
    assert "im0.png: no caption file im0.txt" in capsys.readouterr().err
    assert (
        cli.main(cache_args(files, "flux2-tiny", tmp_path / "nope", tmp_path / "out", "torch")) == 2
    )
    assert "nope: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
