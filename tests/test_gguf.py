"""GGUF files (ggml's format, as ComfyUI-GGUF writes FLUX transformers) against the gguf package, which we did
not write: values bitwise its float32 `dequantize`, files quantized with its quantizers (Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1, BF16) or, for the K-quants it cannot quantize, made of random valid blocks with finite fp16 scales; the
models against diffusers' on the same (gguf-dequantized) weights, in both frameworks and both load modes;
bad files, `convert FILE.gguf` and `parity --checkpoint FILE.gguf`.
"""

from __future__ import annotations

import struct

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2, transformer_inputs
from flax import nnx
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from test_checkpoint import jax_state_dict, torch_state
from twins import out

import minflux_jax as mj
import minflux_torch as mt
from minflux import checkpoint, configs, gguf_file, quant
from minflux.errors import CheckpointError
from minflux_cli import main as cli
from minflux_jax import quant as jq
from minflux_torch import quant as tq

diffusers = pytest.importorskip("diffusers")
from test_quant import diffusers_forward  # noqa: E402
from test_reference import diffusers_model  # noqa: E402

KEPT = list(tq.GGUF)  # the types both frameworks decode inside the forward
QUANTIZED = ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"]  # gguf has quantizers for these
K_QUANTS = ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]  # it has none: random valid blocks


def random_blocks(qtype: str, rows: int, cols: int, rng, scale: float = 1e-3) -> np.ndarray:
    """(rows, cols / block * bytes) uint8 ggml blocks: random bytes, the fp16 fields (d, dmin) small and finite."""
    block, size = quant.gguf_sizes(qtype)
    b = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for off in quant.GGUF_FP16_FIELDS[qtype]:
        d = (rng.standard_normal((len(b), 1)) * scale).astype(np.float16)
        b[:, off : off + 2] = d.view(np.uint8)
    return b.reshape(rows, -1)


def test_every_kept_type_has_both_decoders():
    assert list(tq.GGUF) == list(jq.GGUF) == list(quant.GGUF_FP16_FIELDS)
    assert set(QUANTIZED + K_QUANTS) == set(KEPT)


@pytest.mark.parametrize("qtype", KEPT)
def test_decoders_are_bitwise_gguf(qtype, rng):
    """numpy (the reader), torch and jitted JAX (the forward) decode the blocks to gguf's float32 bits."""
    b = random_blocks(qtype, 6, 512, rng, scale=float(rng.choice([1e-6, 1e-2, 30.0])))
    want = gguf.quants.dequantize(b, quant.GGML[qtype])
    packed = quant.Packed(qtype, (6, 512), {"weight": b})
    got = {
        "numpy": quant.dequantize(packed),
        "torch": tq.dequantize(qtype, {"weight": torch.from_numpy(b)}, (6, 512)).numpy(),
        "jax": np.asarray(jax.jit(lambda w: jq.dequantize(qtype, {"weight": w}, (6, 512)))(b)),
    }
    for where, arr in got.items():
        assert arr.dtype == np.float32 and arr.shape == want.shape, where
        assert np.array_equal(arr.view(np.uint32), want.view(np.uint32)), where


# ---------------------------------------------------------------------------------------------
# Tiny models in GGUF files
# ---------------------------------------------------------------------------------------------


def gguf_tensors(state: dict[str, np.ndarray], rng) -> tuple[dict, dict[str, np.ndarray]]:
    """A mix of every kept type over a model's tensors, as a GGUF writer would store them: ({key: (type,
    array)}, {key: the float32 values gguf dequantizes them to})."""
    tensors, want, i = {}, {}, 0
    for k, v in state.items():
        if k.endswith(".weight") and v.ndim == 2:
            i += 1
            if v.shape[1] % 256 == 0:  # K-quant rows
                qtype = K_QUANTS[i % len(K_QUANTS)]
                tensors[k] = (qtype, random_blocks(qtype, *v.shape, rng, scale=5e-5))
            elif v.shape[1] % 32 == 0:
                qtype = (QUANTIZED + ["BF16"])[i % (len(QUANTIZED) + 1)]
                arr = v if qtype == "BF16" else gguf.quants.quantize(v, quant.GGML[qtype])
                tensors[k] = (qtype, arr)
            else:
                tensors[k] = ("F16", v.astype(np.float16))
        else:
            tensors[k] = ("F32", v)
        qtype, arr = tensors[k]
        if (
            qtype == "BF16"
        ):  # what the writer stores: gguf's BF16 "quantization" (round to nearest even)
            arr = gguf.quants.quantize(arr, quant.GGML.BF16)
        want[k] = gguf.quants.dequantize(arr, quant.GGML[qtype]).reshape(v.shape)
    return tensors, want


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """gguf_files(name) -> (path, keys prefix, {BFL key: float32 values}); FLUX.1 behind `model.diffusion_model.`."""
    cache = {}

    def make(name: str):
        if name not in cache:
            state = {k: np.asarray(v) for k, v in mt.build_model(name, seed=7).state_dict().items()}
            tensors, want = gguf_tensors(state, np.random.default_rng(7))
            prefix = "model.diffusion_model." if name.startswith("flux1") else ""
            path = tmp_path_factory.mktemp("gguf") / f"{name}.gguf"
            gguf_file.write(path, {prefix + k: v for k, v in tensors.items()})
            cache[name] = path, prefix, want, {k: t for k, (t, _) in tensors.items()}
        return cache[name]

    return make


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_gguf_dequantizes_on_load_bitwise(name, gguf_files):
    path, _, want, types = gguf_files(name)
    assert {"BF16", "F16", "F32", *QUANTIZED} <= set(types.values()) and set(K_QUANTS) & set(
        types.values()
    )
    assert checkpoint.Checkpoint(path, "transformer").dtypes().startswith(("GGUF", "F32", "F16"))
    loaded = {
        "torch": torch_state(mt.load_model(name, path, dtype=torch.float32)),
        "jax": jax_state_dict(mj.load_model(name, path, dtype=jnp.float32)),
    }
    for framework, state in loaded.items():
        assert sorted(state) == sorted(want)
        for k, v in want.items():
            assert np.array_equal(state[k].view(np.uint32), v.view(np.uint32)), (
                framework,
                k,
                types[k],
            )


@nnx.jit
def _jax_forward(model, x: dict):
    return model(**x)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_gguf_kept_quantized_matches_diffusers(name, gguf_files, tmp_path, rng):
    """diffusers' model with gguf's dequantized weights; ours keeping the blocks and decoding them in the
    (jitted) forward; fp32."""
    cfg = configs.get(name)
    path, _, want, types = gguf_files(name)
    checkpoint.save_bfl(tmp_path / "d.safetensors", want, cfg, layout="diffusers")
    ref = diffusers_model(cfg).eval()
    ref.load_state_dict(load_torch(tmp_path / "d.safetensors"), strict=True)
    x = transformer_inputs(cfg, rng, batch=1)
    t = {k: None if v is None else torch.from_numpy(v) for k, v in x.items()}
    expected = out(diffusers_forward(ref, cfg, t))
    model = mt.load_model(name, path, dtype=torch.float32, keep_quantized=True)
    n = sum(t not in ("F32", "F16", "BF16") for t in types.values())
    assert len(tq.quantized_layers(model)) == n
    with torch.inference_mode():
        figures = {"torch keep": rel_l2(out(model(**t)), expected)}
    jmodel = mj.load_model(name, path, dtype=jnp.float32, keep_quantized=True)
    assert len(jq.quantized_layers(jmodel)) == n
    got = _jax_forward(jmodel, {k: None if v is None else jnp.asarray(v) for k, v in x.items()})
    figures["jax keep"] = rel_l2(out(got), expected)
    print(
        name, {k: f"{v:.1e}" for k, v in figures.items()}
    )  # the figures docs/checkpoints.md states
    assert max(figures.values()) < 1e-5, figures
    plain = mt.load_model(name, path, dtype=torch.float32)
    assert tq.resident_bytes(model) < 0.7 * tq.resident_bytes(plain)
    assert abs(jq.resident_bytes(jmodel) - tq.resident_bytes(model)) < 0.01 * tq.resident_bytes(
        model
    )


def test_types_without_a_forward_decoder_are_dequantized_on_load(tmp_path, caplog):
    """MXFP4 (gguf quantizes it; no decoder in the forward here): kept-quantized loading dequantizes it, says so."""
    state = {k: np.asarray(v) for k, v in mt.build_model("flux2-tiny", seed=1).state_dict().items()}
    key = "single_blocks.0.linear2.weight"
    tensors = {k: ("F32", v) for k, v in state.items()}
    tensors[key] = ("MXFP4", gguf.quants.quantize(state[key], quant.GGML.MXFP4))
    gguf_file.write(tmp_path / "m.gguf", tensors)
    want = gguf.quants.dequantize(tensors[key][1], quant.GGML.MXFP4)
    with caplog.at_level("WARNING", logger="minflux"):
        model = mt.load_model(
            "flux2-tiny", tmp_path / "m.gguf", dtype=torch.float32, keep_quantized=True
        )
    assert not tq.quantized_layers(model) and "dequantized on load: MXFP4 x1;" in caplog.text
    assert "stored unquantized: " in caplog.text
    assert np.array_equal(model.single_blocks[0].linear2.weight.detach().numpy(), want)


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------


def _small_file(path) -> None:
    state = {k: np.asarray(v) for k, v in mt.build_model("flux2-tiny", seed=2).state_dict().items()}
    tensors = {k: ("F32", v) for k, v in state.items()}
    key = "double_blocks.0.img_attn.proj.weight"  # (64, 64): two Q4_0 blocks a row
    tensors[key] = ("Q4_0", gguf.quants.quantize(state[key], quant.GGML.Q4_0))
    gguf_file.write(path, tensors)


def _patch_info(path, name: str, field: str, value: int) -> None:
    """Overwrite a tensor-info field (`dim0` or `type`) in a GGUF header, in place."""
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    if field == "dim0":
        struct.pack_into("<Q", data, at + 4, value)
    else:
        struct.pack_into("<I", data, at + 4 + 8 * n_dims, value)
    path.write_bytes(bytes(data))


PROJ = "double_blocks.0.img_attn.proj.weight"
BAD = {
    "truncated data": (
        lambda p: p.write_bytes(p.read_bytes()[:-300]),
        r"truncated: tensor '.*' ends at byte \d+, the file has \d+",
    ),
    "truncated header": (
        lambda p: p.write_bytes(p.read_bytes()[:200]),
        r"corrupt or truncated GGUF header",
    ),
    "unknown tensor type": (
        lambda p: _patch_info(p, PROJ, "type", 99),
        rf"tensor '{PROJ}' has unknown GGML type 99",
    ),
    "type gguf cannot dequantize": (
        lambda p: _patch_info(p, PROJ, "type", 9),
        rf"tensor '{PROJ}' has GGML type Q8_1, which the gguf package cannot dequantize",
    ),
    "blocks that do not divide a row": (
        lambda p: _patch_info(p, PROJ, "dim0", 48),
        rf"tensor '{PROJ}' \(Q4_0\) has rows of 48 values, not a whole number of Q4_0 blocks of 32",
    ),
    "no GGUF magic": (
        lambda p: p.write_bytes(b"GGUX" + p.read_bytes()[4:]),
        r"corrupt or truncated GGUF header \(ValueError: GGUF magic invalid\)",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_gguf_is_one_error(case, tmp_path):
    path = tmp_path / "bad.gguf"
    _small_file(path)
    change, message = BAD[case]
    change(path)
    for load in (mt.load_model, mj.load_model):
        for keep in (False, True):
            with pytest.raises(CheckpointError, match=message) as e:
                load("flux2-tiny", path, keep_quantized=keep)
            assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_gguf_of_another_model_is_named(gguf_files):
    path, _, _, _ = gguf_files("flux1-tiny")
    for load in (mt.load_model, mj.load_model):
        with pytest.raises(
            CheckpointError,
            match="holds a FLUX.1 transformer of width 64; the model needs a FLUX.2",
        ):
            load("flux2-tiny", path)


# ---------------------------------------------------------------------------------------------
# The commands take GGUF files like any other
# ---------------------------------------------------------------------------------------------


def test_convert_gguf(gguf_files, tmp_path, capsys):
    """`minflux convert FILE.gguf out.safetensors`: the dequantized values (F32; F16 / BF16 tensors keep their
    dtype), bit for bit, the prefix dropped; to either layout."""
    path, _, want, types = gguf_files("flux1-tiny")
    assert (
        cli.main(
            [
                "convert",
                str(path),
                str(tmp_path / "bfl.safetensors"),
                "--to",
                "bfl",
                "--no-progress",
            ]
        )
        == 0
    )
    got = load_file(tmp_path / "bfl.safetensors")
    assert sorted(got) == sorted(want)
    for k, v in got.items():
        assert v.dtype == {"F16": np.float16, "BF16": "bfloat16"}.get(types[k], np.float32), (
            k,
            v.dtype,
        )
        assert np.array_equal(v.astype(np.float32), want[k]), k
    assert cli.main(["convert", str(path), str(tmp_path / "d.safetensors"), "--no-progress"]) == 0
    assert "-> diffusers" in capsys.readouterr().out
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:-100])
    assert cli.main(["convert", str(bad), str(tmp_path / "x.safetensors"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minflux convert: error:") and "truncated" in err and "\n" not in err


@pytest.mark.slow
def test_parity_on_a_gguf_file(gguf_files, capsys):
    path, _, _, _ = gguf_files("flux2-tiny")
    code = cli.main(
        ["parity", "--model", "flux2-tiny", "--checkpoint", str(path), "--jax-cache", "off"]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed[-2000:]
    assert "GGUF Q" in printed


@pytest.mark.slow
def test_generate_keeps_a_gguf_quantized(gguf_files, tmp_path, capsys):
    """`generate --keep-quantized` on a GGUF transformer: the picture of the dequantized load, in both
    frameworks; refused with --random-weights (one line, exit 2)."""
    from PIL import Image
    from safetensors.numpy import save_file

    path, _, _, _ = gguf_files("flux1-tiny")
    cfg = configs.get("flux1-tiny")
    mt.save_model(mt.build_model("flux1-ae-tiny"), tmp_path / "ae.safetensors")
    rng = np.random.default_rng(0)
    emb = {"txt": rng.standard_normal((4, cfg.context_in_dim), np.float32)}
    save_file(
        {**emb, "vec": rng.standard_normal((1, cfg.vec_in_dim), np.float32)},
        tmp_path / "e.safetensors",
    )
    base = [
        "generate",
        "--model",
        "flux1-tiny",
        "--transformer",
        str(path),
        "--ae",
        str(tmp_path / "ae.safetensors"),
    ]
    base += [
        "--embeddings",
        str(tmp_path / "e.safetensors"),
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
    ]
    base += ["--dtype", "fp32", "--no-progress"]
    pictures = {}
    for framework in ("torch", "jax"):
        for keep in ([], ["--keep-quantized"]):
            png = tmp_path / f"{framework}{len(keep)}.png"
            assert cli.main([*base, "--framework", framework, *keep, "--out", str(png)]) == 0
            pictures[framework, bool(keep)] = np.asarray(Image.open(png)).astype(int)
    for framework in ("torch", "jax"):
        assert np.abs(pictures[framework, True] - pictures[framework, False]).max() <= 1
    capsys.readouterr()
    assert cli.main(["generate", "--random-weights", "--keep-quantized"]) == 2
    err = capsys.readouterr().err
    assert (
        "--keep-quantized keeps a quantized --transformer file packed; not with --random-weights"
        in err
    )
