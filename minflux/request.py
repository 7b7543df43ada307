"""A generation as typed values, validated once: the `Request` a command builds and
`pipeline.generate` serves, and the `Conditioning` and `Inputs` the samplers of both frameworks
take.

    Request       numpy: prompt embeddings, size, steps, guidance / true CFG, seed(s), and the
                  pictures it is conditioned on (references, init + strength, mask, control)
                  ->  `pipeline.generate`
    Conditioning  framework arrays: the same prompt and guidance, the pictures encoded to latents
                  ->  `sampling.sample`, `sample_inpaint`, `sample_kv`
    Inputs        framework arrays: tokens and position ids, the references packed
                  ->  `sampling.denoise`, `denoise_inpaint`, `denoise_kv` (BFL's `prepare`, typed)
    Batched       `Inputs` expanded to the batch, the negative prompt folded in: what a step reads

Each is frozen and checks itself when made (`ValueError` naming the field); `check_model` adds what
depends on the model (its input kind, reference count, sizes) and is the one place those rules live:
`minflux generate` runs it on its plan (images still paths, errors naming the flags) before anything
is loaded. The samplers and the pipelines still take their earlier keyword lists (`keywords`), which
build these values and warn.

Lives in the framework-free core: the arrays inside are only read for `.shape`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from minflux import configs, family, masks, schedules

# How a pixel mask becomes per-token blend weights in inpainting (`minflux.masks`): "max", a latent or
# token is repainted when any pixel of its patch is; "center" samples the mask as diffusers' inpainting
# pipelines do (FLUX.1: each latent's nearest pixel; FLUX.2: token centres).
MASK_MODES = masks.MODES

# The names errors use for the request's fields; `minflux generate` passes its flags instead.
FIELDS: Mapping[str, str] = MappingProxyType(
    {k: k for k in ("refs", "init", "mask", "control", "strength", "width", "height", "steps")}
    | {"model": "this model"}
)


def _batch(a) -> int:
    return a.shape[0]


def _check_prompt(txt, vec, neg_txt, neg_vec) -> None:
    """Prompt embeddings of any array type: txt (B, L, D), vec (B, V), negatives of batch 1 or B."""
    if len(txt.shape) != 3 or 0 in txt.shape:
        raise ValueError(f"txt: expected prompt embeddings (B, L, D), got shape {tuple(txt.shape)}")
    b = _batch(txt)
    if vec is not None and (len(vec.shape) != 2 or _batch(vec) != b):
        raise ValueError(
            f"vec: expected ({b}, D) for txt {tuple(txt.shape)}, got {tuple(vec.shape)}"
        )
    if neg_txt is None:
        if neg_vec is not None:
            raise ValueError("neg_vec needs neg_txt (the negative prompt's tokens)")
        return
    if tuple(neg_txt.shape[1:]) != tuple(txt.shape[1:]) or _batch(neg_txt) not in (1, b):
        raise ValueError(
            f"negative text {tuple(neg_txt.shape)} and text {tuple(txt.shape)} must have the "
            f"same length and width (pad both to the text encoder's max length)"
        )
    if vec is not None and neg_vec is None:
        raise ValueError("FLUX.1 true CFG needs the negative pooled vector `neg_vec` too")


def _finite(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")


def _image(name: str, a, size: tuple[int, int] | None, channels: int) -> None:
    """A numpy picture (H, W, channels), of size (width, height) when given."""
    shape = tuple(a.shape)
    if len(shape) != 3 or shape[2] != channels or (size and shape[:2] != (size[1], size[0])):
        want = f"({size[1]}, {size[0]}, {channels})" if size else f"(H, W, {channels})"
        raise ValueError(f"{name}: expected an image {want}, got shape {shape}")


@dataclass(frozen=True, kw_only=True)
class Request:
    """One generation: B prompts' embeddings, the picture's size and schedule, guidance, seed(s),
    and the images it is conditioned on. numpy throughout; images as `minflux.images.load` returns
    them. Raises ValueError naming the field when made with inconsistent values; `check` adds the
    rules that depend on the model."""

    txt: Any  # (B, L, context_in_dim) prompt embeddings, any float dtype
    vec: Any = None  # (B, 768) FLUX.1's pooled CLIP vector
    neg_txt: Any = None  # (1 or B, L, D): the negative prompt, for true CFG (`cfg_scale`)
    neg_vec: Any = None  # (1 or B, 768) FLUX.1
    width: int  # pixels
    height: int
    steps: int = 28
    guidance: float | None = None  # distilled guidance (guidance-embedded models only)
    cfg_scale: float = 1.0  # true CFG scale, with neg_txt
    # image i's noise is drawn from seed + i alone (a row is the single run of its seed) ...
    seed: int = 0
    seeds: tuple[int, ...] | None = None  # ... or from seeds[i]
    refs: tuple[Any, ...] = ()  # reference images (h, w, 3) in [-1, 1], any size (Kontext: one)
    init: Any = None  # (height, width, 3): img2img start, or the image to inpaint
    strength: float = 1.0  # img2img / inpainting: 1 = start from pure noise
    mask: Any = None  # (height, width, 1) in [0, 1], 1 = repaint; needs init
    mask_mode: str = "max"  # one of MASK_MODES
    control: Any = None  # (height, width, 3): FLUX.1 Canny / Depth control image

    def __post_init__(self):
        object.__setattr__(self, "refs", tuple(self.refs))
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(self.seeds))
        _check_prompt(self.txt, self.vec, self.neg_txt, self.neg_vec)
        for name in ("width", "height", "steps", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < (name != "seed"):
                raise ValueError(f"{name}: expected an integer >= {int(name != 'seed')}, got {v!r}")
        _finite("guidance", self.guidance, optional=True)
        _finite("cfg_scale", self.cfg_scale)
        _finite("strength", self.strength)
        if self.seeds is not None and (
            len(self.seeds) != _batch(self.txt) or any(s < 0 for s in self.seeds)
        ):
            raise ValueError(
                f"seeds: expected {_batch(self.txt)} seeds >= 0 (one per prompt), got {self.seeds}"
            )
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode: expected one of {MASK_MODES}, got {self.mask_mode!r}")
        size = (self.width, self.height)
        for name, channels in (("init", 3), ("mask", 1), ("control", 3)):
            if getattr(self, name) is not None:
                _image(name, getattr(self, name), size, channels)
        for i, ref in enumerate(self.refs):
            _image(f"refs[{i}]", ref, None, 3)
        check_inputs(self)

    @property
    def true_cfg(self) -> bool:
        """Whether each step runs a negative prompt too."""
        return self.neg_txt is not None

    @property
    def image_seeds(self) -> tuple[int, ...]:
        """The seed of each image's noise: `seeds`, else seed + i."""
        return (
            self.seeds
            if self.seeds is not None
            else tuple(self.seed + i for i in range(len(self.txt)))
        )

    def check(self, cfg, ae_cfg) -> str:
        """The model-dependent rules (`check_model`) and the embeddings' widths; returns the model's
        input kind."""
        spec = family.of(cfg)
        if self.txt.shape[-1] != cfg.context_in_dim:
            raise ValueError(
                f"txt: width {self.txt.shape[-1]}, but the model has context_in_dim "
                f"{cfg.context_in_dim}"
            )
        if spec.pooled_vec and (self.vec is None or self.vec.shape[-1] != cfg.vec_in_dim):
            got = "none" if self.vec is None else f"width {self.vec.shape[-1]}"
            raise ValueError(
                f"vec: {spec.title} takes a pooled vector of width {cfg.vec_in_dim}, got {got}"
            )
        return check_model(self, cfg, ae_cfg)


def check_mask(mask, kind: str, spec, pixels_per_token: int, mode: str, name: str = "mask") -> None:
    """A pixel mask (H, W, 1) that repaints something: a Fill model reads its pixels, other models the
    latents or tokens it marks in `mode` (`minflux.masks`). Raises ValueError naming `name` otherwise.
    `minflux generate` refuses such a mask; the library samples it (everything kept: the init image's
    autoencoder round trip)."""
    if mask is None:
        return
    if kind == "fill":
        if not mask.max() > 0:
            raise ValueError(f"{name}: nothing to repaint (no pixel is above 0; white = repaint)")
        return
    if masks.repainted(mask, spec, pixels_per_token // 2, mode) == 0:
        what = "latent" if spec.latent_patch > 1 else "token"
        hint = (
            "; mask mode 'max' repaints every patch a stroke touches"
            if mode == "center" and mask.max() > 0
            else " (white = repaint)"
        )
        raise ValueError(
            f"{name}: nothing to repaint: no {what} is marked in mask mode {mode!r}{hint}"
        )


def check_inputs(req, names: Mapping[str, str] = FIELDS) -> None:
    """The rules between a request's fields that hold for any model. `req` is a `Request`, or
    anything with its fields (`minflux generate` checks its plan, whose images are still paths);
    `names` names the fields in the messages (the command passes its flags)."""
    if req.mask is not None and req.init is None:
        raise ValueError(f"{names['mask']} needs {names['init']} IMAGE, the image to inpaint")
    if not 0.0 <= req.strength <= 1.0:
        raise ValueError(f"{names['strength']}: must be in [0, 1], got {req.strength}")


def check_model(req, cfg, ae_cfg, names: Mapping[str, str] = FIELDS) -> str:
    """The rules a request must meet for a transformer `cfg` (after any LoRA widened it) and its
    autoencoder: sides a multiple of the token size, the conditioning the model takes (Fill: init
    and mask; Canny/Depth: control), the reference count, a strength that leaves a step to run,
    klein KV's limits. `req` and `names` as in `check_inputs`. Returns the input kind ("text",
    "fill", "control"); raises ValueError."""
    check_inputs(req, names)
    spec, ppt = family.of(cfg), configs.pixels_per_token(ae_cfg)
    schedules.token_grid(req.width, req.height, ppt)
    kind = configs.input_kind(cfg, ppt)
    model, control, mask, init = names["model"], names["control"], names["mask"], names["init"]
    if kind == "control" and req.control is None:
        raise ValueError(
            f"{model} is a structural-control (Canny/Depth) model: pass {control} IMAGE, an edge "
            "map or a depth map"
        )
    if req.control is not None and kind != "control":
        raise ValueError(
            f"{control} needs a FLUX.1 Canny/Depth model (in_channels 128); {model} has "
            f"{cfg.in_channels}"
        )
    if req.mask is not None and kind == "control":
        raise ValueError(
            f"{mask}: {model} is a Canny/Depth model; inpaint with a Fill model or an ordinary one"
        )
    if kind == "fill" and (req.mask is None or req.init is None):
        raise ValueError(
            f"{model} is an inpainting (Fill) model: pass {init} IMAGE and {mask} MASK"
        )
    if spec.max_refs is not None and len(req.refs) > spec.max_refs:
        n = "one" if spec.max_refs == 1 else f"at most {spec.max_refs}"
        raise ValueError(f"{spec.refs_model} takes {n} {names['refs']} image, got {len(req.refs)}")
    if req.init is not None and kind != "fill":
        try:
            schedules.strength_start(req.steps, req.strength)
        except ValueError as e:
            raise ValueError(f"{names['strength']} {req.strength}: {e}") from None
    if cfg.ref_kv and req.refs and (req.init is not None or req.true_cfg):
        raise ValueError(
            "a klein KV model: pass reference images only (no init image, no negative prompt)"
        )
    return kind


@dataclass(frozen=True, kw_only=True)
class Conditioning:
    """What a sampler conditions the flow on, in one framework's arrays: the prompt, the guidance,
    and the images encoded by the autoencoder (NCHW in PyTorch, NHWC in JAX). References, init and
    mask of batch one serve every prompt."""

    txt: Any  # (B, L, context_in_dim)
    vec: Any = None  # (B, 768) FLUX.1
    neg_txt: Any = None  # (1 or B, L, D): true CFG with `cfg_scale`
    neg_vec: Any = None
    guidance: float | None = None  # guidance-embedded models only (others ignore it, as BFL's)
    cfg_scale: float = 1.0
    # encoded reference latents (1 or B), any size (reference i at `Family.ref_time(i)`)
    refs: tuple[Any, ...] = ()
    # FLUX.1 Fill / Canny / Depth: extra channels per image token (1 or B, L, C')
    img_cond: Any = None
    init: Any = None  # encoded latents: the img2img start, or the image to inpaint
    # the schedule starts at `schedules.strength_start(steps, strength)` with init
    strength: float = 1.0
    mask: Any = None  # pixels, 1 = repaint (1 or B, 1, H, W) / (.., H, W, 1): `sample_inpaint` only
    mask_mode: str = "max"  # one of MASK_MODES

    def __post_init__(self):
        object.__setattr__(self, "refs", tuple(self.refs))
        _check_prompt(self.txt, self.vec, self.neg_txt, self.neg_vec)
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode: expected one of {MASK_MODES}, got {self.mask_mode!r}")
        check_inputs(self)


@dataclass(frozen=True, kw_only=True)
class Inputs:
    """The model inputs every step shares (BFL's `prepare` dict, typed), one framework's arrays.
    Ids, Fill channels, references and the negative prompt may have a batch of one for any text
    batch."""

    img_ids: Any  # (B, L, axes)
    txt: Any  # (B, Lt, context_in_dim)
    txt_ids: Any  # (B, Lt, axes)
    vec: Any = None  # (B, 768) FLUX.1
    guidance: float | None = None
    cfg_scale: float = 1.0  # true CFG with neg_txt
    neg_txt: Any = None
    neg_vec: Any = None
    img_cond: Any = None  # FLUX.1 Fill / control channels, concatenated per token
    img_cond_seq: Any = None  # reference tokens (1 or B, Lr, C), appended to the sequence
    img_cond_seq_ids: Any = None  # their ids (1 or B, Lr, axes)

    def __post_init__(self):
        _check_prompt(self.txt, self.vec, self.neg_txt, self.neg_vec)
        if (self.img_cond_seq is None) != (self.img_cond_seq_ids is None):
            raise ValueError("pass both or neither of img_cond_seq and img_cond_seq_ids")


@dataclass(frozen=True, kw_only=True)
class Batched:
    """`Inputs` made ready for the loop (`sampling.conditioning`): every array expanded to the batch
    of one model call; with true CFG txt, txt_ids and vec hold [negative, positive]. guidance and
    cfg_scale are 0-d arrays, None when unused (no guidance embedder; no negative prompt)."""

    img_ids: Any
    txt: Any
    txt_ids: Any
    vec: Any = None
    guidance: Any = None
    cfg_scale: Any = None
    img_cond: Any = None
    img_cond_seq: Any = None
    img_cond_seq_ids: Any = None


# ---------------------------------------------------------------------------------------------
# The earlier keyword lists, still accepted
# ---------------------------------------------------------------------------------------------


def keywords(
    order: tuple[str, ...], typed: type, into: str, rename: Mapping[str, str] | None = None
):
    """Decorator: the function also takes its earlier, deprecated keyword form. `order` names that
    form's positional parameters; its loose keywords that are fields of `typed` (after `rename`)
    build the typed value passed as `into`, the others pass through by name. A call that already
    passes a `typed` value is unchanged."""
    fields = {f.name for f in dataclasses.fields(typed)}
    rename = dict(rename or {})

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args, **kw):
            if any(isinstance(a, typed) for a in (*args, *kw.values())):
                return fn(*args, **kw)
            if len(args) > len(order):
                raise TypeError(f"{fn.__name__}() takes at most {len(order)} positional arguments")
            given = dict(zip(order, args, strict=False))  # (fewer positionals than names)
            if given.keys() & kw.keys():
                raise TypeError(
                    f"{fn.__name__}() got multiple values for {sorted(given.keys() & kw.keys())}"
                )
            given = {rename.get(k, k): v for k, v in {**given, **kw}.items()}
            value = typed(**{k: given.pop(k) for k in list(given) if k in fields})
            warnings.warn(
                f"{fn.__name__}: loose keyword arguments are deprecated; pass a "
                f"{typed.__name__} as {into}",
                DeprecationWarning,
                stacklevel=2,
            )
            return fn(**given, **{into: value})

        return call

    return wrap


# The positional order of the samplers' earlier keyword lists (`minflux_{torch,jax}/sampling.py`).
_IDS = ("img_ids", "txt", "txt_ids", "timesteps")
_CFG = ("guidance", "cfg_scale", "neg_txt", "neg_vec")
DENOISE = (
    "model",
    "img",
    *_IDS,
    "vec",
    *_CFG,
    "img_cond",
    "img_cond_seq",
    "img_cond_seq_ids",
    "trajectory",
    "progress",
)
DENOISE_INPAINT = (
    "model",
    "img",
    *_IDS,
    "init",
    "noise",
    "mask",
    "vec",
    *_CFG,
    "img_cond_seq",
    "img_cond_seq_ids",
    "progress",
)
DENOISE_KV = ("model", "img", *_IDS, "ref", "ref_ids", "cached", "progress")
KV_NAMES = MappingProxyType(
    {"ref": "img_cond_seq", "ref_ids": "img_cond_seq_ids"}
)  # denoise_kv's earlier names
SAMPLE = (
    "model",
    "noise",
    "txt",
    "vec",
    "steps",
    *_CFG,
    "refs",
    "img_cond",
    "init",
    "strength",
    "shift",
    "progress",
)
SAMPLE_INPAINT = (
    "model",
    "noise",
    "txt",
    "init",
    "mask",
    "vec",
    "steps",
    "strength",
    *_CFG,
    "refs",
    "factor",
    "shift",
    "progress",
)
SAMPLE_KV = ("model", "noise", "txt", "refs", "steps", "cached", "progress")
