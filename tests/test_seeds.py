"""Per-image seeds and what each PNG records: image i of a batch is the picture a single run draws with its prompt
and seed + i (`--only i`, or a one-prompt file with `--seed SEED+i`), in both frameworks; the PNG's text metadata
holds the seed, prompt, model and settings, and `--from-png` remakes the picture from the file alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minflux import images, text
from minflux_cli.main import main


def png(path) -> np.ndarray:
    return np.asarray(images.load(path, multiple=1))


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """Two FLUX.2-tiny prompts in one file (with their texts), and the second alone."""
    d = tmp_path_factory.mktemp("emb")
    txt = np.random.default_rng(0).standard_normal((2, 6, 48), np.float32)
    text.save_embeddings(
        d / "two.safetensors", {"txt": txt}, "qwen3", ["a red cube", "a blue cone"]
    )
    text.save_embeddings(d / "second.safetensors", {"txt": txt[1:]}, "qwen3", ["a blue cone"])
    return d


def run(tiny_checkpoint, emb, out, *extra: str) -> None:
    argv = [
        "generate",
        "--model",
        "flux2-tiny",
        "--transformer",
        str(tiny_checkpoint("flux2-tiny")),
    ]
    argv += ["--ae", str(tiny_checkpoint("flux2-ae-tiny")), "--embeddings", str(emb)]
    argv += ["--steps", "2", "--width", "32", "--height", "32", "--dtype", "fp32", "--no-progress"]
    assert main([*argv, "--out", str(out), *extra]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_batch_rows_are_single_runs(framework, embeddings, tiny_checkpoint, tmp_path):
    """Two prompts with seed 7: row 1 is `--only 1` and the single run of prompt 1 with seed 8."""
    fw = ("--framework", framework)
    run(tiny_checkpoint, embeddings / "two.safetensors", tmp_path / "b.png", "--seed", "7", *fw)
    run(
        tiny_checkpoint,
        embeddings / "two.safetensors",
        tmp_path / "o.png",
        "--seed",
        "7",
        "--only",
        "1",
        *fw,
    )
    run(tiny_checkpoint, embeddings / "second.safetensors", tmp_path / "s.png", "--seed", "8", *fw)
    row = png(tmp_path / "b-1.png")
    diff = np.abs(row - png(tmp_path / "s.png")).max() * 127.5
    print(f"{framework}: batch row 1 vs the single run with seed 8: max |diff| {diff:.0f} / 255")
    # (equal here; one level allowed: a batch of two may round its matmuls differently from a batch of one)
    assert diff <= 1 and np.abs(row - png(tmp_path / "o.png")).max() * 127.5 <= 1
    assert np.abs(row - png(tmp_path / "b-0.png")).max() > 0.1


@pytest.mark.slow
def test_png_records_enough_to_remake_it(embeddings, tiny_checkpoint, tmp_path, capsys):
    """Each PNG's metadata: its seed, prompt, model, settings and the command that draws it alone; `--from-png`
    runs that command (the same picture; another framework within one level); other flags are refused."""
    run(tiny_checkpoint, embeddings / "two.safetensors", tmp_path / "b.png", "--seed", "7")
    meta = images.metadata(tmp_path / "b-1.png")
    assert meta["seed"] == "8" and meta["prompt"] == "a blue cone" and meta["model"] == "flux2-tiny"
    assert meta["settings"] == "32x32, 2 steps, guidance 4, torch fp32"
    argv = json.loads(meta["minflux"])["argv"]
    assert meta["command"].startswith("minflux generate --model flux2-tiny ")
    assert argv[-2:] == ["--only", "1"] and "--out" not in argv
    assert (
        main(
            ["generate", "--from-png", str(tmp_path / "b-1.png"), "--out", str(tmp_path / "r.png")]
        )
        == 0
    )
    np.testing.assert_array_equal(png(tmp_path / "r.png"), png(tmp_path / "b-1.png"))
    assert (
        images.metadata(tmp_path / "r.png")["minflux"] == meta["minflux"]
    )  # a remake records the same
    argv = [
        "generate",
        "--from-png",
        str(tmp_path / "b-1.png"),
        "--framework",
        "jax",
        "--no-progress",
    ]
    assert main([*argv, "--out", str(tmp_path / "j.png")]) == 0
    assert np.abs(png(tmp_path / "j.png") - png(tmp_path / "b-1.png")).max() <= 1 / 127.5 + 1e-6
    assert images.metadata(tmp_path / "j.png")["settings"].endswith("jax fp32")
    # a flag given at its default value is still given: back to torch from a JAX picture
    again = ["generate", "--from-png", str(tmp_path / "j.png"), "--framework", "torch"]
    assert main([*again, "--out", str(tmp_path / "t.png")]) == 0
    assert images.metadata(tmp_path / "t.png")["settings"].endswith("torch fp32")
    # how it is computed may change, not what is drawn: offloaded, the same picture
    offloaded = ["generate", "--from-png", str(tmp_path / "b-1.png"), "--offload", "blocks"]
    assert main([*offloaded, "--out", str(tmp_path / "off.png")]) == 0
    np.testing.assert_array_equal(png(tmp_path / "off.png"), png(tmp_path / "b-1.png"))
    capsys.readouterr()
    for seed in ("3", "0"):  # 0 is --seed's default
        assert main(["generate", "--from-png", str(tmp_path / "b-1.png"), "--seed", seed]) == 2
        assert "--seed cannot be added" in capsys.readouterr().err
