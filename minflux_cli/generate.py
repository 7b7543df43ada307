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

References are sized as BFL's and diffusers' pipelines prepare them (`minflux.references`: Kontext's preferred
resolution of the nearest aspect ratio; FLUX.2 scaled down to 1024^2 pixels, refused with a side under 64 pixels
or an aspect ratio over 8); without --width / --height the picture takes the first reference's size (as BFL's
Kontext CLI and diffusers' klein pipelines); the sizes are printed. Inpainting with an ordinary model repaints
a latent (FLUX.1) or token (FLUX.2) when any pixel of its patch is white (`--mask-mode max`; `center` samples
the mask as diffusers does); a mask that repaints nothing is refused.

Seeds: image i of a batch is drawn from --seed + i alone, so it is the image a single run draws with `--only i`
(its prompt, its seed). Every PNG records its seed, prompt, model and settings in its text metadata, with the
command that remakes it alone; `--from-png FILE` runs that command.
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
import functools
import json
import shlex
import time
import warnings
from pathlib import Path

import numpy as np

from minflux import (
    checkpoint,
    configs,
    family,
    files,
    images,
    keymaps,
    masks,
    memory,
    references,
    request,
    text,
)
from minflux.buckets import Fit
from minflux_cli.args import (
    UsageError,
    directory,
    existing,
    finite,
    fraction,
    lora_spec,
    nonneg_float,
    nonneg_int,
    out_file,
    out_image,
    pixels,
    positive_int,
    preset,
    typed_flags,
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
    kind: str = "text"  # the model's input kind (`configs.input_kind`): "text", "fill", "control"
    mask_mode: str = "max"  # --mask-mode (`minflux.masks`)
    ref_sizes: tuple[tuple[int, int], ...] = ()  # each --ref's (width, height) as given ...
    ref_fits: tuple[Fit, ...] = ()  # ... and how it is prepared (`minflux.references`)
    size_from_ref: bool = False  # --width / --height taken from the first reference
    only: int | None = None  # --only I: image I of the batch alone
    batch: int = 1  # images drawn (after --only)
    command: tuple[str, ...] = ()  # the arguments that remake this run (`command_line`)
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
        type=functools.partial(out_file, make_parents=True),
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
        "--width",
        type=pixels,
        help="pixels, a positive multiple of 16 (default: the first --ref's size, else 1024; 64 random)",
    )
    parser.add_argument(
        "--height",
        type=pixels,
        help="pixels, a positive multiple of 16 (default: the first --ref's size, else 1024; 64 random)",
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
        "--mask-mode",
        choices=masks.MODES,
        help="how --mask marks latents / tokens: max (default), any white pixel of a patch repaints it (thin "
        "strokes count); center, the mask sampled as diffusers' inpaint pipelines do",
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
    parser.add_argument(
        "--only",
        type=nonneg_int,
        metavar="I",
        help="draw image I of the batch alone (prompt I, seed --seed + I): the same picture as in the batch",
    )
    parser.add_argument(
        "--from-png",
        type=existing,
        metavar="FILE",
        help="remake the picture a minflux PNG records (its settings, from the file's metadata); only "
        + ", ".join("--" + f.replace("_", "-") for f in REPLAY_FLAGS)
        + " may be added",
    )


# Flags --from-png lets a user change: where the picture goes and how it is computed, not what is drawn.
REPLAY_FLAGS = ("out", "no_progress", "framework", "device", "compile", "keep_quantized", "offload")
# Flags that only generating reads: with --save-embeddings (encode, then stop) they would do nothing.
GENERATION_FLAGS = (
    "transformer",
    "ae",
    "ae_config",
    "random_weights",
    "seed",
    "steps",
    "guidance",
    "width",
    "height",
    "ref",
    "init",
    "strength",
    "mask",
    "mask_mode",
    "redux",
    "redux_model",
    "redux_embedder",
    "redux_scale",
    "redux_pooled_scale",
    "control",
    "compile",
    "keep_quantized",
    "out",
    "only",
)


def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    if args.save_embeddings is not None:
        return save_embeddings(plan, args.save_embeddings)
    if plan.refs:
        print(describe_references(plan))
    start = time.perf_counter()
    prompts = prompt_texts(plan)
    out = generate(plan)  # (B, H, W, 3) uint8
    outs = (
        [plan.out]
        if len(out) == 1
        else [plan.out.with_name(f"{plan.out.stem}-{i}{plan.out.suffix}") for i in range(len(out))]
    )
    for i, (path, image) in enumerate(zip(outs, out, strict=True)):
        images.save(image, path, metadata=png_metadata(plan, i, prompts[i] if prompts else None))
    print(
        f"wrote {', '.join(map(str, outs))}: {out.shape[2]}x{out.shape[1]}, {plan.model} ({plan.fw.name}), "
        f"{plan.steps} steps, seed {_seed_text(plan, len(out))}, {time.perf_counter() - start:.1f} s"
    )
    return 0


def _seed_text(plan: Plan, n: int) -> str:
    first = plan.seed + (plan.only or 0)
    return str(first) if n == 1 else f"{first}..{first + n - 1} (seed + i)"


# ---------------------------------------------------------------------------------------------
# Checking the inputs (framework-free: every error before a framework is imported)
# ---------------------------------------------------------------------------------------------


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """The command's own arguments (for their defaults, and to read a recorded command back)."""
    parser = _Recorded(prog="minflux generate", add_help=False)
    add_arguments(parser)
    return parser


class _Recorded(argparse.ArgumentParser):
    """A parser whose errors raise UsageError (a recorded command that no longer parses)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def _given(args: argparse.Namespace) -> list[str]:
    """The flags (dests) the command line sets (`args.typed_flags`, even at their default values), in the
    parser's order; for a Namespace built without them, those whose values differ from their defaults."""
    typed = getattr(args, "typed_flags", None)
    return [
        a.dest
        for a in _parser()._actions
        if a.option_strings
        and (
            a.dest in typed if typed is not None else getattr(args, a.dest, a.default) != a.default
        )
    ]


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the arguments and resolve every default; raises UsageError naming the flag."""
    if args.from_png is not None:
        args = replay(args)
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
    if (
        args.save_embeddings is not None
        and args.lora
        and "clip" not in family.text_parts(prompts.kind)
    ):
        raise UsageError(
            f"--lora does not apply with --save-embeddings for {name}: only a LoRA's CLIP-L / T5 parts reach "
            "the embeddings (FLUX.1); pass the LoRA when generating from the file"
        )
    random = args.random_weights
    fw = Framework(args.framework, args.dtype or ("fp32" if random else "bf16"), args.device)
    if not random and args.save_embeddings is None:
        _check_files(args, prompts is not None, (name, cfg), (ae_name, ae_cfg))
    ppt = configs.pixels_per_token(ae_cfg)
    ref_sizes, ref_fits = _references(args, name, cfg, ppt)
    default = ref_fits[0].size if ref_fits else (64, 64) if random else (1024, 1024)
    batch = _batch(args, prompts)
    if args.only is not None and args.save_embeddings is None:
        if args.only >= batch:
            raise UsageError(
                f"--only {args.only}: the batch has {batch} image(s), 0 to {batch - 1}"
            )
        prompts = prompts and _one_prompt(prompts, args.only)
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
        width=args.width if args.width is not None else default[0],
        height=args.height if args.height is not None else default[1],
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
        mask_mode=args.mask_mode or "max",
        ref_sizes=ref_sizes,
        ref_fits=ref_fits,
        size_from_ref=bool(ref_fits) and (args.width is None or args.height is None),
        only=args.only,
        batch=1 if args.only is not None else batch,
        offload=args.offload,
    )
    plan = dataclasses.replace(plan, kind=_check_request(plan, args))
    if args.save_embeddings is None:
        _check_memory(plan, args)
    return dataclasses.replace(plan, command=tuple(command_line(args, plan)))


def replay(args: argparse.Namespace) -> argparse.Namespace:
    """--from-png FILE: the arguments the PNG's metadata records (`png_metadata`), with the few flags a user may
    change (`REPLAY_FLAGS`) taken from the command line. UsageError naming the file or the flag."""
    path = args.from_png
    extra = [d for d in _given(args) if d not in (*REPLAY_FLAGS, "from_png")]
    if extra:
        raise UsageError(
            f"--from-png {path} replays the settings the file records; {_flag(extra[0])} cannot be added "
            f"(only {', '.join(map(_flag, REPLAY_FLAGS))})"
        )
    try:
        meta = images.metadata(path)
    except ValueError as e:
        raise UsageError(f"--from-png {e}") from None
    try:
        argv = json.loads(meta["minflux"])["argv"]
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise TypeError
    except (KeyError, ValueError, TypeError):
        raise UsageError(
            f"--from-png {path}: no minflux settings in its metadata (a PNG minflux generate wrote)"
        ) from None
    parser = _Recorded(prog=f"--from-png {path}", add_help=False)  # its errors name the file
    add_arguments(parser)
    recorded = parser.parse_args(argv)
    recorded.typed_flags = typed_flags(parser, argv)
    for dest in REPLAY_FLAGS:
        if dest in _given(args):
            setattr(recorded, dest, getattr(args, dest))
    return recorded


def _exclusive(args: argparse.Namespace) -> None:
    """Flags that exclude or need each other, whatever the model; no flag is silently ignored."""
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
    _unused(args)


def _unused(args: argparse.Namespace) -> None:
    """A flag that would do nothing in this combination is an error naming it and what it needs."""
    given = _given(args)
    if args.save_embeddings is not None:
        extra = [d for d in given if d in GENERATION_FLAGS]
        if extra:
            raise UsageError(
                f"{_flag(extra[0])} does not apply with --save-embeddings, which encodes the prompts and "
                "stops (generate later with --embeddings FILE)"
            )
        return
    negatives = ["neg_embeddings"] + (["negative_prompt"] if args.prompt else [])
    for dest in negatives:
        if dest in given and args.cfg == 1.0:
            raise UsageError(
                f"{_flag(dest)} applies with --cfg SCALE (true CFG); without it the negative prompt is "
                "not used"
            )
    for dest in ("redux_scale", "redux_pooled_scale"):
        if dest in given and not args.redux:
            raise UsageError(f"{_flag(dest)} applies with --redux IMAGE")
    if args.mask_mode is not None and args.mask is None:
        raise UsageError("--mask-mode applies with --mask MASK (inpainting)")


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
        with checkpoint.Checkpoint(path, quiet=True) as ckpt:
            try:
                checkpoint.check_holds(ckpt, want, name)
            except checkpoint.CheckpointError as e:
                # only when the file is an autoencoder: a transformer given as --ae is not a family mix-up
                other_ae = path is args.ae and family.AUTOENCODERS.get(
                    keymaps.infer_family(ckpt.meta)
                )
                hint = " (the transformer and autoencoder come from different families)"
                raise UsageError(f"{flag} {e}{hint if other_ae else ''}") from None
            stored = {dtype for dtype, _ in ckpt.meta.values()}
            if flag == "--transformer" and args.keep_quantized and not ckpt.quant:
                if not any(d.startswith("F8") for d in stored):
                    raise UsageError(
                        f"--keep-quantized keeps the quantized weights a --transformer file stores; {path} "
                        f"stores none ({', '.join(sorted(stored))})"
                    )


def _check_request(plan: Plan, args: argparse.Namespace) -> str:
    """The generation rules of `pipeline.generate` (`request.check_model`) on the plan, the flags
    named, then the flags that only the command has (--strength given, --redux, --guidance without
    an embedder, --mask-mode, --ref on a preset without references). Returns the input kind."""
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
    if args.mask_mode is not None and kind == "fill":
        raise UsageError(
            f"--mask-mode: {plan.model} is a Fill model, which reads the mask's pixels itself; --mask-mode "
            "applies to inpainting with the other models"
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
        raise UsageError(
            f"--guidance: {plan.model} has no guidance embedder, so distilled guidance does not apply "
            "(true CFG: --cfg SCALE with a negative prompt)"
        )
    return kind


def _references(args: argparse.Namespace, name: str, cfg, ppt: int) -> tuple[tuple, tuple]:
    """Each --ref's size and how it is prepared (`minflux.references.plan`); UsageError naming the file and
    the limit it breaks."""
    if args.ref and not family.preset(name).refs:
        raise UsageError(f"--ref: {name} takes no reference images ({family.refs_models()} do)")
    sizes, fits = [], []
    for path in args.ref:
        try:
            size, fit = references.plan(path, family.of(cfg), ppt)
        except ValueError as e:
            raise UsageError(f"--ref {e}") from None
        sizes.append(size)
        fits.append(fit)
    return tuple(sizes), tuple(fits)


def _batch(args: argparse.Namespace, prompts: TextPlan | None) -> int:
    """How many prompts (so images) the run has: --prompt's, the rows of --embeddings (read from its header),
    or 1 (random embeddings)."""
    if prompts is not None:
        return len(prompts.prompts)
    shape = _txt_shape(args.embeddings)
    return shape[0] if len(shape) == 3 else 1


def _txt_shape(path: Path | None) -> tuple[int, ...]:
    """The shape of an embedding file's `txt` from its header; () without one (`read_embeddings` says why)."""
    if path is None:
        return ()
    return tuple(checkpoint.Checkpoint(path, quiet=True).meta.get("txt", (None, ()))[1])


def _one_prompt(prompts: TextPlan, i: int) -> TextPlan:
    """--only I: prompt I (and its negative prompt, when there is one per prompt)."""
    negatives = prompts.negatives
    if len(negatives) > 1:
        negatives = negatives[i : i + 1]
    return dataclasses.replace(prompts, prompts=prompts.prompts[i : i + 1], negatives=negatives)


def _check_memory(plan: Plan, args: argparse.Namespace) -> None:
    """Refuse, before anything is allocated, a size or batch the machine's memory cannot hold
    (`minflux.memory.generate_bytes`, a rough estimate: weights, one block's activations, the decoder).
    Checked for runs on the CPU, whose memory is the host's; on a GPU the device's allocator answers."""
    on_gpu = memory.nvidia_gpus() > 0 and not (plan.fw.device or "").startswith("cpu")
    if on_gpu:
        return
    spec, ppt = family.of(plan.cfg), configs.pixels_per_token(plan.ae_cfg)
    txt = 16 if plan.random else (plan.text.max_length if plan.text else None) or 512
    txt = (_txt_shape(plan.embeddings) or (txt, txt))[-2]
    extra = sum(references.tokens(f, ppt) for f in plan.ref_fits) + (729 if plan.redux else 0)
    if plan.mask is not None and spec.inpaint_init_ref:  # the init image is a reference too
        extra += (plan.width // ppt) * (plan.height // ppt)
    estimate = memory.generate_bytes(
        plan.cfg,
        plan.ae_cfg,
        plan.width,
        plan.height,
        batch=plan.batch,
        # (references are tokens of the sequence as the text is)
        txt_tokens=txt + extra,
        dtype_bytes=1 if plan.keep_quantized else 4 if plan.fw.dtype == "fp32" else 2,
        pixels_per_token=ppt,
        attention_matrix=plan.fw.name == "jax",  # XLA on a CPU does not fuse attention
        cfg_scale=plan.true_cfg,
        # random weights are built whole, in host memory
        offload=plan.offload == "blocks" and not plan.random,
    )
    packed = " kept quantized" if plan.keep_quantized else ""
    what = f"{plan.model} ({plan.fw.dtype}{packed}) at --width {plan.width} --height {plan.height}"
    what += f" with {plan.batch} prompts" if plan.batch > 1 else ""
    what += " with --offload blocks" if plan.offload == "blocks" else ""
    try:
        memory.check(estimate, what)
    except memory.TooLarge as e:
        streams = plan.offload == "none" and not plan.random
        hint = " (--offload blocks holds one block of the transformer at a time)" if streams else ""
        raise UsageError(f"{e}{hint}") from None


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
        files.make_folders(out.parent)
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
    if plan.only is not None:  # --only I: prompt I (and its negative when there is one per prompt)
        i = plan.only
        emb = {k: v[i : i + 1] if len(v) == len(emb["txt"]) else v for k, v in emb.items()}
    return emb


# ---------------------------------------------------------------------------------------------
# Generating: the pipeline of the chosen framework
# ---------------------------------------------------------------------------------------------


def conditioning_images(plan: Plan) -> dict:
    """The images the pipeline takes (numpy HWC; references as `minflux.references` prepares them), checked
    before any model loads: a mask that repaints nothing is refused."""
    size = (plan.width, plan.height)
    load = {
        "refs": lambda: [
            references.load(p, f) for p, f in zip(plan.refs, plan.ref_fits, strict=True)
        ],
        "init": lambda: images.load(plan.init, size) if plan.init else None,
        "mask": lambda: images.load(plan.mask, size, gray=True) if plan.mask else None,
        "control": lambda: images.load(plan.control, size) if plan.control else None,
    }
    try:
        out = {k: f() for k, f in load.items()}
    except ValueError as e:
        raise UsageError(str(e)) from None
    ppt, spec = configs.pixels_per_token(plan.ae_cfg), family.of(plan.cfg)
    try:
        request.check_mask(out["mask"], plan.kind, spec, ppt, plan.mask_mode, f"--mask {plan.mask}")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return out


def describe_references(plan: Plan) -> str:
    """ "references: a.png 1000x400 -> 1568x672 (4116 tokens); output 1568x672, the first reference's size" """
    ppt = configs.pixels_per_token(plan.ae_cfg)
    refs = [
        references.describe(p, s, f, ppt)
        for p, s, f in zip(plan.refs, plan.ref_sizes, plan.ref_fits, strict=True)
    ]
    own = ", the first reference's size" if plan.size_from_ref else ""
    return f"references: {'; '.join(refs)}; output {plan.width}x{plan.height}{own}"


def generate(plan: Plan) -> np.ndarray:
    """(B, H, W, 3) uint8 images in the plan's framework."""
    cond = conditioning_images(plan)
    emb = load_embeddings(plan)  # first: a text encoder is freed before the transformer is loaded
    fw = plan.fw
    if plan.redux:
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
            seed=plan.seed + (plan.only or 0),  # image i from seed + i (--only I: I's alone)
            strength=plan.strength,
            mask_mode=plan.mask_mode,
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


# ---------------------------------------------------------------------------------------------
# What each PNG records: enough to remake it alone
# ---------------------------------------------------------------------------------------------


def _arg(value) -> str:
    """A recorded flag value: files as absolute paths (the command runs from any folder), LoRAs FILE:SCALE."""
    if isinstance(value, Path):
        return str(value.absolute())
    if isinstance(value, tuple):  # --lora (FILE, SCALE)
        return f"{_arg(value[0])}:{value[1]!r}"
    return repr(value) if isinstance(value, float) else str(value)


def _resolved(plan: Plan) -> dict:
    """The settings a recorded command writes out even when defaulted, by dest."""
    out = {
        "model": plan.model,
        "framework": plan.fw.name,
        "dtype": plan.fw.dtype,
        "seed": plan.seed,
        "steps": plan.steps,
    }
    if not plan.size_from_ref:  # (else the references give it again)
        out |= {"width": plan.width, "height": plan.height}
    if plan.cfg.guidance_embed:
        out["guidance"] = plan.guidance
    if plan.init is not None and plan.kind != "fill":
        out["strength"] = plan.strength
    if plan.mask is not None and plan.kind != "fill":
        out["mask_mode"] = plan.mask_mode
    return out


def command_line(args: argparse.Namespace, plan: Plan) -> list[str]:
    """The arguments of `minflux generate` that remake this run: every flag given, with the model, framework,
    dtype, seed, steps and size written out (a later version's defaults cannot change the picture); not where
    it is written or how it is shown (--out, --no-progress)."""
    resolved, argv = _resolved(plan), []
    for action in _parser()._actions:
        dest = action.dest
        if not action.option_strings or dest in (
            "out",
            "no_progress",
            "from_png",
            "save_embeddings",
        ):
            continue
        value = resolved.get(dest, getattr(args, dest, action.default))
        if value is None or value is False or (dest not in resolved and value == action.default):
            continue
        flag = action.option_strings[0]
        values = value if isinstance(value, list) else [value]
        argv += [flag] if value is True else [a for v in values for a in (flag, _arg(v))]
    return argv


def prompt_texts(plan: Plan) -> list[str] | None:
    """The prompts drawn, one per image: --prompt's, or those an embedding file records (`text.save_embeddings`);
    None when unknown."""
    if plan.text is not None:
        return list(plan.text.prompts)
    if plan.embeddings is None:
        return None
    try:
        _, meta = checkpoint.parse_header(plan.embeddings)
        texts = json.loads(meta["prompts"])
    except (KeyError, ValueError, TypeError, checkpoint.CheckpointError):
        return None
    if not isinstance(texts, list) or len(texts) < (plan.only or 0) + plan.batch:
        return None
    return texts[plan.only : plan.only + 1] if plan.only is not None else texts


def png_metadata(plan: Plan, i: int, prompt: str | None) -> dict[str, str]:
    """The text chunks of image i's PNG: its seed, prompt, model and settings, and the command that draws it
    alone (`--only i` in a batch), as a shell line and as JSON for `--from-png`."""
    from minflux_cli.main import version

    index = plan.only if plan.only is not None else i
    argv = list(plan.command) + (["--only", str(i)] if plan.only is None and plan.batch > 1 else [])
    settings = [f"{plan.width}x{plan.height}", f"{plan.steps} steps"]
    if plan.cfg.guidance_embed:
        settings.append(f"guidance {plan.guidance:g}")
    if plan.true_cfg:
        settings.append(f"cfg {plan.cfg_scale:g}")
    if plan.init is not None and plan.kind != "fill":
        settings.append(f"strength {plan.strength:g}")
    if plan.mask is not None and plan.kind != "fill":
        settings.append(f"mask mode {plan.mask_mode}")
    settings.append(f"{plan.fw.name} {plan.fw.dtype}")
    meta = {
        "prompt": prompt if prompt is not None else "(embeddings: see the command)",
        "seed": str(plan.seed + index),
        "model": plan.model,
        "settings": ", ".join(settings),
        "command": "minflux generate " + shlex.join(argv),
        "minflux": json.dumps({"version": version(), "argv": argv}),
    }
    if plan.random:
        meta["prompt"] = f"(random embeddings, seed {plan.seed})"
    return meta
