"""The family table: everything the shared code knows about a FLUX family beyond its config's model
fields.

One frozen `Family` per transformer family (FLUX.1, FLUX.2) and one `Autoencoder` per autoencoder
family hold what used to be spread over class attributes of the configs, `family == ...` branches
and per-command tables: model structure (bias, gated MLP, shared modulation), tokens and position
ids, the encoders a family takes, the sampling defaults of the official CLIs and pipelines, and how
reference and inpainting images enter. `Preset` holds the few behaviours in which presets of one
family differ (BFL's per-model CLIs: Fill, Kontext and Canny/Depth guidance, schnell's T5 length,
the text encoder a FLUX.2 preset was trained with).

Sources: black-forest-labs/flux `src/flux/sampling.py`, `cli*.py` (FLUX.1 ids, schedule, guidance
defaults, Kontext's reference at t = 1) and black-forest-labs/flux2 `src/flux2/sampling.py` (FLUX.2
ids (t, h, w, l), references at t = 10 + 10 i, reference pixel limits); diffusers' inpainting
pipelines for the mask resizing. This module is the only place that tells the families apart;
everything else reads it (`of(cfg)`, `get(name)`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Family:
    """A transformer family: what its configs do not say (they hold BFL's model fields only)."""

    name: str  # "flux1": the `family` of its configs and checkpoints
    title: str  # "FLUX.1", in messages
    # Model structure, read by the shared layers (through the configs' aliases `cfg.bias`, ...).
    gated_mlp: bool  # SwiGLU MLP (FLUX.2) or GELU(tanh) (FLUX.1)
    bias: bool  # every linear layer has a bias
    # three modulations shared by all blocks (FLUX.2) or one per block (FLUX.1)
    shared_modulation: bool
    # BFL's forward keyword names for (image tokens, image ids, text, text ids, timesteps, pooled
    # vector, guidance); None: the family has no such input.
    forward_names: tuple[str | None, ...]
    # Tokens and position ids.
    latent_channels: int  # channels of the latents the sampler draws
    latent_patch: int  # latents packed p x p into one token
    id_axes: int  # position-id axes of every token (len(axes_dim) must equal it)
    text_id_axis: int | None  # text token l has id l on this axis; None: text ids are all zero
    pooled_vec: bool  # a pooled text vector (CLIP-L's) beside the text tokens
    # Encoders.
    # its autoencoder family ("ae1" / "ae2"); presets "<name>-ae" and "<name>-ae-tiny"
    autoencoder: str
    text_encoders: tuple[str, ...]  # text-encoder kinds it takes (`minflux.text.KINDS`)
    # variants with extra input channels: "control" (Canny/Depth), "fill"
    channel_inputs: tuple[str, ...]
    # Sampling defaults, as the official CLIs / diffusers' pipelines.
    guidance: float  # distilled guidance of the guidance-embedded models
    steps: int  # steps of the undistilled models (distilled ones: `DISTILLED_STEPS`)
    # The schedule's shift: "resolution" (linear in the tokens) or "empirical" (BFL's FLUX.2 fit).
    mu: str
    shift_always: bool  # FLUX.2 always shifts; FLUX.1 only with a guidance embedder (not schnell)
    strength: float  # img2img
    inpaint_strength: float  # inpainting with an ordinary model
    # Reference images (`minflux.references` sizes them; pixels at 16 per token, the real autoencoders').
    max_refs: int | None  # None: any number
    ref_t0: int  # the t position id of reference 0 ...
    ref_dt: int  # ... and the step between references
    # "kontext": stretched to the preferred resolution of the nearest aspect ratio (`KONTEXT_RESOLUTIONS`);
    # "area": scaled down to `ref_area` pixels when larger, then centre-cropped to whole tokens.
    ref_rule: str
    ref_area: int  # pixels of a reference (Kontext's preferred resolutions are about 1024^2)
    ref_min_side: int  # a reference with a side under this many pixels is refused (0: none is)
    ref_max_aspect: float  # ... and one whose aspect ratio is over this (inf: none is)
    refs_model: str  # the model that takes references, in messages ("FLUX.1 Kontext")
    inpaint_resize: str  # pixel mask -> token grid: "nearest" (FLUX.1), "bilinear" (FLUX.2)
    inpaint_init_ref: bool  # inpainting: the init image is also the first reference (klein)
    redux: bool  # FLUX.1 Redux image tokens extend its prompts

    @property
    def kind(self) -> str:
        return f"{self.title} transformer"

    def ref_time(self, i: int) -> int:
        """The t position id of reference image i (Kontext: 1; FLUX.2 `encode_image_refs`: 10 + 10
        i)."""
        return self.ref_t0 + self.ref_dt * i

    def shifts_schedule(self, cfg) -> bool:
        """Whether sampling shifts the schedule by resolution: always for FLUX.2; for FLUX.1 the
        guidance-distilled models (dev, Kontext, ...), not schnell."""
        return self.shift_always or cfg.guidance_embed

    def forward_kwargs(self, values: tuple) -> dict:
        """The model's keyword arguments for (img, img_ids, txt, txt_ids, timesteps, vec, guidance)
        in that order."""
        return {k: v for k, v in zip(self.forward_names, values, strict=True) if k is not None}

    def takes(self, ae_cfg) -> bool:
        """Whether `ae_cfg` is an autoencoder of this family."""
        return AUTOENCODERS.get(ae_cfg.family) is AUTOENCODERS[self.autoencoder]


@dataclass(frozen=True)
class Autoencoder:
    """An autoencoder family."""

    name: str  # "ae1"
    title: str  # "FLUX.1"
    quant_conv: bool  # 1x1 quant_conv / post_quant_conv around the latent (FLUX.2)
    # Latents patchified 2x2 and normalised by a frozen BatchNorm (FLUX.2); else scale and shift.
    batch_norm: bool

    @property
    def kind(self) -> str:
        return f"{self.title} autoencoder"


@dataclass(frozen=True)
class Preset:
    """Where a preset differs from its family's defaults (None: the family's)."""

    # BFL cli_fill 30, cli_kontext 2.5, cli_control 30 (Canny) / 10 (Depth)
    guidance: float | None = None
    # takes reference images (FLUX.1: Kontext only; a tiny test preset stands for every preset of its family)
    refs: bool = True
    text_encoder: str | None = None  # the kind it was trained with; None: any of the family's
    max_length: int | None = None  # prompt tokens (schnell's T5: 256); None: the encoder's default


FLUX1 = Family(
    name="flux1",
    title="FLUX.1",
    gated_mlp=False,
    bias=True,
    shared_modulation=False,
    forward_names=("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance"),
    latent_channels=16,  # (B, 16, H/8, W/8) ...
    latent_patch=2,  # ... packed 2x2 into 64-channel tokens
    id_axes=3,  # (t, row, col)
    text_id_axis=None,
    pooled_vec=True,
    autoencoder="ae1",
    text_encoders=("flux1",),  # CLIP-L + T5-XXL
    channel_inputs=("control", "fill"),
    guidance=3.5,
    steps=28,
    mu="resolution",
    shift_always=False,
    strength=0.8,
    inpaint_strength=0.6,  # FluxInpaintPipeline
    max_refs=1,
    ref_t0=1,
    ref_dt=0,
    ref_rule="kontext",  # BFL `prepare_kontext`, diffusers `FluxKontextPipeline` (_auto_resize)
    ref_area=1024**2,
    ref_min_side=0,
    ref_max_aspect=float("inf"),
    refs_model="FLUX.1 Kontext",
    inpaint_resize="nearest",  # FluxInpaintPipeline: the mask's nearest pixel per latent
    inpaint_init_ref=False,
    redux=True,
)
FLUX2 = Family(
    name="flux2",
    title="FLUX.2",
    gated_mlp=True,
    bias=False,
    shared_modulation=True,
    forward_names=("x", "x_ids", "ctx", "ctx_ids", "timesteps", None, "guidance"),
    latent_channels=128,  # the autoencoder already patchified: (B, 128, H/16, W/16), one token each
    latent_patch=1,
    id_axes=4,  # (t, row, col, l)
    text_id_axis=3,  # text token l has ids (0, 0, 0, l)
    pooled_vec=False,
    autoencoder="ae2",
    text_encoders=("qwen3", "mistral"),  # klein: Qwen3; dev: Mistral Small 3.x
    channel_inputs=(),
    guidance=4.0,
    steps=50,
    mu="empirical",
    shift_always=True,
    strength=0.8,
    inpaint_strength=0.8,  # Flux2KleinInpaintPipeline
    max_refs=None,
    ref_t0=10,
    ref_dt=10,
    # diffusers `Flux2ImageProcessor.check_image_input` / `Flux2KleinPipeline`, BFL flux2 `default_prep`
    # (`cap_min_pixels`, `cap_pixels`; BFL allows one reference 2024^2 pixels, several 1024^2 each)
    ref_rule="area",
    ref_area=1024**2,
    ref_min_side=64,
    ref_max_aspect=8.0,
    refs_model="FLUX.2",
    # Flux2KleinInpaintPipeline: the mask resized bilinearly to the token grid
    inpaint_resize="bilinear",
    inpaint_init_ref=True,
    redux=False,
)
FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in (FLUX1, FLUX2)})
AUTOENCODERS: Mapping[str, Autoencoder] = MappingProxyType(
    {
        "ae1": Autoencoder("ae1", "FLUX.1", quant_conv=False, batch_norm=False),
        "ae2": Autoencoder("ae2", "FLUX.2", quant_conv=True, batch_norm=True),
    }
)
DISTILLED_STEPS = 4  # schnell and klein (no guidance embedder, no true CFG)

_KLEIN = Preset(text_encoder="qwen3")
PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "flux1-dev": Preset(refs=False),
        "flux1-schnell": Preset(max_length=256, refs=False),  # BFL: T5 at 256 tokens for schnell
        "flux1-kontext-dev": Preset(guidance=2.5),
        "flux1-krea-dev": Preset(refs=False),
        "flux1-fill-dev": Preset(guidance=30.0, refs=False),
        "flux1-canny-dev": Preset(guidance=30.0, refs=False),
        "flux1-depth-dev": Preset(guidance=10.0, refs=False),
        "flux2-dev": Preset(text_encoder="mistral"),
        "flux2-klein-4b": _KLEIN,
        "flux2-klein-9b": _KLEIN,
        "flux2-klein-base-4b": _KLEIN,
        "flux2-klein-base-9b": _KLEIN,
        "flux2-klein-9b-kv": _KLEIN,
    }
)

# Text-encoder kinds that load several encoders: "flux1" is CLIP-L (the pooled vec) + T5-XXL.
TEXT_PARTS: Mapping[str, tuple[str, ...]] = MappingProxyType({"flux1": ("clip", "t5")})


def get(name: str) -> Family:
    """The transformer family called `name`; ValueError for any other name."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown family {name!r}; expected {' or '.join(map(repr, FAMILIES))}"
        ) from None


def is_transformer(cfg) -> bool:
    """Whether `cfg` is a transformer config (of a family in the table)."""
    return cfg.family in FAMILIES


def is_autoencoder(cfg) -> bool:
    """Whether `cfg` is an autoencoder config."""
    return cfg.family in AUTOENCODERS


def of(cfg) -> Family:
    """The family of a transformer config; ValueError for an autoencoder config."""
    return get(cfg.family)


def describe(name: str | None, width: int = 0) -> str:
    """ "a FLUX.2 transformer of width 3072", "a FLUX.1 autoencoder", or "no FLUX model" (None)."""
    if name is None:
        return "no FLUX model"
    if name in AUTOENCODERS:
        return f"a {AUTOENCODERS[name].kind}"
    return f"a {get(name).kind}" + (f" of width {width}" if width else "")


def preset(name: str) -> Preset:
    """The preset's own behaviour (an unlisted preset, e.g. a tiny one, has only its family's)."""
    return PRESETS.get(name, Preset())


def refs_models() -> str:
    """Who takes reference images, in messages: "FLUX.1 Kontext and FLUX.2"."""
    return " and ".join(f.refs_model for f in FAMILIES.values())


def default_guidance(name: str, cfg) -> float:
    """--guidance's default: the preset's (Fill, Kontext, Canny, Depth), else the family's."""
    own = preset(name).guidance
    return own if own is not None else of(cfg).guidance


def default_steps(cfg, true_cfg: bool = False) -> int:
    """--steps' default: 4 for distilled models (no guidance embedder, no true CFG), else the
    family's."""
    return DISTILLED_STEPS if not cfg.guidance_embed and not true_cfg else of(cfg).steps


def default_strength(cfg, inpainting: bool) -> float:
    """--strength's default, as diffusers': img2img 0.8; inpainting FLUX.1 0.6, klein 0.8."""
    spec = of(cfg)
    return spec.inpaint_strength if inpainting else spec.strength


def text_parts(kind: str) -> tuple[str, ...]:
    """The single encoders a text-encoder kind loads: ("clip", "t5") for "flux1", else (kind,)."""
    return TEXT_PARTS.get(kind, (kind,))
