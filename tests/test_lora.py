"""LoRA files: every format read, in both frameworks and both families, against diffusers' own reading of the
same file (its `lora_state_dict` converters, then PEFT's `load_lora_adapter` + `fuse_lora` on the tiny diffusers
model) where diffusers reads the format at tiny sizes, and against the format's definition written out here
(W + alpha / r * up @ down on the part's rows) where it does not. Files are built here with seeded random,
non-zero up matrices and alpha != rank; every test asserts that the LoRA moves the weights.

Compared: the weight update each framework merges (merged - base) against diffusers' (fused - base), over every
adapted tensor, fp32, rel-L2 <= 1e-5.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2, transformer_inputs
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file
from twins import out

import minflux_jax as mj
import minflux_torch as mt
from minflux import configs, keymaps, lora
from minflux.checkpoint import CheckpointError
from minflux_jax import lora as jlora
from minflux_jax.load import state_dict as jax_state_dict
from minflux_torch import lora as tlora
from minflux_torch.load import to_numpy

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from test_reference import diffusers_model  # noqa: E402

BOUND = 1e-5
MIXERS = {
    "flux1": diffusers.loaders.lora_pipeline.FluxLoraLoaderMixin,
    "flux2": diffusers.loaders.lora_pipeline.Flux2LoraLoaderMixin,
}


def pair(rng, rank, n_in, n_out, dtype=np.float32):
    """(A, B): seeded, B non-zero (a zero B would prove nothing)."""
    return (
        rng.standard_normal((rank, n_in)).astype(dtype) / np.sqrt(n_in),
        rng.standard_normal((n_out, rank)).astype(dtype) * 0.1,
    )


def diffusers_shapes(name, tiny_checkpoint) -> dict[str, tuple]:
    return {
        k.removesuffix(".weight"): v.shape
        for k, v in load_np(tiny_checkpoint(name, "diffusers")).items()
        if k.endswith(".weight") and v.ndim == 2
    }


def ours(name, path, tiny_checkpoint, scale=1.0):
    """Weight updates both frameworks merge: {BFL key: (torch delta, jax delta)}, float64."""
    tm = mt.load_model(name, tiny_checkpoint(name, "bfl"), dtype=torch.float32)
    base = {k: to_numpy(v).astype(np.float64) for k, v in tm.state_dict().items()}
    mt.load_lora(tm, path, scale)
    jm = mj.load_model(name, tiny_checkpoint(name, "bfl"), dtype=jnp.float32)
    mj.load_lora(jm, path, scale)
    t = {k: to_numpy(v).astype(np.float64) - base[k] for k, v in tm.state_dict().items()}
    j = {k: v.astype(np.float64) - base[k] for k, v in jax_state_dict(jm).items()}
    return t, j, base


def reference_model(name, path, tiny_checkpoint, scale=1.0):
    """(diffusers model with the file fused, its base weights): lora_state_dict + load_lora_adapter + fuse_lora."""
    from safetensors.torch import load_file

    cfg = configs.get(name)
    model = diffusers_model(cfg).eval()
    base = load_file(tiny_checkpoint(name, "diffusers"))
    model.load_state_dict(base, strict=True)
    if cfg.family == "flux1":
        sd, alphas, meta = MIXERS["flux1"].lora_state_dict(
            str(path), return_alphas=True, return_lora_metadata=True
        )
    else:  # FLUX.2's reader takes no network alphas
        (sd, meta), alphas = (
            MIXERS["flux2"].lora_state_dict(str(path), return_lora_metadata=True),
            None,
        )
    model.load_lora_adapter(
        sd, network_alphas=alphas or None, metadata=meta, prefix="transformer", adapter_name="x"
    )
    model.fuse_lora(lora_scale=scale)
    return model, base


def reference(name, path, tiny_checkpoint, scale=1.0) -> dict[str, np.ndarray]:
    """diffusers' fused weight updates, in BFL layout."""
    model, base = reference_model(name, path, tiny_checkpoint, scale)
    fused = {
        k.replace(".base_layer.", "."): v
        for k, v in model.state_dict().items()
        if ".lora_" not in k
    }
    assert set(fused) == set(base)
    deltas = {k: (fused[k].double() - base[k].double()).numpy() for k in base}
    recipes = keymaps.to_bfl({k: v.shape for k, v in deltas.items()}, configs.get(name).family)
    return {k: keymaps.apply(r, lambda key, a, b: deltas[key][a:b]) for k, r in recipes.items()}


def check(name, path, tiny_checkpoint, want, scale=1.0) -> float:
    """Both frameworks' updates against `want` ({BFL key: update}; keys absent from it must not move)."""
    t, j, base = ours(name, path, tiny_checkpoint, scale)
    moved = [k for k, v in want.items() if np.abs(v).max() > 0]
    assert moved, "the LoRA moves nothing"
    keys = sorted(base)
    err = 0.0
    for got in (t, j):
        a = np.concatenate([got[k].ravel() for k in keys])
        b = np.concatenate([want.get(k, np.zeros_like(base[k])).ravel() for k in keys])
        assert np.linalg.norm(b) > 1e-3 * np.linalg.norm(
            np.concatenate([base[k].ravel() for k in keys])
        )
        err = max(err, rel_l2(a, b))
    assert err <= BOUND, err
    return err


def definition(name, rows: dict[str, list]) -> dict[str, np.ndarray]:
    """The update a file means, written out: {BFL module: [(start, A, B, alpha or None), ...]} -> {key: update}."""
    shapes = lora.linear_shapes(configs.get(name))
    out = {}
    for module, parts in rows.items():
        d = np.zeros(shapes[module])
        for start, A, B, alpha in parts:
            r = A.shape[0]
            d[start : start + B.shape[0]] += (alpha / r if alpha is not None else 1.0) * (
                B.astype(np.float64) @ A.astype(np.float64)
            )
        out[module + ".weight"] = d
    return out


# ---------------------------------------------------------------------------------------------
# diffusers / PEFT
# ---------------------------------------------------------------------------------------------

PARTIAL = {  # partial fused layers: only to_q; add_q/k/v; single-block q, k, v without proj_mlp (diffusers' defaults)
    "flux1": [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.attn.add_q_proj",
        "transformer_blocks.1.attn.add_k_proj",
        "transformer_blocks.1.attn.add_v_proj",
        "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v",
        "single_transformer_blocks.1.proj_mlp",
        "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.1.ff.net.0.proj",
        "norm_out.linear",
        "single_transformer_blocks.1.proj_out",
        "x_embedder",
    ],
    "flux2": [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.attn.add_q_proj",
        "transformer_blocks.1.attn.add_v_proj",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "transformer_blocks.0.ff.linear_in",
        "transformer_blocks.1.ff_context.linear_out",
        "norm_out.linear",
        "single_transformer_blocks.1.attn.to_out",
        "double_stream_modulation_img.linear",
    ],
}


def diffusers_file(path, name, tiny_checkpoint, rng, alphas: str, prefix="transformer."):
    """A diffusers-named LoRA; alpha in diffusers' prefixed metadata ("meta"), or `.alpha` keys ("keys")."""
    cfg = configs.get(name)
    shapes = diffusers_shapes(name, tiny_checkpoint)
    tensors, meta = {}, None
    mods = PARTIAL[cfg.family]
    for i, m in enumerate(mods):
        rank = 2 if i == 1 else 4  # one module of another rank
        A, B = pair(rng, rank, shapes[m][1], shapes[m][0])
        tensors[f"{prefix}{m}.lora_A.weight"], tensors[f"{prefix}{m}.lora_B.weight"] = A, B
        if alphas == "keys":
            tensors[f"{prefix}{m}.alpha"] = np.asarray(3.0 + i, np.float32)
    if alphas == "meta":  # what diffusers' save_lora_weights writes (LoraConfig.to_dict, prefixed)
        config = {
            "r": 4,
            "lora_alpha": 8.0,
            "target_modules": mods,
            "rank_pattern": {f"^{mods[1]}": 2},
            "alpha_pattern": {f"^{mods[2]}": 3.0},
        }
        meta = {
            "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()}),
            "format": "pt",
        }
    save_file(tensors, str(path), metadata=meta)
    return tensors


def folded(tensors: dict) -> dict:
    """The `.alpha` keys' definition as a file without them: each up matrix times alpha / r."""
    out = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    for k, v in tensors.items():
        if k.endswith(".alpha"):
            B = k.removesuffix(".alpha") + ".lora_B.weight"
            out[B] = (out[B] * (v / out[B].shape[1])).astype(np.float32)
    return out


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
@pytest.mark.parametrize("alphas", ["meta", "keys"])
def test_diffusers_format_against_diffusers(name, alphas, tmp_path, rng, tiny_checkpoint):
    path = tmp_path / "d.safetensors"
    tensors = diffusers_file(path, name, tiny_checkpoint, rng, alphas)
    ref_path = path
    if (
        alphas == "keys" and name == "flux2-tiny"
    ):  # diffusers' FLUX.2 reader drops `.alpha` keys (applies scale 1)
        save_file(folded(tensors), str(ref_path := tmp_path / "folded.safetensors"))
    check(name, path, tiny_checkpoint, reference(name, ref_path, tiny_checkpoint))
    # strength 0.5 equals diffusers' fuse_lora(lora_scale=0.5)
    check(name, path, tiny_checkpoint, reference(name, ref_path, tiny_checkpoint, 0.5), scale=0.5)


def diffusers_forward(model, cfg, x: dict) -> np.ndarray:
    """A diffusers FLUX transformer on our inputs (BFL keyword names, numpy; batch 1), as test_reference does."""
    t = {k: None if v is None else torch.from_numpy(v) for k, v in x.items()}
    with torch.inference_mode():
        if cfg.family == "flux1":
            return model(
                hidden_states=t["img"],
                encoder_hidden_states=t["txt"],
                pooled_projections=t["y"],
                timestep=t["timesteps"],
                img_ids=t["img_ids"][0],
                txt_ids=t["txt_ids"][0],
                guidance=t["guidance"],
            ).sample.numpy()
        return model(
            hidden_states=t["x"],
            encoder_hidden_states=t["ctx"],
            timestep=t["timesteps"],
            img_ids=t["x_ids"],
            txt_ids=t["ctx_ids"],
            guidance=t["guidance"],
        ).sample.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_model_outputs_against_diffusers(name, tmp_path, rng, tiny_checkpoint):
    """The forward of each framework's merged model against diffusers' fused model, same inputs, scale 0.8."""
    path = tmp_path / "d.safetensors"
    diffusers_file(path, name, tiny_checkpoint, rng, "meta")
    cfg = configs.get(name)
    ref, base_sd = reference_model(name, path, tiny_checkpoint, 0.8)
    base = diffusers_model(cfg).eval()
    base.load_state_dict(base_sd, strict=True)
    x = transformer_inputs(cfg, rng, batch=1)
    want = diffusers_forward(ref, cfg, x)
    assert rel_l2(diffusers_forward(base, cfg, x), want) > 1e-3  # the LoRA moves the output
    tm = mt.load_lora(
        mt.load_model(name, tiny_checkpoint(name, "bfl"), dtype=torch.float32), path, 0.8
    )
    with torch.inference_mode():
        got_t = tm(**{k: None if v is None else torch.from_numpy(v) for k, v in x.items()})
    jm = mj.load_lora(
        mj.load_model(name, tiny_checkpoint(name, "bfl"), dtype=jnp.float32), path, 0.8
    )
    got_j = jm(**{k: None if v is None else jnp.asarray(v) for k, v in x.items()})
    assert rel_l2(out(got_t), want) <= BOUND
    assert rel_l2(out(got_j), want) <= BOUND


def test_peft_bare_metadata_and_rslora(tmp_path, rng, tiny_checkpoint):
    """PEFT's own header (unprefixed config, as minflux wrote before) and use_rslora: alpha / sqrt(r)."""
    name = "flux1-tiny"
    shapes = diffusers_shapes(name, tiny_checkpoint)
    m = "transformer_blocks.0.attn.to_k"
    A, B = pair(rng, 4, shapes[m][1], shapes[m][0])
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 6.0, "use_rslora": True})}
    save_file(
        {f"base_model.model.{m}.lora_A.weight": A, f"base_model.model.{m}.lora_B.weight": B},
        str(tmp_path / "p.safetensors"),
        metadata=meta,
    )
    h = configs.get(name).hidden_size
    want = definition(
        name, {"double_blocks.0.img_attn.qkv": [(h, A, B, 6.0 / 2.0 * 4)]}
    )  # alpha / sqrt(r)
    check(name, tmp_path / "p.safetensors", tiny_checkpoint, want)


# ---------------------------------------------------------------------------------------------
# kohya, XLabs, diffusion_model. BFL names, PEFT base_model.model.
# ---------------------------------------------------------------------------------------------


def bfl_file(path, name, rng, modules, key, with_alpha=True, prefix=""):
    """BFL-named pairs: key(module) -> base name; lora_down/lora_up (+ .alpha) or lora_A/lora_B."""
    shapes = lora.linear_shapes(configs.get(name))
    tensors, parts = {}, {}
    down, up = (
        ("lora_down", "lora_up") if key == "kohya" or prefix == "comfy" else ("lora_A", "lora_B")
    )
    for i, m in enumerate(modules):
        A, B = pair(rng, 4, shapes[m][1], shapes[m][0])
        base = (
            ("lora_unet_" + m.replace(".", "_"))
            if key == "kohya"
            else ("diffusion_model." + m if prefix else "base_model.model." + m)
        )
        tensors[f"{base}.{down}.weight"], tensors[f"{base}.{up}.weight"] = A, B
        alpha = 2.0 + i if with_alpha else None
        if alpha is not None:
            tensors[f"{base}.alpha"] = np.asarray(alpha, np.float32)
        parts[m] = [(0, A, B, alpha)]
    save_file(tensors, str(path))
    return parts


KOHYA = {  # diffusers' FLUX.1 kohya reader hard-codes the full-size linear1 split, skips final-layer alphas and
    # drops img_in / txt_in / time_in / vector_in / guidance_in (keys written without `transformer.`): see below
    "flux1": [
        "double_blocks.0.img_attn.qkv",
        "double_blocks.1.txt_attn.qkv",
        "double_blocks.0.img_mlp.0",
        "double_blocks.1.txt_mod.lin",
        "single_blocks.1.linear2",
        "single_blocks.0.modulation.lin",
    ],
    "flux2": [
        "double_blocks.0.img_attn.qkv",
        "double_blocks.1.txt_attn.proj",
        "double_blocks.0.txt_mlp.0",
        "single_blocks.0.linear1",
        "single_blocks.1.linear2",
        "img_in",
        "final_layer.linear",
    ],
}


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_kohya_against_diffusers(name, tmp_path, rng, tiny_checkpoint):
    path = tmp_path / "k.safetensors"
    parts = bfl_file(path, name, rng, KOHYA[configs.get(name).family], "kohya")
    ref = reference(name, path, tiny_checkpoint)
    check(name, path, tiny_checkpoint, ref)
    check(
        name, path, tiny_checkpoint, definition(name, parts)
    )  # and the format's definition agrees


def test_kohya_parts_diffusers_cannot_read_at_tiny_size(tmp_path, rng, tiny_checkpoint):
    """FLUX.1 linear1, the final layer (with alpha) and the embedders: the definition."""
    name = "flux1-tiny"
    parts = bfl_file(
        tmp_path / "k.safetensors",
        name,
        rng,
        [
            "single_blocks.0.linear1",
            "final_layer.adaLN_modulation.1",
            "txt_in",
            "vector_in.in_layer",
            "time_in.out_layer",
            "guidance_in.in_layer",
        ],
        "kohya",
    )
    check(name, tmp_path / "k.safetensors", tiny_checkpoint, definition(name, parts))


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_diffusion_model_prefix(name, tmp_path, rng, tiny_checkpoint):
    """ComfyUI's FLUX.1 lora_down / lora_up / alpha and ai-toolkit's FLUX.2 lora_A / lora_B behind diffusion_model."""
    path = tmp_path / "c.safetensors"
    comfy = name == "flux1-tiny"
    mods = KOHYA[configs.get(name).family]
    parts = bfl_file(
        path, name, rng, mods, "bfl", with_alpha=comfy, prefix="comfy" if comfy else "ai-toolkit"
    )
    ref = reference(name, path, tiny_checkpoint)
    check(name, path, tiny_checkpoint, ref)
    check(name, path, tiny_checkpoint, definition(name, parts))


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_peft_base_model_prefix(name, tmp_path, rng, tiny_checkpoint):
    """`base_model.model.` + BFL names (fal / PEFT): diffusers reads it for FLUX.2; FLUX.1's reader is full-size."""
    path = tmp_path / "b.safetensors"
    parts = bfl_file(path, name, rng, KOHYA[configs.get(name).family], "bfl", with_alpha=False)
    if name == "flux2-tiny":
        check(name, path, tiny_checkpoint, reference(name, path, tiny_checkpoint))
    check(name, path, tiny_checkpoint, definition(name, parts))


def test_xlabs_against_diffusers(tmp_path, rng, tiny_checkpoint):
    name = "flux1-tiny"
    h = configs.get(name).hidden_size
    shapes = lora.linear_shapes(configs.get(name))
    tensors, parts = {}, {}
    for proc, module, rows in [
        ("double_blocks.0.processor.qkv_lora1", "double_blocks.0.img_attn.qkv", 3 * h),
        ("double_blocks.1.processor.qkv_lora2", "double_blocks.1.txt_attn.qkv", 3 * h),
        ("double_blocks.1.processor.proj_lora1", "double_blocks.1.img_attn.proj", h),
        ("double_blocks.0.processor.proj_lora2", "double_blocks.0.txt_attn.proj", h),
        ("single_blocks.0.processor.qkv_lora", "single_blocks.0.linear1", 3 * h),
        ("single_blocks.1.processor.proj_lora", "single_blocks.1.linear2", h),
    ]:
        A, B = pair(rng, 4, shapes[module][1], rows)
        tensors[f"{proc}.down.weight"], tensors[f"{proc}.up.weight"] = A, B
        parts[module] = [(0, A, B, None)]
    save_file(tensors, str(tmp_path / "x.safetensors"))
    ref = reference(name, tmp_path / "x.safetensors", tiny_checkpoint)
    check(name, tmp_path / "x.safetensors", tiny_checkpoint, ref)
    check(name, tmp_path / "x.safetensors", tiny_checkpoint, definition(name, parts))


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_kohya_over_diffusers_names(name, tmp_path, rng, tiny_checkpoint):
    """`lora_transformer_` (diffusers' FLUX.1 reader takes its attention modules) and `lora_unet_transformer_blocks_`
    (no diffusers reader): diffusers where it reads them, else the definition."""
    h = configs.get(name).hidden_size
    shapes = diffusers_shapes(name, tiny_checkpoint)
    tensors, parts = {}, {}
    single = (
        "lora_transformer_single_transformer_blocks_1_attn_to_v",
        "single_blocks.1.linear1",
        2 * h,
    )
    if name == "flux2-tiny":  # FLUX.2's single-block linear1 is one diffusers module
        single = (
            "lora_transformer_single_transformer_blocks_1_attn_to_qkv_mlp_proj",
            "single_blocks.1.linear1",
            0,
        )
    spec = [
        ("lora_transformer_transformer_blocks_0_attn_to_k", "double_blocks.0.img_attn.qkv", h),
        single,
        (
            "lora_transformer_transformer_blocks_1_attn_to_add_out",
            "double_blocks.1.txt_attn.proj",
            0,
        ),
    ]
    for i, (key, module, start) in enumerate(spec):
        dname = next(
            d for d in shapes if d.replace(".", "_") == key.removeprefix("lora_transformer_")
        )
        A, B = pair(rng, 4, shapes[dname][1], shapes[dname][0])
        tensors |= {
            f"{key}.lora_down.weight": A,
            f"{key}.lora_up.weight": B,
            f"{key}.alpha": np.asarray(5.0 + i, np.float32),
        }
        parts.setdefault(module, []).append((start, A, B, 5.0 + i))
    save_file(tensors, str(tmp_path / "m.safetensors"))
    if name == "flux1-tiny":
        check(
            name,
            tmp_path / "m.safetensors",
            tiny_checkpoint,
            reference(name, tmp_path / "m.safetensors", tiny_checkpoint),
        )
    check(name, tmp_path / "m.safetensors", tiny_checkpoint, definition(name, parts))
    # the same pairs under lora_unet_ + diffusers names, plus a CLIP part (reported, not a refusal)
    renamed = {k.replace("lora_transformer_", "lora_unet_"): v for k, v in tensors.items()}
    renamed |= {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.ones(
            (2, 8), np.float32
        ),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": np.ones((8, 2), np.float32),
    }
    save_file(renamed, str(tmp_path / "u.safetensors"))
    assert lora.read(tmp_path / "u.safetensors", configs.get(name)).text_encoder == 1
    with pytest.warns(UserWarning, match="1 text-encoder LoRA modules"):
        check(name, tmp_path / "u.safetensors", tiny_checkpoint, definition(name, parts))


def test_bfl_control_lora(tmp_path, rng, tiny_checkpoint):
    """BFL's Canny / Depth LoRA form: lora_A / lora_B / lora_B.bias on BFL names, full norm scales replaced."""
    name = "flux1-tiny"
    cfg = configs.get(name)
    shapes = lora.linear_shapes(cfg)
    tensors, parts = {}, {}
    for m in [
        "double_blocks.0.img_attn.qkv",
        "single_blocks.1.linear1",
        "img_in",
        "final_layer.adaLN_modulation.1",
    ]:
        A, B = pair(rng, 4, shapes[m][1], shapes[m][0])
        b = rng.standard_normal(shapes[m][0]).astype(np.float32)
        tensors |= {f"{m}.lora_A.weight": A, f"{m}.lora_B.weight": B, f"{m}.lora_B.bias": b}
        parts[m] = [(0, A, B, None)]
        parts[m + ".bias"] = b
    scale = rng.standard_normal(cfg.hidden_size // cfg.num_heads).astype(np.float32)
    tensors["double_blocks.1.img_attn.norm.query_norm.scale"] = scale
    save_file(tensors, str(tmp_path / "ctl.safetensors"))
    assert lora.detect(tensors) == "control"
    t, j, base = ours(name, tmp_path / "ctl.safetensors", tiny_checkpoint, 0.5)
    want = definition(name, {k: v for k, v in parts.items() if not k.endswith(".bias")})
    for got in (t, j):
        for m, d in want.items():
            assert rel_l2(got[m], 0.5 * d) <= BOUND
            assert (
                rel_l2(
                    got[m.replace(".weight", ".bias")], 0.5 * parts[m.replace(".weight", ".bias")]
                )
                <= BOUND
            )
        key = "double_blocks.1.img_attn.norm.query_norm.scale"
        np.testing.assert_array_equal(
            got[key] + base[key], scale.astype(np.float64)
        )  # replaced, not scaled
    with pytest.raises(CheckpointError, match="ctl.safetensors: a BFL control LoRA"):
        lora.convert_file(tmp_path / "ctl.safetensors", tmp_path / "x.safetensors", "kohya", cfg)


def test_control_lora_widens_img_in(tmp_path, rng, tiny_checkpoint):
    """A Canny / Depth LoRA on a FLUX.1-dev model: img_in gains the control channels, zero columns plus the LoRA
    (as diffusers expands x_embedder); both frameworks then run the widened model alike."""
    name = "flux1-tiny"
    cfg = configs.get(name)
    wide = 2 * cfg.in_channels
    A, B = pair(rng, 4, wide, cfg.hidden_size)
    b = rng.standard_normal(cfg.hidden_size).astype(np.float32)
    scale = rng.standard_normal(cfg.hidden_size // cfg.num_heads).astype(np.float32)
    save_file(
        {
            "img_in.lora_A.weight": A,
            "img_in.lora_B.weight": B,
            "img_in.lora_B.bias": b,
            "single_blocks.0.norm.key_norm.scale": scale,
        },
        str(tmp_path / "canny.safetensors"),
    )
    tm = mt.load_model(name, tiny_checkpoint(name, "bfl"), dtype=torch.float32)
    base = {k: to_numpy(v).astype(np.float64) for k, v in tm.state_dict().items()}
    mt.load_lora(tm, tmp_path / "canny.safetensors")
    jm = mj.load_lora(
        mj.load_model(name, tiny_checkpoint(name, "bfl"), dtype=jnp.float32),
        tmp_path / "canny.safetensors",
    )
    want = np.concatenate(
        [base["img_in.weight"], np.zeros((cfg.hidden_size, wide - cfg.in_channels))], axis=1
    )
    want += B.astype(np.float64) @ A
    for sd, params in ((tm.state_dict(), tm.params), (jax_state_dict(jm), jm.params)):
        sd = {
            k: np.asarray(to_numpy(v) if isinstance(v, torch.Tensor) else v, np.float64)
            for k, v in sd.items()
        }
        assert params.in_channels == wide and sd["img_in.weight"].shape == (cfg.hidden_size, wide)
        assert rel_l2(sd["img_in.weight"], want) <= BOUND
        assert rel_l2(sd["img_in.bias"], base["img_in.bias"] + b) <= BOUND
        np.testing.assert_array_equal(sd["single_blocks.0.norm.key_norm.scale"], scale)
    x = transformer_inputs(tm.params, rng, batch=1)
    with torch.inference_mode():
        got_t = tm(**{k: None if v is None else torch.from_numpy(v) for k, v in x.items()})
    got_j = jm(**{k: None if v is None else jnp.asarray(v) for k, v in x.items()})
    assert x["img"].shape[-1] == wide and rel_l2(out(got_j), out(got_t)) <= BOUND


@pytest.mark.slow
def test_generate_with_a_control_lora(tmp_path, rng, tiny_checkpoint):
    """`minflux generate --lora canny.safetensors --control EDGES` on an ordinary FLUX.1 model: the LoRA widens
    img_in, the control image is fed; both frameworks draw the same picture, and without --control it is refused."""
    from PIL import Image

    from minflux_cli.main import main

    cfg = configs.get("flux1-tiny")
    A, B = pair(rng, 4, 2 * cfg.in_channels, cfg.hidden_size)
    save_file(
        {"img_in.lora_A.weight": A, "img_in.lora_B.weight": B}, str(tmp_path / "canny.safetensors")
    )
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "edges.png")
    common = [
        "generate",
        "--random-weights",
        "--model",
        "flux1-tiny",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--lora",
        str(tmp_path / "canny.safetensors"),
        "--no-progress",
    ]
    out = {}
    for fw in ("torch", "jax"):
        assert (
            main(
                common
                + [
                    "--framework",
                    fw,
                    "--control",
                    str(tmp_path / "edges.png"),
                    "--out",
                    str(tmp_path / f"{fw}.png"),
                ]
            )
            == 0
        )
        out[fw] = np.asarray(Image.open(tmp_path / f"{fw}.png"), np.int16)
    assert np.abs(out["torch"] - out["jax"]).max() <= 1
    assert main(common) == 2  # a control model now: it needs --control


# ---------------------------------------------------------------------------------------------
# Files we write, read by diffusers at the intended strength; several files at once; errors
# ---------------------------------------------------------------------------------------------


def trainer_adapters(name, rng, modules, rank=4, alpha=6.0):
    shapes = lora.linear_shapes(configs.get(name))
    return {
        m: dict(zip(("lora_A", "lora_B"), pair(rng, rank, shapes[m][1], shapes[m][0]), strict=True))
        | {"alpha": alpha}
        for m in modules
    }


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_written_files_load_at_intended_strength_in_diffusers(name, tmp_path, rng, tiny_checkpoint):
    cfg = configs.get(name)
    modules = lora.targets(
        lora.linear_shapes(cfg), lora.DEFAULT_TARGETS + (r"final_layer\.adaLN_modulation\.1$",)
    )
    ad = trainer_adapters(name, rng, modules)
    want = {
        m + ".weight": 6.0 / 4 * (a["lora_B"].astype(np.float64) @ a["lora_A"])
        for m, a in ad.items()
    }
    lora.save(tmp_path / "diffusers.safetensors", ad, cfg, "diffusers")
    assert (
        rel_l2(
            reference(name, tmp_path / "diffusers.safetensors", tiny_checkpoint)[
                "double_blocks.0.img_attn.qkv.weight"
            ],
            want["double_blocks.0.img_attn.qkv.weight"],
        )
        <= BOUND
    )
    check(
        name,
        tmp_path / "diffusers.safetensors",
        tiny_checkpoint,
        reference(name, tmp_path / "diffusers.safetensors", tiny_checkpoint),
    )
    check(name, tmp_path / "diffusers.safetensors", tiny_checkpoint, want)
    # kohya and bfl forms: diffusers reads kohya for FLUX.2 (its FLUX.1 reader is full-size only) and bfl for FLUX.2
    for fmt in ("kohya", "bfl"):
        lora.save(tmp_path / f"{fmt}.safetensors", ad, cfg, fmt)
        check(name, tmp_path / f"{fmt}.safetensors", tiny_checkpoint, want)
    if name == "flux2-tiny":
        keep = [
            m for m in modules if not m.startswith("final_layer")
        ]  # diffusers' FLUX.2 readers skip it
        part = {m: ad[m] for m in keep}
        for fmt in ("kohya", "bfl"):
            lora.save(tmp_path / f"p{fmt}.safetensors", part, cfg, fmt)
            ref = reference(name, tmp_path / f"p{fmt}.safetensors", tiny_checkpoint)
            check(name, tmp_path / f"p{fmt}.safetensors", tiny_checkpoint, ref)
    # convert: kohya -> diffusers -> bfl keeps the update
    lora.convert_file(tmp_path / "kohya.safetensors", tmp_path / "c.safetensors", "diffusers", cfg)
    lora.convert_file(tmp_path / "c.safetensors", tmp_path / "c2.safetensors", "bfl", cfg)
    check(name, tmp_path / "c2.safetensors", tiny_checkpoint, want)


def test_several_files_each_with_its_scale(tmp_path, rng, tiny_checkpoint):
    name = "flux2-tiny"
    cfg = configs.get(name)
    a1 = trainer_adapters(name, rng, ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"])
    a2 = trainer_adapters(name, rng, ["double_blocks.0.img_attn.qkv", "img_in"], rank=2, alpha=5.0)
    lora.save(tmp_path / "1.safetensors", a1, cfg, "kohya")
    lora.save(tmp_path / "2.safetensors", a2, cfg, "diffusers")
    want = {}
    for ad, s in ((a1, 0.7), (a2, -0.3)):
        for m, a in ad.items():
            r = a["lora_A"].shape[0]
            want[m + ".weight"] = want.get(m + ".weight", 0) + s * a["alpha"] / r * (
                a["lora_B"].astype(np.float64) @ a["lora_A"]
            )
    t, j, _ = ours(
        name, [tmp_path / "1.safetensors", tmp_path / "2.safetensors"], tiny_checkpoint, [0.7, -0.3]
    )
    for got in (t, j):
        for k, v in want.items():
            assert rel_l2(got[k], v) <= BOUND


def test_parse_spec():
    assert lora.parse_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert lora.parse_spec("dir/a.safetensors:0.5") == ("dir/a.safetensors", 0.5)
    assert lora.parse_spec("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)


def test_linear_shapes_match_both_models():
    for name in ("flux1-tiny", "flux2-tiny"):
        tm = mt.build_model(name)
        want = {m: tuple(tm.get_submodule(m).weight.shape) for m in tlora.linear_names(tm)}
        assert lora.linear_shapes(configs.get(name)) == want
        assert sorted(jlora.linear_names(mj.build_model(name))) == sorted(want)


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": (8,)}, "DoRA"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": (2, 2)}, "LoKr"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a": (2, 2)}, "LoHa"),
        (
            {"some.other.weight": (2, 2)},
            "unknown LoRA format; first keys: \\['some.other.weight'\\]",
        ),
        (
            {
                "lora_unet_double_blocks_9_img_attn_qkv.lora_down.weight": (2, 64),
                "lora_unet_double_blocks_9_img_attn_qkv.lora_up.weight": (192, 2),
            },
            "no linear layer",
        ),
        (
            {
                "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (2, 32),
                "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (96, 2),
            },
            "wrong family or width",
        ),
        ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (2, 64)}, "both halves"),
    ],
)
def test_errors_name_file_and_cause(keys, match, tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({k: np.ones(s, np.float32) for k, s in keys.items()}, str(path))
    with pytest.raises(CheckpointError, match=match) as e:
        lora.read(path, configs.get("flux1-tiny"))
    assert str(path) in str(e.value)


def test_init_lora_adapters_reproduce_the_file(tmp_path, rng, tiny_checkpoint):
    """`to_adapters` (for train --init-lora): one (A, B, alpha) per module whose delta is the file's."""
    name = "flux1-tiny"
    path = tmp_path / "d.safetensors"
    diffusers_file(path, name, tiny_checkpoint, rng, "keys")
    cfg = configs.get(name)
    read = lora.read(path, cfg)
    ad = lora.to_adapters(read, lora.linear_shapes(cfg))
    assert len({a["lora_A"].shape[0] for a in ad.values()}) == 1
    lora.save(tmp_path / "again.safetensors", ad, cfg, "kohya")
    want = reference(name, path, tiny_checkpoint)
    check(name, tmp_path / "again.safetensors", tiny_checkpoint, want)


# ---------------------------------------------------------------------------------------------
# Text-encoder parts, applied to minflux's own CLIP-L / T5
# ---------------------------------------------------------------------------------------------


def text_models(kind):
    """A tiny minflux encoder in both frameworks with the same weights: (torch model, jax model)."""
    from minflux import text
    from minflux_jax.load import assign
    from minflux_jax.text import encoder as je
    from minflux_torch.text import encoder as te

    cfg = (
        text.CLIPTextConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
        )
        if kind == "clip"
        else text.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    )
    tm = te.build_model(kind, cfg, torch.float32, seed=0)
    jm = je.build_model(kind, cfg, jnp.float32, seed=0)
    assign(jm, {k: to_numpy(v) for k, v in tm.state_dict().items()})
    return tm, jm


def text_deltas(tm, jm, path, kind, scale=1.0):
    base = {k: to_numpy(v).astype(np.float64) for k, v in tm.state_dict().items()}
    tlora.load_lora(tm, path, scale, component=kind)
    jlora.load_lora(jm, path, scale, component=kind)
    return (
        {k: to_numpy(v).astype(np.float64) - base[k] for k, v in tm.state_dict().items()},
        {k: v.astype(np.float64) - base[k] for k, v in jax_state_dict(jm).items()},
    )


def test_clip_part_of_a_kohya_file_against_diffusers(tmp_path, rng):
    """A kohya file that also trains CLIP: the transformer part loads (one warning), the CLIP part applies to
    minflux's CLIP-L as diffusers' converter reads it (its up @ down, alpha folded)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    tm, jm = text_models("clip")
    ours_to_diffusers = {
        "encoder.layers.0.self_attn.q_proj": "encoder.layers.0.self_attn.to_q_lora",
        "encoder.layers.1.mlp.fc1": "encoder.layers.1.mlp.fc1.lora_linear_layer",
        "encoder.layers.1.self_attn.out_proj": "encoder.layers.1.self_attn.to_out_lora",
    }
    tensors = {}
    for i, m in enumerate(ours_to_diffusers):
        w = tm.state_dict()[m + ".weight"]
        A, B = pair(rng, 4, w.shape[1], w.shape[0])
        base = "lora_te1_text_model_" + m.replace(".", "_")
        tensors |= {
            f"{base}.lora_down.weight": A,
            f"{base}.lora_up.weight": B,
            f"{base}.alpha": np.asarray(2.0 + i, np.float32),
        }
    # copies: the converter scales its inputs in place
    conv = _convert_kohya_flux_lora_to_diffusers(
        {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
    )
    want = {
        m + ".weight": (
            conv[f"text_encoder.text_model.{d}.up.weight"].double()
            @ conv[f"text_encoder.text_model.{d}.down.weight"].double()
        ).numpy()
        for m, d in ours_to_diffusers.items()
    }
    name = "flux1-tiny"  # and a transformer part beside it
    shapes = lora.linear_shapes(configs.get(name))
    A, B = pair(rng, 4, shapes["txt_in"][1], shapes["txt_in"][0])
    tensors |= {"lora_unet_txt_in.lora_down.weight": A, "lora_unet_txt_in.lora_up.weight": B}
    save_file(tensors, str(tmp_path / "te.safetensors"))
    with pytest.warns(UserWarning, match="3 text-encoder LoRA modules"):
        mt.load_lora(mt.build_model(name), tmp_path / "te.safetensors")
    for got in text_deltas(tm, jm, tmp_path / "te.safetensors", "clip", 0.5):
        for k, v in got.items():
            assert rel_l2(v, 0.5 * want[k]) <= BOUND if k in want else not v.any(), k


def test_t5_part_comfyui_keys(tmp_path, rng):
    """ComfyUI's `text_encoders.t5xxl.transformer.` keys: the definition (diffusers reads no T5 LoRA)."""
    tm, jm = text_models("t5")
    tensors, want = {}, {}
    for i, m in enumerate(
        ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wo"]
    ):
        w = tm.state_dict()[m + ".weight"]
        A, B = pair(rng, 4, w.shape[1], w.shape[0])
        base = "text_encoders.t5xxl.transformer." + m
        tensors |= {
            f"{base}.lora_down.weight": A,
            f"{base}.lora_up.weight": B,
            f"{base}.alpha": np.asarray(3.0 + i, np.float32),
        }
        want[m + ".weight"] = (3.0 + i) / 4 * (B.astype(np.float64) @ A)
    save_file(tensors, str(tmp_path / "t5.safetensors"))
    for got in text_deltas(tm, jm, tmp_path / "t5.safetensors", "t5"):
        for k, v in got.items():
            assert rel_l2(v, want[k]) <= BOUND if k in want else not v.any(), k


# ---------------------------------------------------------------------------------------------
# Commands: generate --lora, convert of LoRA files, parity --lora
# ---------------------------------------------------------------------------------------------


def test_generate_lora_flag(tmp_path, rng):
    from PIL import Image

    from minflux_cli.main import main

    name = "flux2-tiny"
    ad = trainer_adapters(
        name, rng, lora.targets(lora.linear_shapes(configs.get(name))), alpha=40.0
    )
    lora.save(tmp_path / "l.safetensors", ad, configs.get(name), "kohya")
    common = [
        "generate",
        "--random-weights",
        "--model",
        name,
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--no-progress",
    ]
    images = {}
    for tag, extra in (
        ("none", []),
        ("zero", ["--lora", f"{tmp_path / 'l.safetensors'}:0"]),
        ("one", ["--lora", str(tmp_path / "l.safetensors")]),
    ):
        assert main([*common, *extra, "--out", str(tmp_path / f"{tag}.png")]) == 0
        images[tag] = np.asarray(Image.open(tmp_path / f"{tag}.png"), np.int16)
    np.testing.assert_array_equal(images["zero"], images["none"])  # strength 0 is the base model
    assert np.abs(images["one"] - images["none"]).mean() > 1  # the LoRA changes the picture
    assert main([*common, "--lora", str(tmp_path / "missing.safetensors")]) == 2


def test_convert_command_on_lora_files(tmp_path, rng, tiny_checkpoint, capsys):
    from minflux_cli.main import main

    name = "flux1-tiny"
    ad = trainer_adapters(name, rng, ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1"])
    lora.save(tmp_path / "k.safetensors", ad, configs.get(name), "kohya")
    assert (
        main(
            [
                "convert",
                str(tmp_path / "k.safetensors"),
                str(tmp_path / "d.safetensors"),
                "--to",
                "diffusers",
                "--model",
                name,
            ]
        )
        == 0
    )
    assert "kohya -> diffusers" in capsys.readouterr().out
    want = {
        m + ".weight": 1.5 * (a["lora_B"].astype(np.float64) @ a["lora_A"]) for m, a in ad.items()
    }
    check(name, tmp_path / "d.safetensors", tiny_checkpoint, want)
    assert main(["convert", str(tmp_path / "k.safetensors"), str(tmp_path / "x.safetensors")]) == 2
    assert "--model" in capsys.readouterr().err


def test_parity_lora_source_merges_block_by_block(tmp_path, rng, tiny_checkpoint):
    """parity --lora's weight source (one block's keys at a time) gives the whole-model merge's tensors."""
    from minflux_cli.parity import WithLoRA
    from parity.weights import CheckpointWeights

    name = "flux1-tiny"
    path = tmp_path / "d.safetensors"
    diffusers_file(path, name, tiny_checkpoint, rng, "meta")
    tm = mt.load_model(name, tiny_checkpoint(name, "bfl"), dtype=torch.float32)
    expected = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    src = WithLoRA(
        CheckpointWeights(tiny_checkpoint(name, "bfl"), configs.get(name), expected),
        [(str(path), 0.5)],
        configs.get(name),
        expected,
    )
    want = {k: to_numpy(v) for k, v in mt.load_lora(tm, path, 0.5).state_dict().items()}
    for prefix in ("double_blocks.0.", "single_blocks.0.", "final_layer."):
        keys = [k for k in expected if k.startswith(prefix)]
        got = src.read(keys)
        assert set(got) == set(keys)
        for k in keys:
            np.testing.assert_array_equal(got[k], want[k])


def test_training_can_start_from_a_lora_file(tmp_path, rng, tiny_checkpoint):
    """`train --init-lora`: the JAX trainer's LoRA from a diffusers file (mixed ranks, partial fused parts) gives
    the weights PyTorch's merge of that file gives."""
    name = "flux1-tiny"
    path = tmp_path / "d.safetensors"
    diffusers_file(path, name, tiny_checkpoint, rng, "keys")
    spec, start = jlora.LoRA.from_file(path, configs.get(name))
    jm = mj.load_model(name, tiny_checkpoint(name, "bfl"), dtype=jnp.float32)
    frozen = {
        k: jnp.asarray(v.T if v.ndim == 2 else v) for k, v in jax_state_dict(jm).items()
    }  # Flax layout
    adapters = spec.init(None, frozen, start=start)
    got = {k: np.asarray(v) for k, v in spec.effective(frozen, adapters).items()}
    t, _, base = ours(name, path, tiny_checkpoint)
    for m in spec.modules:
        k = m + ".weight"
        assert rel_l2(got[k].T.astype(np.float64) - base[k], t[k]) <= BOUND


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_partial_file_converted_to_every_form_keeps_the_update(
    name, tmp_path, rng, tiny_checkpoint
):
    """A diffusers file with partial fused parts and mixed ranks, converted to each form: diffusers' reading of
    the original is what every converted file merges to."""
    path = tmp_path / "d.safetensors"
    diffusers_file(path, name, tiny_checkpoint, rng, "meta")
    want = reference(name, path, tiny_checkpoint)
    for fmt in lora.FORMATS:
        lora.convert_file(path, tmp_path / f"{fmt}.safetensors", fmt, configs.get(name))
        check(name, tmp_path / f"{fmt}.safetensors", tiny_checkpoint, want)


def test_bf16_file(tmp_path, rng, tiny_checkpoint):
    """A bf16 kohya file: the update is alpha / r * up @ down of the stored bf16 values, computed in fp32."""
    import ml_dtypes

    name = "flux2-tiny"
    shapes = lora.linear_shapes(configs.get(name))
    tensors, parts = {}, {}
    for m in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1"):
        A, B = (x.astype(ml_dtypes.bfloat16) for x in pair(rng, 4, shapes[m][1], shapes[m][0]))
        base = "lora_unet_" + m.replace(".", "_")
        tensors |= {
            f"{base}.lora_down.weight": A,
            f"{base}.lora_up.weight": B,
            f"{base}.alpha": np.asarray(6.0, ml_dtypes.bfloat16),
        }
        parts[m] = [(0, A.astype(np.float32), B.astype(np.float32), 6.0)]
    save_file(tensors, str(tmp_path / "bf16.safetensors"))
    check(name, tmp_path / "bf16.safetensors", tiny_checkpoint, definition(name, parts))


def test_bf16_models_merge_alike(tmp_path, rng, tiny_checkpoint):
    """bf16 models: both frameworks merge to the same bits (one float32 accumulation, one rounding), within a
    bf16 step of the fp32 merge."""
    name = "flux1-tiny"
    path = tmp_path / "d.safetensors"
    diffusers_file(path, name, tiny_checkpoint, rng, "meta")
    tm = mt.load_lora(
        mt.load_model(name, tiny_checkpoint(name, "bfl"), dtype=torch.bfloat16), path, 0.7
    )
    jm = mj.load_lora(
        mj.load_model(name, tiny_checkpoint(name, "bfl"), dtype=jnp.bfloat16), path, 0.7
    )
    t = {k: to_numpy(v) for k, v in tm.state_dict().items()}
    j = jax_state_dict(jm)
    f32, _, base = ours(name, path, tiny_checkpoint, 0.7)
    for k in t:
        assert t[k].dtype == j[k].dtype and t[k].dtype.name == "bfloat16", k
        np.testing.assert_array_equal(t[k].view(np.uint16), j[k].view(np.uint16), err_msg=k)
        assert rel_l2(t[k].astype(np.float64), base[k] + f32[k]) <= 1e-2, k


@pytest.mark.slow
def test_train_init_lora_starts_from_the_file(tmp_path):
    """`train --init-lora FILE`: with lr 0 the run exports exactly the model the file's run ended with (same base
    from the same seed, adapters from the file: its rank and modules), and writes the same adapters back."""
    from safetensors.numpy import load_file

    from minflux_cli.main import main

    common = ["train", "--steps", "2", "--batch-size", "2", "--sample-steps", "1", "--warmup", "0"]
    assert (
        main(
            common
            + ["--lora-rank", "2", "--lora-targets", "img_attn.qkv", "--out", str(tmp_path / "a")]
        )
        == 0
    )
    assert (
        main(
            common
            + [
                "--init-lora",
                str(tmp_path / "a" / "lora.safetensors"),
                "--lr",
                "0",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    moved = [k for k in a if "img_attn.qkv" in k and k.endswith("weight")]
    assert moved and a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
    la, lb = (load_file(tmp_path / run / "lora.safetensors") for run in ("a", "b"))
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_allclose(lb[k], la[k], rtol=1e-6, atol=1e-7, err_msg=k)
