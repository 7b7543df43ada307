"""Text-encoder discovery for the commands: which encoder a preset takes, found and checked in a
directory from its config files alone, before any weight is read. `minflux generate --prompt` and
`minflux cache` share it.

The kind follows the family table (`minflux.family`): FLUX.1 -> CLIP-L + T5 from a diffusers-style
root (`text_encoder/` + `tokenizer/` = CLIP, `text_encoder_2/` + `tokenizer_2/` = T5; T5 at 256
tokens for schnell); FLUX.2 dev -> Mistral Small 3.x; klein -> Qwen3; other FLUX.2 presets (the tiny
ones) -> whatever config.json says. FLUX.2's DIR is a model directory (config.json, safetensors,
tokenizer.json) or a root with `text_encoder/` + `tokenizer/`. Errors are `UsageError`s naming the
flag (`minflux generate`'s)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from minflux import family, text
from minflux_cli.args import UsageError
from minflux_cli.frameworks import Framework

# Deprecated: `family.get(name).autoencoder` (the autoencoder family of each transformer family).
AE_FAMILY = {name: spec.autoencoder for name, spec in family.FAMILIES.items()}


@dataclasses.dataclass(frozen=True)
class TextPlan:
    """How prompts are encoded: the encoder kind (clip+t5 "flux1", "qwen3", "mistral"), its
    directory, the prompts and negative prompts, and the encoder options (None: the official
    defaults)."""

    kind: str
    directory: Path
    prompts: tuple[str, ...]
    negatives: tuple[str, ...]
    max_length: int | None
    layers: tuple[int, ...] | None

    def encode(self, fw: Framework, loras=()) -> dict[str, np.ndarray]:
        """txt (B, L, D), vec (B, 768) for FLUX.1, and neg_txt / neg_vec for the negatives; numpy in
        the encoder's dtype. loras: (file, scale) pairs whose text-encoder parts are merged into
        FLUX.1's CLIP-L and T5 first. The encoder is freed before this returns."""
        prompts, n = list(self.prompts + self.negatives), len(self.prompts)
        try:
            out = fw.encode_prompts(
                self.kind,
                self.directory,
                prompts,
                max_length=self.max_length,
                layers=self.layers,
                loras=loras,
            )
        # (a CheckpointError, naming the file, passes through)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--text-encoder {self.directory}: {e}") from None
        emb = {}
        for k, v in out.items():
            k = "txt" if k == "ctx" else k  # FLUX.2's ctx is the transformer's txt input
            emb[k], emb["neg_" + k] = v[:n], v[n:]
        return {k: v for k, v in emb.items() if len(v)}


def encoder_kind(name: str, family_name: str, directory: Path) -> str:
    """The text encoder a preset takes (`minflux.family`): the family's only kind (FLUX.1: CLIP-L +
    T5), or the one config.json names among the family's, which must be the preset's own (FLUX.2
    dev: Mistral, klein: Qwen3) when it has one."""
    kinds = family.get(family_name).text_encoders
    if len(kinds) == 1:
        return kinds[0]
    want = family.preset(name).text_encoder
    try:
        # (the decoder kinds share the repo subfolders)
        model_dir = text.resolve_dirs(kinds[0], directory)[0]
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--text-encoder {directory}: {e}") from None
    found = next((k for k in kinds if model_type in text.SPECS[k].model_types), None)
    if want is not None and found != want:
        raise UsageError(
            f"--text-encoder {directory}: {name} takes a {want} text encoder, but "
            f"{model_dir / 'config.json'} holds model_type {model_type!r}"
        )
    if found is None:
        raise UsageError(
            f"--text-encoder {directory}: {model_dir / 'config.json'} holds model_type "
            f"{model_type!r}; {family.get(family_name).title} takes a {' or '.join(kinds)} text "
            "encoder"
        )
    return found


def _unused(directory, negatives, max_length, layers) -> None:
    """Without --prompt, the text-encoder flags are errors."""
    for flag, value in (
        ("--text-encoder", directory),
        ("--negative-prompt", negatives),
        ("--max-length", max_length),
        ("--text-encoder-layers", layers),
    ):
        if value is not None:
            raise UsageError(f"{flag} needs --prompt")


def _stacked(kind: str, layers: str | None) -> tuple[int, ...] | None:
    """--text-encoder-layers K,K,K: the decoder layers stacked (decoder text encoders only)."""
    if layers is None:
        return None
    if not any(text.SPECS[part].arch == "decoder" for part in family.text_parts(kind)):
        raise UsageError(
            "--text-encoder-layers is for FLUX.2's decoder text encoders, not CLIP + T5"
        )
    try:
        return tuple(int(k) for k in layers.split(","))
    except ValueError:
        raise UsageError(
            f"--text-encoder-layers {layers!r}: expected integers like 9,18,27"
        ) from None


def _check_part(part: str, directory: Path, name: str, cfg, max_length, stacked) -> None:
    """One encoder of the kind: its files, tokenizer, layers and length, and its output width
    against the model's input width (context_in_dim, or vec_in_dim for CLIP's pooled vector), from
    the config files alone."""
    try:
        s = text.spec(part, None if part == "clip" else max_length, stacked)
        model_dir, tok_dir = text.resolve_dirs(part, directory)
        text.tokenizer_files(tok_dir, s.arch)
        tcfg = text.read_config(part, model_dir)
        if s.arch == "decoder":
            try:
                text.check_layers(s, tcfg, model_dir / "config.json")
            except ValueError as e:
                given = "" if stacked else f" (the {name} default)"
                raise ValueError(f"{e}: choose them with --text-encoder-layers{given}") from None
        text.check_length(s, tcfg, model_dir / "config.json")
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--text-encoder {directory}: {e}") from None
    if s.arch == "decoder":
        width = len(s.layers) * tcfg.hidden_size
        how = f"{len(s.layers)} stacked layers x hidden {tcfg.hidden_size}"
    else:
        width, how = (
            (tcfg.d_model, "d_model") if s.arch == "t5" else (tcfg.hidden_size, "hidden_size")
        )
    field = "vec_in_dim" if s.output == "vec" else "context_in_dim"
    if width != getattr(cfg, field):
        raise UsageError(
            f"--text-encoder {directory}: the {part} text encoder ({model_dir}) outputs width "
            f"{width} ({how}), but {name} has {field} {getattr(cfg, field)}"
        )


def _negatives(prompts, negatives, cfg_scale: float, encode_only: bool) -> tuple[str, ...]:
    """The negative prompts: "" by default with --cfg (the official pipelines'); ignored without
    --cfg."""
    negatives = list(negatives or [])
    if cfg_scale != 1.0 and not negatives:
        negatives = [""]
    if negatives and cfg_scale == 1.0 and not encode_only:
        print("minflux generate: note: --negative-prompt is ignored without --cfg", file=sys.stderr)
        negatives = []
    if len(negatives) not in (0, 1, len(prompts)):
        raise UsageError(
            f"{len(negatives)} --negative-prompt for {len(prompts)} --prompt: pass one, or one per "
            "prompt"
        )
    return tuple(negatives)


def text_plan(
    name: str,
    cfg,
    prompts: list[str] | None,
    negatives: list[str] | None,
    directory: Path | None,
    max_length: int | None = None,
    layers: str | None = None,
    cfg_scale: float = 1.0,
    encode_only: bool = False,
) -> TextPlan | None:
    """With prompts: the text encoder's kind, directories, lengths and stacked layers, checked
    against the model (output widths against context_in_dim / vec_in_dim) from the config files
    alone, before any weight is read. None without prompts. Raises UsageError naming the flag
    (`minflux generate`'s, which `minflux cache` shares)."""
    if not prompts:
        _unused(directory, negatives, max_length, layers)
        return None
    if directory is None:
        raise UsageError(
            "--prompt needs --text-encoder DIR (or encode elsewhere and pass --embeddings)"
        )
    if not directory.is_dir():
        raise UsageError(f"--text-encoder {directory}: no such directory")
    kind = encoder_kind(name, cfg.family, directory)
    max_length = max_length or family.preset(name).max_length
    stacked = _stacked(kind, layers)
    parts = family.text_parts(kind)
    if len(parts) > 1:  # FLUX.1's CLIP-L + T5: a diffusers-style root
        missing = [
            str(directory / d / "config.json")
            for d in ("text_encoder", "text_encoder_2")
            if not (directory / d / "config.json").is_file()
        ]
        if missing:
            raise UsageError(
                f"--text-encoder {directory}: FLUX.1 takes CLIP-L and T5 from a diffusers-style "
                "root (text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/); no "
                f"{', '.join(missing)}"
            )
    for part in parts:
        _check_part(part, directory, name, cfg, max_length, stacked)
    negatives = _negatives(prompts, negatives, cfg_scale, encode_only)
    return TextPlan(kind, directory, tuple(prompts), negatives, max_length, stacked)
