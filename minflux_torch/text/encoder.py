"""Load the FLUX text encoders from Hugging Face directories and encode prompts, in PyTorch.

The module attribute names are the checkpoint keys, so the weights load with `load_state_dict(strict=True)` and
no renaming (the checks, prefixes and skipped parts are in `minflux.text.read_weights`). Twin:
`minflux_jax/text/encoder.py`.

Memory: weights are read one tensor at a time (shard by shard) and cast to `dtype` (bf16 by default) as they
arrive, so the peak is the model in `dtype` plus one tensor. Decoders build only the layers FLUX.2 reads. To free
the encoder before the transformer runs, keep only the outputs and drop the encoder (`del enc`; on CUDA also
`torch.cuda.empty_cache()`), or call `encode_prompts`, which does both, or write the outputs with
`save_prompt_embeddings` in a separate process.
"""

from __future__ import annotations

import gc

import numpy as np
import torch
from torch import Tensor, nn

from minflux import family, text
from minflux_torch.load import to_numpy, to_torch
from minflux_torch.text.clip import CLIPTextTransformer
from minflux_torch.text.decoder import DecoderModel
from minflux_torch.text.t5 import T5EncoderModel


def build_model(
    kind: str,
    cfg,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device="cpu",
    layers: tuple[int, ...] | None = None,
) -> nn.Module:
    """The encoder module of `kind` for `cfg` (random weights, seeded; none on the meta device)."""
    s = text.spec(kind, layers=layers)
    torch.manual_seed(seed)
    with torch.device(device):
        if s.arch == "t5":
            model = T5EncoderModel(cfg)
        elif s.arch == "clip":
            model = CLIPTextTransformer(cfg)
        else:
            model = DecoderModel(cfg, s.layers)
    return model.to(dtype)


def load_model(
    kind: str,
    directory,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    layers: tuple[int, ...] | None = None,
) -> nn.Module:
    """An encoder from a model directory (config.json + safetensors file or shards), weights cast to `dtype`."""
    s, cfg = text.spec(kind, layers=layers), text.read_config(kind, directory)
    n_layers = text.check_layers(s, cfg, directory) if s.arch == "decoder" else None
    model = build_model(kind, cfg, dtype, 0, "meta", layers)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {
        k: to_torch(a).to(device=device, dtype=dtype)
        for k, a in text.read_weights(directory, s, expected, n_layers)
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


class TextEncoder:
    """One encoder and its tokenizer; `encode(prompts)` returns the FLUX input it feeds (`txt`, `vec` or `ctx`)."""

    def __init__(self, kind: str, model: nn.Module, tokenizer: text.Tokenizer):
        self.kind, self.model, self.tokenizer, self.spec = kind, model, tokenizer, tokenizer.spec

    def tokenize(self, prompts: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), (B, max_length) int64, formatted, padded and truncated as officially."""
        return self.tokenizer(prompts)

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> dict[str, Tensor]:
        device = next(self.model.parameters()).device
        ids, mask = (torch.from_numpy(a).to(device) for a in self.tokenize(prompts))
        if self.spec.arch == "t5":
            return {"txt": self.model(ids)}  # (B, 512, 4096)
        if self.spec.arch == "clip":
            return {"vec": self.model(ids)[1]}  # (B, 768)
        return {"ctx": self.model(ids, mask)}  # (B, 512, 3 * hidden)


class Flux1TextEncoder:
    """CLIP-L and T5-XXL together: `encode(prompts)` -> {"txt": (B, 512, 4096), "vec": (B, 768)}."""

    def __init__(self, clip: TextEncoder, t5: TextEncoder):
        self.kind, self.clip, self.t5 = "flux1", clip, t5

    def encode(self, prompts: str | list[str]) -> dict[str, Tensor]:
        return {**self.t5.encode(prompts), **self.clip.encode(prompts)}


def load_text_encoder(
    kind: str,
    directory,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
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
            load_text_encoder(clip, directory, dtype, device),
            load_text_encoder(t5, directory, dtype, device, max_length=max_length),
        )
    s = text.spec(kind, max_length, layers)
    model_dir, tok_dir = text.resolve_dirs(kind, directory, tokenizer)
    tok = text.Tokenizer(tok_dir, s)  # tokenizer and lengths first: fail before gigabytes are read
    text.check_length(s, text.read_config(kind, model_dir), model_dir / "config.json")
    return TextEncoder(kind, load_model(kind, model_dir, dtype, device, layers), tok)


def encode_prompts(
    kind: str,
    directory,
    prompts: str | list[str],
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    loras=(),
    **kw,
) -> dict[str, Tensor]:
    """Load, encode and free the encoder before returning, so the transformer gets the memory.

    loras: (file, scale) pairs whose text-encoder parts (CLIP: `lora_te1_` / `text_encoder.`; T5: `lora_te2_` /
    `text_encoder_2.`) are merged into FLUX.1's encoders first (`load_lora(..., component=)`)."""
    enc = load_text_encoder(kind, directory, dtype, device, **kw)
    apply_loras(enc, loras)
    out = enc.encode(prompts)
    del enc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def apply_loras(enc, loras) -> None:
    """Merge the text-encoder parts of LoRA files into FLUX.1's CLIP-L and T5 (FLUX.2's decoders take none)."""
    from minflux_torch.lora import load_lora

    if loras and isinstance(enc, Flux1TextEncoder):
        for part, component in ((enc.clip, "clip"), (enc.t5, "t5")):
            load_lora(part.model, [p for p, _ in loras], [s for _, s in loras], component=component)


def save_prompt_embeddings(
    path, embeds: dict[str, Tensor], kind: str, prompts: list[str] | None = None
) -> None:
    """Write `txt` (FLUX.1 txt or FLUX.2 ctx) and, for FLUX.1, `vec` to a safetensors file (atomic)."""
    text.save_embeddings(path, {k: to_numpy(v) for k, v in embeds.items()}, kind, prompts)
