"""`minflux bench` on CPU: one run of two backends in their own processes, on a tiny preset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minflux import bench, configs, flops
from minflux_cli.main import main


def test_bench_runs_both_frameworks_and_reports_the_ratio(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(
        [
            "bench",
            "--model",
            "flux2-tiny",
            "--resolution",
            "32",
            "--txt-len",
            "8",
            "--kinds",
            "forward",
            "--backends",
            "torch-eager,jax-xla",
            "--dtype",
            "fp32",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["backend"], r["kind"]) for r in rows] == [
        ("torch-eager", "forward"),
        ("jax-xla", "forward"),
    ]
    cfg = configs.get("flux2-tiny")
    for r in rows:
        assert "error" not in r, r
        assert r["n"] == 2 and 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["flops"] == flops.forward_flops(
            cfg, (32 // 4) ** 2, 8
        )  # tiny autoencoder: 4 px per token
        assert r["tflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e12)
        assert r["mfu"] is None  # no peak for a CPU
    torch_row, jax_row = rows
    assert jax_row["ratio"] == pytest.approx(jax_row["median_s"] / torch_row["median_s"])
    assert jax_row["ratio_to"] == "torch-eager" and "ratio" not in torch_row
    assert (
        jax_row["compile_s"] > 0 and jax_row["peak_bytes"] > 0
    )  # XLA's buffer assignment of the program
    assert set(report["versions"]) == {"torch", "jax"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "JAX/PyTorch" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backends", "torch-eager,tf"], "--backends"),
        (["--kinds", "forward,backward"], "--kinds"),
        (["--model", "flux2-ae-tiny"], "not a transformer preset"),
        (["--model", "flux2-tiny", "--resolution", "40"], "multiple of 16"),
        (["--json", "/no/such/dir/out.json"], "no such directory /no/such/dir"),
    ],
)
def test_bench_usage_errors_exit_2(argv, message, capsys):
    try:
        rc = main(["bench", *argv])
    except SystemExit as e:  # argparse's own one-line error
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_finish_ratio_mfu_and_peaks():
    plan = bench.Plan(model="flux2-klein-4b", kinds=("forward", "train"))
    rows = [
        {"backend": "torch-eager", "framework": "torch", "kind": "forward", "median_s": 0.1},
        {"backend": "torch-compile", "framework": "torch", "kind": "forward", "median_s": 0.08},
        {"backend": "jax-cudnn", "framework": "jax", "kind": "forward", "median_s": 0.06},
        {"backend": "jax-cudnn", "framework": "jax", "kind": "train", "median_s": 0.3},
        {"backend": "torch-eager", "framework": "torch", "kind": "train", "error": "OOM"},
    ]
    report = bench.finish(plan, rows, "NVIDIA H200")
    f = flops.forward_flops(plan.cfg, 64 * 64, 512)
    assert rows[2]["ratio"] == pytest.approx(0.06 / 0.08) and rows[2]["ratio_to"] == "torch-compile"
    assert rows[2]["mfu"] == pytest.approx(f / 0.06 / 989e12)
    assert rows[3]["flops"] == 3 * f and "ratio" not in rows[3]  # its PyTorch row failed: no ratio
    assert report["peak_source"] and flops.peak("NVIDIA H100 PCIe", "fp8") == 1513e12
    assert flops.peak("Some GPU") is None


def test_random_weights_are_minflux_random_by_name():
    from minflux import random

    shapes = {
        "double_blocks.0.img_attn.qkv.weight": (6, 4),
        "single_blocks.1.linear1.weight": (3, 2),
        "img_in.weight": (2, 2),
        "double_blocks.0.img_attn.norm.query_norm.scale": (4,),
    }
    got = dict(bench.random_weights(shapes, seed=3))
    assert got.keys() == shapes.keys()
    for k, v in got.items():
        np.testing.assert_array_equal(v, random.tensor(k, shapes[k], 3))


def test_attention_choice_belongs_to_the_model():
    """The backend is a static attribute of each block: it lives in the graphdef a compiled program is keyed on
    (no module global read at trace time), and the PyTorch twin carries the same attribute."""
    import jax.numpy as jnp
    from flax import nnx

    import minflux_jax as mj
    import minflux_torch as mt
    from minflux_jax import layers as jl
    from minflux_torch import layers as tl

    jm = mj.build_model("flux2-tiny")
    auto = nnx.graphdef(jm)
    jl.set_attention_implementation(jm, "xla")
    assert nnx.graphdef(jm) != auto and {b.attention_implementation for b in jm.double_blocks} == {
        "xla"
    }
    assert (
        jl.attention_backend("auto", jnp.zeros((1, 2, 4, 32), jnp.bfloat16)) == "xla"
    )  # no GPU here
    with pytest.raises(ValueError, match="expected 'auto', 'xla' or 'cudnn'"):
        jl.set_attention_implementation(jm, "flash")
    tm = tl.set_attention_implementation(mt.build_model("flux2-tiny"), "math")
    assert {b.attention_implementation for b in [*tm.double_blocks, *tm.single_blocks]} == {"math"}
    with pytest.raises(ValueError, match="expected 'auto' or one of"):
        tl.set_attention_implementation(tm, "xla")
