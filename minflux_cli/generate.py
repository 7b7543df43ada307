"""`minflux generate`: sample a PNG with either framework from local checkpoints.

Inputs are local files only: a transformer checkpoint (`--transformer`, any layout `load_model` reads,
with its preset `--model`), an autoencoder (`--ae`), and a prompt-embedding file (`--embeddings`, the
format `minflux.text.save_embeddings` writes): safetensors holding `txt` (B, L, context_in_dim) and, for
FLUX.1, `vec` (B, 768); B prompts give B images (`out-0.png`, ...). True CFG (`--cfg`, e.g. klein base)
takes the negative prompt from a second file, `--neg-embeddings`.
`--random-weights` needs no files at all: random tiny models (`flux1-tiny` / `flux2-tiny` and their
tiny autoencoders) and random embeddings, a smoke test of the whole path.

Prompts instead of embeddings: `--prompt` (repeatable; `--negative-prompt` for `--cfg`, default "") with
`--text-encoder DIR`, run in the chosen `--framework` and freed before the transformer is loaded. The kind
follows the model: FLUX.1 -> CLIP-L + T5 from a diffusers-style root (`text_encoder/` + `tokenizer/` = CLIP,
`text_encoder_2/` + `tokenizer_2/` = T5; T5 at 256 tokens for schnell); FLUX.2 dev -> Mistral Small 3.x;
klein -> Qwen3; other FLUX.2 presets (the tiny ones) -> whatever config.json says. FLUX.2's DIR is a model
directory (config.json, safetensors, tokenizer.json) or a root with `text_encoder/` + `tokenizer/`.
`--save-embeddings FILE` writes the prompts' embeddings (and the negatives' to FILE-neg) and stops: encode
once, then generate from the file with `--embeddings` without loading the encoder again.

Modes: text-to-image; `--ref` reference images (FLUX.1 Kontext: one; FLUX.2: several; klein KV models cache
their keys and values); `--init` with `--strength` (img2img); `--init` with `--mask` (inpainting, white = repaint:
FLUX.1 Fill, or any other model as diffusers' inpaint pipelines); `--control` (FLUX.1 Canny/Depth: the
preprocessed control image, encoded and packed as extra input channels, as BFL's `prepare_control` after its
edge or depth detector); `--redux IMAGE` (FLUX.1 Redux: SigLIP image tokens appended to the prompt);
`--lora FILE[:SCALE]` (any common LoRA format, merged into the transformer).

Progress: PyTorch ticks a tqdm bar per step. JAX compiles the whole loop once (`lax.scan`) and ticks the
bar from inside the compiled loop through `jax.debug.callback`; the first call's bar waits for compilation
before its first tick.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from minflux import checkpoint, configs, images, schedules, text
from minflux_cli.args import (
    UsageError,
    directory,
    existing,
    finite,
    fraction,
    lora_spec,
    nonneg_float,
    nonneg_int,
    out_image,
    pixels,
    positive_int,
    preset,
)
from minflux_cli.frameworks import Framework

AE_FAMILY = {"flux1": "ae1", "flux2": "ae2"}
DEFAULT_GUIDANCE = {
    "flux1-fill-dev": 30.0,
    "flux1-kontext-dev": 2.5,  # BFL's cli_fill / cli_kontext defaults
    "flux1-canny-dev": 30.0,
    "flux1-depth-dev": 10.0,
}  # and cli_control's


@dataclasses.dataclass(frozen=True)
class TextPlan:
    """How prompts are encoded: the encoder kind (clip+t5 "flux1", "qwen3", "mistral"), its directory, the
    prompts and negative prompts, and the encoder options (None: the official defaults)."""

    kind: str
    directory: Path
    prompts: tuple[str, ...]
    negatives: tuple[str, ...]
    max_length: int | None
    layers: tuple[int, ...] | None

    def encode(self, fw: Framework, loras=()) -> dict[str, np.ndarray]:
        """txt (B, L, D), vec (B, 768) for FLUX.1, and neg_txt / neg_vec for the negatives; numpy in the
        encoder's dtype. loras: (file, scale) pairs whose text-encoder parts are merged into FLUX.1's CLIP-L and
        T5 first. The encoder is freed before this returns."""
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
        except (
            FileNotFoundError,
            ValueError,
        ) as e:  # (CheckpointError, naming the file, passes through)
            raise UsageError(f"--text-encoder {self.directory}: {e}") from None
        emb = {}
        for k, v in out.items():
            k = "txt" if k == "ctx" else k  # FLUX.2's ctx is the transformer's txt input
            emb[k], emb["neg_" + k] = v[:n], v[n:]
        return {k: v for k, v in emb.items() if len(v)}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything `minflux generate` does, validated and with every default resolved, before a framework loads."""

    model: str
    cfg: object
    ae_cfg: object
    fw: Framework
    random: bool
    transformer: Path | None
    ae: Path | None
    embeddings: Path | None
    neg_embeddings: Path | None
    text: TextPlan | None
    width: int
    height: int
    steps: int
    guidance: float | None
    cfg_scale: float
    strength: float
    refs: tuple[Path, ...]
    init: Path | None
    mask: Path | None
    control: Path | None
    seed: int
    compile: bool
    progress: bool
    out: Path
    loras: tuple[tuple[Path, float], ...] = ()  # --lora FILE[:SCALE], merged into the transformer
    redux: tuple[Path, ...] = ()  # FLUX.1 Redux images, their tokens appended to the prompt
    redux_model: Path | None = None
    redux_embedder: Path | None = None
    redux_scale: float = 1.0
    redux_pooled_scale: float = 1.0
    keep_quantized: bool = (
        False  # --keep-quantized: the transformer's quantized weights stay packed
    )

    @property
    def family(self) -> str:
        return self.cfg.family


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=preset,
        help="transformer preset (e.g. flux1-dev, flux2-klein-4b; default "
        "with --random-weights: flux1-tiny)",
    )
    parser.add_argument(
        "--transformer",
        type=existing,
        help="transformer checkpoint (safetensors file or directory)",
    )
    parser.add_argument("--ae", type=existing, help="autoencoder checkpoint (safetensors)")
    parser.add_argument(
        "--ae-config",
        type=preset,
        help="autoencoder preset (default: flux1-ae / flux2-ae, or the tiny one)",
    )
    parser.add_argument(
        "--embeddings",
        type=existing,
        help="prompt embeddings: safetensors with `txt` (B, L, D) "
        "and, for FLUX.1, `vec` (B, 768); B prompts give B images",
    )
    parser.add_argument(
        "--neg-embeddings", type=existing, help="negative-prompt embeddings (same format) for --cfg"
    )
    parser.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="a prompt, encoded with --text-encoder (repeatable: one image each)",
    )
    parser.add_argument(
        "--negative-prompt",
        action="append",
        metavar="TEXT",
        help='negative prompt for --cfg (default ""; one, or one per --prompt)',
    )
    parser.add_argument(
        "--text-encoder",
        type=directory,
        metavar="DIR",
        help="text encoder for --prompt: FLUX.1, a root with text_encoder/ (CLIP-L) + text_encoder_2/ "
        "(T5) + tokenizer/ + tokenizer_2/; FLUX.2, a model directory (config.json, safetensors, "
        "tokenizer.json) or a root with text_encoder/ + tokenizer/ (Mistral Small 3.x for dev, Qwen3 "
        "for klein)",
    )
    parser.add_argument(
        "--max-length",
        type=positive_int,
        help="prompt tokens for T5 / FLUX.2 (default 512, 256 schnell)",
    )
    parser.add_argument(
        "--text-encoder-layers",
        metavar="K,K,K",
        help="FLUX.2: hidden_states indices stacked, e.g. 9,18,27 (default: the official ones)",
    )
    parser.add_argument(
        "--save-embeddings",
        type=Path,
        metavar="FILE",
        help="encode --prompt to this safetensors "
        "file (negatives to FILE-neg) and exit; generate later with --embeddings",
    )
    parser.add_argument(
        "--random-weights", action="store_true", help="tiny random models and embeddings, no files"
    )
    parser.add_argument("--framework", choices=("torch", "jax"), default="torch")
    parser.add_argument(
        "--seed",
        type=nonneg_int,
        default=0,
        help="noise (and random weights); the same picture in both frameworks",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        help="default: 4 for distilled schnell/klein, 28 FLUX.1, 50 FLUX.2",
    )
    parser.add_argument(
        "--guidance",
        type=finite,
        help="distilled guidance (default 3.5 FLUX.1, 30 Fill, 2.5 Kontext, 4 FLUX.2 dev)",
    )
    parser.add_argument(
        "--cfg", type=finite, default=1.0, help="true CFG scale (needs a negative prompt); 1 = off"
    )
    parser.add_argument(
        "--width", type=pixels, help="pixels, a positive multiple of 16 (default 1024; 64 random)"
    )
    parser.add_argument(
        "--height", type=pixels, help="pixels, a positive multiple of 16 (default 1024; 64 random)"
    )
    parser.add_argument(
        "--ref", type=existing, action="append", default=[], help="reference image (repeatable)"
    )
    parser.add_argument(
        "--init", type=existing, help="start image: img2img, or the image to inpaint with --mask"
    )
    parser.add_argument(
        "--strength",
        type=fraction,
        help="img2img with --init: 1 = ignore the init image (default 0.8)",
    )
    parser.add_argument(
        "--mask",
        type=existing,
        help="inpainting mask for --init (white = repaint): FLUX.1 Fill, or "
        "any FLUX.1 / FLUX.2 model (the known region re-noised and kept, as diffusers' inpaint "
        "pipelines; --strength default 0.6 FLUX.1, 0.8 FLUX.2)",
    )
    parser.add_argument(
        "--redux",
        type=existing,
        action="append",
        default=[],
        metavar="IMAGE",
        help="FLUX.1 Redux: an image whose SigLIP tokens extend the prompt (repeatable)",
    )
    parser.add_argument(
        "--redux-model",
        type=directory,
        metavar="DIR",
        help="FLUX.1-Redux-dev root (image_encoder/, "
        "feature_extractor/, flux1-redux-dev.safetensors), or a SigLIP directory",
    )
    parser.add_argument(
        "--redux-embedder",
        type=existing,
        metavar="FILE",
        help="the Redux embedder file, with a SigLIP directory as --redux-model",
    )
    parser.add_argument(
        "--redux-scale",
        type=nonneg_float,
        default=1.0,
        help="Redux prompt scale (diffusers' prompt_embeds_scale)",
    )
    parser.add_argument(
        "--redux-pooled-scale", type=nonneg_float, default=1.0, help="Redux pooled-prompt scale"
    )
    parser.add_argument(
        "--control",
        type=existing,
        help="FLUX.1 Canny/Depth: the control image, already "
        "preprocessed (a Canny edge map or a depth map); resized to the output size",
    )
    parser.add_argument(
        "--dtype", choices=("bf16", "fp32"), help="default: bf16 (fp32 with --random-weights)"
    )
    parser.add_argument("--device", help="PyTorch device (default: cuda if available)")
    parser.add_argument(
        "--compile", action="store_true", help="PyTorch: torch.compile the transformer"
    )
    parser.add_argument(
        "--keep-quantized",
        action="store_true",
        help="keep the weights a quantized --transformer file stores (FP8R / scaled fp8, NVFP4, GGUF) packed "
        "in memory, dequantized layer by layer in the forward (default: dequantized on load)",
    )
    parser.add_argument(
        "--lora",
        type=lora_spec,
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="merge a LoRA file (any common format) at SCALE (default 1); repeatable",
    )
    parser.add_argument(
        "--out",
        type=out_image,
        default=Path("minflux.png"),
        help="output image (PNG, JPEG, WebP, ...; B prompts: OUT-0.png, OUT-1.png, ...)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    if args.save_embeddings is not None:
        return save_embeddings(plan, args.save_embeddings)
    start = time.perf_counter()
    out = generate(plan)  # (B, H, W, 3) uint8
    outs = (
        [plan.out]
        if len(out) == 1
        else [plan.out.with_name(f"{plan.out.stem}-{i}{plan.out.suffix}") for i in range(len(out))]
    )
    for path, image in zip(outs, out, strict=True):
        images.save(image, path)
    print(
        f"wrote {', '.join(map(str, outs))}: {out.shape[2]}x{out.shape[1]}, {plan.model} ({plan.fw.name}), "
        f"{plan.steps} steps, {time.perf_counter() - start:.1f} s"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# Checking the inputs (framework-free: every error before a framework is imported)
# ---------------------------------------------------------------------------------------------


def _required(path: Path | None, what: str, flag: str) -> Path:
    if path is None:
        raise UsageError(
            f"{flag} is required ({what}); or pass --random-weights for a demo without files"
        )
    return path


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the arguments and resolve every default; raises UsageError naming the flag."""
    random = args.random_weights
    given = [
        f
        for f in ("transformer", "ae", "embeddings", "neg_embeddings")
        if getattr(args, f) is not None
    ]
    if random and given:
        raise UsageError(
            f"--random-weights and --{given[0].replace('_', '-')} exclude each other: random tiny "
            "models and embeddings, or your files"
        )
    if args.keep_quantized and (random or args.lora):
        what = "--random-weights" if random else "--lora (merged into full weights)"
        raise UsageError(
            f"--keep-quantized keeps a quantized --transformer file packed; not with {what}"
        )
    if args.compile and args.framework != "torch":
        raise UsageError("--compile is torch.compile, for --framework torch (JAX always compiles)")
    if args.device is not None and args.framework != "torch":
        raise UsageError("--device is PyTorch's; JAX runs on its default device (JAX_PLATFORMS)")
    name = args.model or ("flux1-tiny" if random else None)
    if name is None:
        raise UsageError(
            "--model is required (a transformer preset); presets: " + ", ".join(configs.names())
        )
    cfg = configs.resolve(name)
    family = cfg.family
    if family not in AE_FAMILY:
        raise UsageError(f"--model {name} is {configs.describe(family)}, not a transformer")
    ae_name = args.ae_config or f"{family}-ae" + (
        "-tiny" if random or name.endswith("-tiny") else ""
    )
    ae_cfg = configs.resolve(ae_name)
    if ae_cfg.family != AE_FAMILY[family]:
        raise UsageError(
            f"--ae-config {ae_name} is {configs.describe(ae_cfg.family)}; {name} needs "
            f"{configs.describe(AE_FAMILY[family])}"
        )
    for flag in ("embeddings", "neg_embeddings"):
        if args.prompt and getattr(args, flag) is not None:
            raise UsageError(
                f"--prompt and --{flag.replace('_', '-')} exclude each other: the prompt is encoded "
                "here, or read from a file"
            )
    if args.save_embeddings is not None and not args.prompt:
        raise UsageError("--save-embeddings needs --prompt")
    prompts = text_plan(
        name,
        cfg,
        args.prompt,
        args.negative_prompt,
        args.text_encoder,
        args.max_length,
        args.text_encoder_layers,
        args.cfg,
        encode_only=args.save_embeddings is not None,
    )
    fw = Framework(args.framework, args.dtype or ("fp32" if random else "bf16"), args.device)
    if not random and args.save_embeddings is None:
        _required(args.transformer, "the transformer checkpoint", "--transformer")
        _required(args.ae, "the autoencoder checkpoint", "--ae")
        if prompts is None:
            _required(
                args.embeddings,
                "the prompt embeddings (or pass --prompt with --text-encoder)",
                "--embeddings",
            )
            if args.cfg != 1.0:
                _required(
                    args.neg_embeddings,
                    "the negative prompt's embeddings, for --cfg",
                    "--neg-embeddings",
                )
        for flag, path, want in (
            ("--transformer", args.transformer, cfg),
            ("--ae", args.ae, ae_cfg),
        ):
            with checkpoint.Checkpoint(path) as ckpt:  # headers only
                try:
                    checkpoint.check_holds(ckpt, want, name if want is cfg else ae_name)
                except checkpoint.CheckpointError as e:
                    hint = (
                        ""
                        if want is cfg
                        else " (the transformer and autoencoder come from different families)"
                    )
                    raise UsageError(f"{flag} {e}{hint}") from None
    ppt = configs.pixels_per_token(ae_cfg)
    width = args.width if args.width is not None else (64 if random else 1024)
    height = args.height if args.height is not None else (64 if random else 1024)
    try:
        schedules.token_grid(width, height, ppt)
        kind = configs.input_kind(_with_loras(cfg, args.lora), ppt)
    except ValueError as e:
        raise UsageError(f"--model {name}: {e}" if "in_channels" in str(e) else str(e)) from None
    if kind == "control" and args.control is None:
        raise UsageError(
            f"{name} is a structural-control (Canny/Depth) model: pass --control IMAGE, an edge map or "
            "a depth map"
        )
    if args.control is not None and kind != "control":
        raise UsageError(
            f"--control needs a FLUX.1 Canny/Depth model (in_channels 128); {name} has "
            f"{cfg.in_channels}"
        )
    if args.mask is not None and kind == "control":
        raise UsageError(
            f"--mask: {name} is a Canny/Depth model; inpaint with a Fill model or an ordinary one"
        )
    if args.mask is not None and args.init is None:
        raise UsageError("--mask needs --init IMAGE, the image to inpaint")
    if kind == "fill" and (args.mask is None or args.init is None):
        raise UsageError(f"{name} is an inpainting (Fill) model: pass --init IMAGE and --mask MASK")
    if args.strength is not None and (args.init is None or kind == "fill"):
        raise UsageError(
            "--strength does not apply to Fill inpainting (the model repaints the masked region)"
            if kind == "fill"
            else "--strength needs --init IMAGE (img2img or inpainting)"
        )
    if args.redux:
        if cfg.family != "flux1" or args.redux_model is None:
            raise UsageError(
                "--redux needs a FLUX.1 model and --redux-model DIR (the FLUX.1-Redux-dev root, or a "
                "SigLIP directory with --redux-embedder FILE)"
                if cfg.family == "flux1"
                else f"--redux is for FLUX.1 models; {name} is FLUX.2"
            )
        if args.cfg != 1.0:
            raise UsageError(
                "--redux with --cfg: the image tokens lengthen the prompt but not the negative one"
            )
    elif args.redux_model is not None or args.redux_embedder is not None:
        raise UsageError("--redux-model / --redux-embedder need --redux IMAGE")
    if cfg.max_refs is not None and len(args.ref) > cfg.max_refs:
        raise UsageError(f"FLUX.1 Kontext takes one --ref image, got {len(args.ref)}")
    cfg_on = args.cfg != 1.0
    steps = (
        args.steps
        if args.steps is not None
        else (
            4
            if random or (not cfg.guidance_embed and not cfg_on)
            else (28 if family == "flux1" else 50)
        )
    )
    guidance = (
        args.guidance
        if args.guidance is not None
        else DEFAULT_GUIDANCE.get(name, 3.5 if family == "flux1" else 4.0)
    )
    if args.guidance is not None and not cfg.guidance_embed:
        print(
            f"minflux generate: note: {name} has no guidance embedder; --guidance is ignored "
            "(use --cfg with a negative prompt for true CFG)",
            file=sys.stderr,
        )
    # defaults as diffusers': img2img 0.8, FLUX.1 inpainting 0.6 (FluxInpaintPipeline), klein 0.8
    strength = (
        args.strength
        if args.strength is not None
        else (0.6 if args.mask is not None and family == "flux1" else 0.8)
    )
    if args.init is not None and kind != "fill":
        try:
            schedules.strength_start(steps, strength)
        except ValueError as e:
            raise UsageError(f"--strength {strength}: {e}") from None
    return Plan(
        model=name,
        cfg=cfg,
        ae_cfg=ae_cfg,
        fw=fw,
        random=random,
        transformer=args.transformer,
        ae=args.ae,
        embeddings=args.embeddings,
        neg_embeddings=args.neg_embeddings,
        text=prompts,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        cfg_scale=args.cfg,
        strength=strength,
        refs=tuple(args.ref),
        init=args.init,
        mask=args.mask,
        control=args.control,
        seed=args.seed,
        compile=args.compile,
        progress=not args.no_progress,
        out=args.out,
        loras=tuple(args.lora),
        redux=tuple(args.redux),
        redux_model=args.redux_model,
        redux_embedder=args.redux_embedder,
        redux_scale=args.redux_scale,
        redux_pooled_scale=args.redux_pooled_scale,
        keep_quantized=args.keep_quantized,
    )


def _with_loras(cfg, loras):
    """The config the transformer has once --lora files are merged: a BFL Canny / Depth control LoRA widens a
    FLUX.1 model's `img_in` to take the control image's tokens (as diffusers expands `x_embedder`)."""
    if not loras:
        return cfg
    from minflux import lora

    with warnings.catch_warnings():  # (text-encoder parts are counted again when the model loads)
        warnings.simplefilter("ignore")
        width = lora.input_width(lora.load([p for p, _ in loras], cfg))
    return dataclasses.replace(cfg, in_channels=width) if width > cfg.in_channels else cfg


def encoder_kind(name: str, family: str, directory: Path) -> str:
    """The text encoder a preset was trained with: FLUX.1 -> CLIP-L + T5, FLUX.2 dev -> Mistral, klein -> Qwen3;
    other FLUX.2 presets (the tiny ones) take the kind config.json names."""
    if family == "flux1":
        return "flux1"
    want = "qwen3" if "klein" in name else "mistral" if name == "flux2-dev" else None
    try:
        model_dir = text.resolve_dirs("qwen3", directory)[
            0
        ]  # (Qwen3 and Mistral share the repo subfolders)
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--text-encoder {directory}: {e}") from None
    found = next((k for k in ("qwen3", "mistral") if model_type in text.SPECS[k].model_types), None)
    if want is not None and found != want:
        raise UsageError(
            f"--text-encoder {directory}: {name} takes a {want} text encoder, but "
            f"{model_dir / 'config.json'} holds model_type {model_type!r}"
        )
    if found is None:
        raise UsageError(
            f"--text-encoder {directory}: {model_dir / 'config.json'} holds model_type "
            f"{model_type!r}; FLUX.2 takes a qwen3 or mistral text encoder"
        )
    return found


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
    """With prompts: the text encoder's kind, directories, lengths and stacked layers, checked against the model
    (output widths against context_in_dim / vec_in_dim) from the config files alone, before any weight is read.
    None without prompts. Raises UsageError naming the flag (`minflux generate`'s, which `minflux cache` shares)."""
    if not prompts:
        for flag, value in (
            ("--text-encoder", directory),
            ("--negative-prompt", negatives),
            ("--max-length", max_length),
            ("--text-encoder-layers", layers),
        ):
            if value is not None:
                raise UsageError(f"{flag} needs --prompt")
        return None
    if directory is None:
        raise UsageError(
            "--prompt needs --text-encoder DIR (or encode elsewhere and pass --embeddings)"
        )
    if not directory.is_dir():
        raise UsageError(f"--text-encoder {directory}: no such directory")
    kind = encoder_kind(name, cfg.family, directory)
    max_length = max_length or (
        256 if "schnell" in name else None
    )  # BFL: T5 at 256 tokens for schnell
    stacked = None
    if layers is not None:
        if kind == "flux1":
            raise UsageError(
                "--text-encoder-layers is for FLUX.2's decoder text encoders, not CLIP + T5"
            )
        try:
            stacked = tuple(int(k) for k in layers.split(","))
        except ValueError:
            raise UsageError(
                f"--text-encoder-layers {layers!r}: expected integers like 9,18,27"
            ) from None
    if kind == "flux1":
        missing = [
            str(directory / d / "config.json")
            for d in ("text_encoder", "text_encoder_2")
            if not (directory / d / "config.json").is_file()
        ]
        if missing:
            raise UsageError(
                f"--text-encoder {directory}: FLUX.1 takes CLIP-L and T5 from a diffusers-style root "
                f"(text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/); no {', '.join(missing)}"
            )
    for part in ("clip", "t5") if kind == "flux1" else (kind,):
        try:
            s = text.spec(part, None if part == "clip" else max_length, stacked)
            model_dir, tok_dir = text.resolve_dirs(part, directory)
            text.tokenizer_files(tok_dir, s.arch)
            tcfg = text.read_config(part, model_dir)
            if s.arch == "decoder":
                text.check_layers(s, tcfg, model_dir / "config.json")
            text.check_length(s, tcfg, model_dir / "config.json")
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--text-encoder {directory}: {e}") from None
        if s.arch == "decoder":
            width, how = (
                len(s.layers) * tcfg.hidden_size,
                f"{len(s.layers)} stacked layers x hidden {tcfg.hidden_size}",
            )
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
    negatives = list(negatives or [])
    if cfg_scale != 1.0 and not negatives:
        negatives = [""]  # the official pipelines' default negative prompt
    if negatives and cfg_scale == 1.0 and not encode_only:
        print("minflux generate: note: --negative-prompt is ignored without --cfg", file=sys.stderr)
        negatives = []
    if len(negatives) not in (0, 1, len(prompts)):
        raise UsageError(
            f"{len(negatives)} --negative-prompt for {len(prompts)} --prompt: pass one, or one per "
            "prompt"
        )
    return TextPlan(kind, directory, tuple(prompts), tuple(negatives), max_length, stacked)


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


def read_embeddings(path: Path, plan: Plan, flag: str) -> dict[str, np.ndarray]:
    """`txt` (B, L, D) and, for FLUX.1, `vec` (B, 768) from a prompt-embedding file (the format
    `minflux.text.save_embeddings` writes), as fp32; shapes checked against the model."""
    cfg = plan.cfg
    ckpt = checkpoint.Checkpoint(path)  # reads bf16 too; errors name the file
    wanted = {"txt": ("L", cfg.context_in_dim)}
    if plan.family == "flux1":
        wanted["vec"] = (cfg.vec_in_dim,)
    emb = {}
    for key, shape in wanted.items():
        if key not in ckpt.meta:
            raise UsageError(
                f"{flag} {path}: no {key!r} tensor (found {sorted(ckpt.meta)}); "
                f"{configs.describe(plan.family)} needs {' and '.join(map(repr, wanted))}"
            )
        a = ckpt.get(key).astype(np.float32)
        a = a[None] if a.ndim == len(shape) else a  # one prompt without a batch axis
        if not np.isfinite(a).all():
            raise UsageError(f"{flag} {path}: {key!r} holds NaN or Inf values")
        if 0 in a.shape:
            raise UsageError(f"{flag} {path}: {key!r} has shape {ckpt.meta[key][1]}: no tokens")
        if a.ndim != len(shape) + 1 or a.shape[-1] != shape[-1]:
            raise UsageError(
                f"{flag} {path}: {key!r} has shape {ckpt.meta[key][1]}; {plan.model} "
                f"needs (B, {', '.join(map(str, shape))})"
            )
        emb[key] = a
    if "vec" in emb and len(emb["vec"]) != len(emb["txt"]):
        raise UsageError(f"{flag} {path}: {len(emb['txt'])} txt prompts but {len(emb['vec'])} vec")
    return emb


def save_embeddings(plan: Plan, path: Path) -> int:
    """--save-embeddings FILE: the prompts' embeddings to FILE, the negative prompts' (if any) to FILE-neg."""
    tp = plan.text
    emb = tp.encode(plan.fw, plan.loras)
    outs = [(path, "", tp.prompts)]
    if tp.negatives:
        outs.append((path.with_name(f"{path.stem}-neg{path.suffix}"), "neg_", tp.negatives))
    for out, prefix, prompts in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        text.save_embeddings(
            out,
            {k: emb[prefix + k] for k in ("txt", "vec") if prefix + k in emb},
            tp.kind,
            list(prompts),
        )
        print(
            f"wrote {out}: {len(prompts)} prompt(s), txt {emb[prefix + 'txt'].shape} ({tp.kind}, {plan.fw.name})"
        )
    return 0


def load_embeddings(plan: Plan) -> dict[str, np.ndarray]:
    """txt (B, L, D), vec (B, 768) for FLUX.1, and neg_txt / neg_vec with --cfg; fp32 numpy."""
    cfg = plan.cfg
    if plan.text is not None:
        return {k: v.astype(np.float32) for k, v in plan.text.encode(plan.fw, plan.loras).items()}
    if plan.random:
        rng = np.random.default_rng(plan.seed)
        emb = {"txt": rng.standard_normal((1, 16, cfg.context_in_dim), np.float32)}
        if plan.family == "flux1":
            emb["vec"] = rng.standard_normal((1, cfg.vec_in_dim), np.float32)
        if plan.cfg_scale != 1.0:  # an all-zero negative prompt
            emb.update({"neg_" + k: np.zeros_like(v) for k, v in emb.items()})
        return emb
    emb = read_embeddings(plan.embeddings, plan, "--embeddings")
    if plan.cfg_scale != 1.0:
        neg = read_embeddings(plan.neg_embeddings, plan, "--neg-embeddings")
        if (
            len(neg["txt"]) not in (1, len(emb["txt"]))
            or neg["txt"].shape[1] != emb["txt"].shape[1]
        ):
            raise UsageError(
                f"--neg-embeddings {plan.neg_embeddings}: txt {neg['txt'].shape} does not match "
                f"--embeddings txt {emb['txt'].shape} (same length; one negative or one per prompt)"
            )
        emb.update({"neg_" + k: v for k, v in neg.items()})
    return emb


# ---------------------------------------------------------------------------------------------
# Generating: the pipeline of the chosen framework
# ---------------------------------------------------------------------------------------------


def conditioning_images(plan: Plan) -> dict:
    """The images the pipeline takes (`minflux.images.load`, numpy HWC), checked before any model loads."""
    size = (plan.width, plan.height)
    # FLUX.2 scales references down to 2024^2 pixels (one) or 1024^2 (several), as BFL's `encode_image_refs`.
    ref_pixels = None if plan.family == "flux1" else 2024**2 if len(plan.refs) == 1 else 1024**2
    ppt = configs.pixels_per_token(plan.ae_cfg)
    load = {
        "refs": lambda: [images.load(p, multiple=ppt, max_pixels=ref_pixels) for p in plan.refs],
        "init": lambda: images.load(plan.init, size) if plan.init else None,
        "mask": lambda: images.load(plan.mask, size, gray=True) if plan.mask else None,
        "control": lambda: images.load(plan.control, size) if plan.control else None,
    }
    try:
        return {k: f() for k, f in load.items()}
    except ValueError as e:
        raise UsageError(str(e)) from None


def generate(plan: Plan) -> np.ndarray:
    """(B, H, W, 3) uint8 images in the plan's framework."""
    cond = conditioning_images(plan)
    emb = load_embeddings(plan)  # first: a text encoder is freed before the transformer is loaded
    fw = plan.fw
    if plan.redux:
        if len(emb["txt"]) != 1:
            raise UsageError(f"--redux extends one prompt; {len(emb['txt'])} were given")
        try:
            encoder = fw.redux_encoder(plan.redux_model, plan.redux_embedder)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--redux-model {plan.redux_model}: {e}") from None
        emb["txt"], emb["vec"] = fw.pipeline.redux(
            encoder,
            emb["txt"],
            emb["vec"],
            list(plan.redux),
            plan.redux_scale,
            plan.redux_pooled_scale,
        )
        del encoder  # freed before the transformer loads
    if plan.keep_quantized:
        model = fw.package.load_model(plan.cfg, plan.transformer, **fw.kw, keep_quantized=True)
    else:
        model = fw.model(plan.cfg, None if plan.random else plan.transformer, seed=plan.seed)
    ae = fw.model(plan.ae_cfg, None if plan.random else plan.ae, seed=plan.seed + 1)
    if plan.loras:
        with warnings.catch_warnings():
            if plan.text is not None:  # the files' text-encoder parts went into the encoders above
                warnings.filterwarnings("ignore", message=".*text-encoder LoRA modules not applied")
            fw.package.load_lora(model, [p for p, _ in plan.loras], [s for _, s in plan.loras])
    if plan.compile and fw.name == "torch":
        import torch

        model = torch.compile(model)  # attribute access (model.params) passes through to the module
    return fw.pipeline.generate(
        model,
        ae,
        emb["txt"],
        emb.get("vec"),
        width=plan.width,
        height=plan.height,
        seed=plan.seed,
        steps=plan.steps,
        guidance=plan.guidance,
        cfg_scale=plan.cfg_scale,
        neg_txt=emb.get("neg_txt"),
        neg_vec=emb.get("neg_vec"),
        **cond,
        strength=plan.strength,
        progress=plan.progress,
    )
