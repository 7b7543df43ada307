"""Block offloading (`minflux/offload.py`, `minflux_{torch,jax}/offload.py`, `generate --offload blocks`).

An offloaded model runs the same blocks on the same weights as the resident one, so it must give the same
latents: bitwise in PyTorch (the same kernels on the same tensors), within fp32 rounding in JAX (each block is
its own compiled program there, where the resident model's whole loop is one, and XLA fuses across those
boundaries differently), and within the parity bound of the other framework. Also: the next block is fetched
while the current one runs, in order; fp8 weights move to the device packed and are widened inside the layer;
klein KV; the command.
"""

from __future__ import annotations

import dataclasses
import threading

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from PIL import Image

import minflux_jax as mj
import minflux_torch as mt
from minflux import configs, convert, offload
from minflux.request import Conditioning, Request
from minflux_cli import main as cli
from minflux_jax import offload as joff
from minflux_jax import pipeline as jpipe
from minflux_jax import sampling as js
from minflux_torch import offload as toff
from minflux_torch import pipeline as tpipe
from minflux_torch import sampling as ts

KV = dataclasses.replace(configs.get("flux2-tiny"), guidance_embed=False, ref_kv=True)
AE = {"flux1": "flux1-ae-tiny", "flux2": "flux2-ae-tiny"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """files(cfg, fp8=False) -> a seeded BFL checkpoint of the config (fp32, or fp8 as `convert --dtype fp8`
    writes it: float8_e4m3fn linear weights with per-tensor scales)."""
    d, cache = tmp_path_factory.mktemp("offload"), {}

    def make(cfg, fp8: bool = False):
        key = (cfg, fp8)
        if key not in cache:
            path = d / f"{len(cache)}.safetensors"
            mt.save_model(mt.build_model(cfg, seed=0), path)
            if fp8:
                convert.convert(path, d / f"{len(cache)}-fp8.safetensors", to="bfl", dtype="fp8")
                path = d / f"{len(cache)}-fp8.safetensors"
            cache[key] = path
        return cache[key]

    return make


def request(cfg, steps: int = 2) -> Request:
    rng = np.random.default_rng(1)
    txt = rng.standard_normal((1, 6, cfg.context_in_dim), np.float32)
    vec = rng.standard_normal((1, cfg.vec_in_dim), np.float32) if cfg.vec_in_dim else None
    return Request(txt=txt, vec=vec, width=32, height=32, steps=steps, guidance=3.5, seed=2)


def latents(fw: str, model, ae, req: Request, run=None) -> np.ndarray:
    """The sampler's latents for `req` (before decoding), through `offload.streaming`; NCHW in both."""
    pipe, sampling, off = (tpipe, ts, toff) if fw == "torch" else (jpipe, js, joff)
    kind = req.check(model.params, ae.params)
    cond = pipe.conditioning(model, ae, req, kind)
    x = pipe.noise(model, req, configs.pixels_per_token(ae.params))
    with torch.inference_mode(), off.streaming(model, run) as m:
        out = sampling.sample(m, x, cond, steps=req.steps)
    return out.numpy() if fw == "torch" else np.asarray(out).transpose(0, 3, 1, 2)


def offloaded(fw: str, cfg, path, source: str, dtype, **kw):
    """(model, runner): blocks in the file (`load_model`), or in host memory (`offload_model` of a loaded model)."""
    off, package = (toff, mt) if fw == "torch" else (joff, mj)
    if source == "file":
        return off.load_model(cfg, path, dtype=dtype, **kw)
    model = package.load_model(cfg, path, dtype=dtype, **kw)
    return model, off.offload_model(model)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "source"), [("flux1-tiny", "file"), ("flux2-tiny", "host")])
def test_same_pictures_with_and_without_offloading(name, source, files):
    """PyTorch's latents and pictures bitwise the resident model's; JAX's latents within fp32 rounding of its
    resident model's and within the parity bound of PyTorch's, its pictures within one level."""
    cfg = configs.get(name)
    path, req = files(cfg), request(cfg)
    tae, jae = mt.build_model(AE[cfg.family], seed=1), mj.build_model(AE[cfg.family], seed=1)

    resident = mt.load_model(cfg, path, dtype=torch.float32)
    want = latents("torch", resident, tae, req)
    model, run = offloaded("torch", cfg, path, source, torch.float32)
    assert run.blocks[0].img_attn.qkv.weight.device.type == "meta"  # not held between uses
    assert np.array_equal(latents("torch", model, tae, req, run), want)
    pictures = tpipe.generate(model, tae, req, offload=run), tpipe.generate(resident, tae, req)
    assert np.array_equal(*pictures)

    jresident = mj.load_model(cfg, path, dtype=jnp.float32)
    jwant = latents("jax", jresident, jae, req)
    jmodel, jrun = offloaded("jax", cfg, path, source, jnp.float32)
    got = latents("jax", jmodel, jae, req, jrun)
    figures = {"jax offloaded / resident": rel_l2(got, jwant), "jax / torch": rel_l2(got, want)}
    print(name, source, {k: f"{v:.1e}" for k, v in figures.items()})
    assert figures["jax offloaded / resident"] < 1e-6 and figures["jax / torch"] < 1e-5
    pictures = jpipe.generate(jmodel, jae, req, offload=jrun), jpipe.generate(jresident, jae, req)
    assert np.abs(pictures[0].astype(int) - pictures[1]).max() <= 1


def test_prefetch_fetches_the_next_item_while_one_is_in_use():
    """`Prefetch.take(i)` returns item i and has item i + 1 fetching in the worker while i is used; after the
    last item comes the first; a fetch's error reaches `take`; `close` drops what was fetched ahead."""
    started = [threading.Event() for _ in range(3)]

    def fetch(i):
        started[i].set()
        if i == 2:
            raise OSError("disk gone")
        return f"item {i}"

    trace = []
    p = offload.Prefetch(3, fetch, trace)
    assert p.take(0) == "item 0"
    assert started[1].wait(5)  # item 1 is fetched while item 0 is still in use
    assert p.take(1) == "item 1" and started[2].wait(5)
    with pytest.raises(OSError, match="disk gone"):
        p.take(2)
    assert p.pending == {}
    assert p.take(0) == "item 0" and 1 in p.pending
    p.close()
    assert p.pending == {}
    assert trace == [("fetch", 0), ("fetch", 1), ("fetch", 2), ("fetch", 0), ("fetch", 1)]


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_the_runner_fetches_the_next_block_before_running_one(fw, files):
    """One forward's moves, in order: block i + 1's fetch starts before block i runs, each block is released
    after its call, the last block's turn starts the fetch of the first (the next forward's); a second forward
    finds the first block fetched."""
    cfg = configs.get("flux2-tiny")
    trace = []
    load = toff.load_model if fw == "torch" else joff.load_model
    dtype = torch.float32 if fw == "torch" else jnp.float32
    model, run = load(cfg, files(cfg), dtype=dtype, trace=trace)
    n = cfg.depth + cfg.depth_single_blocks
    rng = np.random.default_rng(0)
    inputs = dict(
        x=rng.standard_normal((1, 4, cfg.in_channels), np.float32),
        x_ids=np.zeros((1, 4, 4), np.float32),
        timesteps=np.full((1,), 0.5, np.float32),
        ctx=rng.standard_normal((1, 3, cfg.context_in_dim), np.float32),
        ctx_ids=np.zeros((1, 3, 4), np.float32),
        guidance=np.full((1,), 3.5, np.float32),
    )
    wrap = (lambda a: torch.from_numpy(a)) if fw == "torch" else jnp.asarray
    with torch.inference_mode(), (toff if fw == "torch" else joff).streaming(model, run) as m:
        m(**{k: wrap(v) for k, v in inputs.items()})
        first = list(trace)
        trace.clear()
        m(**{k: wrap(v) for k, v in inputs.items()})
    want = [("fetch", 0)]
    for i in range(n):
        want += [("fetch", (i + 1) % n), ("run", i), ("release", i)]
    assert first == want
    assert trace == want[1:]  # block 0 was fetched during the first forward


@pytest.mark.parametrize("fw", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_fp8_weights_move_packed_and_widen_in_the_layer(fw, files):
    """keep_quantized with offloading: every block linear reaches the device as the file's float8_e4m3fn
    weight and its scale (no wider copy moves), the QuantLinear widens it in its own forward, and the output
    is the resident keep_quantized model's (PyTorch bitwise, JAX to fp32 rounding) and PyTorch's."""
    cfg = configs.get("flux1-tiny")
    path, req = files(cfg, fp8=True), request(cfg, steps=1)
    dtype = torch.float32 if fw == "torch" else jnp.float32
    load, off = (mt.load_model, toff) if fw == "torch" else (mj.load_model, joff)
    ae = (mt if fw == "torch" else mj).build_model("flux1-ae-tiny", seed=1)
    model, run = off.load_model(cfg, path, dtype=dtype, keep_quantized=True)
    moved = []
    fetch = run.prefetch.fetch

    def spy(i):
        out = fetch(i)
        weights = out[1] if fw == "torch" else dict(zip(out[1], out[2], strict=True))
        moved.append({str(k): (str(v.dtype), tuple(v.shape)) for k, v in weights.items()})
        return out

    run.prefetch.fetch = spy
    got = latents(fw, model, ae, req, run)
    assert len(moved) >= cfg.depth + cfg.depth_single_blocks
    fp8 = str(torch.float8_e4m3fn) if fw == "torch" else "float8_e4m3fn"
    for weights in moved:
        packed = [k for k, (d, _) in weights.items() if "weight_q" in k]
        assert packed and all(weights[k][0] == fp8 for k in packed), weights
        wide = [k for k, (d, s) in weights.items() if len(s) == 2 and "weight_q" not in k]
        assert not wide, wide  # no dequantized linear weight travels
    resident = load(cfg, path, dtype=dtype, keep_quantized=True)
    want = latents(fw, resident, ae, req)
    if fw == "torch":
        assert np.array_equal(got, want)
    else:
        assert rel_l2(got, want) < 1e-6
    ref = latents(
        "torch",
        mt.load_model(cfg, path, dtype=torch.float32, keep_quantized=True),
        mt.build_model("flux1-ae-tiny", seed=1),
        req,
    )
    assert rel_l2(got, ref) < 1e-5


def test_a_head_without_parameters_draws_on_the_blocks_device(files):
    """FLUX.2 in fp8 kept quantized: every linear before the blocks is a QuantLinear (buffers, no bias), so the
    model's first parameter is an offloaded block's, on "meta"; the noise and embeddings still go to the device
    the model computes on, and the picture is the resident model's, bitwise (once: "Tensor on device cpu is not
    on the expected device meta")."""
    cfg = configs.get("flux2-tiny")
    path, req = files(cfg, fp8=True), request(cfg, steps=1)
    ae = mt.build_model("flux2-ae-tiny", seed=1)
    model, run = toff.load_model(cfg, path, dtype=torch.float32, keep_quantized=True)
    assert next(model.parameters()).device.type == "meta"
    resident = mt.load_model(cfg, path, dtype=torch.float32, keep_quantized=True)
    assert np.array_equal(
        tpipe.generate(model, ae, req, offload=run), tpipe.generate(resident, ae, req)
    )


@pytest.mark.parametrize("fw", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_klein_kv_with_offloading(fw, files):
    """klein KV (the references' keys and values computed on the first step, read after) through the
    offloading runner: the resident model's latents, PyTorch bitwise, JAX to fp32 rounding."""
    path = files(KV)
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((1, 128, 2, 2), np.float32)
    refs = [rng.standard_normal((1, 128, 2, 3), np.float32)]
    txt = rng.standard_normal((1, 4, KV.context_in_dim), np.float32)
    if fw == "torch":
        cond = Conditioning(txt=torch.from_numpy(txt), refs=[torch.from_numpy(r) for r in refs])
        sample = lambda m: ts.sample_kv(m, torch.from_numpy(noise), cond, steps=2).numpy()  # noqa: E731
        want = sample(mt.load_model(KV, path, dtype=torch.float32))
        model, run = toff.load_model(KV, path, dtype=torch.float32)
        with toff.streaming(model, run) as m:
            assert np.array_equal(sample(m), want)
        return
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    cond = Conditioning(txt=jnp.asarray(txt), refs=[nhwc(r) for r in refs])
    sample = lambda m: np.asarray(js.sample_kv(m, nhwc(noise), cond, steps=2))  # noqa: E731
    want = sample(mj.load_model(KV, path, dtype=jnp.float32))
    model, run = joff.load_model(KV, path, dtype=jnp.float32)
    with joff.streaming(model, run) as m:
        assert rel_l2(sample(m), want) < 1e-6


def test_generate_offload_blocks(files, tmp_path, capsys):
    """`minflux generate --offload blocks` on a checkpoint draws the picture it draws without (PyTorch: the
    command's code is the same for JAX, whose pipeline the tests above check); refused, in one line, with
    --compile and --lora."""
    from safetensors.numpy import save_file

    cfg = configs.get("flux2-tiny")
    mt.save_model(mt.build_model("flux2-ae-tiny", seed=1), tmp_path / "ae.safetensors")
    txt = np.random.default_rng(0).standard_normal((1, 5, cfg.context_in_dim), np.float32)
    save_file({"txt": txt}, tmp_path / "e.safetensors")
    base = ["generate", "--model", "flux2-tiny", "--transformer", str(files(cfg))]
    base += [
        "--ae",
        str(tmp_path / "ae.safetensors"),
        "--embeddings",
        str(tmp_path / "e.safetensors"),
    ]
    base += ["--steps", "2", "--width", "32", "--height", "32", "--dtype", "fp32", "--no-progress"]
    pictures = []
    for extra in ([], ["--offload", "blocks"]):
        out = tmp_path / f"{len(extra)}.png"
        assert cli.main([*base, *extra, "--out", str(out)]) == 0
        pictures.append(np.asarray(Image.open(out)))
    assert np.array_equal(*pictures)
    for extra, what in (
        (["--compile"], "--compile"),
        (["--lora", str(tmp_path / "e.safetensors")], "--lora"),
    ):
        capsys.readouterr()
        assert cli.main([*base, "--offload", "blocks", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1
            and f"--offload blocks streams the blocks as the file stores them; not with {what}"
            in err[0]
        )
