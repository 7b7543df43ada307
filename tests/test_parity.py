"""The parity suite itself: it passes on matching weights and fails, naming the block, when they differ."""

from __future__ import annotations

import json

import pytest

from minflux import configs
from minflux_cli.main import main
from parity import transformer, weights


@pytest.fixture(autouse=True)
def no_compilation_cache(monkeypatch):
    """The command's persistent JAX compilation cache stays off in tests."""
    monkeypatch.setenv("MINFLUX_JAX_CACHE", "off")


def source(name, path):
    cfg = configs.get(name)
    return cfg, weights.CheckpointWeights(
        path, cfg, transformer.TorchSide(cfg, "fp32", "meta").expected
    )


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_passes_on_matching_weights(name, tiny_checkpoint):
    cfg, w = source(name, tiny_checkpoint(name, "diffusers"))
    out = transformer.run(cfg, w, w, dtype="fp32", resolution=48, txt_len=5)
    assert out["passed"], [r for r in out["rows"] if not r["passed"]]
    names = [r["name"] for r in out["rows"]]
    assert "double_blocks.1" in names and "single_blocks.1" in names and names[-1] == "output"


@pytest.mark.parametrize("block", ["double_blocks.1", "single_blocks.0"])
def test_fails_naming_the_perturbed_block(block, tiny_checkpoint):
    """One block's weights changed by 1e-3 in JAX only: that block's teacher-forced row fails, earlier rows pass."""
    cfg, w = source("flux2-tiny", tiny_checkpoint("flux2-tiny", "bfl"))
    out = transformer.run(
        cfg, w, weights.Perturbed(w, block + "."), dtype="fp32", resolution=48, txt_len=5
    )
    assert not out["passed"]
    teacher = {r["name"]: r for r in out["rows"] if r["mode"] == "teacher"}
    failed = [n for n, r in teacher.items() if not r["passed"]]
    assert failed == [block]
    free = [r for r in out["rows"] if r["mode"] == "free"]
    first_bad = next(i for i, r in enumerate(free) if not r["passed"])
    assert free[first_bad]["name"] == block  # free-running: wrong from that block on
    assert all(not r["passed"] for r in free[first_bad:])


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_fails_on_a_composition_bug_in_one_forward(framework, monkeypatch, tiny_checkpoint):
    """The free-running rows are the model's own forward: img and txt joined in the wrong order before the
    single blocks, in one framework's `Flux` forward only, passes every teacher-forced row (each block is right
    on its inputs) and fails every free-running row from the first single block on."""
    import jax.numpy as jnp
    import torch

    import minflux_jax.flux1 as jf
    import minflux_torch.flux1 as tf

    flux1, method, cat = (
        (tf, "forward", lambda a: torch.cat(a, 1))
        if framework == "torch"
        else (jf, "__call__", lambda a: jnp.concatenate(a, 1))
    )

    def forward_with_the_bug(
        self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, *, run=flux1.call_block
    ):
        e = self.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        img, txt = e.img, e.txt
        for block in self.double_blocks:
            img, txt = run(block, img=img, txt=txt, vec=e.vec, pe=e.pe)
        img = cat((img, txt))  # the bug: the model's RoPE ids and slicing expect [txt, img]
        for block in self.single_blocks:
            img = run(block, img, vec=e.vec, pe=e.pe)
        return run(self.final_layer, img[:, txt.shape[1] :], e.vec)

    monkeypatch.setattr(flux1.Flux, method, forward_with_the_bug)
    cfg, w = source("flux1-tiny", tiny_checkpoint("flux1-tiny", "bfl"))
    out = transformer.run(cfg, w, w, dtype="fp32", resolution=48, txt_len=5)
    assert not out["passed"]
    assert all(r["passed"] for r in out["rows"] if r["mode"] == "teacher")
    failed = [r["name"] for r in out["rows"] if r["mode"] == "free" and not r["passed"]]
    assert failed == ["single_blocks.0", "single_blocks.1", "output"]


def test_nan_fails_and_is_not_masked(tiny_checkpoint):
    cfg, w = source("flux1-tiny", tiny_checkpoint("flux1-tiny", "bfl"))

    class NaNs(weights.Perturbed):
        def read(self, keys):
            out = self.source.read(keys)
            return {k: v * float("nan") if k.startswith(self.prefix) else v for k, v in out.items()}

    out = transformer.run(
        cfg, w, NaNs(w, "single_blocks.1."), dtype="fp32", resolution=32, txt_len=4
    )
    bad = [r for r in out["rows"] if not r["finite"]]
    assert bad and all(not r["passed"] for r in bad) and bad[0]["name"] == "single_blocks.1"


@pytest.mark.slow
def test_cli_json_schema_and_exit_status(tiny_checkpoint, tmp_path, capsys):
    path = tiny_checkpoint("flux1-tiny", "bfl-prefixed")
    rc = main(
        [
            "parity",
            "--model",
            "flux1-tiny",
            "--checkpoint",
            str(path),
            "--dtype",
            "fp32,bf16",
            "--resolution",
            "32",
            "--txt-len",
            "4",
            "--trajectory",
            "3",
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "r.png"),
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report) >= {"environment", "precision", "runs", "passed", "allow_tf32"}
    assert report["passed"] is True and [r["dtype"] for r in report["runs"]] == ["fp32", "bf16"]
    for run in report["runs"]:
        assert set(run) >= {
            "model",
            "dtype",
            "device",
            "source",
            "rows",
            "memory",
            "passed",
            "inputs",
        }
        for row in run["rows"]:
            assert set(row) == {
                "name",
                "mode",
                "dtype",
                "bound",
                "finite",
                "max_abs",
                "rel_l2",
                "max_rel",
                "cosine",
                "worst_index",
                "passed",
                "depth",
                "error",
            }
            assert row["mode"] in ("teacher", "free", "trajectory") and isinstance(
                row["worst_index"], list
            )
            assert 0 <= row["rel_l2"] <= row["bound"] and row["cosine"] > 0.999
        assert [r["name"] for r in run["rows"] if r["mode"] == "trajectory"] == [
            "step.1",
            "step.2",
            "step.3",
        ]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "all blocks agree" in capsys.readouterr().out


def test_cli_exit_status_on_failure_and_bad_arguments(tiny_checkpoint, tmp_path, capsys):
    # a checkpoint of another model: a clear error, exit status 2 (a row over its bound is 1; usage errors 2)
    assert (
        main(
            ["parity", "--model", "flux2-tiny", "--checkpoint", str(tiny_checkpoint("flux1-tiny"))]
        )
        == 2
    )
    assert main(["parity", "--random-weights"]) == 2
    assert "--model NAME is required" in capsys.readouterr().err


@pytest.mark.slow
def test_random_weights_full_architecture_rows():
    """--random-weights checks a preset without a checkpoint (here a one-block variant, for time)."""
    import dataclasses

    cfg = dataclasses.replace(
        configs.get("flux2-klein-4b"), depth=1, depth_single_blocks=1, context_in_dim=64
    )
    expected = transformer.TorchSide(cfg, "fp32", "meta").expected
    w = weights.RandomWeights(cfg, expected, seed=1)
    out = transformer.run(cfg, w, w, dtype="fp32", resolution=32, txt_len=4, tiny=False)
    assert out["passed"], [(r["name"], r["rel_l2"]) for r in out["rows"] if not r["passed"]]


@pytest.mark.gpu
def test_tf32_canary_fails_the_fp32_bar():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rc = main(
        [
            "parity",
            "--model",
            "flux2-klein-4b",
            "--random-weights",
            "--device",
            "cuda",
            "--allow-tf32",
            "--resolution",
            "512",
            "--txt-len",
            "64",
        ]
    )
    assert rc == 1


@pytest.mark.parametrize("name", ["flux1-ae-tiny", "flux2-ae-tiny"])
def test_autoencoder_passes_and_wrong_layout_fails(name, tiny_checkpoint):
    from parity import autoencoder

    cfg, w = source(name, tiny_checkpoint(name, "bfl"))
    out = autoencoder.run(cfg, w, w, dtype="fp32", resolution=16)
    assert out["passed"], [(r["name"], r["rel_l2"]) for r in out["rows"] if not r["passed"]]
    names = [r["name"] for r in out["rows"]]
    assert {"encoder.mid.attn_1", "latents", "decoder.up.0.block.0", "decoder.out"} <= set(names)
    # NCHW handed to JAX (which is NHWC): the very first block fails, and says why
    bad = autoencoder.run(cfg, w, w, dtype="fp32", resolution=16, jax_layout="NCHW")
    first = bad["rows"][0]
    assert (
        not bad["passed"]
        and first["name"] == "encoder.conv_in"
        and not first["passed"]
        and first["error"]
    )


def test_autoencoder_perturbed_block_is_named(tiny_checkpoint):
    from parity import autoencoder

    cfg, w = source("flux2-ae-tiny", tiny_checkpoint("flux2-ae-tiny", "bfl"))
    out = autoencoder.run(
        cfg, w, weights.Perturbed(w, "decoder.mid.attn_1.", 1e-2), dtype="fp32", resolution=16
    )
    failed = [r["name"] for r in out["rows"] if r["mode"] == "teacher" and not r["passed"]]
    assert failed == ["decoder.mid.attn_1"]
