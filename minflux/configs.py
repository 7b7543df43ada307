"""Model configs: one frozen dataclass per family, BFL field names, a table of presets.

Field names follow the official code (black-forest-labs/flux `FluxParams`, black-forest-labs/flux2
`Flux2Params`, `AutoEncoderParams`). rngs, dtype and device are arguments of the builders, never
config fields. Variants are made with `dataclasses.replace`, never by mutation. The configs hold
model fields only; what a family does beyond them (ids, encoders, sampling defaults, references) is
in the family table, `minflux.family`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from minflux import family


class _FromTable:
    """A deprecated alias of the family table: `FluxConfig.bias` (class or instance) reads
    `minflux.family`'s `FLUX1.bias`. Kept for code written before the table; new code reads
    `family.of(cfg)`."""

    def __set_name__(self, owner, name: str):
        self.name = name

    def __get__(self, obj, owner):
        spec = family.AUTOENCODERS.get(owner.family) or family.get(owner.family)
        return getattr(spec, self.name)


class _FamilyAliases:
    """Deprecated aliases of the family table on the transformer configs (class and instance), kept
    for code written before it: `cfg.bias` is `family.of(cfg).bias`, and so on."""

    gated_mlp = _FromTable()
    bias = _FromTable()
    shared_modulation = _FromTable()
    latent_channels = _FromTable()
    latent_patch = _FromTable()
    id_axes = _FromTable()
    text_id_axis = _FromTable()
    max_refs = _FromTable()
    inpaint_resize = _FromTable()
    inpaint_init_ref = _FromTable()
    forward_names = _FromTable()

    @classmethod
    def ref_time(cls, i: int) -> int:
        """The t position id of reference image i: `family.of(cfg).ref_time(i)`."""
        return family.get(cls.family).ref_time(i)

    @property
    def shifts_schedule(self) -> bool:
        """Whether sampling shifts the schedule: `family.of(cfg).shifts_schedule(cfg)`."""
        return family.of(self).shifts_schedule(self)

    def forward_kwargs(
        self, img, img_ids, txt, txt_ids, timesteps, vec=None, guidance=None
    ) -> dict:
        """The model's keyword arguments for inputs given in one order for both families (any array type)."""
        return family.of(self).forward_kwargs(
            (img, img_ids, txt, txt_ids, timesteps, vec, guidance)
        )


@dataclass(frozen=True)
class FluxConfig(_FamilyAliases):
    """FLUX.1 transformer (dev, schnell, Kontext, Krea, Fill, Canny, Depth)."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled
    context_in_dim: int = 4096  # T5-XXL
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    family = "flux1"  # its entry in the family table (`minflux.family`), which holds its behaviour
    ref_kv = False  # no klein KV variant (see Flux2Config.ref_kv)


@dataclass(frozen=True)
class Flux2Config(_FamilyAliases):
    """FLUX.2 transformer (dev, klein 4B/9B, distilled and base)."""

    in_channels: int = 128
    context_in_dim: int = 15360  # Mistral Small 3.x, three layers stacked
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8
    depth_single_blocks: int = 48
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 2000
    mlp_ratio: float = 3.0
    guidance_embed: bool = True
    # klein KV: reference tokens attend only to themselves and are modulated at t = 0, so their keys and values
    # are computed once (`sampling.sample_kv`); the weights are laid out as any klein's.
    ref_kv: bool = False

    family = "flux2"
    vec_in_dim = None  # no pooled text vector


@dataclass(frozen=True)
class _AutoEncoderShape:
    """The encoder/decoder shape both FLUX autoencoders share (BFL `AutoEncoderParams`)."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16

    quant_conv = _FromTable()
    batch_norm = _FromTable()


@dataclass(frozen=True)
class AutoEncoderConfig(_AutoEncoderShape):
    """FLUX.1 autoencoder: z=16, latents scaled by (z - shift) * scale."""

    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    family = "ae1"


@dataclass(frozen=True)
class AutoEncoder2Config(_AutoEncoderShape):
    """FLUX.2 autoencoder: z=32, 1x1 quant convs; latents patchified 2x2 and normalised by a frozen BatchNorm."""

    z_channels: int = 32
    patch_size: int = 2  # latents (c, 2i, 2j) -> (c*4, i, j), channel order (c pi pj)
    bn_eps: float = 1e-4

    family = "ae2"


# Deprecated: the family table (`minflux.family.FAMILIES`: name -> Family, the same attributes as before).
FAMILIES = family.FAMILIES
KIND = {
    name: spec.kind for name, spec in {**family.FAMILIES, **family.AUTOENCODERS}.items()
}  # what a family's checkpoint holds, in words


def describe(name: str | None, width: int = 0) -> str:
    """ "a FLUX.2 transformer of width 3072", "a FLUX.1 autoencoder", or "no FLUX model"
    (`family.describe`)."""
    return family.describe(name, width)


def _check(cfg) -> None:
    if isinstance(cfg, _AutoEncoderShape):
        widths = [cfg.ch * m for m in cfg.ch_mult]
        if any(w % 32 for w in widths):
            raise ValueError(
                f"{type(cfg).__name__}: channel widths {widths} must be multiples of 32 (GroupNorm)"
            )
        return
    head_dim, rem = divmod(cfg.hidden_size, cfg.num_heads)
    if rem or sum(cfg.axes_dim) != head_dim:
        raise ValueError(
            f"{type(cfg).__name__}: hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} "
            f"must be an integer head_dim equal to sum(axes_dim) = {sum(cfg.axes_dim)}"
        )
    axes = family.of(cfg).id_axes
    if len(cfg.axes_dim) != axes:
        raise ValueError(
            f"{type(cfg).__name__}: axes_dim {cfg.axes_dim} must have one entry per position-id axis ({axes})"
        )


_flux1 = FluxConfig()
_klein4b = Flux2Config(
    context_in_dim=7680,
    hidden_size=3072,
    num_heads=24,
    depth=5,
    depth_single_blocks=20,
    guidance_embed=False,
)
_klein9b = Flux2Config(
    context_in_dim=12288,
    hidden_size=4096,
    num_heads=32,
    depth=8,
    depth_single_blocks=24,
    guidance_embed=False,
)

PRESETS: dict[str, object] = {
    # FLUX.1: the dev-shaped models differ only in weights (and Fill/Canny/Depth in input width).
    "flux1-dev": _flux1,
    "flux1-schnell": dataclasses.replace(_flux1, guidance_embed=False),
    "flux1-kontext-dev": _flux1,
    "flux1-krea-dev": _flux1,
    "flux1-fill-dev": dataclasses.replace(_flux1, in_channels=384),  # 64 img + 320 mask/masked img
    "flux1-canny-dev": dataclasses.replace(_flux1, in_channels=128),  # 64 img + 64 control
    "flux1-depth-dev": dataclasses.replace(_flux1, in_channels=128),
    # FLUX.2: klein base models share the distilled models' architecture (CFG instead of distillation).
    "flux2-dev": Flux2Config(),
    "flux2-klein-4b": _klein4b,
    "flux2-klein-9b": _klein9b,
    "flux2-klein-base-4b": _klein4b,
    "flux2-klein-base-9b": _klein9b,
    "flux2-klein-9b-kv": dataclasses.replace(
        _klein9b, ref_kv=True
    ),  # diffusers Flux2KleinKVPipeline
    # Autoencoders: one per family, shared by every model of the family.
    "flux1-ae": AutoEncoderConfig(),
    "flux2-ae": AutoEncoder2Config(),
    # Tiny configs for tests and the default demo: same code paths, head_dim 32.
    "flux1-tiny": FluxConfig(
        in_channels=64,
        out_channels=64,
        vec_in_dim=24,
        context_in_dim=40,
        hidden_size=64,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(8, 12, 12),
    ),
    "flux2-tiny": Flux2Config(
        in_channels=128,
        context_in_dim=48,
        hidden_size=64,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(8, 8, 8, 8),
    ),
    "flux1-ae-tiny": AutoEncoderConfig(resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1),
    "flux2-ae-tiny": AutoEncoder2Config(resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1),
}


def pixels_per_token(ae_cfg) -> int:
    """Image pixels per transformer token side: the autoencoder's downsampling times the 2x2 packing
    (16 for the real autoencoders; 4 for the tiny ones)."""
    return 2 * 2 ** (len(ae_cfg.ch_mult) - 1)


def input_kind(cfg, pixels: int = 16) -> str:
    """What a FLUX transformer takes besides its noisy latent tokens, read off `in_channels`: "text" (text to
    image, Kontext references; FLUX.2), "fill" (FLUX.1 Fill: masked-image tokens + the mask folded into 256
    channels) or "control" (FLUX.1 Canny/Depth: control-image tokens). Raises ValueError for other widths."""
    spec = family.of(cfg)
    tokens = spec.latent_channels * spec.latent_patch**2  # channels of one image token
    widths = {
        "text": tokens,
        "control": 2 * tokens,  # + the control image's tokens
        "fill": 2 * tokens
        + 4 * (pixels // 2) ** 2,  # + masked image + mask folded (pixels/2)^2 then 2x2
    }
    kinds = {widths[k]: k for k in ("text", *spec.channel_inputs)}
    if cfg.in_channels not in kinds:
        raise ValueError(
            f"in_channels {cfg.in_channels} is none of {sorted(kinds)} "
            f"({', '.join(f'{v}: {k}' for k, v in sorted(kinds.items()))})"
        )
    return kinds[cfg.in_channels]


def names() -> list[str]:
    """Every preset name, including the tiny test presets."""
    return list(PRESETS)


def get(name: str):
    """The preset called `name`; an unknown name raises a KeyError listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown config {name!r}; valid names: {', '.join(PRESETS)}") from None


def resolve(cfg_or_name):
    """Accept a config object or a preset name."""
    cfg = get(cfg_or_name) if isinstance(cfg_or_name, str) else cfg_or_name
    _check(cfg)
    return cfg
