"""`minflux bench` on CPU: PyTorch, diffusers and JAX rows in their own processes on a tiny preset, the ratios and
memory figures, the defaults without a GPU, the memory refusal, XLA flags against the installed jaxlib, and the
pieces the GPU session relies on (weights drawn in parallel, fp8 GEMM detection, precision flags, fallbacks)."""

from __future__ import annotations

import argparse
import json
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from minflux import bench, configs, flops, memory, random
from minflux_cli import bench as cli_bench
from minflux_cli.main import main

TINY = ["--model", "flux2-tiny", "--resolution", "32", "--txt-len", "8"]


@pytest.mark.slow
def test_bench_runs_pytorch_diffusers_and_jax_with_ratios_and_memory(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(
        ["bench", *TINY, "--kinds", "forward", "--backends", "torch-eager,diffusers-eager,jax-xla"]
        + ["--dtype", "fp32", "--repeats", "2", "--warmup", "0", "--json", str(out)]
        + ["--plot", str(png)]
    )
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    rows = {r["backend"]: r for r in report["rows"]}
    assert list(rows) == ["torch-eager", "diffusers-eager", "jax-xla"]
    cfg = configs.get("flux2-tiny")
    for r in rows.values():
        assert "error" not in r, r
        assert r["n"] == 2 and 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        # tiny autoencoder: 4 px per token
        assert r["flops"] == flops.forward_flops(cfg, (32 // 4) ** 2, 8)
        assert r["mfu"] is None  # no peak for a CPU
        # the CPU peak: RSS over RSS after loading, measured in the row's own process
        assert r["peak_bytes"] >= 0 and r["base_bytes"] > 50 * 2**20
    torch_row, peer, jax_row = rows.values()
    # diffusers ran on minflux's diffusers export of the same weights, and agreed before it was timed
    assert peer["check_rel_l2"] < bench.PEER_BOUND["fp32"]
    assert torch_row["diffusers_ratio"] == pytest.approx(torch_row["median_s"] / peer["median_s"])
    assert torch_row["diffusers_to"] == "diffusers-eager" and "diffusers_ratio" not in peer
    assert jax_row["ratio"] == pytest.approx(jax_row["median_s"] / torch_row["median_s"])
    assert jax_row["ratio_to"] == "torch-eager" and "ratio" not in torch_row
    assert jax_row["compile_s"] > 0 and jax_row["xla_bytes"] > 0  # XLA's buffer assignment
    assert set(report["versions"]) == {"torch", "diffusers", "jax"}
    flags = report[
        "xla_flags"
    ].split()  # all known to this jaxlib, each once (`minflux` sets the CPU one)
    assert sorted(flags) == sorted(set(bench.XLA_DEFAULT_FLAGS))
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
        (["--model", "flux1-dev", "--hidden", "1000"], "head width 128"),
        (["--blocks", "2"], "DOUBLE,SINGLE"),
        # refused before anything is built, with the estimate (12 B parameters in bf16: 23.8 GB)
        (
            ["--model", "flux1-dev", "--kinds", "forward"],
            "needs about 32.3 GB in bf16 (weights 23.8 GB)",
        ),
        # an unknown flag the user gave: one line naming it (checked by starting JAX once, no row starts)
        ([*TINY, "--backends", "jax-xla", "--xla-flags=--xla_no_such_flag=1"], "does not know"),
    ],
)
def test_bench_usage_errors_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("MINFLUX_MEMORY_LIMIT", str(10**10))
    try:
        rc = main(["bench", *argv])
    except SystemExit as e:  # argparse's own one-line error
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_an_unknown_default_xla_flag_is_dropped_with_a_warning(monkeypatch, capsys):
    """A default flag that the installed jaxlib does not know (the GPU machine's jaxlib is another version) is
    dropped with one warning instead of ending every JAX process at start."""
    monkeypatch.setattr(bench, "XLA_DEFAULT_FLAGS", (*bench.XLA_CPU_FLAGS, "--xla_gone_flag=true"))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    args = argparse.Namespace(backends=("jax-xla",), xla_flags="default")
    assert cli_bench.xla_flags(args) == " ".join(bench.XLA_CPU_FLAGS)
    err = capsys.readouterr().err
    assert "warning: jaxlib" in err and "--xla_gone_flag=true: dropped" in err
    args.backends = ("torch-eager",)  # no JAX row: nothing to check
    assert cli_bench.xla_flags(args) == ""
    monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    env = cli_bench.jax_env("--a")
    assert env["XLA_FLAGS"] == "--a" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    # one memory-fraction name, the one this jaxlib's client reads (it refuses both at once)
    fraction = [
        n for n in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION") if n in env
    ]
    assert fraction == [cli_bench.mem_fraction_name()] and env[fraction[0]] == "0.95"
    from jaxlib import xla_client

    assert fraction[0] in open(xla_client.__file__).read()


def test_no_model_without_a_gpu_picks_the_quick_plan(capsys):
    args = cli_bench_args([])
    line = cli_bench.defaults(args, gpu=False)
    assert (args.model, args.resolution, args.txt_len) == ("flux2-tiny", 64, 16)
    assert args.kinds == bench.QUICK["kinds"] and args.backends == bench.QUICK["backends"]
    assert (
        line.startswith("minflux bench: no GPU and no --model: flux2-tiny, 64 px")
        and "\n" not in line
    )
    # a tiny model: the same sizes; a full-size model the user names, or a GPU: the full-size defaults, silently
    args = cli_bench_args(["--model", "flux1-tiny", "--kinds", "forward"])
    line = cli_bench.defaults(args, gpu=False)
    assert line.startswith(
        "minflux bench: no GPU, flux1-tiny: flux1-tiny, 64 px"
    ) and args.kinds == ("forward",)
    args = cli_bench_args(["--model", "flux1-dev"])
    assert cli_bench.defaults(args, gpu=False) is None and args.resolution == 1024
    args = cli_bench_args([])
    assert cli_bench.defaults(args, gpu=True) is None and args.model == "flux2-klein-4b"


def cli_bench_args(argv):
    p = argparse.ArgumentParser()
    cli_bench.add_arguments(p)
    return p.parse_args(argv)


def test_memory_estimate_and_parameter_counts():
    """param_count is exact (every transformer preset against PyTorch's own model on the meta device)."""
    from minflux_torch.load import MODELS

    for name in configs.names():
        cfg = configs.get(name)
        if not hasattr(cfg, "depth"):
            continue
        with torch.device("meta"):
            model = MODELS[cfg.family](cfg)
        assert memory.param_count(cfg) == sum(v.numel() for v in model.state_dict().values()), name
    cfg = configs.get("flux1-dev")
    fwd = memory.estimate(cfg, "forward", 2, 4096, 512)
    assert fwd["weights"] == 2 * memory.param_count(cfg)
    assert fwd["weights"] < fwd["total"] < memory.estimate(cfg, "train", 2, 4096, 512)["total"]
    # fp8: the block linears at one byte instead of two
    assert memory.estimate(cfg, "fp8", 2, 4096, 512)["total"] < fwd["total"] - 0.45 * fwd["weights"]


def test_finish_ratio_mfu_and_peaks():
    plan = bench.Plan(model="flux2-klein-4b", kinds=("forward", "train"))
    row = lambda b, k, t, m=None: {  # noqa: E731
        "backend": b,
        "framework": bench.BACKENDS[b][0],
        "kind": k,
        "median_s": t,
        "peak_bytes": m,
    }
    rows = [
        row("torch-eager", "forward", 0.1, 100),
        row("torch-compile", "forward", 0.08, 90),
        row("diffusers-eager", "forward", 0.12, 150),
        row("diffusers-compile", "forward", 0.09, 120),
        row("jax-cudnn", "forward", 0.06, 60),
        row("jax-cudnn", "train", 0.3),
        {"backend": "torch-eager", "framework": "torch", "kind": "train", "error": "OOM"},
    ]
    report = bench.finish(plan, rows, "NVIDIA H200")
    f = flops.forward_flops(plan.cfg, 64 * 64, 512)
    eager, compiled, _, _, jax_fwd, jax_train, _ = rows
    assert jax_fwd["ratio"] == pytest.approx(0.06 / 0.08) and jax_fwd["ratio_to"] == "torch-compile"
    assert jax_fwd["memory_ratio"] == pytest.approx(60 / 90)
    assert jax_fwd["mfu"] == pytest.approx(f / 0.06 / 989e12)
    # minflux / diffusers: eager with eager, compiled with compiled, JAX with the faster diffusers row
    assert eager["diffusers_ratio"] == pytest.approx(0.1 / 0.12)
    assert eager["diffusers_memory_ratio"] == pytest.approx(100 / 150)
    assert compiled["diffusers_to"] == "diffusers-compile"
    assert jax_fwd["diffusers_to"] == "diffusers-compile"
    assert jax_train["flops"] == 3 * f and "ratio" not in jax_train  # its PyTorch row failed
    assert report["peak_source"] and flops.peak("NVIDIA H100 PCIe", "fp8") == 1513e12
    assert flops.peak("Some GPU") is None


def test_merge_pools_the_rounds():
    rounds = [
        {"kind": "forward", **bench.stats([1.0, 3.0]), "peak_bytes": 10},
        {"kind": "forward", "error": "timed out"},
        {"kind": "forward", **bench.stats([2.0]), "peak_bytes": 30},
    ]
    row = bench.merge(rounds)
    assert row["n"] == 3 and row["median_s"] == 2.0 and row["peak_bytes"] == 20
    assert [r["median_s"] for r in row["rounds"]] == [2.0, 2.0]
    assert row["failed_rounds"] == ["timed out"]
    assert bench.merge([{"kind": "forward", "error": "x"}]) == {"kind": "forward", "error": "x"}


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_weights_drawn_in_pieces_are_minflux_random(name, monkeypatch):
    """Bit for bit `minflux.random.tensor` (and its bf16 cast) for every key of a model, drawn in pieces of 64
    elements by several threads (PCG64 advanced to each piece)."""
    from minflux_torch.load import MODELS

    monkeypatch.setattr(bench, "WEIGHT_PIECE", 64)
    cfg = configs.get(name)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MODELS[cfg.family](cfg).state_dict().items()}
    f32 = dict(bench.random_weights(shapes, seed=3))
    bf16 = dict(bench.random_weights(shapes, seed=3, dtype=ml_dtypes.bfloat16))
    assert f32.keys() == bf16.keys() == shapes.keys()
    for k, shape in shapes.items():
        want = random.tensor(k, shape, 3)
        np.testing.assert_array_equal(f32[k], want)
        np.testing.assert_array_equal(
            bf16[k].view(np.uint16), want.astype(ml_dtypes.bfloat16).view(np.uint16)
        )


def test_bf16_weights_by_name_in_a_fresh_process():
    """PyTorch's runner asks for "bfloat16" by name in a process that has not imported ml_dtypes (the torch rows of
    a bare `minflux bench` once all failed with "data type 'bfloat16' not understood")."""
    import subprocess

    code = (
        "import sys; from minflux import bench; assert 'ml_dtypes' not in sys.modules; "
        "print(bench.random_tensor('w', (3,), 0, 'bfloat16').dtype)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "bfloat16"


def test_bf16_rounding_is_ml_dtypes_on_finite_values():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(100_000).astype(np.float32)
            * 10.0 ** rng.integers(-40, 38, 100_000),
            np.array(
                [0.0, -0.0, 1 + 2**-8, 1 + 3 * 2**-8, 3.4e38, -3.4e38, 1e-45, 2**-126], np.float32
            ),
            # halfway cases: ties to even
            (np.arange(1, 1000, dtype=np.uint32) << 16 | 0x8000).view(np.float32),
        ]
    ).astype(np.float32)
    out = np.empty(x.shape, np.uint16)
    bench.to_bf16(x, out)
    np.testing.assert_array_equal(out, x.astype(ml_dtypes.bfloat16).view(np.uint16))


# An fp8 GEMM as XLA's GPU GEMM rewriter emits it (operand types inline), and as a Triton GEMM fusion; a bf16
# cuBLAS GEMM beside an f8 convert (what searching the text for "cublas" and "f8e4m3fn" mistook for one); and
# operand types printed only where the operands are defined.
CUBLAS_FP8 = (
    "  %p0 = f8e4m3fn[16,32]{1,0} parameter(0)\n"
    "  %p1 = f8e4m3fn[64,32]{1,0} parameter(1)\n"
    "  %cublas-gemm.1 = (bf16[16,64]{1,0}, s8[33554432]{0}) custom-call(f8e4m3fn[16,32]{1,0} %p0, "
    'f8e4m3fn[64,32]{1,0} %p1, f32[] %s0, f32[] %s1), custom_call_target="__cublas$lt$matmul$f8"\n'
)
TRITON_FP8 = (
    "  %gemm_fusion = bf16[16,64]{1,0} fusion(f8e4m3fn[16,32]{1,0} %a, f8e5m2[32,64]{1,0} %b), "
    'kind=kCustom, calls=%gemm_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}\n'
)
BF16_CUBLAS = (
    "  %x = f8e4m3fn[16,32]{1,0} parameter(0)\n"
    "  %c = bf16[16,32]{1,0} convert(f8e4m3fn[16,32]{1,0} %x)\n"
    "  %gemm = (bf16[16,64]{1,0}, s8[0]{0}) custom-call(bf16[16,32]{1,0} %c, bf16[32,64]{1,0} %w), "
    'custom_call_target="__cublas$gemm"\n'
)
UNTYPED_OPERANDS = """
  %param_0 = f8e4m3fn[16,32]{1,0} parameter(0)
  %param_1 = f8e4m3fn[32,64]{1,0} parameter(1)
  ROOT %dot.1 = f32[16,64]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %cv = f32[16,32]{1,0} convert(%param_0)
  %dot.2 = f32[16,64]{1,0} dot(%cv, %w32), lhs_contracting_dims={1}, rhs_contracting_dims={0}
"""


def test_fp8_gemms_counts_fp8_matmuls_only():
    assert bench.fp8_gemms(CUBLAS_FP8) == 1
    assert bench.fp8_gemms(TRITON_FP8) == 1
    assert bench.fp8_gemms(BF16_CUBLAS) == 0
    assert bench.fp8_gemms(UNTYPED_OPERANDS) == 1
    # this machine's XLA (CPU) compiles the fp8 linear fake-quantised: its dots take f32
    import jax.numpy as jnp
    from flax import nnx

    from minflux_jax import fp8

    layer = fp8.FP8Linear(nnx.Linear(64, 32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    text = (
        nnx.jit(lambda m, x: m(x)).lower(layer, jnp.ones((8, 64), jnp.bfloat16)).compile().as_text()
    )
    assert "f8e4m3fn" in text and bench.fp8_gemms(text) == 0


def test_precision_settings_leave_legacy_reads_working():
    """After TF32 is set off through the per-op API, torch.compile's conv lowering still reads the legacy
    `torch.backends.cudnn.allow_tf32`: a mix of the two APIs made that read raise."""
    from parity import precision

    for tf32 in (False, True, False):
        settings = precision.configure("cpu", tf32)
        assert (
            torch.backends.cudnn.allow_tf32 is tf32
            and torch.backends.cuda.matmul.allow_tf32 is tf32
        )
        assert settings["torch_cudnn_conv_fp32_precision"] == ("tf32" if tf32 else "ieee")
    precision.assert_full_precision()


def test_a_failing_cuda_graph_row_runs_again_without_them(monkeypatch):
    from minflux_torch import bench as tbench

    modes = []

    def row(plan, kind, compiled):
        modes.append(plan.compile_mode)
        return {"error": "RuntimeError: capture failed"} if len(modes) == 1 else {"median_s": 1.0}

    monkeypatch.setattr(tbench, "_row", row)
    plan = bench.Plan(model="flux2-tiny", compile_mode="reduce-overhead")
    out = tbench.run(plan, "forward", {"compile": True})["rows"][0]
    assert modes == ["reduce-overhead", "default"] and out["median_s"] == 1.0
    assert out["compile_fallback"] == "reduce-overhead failed: RuntimeError: capture failed"


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
    assert nnx.graphdef(jm) != auto
    assert {b.attention_implementation for b in jm.double_blocks} == {"xla"}
    # no GPU here
    assert jl.attention_backend("auto", jnp.zeros((1, 2, 4, 32), jnp.bfloat16)) == "xla"
    with pytest.raises(ValueError, match="expected 'auto', 'xla' or 'cudnn'"):
        jl.set_attention_implementation(jm, "flash")
    tm = tl.set_attention_implementation(mt.build_model("flux2-tiny"), "math")
    assert {b.attention_implementation for b in [*tm.double_blocks, *tm.single_blocks]} == {"math"}
    with pytest.raises(ValueError, match="expected 'auto' or one of"):
        tl.set_attention_implementation(tm, "xla")


def gpu_session():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_session.py"
    spec = importlib.util.spec_from_file_location("gpu_session", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_session"] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def test_gpu_session_fits_one_call_and_boxes_every_part(tmp_path, monkeypatch):
    """The default parts fit one 9-minute call (with the dry run's two extra parts); each part runs in its own
    time box, a failing or overrunning part is logged and killed and the next one starts, and time a part
    leaves unused goes to the parts after it."""
    gs = gpu_session()
    table = gs.parts(tmp_path)
    default = sum(table[n].limit for n in gs.DEFAULT)
    assert default + sum(p.limit for p in gs.DRY_EXTRA) <= gs.BUDGET - gs.MARGIN
    # the machine's Python: nothing installed
    assert all(p.argv[0] == gs.PY for p in table.values())
    # the dry run: tiny presets at 64 px, XLA's attention instead of cuDNN's
    dry = gs.dry(table["flux1"])
    assert "flux1-tiny" in dry.argv and "jax-xla,torch-compile,diffusers-eager" in dry.argv
    assert dry.argv[dry.argv.index("--resolution") + 1] == "64"

    py = gs.PY
    fake = {
        "quick": gs.Part("quick", 20, [py, "-c", "print('hi')"], ""),
        "fails": gs.Part("fails", 20, [py, "-c", "raise SystemExit(3)"], ""),
        "hangs": gs.Part("hangs", 2, [py, "-c", "import time; time.sleep(600)"], "", fixed=True),
        "last": gs.Part("last", 20, [py, "-c", "print('still runs')"], ""),
    }
    monkeypatch.setattr(gs, "parts", lambda out: fake)
    with pytest.raises(SystemExit, match="add up to 62 s, over the budget 70 s"):
        gs.session(tmp_path, list(fake), 70, False)
    summary = gs.session(tmp_path, list(fake), 100, False)
    status = {p["part"]: p["status"] for p in summary["parts"]}
    assert status == {
        "quick": "ok",
        "fails": "exit 3",
        "hangs": "killed after its 2 s box",
        "last": "ok",
    }
    boxes = {p["part"]: p["box"] for p in summary["parts"]}
    assert boxes["quick"] >= 20 and boxes["fails"] > 20  # the first part's unused time moved on
    assert "still runs" in (tmp_path / "log.txt").read_text()
