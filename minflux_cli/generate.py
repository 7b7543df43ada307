"""`minflux generate`: sample a PNG with either framework from local checkpoints.

Inputs are local files only: a transformer checkpoint (`--transformer`, any layout `load_model`
reads, with its preset `--model`), an autoencoder (`--ae`), and a prompt-embedding file
(`--embeddings`, the format `minflux.text.save_embeddings` writes): safetensors holding `txt` (B, L,
context_in_dim) and, for FLUX.1, `vec` (B, 768); B prompts give B images (`out-0.png`, ...). True
CFG (`--cfg`, e.g. klein base) takes the negative prompt from a second file, `--neg-embeddings`.
`--random-weights` needs no files at all: random tiny models (`flux1-tiny` / `flux2-tiny` and their
tiny autoencoders) and random embeddings, a smoke test of the whole path.

Prompts instead of embeddings: `--prompt` (repeatable; `--negative-prompt` for `--cfg`, default "")
with `--text-encoder DIR`, run in the chosen `--framework` and freed before the transformer is
loaded; which encoder a model takes and where it lies in DIR: `minflux_cli/text_encoders.py`.
`--save-embeddings FILE` writes the prompts' embeddings (and the negatives' to FILE-neg) and stops:
encode once, then generate from the file with `--embeddings` without loading the encoder again.

Modes: text-to-image; `--ref` reference images (FLUX.1 Kontext: one; FLUX.2: several; klein KV
models cache their keys and values); `--init` with `--strength` (img2img); `--init` with `--mask`
(inpainting, white = repaint: FLUX.1 Fill, or any other model as diffusers' inpaint pipelines);
`--control` (FLUX.1 Canny/Depth: the preprocessed control image, encoded and packed as extra input
channels, as BFL's `prepare_control` after its edge or depth detector); `--redux IMAGE` (FLUX.1
Redux: SigLIP image tokens appended to the prompt); `--lora FILE[:SCALE]` (any common LoRA format,
merged into the transformer).

Memory: `--keep-quantized` keeps a quantized file's weights packed; `--offload blocks` keeps the transformer's
blocks off the device and streams each onto it just before its turn (`minflux_{torch,jax}/offload.py`). The
text encoder is freed before the transformer loads.

The arguments become a `Plan` (files, defaults from the family table `minflux.family`), checked by
the same rules `pipeline.generate` applies (`minflux.request.check_model`, naming the flags here)
before anything loads; the loaded embeddings and images become a `minflux.request.Request` for
`pipeline.generate`.

Progress: PyTorch ticks a tqdm bar per step. JAX compiles the whole loop once (`lax.scan`) and ticks
the bar from inside the compiled loop through `jax.debug.callback`; the first call's bar waits for
compilation before its first tick."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from minflux import checkpoint, configs, family, images, request, text
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
from minflux_cli.text_encoders import TextPlan, text_plan


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
    # --keep-quantized: the transformer's quantized weights stay packed
    keep_quantized: bool = False
    # --offload blocks: the transformer's blocks streamed onto the device one at a time
    offload: str = "none"

    @property
    def family(self) -> str:
        return self.cfg.family

    @property
    def true_cfg(self) -> bool:
        """Whether the sampler runs a negative prompt (`request.check_model` reads it)."""
        return self.cfg_scale != 1.0

    @property
    def flags(self) -> dict[str, str]:
        """The flag behind each request field, for `request.check_model`'s messages."""
        flags = {
            k: f"--{k}" for k in ("init", "mask", "control", "strength", "width", "height", "steps")
        }
        return flags | {"refs": "--ref", "model": self.model}


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
        "--offload",
        choices=("none", "blocks"),
        default="none",
        help="blocks: the transformer's blocks stay off the device -- in the --transformer file on a CPU, in "
        "host memory on a GPU -- and each comes onto it just before its turn, the next one fetched while the "
        "current one computes: for a model larger than the device's memory (on a CPU: than RAM)",
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


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the arguments and resolve every default; raises UsageError naming the flag."""
    _exclusive(args)
    name, cfg, ae_name, ae_cfg = _models(args)
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
    random = args.random_weights
    fw = Framework(args.framework, args.dtype or ("fp32" if random else "bf16"), args.device)
    if not random and args.save_embeddings is None:
        _check_files(args, prompts is not None, (name, cfg), (ae_name, ae_cfg))
    plan = Plan(
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
        width=args.width if args.width is not None else (64 if random else 1024),
        height=args.height if args.height is not None else (64 if random else 1024),
        steps=args.steps
        if args.steps is not None
        else (4 if random else family.default_steps(cfg, args.cfg != 1.0)),
        guidance=args.guidance if args.guidance is not None else family.default_guidance(name, cfg),
        cfg_scale=args.cfg,
        strength=(
            args.strength
            if args.strength is not None
            else family.default_strength(cfg, inpainting=args.mask is not None)
        ),
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
        offload=args.offload,
    )
    _check_request(plan, args)
    return plan


def _exclusive(args: argparse.Namespace) -> None:
    """Flags that exclude or need each other, whatever the model."""
    given = [f for f in ("transformer", "ae", "embeddings", "neg_embeddings") if getattr(args, f)]
    if args.random_weights and given:
        raise UsageError(
            f"--random-weights and --{given[0].replace('_', '-')} exclude each other: random tiny "
            "models and embeddings, or your files"
        )
    if args.keep_quantized and (args.random_weights or args.lora):
        what = "--random-weights" if args.random_weights else "--lora (merged into full weights)"
        raise UsageError(
            f"--keep-quantized keeps a quantized --transformer file packed; not with {what}"
        )
    if args.offload != "none" and (args.compile or args.lora):
        what = "--compile (the runner moves weights between blocks)" if args.compile else "--lora"
        raise UsageError(
            f"--offload {args.offload} streams the blocks as the file stores them; not with {what}"
        )
    if args.compile and args.framework != "torch":
        raise UsageError("--compile is torch.compile, for --framework torch (JAX always compiles)")
    if args.device is not None and args.framework != "torch":
        raise UsageError("--device is PyTorch's; JAX runs on its default device (JAX_PLATFORMS)")
    for flag in ("embeddings", "neg_embeddings"):
        if args.prompt and getattr(args, flag) is not None:
            raise UsageError(
                f"--prompt and --{flag.replace('_', '-')} exclude each other: the prompt is encoded "
                "here, or read from a file"
            )
    if args.save_embeddings is not None and not args.prompt:
        raise UsageError("--save-embeddings needs --prompt")
    if not args.redux and (args.redux_model is not None or args.redux_embedder is not None):
        raise UsageError("--redux-model / --redux-embedder need --redux IMAGE")


def _models(args: argparse.Namespace) -> tuple[str, object, str, object]:
    """(name, config) of the transformer and of its autoencoder (the family's, tiny for tiny
    models)."""
    name = args.model or ("flux1-tiny" if args.random_weights else None)
    if name is None:
        raise UsageError(
            "--model is required (a transformer preset); presets: " + ", ".join(configs.names())
        )
    cfg = configs.resolve(name)
    if not family.is_transformer(cfg):
        raise UsageError(f"--model {name} is {configs.describe(cfg.family)}, not a transformer")
    spec = family.of(cfg)
    tiny = args.random_weights or name.endswith("-tiny")
    ae_name = args.ae_config or f"{spec.name}-ae" + ("-tiny" if tiny else "")
    ae_cfg = configs.resolve(ae_name)
    if not spec.takes(ae_cfg):
        raise UsageError(
            f"--ae-config {ae_name} is {configs.describe(ae_cfg.family)}; {name} needs "
            f"{configs.describe(spec.autoencoder)}"
        )
    return name, cfg, ae_name, ae_cfg


def _required(path: Path | None, what: str, flag: str) -> Path:
    if path is None:
        raise UsageError(
            f"{flag} is required ({what}); or pass --random-weights for a demo without files"
        )
    return path


def _check_files(args: argparse.Namespace, prompts: bool, model: tuple, ae: tuple) -> None:
    """The files a run without --random-weights needs, and (headers only) that the checkpoints hold
    the (name, config) `model` and `ae`."""
    _required(args.transformer, "the transformer checkpoint", "--transformer")
    _required(args.ae, "the autoencoder checkpoint", "--ae")
    if not prompts:
        what = "the prompt embeddings (or pass --prompt with --text-encoder)"
        _required(args.embeddings, what, "--embeddings")
        if args.cfg != 1.0:
            what = "the negative prompt's embeddings, for --cfg"
            _required(args.neg_embeddings, what, "--neg-embeddings")
    for flag, path, (name, want) in (
        ("--transformer", args.transformer, model),
        ("--ae", args.ae, ae),
    ):
        with checkpoint.Checkpoint(path) as ckpt:
            try:
                checkpoint.check_holds(ckpt, want, name)
            except checkpoint.CheckpointError as e:
                hint = " (the transformer and autoencoder come from different families)"
                raise UsageError(f"{flag} {e}{hint if path is args.ae else ''}") from None


def _check_request(plan: Plan, args: argparse.Namespace) -> None:
    """The generation rules of `pipeline.generate` (`request.check_model`) on the plan, the flags
    named, then the flags that only the command has (--strength given, --redux, --guidance without
    an embedder)."""
    try:
        kind = request.check_model(plan, _with_loras(plan.cfg, plan.loras), plan.ae_cfg, plan.flags)
    except ValueError as e:
        model_width = str(e).startswith("in_channels")  # a width no input kind has
        raise UsageError(f"--model {plan.model}: {e}" if model_width else str(e)) from None
    if args.strength is not None and (plan.init is None or kind == "fill"):
        raise UsageError(
            "--strength does not apply to Fill inpainting (the model repaints the masked region)"
            if kind == "fill"
            else "--strength needs --init IMAGE (img2img or inpainting)"
        )
    spec = family.of(plan.cfg)
    if plan.redux:
        if not spec.redux or plan.redux_model is None:
            raise UsageError(
                "--redux needs a FLUX.1 model and --redux-model DIR (the FLUX.1-Redux-dev root, or a "
                "SigLIP directory with --redux-embedder FILE)"
                if spec.redux
                else f"--redux is for FLUX.1 models; {plan.model} is {spec.title}"
            )
        if plan.true_cfg:
            raise UsageError(
                "--redux with --cfg: the image tokens lengthen the prompt but not the negative one"
            )
    if args.guidance is not None and not plan.cfg.guidance_embed:
        print(
            f"minflux generate: note: {plan.model} has no guidance embedder; --guidance is ignored "
            "(use --cfg with a negative prompt for true CFG)",
            file=sys.stderr,
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


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


def read_embeddings(path: Path, plan: Plan, flag: str) -> dict[str, np.ndarray]:
    """`txt` (B, L, D) and, for FLUX.1, `vec` (B, 768) from a prompt-embedding file (the format
    `minflux.text.save_embeddings` writes), as fp32; shapes checked against the model."""
    cfg = plan.cfg
    ckpt = checkpoint.Checkpoint(path)  # reads bf16 too; errors name the file
    wanted = {"txt": ("L", cfg.context_in_dim)}
    if family.of(cfg).pooled_vec:
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
        if family.of(cfg).pooled_vec:
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
    ref_pixels = family.of(plan.cfg).ref_max_pixels(len(plan.refs))
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
    try:  # (checked against the model already, on the plan)
        req = request.Request(
            **emb,
            width=plan.width,
            height=plan.height,
            steps=plan.steps,
            guidance=plan.guidance,
            cfg_scale=plan.cfg_scale,
            seed=plan.seed,
            strength=plan.strength,
            **cond,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    offload = None  # --offload blocks: the blocks stay in the file (CPU) or in host memory (GPU)
    if plan.offload == "blocks" and not plan.random:
        model, offload = fw.offload.load_model(
            plan.cfg, plan.transformer, **fw.kw, keep_quantized=plan.keep_quantized
        )
    elif plan.keep_quantized:
        model = fw.package.load_model(plan.cfg, plan.transformer, **fw.kw, keep_quantized=True)
    else:
        model = fw.model(plan.cfg, None if plan.random else plan.transformer, seed=plan.seed)
    ae = fw.model(plan.ae_cfg, None if plan.random else plan.ae, seed=plan.seed + 1)
    if plan.loras:
        with warnings.catch_warnings():
            if plan.text is not None:  # the files' text-encoder parts went into the encoders above
                warnings.filterwarnings("ignore", message=".*text-encoder LoRA modules not applied")
            fw.package.load_lora(model, [p for p, _ in plan.loras], [s for _, s in plan.loras])
    if plan.offload == "blocks" and offload is None:  # random weights: their blocks to host memory
        offload = fw.offload.offload_model(model)
    if plan.compile and fw.name == "torch":
        import torch

        model = torch.compile(model)  # attribute access (model.params) passes through to the module
    return fw.pipeline.generate(model, ae, req, progress=plan.progress, offload=offload)
