"""`minflux cache`: images + captions (+ references, control images, masks) -> bucketed latent shards, checked
against the other framework's encoders; bad data named before any model loads; interrupted caches continued with
--append; the README's fine-tuning commands run as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import rel_l2
from PIL import Image
from test_generate_text import QWEN_LAYERS, files  # noqa: F401  (the fixture)

from minflux import buckets, checkpoint, configs, data
from minflux.data import LatentShards
from minflux.images import load as load_image
from minflux_cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


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


def cache_args(files, model, images, out, framework, dtype="fp32"):  # noqa: F811
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
        "--embedding-dtype",
        dtype,
        *enc,
    ]


def cached(out) -> tuple[dict, dict[str, np.ndarray]]:
    """(cache.json, every tensor of the shards in cache order) of a cache folder."""
    meta = data.read_meta(out)
    parts = [data.read_tensors(out / shard["file"]) for shard in meta["shards"]]
    return meta, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,framework,dtype", [("flux2-tiny", "torch", "fp32"), ("flux1-tiny", "jax", "bf16")]
)
def test_cache_matches_the_other_framework(files, tmp_path, model, framework, dtype):  # noqa: F811
    import jax.numpy as jnp

    import minflux_jax as mj
    import minflux_torch as mt
    from minflux_jax import sampling as js
    from minflux_jax import text as jt
    from minflux_torch import sampling as ts
    from minflux_torch import text as tt

    images = make_images(tmp_path / "images")
    out = tmp_path / "cache"
    assert cli.main(cache_args(files, model, images, out, framework, dtype)) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "cache.json",
        "empty_caption.safetensors",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    meta, arrays = cached(out)
    assert [n for s in meta["shards"] for n in s["names"]] == ["im0", "im1", "im2"]
    assert meta["buckets"] == [list(b) for b in buckets.make_buckets(32, 16, 4.0)]
    assert all(
        s["bucket"] == [32, 32] for s in meta["shards"]
    )  # 48 x 40 .. 48 x 56: the square bucket
    assert arrays["txt"].dtype == checkpoint.np_dtype("BF16" if dtype == "bf16" else "F32")
    cfg, ae = configs.get(model), configs.get(model.replace("-tiny", "-ae-tiny"))
    side = 32 // (
        2 ** (len(ae.ch_mult) - 1) * 2
    )  # autoencoder downsampling, then 2x2 (pack or patchify)
    assert arrays["img"].shape == (3, side * side, cfg.in_channels)
    # the latents and embeddings again, by the *other* framework's autoencoder and text encoder, from the pixels
    # of the bucket's cover crop
    pix = []
    for i in range(3):
        full = load_image(images / f"im{i}.png", multiple=1)
        h, w = full.shape[:2]
        pix.append(buckets.apply(full, buckets.cover(w, h, (32, 32))))
    pix = np.stack(pix)
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
    assert rel_l2(arrays["img"], ref_img) < 1e-5
    ref_txt = {k: ref_txt[k] for k in ("txt", "ctx", "vec") if k in ref_txt}
    ref_txt["txt"] = ref_txt.pop("ctx", ref_txt.get("txt"))
    bound = 1e-5 if dtype == "fp32" else 4e-3  # bf16 storage: 8 bits of mantissa
    assert rel_l2(arrays["txt"].astype(np.float32), ref_txt["txt"][:3]) < bound
    if model == "flux1-tiny":
        assert rel_l2(arrays["vec"].astype(np.float32), ref_txt["vec"][:3]) < bound
    # the empty prompt's embedding, which caption dropout puts in place of some captions
    dropping = LatentShards(out, caption_dropout=0.5, cfg=cfg)
    for k, v in dropping.empty.items():
        assert rel_l2(v.astype(np.float32), ref_txt[k][3]) < bound, k
    batch = dropping.global_batch(0, 8)
    dropped = dropping.dropped(0, 8)
    assert 0 < dropped.sum() < 8 and (batch["txt"][dropped] == dropping.empty["txt"]).all()


@pytest.fixture
def no_models(monkeypatch):
    """Fail a run that gets as far as loading a model: bad data is found before that."""
    from minflux_cli.frameworks import Framework

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded: the bad pair was not found first")

    monkeypatch.setattr(Framework, "model", loaded)


def picture(path, w, h, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        path
    )


def pairs_folder(folder, names=("a", "b", "c"), refs=1, size=(64, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        picture(folder / f"{name}.png", *size, seed=i)
        (folder / f"{name}.txt").write_text(f"caption {name}")
        for r in range(refs):
            picture(folder / f"{name}.ref{r + 1}.png", *size, seed=10 + i)
    return folder


def random_cache(images, out, *extra):
    return [
        "cache",
        str(images),
        str(out),
        "--model",
        "flux2-tiny",
        "--random-weights",
        "--size",
        "32",
        *extra,
    ]


BAD = [
    (
        "caption",
        lambda f: (f / "b.txt").write_bytes(b"caption \xff\xfe"),
        "b.txt: not UTF-8 text (byte 0xff at position 8)",
    ),
    ("truncated", lambda f: (f / "b.png").write_bytes((f / "b.png").read_bytes()[:200]), "b.png: "),
    (
        "small",
        lambda f: picture(f / "b.png", 12, 40),
        "b.png: 12x40 is smaller than the smallest bucket side (16 pixels at --size",
    ),
    (
        "no ref",
        lambda f: (f / "b.ref1.png").unlink(),
        "b.png: 0 reference image(s) (none), but the run's pairs have 1",
    ),
    (
        "ref count",
        lambda f: picture(f / "c.ref2.png", 64, 64),
        "c.png: 2 reference image(s) (c.ref1.png, c.ref2.png), but the run's pairs have 1",
    ),
    (
        "mask",
        lambda f: picture(f / "a.mask.png", 64, 64),
        "a.mask.png: a mask image, but the model takes text pairs",
    ),
    (
        # (64 pixels a side for the real autoencoder; the tiny one's 4 pixels per token make it 16)
        "small ref",
        lambda f: picture(f / "b.ref1.png", 64, 12),
        "b.ref1.png: 64x12 is too small for a FLUX.2 reference (both sides >= 16 pixels)",
    ),
]


@pytest.mark.parametrize("what,spoil,said", BAD, ids=[b[0] for b in BAD])
def test_bad_data_is_one_line_before_any_model_loads(
    tmp_path, capsys, no_models, what, spoil, said
):
    folder = pairs_folder(tmp_path / "pairs")
    spoil(folder)
    assert cli.main(random_cache(folder, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minflux cache: error: "), err
    assert said in err[0], err[0]
    assert str(folder) in err[0]  # the file is named by its path
    assert not (tmp_path / "out").exists()


def test_skip_bad_counts_and_caches_the_rest(tmp_path, capsys):
    folder = pairs_folder(tmp_path / "pairs", refs=0)
    (folder / "a.txt").write_bytes(b"\xff")
    picture(folder / "c.png", 8, 8)
    assert cli.main(random_cache(folder, tmp_path / "out", "--skip-bad")) == 0
    assert "skipped 2 bad pair(s) of 3 (first: " in capsys.readouterr().out
    meta, arrays = cached(tmp_path / "out")
    assert [n for s in meta["shards"] for n in s["names"]] == ["b"] and meta["skipped"] == [
        "a",
        "c",
    ]


def test_an_interrupted_cache_keeps_its_shards_and_append_finishes_it(
    tmp_path, monkeypatch, capsys
):
    folder = pairs_folder(tmp_path / "pairs", names=("a", "b", "c"), refs=1)
    out = tmp_path / "out"
    real, calls = checkpoint.write_safetensors, []

    def dies_on_the_third_shard(path, *args, **kwargs):
        calls.append(path)
        if Path(path).name == "shard-00002.safetensors":
            raise KeyboardInterrupt  # as Ctrl-C midway
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_safetensors", dies_on_the_third_shard)
    assert cli.main(random_cache(folder, out, "--shard-size", "1")) == 130
    monkeypatch.setattr(checkpoint, "write_safetensors", real)
    meta = data.read_meta(out)
    assert [s["names"] for s in meta["shards"]] == [["a"], ["b"]]  # whole shards only, all listed
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary file left
    first = (out / "shard-00000.safetensors").read_bytes()
    capsys.readouterr()
    # without --append: refused; with it: the rest is cached, nothing redone
    assert cli.main(random_cache(folder, out, "--shard-size", "1")) == 2
    assert "holds a cache (cache.json); pass --append" in capsys.readouterr().err
    assert cli.main(random_cache(folder, out, "--shard-size", "1", "--append")) == 0
    assert "(1 new)" in capsys.readouterr().out
    pairs_folder(folder, names=("d",), refs=1)  # later: one more pair
    assert cli.main(random_cache(folder, out, "--shard-size", "1", "--append")) == 0
    meta, arrays = cached(out)
    assert [n for s in meta["shards"] for n in s["names"]] == ["a", "b", "c", "d"]
    assert (out / "shard-00000.safetensors").read_bytes() == first
    assert meta["refs"] == 1 and arrays["ref_ids"][0, 0, 0] == configs.get("flux2-tiny").ref_time(0)
    assert len(LatentShards(out, cfg=configs.get("flux2-tiny"))) == 4
    # other settings than the cache's are named
    assert cli.main(random_cache(folder, out, "--size", "48", "--append")) == 2
    assert "was made with size 32 (now 48)" in capsys.readouterr().err


@pytest.mark.slow
def test_fill_and_control_pairs_match_the_pipelines_conditioning(tmp_path):
    """FLUX.1 Fill (target + mask) and Canny (target + control image) caches hold the channels generation feeds the
    model: `sampling.fill_conditioning` of the encoded masked image and the mask, and the packed control latents
    (PyTorch's pipeline, the same seeded autoencoder)."""
    import torch

    import minflux_torch as mt
    from minflux_torch import pipeline, sampling

    folder = pairs_folder(tmp_path / "pairs", names=("a", "b"), refs=0, size=(32, 32))
    (tmp_path / "masks").mkdir()
    (tmp_path / "ctrl").mkdir()
    for i, name in enumerate("ab"):  # sibling folders, as ai-toolkit's control_path
        mask = np.zeros((32, 32), np.uint8)
        mask[8 + 4 * i : 24, 4:20] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.png")
        picture(tmp_path / "ctrl" / f"{name}.png", 32, 32, seed=20 + i)
    common = ["--random-weights", "--ae-config", "flux1-ae", "--size", "32", "--bucket-step", "16"]

    def run(model, out, *extra):
        return cli.main(["cache", str(folder), str(out), "--model", model, *common, *extra])

    assert run("flux1-fill-dev", tmp_path / "fill") == 2  # a Fill pair needs its mask
    assert run("flux1-fill-dev", tmp_path / "fill", "--mask-dir", str(tmp_path / "masks")) == 0
    assert run("flux1-canny-dev", tmp_path / "canny", "--control-dir", str(tmp_path / "ctrl")) == 0
    ae = mt.build_model("flux1-ae", seed=1, dtype=torch.float32)
    _, fill = cached(tmp_path / "fill")
    _, canny = cached(tmp_path / "canny")
    for i, n in enumerate("ab"):
        img = load_image(folder / f"{n}.png", (32, 32))
        mask = load_image(tmp_path / "masks" / f"{n}.png", (32, 32), gray=True)
        with torch.inference_mode():
            masked = pipeline.encode(ae, (img * (1 - mask))[None])
            want = sampling.fill_conditioning(
                masked, torch.from_numpy(mask[None].transpose(0, 3, 1, 2).copy()), factor=8
            ).numpy()
            control = pipeline.encode(
                ae, load_image(tmp_path / "ctrl" / f"{n}.png", (32, 32))[None]
            )
            want_c = sampling.pack(control, "flux1").numpy()
        assert (
            fill["img_cond"].shape[1:] == (4, 320) and rel_l2(fill["img_cond"][i], want[0]) < 1e-5
        )
        assert rel_l2(canny["img_cond"][i], want_c[0]) < 1e-5
    assert len(LatentShards(tmp_path / "fill", cfg=configs.get("flux1-fill-dev"))) == 2
    assert len(LatentShards(tmp_path / "canny", cfg=configs.get("flux1-canny-dev"))) == 2


@pytest.mark.slow
def test_readme_fine_tuning_commands_run_as_written(tmp_path):
    """The README's bucketed edit-pair run: generated pictures, `minflux cache`, `minflux train` with validation
    samples and logs."""
    text = (ROOT / "README.md").read_text()
    (block,) = [
        b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "minflux cache pairs" in b
    ]
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={
            **__import__("os").environ,
            "PATH": f"{Path(sys.executable).parent}:" + __import__("os").environ["PATH"],
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert {tuple(s["bucket"]) for s in meta["shards"]} == {(80, 48), (48, 80)}  # two buckets
    assert meta["refs"] == 1
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == [
        "step-000000.png",
        "step-000003.png",
        "step-000006.png",
    ]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and "samples_per_s" in json.loads(lines[-1])
