"""`minflux generate --prompt`: text encoders wired into generation, in both frameworks.

Tiny seeded transformers text encoders are saved in the Hugging Face layout with in-process tokenizers (the
builders of test_text.py), sized so their outputs fit the tiny presets: flux1-tiny takes T5 d_model 40 as txt and
CLIP hidden 24 as vec; flux2-tiny takes 3 stacked Qwen3 layers x hidden 16 = 48. Nothing is downloaded.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import rel_l2
from test_text import make_tokenizer, randomize

from minflux import configs, text
from minflux_cli import main as cli

transformers = pytest.importorskip("transformers")

COMMON = ["--steps", "2", "--width", "32", "--height", "32", "--dtype", "fp32", "--no-progress"]
QWEN_LAYERS = [
    "--text-encoder-layers",
    "1,2,3",
]  # the tiny Qwen3 has 4 layers, not the official 9,18,27


def make_encoder(directory, kind: str, width: int) -> None:
    """A tiny transformers encoder of `kind` whose FLUX output is `width` wide, and its tokenizer, in `directory`."""
    directory.mkdir(parents=True)
    vocab = make_tokenizer(directory, kind)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    if kind == "t5":
        model = transformers.T5EncoderModel(
            transformers.T5Config(
                vocab_size=vocab,
                d_model=width,
                d_kv=8,
                d_ff=48,
                num_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=8,
                relative_attention_max_distance=16,
            )
        )
    elif kind == "clip":
        model = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=vocab,
                hidden_size=width,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                eos_token_id=2,
                bos_token_id=0,
                pad_token_id=1,
            )
        )
    else:  # qwen3: 3 stacked layers
        model = transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(
                vocab_size=vocab,
                hidden_size=width // 3,
                intermediate_size=24,
                num_hidden_layers=4,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=128,
                rope_theta=1000.0,
            )
        )
    randomize(model)
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Text encoders (a FLUX.1 diffusers-style root, a Qwen3 model directory), transformers and autoencoders."""
    import minflux_torch as mt

    root = tmp_path_factory.mktemp("gen_text")
    f1, f2 = configs.get("flux1-tiny"), configs.get("flux2-tiny")
    make_encoder(root / "flux1" / "text_encoder", "clip", f1.vec_in_dim)
    make_encoder(root / "flux1" / "text_encoder_2", "t5", f1.context_in_dim)
    for sub in ("", "_2"):  # tokenizers in their own folders, as in the FLUX.1 repos
        tok = root / "flux1" / f"tokenizer{sub}"
        tok.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(root / "flux1" / f"text_encoder{sub}" / name, tok)
    make_encoder(root / "qwen3", "qwen3", f2.context_in_dim)
    out = {"flux1-enc": root / "flux1", "flux2-enc": root / "qwen3"}
    for name in ("flux1-tiny", "flux2-tiny", "flux1-ae-tiny", "flux2-ae-tiny"):
        out[name] = root / f"{name}.safetensors"
        mt.save_model(mt.build_model(name, seed=0), out[name])
    return out


def base(files, model: str, framework: str) -> list[str]:
    return [
        "generate",
        "--model",
        model,
        "--transformer",
        str(files[model]),
        "--ae",
        str(files[model.replace("-tiny", "-ae-tiny")]),
        "--framework",
        framework,
        *COMMON,
    ]


def encoder_args(files, model: str) -> list[str]:
    if model == "flux1-tiny":
        return ["--text-encoder", str(files["flux1-enc"]), "--max-length", "20"]
    return ["--text-encoder", str(files["flux2-enc"]), *QWEN_LAYERS, "--max-length", "40"]


def png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


@pytest.mark.parametrize("framework,model", [("torch", "flux1-tiny"), ("jax", "flux2-tiny")])
def test_prompt_to_image(files, tmp_path, framework, model):
    out = tmp_path / "cat.png"
    rc = cli.main(
        base(files, model, framework)
        + encoder_args(files, model)
        + ["--prompt", "a cat on a bench", "--out", str(out)]
    )
    assert rc == 0
    img = png(out)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 0


@pytest.mark.slow
@pytest.mark.parametrize("framework,model", [("jax", "flux1-tiny"), ("torch", "flux2-tiny")])
def test_prompt_equals_saved_embeddings(files, tmp_path, framework, model):
    """Two prompts with true CFG and a negative prompt: encoding in the run gives the same images, bit for bit,
    as encoding to files first (--save-embeddings) and generating from them (--embeddings / --neg-embeddings)."""
    prompts = [
        "--prompt",
        "a cat on a bench",
        "--prompt",
        "an astronaut riding a horse",
        "--negative-prompt",
        "blurry",
        "--cfg",
        "2.5",
    ]
    enc = encoder_args(files, model)
    assert (
        cli.main(
            base(files, model, framework) + enc + prompts + ["--out", str(tmp_path / "direct.png")]
        )
        == 0
    )
    emb = tmp_path / "emb.safetensors"
    assert (
        cli.main(
            [
                "generate",
                "--model",
                model,
                "--framework",
                framework,
                "--dtype",
                "fp32",
                *enc,
                *prompts,
                "--save-embeddings",
                str(emb),
            ]
        )
        == 0
    )
    neg = tmp_path / "emb-neg.safetensors"
    saved, saved_neg = text.load_embeddings(emb), text.load_embeddings(neg)
    cfg = configs.get(model)
    assert saved["txt"].shape[::2] == (2, cfg.context_in_dim) and saved_neg["txt"].shape[0] == 1
    assert ("vec" in saved) == (model == "flux1-tiny")
    assert (
        cli.main(
            base(files, model, framework)
            + [
                "--embeddings",
                str(emb),
                "--neg-embeddings",
                str(neg),
                "--cfg",
                "2.5",
                "--out",
                str(tmp_path / "file.png"),
            ]
        )
        == 0
    )
    for i in range(2):
        np.testing.assert_array_equal(
            png(tmp_path / f"direct-{i}.png"), png(tmp_path / f"file-{i}.png")
        )
    assert not np.array_equal(png(tmp_path / "direct-0.png"), png(tmp_path / "direct-1.png"))


def test_errors(files, tmp_path, capsys):
    """Every problem is reported before a framework runs, naming the flag, the file and the numbers."""

    def error(args) -> str:
        capsys.readouterr()
        assert cli.main(args) == 2
        return capsys.readouterr().err

    f2 = base(files, "flux2-tiny", "torch") + ["--prompt", "a cat"]
    # 2 stacked layers x hidden 16 = 32 against flux2-tiny's 48: both widths named.
    msg = error(f2 + ["--text-encoder", str(files["flux2-enc"]), "--text-encoder-layers", "1,2"])
    assert "width 32 (2 stacked layers x hidden 16)" in msg and "context_in_dim 48" in msg
    msg = error(
        base(files, "flux1-tiny", "torch")
        + ["--prompt", "a cat", "--text-encoder", str(files["flux2-enc"])]
    )
    assert (
        "FLUX.1 takes CLIP-L and T5 from a diffusers-style root" in msg
        and "text_encoder_2/config.json" in msg
    )
    assert "needs --text-encoder" in error(f2)
    assert "missing: no such file or directory" in error(
        f2 + ["--text-encoder", str(tmp_path / "missing")]
    )
    assert "exclude each other" in error(
        f2 + ["--text-encoder", str(files["flux2-enc"]), "--embeddings", str(files["flux2-tiny"])]
    )
    assert "--negative-prompt needs --prompt" in error(
        base(files, "flux2-tiny", "torch") + ["--negative-prompt", "x"]
    )
    # klein takes Qwen3: a T5 directory is refused by its model_type.
    msg = error(
        [
            "generate",
            "--model",
            "flux2-klein-4b",
            "--prompt",
            "a cat",
            "--text-encoder",
            str(files["flux1-enc"] / "text_encoder_2"),
            "--save-embeddings",
            str(tmp_path / "e.safetensors"),
        ]
    )
    assert "flux2-klein-4b takes a qwen3 text encoder" in msg and "'t5'" in msg
    # The official layers (9, 18, 27) do not exist in the tiny Qwen3.
    msg = error(f2 + ["--text-encoder", str(files["flux2-enc"])])
    assert "stacked layers (9, 18, 27)" in msg and msg.rstrip().endswith(
        "choose them with --text-encoder-layers (the flux2-tiny default)"
    )
    # A missing tokenizer is named.
    bare = tmp_path / "bare"
    shutil.copytree(files["flux2-enc"], bare)
    (bare / "tokenizer.json").unlink()
    assert f"{bare / 'tokenizer.json'}: no such file" in error(
        f2 + ["--text-encoder", str(bare), *QWEN_LAYERS]
    )
    # a FLUX.2 text encoder takes no LoRA: with --save-embeddings a --lora would do nothing
    save = [
        "--save-embeddings",
        str(tmp_path / "e.safetensors"),
        "--lora",
        str(files["flux2-tiny"]),
    ]
    enc = ["--text-encoder", str(files["flux2-enc"]), *QWEN_LAYERS]
    msg = error(["generate", "--model", "flux2-tiny", "--prompt", "a cat", *enc, *save])
    assert "--lora does not apply with --save-embeddings for flux2-tiny" in msg
    assert not (tmp_path / "e.safetensors").exists()


def test_prompt_with_a_lora_that_trains_clip(files, tmp_path):
    """A kohya file that also trains CLIP (`lora_te1_`): with --prompt, its text-encoder part
    reach the embeddings, the same numbers in both frameworks; the transformer part loads beside them."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    f1 = configs.get("flux1-tiny")
    qkv = (3 * f1.hidden_size, f1.hidden_size)
    tensors = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": rng.standard_normal((2, qkv[1])),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": rng.standard_normal((qkv[0], 2)),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": np.array(1.0),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": rng.standard_normal(
            (2, 24)
        ),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": rng.standard_normal((48, 2)),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": np.array(1.0),
    }
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, tmp_path / "lora.safetensors")
    enc = [
        "generate",
        "--model",
        "flux1-tiny",
        *encoder_args(files, "flux1-tiny"),
        "--prompt",
        "a cat",
        "--dtype",
        "fp32",
    ]
    emb = {}
    for name, extra in (
        ("plain", []),
        ("torch", ["--lora", str(tmp_path / "lora.safetensors")]),
        ("jax", ["--lora", f"{tmp_path / 'lora.safetensors'}:1.0", "--framework", "jax"]),
    ):
        assert (
            cli.main(enc + extra + ["--save-embeddings", str(tmp_path / f"{name}.safetensors")])
            == 0
        )
        emb[name] = load_file(tmp_path / f"{name}.safetensors")
    assert (
        rel_l2(emb["torch"]["vec"], emb["plain"]["vec"]) > 1e-3
    )  # the CLIP part moved the pooled vector
    assert rel_l2(emb["jax"]["vec"], emb["torch"]["vec"]) < 1e-5
    np.testing.assert_array_equal(emb["torch"]["txt"], emb["plain"]["txt"])  # the file trains no T5
