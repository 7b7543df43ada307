"""Text encoders: tokenisation and hidden states against transformers, PyTorch against JAX, loading errors.

Every model here is a tiny transformers model with seeded random weights saved in the Hugging Face layout
(config.json, *.safetensors, tokenizer.json trained in-process); nothing is downloaded. transformers is the
reference (test-only): `T5EncoderModel`, `CLIPTextModel`, `Qwen3ForCausalLM`, `MistralModel`,
`PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import json
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from flax import nnx
from safetensors.numpy import load_file, save_file
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

import minflux_jax.text as jt
import minflux_torch.text as tt
from minflux import text
from minflux.checkpoint import CheckpointError
from minflux_jax.text import encoder as jenc
from minflux_torch.load import to_numpy

transformers = pytest.importorskip("transformers")

CORPUS = [
    "a photo of a cat sitting on a park bench",
    "an astronaut riding a horse on the moon, digital art",
    "Face of a yellow cat, high resolution",
    "a red sign that says hello world in bold letters",
    text.SYSTEM_MESSAGE,
    "user assistant think",
    "naive cafe over the river",
    "0123456789 !?.,;:'\"()",
]
PROMPTS = ["a cat on a bench", "", "naïve café ✓ 日本語 🐈", "a very long prompt " * 40]
# Tiny lengths keep the tests fast; the official defaults (512, 77) are checked separately.
MAX_LEN = {"t5": 24, "clip": 16, "qwen3": 40, "mistral": 64}
LAYERS = {
    "qwen3": (1, 2, 3),
    "mistral": (1, 3, 2),
}  # a non-sorted order too: stacking follows the given order


# ---------------------------------------------------------------------------------------------
# Tiny tokenizers and models, saved as Hugging Face directories
# ---------------------------------------------------------------------------------------------


def make_tokenizer(directory, kind: str) -> int:
    """Train a small BPE tokenizer shaped like the official one of `kind`; returns its vocabulary size."""
    byte_level = kind in ("clip", "qwen3", "mistral")
    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
    tok.normalizer = normalizers.NFKC()
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:  # T5: sentencepiece-style word boundaries
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    special = {
        "t5": ["<pad>", "</s>", "<unk>"],
        "clip": [],
        "qwen3": ["<|endoftext|>"],
        "mistral": [
            "<unk>",
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[SYSTEM_PROMPT]",
            "[/SYSTEM_PROMPT]",
            "<pad>",
        ],
    }
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=special[kind],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
    )
    tok.train_from_iterator(CORPUS, trainer)
    if (
        kind == "clip"
    ):  # added last, so EOS has the largest id: CLIP-L's legacy pooling takes argmax(ids)
        tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    if kind == "qwen3":
        tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
        tok.add_tokens(["<think>", "</think>"])

    def template(single: str, *specials: str):
        return processors.TemplateProcessing(
            single=single, special_tokens=[(t, tok.token_to_id(t)) for t in specials]
        )

    if kind == "t5":
        tok.post_processor = template("$A </s>", "</s>")
    elif kind == "clip":
        tok.post_processor = template(
            "<|startoftext|> $A <|endoftext|>", "<|startoftext|>", "<|endoftext|>"
        )
    elif kind == "qwen3":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tok.post_processor = template("<s> $A", "<s>")
    tok.save(str(directory / "tokenizer.json"))
    pad = {"t5": "<pad>", "clip": "<|endoftext|>", "qwen3": "<|endoftext|>", "mistral": "<pad>"}[
        kind
    ]
    (directory / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad}))
    return tok.get_vocab_size(with_added_tokens=True)


def randomize(model: torch.nn.Module) -> None:
    """Seeded weights with some spread everywhere (norm scales near 1), so every mapping error shows."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(
                1 + 0.2 * noise if "norm" in name else 0.3 * noise / max(p.shape[-1], 1) ** 0.5 * 2
            )


def make_model(directory, kind: str, vocab: int):
    """A tiny transformers model of `kind`, saved to `directory`; returns it (fp32, eval)."""
    common = {"vocab_size": vocab}
    if kind == "t5":
        cfg = transformers.T5Config(
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            **common,
        )
        model = transformers.T5EncoderModel(cfg)
    elif kind == "clip":
        cfg = transformers.CLIPTextConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            eos_token_id=2,
            bos_token_id=0,
            pad_token_id=1,
            **common,
        )
        model = transformers.CLIPTextModel(cfg)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
            rope_theta=1000.0,
            **common,
        )
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.MistralConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            sliding_window=None,
            rms_norm_eps=1e-5,
            **common,
        )
        model = transformers.MistralModel(cfg)
    randomize(model)
    model.eval()
    model.save_pretrained(
        directory, max_shard_size="40KB" if kind == "qwen3" else "10GB"
    )  # qwen3: shards
    if (
        kind == "clip"
    ):  # the official FLUX.1 file keeps CLIPTextModel's `text_model.` prefix (+ an int64 buffer)
        file = directory / "model.safetensors"
        tensors = {f"text_model.{k}": v for k, v in load_file(file).items()}
        save_file({**tensors, "text_model.embeddings.position_ids": np.arange(77)[None]}, file)
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """kind -> (directory, transformers model, transformers tokenizer)."""
    out = {}
    for kind in ("t5", "clip", "qwen3", "mistral"):
        d = tmp_path_factory.mktemp(kind)
        vocab = make_tokenizer(d, kind)
        torch.manual_seed(0)
        out[kind] = (
            d,
            make_model(d, kind, vocab),
            transformers.PreTrainedTokenizerFast.from_pretrained(d),
        )
    return out


def load(kind, d, framework, dtype=None):
    kw = {"max_length": MAX_LEN[kind], "layers": LAYERS.get(kind)}
    if framework == "torch":
        return tt.load_text_encoder(kind, d, dtype or torch.float32, **kw)
    return jt.load_text_encoder(kind, d, dtype or jnp.float32, **kw)


@pytest.fixture(scope="module")
def encoders(hf):
    """(kind, framework) -> fp32 TextEncoder loaded from the tiny directories."""
    return {(k, f): load(k, hf[k][0], f) for k in hf for f in ("torch", "jax")}


def reference(kind, model, ids, mask) -> np.ndarray:
    """What the official pipeline takes from the transformers model."""
    with torch.no_grad():
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
        if kind == "t5":
            return model(input_ids=ids).last_hidden_state.numpy()  # FLUX passes no attention mask
        if kind == "clip":
            return model(input_ids=ids).pooler_output.numpy()
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        h = torch.stack([out.hidden_states[k] for k in LAYERS[kind]], dim=1)
        return h.permute(0, 2, 1, 3).reshape(h.shape[0], h.shape[2], -1).numpy()


def np_out(out: dict) -> np.ndarray:
    (v,) = out.values()
    return to_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v)


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["t5", "clip", "qwen3", "mistral"])
def test_tokenizer_matches_transformers(hf, encoders, kind):
    _, _, ref = hf[kind]
    enc = encoders[kind, "torch"]
    with pytest.warns(UserWarning, match=r"3\] longer than"):
        ids, mask = enc.tokenize(PROMPTS)
    formatted = [enc.tokenizer.format(p) for p in PROMPTS]
    want = ref(
        formatted,
        padding="max_length",
        truncation=True,
        max_length=MAX_LEN[kind],
        return_tensors="np",
        add_special_tokens=kind != "mistral",
    )
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    assert (
        ids.shape == (len(PROMPTS), MAX_LEN[kind]) and mask[1].sum() < mask[0].sum() < MAX_LEN[kind]
    )
    assert mask[3].all()  # the over-length prompt fills every position


def test_left_padding(hf, encoders, tmp_path):
    """padding_side "left" in tokenizer_config.json is honoured; the pads before the prompt have no key to attend
    to and come out as in transformers (zero attention output), in both frameworks."""
    d, model, _ = hf["qwen3"]
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(d / "tokenizer.json", tok_dir)
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps({"pad_token": "<|endoftext|>", "padding_side": "left"})
    )
    tok = text.Tokenizer(tok_dir, text.spec("qwen3", MAX_LEN["qwen3"], LAYERS["qwen3"]))
    with pytest.warns(UserWarning):
        ids, mask = tok(
            PROMPTS
        )  # (the batch shape of test_encoder_matches_transformers: no recompilation)
    want = transformers.PreTrainedTokenizerFast.from_pretrained(tok_dir)(
        [tok.format(p) for p in PROMPTS],
        padding="max_length",
        truncation=True,
        max_length=MAX_LEN["qwen3"],
        return_tensors="np",
    )
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    assert mask[:2, 0].sum() == 0 and mask[:, -1].all()
    ref = reference("qwen3", model, ids, mask)
    with torch.no_grad():
        got_t = (
            encoders["qwen3", "torch"].model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        )
    got_j = np.asarray(
        jenc._forward(
            encoders["qwen3", "jax"].model, jnp.asarray(ids), "decoder", jnp.asarray(mask)
        )
    )
    assert rel_l2(got_t, ref) <= 1e-5 and rel_l2(got_j, ref) <= 1e-5


def test_clip_from_vocab_and_merges_matches_transformers(tmp_path):
    """FLUX.1 repos ship CLIP's tokenizer as vocab.json + merges.txt (no tokenizer.json): read as transformers'
    CLIPTokenizer reads them, casing, whitespace, punctuation and truncation included."""
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=[bos, eos],
            show_progress=False,
            end_of_word_suffix="</w>",
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.model.save(str(tmp_path))  # vocab.json, merges.txt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    prompts = PROMPTS + [
        "A Cat,  ON the   Bench!!",
        "it's a dog's life; we're 3.14 sure",
        "tabs\tand\nnewlines",
    ]
    ours = text.Tokenizer(tmp_path, text.spec("clip", MAX_LEN["clip"]))
    with pytest.warns(UserWarning, match="longer than"):
        ids, mask = ours(prompts)
    want = transformers.CLIPTokenizer.from_pretrained(tmp_path)(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=MAX_LEN["clip"],
        return_tensors="np",
    )
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    assert ids[0, 0] == ours.backend.token_to_id(bos) and ours.pad_id == ours.backend.token_to_id(
        eos
    )

    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"merges.txt: merge 0 is not two tokens"):
        text.Tokenizer(tmp_path, text.spec("clip"))
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.json"):
        text.Tokenizer(tmp_path, text.spec("clip"))


def test_prompt_formats_and_defaults(hf):
    """The official chat formats (BFL flux2 text_encoder.py) and lengths (512, 77)."""
    d = hf["mistral"][0]
    tok = text.Tokenizer(d, text.spec("mistral"))
    assert tok.format("x[IMG]y") == (
        "<s>[SYSTEM_PROMPT]" + text.SYSTEM_MESSAGE + "[/SYSTEM_PROMPT][INST]xy[/INST]"
    )
    ids, _ = tok("a cat")
    assert (
        ids.shape == (1, 512)
        and ids[0, 0] == tok.backend.token_to_id("<s>")
        and ids[0, 1] != ids[0, 0]
    )
    qwen = text.Tokenizer(hf["qwen3"][0], text.spec("qwen3"))
    assert (
        qwen.format("a cat")
        == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert (text.spec("t5").max_length, text.spec("clip").max_length) == (512, 77)
    assert text.spec("qwen3").layers == (9, 18, 27) and text.spec("mistral").layers == (10, 20, 30)


# ---------------------------------------------------------------------------------------------
# Whole encoders against transformers, and PyTorch against JAX
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["t5", "clip", "qwen3", "mistral"])
def test_encoder_matches_transformers(hf, encoders, kind):
    _, model, _ = hf[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = encoders[kind, "torch"].tokenize(PROMPTS)
        want = reference(kind, model, ids, mask)
        got = {f: np_out(encoders[kind, f].encode(PROMPTS)) for f in ("torch", "jax")}
    dim = {"t5": 32, "clip": 32, "qwen3": 96, "mistral": 96}[kind]
    assert want.shape[-1] == dim and got["torch"].shape == want.shape
    errs = {f: rel_l2(got[f], want) for f in got}
    errs["torch-jax"] = rel_l2(got["jax"], got["torch"])
    print(kind, {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= 1e-5, errs


@pytest.fixture(scope="module")
def bf16(hf):
    """(kind, framework) -> bf16 TextEncoder."""
    return {
        (k, f): load(k, hf[k][0], f, torch.bfloat16 if f == "torch" else jnp.bfloat16)
        for k in hf
        for f in ("torch", "jax")
    }


def run_block(kind, model, x, mask, framework, dtype):
    """Block 1 of `model` (with block 0's bias for T5) on x (B, L, D) in `dtype` -> float32 numpy."""
    L = x.shape[1]
    if framework == "torch":
        from minflux_torch.text import decoder as td

        dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        x, mask = torch.from_numpy(x).to(dtype), torch.from_numpy(mask)
        with torch.no_grad():
            if kind == "t5":
                out = model.encoder.block[1](
                    x, model.encoder.block[0].layer[0].SelfAttention.compute_bias(L)
                )
            elif kind == "clip":
                out = model.encoder.layers[1](x)
            else:
                cos, sin = td.rope_cos_sin(
                    L, model.cfg.head_dim, model.cfg.rope_theta, dtype, "cpu"
                )
                out = model.layers[1](x, cos, sin, td.causal_padding_mask(mask))
        return out.float().numpy()
    dtype = jnp.float32 if dtype == "fp32" else jnp.bfloat16
    return np.asarray(_jax_block(model, jnp.asarray(x, dtype), jnp.asarray(mask), kind), np.float32)


@nnx.jit(static_argnums=3)
def _jax_block(model, x, mask, kind):  # one compilation instead of one per eager op
    from minflux_jax.text import decoder as jd

    L = x.shape[1]
    if kind == "t5":
        return model.encoder.block[1](
            x, model.encoder.block[0].layer[0].SelfAttention.compute_bias(L)
        )
    if kind == "clip":
        return model.encoder.layers[1](x)
    cos, sin = jd.rope_cos_sin(L, model.cfg.head_dim, model.cfg.rope_theta, x.dtype)
    return model.layers[1](x, cos, sin, jd.causal_padding_mask(mask))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["t5", "clip", "qwen3", "mistral"])
def test_block_torch_vs_jax(encoders, bf16, kind, dtype, rng):
    """One block of each encoder on the same random input (right-padded mask for decoders): fp32 <= 1e-5,
    bf16 <= 1e-2; T5's relative position bias must agree exactly."""
    models = encoders if dtype == "fp32" else bf16
    tm, jm = models[kind, "torch"].model, models[kind, "jax"].model
    x = rng.standard_normal((2, 10, 32)).astype(np.float32)
    mask = np.ones((2, 10), np.int64)
    mask[1, 6:] = 0
    if kind == "t5":
        bias = tm.encoder.block[0].layer[0].SelfAttention.compute_bias(40).float().numpy()
        jbias = np.asarray(jm.encoder.block[0].layer[0].SelfAttention.compute_bias(40), np.float32)
        np.testing.assert_array_equal(jbias, bias)  # same buckets, same table
    got, want = (
        run_block(kind, jm, x, mask, "jax", dtype),
        run_block(kind, tm, x, mask, "torch", dtype),
    )
    err = rel_l2(got, want)
    print(kind, dtype, f"block rel-L2 {err:.2e}")
    assert err <= (1e-5 if dtype == "fp32" else 1e-2)


@pytest.mark.parametrize("kind", ["t5", "qwen3"])
def test_bf16_whole_encoder(encoders, bf16, kind):
    """bf16 weights and activations, whole encoder: torch vs JAX and each vs the fp32 run <= 5e-2."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = {f: np_out(bf16[kind, f].encode(PROMPTS)) for f in ("torch", "jax")}
        fp32 = np_out(encoders[kind, "torch"].encode(PROMPTS))
    assert got["torch"].dtype.name == got["jax"].dtype.name == "bfloat16"
    errs = {
        "torch-jax": rel_l2(got["jax"], got["torch"]),
        "torch-fp32": rel_l2(got["torch"], fp32),
        "jax-fp32": rel_l2(got["jax"], fp32),
    }
    print(kind, {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= 5e-2, errs


# ---------------------------------------------------------------------------------------------
# FLUX.1 pair, embedding files
# ---------------------------------------------------------------------------------------------


def test_flux1_repo_and_embedding_file(hf, tmp_path):
    """A diffusers-style FLUX.1 root (text_encoder + tokenizer = CLIP, *_2 = T5) -> txt + vec -> file."""
    root = tmp_path / "flux1"
    for kind, sub in (("clip", ""), ("t5", "_2")):
        shutil.copytree(hf[kind][0], root / f"text_encoder{sub}")
        shutil.copytree(hf[kind][0], root / f"tokenizer{sub}")
    prompts = ["a cat", "a dog on the moon"]
    out = tt.load_text_encoder("flux1", root, torch.float32, max_length=MAX_LEN["t5"]).encode(
        prompts
    )
    assert out["txt"].shape == (2, MAX_LEN["t5"], 32) and out["vec"].shape == (2, 32)
    file = tmp_path / "emb.safetensors"
    tt.save_prompt_embeddings(file, out, "flux1", prompts)
    back = tt.load_embeddings(file)
    assert set(back) == {"txt", "vec"}
    np.testing.assert_array_equal(back["txt"], out["txt"].numpy())
    np.testing.assert_array_equal(back["vec"], out["vec"].numpy())
    jout = jenc.encode_prompts("flux1", root, prompts, jnp.float32, max_length=MAX_LEN["t5"])
    assert (
        rel_l2(np.asarray(jout["txt"]), back["txt"]) <= 1e-5
        and rel_l2(np.asarray(jout["vec"]), back["vec"]) <= 1e-5
    )


def test_flux2_embedding_file_is_txt(hf, encoders, tmp_path):
    with pytest.warns(UserWarning):
        out = encoders["qwen3", "jax"].encode(PROMPTS)
    jt.save_prompt_embeddings(tmp_path / "e.safetensors", out, "qwen3", PROMPTS)
    back = text.load_embeddings(tmp_path / "e.safetensors")
    assert list(back) == ["txt"]
    np.testing.assert_array_equal(back["txt"], np.asarray(out["ctx"]))


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts and bad inputs
# ---------------------------------------------------------------------------------------------


def test_mistral3_layout(hf, encoders, tmp_path):
    """FLUX.2 dev's Mistral3ForConditionalGeneration file: text model under `model.language_model.`, a vision
    tower and an LM head beside it, the text config nested in config.json."""
    src = hf["mistral"][0]
    d = tmp_path / "mistral3"
    d.mkdir()
    tensors = {
        f"model.language_model.{k}": v for k, v in load_file(src / "model.safetensors").items()
    }
    tensors["model.vision_tower.patch_conv.weight"] = np.zeros((4, 3, 2, 2), np.float32)
    tensors["lm_head.weight"] = np.zeros((8, 32), np.float32)
    save_file(tensors, d / "model.safetensors")
    (d / "config.json").write_text(
        json.dumps(
            {"model_type": "mistral3", "text_config": json.loads((src / "config.json").read_text())}
        )
    )
    enc = tt.load_text_encoder(
        "mistral",
        d,
        torch.float32,
        max_length=MAX_LEN["mistral"],
        layers=LAYERS["mistral"],
        tokenizer=src,
    )
    want = np_out(encoders["mistral", "torch"].encode(PROMPTS[:2]))
    np.testing.assert_array_equal(np_out(enc.encode(PROMPTS[:2])), want)


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_bad_inputs(hf, tmp_path, framework):
    lib = tt if framework == "torch" else jt
    src = hf["t5"][0]
    # Missing tokenizer: the error names the file.
    d = copy_model(src, tmp_path / "no_tok")
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no_tok/tokenizer\.json"):
        lib.load_text_encoder("t5", d)
    # A config that does not fit the weights: shape mismatch naming the key.
    d = copy_model(src, tmp_path / "bad_cfg")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "d_ff": 64}))
    with pytest.raises(
        CheckpointError, match=r"bad_cfg.*shape mismatch.*wi_0\.weight: expected \(64, 32\)"
    ):
        lib.load_text_encoder("t5", d)
    # Missing and unexpected keys.
    d = copy_model(src, tmp_path / "bad_keys")
    tensors = load_file(d / "model.safetensors")
    del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    tensors["encoder.block.1.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"missing keys \['encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\."
        r"weight'\].*unexpected keys \['encoder\.block\.1\.extra\.weight'\]",
    ):
        lib.load_text_encoder("t5", d)
    # The wrong kind of model for the kind asked for.
    with pytest.raises(ValueError, match=r"config\.json: model_type 't5'"):
        lib.load_text_encoder("qwen3", src)
    # Stacked layers must exist below the final norm.
    with pytest.raises(ValueError, match=r"stacked layers \(1, 5\)"):
        lib.load_text_encoder("qwen3", hf["qwen3"][0], layers=(1, 5))
    # Lengths the model cannot take.
    with pytest.raises(ValueError, match=r"max_length 78 > max_position_embeddings 77"):
        lib.load_text_encoder("clip", hf["clip"][0], max_length=78)
    # The T5 embedding saved only under its tied name still loads.
    d = copy_model(src, tmp_path / "tied")
    tensors = load_file(d / "model.safetensors")
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    save_file(tensors, d / "model.safetensors")
    if framework == "torch":
        emb = lib.load_model("t5", d, torch.float32).shared.weight.numpy()
    else:
        emb = np.asarray(lib.load_model("t5", d, jnp.float32).shared.embedding[...])
    np.testing.assert_array_equal(emb, tensors["encoder.embed_tokens.weight"])
