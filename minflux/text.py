"""Text encoders, the framework-free half: specs, configs, tokenisation, checkpoint checks, embedding files.

The facts follow the official pipelines:
- FLUX.1, black-forest-labs/flux `src/flux/modules/conditioner.py` and diffusers `FluxPipeline`: T5 v1.1 XXL
  `last_hidden_state` at 512 tokens (256 for schnell) -> `txt`; CLIP-L `pooler_output` at 77 tokens -> `vec`; both
  padded to max_length, truncated, and run with *no* attention mask.
- FLUX.2, black-forest-labs/flux2 `src/flux2/text_encoder.py` and diffusers `Flux2Pipeline` /
  `Flux2KleinPipeline`: a chat-formatted prompt padded to 512 tokens, run with its attention mask;
  `hidden_states[k]` for k in (10, 20, 30) (Mistral Small 3.x) or (9, 18, 27) (Qwen3) stacked and reshaped
  `B C L D -> B L (C D)` -> `ctx`. `hidden_states[k]` is the residual stream after k decoder layers, so only the
  first max(k) layers are built and loaded; the later layers, the final norm and the LM head are never read.

The twins `minflux_torch/text/` and `minflux_jax/text/` hold the models; this module holds what they share.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minflux import checkpoint
from minflux.checkpoint import Checkpoint, CheckpointError

# black-forest-labs/flux2 `system_messages.py` SYSTEM_MESSAGE (diffusers Flux2Pipeline uses the same text).
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on "
    "object relationships, object attribution and actions without speculation."
)

# Chat templates rendered to text. Qwen3: one user turn, `add_generation_prompt=True, enable_thinking=False`
# (an empty think block). Mistral Small 3.x (v7 tekken template): BOS, system prompt, one user turn, no generation
# prompt; the BOS is in the text, so the tokenizer adds no special tokens (as the processor does).
QWEN3_TEMPLATE = (
    "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
MISTRAL_TEMPLATE = "<s>[SYSTEM_PROMPT]" + SYSTEM_MESSAGE + "[/SYSTEM_PROMPT][INST]{prompt}[/INST]"


@dataclass(frozen=True)
class EncoderSpec:
    """How an official pipeline uses one text encoder."""

    arch: str  # "t5" | "clip" | "decoder"
    output: str  # the FLUX input it feeds: "txt" | "vec" | "ctx"
    max_length: int
    model_types: tuple[str, ...]  # accepted config.json model_type values
    layers: tuple[int, ...] = ()  # hidden_states indices stacked into ctx (decoders)
    template: str = "{prompt}"
    strip: tuple[str, ...] = ()  # removed from prompts before formatting
    add_special_tokens: bool = True
    subdirs: tuple[str, str] = (
        "text_encoder",
        "tokenizer",
    )  # model, tokenizer in a diffusers repo root
    # Checkpoint key prefixes the model may sit under (longest first) and the key that tells which one is used.
    prefixes: tuple[str, ...] = ("",)
    anchor: str = ""
    # Key prefixes of other parts of the checkpoint (vision tower, LM head, T5 decoder, ...): skipped unread.
    others: tuple[str, ...] = ()
    buffers: tuple[
        str, ...
    ] = ()  # non-weight tensors some checkpoints hold (under the prefix): skipped
    aliases: dict[str, str] = field(
        default_factory=dict
    )  # tied weight saved under another name -> our key


SPECS: dict[str, EncoderSpec] = {
    "t5": EncoderSpec(
        "t5",
        "txt",
        512,
        ("t5",),
        subdirs=("text_encoder_2", "tokenizer_2"),
        anchor="shared.weight",
        others=("decoder.", "lm_head."),
        aliases={"encoder.embed_tokens.weight": "shared.weight"},
    ),
    "clip": EncoderSpec(
        "clip",
        "vec",
        77,
        ("clip_text_model", "clip"),
        prefixes=("text_model.", ""),
        anchor="embeddings.token_embedding.weight",
        buffers=("embeddings.position_ids",),
        others=("vision_model.", "visual_projection.", "text_projection.", "logit_scale"),
    ),
    "qwen3": EncoderSpec(
        "decoder",
        "ctx",
        512,
        ("qwen3",),
        layers=(9, 18, 27),
        template=QWEN3_TEMPLATE,
        prefixes=("model.", ""),
        anchor="embed_tokens.weight",
        others=("lm_head.",),
    ),
    "mistral": EncoderSpec(
        "decoder",
        "ctx",
        512,
        ("mistral", "mistral3"),
        layers=(10, 20, 30),
        template=MISTRAL_TEMPLATE,
        strip=("[IMG]",),
        add_special_tokens=False,
        prefixes=("model.language_model.", "language_model.model.", "model.", ""),
        anchor="embed_tokens.weight",
        others=(
            "lm_head.",
            "language_model.lm_head.",
            "model.vision_tower.",
            "vision_tower.",
            "model.multi_modal_projector.",
            "multi_modal_projector.",
        ),
    ),
}
KINDS = (*SPECS, "flux1")  # "flux1" = CLIP-L + T5 from a FLUX.1 diffusers repo root


def spec(
    kind: str, max_length: int | None = None, layers: tuple[int, ...] | None = None
) -> EncoderSpec:
    """The spec of `kind`, optionally with another max_length (e.g. 256 for schnell) or stacked layers."""
    if kind not in SPECS:
        raise ValueError(f"unknown text encoder kind {kind!r}; expected one of {', '.join(KINDS)}")
    s = SPECS[kind]
    if max_length is not None:
        s = dataclasses.replace(s, max_length=int(max_length))
    if layers is not None:
        if s.arch != "decoder":
            raise ValueError(f"{kind}: only decoder text encoders stack layers")
        s = dataclasses.replace(s, layers=tuple(int(k) for k in layers))
    return s


# ---------------------------------------------------------------------------------------------
# Configs, read from config.json (field names are the Hugging Face ones)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class T5Config:
    """T5 v1.1 encoder (T5-XXL: d_model 4096, 64 heads of 64, d_ff 10240, 24 layers)."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text tower (CLIP-L: 768 wide, 12 layers, 12 heads, 77 positions, quick_gelu)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2  # 2 = legacy configs: pool at argmax(input_ids) (EOS has the largest id)


@dataclass(frozen=True)
class DecoderConfig:
    """Qwen3 / Mistral decoder (GQA, RoPE, RMSNorm, SwiGLU MLP; Qwen3 adds q/k RMSNorm)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    qk_norm: bool
    sliding_window: int | None = None


def _load_json(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def read_config(kind: str, directory) -> T5Config | CLIPTextConfig | DecoderConfig:
    """The model config of `kind` from `directory/config.json`; a wrong model_type raises naming the file."""
    s, file = spec(kind), Path(directory) / "config.json"
    raw = _load_json(file)
    if raw.get("model_type") not in s.model_types:
        raise ValueError(
            f"{file}: model_type {raw.get('model_type')!r}, expected one of {s.model_types} "
            f"for a {kind} text encoder"
        )
    if "text_config" in raw:  # CLIPModel, Mistral3ForConditionalGeneration: the text tower's config
        raw = raw["text_config"]
    try:
        if s.arch == "t5":
            if raw.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
                raise ValueError(
                    f"{file}: feed_forward_proj {raw['feed_forward_proj']!r}; T5 v1.1 is gated-gelu"
                )
            names = [f.name for f in T5Config.__dataclass_fields__.values()]
            return T5Config(**{k: raw[k] for k in names if k in raw})
        if s.arch == "clip":
            if raw.get("hidden_act", "quick_gelu") != "quick_gelu":
                raise ValueError(
                    f"{file}: hidden_act {raw['hidden_act']!r}; CLIP-L uses quick_gelu"
                )
            names = [f.name for f in CLIPTextConfig.__dataclass_fields__.values()]
            return CLIPTextConfig(**{k: raw[k] for k in names if k in raw})
        if raw.get("hidden_act", "silu") != "silu" or raw.get("attention_bias", False):
            raise ValueError(f"{file}: expected hidden_act silu and no attention bias")
        rope = raw.get("rope_parameters") or {}  # transformers 5 nests rope_theta here
        if (rope.get("rope_type") or "default") != "default" or raw.get("rope_scaling"):
            raise ValueError(
                f"{file}: rope scaling {rope or raw.get('rope_scaling')} is not supported"
            )
        return DecoderConfig(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10_000.0))),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            qk_norm=kind == "qwen3",
            sliding_window=raw.get("sliding_window")
            if raw.get("use_sliding_window", True)
            else None,
        )
    except KeyError as e:
        raise ValueError(f"{file}: missing field {e.args[0]!r}") from None


def check_layers(s: EncoderSpec, cfg: DecoderConfig, file) -> int:
    """Number of decoder layers to build: max(layers). hidden_states[num_hidden_layers] is the *normed* output,
    which FLUX.2 never uses, so the stacked indices must lie below it."""
    if not s.layers or min(s.layers) < 0 or max(s.layers) >= cfg.num_hidden_layers:
        raise ValueError(
            f"{file}: stacked layers {s.layers} must lie in [0, {cfg.num_hidden_layers})"
        )
    return max(s.layers)


def check_length(s: EncoderSpec, cfg, file) -> None:
    """max_length must fit CLIP's learned positions; a decoder's sliding window (if any) must not bite."""
    if isinstance(cfg, CLIPTextConfig) and s.max_length > cfg.max_position_embeddings:
        raise ValueError(
            f"{file}: max_length {s.max_length} > max_position_embeddings {cfg.max_position_embeddings}"
        )
    if isinstance(cfg, DecoderConfig) and cfg.sliding_window and s.max_length > cfg.sliding_window:
        raise ValueError(
            f"{file}: max_length {s.max_length} > sliding_window {cfg.sliding_window} (not supported)"
        )


# ---------------------------------------------------------------------------------------------
# Tokenisation (the `tokenizers` library, configured as transformers' PreTrainedTokenizerFast would be)
# ---------------------------------------------------------------------------------------------


def clip_bpe(vocab_file: Path, merges_file: Path):
    """CLIP's tokenizer built from its slow-tokenizer files (vocab.json, merges.txt), as FLUX.1 repos ship it:
    byte-level BPE with "</w>" word ends, NFC + whitespace folding + lowercasing, CLIP's word split, and
    <|startoftext|> ... <|endoftext|> around every prompt (the fast tokenizer transformers derives from them)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    vocab = _load_json(vocab_file)
    lines = merges_file.read_text(encoding="utf-8").splitlines()
    merges = [
        tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")
    ]
    if bad := [i for i, m in enumerate(merges) if len(m) != 2]:
        raise ValueError(
            f"{merges_file}: merge {bad[0]} is not two tokens: {' '.join(merges[bad[0]])!r}"
        )
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    if missing := [t for t in (bos, eos) if t not in vocab]:
        raise ValueError(f"{vocab_file}: no {missing} token(s); not a CLIP vocabulary")
    tok = Tokenizer(
        models.BPE(
            vocab,
            merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=eos,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    tok.add_special_tokens([bos, eos])
    return tok


def tokenizer_files(directory, arch: str) -> tuple[Path, ...]:
    """(tokenizer.json,) or, for CLIP only, (vocab.json, merges.txt): what `Tokenizer` reads in `directory`."""
    directory = Path(directory)
    file = directory / "tokenizer.json"
    bpe_files = directory / "vocab.json", directory / "merges.txt"
    if file.is_file():
        return (file,)
    if arch == "clip" and all(f.is_file() for f in bpe_files):
        return bpe_files
    also = " or vocab.json + merges.txt" if arch == "clip" else ""
    raise FileNotFoundError(
        f"{file}: no such file; minflux reads {arch} tokenizers from tokenizer.json{also} "
        f"(a slow tokenizer can be converted once with transformers' "
        f"AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
    )


class Tokenizer:
    """tokenizer.json (+ tokenizer_config.json for pad token and padding side) with the official prompt format;
    for CLIP also vocab.json + merges.txt, the files FLUX.1 repositories ship."""

    def __init__(self, directory, s: EncoderSpec):
        from tokenizers import Tokenizer as Backend

        directory = Path(directory)
        files = tokenizer_files(directory, s.arch)
        self.file, self.spec = files[0], s
        self.backend = Backend.from_file(str(files[0])) if len(files) == 1 else clip_bpe(*files)
        conf_file = directory / "tokenizer_config.json"
        conf = _load_json(conf_file) if conf_file.is_file() else {}
        self.padding_side = conf.get("padding_side", "right")
        pad = conf.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad is None and self.backend.padding:
            pad = self.backend.padding["pad_token"]
        if pad is None and s.arch == "clip":
            pad = "<|endoftext|>"  # CLIP's default (transformers' CLIPTokenizer), as in every FLUX.1 repo
        self.pad_id = self.backend.token_to_id(pad) if pad is not None else None
        if self.pad_id is None:
            raise ValueError(
                f"{self.file}: no pad token (set pad_token in {conf_file.name}); FLUX pads to max_length"
            )
        self.pad_token = pad
        self.backend.enable_truncation(s.max_length, direction=conf.get("truncation_side", "right"))
        self.backend.enable_padding(
            direction=self.padding_side, pad_id=self.pad_id, pad_token=pad, length=s.max_length
        )

    def format(self, prompt: str) -> str:
        for (
            token
        ) in self.spec.strip:  # Mistral: the official pipelines strip image tokens from the text
            prompt = prompt.replace(token, "")
        head, tail = self.spec.template.split("{prompt}")
        return head + prompt + tail

    def __call__(self, prompts: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (input_ids, attention_mask), both (B, max_length) int64; warns about truncated prompts."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encs = self.backend.encode_batch(
            [self.format(p) for p in prompts], add_special_tokens=self.spec.add_special_tokens
        )
        cut = [i for i, e in enumerate(encs) if e.overflowing]
        if cut:
            warnings.warn(
                f"prompt(s) {cut} longer than {self.spec.max_length} tokens were truncated, "
                f"as the official pipeline does",
                stacklevel=3,
            )
        ids = np.array([e.ids for e in encs], dtype=np.int64).reshape(
            len(prompts), self.spec.max_length
        )
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64).reshape(ids.shape)
        return ids, mask


# ---------------------------------------------------------------------------------------------
# Directories and weights
# ---------------------------------------------------------------------------------------------


def resolve_dirs(kind: str, directory, tokenizer=None) -> tuple[Path, Path]:
    """(model dir, tokenizer dir): `directory` is a model dir (config.json inside, the tokenizer beside it unless
    `tokenizer` is given) or a diffusers repo root with the spec's subfolders (text_encoder_2/tokenizer_2 for T5)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    model_dir = directory
    sub_model, sub_tok = spec(kind).subdirs
    if (
        not (directory / "config.json").is_file()
        and (directory / sub_model / "config.json").is_file()
    ):
        model_dir = directory / sub_model
        tokenizer = tokenizer if tokenizer is not None else directory / sub_tok
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir / 'config.json'}: no such file (nor {directory / sub_model}/config.json)"
        )
    return model_dir, Path(tokenizer) if tokenizer is not None else model_dir


def read_weights(
    directory, s: EncoderSpec, expected: dict[str, tuple[int, ...]], n_layers: int | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Stream the tensors of a Hugging Face checkpoint (file or shards) under the model's own key names.

    The model sits under one of the spec's prefixes; other parts of the checkpoint (its `others`), decoder layers
    from `n_layers` on and the final norm of a decoder are skipped unread. Raises CheckpointError naming the file
    for missing, unexpected or mis-shaped keys, non-float dtypes and NaN/Inf values.
    """
    ckpt = Checkpoint(directory)
    prefix = next(
        (
            p
            for p in s.prefixes
            if p + s.anchor in ckpt.meta
            or any(p + a in ckpt.meta for a, t in s.aliases.items() if t == s.anchor)
        ),
        None,
    )
    if prefix is None:
        raise CheckpointError(
            f"{ckpt.path}: not a {s.arch} text encoder checkpoint: no {s.anchor!r} under any of "
            f"the prefixes {s.prefixes}; first keys: {sorted(ckpt.meta)[:5]}"
        )
    sources, unexpected = {}, []
    for key in ckpt.meta:
        if key.startswith(s.others):
            continue
        if not key.startswith(prefix):
            unexpected.append(key)
            continue
        name = key[len(prefix) :]
        if (
            name in s.aliases and s.aliases[name] in expected
        ):  # a tied weight saved under its other name
            target = s.aliases[name]
            if prefix + target in ckpt.meta:
                continue
            name = target
        if name in expected:
            sources[name] = key
        elif not (n_layers is not None and _skippable(name, n_layers)) and name not in s.buffers:
            unexpected.append(key)
    missing = sorted(set(expected) - set(sources))
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path}: missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
            f"unexpected keys {sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    bad = [
        f"{src}: expected {expected[k]}, found {ckpt.meta[src][1]}"
        for k, src in sources.items()
        if ckpt.meta[src][1] != tuple(expected[k])
    ]
    if bad:
        raise CheckpointError(f"{ckpt.path}: shape mismatch: " + "; ".join(bad[:10]))
    for src in sources.values():
        if ckpt.meta[src][0] not in checkpoint.FLOAT_DTYPES:
            raise CheckpointError(
                f"{ckpt.files[src]}: tensor {src!r} has dtype {ckpt.meta[src][0]}, expected float"
            )
    for name, src in sources.items():
        arr = ckpt.get(src)
        checkpoint.check_finite(arr, src, ckpt.files[src])
        yield name, arr


def _skippable(name: str, n_layers: int) -> bool:
    """Decoder keys FLUX.2 never needs: layers at and after `n_layers`, and the final norm."""
    m = re.match(r"layers\.(\d+)\.", name)
    return name == "norm.weight" or (m is not None and int(m.group(1)) >= n_layers)


# ---------------------------------------------------------------------------------------------
# Prompt-embedding files (read by `minflux generate`)
# ---------------------------------------------------------------------------------------------

EMBEDDING_FORMAT = "minflux-prompt-embeddings"


def save_embeddings(
    path, embeds: dict[str, np.ndarray], kind: str, prompts: list[str] | None = None
) -> None:
    """Write `txt` (FLUX.1 txt or FLUX.2 ctx, (B, L, D)) and, for FLUX.1, `vec` ((B, 768)) as safetensors."""
    tensors = {"txt": embeds["txt"] if "txt" in embeds else embeds["ctx"]}
    if "vec" in embeds:
        tensors["vec"] = embeds["vec"]
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    meta = {"format": EMBEDDING_FORMAT, "kind": kind}
    if prompts is not None:
        meta["prompts"] = json.dumps(list(prompts), ensure_ascii=False)
    specs = {k: (checkpoint.st_dtype(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
    checkpoint.write_safetensors(path, specs, tensors.__getitem__, metadata=meta)


def load_embeddings(path) -> dict[str, np.ndarray]:
    """The tensors of a prompt-embedding file: `txt` and, for FLUX.1, `vec`."""
    ckpt = Checkpoint(path)
    if "txt" not in ckpt.meta or set(ckpt.meta) - {"txt", "vec"}:
        raise CheckpointError(
            f"{path}: a prompt-embedding file holds `txt` (and `vec`); found {sorted(ckpt.meta)}"
        )
    return {k: ckpt.get(k) for k in ckpt.meta}
