"""The FLUX.1 / FLUX.2 autoencoders: PyTorch vs JAX block by block, both vs diffusers, conversions, tiling.

Tiny configs (`flux1-ae-tiny`, `flux2-ae-tiny`: ch 32, ch_mult (1, 2), one resnet per level), CPU, fp32
unless a test says otherwise. Every comparison is between two different implementations; measured errors are
printed (run with `-s` to read them).
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file

import minflux_jax as mj
import minflux_torch as mt
from minflux import checkpoint, configs, keymaps, tiling
from minflux_jax import autoencoder as jae
from minflux_jax import image as jimage
from minflux_jax.load import assign, state_dict
from minflux_torch import autoencoder as tae
from minflux_torch import image as timage

FAMILIES = {"ae1": "flux1-ae-tiny", "ae2": "flux2-ae-tiny"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits (the CPUs may be shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


H, W = 32, 48  # non-square, so a swapped H/W cannot pass


def nchw(a) -> np.ndarray:  # JAX NHWC -> the PyTorch layout, as float32 numpy
    return np.asarray(jnp.asarray(a, jnp.float32)).transpose(0, 3, 1, 2)


def nhwc(a: np.ndarray, dtype=jnp.float32):
    return jnp.asarray(a.transpose(0, 2, 3, 1), dtype)


def tnp(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


# compiled once per model structure and input shape, shared by every test (eager JAX compiles op by op)
ENC = nnx.jit(lambda m, x: m.encode(x))
DEC = nnx.jit(lambda m, z: m.decode(z))


def jax_model(cfg, tensors: dict, dtype=jnp.float32):
    """The JAX twin with the given PyTorch-layout weights (abstract init, so no random-init compile)."""
    model = nnx.eval_shape(lambda: jae.AutoEncoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    assign(model, tensors)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    return make_pair(request.param)


@functools.cache
def make_pair(family: str):
    """(cfg, torch fp32, torch bf16, jax fp32, jax bf16, BFL tensors) with non-trivial norms and BN stats."""
    cfg = configs.get(FAMILIES[family])
    tm = mt.build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tm.parameters():
            if p.ndim == 1:  # GroupNorm weight 1 / bias 0 would hide a scale<->bias mix-up
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        if cfg.family == "ae2":
            tm.bn.running_mean.copy_(torch.randn(tm.bn.running_mean.shape, generator=g))
            tm.bn.running_var.copy_(torch.rand(tm.bn.running_var.shape, generator=g) + 0.5)
    sd = {k: v.numpy().copy() for k, v in tm.state_dict().items()}
    tb = copy.deepcopy(tm).to(torch.bfloat16)
    return cfg, tm, tb, jax_model(cfg, sd), jax_model(cfg, sd, jnp.bfloat16), sd


def image(seed: int = 0, b: int = 2, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (b, 3, h, w)).astype(np.float32)


def sub(model, path: str):
    """`encoder.down.1.block.0` in either framework: attribute names and list indices are the same."""
    for p in path.split("."):
        model = model[int(p)] if p.isdigit() else getattr(model, p)
    return model


# ---------------------------------------------------------------------------------------------
# Block by block, PyTorch vs JAX (tiny: widths 32, 64); the encoder and decoder are the next section
# ---------------------------------------------------------------------------------------------

BLOCKS = {  # name: (module path, input channels, input size, how to call it)
    "resnet": ("encoder.down.0.block.0", 32, (8, 12), None),
    "resnet_shortcut": ("encoder.down.1.block.0", 32, (8, 12), None),  # 32 -> 64: nin_shortcut
    "attention": ("encoder.mid.attn_1", 64, (8, 12), None),
    "downsample": ("encoder.down.0.downsample", 32, (8, 12), None),
    "upsample": ("decoder.up.1.upsample", 64, (8, 12), None),
    "mid": ("encoder.mid", 64, (8, 12), "run_mid"),
    "batchnorm": ("bn", 128, (4, 6), None),
    "batchnorm_inverse": ("bn", 128, (4, 6), "inverse"),
}


def run_block(model, x, name: str, framework):
    path, _, _, how = BLOCKS[name]
    m = sub(model, path)
    if how == "run_mid":
        return framework.run_mid(m, x)
    return m.inverse(x) if how == "inverse" else m(x)


RUN_BLOCK = nnx.jit(run_block, static_argnums=(2, 3))


# FLUX.2's blocks are FLUX.1's: each block is checked once, BatchNorm with FLUX.2
BLOCK_CASES = [
    (next(f for f in FAMILIES if (FAMILIES[f].startswith("flux2")) == n.startswith("batchnorm")), n)
    for n in BLOCKS
]


@pytest.mark.parametrize("family,name", BLOCK_CASES)
def test_block_torch_vs_jax(family, name):
    cfg, tm, tb, jm, jb, _ = make_pair(family)
    path, c, (h, w), _ = BLOCKS[name]
    x = np.random.default_rng(2).standard_normal((2, c, h, w)).astype(np.float32)
    with torch.no_grad():
        ref = tnp(run_block(tm, torch.from_numpy(x), name, tae))
        ref_bf16 = tnp(run_block(tb, torch.from_numpy(x).bfloat16(), name, tae))
    err = rel_l2(nchw(RUN_BLOCK(jm, nhwc(x), name, jae)), ref)
    err_bf16 = rel_l2(nchw(RUN_BLOCK(jb, nhwc(x, jnp.bfloat16), name, jae)), ref_bf16)
    print(f"\n{cfg.family} {name}: fp32 rel-L2 {err:.2e}, bf16 torch vs jax {err_bf16:.2e}")
    assert err <= 1e-5
    assert err_bf16 <= 1e-2


def test_batchnorm_matches_torch_batchnorm2d():
    """Our buffer-only BatchNorm equals torch's BatchNorm2d(affine=False, eps=1e-4) in eval mode, and inverts."""
    cfg, tm, *_ = make_pair(next(f for f in FAMILIES if FAMILIES[f].startswith("flux2")))
    ref = torch.nn.BatchNorm2d(128, eps=cfg.bn_eps, affine=False).eval()
    ref.load_state_dict({"running_mean": tm.bn.running_mean, "running_var": tm.bn.running_var})
    x = torch.from_numpy(
        np.random.default_rng(3).standard_normal((2, 128, 4, 6)).astype(np.float32)
    )
    with torch.no_grad():
        assert rel_l2(tnp(tm.bn(x)), tnp(ref(x))) <= 1e-6
        assert rel_l2(tnp(tm.bn.inverse(tm.bn(x))), tnp(x)) <= 1e-6
    tm.train()  # a frozen normaliser: train mode must not touch the statistics
    before = tm.bn.running_mean.clone()
    tm.bn(x)
    tm.eval()
    assert torch.equal(before, tm.bn.running_mean)


# ---------------------------------------------------------------------------------------------
# Encoder and decoder (through `encode` / `decode`): PyTorch vs JAX (fp32, bf16)
# ---------------------------------------------------------------------------------------------


def test_encode_decode_torch_vs_jax(pair):
    """encode = normalisation (tested above) after the encoder; decode = decoder after the inverse."""
    cfg, tm, tb, jm, jb, _ = pair
    x = image()
    with torch.no_grad():
        z = tm.encode(torch.from_numpy(x))
        out = tm.decode(z)
        z_bf16, out_bf16 = tb.encode(torch.from_numpy(x).bfloat16()), tb.decode(z.bfloat16())
    zj, outj = nchw(ENC(jm, nhwc(x))), nchw(DEC(jm, nhwc(tnp(z))))
    zj_bf16 = nchw(ENC(jb, nhwc(x, jnp.bfloat16)))
    outj_bf16 = nchw(DEC(jb, nhwc(tnp(z), jnp.bfloat16)))
    f = 2 ** (len(cfg.ch_mult) - 1)
    shape = (2, 16, H // f, W // f) if cfg.family == "ae1" else (2, 128, H // f // 2, W // f // 2)
    assert z.shape == shape and out.shape == (2, 3, H, W)
    errs = {
        "encode": rel_l2(zj, tnp(z)),
        "decode": rel_l2(outj, tnp(out)),
        "encode bf16 torch vs own fp32": rel_l2(tnp(z_bf16), tnp(z)),
        "encode bf16 jax vs fp32": rel_l2(zj_bf16, tnp(z)),
        "encode bf16 torch vs jax": rel_l2(zj_bf16, tnp(z_bf16)),
        "decode bf16 torch vs own fp32": rel_l2(tnp(out_bf16), tnp(out)),
        "decode bf16 jax vs fp32": rel_l2(outj_bf16, tnp(out)),
        "decode bf16 torch vs jax": rel_l2(outj_bf16, tnp(out_bf16)),
    }
    print("\n" + "\n".join(f"{cfg.family} {k}: rel-L2 {v:.2e}" for k, v in errs.items()))
    assert errs["encode"] <= 1e-5 and errs["decode"] <= 1e-5
    assert all(v <= 5e-2 for k, v in errs.items() if "bf16" in k)  # whole-model bf16 bound


def test_encode_rejects_bad_sizes(pair):
    cfg, tm, _, jm, *_ = pair
    bad = image(
        h=H + 2 if cfg.family == "ae2" else H + 1
    )  # FLUX.2: a multiple of f = 2, not of f x patch
    with pytest.raises(ValueError, match="multiple of"):
        tm.encode(torch.from_numpy(bad))
    with pytest.raises(ValueError, match="multiple of"):
        jm.encode(nhwc(bad))


# ---------------------------------------------------------------------------------------------
# Against diffusers (AutoencoderKL for FLUX.1, AutoencoderKLFlux2 for FLUX.2)
# ---------------------------------------------------------------------------------------------


def diffusers_model(cfg, path):
    """The diffusers VAE of `cfg`, loaded strictly from the diffusers-layout file at `path`."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    n = len(cfg.ch_mult)
    kw = dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=32,
    )
    if cfg.family == "ae1":
        model = AutoencoderKL(
            **kw,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=cfg.scale_factor,
            shift_factor=cfg.shift_factor,
        )
    else:
        model = AutoencoderKLFlux2(
            **kw, batch_norm_eps=cfg.bn_eps, patch_size=(cfg.patch_size, cfg.patch_size)
        )
    # strict: every diffusers key must come from our file (only BatchNorm's counter may be absent: torch fills it)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(path).items()}, strict=True)
    return model.eval()


def diffusers_encode_decode(dm, cfg, x: torch.Tensor, z: torch.Tensor):
    """diffusers' latents for x and image for z, normalised as its FLUX pipelines do (outside the VAE)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    with torch.no_grad():
        mean = dm.encode(x).latent_dist.mode()
        if cfg.family == "ae1":
            return (mean - dm.config.shift_factor) * dm.config.scaling_factor, dm.decode(
                z / dm.config.scaling_factor + dm.config.shift_factor
            ).sample
        bn_mean = dm.bn.running_mean.view(1, -1, 1, 1)
        bn_std = torch.sqrt(dm.bn.running_var.view(1, -1, 1, 1) + dm.config.batch_norm_eps)
        latents = (Flux2Pipeline._patchify_latents(mean) - bn_mean) / bn_std
        return latents, dm.decode(Flux2Pipeline._unpatchify_latents(z * bn_std + bn_mean)).sample


def test_against_diffusers(pair, tmp_path):
    cfg, tm, _, _, _, sd = pair
    path = tmp_path / "vae_diffusers.safetensors"
    mt.save_model(tm, path, layout="diffusers")
    dm = diffusers_model(cfg, path)
    x = torch.from_numpy(image())
    with torch.no_grad():
        z = tm.encode(x)
        out = tm.decode(z)
    z_ref, out_ref = diffusers_encode_decode(dm, cfg, x, z)
    # diffusers' own state dict (with BatchNorm's num_batches_tracked, like the official vae/ files) into JAX
    own = tmp_path / "diffusers_own.safetensors"
    save_file({k: v.numpy() for k, v in dm.state_dict().items()}, own)
    jm = mj.load_model(cfg, own, dtype=jnp.float32)
    errs = {
        "torch encode": rel_l2(tnp(z), tnp(z_ref)),
        "torch decode": rel_l2(tnp(out), tnp(out_ref)),
        "jax encode": rel_l2(nchw(ENC(jm, nhwc(x.numpy()))), tnp(z_ref)),
        "jax decode": rel_l2(nchw(DEC(jm, nhwc(tnp(z)))), tnp(out_ref)),
    }
    print(
        "\n" + "\n".join(f"{cfg.family} vs diffusers, {k}: rel-L2 {v:.2e}" for k, v in errs.items())
    )
    assert all(v <= 1e-5 for v in errs.values())


# ---------------------------------------------------------------------------------------------
# Conversions: bit-exact round trips; the official files' quirks
# ---------------------------------------------------------------------------------------------


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype.name == "bfloat16" else a


def assert_bitwise(a: dict, b: dict):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(bits(a[k]), bits(b[k])), k


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_round_trips_bit_exact(pair, tmp_path, dtype):
    """BFL -> diffusers -> BFL, and torch -> JAX -> torch through files in both layouts."""
    cfg, tm, tb, *_ = pair
    model, tdt, jdt = (
        (tm, torch.float32, jnp.float32) if dtype == "fp32" else (tb, torch.bfloat16, jnp.bfloat16)
    )
    ref = {k: mt.load.to_numpy(v) for k, v in model.state_dict().items()}
    mt.save_model(model, tmp_path / "a.safetensors", layout="diffusers")
    diff = load_file(tmp_path / "a.safetensors")
    assert any(".up_blocks." in k for k in diff) and not any(
        k.startswith("decoder.up.") for k in diff
    )
    jm = mj.load_model(cfg, tmp_path / "a.safetensors", dtype=jdt)  # diffusers -> JAX
    assert_bitwise(state_dict(jm), ref)
    mj.save_model(jm, tmp_path / "b.safetensors", layout="bfl")  # JAX -> BFL file
    assert_bitwise(load_file(tmp_path / "b.safetensors"), ref)
    back = mt.load_model(cfg, tmp_path / "b.safetensors", dtype=tdt)  # BFL -> torch
    assert_bitwise({k: mt.load.to_numpy(v) for k, v in back.state_dict().items()}, ref)


def test_diffusers_key_names(pair):
    """Spot checks of the diffusers names, including the reversed decoder levels and 1x1 conv -> linear."""
    cfg, _, _, _, _, sd = pair
    recipes = keymaps.convert(
        {k: v.shape for k, v in sd.items()}, "bfl", "diffusers", cfg.family, 0
    )
    n = len(cfg.ch_mult)
    src = {k: r.pieces[0][0] for k, r in recipes.items()}
    assert (
        src["decoder.up_blocks.0.resnets.0.conv1.weight"]
        == f"decoder.up.{n - 1}.block.0.conv1.weight"
    )
    assert (
        src["decoder.up_blocks.0.upsamplers.0.conv.weight"]
        == f"decoder.up.{n - 1}.upsample.conv.weight"
    )
    assert (
        src["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"]
        == "encoder.down.1.block.0.nin_shortcut.weight"
    )
    assert recipes["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    assert (
        src["decoder.mid_block.attentions.0.to_out.0.weight"]
        == "decoder.mid.attn_1.proj_out.weight"
    )
    if cfg.family == "ae2":
        assert src["quant_conv.weight"] == "encoder.quant_conv.weight"
        assert src["post_quant_conv.bias"] == "decoder.post_quant_conv.bias"
    assert keymaps.detect_layout(recipes) == "diffusers" and keymaps.detect_layout(sd) == "bfl"


def test_official_bfl_file_with_batchnorm_counter(pair, tmp_path):
    """A BFL file as torch's BatchNorm2d saves it (with `bn.num_batches_tracked`, int64) loads in both."""
    cfg, tm, _, _, _, sd = pair
    tensors = dict(sd)
    if cfg.family == "ae2":
        tensors["bn.num_batches_tracked"] = np.array(7, np.int64)
    save_file(tensors, tmp_path / "ae.safetensors")
    assert_bitwise(
        state_dict(mj.load_model(cfg, tmp_path / "ae.safetensors", dtype=jnp.float32)), sd
    )
    back = mt.load_model(cfg, tmp_path / "ae.safetensors", dtype=torch.float32)
    assert_bitwise({k: v.numpy() for k, v in back.state_dict().items()}, sd)


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape", "nan"])
def test_malformed_checkpoints(pair, tmp_path, framework, damage):
    cfg, _, _, _, _, sd = pair
    tensors, key = dict(sd), "decoder.conv_out.bias"
    if damage == "missing":
        del tensors[key]
    elif damage == "unexpected":
        key = "decoder.up.0.block.0.conv3.weight"
        tensors[key] = np.zeros((4, 4, 3, 3), np.float32)
    elif damage == "shape":
        tensors[key] = np.zeros(5, np.float32)
    else:
        tensors[key] = np.full_like(tensors[key], np.nan)
    path = tmp_path / f"bad_{damage}.safetensors"
    save_file(tensors, path)
    load = mt.load_model if framework == "torch" else mj.load_model
    with pytest.raises(checkpoint.CheckpointError) as err:
        load(cfg, path)
    assert str(path) in str(err.value) and key in str(err.value), str(err.value)


# ---------------------------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------------------------


def test_tiles_cover_and_blend_exactly():
    """Tile starts cover the axis; blending a purely local function reassembles it exactly (weights sum to 1)."""
    for n, tile, overlap in [(24, 8, 4), (10, 4, 2), (7, 8, 2), (13, 6, 0)]:
        starts = tiling.tile_starts(n, tile, overlap)
        covered = np.zeros(n, bool)
        for s in starts:
            covered[s : s + min(tile, n)] = True
        assert covered.all() and starts[-1] + min(tile, n) == n
    x = np.random.default_rng(4).standard_normal((1, 4, 10, 14)).astype(np.float32)

    def local(t):  # a 4x upsampling that sees no neighbours
        return torch.tanh(torch.nn.functional.interpolate(t, scale_factor=4.0, mode="nearest"))

    ref = tnp(local(torch.from_numpy(x)))
    assert rel_l2(tnp(tae.blend_tiles(local, torch.from_numpy(x), 1, 4, 4, 2)), ref) <= 1e-6
    jlocal = lambda t: jnp.tanh(jnp.repeat(jnp.repeat(t, 4, axis=1), 4, axis=2))  # noqa: E731
    assert rel_l2(nchw(jae.blend_tiles(jlocal, nhwc(x), 1, 4, 4, 2)), ref) <= 1e-6
    with pytest.raises(ValueError, match="overlap"):
        tae.blend_tiles(local, torch.from_numpy(x), 1, 4, 4, 4)


def test_tiled_one_tile_is_untiled(pair):
    cfg, tm, _, jm, *_ = pair
    x = image(
        b=1, h=32, w=32
    )  # the tile shape of the next test: the compiled JAX tile programs are shared
    with torch.no_grad():
        z = tm.encode(torch.from_numpy(x))
        assert torch.equal(tm.tiled_encode(torch.from_numpy(x), tile=64), z)
        assert torch.equal(tm.tiled_decode(z, tile=64), tm.decode(z))
    # JAX: the same compiled programs as one pass (jit vs eager would differ in the last bits)
    assert np.array_equal(
        jm.tiled_encode(nhwc(x), tile=64), jm.normalize(jae._encode_mean(jm, nhwc(x)))
    )
    zj = nhwc(tnp(z))
    assert np.array_equal(jm.tiled_decode(zj, tile=64), jae._decoder(jm, jm.inv_normalize(zj)))


def test_tiled_torch_vs_jax_and_tolerance(pair):
    """Tiled torch vs tiled JAX (parity), and the measured cost of tiling vs one pass.

    Tiles see only their own pixels: GroupNorm statistics and the mid-block attention become per tile, as in
    every tiled VAE (diffusers' `enable_tiling` too), and a random-weight tiny model is far more sensitive to
    that than a trained one. Measured (48x64 uniform noise, 6 tiles of 16 latent px sharing 8), rel-L2 tiled
    vs one pass: FLUX.1 encode 0.13, decode 0.23; FLUX.2 encode 0.03, decode 0.29. Bounds: 0.2 and 0.4.
    """
    cfg, tm, _, jm, *_ = pair
    x = image(seed=5, b=1, h=48, w=64)
    with torch.no_grad():
        z = tm.encode(torch.from_numpy(x))
        zt = tm.tiled_encode(torch.from_numpy(x), tile=16, overlap=8)
        out, outt = tm.decode(z), tm.tiled_decode(z, tile=16, overlap=8)
    zj = nchw(jm.tiled_encode(nhwc(x), tile=16, overlap=8))
    outj = nchw(jm.tiled_decode(nhwc(tnp(z)), tile=16, overlap=8))
    errs = {
        "tiled encode torch vs jax": rel_l2(zj, tnp(zt)),
        "tiled decode torch vs jax": rel_l2(outj, tnp(outt)),
        "tiled vs untiled encode": rel_l2(tnp(zt), tnp(z)),
        "tiled vs untiled decode": rel_l2(tnp(outt), tnp(out)),
    }
    print("\n" + "\n".join(f"{cfg.family} {k}: rel-L2 {v:.2e}" for k, v in errs.items()))
    assert errs["tiled encode torch vs jax"] <= 1e-5 and errs["tiled decode torch vs jax"] <= 1e-5
    assert errs["tiled vs untiled encode"] <= 0.2 and errs["tiled vs untiled decode"] <= 0.4


def test_tiling_beats_diffusers_tiling(tmp_path):
    """Same weights, same tile size (16 latent px) and overlap (4 = diffusers' 25%): our blended tiles stay
    closer to the one-pass result than diffusers' `enable_tiling` (FLUX.1 AutoencoderKL)."""
    cfg = configs.get("flux1-ae-tiny")
    tm = mt.build_model(cfg, seed=0)
    mt.save_model(tm, tmp_path / "d.safetensors", layout="diffusers")
    dm = diffusers_model(cfg, tmp_path / "d.safetensors")
    dm.tile_sample_min_size, dm.tile_latent_min_size = (
        32,
        16,
    )  # diffusers tiles: 32 px = 16 latent px (f = 2)
    x = torch.from_numpy(image(seed=6, b=1, h=64, w=64))
    with torch.no_grad():
        mean = tm.encode_mean(x)
        out = tm.decoder(mean)
        ours = {
            "encode": rel_l2(tnp(tae.blend_tiles(tm.encode_mean, x, 2, 1, 16, 4)), tnp(mean)),
            "decode": rel_l2(tnp(tae.blend_tiles(tm.decoder, mean, 1, 2, 16, 4)), tnp(out)),
        }
        dm.enable_tiling()
        theirs = {
            "encode": rel_l2(tnp(dm.encode(x).latent_dist.mode()), tnp(mean)),
            "decode": rel_l2(tnp(dm.decode(mean).sample), tnp(out)),
        }
    print(f"\ntiled vs one pass, ours {ours}, diffusers {theirs}")
    assert ours["encode"] < theirs["encode"] and ours["decode"] < theirs["decode"]


# ---------------------------------------------------------------------------------------------
# Image helpers
# ---------------------------------------------------------------------------------------------


def test_image_helpers(tmp_path):
    pixels = np.random.default_rng(7).integers(0, 256, (41, 53, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    crop = pixels[4:36, 2:50]  # centre crop to 32 x 48 (multiples of 16)
    xt, xj = timage.load_image(tmp_path / "in.png"), jimage.load_image(tmp_path / "in.png")
    assert xt.shape == (1, 3, 32, 48) and xj.shape == (1, 32, 48, 3)
    assert np.array_equal(tnp(xt), nchw(xj))
    assert np.array_equal(tnp(xt)[0].transpose(1, 2, 0), crop.astype(np.float32) / 127.5 - 1)
    timage.save_image(xt, tmp_path / "t.png")
    jimage.save_image(xj, tmp_path / "j.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "t.png")), crop)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "j.png")), crop)
    assert timage.to_uint8(np.array([-2.0, -1.0, 0.0, 0.999, 3.0])).tolist() == [
        0,
        0,
        128,
        255,
        255,
    ]
    assert jax.numpy.asarray(xj).dtype == jnp.float32
