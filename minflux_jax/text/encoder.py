"""Load the FLUX text encoders from Hugging Face directories and encode prompts, in Flax NNX.

Loading is driven by the model's own abstract state (`nnx.eval_shape`): each Flax parameter gets its checkpoint
key and layout from the generic rules in `minflux.keymaps` (module class + parameter name), exactly as the
transformers load; the checks, prefixes and skipped parts are in `minflux.text.read_weights`. Twin:
`minflux_torch/text/encoder.py`.

Memory: weights are read one tensor at a time (shard by shard) and cast to `dtype` (bf16 by default) as they
arrive, so the peak is the model in `dtype` plus one tensor. Decoders build only the layers FLUX.2 reads. To free
the encoder before the transformer runs, keep only the outputs and drop the encoder (`del enc`: JAX frees device
buffers when the last reference goes), or call `encode_prompts`, which does so, or write the outputs with
`save_prompt_embeddings` in a separate process.
"""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minflux import family, keymaps, text
from minflux_jax.load import STATE, torch_keys
from minflux_jax.text.clip import CLIPTextTransformer
from minflux_jax.text.decoder import DecoderModel
from minflux_jax.text.t5 import T5EncoderModel


def build_model(
    kind: str, cfg, dtype=jnp.float32, seed: int = 0, layers: tuple[int, ...] | None = None
) -> nnx.Module:
    """The encoder module of `kind` for `cfg` (random weights, seeded)."""
    s = text.spec(kind, layers=layers)
    rngs = nnx.Rngs(seed)
    if s.arch == "t5":
        return T5EncoderModel(cfg, dtype=dtype, rngs=rngs)
    if s.arch == "clip":
        return CLIPTextTransformer(cfg, dtype=dtype, rngs=rngs)
    return DecoderModel(cfg, s.layers, dtype=dtype, rngs=rngs)


def load_model(
    kind: str, directory, dtype=jnp.bfloat16, layers: tuple[int, ...] | None = None
) -> nnx.Module:
    """An encoder from a model directory (config.json + safetensors file or shards), weights cast to `dtype`."""
    s, cfg = text.spec(kind, layers=layers), text.read_config(kind, directory)
    n_layers = text.check_layers(s, cfg, directory) if s.arch == "decoder" else None
    abstract = nnx.eval_shape(lambda: build_model(kind, cfg, dtype, 0, layers))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(nnx.state(abstract, STATE)))
    by_key = {key: (path, param) for path, (key, param) in torch_keys(abstract).items()}
    expected = {
        key: keymaps.flax_to_torch(
            np.broadcast_to(np.empty((), np.int8), flat[path].shape), param
        ).shape
        for key, (path, param) in by_key.items()
    }
    values = {}
    for key, arr in text.read_weights(directory, s, expected, n_layers):
        path, param = by_key[key]
        values[path] = jnp.asarray(keymaps.torch_to_flax(arr, param), dtype=dtype)
    for path, var in nnx.to_flat_state(state):
        var.set_value(values[path])
    return nnx.merge(graphdef, state)


@nnx.jit(static_argnums=2)
def _forward(model: nnx.Module, ids: jax.Array, arch: str, mask: jax.Array):
    if arch == "t5":
        return model(ids)
    if arch == "clip":
        return model(ids)[1]
    return model(ids, mask)


class TextEncoder:
    """One encoder and its tokenizer; `encode(prompts)` returns the FLUX input it feeds (`txt`, `vec` or `ctx`)."""

    def __init__(self, kind: str, model: nnx.Module, tokenizer: text.Tokenizer):
        self.kind, self.model, self.tokenizer, self.spec = kind, model, tokenizer, tokenizer.spec

    def tokenize(self, prompts: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), (B, max_length) int64, formatted, padded and truncated as officially."""
        return self.tokenizer(prompts)

    def encode(self, prompts: str | list[str]) -> dict[str, jax.Array]:
        ids, mask = (jnp.asarray(a, jnp.int32) for a in self.tokenize(prompts))
        out = _forward(self.model, ids, self.spec.arch, mask)
        # (B, 512, 4096) for T5, (B, 768) for CLIP, (B, 512, 3 * hidden) for decoders
        return {self.spec.output: out}


class Flux1TextEncoder:
    """CLIP-L and T5-XXL together: `encode(prompts)` -> {"txt": (B, 512, 4096), "vec": (B, 768)}."""

    def __init__(self, clip: TextEncoder, t5: TextEncoder):
        self.kind, self.clip, self.t5 = "flux1", clip, t5

    def encode(self, prompts: str | list[str]) -> dict[str, jax.Array]:
        return {**self.t5.encode(prompts), **self.clip.encode(prompts)}


def load_text_encoder(
    kind: str,
    directory,
    dtype=jnp.bfloat16,
    *,
    max_length: int | None = None,
    layers: tuple[int, ...] | None = None,
    tokenizer=None,
):
    """A text encoder of `kind` ("t5", "clip", "qwen3", "mistral", or "flux1" for CLIP + T5).

    `directory`: a model directory (config.json, *.safetensors, tokenizer.json unless `tokenizer` names another
    directory) or a diffusers repo root (text_encoder/ + tokenizer/; T5 in text_encoder_2/ + tokenizer_2/).
    `max_length`: tokens (default: the official 512, 77 for CLIP; pass 256 for FLUX.1 schnell's T5).
    `layers`: hidden_states indices stacked by decoders (default: the official ones).
    """
    parts = family.text_parts(kind)
    if len(parts) > 1:  # FLUX.1: CLIP-L (the pooled vec) and T5 (the tokens) from one repo root
        clip, t5 = parts
        return Flux1TextEncoder(
            load_text_encoder(clip, directory, dtype),
            load_text_encoder(t5, directory, dtype, max_length=max_length),
        )
    s = text.spec(kind, max_length, layers)
    model_dir, tok_dir = text.resolve_dirs(kind, directory, tokenizer)
    tok = text.Tokenizer(tok_dir, s)  # tokenizer and lengths first: fail before gigabytes are read
    text.check_length(s, text.read_config(kind, model_dir), model_dir / "config.json")
    return TextEncoder(kind, load_model(kind, model_dir, dtype, layers), tok)


def encode_prompts(
    kind: str, directory, prompts: str | list[str], dtype=jnp.bfloat16, loras=(), **kw
) -> dict[str, jax.Array]:
    """Load, encode and free the encoder before returning, so the transformer gets the memory.

    loras: (file, scale) pairs whose text-encoder parts (CLIP: `lora_te1_` / `text_encoder.`; T5: `lora_te2_` /
    `text_encoder_2.`) are merged into FLUX.1's encoders first (`load_lora(..., component=)`)."""
    enc = load_text_encoder(kind, directory, dtype, **kw)
    apply_loras(enc, loras)
    out = jax.block_until_ready(enc.encode(prompts))
    del enc
    gc.collect()
    return out


def apply_loras(enc, loras) -> None:
    """Merge the text-encoder parts of LoRA files into FLUX.1's CLIP-L and T5 (FLUX.2's decoders take none)."""
    from minflux_jax.lora import load_lora

    if loras and isinstance(enc, Flux1TextEncoder):
        for part, component in ((enc.clip, "clip"), (enc.t5, "t5")):
            load_lora(part.model, [p for p, _ in loras], [s for _, s in loras], component=component)


def save_prompt_embeddings(
    path, embeds: dict[str, jax.Array], kind: str, prompts: list[str] | None = None
) -> None:
    """Write `txt` (FLUX.1 txt or FLUX.2 ctx) and, for FLUX.1, `vec` to a safetensors file (atomic)."""
    text.save_embeddings(
        path, {k: np.asarray(jax.device_get(v)) for k, v in embeds.items()}, kind, prompts
    )
