"""FLUX.1 Redux, the framework-free half: the SigLIP vision config, image preprocessing, files and checks.

Redux turns a picture into extra T5 tokens. black-forest-labs/flux `src/flux/modules/image_embedders.py`
(`ReduxImageEncoder`): SigLIP so400m (patch 14 at 384 px: 729 tokens of 1152) `last_hidden_state` ->
`redux_down(silu(redux_up(x)))` -> (B, 729, 4096), appended after the T5 tokens by `sampling.prepare_redux`.
diffusers `FluxPriorReduxPipeline` does the same and adds per-image scales: with several images each row
[txt; image tokens] is scaled and the rows are summed (so are the pooled CLIP vectors).

The twins `minflux_torch/redux.py` and `minflux_jax/redux.py` hold the models; this module holds what they share.
The SigLIP weights load through the text encoders' checked reader (`minflux.text.read_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minflux import text
from minflux.checkpoint import Checkpoint, CheckpointError

# The SigLIP vision tower as the official repos hold it: `vision_model.` prefix (SiglipModel, or a
# SiglipVisionModel saved by transformers 4) or none (transformers 5); the pooling head is never used.
SIGLIP = text.EncoderSpec(
    "siglip",
    "img",
    0,
    ("siglip_vision_model", "siglip"),
    subdirs=("image_encoder", "feature_extractor"),
    prefixes=("vision_model.", ""),
    anchor="embeddings.patch_embedding.weight",
    others=("vision_model.head.", "head.", "text_model.", "logit_scale", "logit_bias"),
    buffers=("embeddings.position_ids",),
)
EMBEDDER = text.EncoderSpec(
    "redux", "txt", 0, (), anchor="redux_up.weight"
)  # redux_up / redux_down, no prefix
EMBEDDER_FILES = (
    "flux1-redux-dev.safetensors",
    "image_embedder",
)  # in a Redux repo root, first found wins


@dataclass(frozen=True)
class SiglipVisionConfig:
    """SigLIP vision tower (so400m-patch14-384: 1152 wide, 27 layers, 16 heads, MLP 4304, 384 px, patch 14)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6


def read_config(directory) -> SiglipVisionConfig:
    """The SigLIP vision config from `directory/config.json` (a SiglipVisionModel or a whole SiglipModel)."""
    file = Path(directory) / "config.json"
    raw = text._load_json(file)
    if raw.get("model_type") not in SIGLIP.model_types:
        raise ValueError(
            f"{file}: model_type {raw.get('model_type')!r}, expected one of {SIGLIP.model_types}"
        )
    raw = raw.get("vision_config", raw)
    if raw.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"{file}: hidden_act {raw['hidden_act']!r}; SigLIP uses gelu_pytorch_tanh")
    names = [f for f in SiglipVisionConfig.__dataclass_fields__]
    try:
        return SiglipVisionConfig(**{k: raw[k] for k in names if k in raw})
    except TypeError as e:
        raise ValueError(f"{file}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Image preprocessing (transformers' SiglipImageProcessor, PIL backend)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessor:
    """RGB, PIL resize to `size` (bicubic), x / 255, (x - mean) / std: what `SiglipImageProcessor` does with
    the Redux repo's preprocessor_config.json (384 x 384, mean = std = 0.5)."""

    size: tuple[int, int] = (384, 384)  # (height, width)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.BICUBIC

    @classmethod
    def from_file(cls, file) -> Preprocessor:
        """From a preprocessor_config.json (missing fields keep the so400m defaults)."""
        raw = text._load_json(Path(file))
        size = raw.get("size", {})
        kw = {"size": (size["height"], size["width"])} if "height" in size else {}
        for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
            if theirs in raw:
                kw[ours] = tuple(raw[theirs])
        for k in ("rescale_factor", "resample"):
            if k in raw:
                kw[k] = raw[k]
        return cls(**kw)

    def __call__(self, images) -> np.ndarray:
        """Images (paths, PIL images or (H, W, 3) uint8 arrays) -> pixel values (B, 3, height, width) float32."""
        from PIL import Image

        out = []
        for img in [images] if isinstance(images, (str, Path, np.ndarray, Image.Image)) else images:
            img = Image.open(img) if isinstance(img, (str, Path)) else img
            img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
            img = img.convert("RGB").resize(
                self.size[::-1], resample=self.resample
            )  # PIL takes (w, h)
            x = (np.asarray(img).astype(np.float64) * self.rescale_factor).astype(np.float32)
            x = (x - np.float32(self.mean)) / np.float32(self.std)
            out.append(x.transpose(2, 0, 1))
        return np.stack(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReduxFiles:
    siglip: Path  # a directory with config.json + safetensors
    embedder: Path  # a safetensors file or a directory of them (redux_up / redux_down)
    preprocessor: Path | None  # preprocessor_config.json, if the repo has one


def resolve(directory, embedder=None) -> ReduxFiles:
    """Where the parts of Redux are: `directory` is a Redux repo root (image_encoder/, feature_extractor/, and
    flux1-redux-dev.safetensors or image_embedder/) or a SigLIP directory, then with `embedder` (a file) given."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    sub_model, sub_proc = SIGLIP.subdirs
    siglip = (
        directory / sub_model if (directory / sub_model / "config.json").is_file() else directory
    )
    if not (siglip / "config.json").is_file():
        raise FileNotFoundError(
            f"{siglip / 'config.json'}: no such file (nor {directory / sub_model}/config.json)"
        )
    if embedder is None:
        embedder = next((directory / f for f in EMBEDDER_FILES if (directory / f).exists()), None)
        if embedder is None:
            raise FileNotFoundError(
                f"{directory}: no Redux embedder ({' or '.join(EMBEDDER_FILES)}); pass it"
            )
    proc = next(
        (
            d / "preprocessor_config.json"
            for d in (directory / sub_proc, siglip, directory)
            if (d / "preprocessor_config.json").is_file()
        ),
        None,
    )
    return ReduxFiles(siglip, Path(embedder), proc)


def embedder_dims(path) -> tuple[int, int]:
    """(redux_dim, txt_in_features) of an embedder file, from `redux_up.weight` (3 * txt, redux_dim)."""
    ckpt = Checkpoint(path)
    if "redux_up.weight" not in ckpt.meta or len(ckpt.meta["redux_up.weight"][1]) != 2:
        raise CheckpointError(
            f"{ckpt.path}: not a Redux embedder: no 2-D 'redux_up.weight'; "
            f"first keys: {sorted(ckpt.meta)[:5]}"
        )
    up, redux_dim = ckpt.meta["redux_up.weight"][1]
    if up % 3:
        raise CheckpointError(
            f"{ckpt.path}: redux_up.weight has {up} rows, expected 3 * the T5 width"
        )
    return redux_dim, up // 3


def embedder_expected(redux_dim: int, txt_in_features: int) -> dict[str, tuple[int, ...]]:
    """Every key and shape of the official embedder file."""
    d = 3 * txt_in_features
    return {
        "redux_up.weight": (d, redux_dim),
        "redux_up.bias": (d,),
        "redux_down.weight": (txt_in_features, d),
        "redux_down.bias": (txt_in_features,),
    }


def scales(n: int, scale, name: str) -> list[float]:
    """A scale per image: one number for all, or a list of n (diffusers' `prompt_embeds_scale`)."""
    out = [float(scale)] * n if np.ndim(scale) == 0 else [float(s) for s in scale]
    if len(out) != n:
        raise ValueError(f"{name}: {len(out)} scales for {n} images")
    return out
