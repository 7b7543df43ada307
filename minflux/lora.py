"""LoRA files as data (numpy only): read every common FLUX format, merge, write files other tools read right.

A LoRA is, per BFL module (`double_blocks.0.img_attn.qkv`, ...), a list of `Piece`s: low-rank updates
`scale * B @ A` that add to a row range of the module's weight (PyTorch layout, (out, in)). Pieces keep fused
BFL layers exact: a diffusers file adapts `to_q`, `to_k`, `to_v` (and FLUX.1's `proj_mlp`) of the fused `qkv` /
`linear1` separately, maybe only some of them, with their own ranks and alphas; each part becomes one piece on
its own rows, and absent parts add nothing. scale = alpha / r (Hu et al. 2021; PEFT's convention;
alpha / sqrt(r) for rsLoRA).

Formats read (detected from the keys; the reference for each is diffusers' own reader,
`diffusers/loaders/lora_conversion_utils.py` and `lora_pipeline.py`, v0.42):
- diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight` (prefix `transformer.`,
  `base_model.model.` or none); alpha from `.alpha` keys, else from the header's `lora_adapter_metadata`
  (diffusers' prefixed `transformer.lora_alpha`, or PEFT's bare `lora_alpha`, with `alpha_pattern` /
  `rank_pattern`, `use_rslora`), else alpha = r.
- kohya (sd-scripts): `lora_unet_<BFL module, . -> _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, and
  kohya-style keys over diffusers names (`lora_transformer_<diffusers module>`, `lora_unet_transformer_blocks_`).
- XLabs: `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`, `single_blocks.N.processor.
  {qkv,proj}_lora.*` (scale 1); the single-block `qkv_lora` adds to the first 3 * hidden rows of `linear1`.
- BFL names behind `diffusion_model.` (ai-toolkit `lora_A` / `lora_B`, ComfyUI `lora_down` / `lora_up` / `alpha`)
  or bare; BFL's control LoRAs (FLUX.1 Canny / Depth: `lora_B.bias` keys and full tensors such as the q/k norm
  scales, which replace the model's own).
Text-encoder parts (`lora_te1_` / `text_encoder.` / `text_encoders.clip_l.`: CLIP-L; `lora_te2_` / `text_encoder_2.` /
`text_encoders.t5xxl.`: T5) are read with component="clip" / "t5" for minflux's own encoders; reading the
transformer's part only counts them (one warning).
DoRA, LoKr, LoHa files raise CheckpointError naming the format.

Written (`write`): "diffusers" (what `load_lora_weights` reads), "kohya" (sd-scripts / ComfyUI, with `.alpha`),
"bfl" (`diffusion_model.` + BFL names, ai-toolkit keys). Alpha: kohya writes it as `.alpha` keys (exact);
diffusers and bfl fold alpha / r into the up matrices and write no alpha at all, so every reader (diffusers,
which ignores `.alpha` keys beside metadata and drops unprefixed metadata; ComfyUI, which ignores metadata)
applies the intended strength.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minflux import checkpoint, configs, keymaps

CheckpointError = checkpoint.CheckpointError

# Every linear layer of both attention paths and both MLPs (the usual FLUX LoRA targets).
DEFAULT_TARGETS = (r"_attn\.(qkv|proj)$", r"_mlp\.[02]$", r"linear[12]$")

# key suffix -> role of the tensor in a low-rank pair
ROLES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_down.weight": "A",
    ".lora_up.weight": "B",
    ".down.weight": "A",
    ".up.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_up.bias": "bias",
    ".alpha": "alpha",
}
PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
TEXT_PREFIXES = ("lora_te", "text_encoder.", "text_encoder_2.", "text_encoders.")
TEXT_ENCODERS = {  # minflux text encoder -> prefixes of its module names in LoRA files (kohya's end in "_")
    "clip": (
        "lora_te1_text_model_",
        "lora_te_text_model_",
        "text_encoder.text_model.",
        "text_encoders.clip_l.transformer.text_model.",
    ),
    "t5": ("lora_te2_", "text_encoder_2.", "text_encoders.t5xxl.transformer."),
}
UNSUPPORTED = {
    "DoRA": ("magnitude", "dora_scale"),
    "LoKr": ("lokr_",),
    "LoHa": ("hada_",),
    "IA3": ("ia3_l",),
}
XLABS = {  # XLabs processor name -> BFL module, and the number of rows (in hidden sizes) it adds to, if not all
    r"double_blocks\.(\d+)\.processor\.qkv_lora1": ("double_blocks.{}.img_attn.qkv", None),
    r"double_blocks\.(\d+)\.processor\.qkv_lora2": ("double_blocks.{}.txt_attn.qkv", None),
    r"double_blocks\.(\d+)\.processor\.proj_lora1": ("double_blocks.{}.img_attn.proj", None),
    r"double_blocks\.(\d+)\.processor\.proj_lora2": ("double_blocks.{}.txt_attn.proj", None),
    r"single_blocks\.(\d+)\.processor\.qkv_lora": ("single_blocks.{}.linear1", 3),  # q, k, v only
    r"single_blocks\.(\d+)\.processor\.proj_lora": ("single_blocks.{}.linear2", None),
}


@dataclass
class Piece:
    """`scale * B @ A` added to rows [start, start + B.shape[0]) of a weight; `bias` (rows,) to its bias."""

    A: np.ndarray  # (r, in)
    B: np.ndarray  # (rows, r)
    scale: float
    start: int = 0
    bias: np.ndarray | None = None

    @property
    def stop(self) -> int:
        return self.start + self.B.shape[0]

    def delta(self) -> np.ndarray:
        """scale * B @ A in float32, (rows, in)."""
        return np.float32(self.scale) * (self.B.astype(np.float32) @ self.A.astype(np.float32))


@dataclass
class LoRA:
    """One file's adapters: pieces per BFL module, full tensors that replace the model's (control LoRAs)."""

    pieces: dict[str, list[Piece]] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    format: str = "minflux"
    text_encoder: int = 0  # text-encoder modules in the file (read with component="clip" / "t5")

    def add(self, module: str, piece: Piece) -> None:
        self.pieces.setdefault(module, []).append(piece)


# ---------------------------------------------------------------------------------------------
# Module names: BFL, diffusers and kohya spellings of every linear layer, from the model's shapes
# ---------------------------------------------------------------------------------------------


def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer of a FLUX.1 / FLUX.2 transformer, by BFL name (tested against both models)."""
    h, m = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    mlp_in = 2 * m if cfg.gated_mlp else m
    per_block_mod = (
        not cfg.shared_modulation
    )  # FLUX.1: modulation in each block; FLUX.2: three shared ones
    out = {
        "img_in": (h, cfg.in_channels),
        "txt_in": (h, cfg.context_in_dim),
        "time_in.in_layer": (h, 256),
        "time_in.out_layer": (h, h),
        "final_layer.linear": (getattr(cfg, "out_channels", cfg.in_channels), h),
        "final_layer.adaLN_modulation.1": (2 * h, h),
    }
    if cfg.guidance_embed:
        out |= {"guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h)}
    if getattr(cfg, "vec_in_dim", None):
        out |= {"vector_in.in_layer": (h, cfg.vec_in_dim), "vector_in.out_layer": (h, h)}
    if cfg.shared_modulation:
        out |= {
            "double_stream_modulation_img.lin": (6 * h, h),
            "double_stream_modulation_txt.lin": (6 * h, h),
            "single_stream_modulation.lin": (3 * h, h),
        }
    for i in range(cfg.depth):
        for s in ("img", "txt"):
            out |= {
                f"double_blocks.{i}.{s}_attn.qkv": (3 * h, h),
                f"double_blocks.{i}.{s}_attn.proj": (h, h),
                f"double_blocks.{i}.{s}_mlp.0": (mlp_in, h),
                f"double_blocks.{i}.{s}_mlp.2": (h, m),
            }
            if per_block_mod:
                out[f"double_blocks.{i}.{s}_mod.lin"] = (6 * h, h)
    for i in range(cfg.depth_single_blocks):
        out |= {
            f"single_blocks.{i}.linear1": (3 * h + mlp_in, h),
            f"single_blocks.{i}.linear2": (h, h + m),
        }
        if per_block_mod:
            out[f"single_blocks.{i}.modulation.lin"] = (3 * h, h)
    return out


@dataclass(frozen=True)
class Target:
    """Where a file's module lands: a BFL module and, in order, the BFL row ranges its rows fill."""

    module: str
    segments: tuple[tuple[int, int], ...]


def names(shapes: dict[str, tuple[int, int]], family: str, hidden_size: int) -> dict[str, Target]:
    """Every spelling of every linear layer (BFL, diffusers, kohya over either) -> its Target."""
    out = {}
    for module, shape in shapes.items():
        spellings = {module: Target(module, ((0, shape[0]),))}
        for dname, recipe in keymaps.to_diffusers(
            {module + ".weight": shape}, family, hidden_size
        ).items():
            spellings[dname.removesuffix(".weight")] = Target(
                module, tuple((a, b) for _, a, b in recipe.pieces)
            )
        for name, target in spellings.items():
            out[name] = target
            out["lora_unet_" + name.replace(".", "_")] = target
            if name != module:
                out["lora_transformer_" + name.replace(".", "_")] = target
    return out


def _xlabs(name: str, hidden_size: int, shapes) -> Target | None:
    for pattern, (module, parts) in XLABS.items():
        if m := re.fullmatch(pattern, name):
            module = module.format(m.group(1))
            rows = parts * hidden_size if parts else shapes.get(module, (0,))[0]
            return Target(module, ((0, rows),))
    return None


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _split(key: str) -> tuple[str, str | None]:
    """(module, role) of a key; role None for a tensor that is not part of a low-rank pair."""
    for suffix, role in ROLES.items():
        if key.endswith(suffix):
            return key.removesuffix(suffix), role
    return key, None


def _strip(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            return _strip(key.removeprefix(p))  # `base_model.model.transformer.` and the like
    return key


def _metadata(path: Path, component: str = "transformer") -> dict:
    """PEFT config values from the header: diffusers' component-prefixed keys, or PEFT's bare ones."""
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: lora_adapter_metadata is not JSON ({e})") from None
    prefixed = {
        k.removeprefix(component + "."): v for k, v in meta.items() if k.startswith(component + ".")
    }
    return prefixed or meta


def _pattern(patterns: dict, name: str):
    """PEFT's `get_pattern_key`: the first key that matches `name` or one of its dotted suffixes."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _scale(name: str, rank: int, alpha_key, meta: dict, fmt: str) -> float:
    """alpha / r for one module: its `.alpha` key, else the PEFT metadata, else 1."""
    if alpha_key is not None:
        return float(np.asarray(alpha_key, np.float64)) / rank
    if fmt in ("diffusers", "bfl") and "lora_alpha" in meta:
        alpha = _pattern(meta.get("alpha_pattern"), name)
        alpha = float(meta["lora_alpha"] if alpha is None else alpha)
        return alpha / (rank**0.5 if meta.get("use_rslora") else rank)
    return 1.0


def detect(keys) -> str:
    """The format of a LoRA file from its keys: "xlabs", "kohya", "control", "diffusers" or "bfl"."""
    keys = [_strip(k) for k in keys if not k.startswith(TEXT_PREFIXES)]
    for fmt, marks in UNSUPPORTED.items():
        if any(m in k for k in keys for m in marks):
            return fmt
    if any(".processor." in k for k in keys):
        return "xlabs"
    if any(k.startswith(("lora_unet_", "lora_transformer_")) for k in keys):
        return "kohya"
    if any(k.endswith((".scale", ".lora_B.bias")) for k in keys):
        return "control"
    if any(
        k.startswith(
            (
                "transformer_blocks.",
                "single_transformer_blocks.",
                "x_embedder",
                "proj_out",
                "norm_out",
                "context_embedder",
                "time_text_embed",
                "time_guidance_embed",
            )
        )
        for k in keys
    ):
        return "diffusers"
    if any(_split(k)[1] for k in keys):
        return "bfl"
    return "unknown"


WIDENED = "img_in"  # the one layer a LoRA may widen: BFL's Canny / Depth LoRAs take 128 input channels, not 64


def _widens(key: str, shape: tuple, shapes: dict) -> bool:
    """Whether a full tensor is a wider `img_in` weight (more input columns, same rows)."""
    want = shapes.get(key, ())
    return (
        key == WIDENED + ".weight"
        and len(shape) == 2 == len(want)
        and shape[0] == want[0]
        and shape[1] > want[1]
    )


def input_width(loras) -> int:
    """The widest `img_in` input the LoRA(s) need (0: none); the model's `img_in` is widened to it before merging."""
    widths = [p.A.shape[1] for lora, _ in loras for p in lora.pieces.get(WIDENED, [])]
    widths += [
        t.shape[1] for lora, _ in loras for k, t in lora.tensors.items() if k == WIDENED + ".weight"
    ]
    return max(widths, default=0)


def is_lora(path) -> bool:
    """Whether a safetensors file holds LoRA pairs (from its header alone; False for a model checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        keys = checkpoint.read_header(path)
    except CheckpointError:
        return False  # the checkpoint reader reports it
    return any(_split(k)[1] in ("A", "B") for k in keys if k != "__metadata__")


def read(
    path, cfg, shapes: dict[str, tuple[int, ...]] | None = None, component: str = "transformer"
) -> LoRA:
    """Read a LoRA file in any format above into a `LoRA` keyed by BFL module (pieces keep the file's dtype).

    `shapes`: the model's PyTorch-layout parameter shapes by key (`model.state_dict()` shapes); default: the
    linear layers of `cfg`. component: "transformer", or "clip" / "t5" for the file's text-encoder parts, keyed
    by minflux's encoder module names (Hugging Face names; cfg unused). Raises CheckpointError naming the file
    and key for: a model checkpoint (no pairs), an unknown format (with its first keys), DoRA / LoKr / LoHa, a
    module the model lacks, shapes that do not fit, a half pair, NaN / Inf.
    """
    path = Path(path)
    header = checkpoint.read_header(path) if path.is_file() else {}
    found = keymaps.infer_family(header)
    if found and not any(_split(k)[1] in ("A", "B") for k in header):
        # full tensors only: a model checkpoint (merged as "control" tensors it would replace the model's own)
        width = keymaps.infer_hidden_size({k: v["shape"] for k, v in header.items()})
        raise CheckpointError(
            f"{path}: holds {configs.describe(found, width)} and no LoRA pairs (lora_A / lora_B, "
            "lora_down / lora_up): a model checkpoint, not a LoRA"
        )
    shapes = shapes or {m + ".weight": s for m, s in linear_shapes(cfg).items()}
    linear = {
        k.removesuffix(".weight"): s
        for k, s in shapes.items()
        if k.endswith(".weight") and len(s) == 2
    }
    with checkpoint.Checkpoint(path) as ck:
        raw = {k: ck.get(k) for k in ck.meta}
    text_prefixes = TEXT_ENCODERS.get(component, ())
    if text_prefixes:  # one text encoder's part of the file
        raw = {k: v for k, v in raw.items() if k.startswith(text_prefixes)}
        fmt = next(
            (f for f, marks in UNSUPPORTED.items() if any(m in k for k in raw for m in marks)),
            component,
        )
    else:
        fmt = detect(raw)
    if fmt in UNSUPPORTED:
        raise CheckpointError(
            f"{path}: a {fmt} file: only plain low-rank LoRA (A, B, alpha) is supported"
        )
    if fmt == "unknown":
        raise CheckpointError(f"{path}: unknown LoRA format; first keys: {sorted(raw)[:6]}")
    if text_prefixes:
        meta = _metadata(path, "text_encoder" if component == "clip" else "text_encoder_2")
        table = {
            p + (m.replace(".", "_") if p.endswith("_") else m): Target(m, ((0, s[0]),))
            for p in text_prefixes
            for m, s in linear.items()
        }
    else:
        meta = _metadata(path) if fmt in ("diffusers", "bfl") else {}
        table = names(linear, cfg.family, cfg.hidden_size)

    out = LoRA(format=fmt)
    groups: dict[str, dict[str, np.ndarray]] = {}
    text = set()
    for key, arr in raw.items():
        checkpoint.check_finite(arr, key, path)
        if key.startswith(TEXT_PREFIXES) and not text_prefixes:
            text.add(_split(key)[0])
            continue
        name, role = _split(key if text_prefixes else _strip(key))
        if role is None:  # a full tensor (control LoRAs): replaces the model's own
            if (
                name not in shapes
                or tuple(shapes[name]) != arr.shape
                and not _widens(name, arr.shape, shapes)
            ):
                raise CheckpointError(
                    f"{path}: {key!r} {arr.shape} is no tensor of this model "
                    f"(expected {tuple(shapes.get(name, ()))})"
                )
            out.tensors[name] = arr
            continue
        groups.setdefault(name, {})[role] = arr
    out.text_encoder = len(text)

    for name, g in groups.items():
        if "A" not in g or "B" not in g:
            raise CheckpointError(
                f"{path}: module {name!r} has {sorted(g)} but needs both halves of the pair"
            )
        A, B = g["A"], g["B"]
        target = _xlabs(name, cfg.hidden_size, linear) if fmt == "xlabs" else table.get(name)
        if target is None:
            what = component if text_prefixes else cfg.family
            raise CheckpointError(
                f"{path}: LoRA module {name!r} is no linear layer of this {what} model"
            )
        d_out, d_in = linear[target.module]
        rows = sum(b - a for a, b in target.segments)
        wide = (
            target.module == WIDENED and A.ndim == 2 and A.shape[1] > d_in
        )  # a control LoRA's wider img_in
        if (
            A.ndim != 2
            or B.ndim != 2
            or A.shape[0] != B.shape[1]
            or (A.shape[1] != d_in and not wide)
            or (B.shape[0] != rows)
        ):
            raise CheckpointError(
                f"{path}: {name!r}: A {A.shape}, B {B.shape} do not fit {target.module} "
                f"(out {d_out}, in {d_in}; this part: {rows} rows): a wrong family or width?"
            )
        scale = _scale(
            name, A.shape[0], g.get("alpha"), meta, "diffusers" if text_prefixes else fmt
        )
        lo, hi = min(a for a, _ in target.segments), max(b for _, b in target.segments)
        if (
            len(target.segments) > 1
        ):  # diffusers' final layer (scale, shift) -> BFL's (shift, scale): permute rows
            b_rows = np.empty((hi - lo, B.shape[1]), B.dtype)
            bias = None if g.get("bias") is None else np.empty(hi - lo, g["bias"].dtype)
            o = 0
            for a, b in target.segments:
                b_rows[a - lo : b - lo] = B[o : o + b - a]
                if bias is not None:
                    bias[a - lo : b - lo] = g["bias"][o : o + b - a]
                o += b - a
            B, g["bias"] = b_rows, bias
        out.add(target.module, Piece(A, B, scale, lo, g.get("bias")))
    return out


def load(
    paths, cfg, shapes=None, scales=1.0, component: str = "transformer"
) -> list[tuple[LoRA, float]]:
    """`read` each of one path or a list, paired with its strength (one float, or a list as long)."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    scales = list(scales) if isinstance(scales, list | tuple) else [scales] * len(paths)
    if len(scales) != len(paths):
        raise ValueError(f"{len(paths)} LoRA files but {len(scales)} scales")
    out = []
    for p, s in zip(paths, scales, strict=True):
        lora = read(p, cfg, shapes, component)
        if lora.text_encoder:
            warnings.warn(
                f"{p}: {lora.text_encoder} text-encoder LoRA modules not applied to the transformer "
                "(load_lora(encoder, file, component='clip' or 't5') applies them)",
                stacklevel=2,
            )
        out.append((lora, float(s)))
    return out


def parse_spec(spec: str) -> tuple[str, float]:
    """ "file.safetensors:0.5" -> ("file.safetensors", 0.5); no ":SCALE" -> scale 1.0 (`--lora FILE[:SCALE]`)."""
    path, sep, scale = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass  # a ':' inside the path, no scale
    return spec, 1.0


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------


def _pairs(loras, scale: float) -> list[tuple[LoRA, float]]:
    """One `LoRA`, the trainer's adapter dict, or a list of (LoRA, scale) pairs (`load`'s result) -> pairs."""
    if isinstance(loras, list):
        return loras
    return [(loras if isinstance(loras, LoRA) else from_adapters(loras), scale)]


def merged(
    get, keys, loras, scale: float = 1.0, strict: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """(key, merged tensor) for each model tensor the LoRA(s) change, one at a time (memory: one tensor in fp32).

    get(key): the model's PyTorch-layout tensor (numpy); keys: all of the model's keys. Pieces add
    `scale * piece.scale * B @ A` to their rows (and the bias), accumulated in float32 and cast back to the
    tensor's dtype; full tensors replace the model's (unscaled, as diffusers does), in file order. strict=False:
    `keys` may be a subset of the model (one block at a time) and adapters of the rest are skipped; otherwise a
    tensor the model lacks raises CheckpointError.
    """
    ops: dict[
        str, list
    ] = {}  # key -> ("set", tensor) / ("add", module, piece, strength, bias?), in order
    for lora, s in _pairs(loras, scale):
        for key, t in lora.tensors.items():
            ops.setdefault(key, []).append(("set", t))
        for module, pieces in lora.pieces.items():
            for p in pieces:
                ops.setdefault(module + ".weight", []).append(("add", module, p, s, False))
                if p.bias is not None:
                    ops.setdefault(module + ".bias", []).append(("add", module, p, s, True))
    keys = set(keys)
    for key, todo in ops.items():
        if key not in keys:
            if strict:
                raise CheckpointError(f"LoRA changes {key!r}, which this model does not have")
            continue
        w = get(key)
        dtype, acc = w.dtype, None
        for op in todo:
            if op[0] == "set":
                w, acc = op[1], None
                continue
            _, module, p, s, is_bias = op
            d = np.float32(p.scale) * p.bias.astype(np.float32) if is_bias else p.delta()
            if acc is None:
                acc = w.astype(np.float32)
            if d.ndim == 2 and d.shape[1] != acc.shape[1]:
                raise CheckpointError(
                    f"LoRA for {module}: {d.shape[1]} inputs, the model has {acc.shape[1]} "
                    f"(a control LoRA needs a model built with in_channels={d.shape[1]}, "
                    "e.g. flux1-canny-dev)"
                )
            acc[p.start : p.stop] += np.float32(s) * d
        yield key, (w if acc is None else acc).astype(dtype)


def merge(
    weights: dict[str, np.ndarray], loras, scale: float = 1.0, strict: bool = True
) -> dict[str, np.ndarray]:
    """PyTorch-layout weights with the LoRA(s) added (see `merged`); the whole dict, unchanged tensors as given."""
    return {**weights, **dict(merged(weights.__getitem__, weights.keys(), loras, scale, strict))}


def delta(a: dict) -> np.ndarray:
    """alpha / r * B @ A of one trainer adapter, float32, (out, in)."""
    return Piece(a["lora_A"], a["lora_B"], a["alpha"] / a["lora_A"].shape[0]).delta()


def targets(modules, patterns=DEFAULT_TARGETS) -> list[str]:
    """The module names (BFL) that any regex in `patterns` finds (re.search)."""
    found = [m for m in modules if any(re.search(p, m) for p in patterns)]
    if not found:
        raise ValueError(f"no linear layer matches the LoRA targets {list(patterns)}")
    return found


def from_adapters(adapters: dict[str, dict]) -> LoRA:
    """The trainer's `{module: {"lora_A", "lora_B", "alpha"}}` as a LoRA (one full-row piece each)."""
    out = LoRA()
    for m, a in adapters.items():
        A, B = np.asarray(a["lora_A"]), np.asarray(a["lora_B"])
        out.add(m, Piece(A, B, float(a["alpha"]) / A.shape[0]))
    return out


def fuse(pieces: list[Piece], start: int, stop: int) -> tuple[np.ndarray, np.ndarray, float] | None:
    """One (A, B, scale) whose scale * B @ A is the pieces' sum over rows [start, stop) (None: none there).

    A single piece that covers exactly those rows keeps A, B and scale bitwise; pieces sharing one A (one adapter
    written split by rows) keep that A and its rank. Otherwise A stacks the pieces' A, B is block-sparse with each
    piece's scale folded in (rank = the sum of ranks, scale 1): exact.
    """
    parts = [p for p in pieces if p.start < stop and p.stop > start]
    if not parts:
        return None
    if len(parts) == 1 and (parts[0].start, parts[0].stop) == (start, stop):
        return parts[0].A, parts[0].B, parts[0].scale
    if all(p.A.shape == parts[0].A.shape and np.array_equal(p.A, parts[0].A) for p in parts[1:]):
        # one adapter split by rows (a fused layer written as diffusers' q / k / v): its rank is kept
        B = np.zeros((stop - start, parts[0].A.shape[0]), np.float32)
        for p in parts:
            a, b = max(p.start, start), min(p.stop, stop)
            B[a - start : b - start] += p.B[a - p.start : b - p.start].astype(
                np.float32
            ) * np.float32(p.scale)
        return parts[0].A, B.astype(parts[0].B.dtype), 1.0
    rank = sum(p.A.shape[0] for p in parts)
    B = np.zeros((stop - start, rank), np.float32)
    col = 0
    for p in parts:
        a, b = max(p.start, start), min(p.stop, stop)
        B[a - start : b - start, col : col + p.A.shape[0]] = p.B[
            a - p.start : b - p.start
        ] * np.float32(p.scale)
        col += p.A.shape[0]
    A = np.concatenate([p.A.astype(np.float32) for p in parts])
    return A, B.astype(parts[0].B.dtype), 1.0


def to_adapters(lora: LoRA, shapes: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """The trainer's form of a read LoRA (`train --init-lora`): one (A, B, alpha) per module covering all rows.

    Ranks differ between modules in some files: each is padded with zero rows of A / columns of B to the
    largest (the product is unchanged; the padding stays zero in training). alpha = r (scale 1, folded in B).
    """
    fused = {m: fuse(ps, 0, shapes[m][0]) for m, ps in lora.pieces.items()}
    rank = max(A.shape[0] for A, _, _ in fused.values())
    out = {}
    for m, (A, B, s) in fused.items():
        r = A.shape[0]
        out[m] = {
            "lora_A": np.pad(A.astype(np.float32), ((0, rank - r), (0, 0))),
            "lora_B": np.pad(B.astype(np.float32) * np.float32(s), ((0, 0), (0, rank - r))),
            "alpha": float(rank),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

FORMATS = ("diffusers", "kohya", "bfl")


def to_tensors(lora: LoRA, cfg, to: str = "diffusers") -> dict[str, np.ndarray]:
    """A LoRA as the tensors of one of FORMATS (see the module docstring; scale folded where no alpha is kept)."""
    if to not in FORMATS:
        raise ValueError(f"LoRA format {to!r}: expected one of {FORMATS}")
    if lora.tensors or any(p.bias is not None for ps in lora.pieces.values() for p in ps):
        raise ValueError(
            "a control LoRA (full tensors, lora_B biases) has no other form than BFL's own file"
        )
    shapes = linear_shapes(cfg)
    out = {}
    for module, pieces in lora.pieces.items():
        if to == "diffusers":
            recipes = keymaps.to_diffusers(
                {module + ".weight": shapes[module]}, cfg.family, cfg.hidden_size
            )
            for name, recipe in recipes.items():
                if (
                    len(recipe.pieces) > 1
                ):  # the final layer: BFL (shift, scale) -> diffusers (scale, shift)
                    A, B, s = fuse(pieces, 0, shapes[module][0])
                    B = np.concatenate([B[B.shape[0] // 2 :], B[: B.shape[0] // 2]])
                else:
                    ((_, a, b),) = recipe.pieces
                    if (fused := fuse(pieces, a, b)) is None:
                        continue  # a part the file does not adapt
                    A, B, s = fused
                base = "transformer." + name.removesuffix(".weight")
                out[base + ".lora_A.weight"] = A
                out[base + ".lora_B.weight"] = (B.astype(np.float32) * np.float32(s)).astype(
                    B.dtype
                )
            continue
        A, B, s = fuse(pieces, 0, shapes[module][0])
        if to == "kohya":
            base = "lora_unet_" + module.replace(".", "_")
            out[base + ".lora_down.weight"], out[base + ".lora_up.weight"] = A, B
            out[base + ".alpha"] = np.asarray(s * A.shape[0], np.float32)
        else:
            base = "diffusion_model." + module
            out[base + ".lora_A.weight"] = A
            out[base + ".lora_B.weight"] = (B.astype(np.float32) * np.float32(s)).astype(B.dtype)
    return out


def write(path, lora: LoRA, cfg, to: str = "diffusers") -> None:
    """Write a LoRA as safetensors in `to` (FORMATS); atomic like every minflux write."""
    tensors = to_tensors(lora, cfg, to)
    specs = {k: (checkpoint.st_dtype(v.dtype), v.shape) for k, v in tensors.items()}
    checkpoint.write_safetensors(path, specs, tensors.__getitem__, metadata={"format": "pt"})


def save(path, adapters: dict[str, dict], cfg, fmt: str = "diffusers") -> None:
    """Write the trainer's adapters (`{module: {"lora_A", "lora_B", "alpha"}}`) in `fmt` (FORMATS)."""
    write(path, from_adapters(adapters), cfg, fmt)


def convert_file(src, dst, to: str, cfg) -> LoRA:
    """Read a LoRA file in any format and write it in `to` (`minflux convert` of LoRA files)."""
    if detect(checkpoint.read_header(Path(src))) == "control":
        raise CheckpointError(
            f"{src}: a BFL control LoRA (full tensors, lora_B biases): no other form holds it, "
            "use the file as it is"
        )
    lora = read(src, cfg)
    write(dst, lora, cfg, to)
    return lora
