"""fp8 inference: quantisation against ml_dtypes, the twins against each other, and fp8 vs bf16 per block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from minflux import bench
from minflux_jax import bench as jbench
from minflux_jax import fp8 as jfp8
from minflux_torch import bench as tbench
from minflux_torch import fp8 as tfp8


def numpy_quantize(x: np.ndarray, axis) -> tuple[np.ndarray, np.ndarray]:
    """The recipe in numpy, with ml_dtypes' float8_e4m3fn cast (round to nearest even) as the reference."""
    amax = np.abs(x).max() if axis is None else np.abs(x).max(axis=axis, keepdims=True)
    scale = np.maximum(amax, np.float32(1e-12)).astype(np.float32) * np.float32(1 / 448)
    return np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn), scale


@pytest.mark.parametrize("axis", [None, -1, 0])
def test_quantize_matches_ml_dtypes_in_both_frameworks(axis, rng):
    x = (rng.standard_normal((48, 40)) * np.exp(rng.uniform(-6, 6, (48, 1)))).astype(
        np.float32
    )  # wide range
    x[0, 0] = 0.0
    q, s = numpy_quantize(x, axis)
    qt, st = tfp8.quantize(torch.from_numpy(x), axis)
    qj, sj = jax.jit(jfp8.quantize, static_argnums=1)(jnp.asarray(x), axis)
    np.testing.assert_array_equal(qt.view(torch.uint8).numpy(), q.view(np.uint8))  # bit for bit
    np.testing.assert_array_equal(np.asarray(qj).view(np.uint8), q.view(np.uint8))
    np.testing.assert_array_equal(st.numpy(), s)
    np.testing.assert_array_equal(np.asarray(sj), s)
    assert np.isfinite(q.astype(np.float32)).all() and np.abs(q.astype(np.float32)).max() == 448


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_fp8_linear_twins_agree_with_the_dequantised_product(scaling, rng):
    w = rng.standard_normal((24, 40)).astype(np.float32) / 7
    b = rng.standard_normal(24).astype(np.float32) / 10
    x = rng.standard_normal((2, 5, 40)).astype(np.float32)
    tl = torch.nn.Linear(40, 24)
    tl.weight.data, tl.bias.data = torch.from_numpy(w), torch.from_numpy(b)
    jl = nnx.Linear(40, 24, rngs=nnx.Rngs(0))
    jl.kernel[...], jl.bias[...] = jnp.asarray(w.T), jnp.asarray(b)
    got_t = tfp8.FP8Linear(tl, scaling)(torch.from_numpy(x)).detach().numpy()
    got_j = np.asarray(jfp8.FP8Linear(jl, scaling)(jnp.asarray(x)))
    # reference: ml_dtypes quantisation of both operands, the product in float64
    axis = -1 if scaling == "row" else None
    wq, ws = numpy_quantize(w, axis)
    xq, xs = numpy_quantize(x.reshape(10, 40), axis)
    want = ((xq.astype(np.float64) * xs) @ (wq.astype(np.float64) * ws).T + b).reshape(2, 5, 24)
    np.testing.assert_allclose(got_t, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_j, want, rtol=1e-5, atol=1e-6)
    # and fp8 is a real approximation of the linear: off by a few percent, not more
    exact = x @ w.T + b
    assert 1e-3 < bench.rel_l2(got_t, exact) < 0.1


# fp8 against bf16 is held to DESIGN.md's bf16 parity bounds (per block 1e-2, whole model 5e-2). Measured on these
# tiny models (random weights, 32 px, 8 text tokens; 30 Nov 2026; torch / JAX): flux1-tiny per-tensor scales, blocks
# 2.0e-3 to 2.5e-3, output 5.7e-3 / 5.8e-3; flux2-tiny per-row scales, blocks 1.1e-3 to 1.5e-3, output 3.9e-3 /
# 3.8e-3. rel_l2_update (what a block adds to its residual) is reported, not bounded: in bf16 it is dominated by
# rounding the block's output, whichever the matmul precision.
FP8_BOUND = {"block": 1e-2, "output": 5e-2}


@pytest.mark.slow
@pytest.mark.parametrize("model, scaling", [("flux1-tiny", "tensor"), ("flux2-tiny", "row")])
def test_fp8_parity_per_block_both_frameworks(model, scaling):
    plan = bench.Plan(model=model, resolution=32, txt_len=8, dtype="bf16")
    inp = bench.inputs(plan)
    rows_t = tbench.fp8_parity(tbench.build(model, 0, torch.bfloat16), inp, scaling)
    rows_j = jbench.fp8_parity(jbench.build(model, 0, jnp.bfloat16), inp, scaling)
    assert [r["name"] for r in rows_t] == [r["name"] for r in rows_j]
    for rt, rj in zip(rows_t, rows_j, strict=True):
        print(model, scaling, rt, rj)
        bound = FP8_BOUND["output" if rt["name"] == "output" else "block"]
        assert 1e-4 < rt["rel_l2"] < bound and 1e-4 < rj["rel_l2"] < bound, (
            rt,
            rj,
        )  # fp8 differs, within bounds
        # the two frameworks' fp8 paths agree far closer than fp8 is to bf16
        assert abs(rt["rel_l2"] - rj["rel_l2"]) < 0.25 * max(rt["rel_l2"], rj["rel_l2"]), (rt, rj)


@pytest.mark.gpu
@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_scaled_mm_matches_fake_quant_on_cuda(scaling, rng):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch._scaled_mm: Hopper or later)")
    w = rng.standard_normal((256, 512)).astype(np.float32) / 20
    x = torch.from_numpy(rng.standard_normal((4, 64, 512)).astype(np.float32)).to(torch.bfloat16)
    lin = torch.nn.Linear(512, 256, bias=False)
    lin.weight.data = torch.from_numpy(w)
    layer = tfp8.FP8Linear(lin.to(torch.bfloat16), scaling)
    fake = layer(x).float().numpy()
    real = tfp8.FP8Linear(lin.to("cuda", torch.bfloat16), scaling)(x.cuda()).float().cpu().numpy()
    assert (
        bench.rel_l2(real, fake) < 1e-2
    )  # both round to bf16; the GEMM accumulates in its own order


@pytest.mark.gpu
def test_xla_rewrites_the_fp8_dot_on_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("needs an NVIDIA GPU for JAX")
    layer = jfp8.FP8Linear(
        nnx.Linear(512, 256, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    )
    x = jnp.ones((256, 512), jnp.bfloat16)
    text = nnx.jit(lambda m, x: m(x)).lower(layer, x).compile().as_text()
    assert "f8e4m3fn" in text and "cublas" in text
