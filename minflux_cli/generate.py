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

Modes: text-to-image; `--ref` reference images (FLUX.1 Kontext: one; FLUX.2: several); `--init` with
`--strength` (img2img); `--init` with `--mask` (FLUX.1 Fill inpainting, white = repaint); `--control` (FLUX.1
Canny/Depth: the preprocessed control image, encoded and packed as extra input channels, as BFL's
`prepare_control` after its edge or depth detector).

Progress: PyTorch ticks a tqdm bar per step. JAX compiles the whole loop once (`lax.scan`) and ticks the
bar from inside the compiled loop through `jax.debug.callback`; the first call's bar waits for compilation
before its first tick.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from minflux import checkpoint, configs, keymaps, schedules, text

AE_FAMILY = {"flux1": "ae1", "flux2": "ae2"}
DEFAULT_GUIDANCE = {"flux1-fill-dev": 30.0, "flux1-kontext-dev": 2.5,  # BFL's cli_fill / cli_kontext defaults
                    "flux1-canny-dev": 30.0, "flux1-depth-dev": 10.0}  # and cli_control's
FAMILY_NAME = {"flux1": "FLUX.1", "flux2": "FLUX.2", "ae1": "FLUX.1 autoencoder", "ae2": "FLUX.2 autoencoder"}


class GenerateError(Exception):
    """A problem with the command's inputs; the message says which and why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="transformer preset (e.g. flux1-dev, flux2-klein-4b; default with "
                        "--random-weights: flux1-tiny)")
    parser.add_argument("--transformer", type=Path, help="transformer checkpoint (safetensors file or directory)")
    parser.add_argument("--ae", type=Path, help="autoencoder checkpoint (safetensors)")
    parser.add_argument("--ae-config", help="autoencoder preset (default: flux1-ae / flux2-ae, or the tiny one)")
    parser.add_argument("--embeddings", type=Path, help="prompt embeddings: safetensors with `txt` (B, L, D) and, "
                        "for FLUX.1, `vec` (B, 768); B prompts give B images")
    parser.add_argument("--neg-embeddings", type=Path, help="negative-prompt embeddings (same format) for --cfg")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a prompt, encoded with --text-encoder (repeatable: one image each)")
    parser.add_argument("--negative-prompt", action="append", metavar="TEXT",
                        help="negative prompt for --cfg (default \"\"; one, or one per --prompt)")
    parser.add_argument("--text-encoder", type=Path, metavar="DIR",
                        help="text encoder for --prompt: FLUX.1, a root with text_encoder/ (CLIP-L) + text_encoder_2/ "
                        "(T5) + tokenizer/ + tokenizer_2/; FLUX.2, a model directory (config.json, safetensors, "
                        "tokenizer.json) or a root with text_encoder/ + tokenizer/ (Mistral Small 3.x for dev, Qwen3 "
                        "for klein)")
    parser.add_argument("--max-length", type=int, help="prompt tokens for T5 / FLUX.2 (default 512, 256 schnell)")
    parser.add_argument("--text-encoder-layers", metavar="K,K,K",
                        help="FLUX.2: hidden_states indices stacked, e.g. 9,18,27 (default: the official ones)")
    parser.add_argument("--save-embeddings", type=Path, metavar="FILE", help="encode --prompt to this safetensors "
                        "file (negatives to FILE-neg) and exit; generate later with --embeddings")
    parser.add_argument("--random-weights", action="store_true", help="tiny random models and embeddings, no files")
    parser.add_argument("--framework", choices=("torch", "jax"), default="torch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="default: 4 for distilled schnell/klein, 28 FLUX.1, 50 FLUX.2")
    parser.add_argument("--guidance", type=float, help="distilled guidance (default 3.5 FLUX.1, 30 Fill, 2.5 "
                        "Kontext, 4 FLUX.2 dev)")
    parser.add_argument("--cfg", type=float, default=1.0, help="true CFG scale (needs --neg-embeddings); 1 = off")
    parser.add_argument("--width", type=int, help="pixels, a multiple of 16 (default 1024; 64 random)")
    parser.add_argument("--height", type=int, help="pixels, a multiple of 16 (default 1024; 64 random)")
    parser.add_argument("--ref", type=Path, action="append", default=[], help="reference image (repeatable)")
    parser.add_argument("--init", type=Path, help="start image: img2img, or the image to inpaint with --mask")
    parser.add_argument("--strength", type=float, default=0.8, help="img2img: 1 = ignore the init image")
    parser.add_argument("--mask", type=Path, help="FLUX.1 Fill: inpainting mask (white = repaint)")
    parser.add_argument("--control", type=Path, help="FLUX.1 Canny/Depth: the control image, already preprocessed "
                        "(a Canny edge map or a depth map); resized to the output size")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 (fp32 with --random-weights)")
    parser.add_argument("--device", help="PyTorch device (default: cuda if available)")
    parser.add_argument("--compile", action="store_true", help="PyTorch: torch.compile the transformer")
    parser.add_argument("--out", type=Path, default=Path("minflux.png"), help="output PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
        if args.save_embeddings is not None:
            return save_embeddings(plan)
        start = time.perf_counter()
        images = (generate_torch if args.framework == "torch" else generate_jax)(plan)  # (B, H, W, 3) uint8
    except (GenerateError, checkpoint.CheckpointError) as e:
        print("minflux generate: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line
        return 2
    from PIL import Image

    args.out.parent.mkdir(parents=True, exist_ok=True)
    outs = [args.out] if len(images) == 1 else [args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}")
                                                for i in range(len(images))]
    for out, image in zip(outs, images, strict=True):
        Image.fromarray(image).save(out)
    print(f"wrote {', '.join(map(str, outs))}: {images.shape[2]}x{images.shape[1]}, {plan['model']} "
          f"({args.framework}), {plan['steps']} steps, {time.perf_counter() - start:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------------
# Checking the inputs (framework-free: every error before a framework is imported)
# ---------------------------------------------------------------------------------------------


def _file(path: Path | None, what: str, flag: str) -> Path:
    if path is None:
        raise GenerateError(f"{flag} is required ({what}); or pass --random-weights for a demo without files")
    if not path.exists():
        raise GenerateError(f"{flag} {path}: no such file or directory ({what})")
    return path


def _family_of(path: Path) -> str | None:
    return keymaps.infer_family(checkpoint.Checkpoint(path).meta)


def make_plan(args: argparse.Namespace) -> dict:
    """Validate the arguments and resolve every default; returns what both frameworks need."""
    random = args.random_weights
    name = args.model or ("flux1-tiny" if random else None)
    if name is None:
        raise GenerateError(f"--model is required with --transformer; presets: {', '.join(configs.names())}")
    try:
        cfg = configs.resolve(name)
        family = cfg.family
        if family not in AE_FAMILY:
            raise GenerateError(f"--model {name} is a {FAMILY_NAME.get(family, family)}, not a transformer")
        ae_name = args.ae_config or f"{family}-ae" + ("-tiny" if random or name.endswith("-tiny") else "")
        ae_cfg = configs.resolve(ae_name)
    except KeyError as e:
        raise GenerateError(str(e.args[0])) from None
    if ae_cfg.family != AE_FAMILY[family]:
        raise GenerateError(f"--ae-config {ae_name} is a {FAMILY_NAME.get(ae_cfg.family, ae_cfg.family)}; "
                            f"{name} is {FAMILY_NAME[family]} and needs a {FAMILY_NAME[AE_FAMILY[family]]}")
    prompts = text_plan(args, name, cfg)
    dtype = args.dtype or ("fp32" if random else "bf16")
    if args.save_embeddings is not None:  # encode and stop: no transformer, autoencoder or image settings
        return {"model": name, "cfg": cfg, "family": family, "args": args, "text": prompts, "dtype": dtype}
    if not random:
        transformer = _file(args.transformer, "the transformer checkpoint", "--transformer")
        ae = _file(args.ae, "the autoencoder checkpoint", "--ae")
        if prompts is None:
            _file(args.embeddings, "the prompt embeddings (or pass --prompt with --text-encoder)", "--embeddings")
            if args.cfg != 1.0:
                _file(args.neg_embeddings, "the negative prompt's embeddings, for --cfg", "--neg-embeddings")
        found = _family_of(transformer)
        if found is not None and found != family:
            raise GenerateError(f"--transformer {transformer} holds a {FAMILY_NAME.get(found, found)} checkpoint "
                                f"but --model {name} is {FAMILY_NAME[family]}")
        found_ae = _family_of(ae)
        if found_ae is not None and found_ae != AE_FAMILY[family]:
            raise GenerateError(f"--ae {ae} holds a {FAMILY_NAME.get(found_ae, found_ae)} but the transformer is "
                                f"{FAMILY_NAME[family]}: the transformer and autoencoder come from different families")
    # The real autoencoders downsample 8x (16 px per token); the tiny ones less.
    ppt = 2 * 2 ** (len(ae_cfg.ch_mult) - 1)
    width = args.width or (64 if random else 1024)
    height = args.height or (64 if random else 1024)
    try:
        schedules.check_size(width, height)
        schedules.token_grid(width, height, ppt)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    # FLUX.1 Fill adds the masked image's 64 token channels and the mask folded f x f then 2x2 (f = 8: 256).
    fill_channels = 64 + 64 + 4 * (ppt // 2) ** 2
    fill = family == "flux1" and cfg.in_channels == fill_channels
    control = family == "flux1" and cfg.in_channels == 128  # 64 image + 64 control-image token channels
    if family == "flux1" and cfg.in_channels not in (64, 128, fill_channels):
        raise GenerateError(f"--model {name} takes {cfg.in_channels} input channels: neither text-to-image (64), "
                            f"Canny/Depth (128) nor Fill ({fill_channels})")
    if control and args.control is None:
        raise GenerateError(f"{name} is a structural-control (Canny/Depth) model: pass --control IMAGE, an edge "
                            "map or a depth map")
    if args.control is not None and not control:
        raise GenerateError(f"--control needs a FLUX.1 Canny/Depth model (in_channels 128); {name} has "
                            f"{cfg.in_channels}")
    if args.mask is not None and not fill:
        raise GenerateError(f"--mask needs a FLUX.1 Fill model (in_channels {fill_channels}); {name} has "
                            f"{cfg.in_channels}")
    if fill and (args.mask is None or args.init is None):
        raise GenerateError(f"{name} is an inpainting (Fill) model: pass --init IMAGE and --mask MASK")
    for p, flag in [(r, "--ref") for r in args.ref] + [(args.init, "--init"), (args.mask, "--mask"),
                                                       (args.control, "--control")]:
        if p is not None and not p.exists():
            raise GenerateError(f"{flag} {p}: no such file")
    if family == "flux1" and len(args.ref) > 1:
        raise GenerateError(f"FLUX.1 Kontext takes one --ref image, got {len(args.ref)}")
    cfg_on = args.cfg != 1.0
    steps = args.steps or (4 if random or (not cfg.guidance_embed and not cfg_on) else
                           (28 if family == "flux1" else 50))
    if steps < 1:
        raise GenerateError(f"--steps must be >= 1, got {steps}")
    guidance = args.guidance
    if guidance is None:
        guidance = DEFAULT_GUIDANCE.get(name, 3.5 if family == "flux1" else 4.0)
    if args.guidance is not None and not cfg.guidance_embed:
        print(f"minflux generate: note: {name} has no guidance embedder; --guidance is ignored "
              "(use --cfg with a negative prompt for true CFG)", file=sys.stderr)
    if args.init is not None and args.mask is None:
        try:
            schedules.strength_start(steps, args.strength)
        except ValueError as e:
            raise GenerateError(str(e)) from None
    return {"model": name, "cfg": cfg, "family": family, "ae_name": ae_name, "ae_cfg": ae_cfg, "random": random,
            "args": args, "width": width, "height": height, "ppt": ppt, "steps": steps, "guidance": guidance,
            "cfg_scale": args.cfg, "fill": fill, "control": control, "dtype": dtype, "text": prompts}


def encoder_kind(name: str, family: str, directory: Path) -> str:
    """The text encoder a preset was trained with: FLUX.1 -> CLIP-L + T5, FLUX.2 dev -> Mistral, klein -> Qwen3;
    other FLUX.2 presets (the tiny ones) take the kind config.json names."""
    if family == "flux1":
        return "flux1"
    want = "qwen3" if "klein" in name else "mistral" if name == "flux2-dev" else None
    try:
        model_dir = text.resolve_dirs("qwen3", directory)[0]  # (Qwen3 and Mistral share the repo subfolders)
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (FileNotFoundError, ValueError) as e:
        raise GenerateError(f"--text-encoder {directory}: {e}") from None
    found = next((k for k in ("qwen3", "mistral") if model_type in text.SPECS[k].model_types), None)
    if want is not None and found != want:
        raise GenerateError(f"--text-encoder {directory}: {name} takes a {want} text encoder, but "
                            f"{model_dir / 'config.json'} holds model_type {model_type!r}")
    if found is None:
        raise GenerateError(f"--text-encoder {directory}: {model_dir / 'config.json'} holds model_type "
                            f"{model_type!r}; FLUX.2 takes a qwen3 or mistral text encoder")
    return found


def text_plan(args: argparse.Namespace, name: str, cfg) -> dict | None:
    """With --prompt: the text encoder's kind, directories, lengths and stacked layers, checked against the model
    (output widths against context_in_dim / vec_in_dim) from the config files alone, before any weight is read.
    None without --prompt."""
    if not args.prompt:
        for flag in ("text_encoder", "negative_prompt", "save_embeddings", "max_length", "text_encoder_layers"):
            if getattr(args, flag) is not None:
                raise GenerateError(f"--{flag.replace('_', '-')} needs --prompt")
        return None
    for flag in ("embeddings", "neg_embeddings"):
        if getattr(args, flag) is not None:
            raise GenerateError(f"--prompt and --{flag.replace('_', '-')} exclude each other: the prompt is encoded "
                                "here, or read from a file")
    directory = args.text_encoder
    if directory is None:
        raise GenerateError("--prompt needs --text-encoder DIR (or encode elsewhere and pass --embeddings)")
    if not directory.is_dir():
        raise GenerateError(f"--text-encoder {directory}: no such directory")
    kind = encoder_kind(name, cfg.family, directory)
    if args.max_length is not None and args.max_length < 1:
        raise GenerateError(f"--max-length must be >= 1, got {args.max_length}")
    max_length = args.max_length or (256 if "schnell" in name else None)  # BFL: T5 at 256 tokens for schnell
    layers = None
    if args.text_encoder_layers is not None:
        if kind == "flux1":
            raise GenerateError("--text-encoder-layers is for FLUX.2's decoder text encoders, not CLIP + T5")
        try:
            layers = tuple(int(k) for k in args.text_encoder_layers.split(","))
        except ValueError:
            raise GenerateError(f"--text-encoder-layers {args.text_encoder_layers!r}: expected integers like "
                                "9,18,27") from None
    if kind == "flux1":
        missing = [str(directory / d / "config.json") for d in ("text_encoder", "text_encoder_2")
                   if not (directory / d / "config.json").is_file()]
        if missing:
            raise GenerateError(f"--text-encoder {directory}: FLUX.1 takes CLIP-L and T5 from a diffusers-style "
                                "root (text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/); no "
                                + ", ".join(missing))
    for part in ("clip", "t5") if kind == "flux1" else (kind,):
        try:
            s = text.spec(part, None if part == "clip" else max_length, layers)
            model_dir, tok_dir = text.resolve_dirs(part, directory)
            text.tokenizer_files(tok_dir, s.arch)
            tcfg = text.read_config(part, model_dir)
            if s.arch == "decoder":
                text.check_layers(s, tcfg, model_dir / "config.json")
            text.check_length(s, tcfg, model_dir / "config.json")
        except (FileNotFoundError, ValueError) as e:
            raise GenerateError(f"--text-encoder {directory}: {e}") from None
        if s.arch == "decoder":
            width, how = len(s.layers) * tcfg.hidden_size, f"{len(s.layers)} stacked layers x hidden {tcfg.hidden_size}"
        else:
            width, how = (tcfg.d_model, "d_model") if s.arch == "t5" else (tcfg.hidden_size, "hidden_size")
        field = "vec_in_dim" if s.output == "vec" else "context_in_dim"
        if width != getattr(cfg, field):
            raise GenerateError(f"--text-encoder {directory}: the {part} text encoder ({model_dir}) outputs width "
                                f"{width} ({how}), but {name} has {field} {getattr(cfg, field)}")
    negatives = list(args.negative_prompt or [])
    if args.cfg != 1.0 and not negatives:
        negatives = [""]  # the official pipelines' default negative prompt
    if negatives and args.cfg == 1.0 and args.save_embeddings is None:
        print("minflux generate: note: --negative-prompt is ignored without --cfg", file=sys.stderr)
        negatives = []
    if len(negatives) not in (0, 1, len(args.prompt)):
        raise GenerateError(f"{len(negatives)} --negative-prompt for {len(args.prompt)} --prompt: pass one, or one "
                            "per prompt")
    return {"kind": kind, "dir": directory, "prompts": list(args.prompt), "negatives": negatives,
            "max_length": max_length, "layers": layers}


def read_embeddings(path: Path, plan: dict, flag: str) -> dict[str, np.ndarray]:
    """`txt` (B, L, D) and, for FLUX.1, `vec` (B, 768) from a prompt-embedding file (the format
    `minflux.text.save_embeddings` writes), as fp32; shapes checked against the model."""
    cfg = plan["cfg"]
    ckpt = checkpoint.Checkpoint(path)  # reads bf16 too; errors name the file
    wanted = {"txt": ("L", cfg.context_in_dim)}
    if plan["family"] == "flux1":
        wanted["vec"] = (cfg.vec_in_dim,)
    emb = {}
    for key, shape in wanted.items():
        if key not in ckpt.meta:
            raise GenerateError(f"{flag} {path}: no {key!r} tensor (found {sorted(ckpt.meta)}); "
                                f"{FAMILY_NAME[plan['family']]} needs {' and '.join(map(repr, wanted))}")
        a = ckpt.get(key).astype(np.float32)
        a = a[None] if a.ndim == len(shape) else a  # one prompt without a batch axis
        if a.ndim != len(shape) + 1 or a.shape[-1] != shape[-1]:
            raise GenerateError(f"{flag} {path}: {key!r} has shape {ckpt.meta[key][1]}; {plan['model']} "
                                f"needs (B, {', '.join(map(str, shape))})")
        emb[key] = a
    if "vec" in emb and len(emb["vec"]) != len(emb["txt"]):
        raise GenerateError(f"{flag} {path}: {len(emb['txt'])} txt prompts but {len(emb['vec'])} vec")
    return emb


def encode_text(plan: dict) -> dict[str, np.ndarray]:
    """--prompt and the negative prompts through the text encoder in the chosen framework, as one batch; the encoder
    is freed before this returns (`encode_prompts`). txt (B, L, D), vec (B, 768) for FLUX.1, and neg_txt / neg_vec
    for the negatives; numpy in the encoder's dtype (bf16 stays bf16)."""
    tp, args = plan["text"], plan["args"]
    prompts, n = tp["prompts"] + tp["negatives"], len(tp["prompts"])
    kw = {"max_length": tp["max_length"], "layers": tp["layers"]}
    try:
        if args.framework == "torch":
            import torch

            from minflux_torch import text as tt
            from minflux_torch.load import to_numpy

            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[plan["dtype"]]
            out = {k: to_numpy(v) for k, v in tt.encode_prompts(tp["kind"], tp["dir"], prompts, dtype, device,
                                                                **kw).items()}
        else:
            import jax
            import jax.numpy as jnp

            from minflux_jax import text as jt

            dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[plan["dtype"]]
            out = {k: np.asarray(jax.device_get(v)) for k, v in jt.encode_prompts(tp["kind"], tp["dir"], prompts,
                                                                                  dtype, **kw).items()}
    except (FileNotFoundError, ValueError) as e:  # (CheckpointError, naming the file, passes through)
        raise GenerateError(f"--text-encoder {tp['dir']}: {e}") from None
    emb = {}
    for k, v in out.items():
        k = "txt" if k == "ctx" else k  # FLUX.2's ctx is the transformer's txt input
        emb[k], emb["neg_" + k] = v[:n], v[n:]
    return {k: v for k, v in emb.items() if len(v)}


def save_embeddings(plan: dict) -> int:
    """--save-embeddings FILE: the prompts' embeddings to FILE, the negative prompts' (if any) to FILE-neg."""
    emb, tp, path = encode_text(plan), plan["text"], plan["args"].save_embeddings
    outs = [(path, "", tp["prompts"])]
    if tp["negatives"]:
        outs.append((path.with_name(f"{path.stem}-neg{path.suffix}"), "neg_", tp["negatives"]))
    for out, prefix, prompts in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        text.save_embeddings(out, {k: emb[prefix + k] for k in ("txt", "vec") if prefix + k in emb}, tp["kind"],
                             prompts)
        print(f"wrote {out}: {len(prompts)} prompt(s), txt {emb[prefix + 'txt'].shape} ({tp['kind']}, "
              f"{plan['args'].framework})")
    return 0


def load_embeddings(plan: dict) -> dict[str, np.ndarray]:
    """txt (B, L, D), vec (B, 768) for FLUX.1, and neg_txt / neg_vec with --cfg; fp32 numpy."""
    cfg, args = plan["cfg"], plan["args"]
    cfg_on = plan["cfg_scale"] != 1.0
    if plan["text"] is not None:
        return {k: v.astype(np.float32) for k, v in encode_text(plan).items()}
    if plan["random"]:
        rng = np.random.default_rng(args.seed)
        emb = {"txt": rng.standard_normal((1, 16, cfg.context_in_dim), np.float32)}
        if plan["family"] == "flux1":
            emb["vec"] = rng.standard_normal((1, cfg.vec_in_dim), np.float32)
        if cfg_on:  # an all-zero negative prompt
            emb.update({"neg_" + k: np.zeros_like(v) for k, v in emb.items()})
        return emb
    emb = read_embeddings(args.embeddings, plan, "--embeddings")
    if cfg_on:
        neg = read_embeddings(args.neg_embeddings, plan, "--neg-embeddings")
        if len(neg["txt"]) not in (1, len(emb["txt"])) or neg["txt"].shape[1] != emb["txt"].shape[1]:
            raise GenerateError(f"--neg-embeddings {args.neg_embeddings}: txt {neg['txt'].shape} does not match "
                                f"--embeddings txt {emb['txt'].shape} (same length; one negative or one per prompt)")
        emb.update({"neg_" + k: v for k, v in neg.items()})
    return emb


def load_image(path: Path, size: tuple[int, int] | None = None, multiple: int = 16, gray: bool = False,
               max_pixels: int | None = None) -> np.ndarray:
    """An image file as float32 HWC in [-1, 1] (gray: HW1 in [0, 1]); resized to `size` (w, h) if given, else
    scaled down to at most `max_pixels` and center-cropped to a multiple of `multiple` pixels."""
    from PIL import Image

    img = Image.open(path).convert("L" if gray else "RGB")
    if size is not None:
        img = img.resize(size, Image.Resampling.LANCZOS)
    else:
        if max_pixels and img.size[0] * img.size[1] > max_pixels:
            scale = (max_pixels / (img.size[0] * img.size[1])) ** 0.5
            img = img.resize((int(img.size[0] * scale), int(img.size[1] * scale)), Image.Resampling.LANCZOS)
        w, h = img.size
        nw, nh = w // multiple * multiple, h // multiple * multiple
        if not nw or not nh:
            raise GenerateError(f"{path}: {w}x{h} is smaller than {multiple} pixels")
        img = img.crop(((w - nw) // 2, (h - nh) // 2, (w - nw) // 2 + nw, (h - nh) // 2 + nh))
    a = np.asarray(img, np.float32) / 255.0
    return a[..., None] if gray else 2.0 * a - 1.0


def ref_pixels(plan: dict) -> int | None:
    """FLUX.2 scales references down to 2024^2 pixels (one) or 1024^2 (several), as BFL's `encode_image_refs`."""
    if plan["family"] != "flux2":
        return None
    return 2024**2 if len(plan["args"].ref) == 1 else 1024**2


def to_png(image: np.ndarray) -> np.ndarray:
    """Floats in [-1, 1] -> uint8, clipped and rounded."""
    return np.round(127.5 * (np.clip(image, -1.0, 1.0) + 1.0)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The two frameworks: the same steps, each in its own layout (NCHW / NHWC)
# ---------------------------------------------------------------------------------------------


def generate_torch(plan: dict) -> np.ndarray:
    import torch

    import minflux_torch as mt
    from minflux_torch import sampling

    args, family = plan["args"], plan["family"]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[plan["dtype"]]
    emb = load_embeddings(plan)  # first: a text encoder is freed before the transformer is loaded
    if plan["random"]:
        model = mt.build_model(plan["cfg"], seed=args.seed, dtype=dtype, device=device)
        ae = mt.build_model(plan["ae_cfg"], seed=args.seed + 1, dtype=dtype, device=device)
    else:
        model = mt.load_model(plan["cfg"], args.transformer, dtype=dtype, device=device)
        ae = mt.load_model(plan["ae_cfg"], args.ae, dtype=dtype, device=device)
    if args.compile:
        model = torch.compile(model)  # attribute access (model.params) passes through to the module
    emb = {k: torch.from_numpy(v).to(device) for k, v in emb.items()}
    nchw = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].to(device, dtype)  # HWC -> (1, C, H, W)
    size = (plan["width"], plan["height"])
    with torch.inference_mode():
        refs = [ae.encode(nchw(load_image(p, multiple=plan["ppt"], max_pixels=ref_pixels(plan)))) for p in args.ref]
        init = ae.encode(nchw(load_image(args.init, size))) if args.init is not None else None
        img_cond = None
        if plan["fill"]:
            mask = nchw(load_image(args.mask, size, gray=True))
            masked = ae.encode(nchw(load_image(args.init, size)) * (1 - mask))
            img_cond = sampling.fill_conditioning(masked, mask, factor=plan["ppt"] // 2)
            init = None
        if plan["control"]:
            img_cond = sampling.pack(ae.encode(nchw(load_image(args.control, size))), family)
        noise = sampling.get_noise(len(emb["txt"]), plan["height"], plan["width"], family, args.seed, device=device,
                                   pixels_per_token=plan["ppt"])
        latents = sampling.sample(model, noise, emb["txt"], emb.get("vec"), steps=plan["steps"],
                                  guidance=plan["guidance"], cfg_scale=plan["cfg_scale"], neg_txt=emb.get("neg_txt"),
                                  neg_vec=emb.get("neg_vec"), refs=refs, img_cond=img_cond, init=init,
                                  strength=args.strength, progress=not args.no_progress)
        images = torch.cat([ae.decode(z[None].to(dtype)) for z in latents])  # one at a time: bounded memory
    return to_png(images.permute(0, 2, 3, 1).float().cpu().numpy())


def random_jax(cfg, seed: int, dtype):
    """A Flax model with numpy-drawn random weights, by one rule over its own abstract state.

    Flax's eager init compiles a small program per parameter shape: 10-20 s for the tiny models on a CPU,
    against milliseconds here. Kernels ~ N(0, 1/fan_in) (fan_in: every axis but the last), norm scales and
    variances 1, biases and means 0.
    """
    import jax.numpy as jnp
    from flax import nnx

    from minflux_jax.load import abstract_model

    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(state):
        shape, name = var.shape, path[-1]
        if len(shape) >= 2:
            value = rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[:-1]))
        else:
            value = np.full(shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)
        var.set_value(jnp.asarray(value, var.dtype))
    return nnx.merge(graphdef, state)


def generate_jax(plan: dict) -> np.ndarray:
    import jax.numpy as jnp
    from flax import nnx

    import minflux_jax as mj
    from minflux_jax import sampling

    args, family = plan["args"], plan["family"]
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[plan["dtype"]]
    emb = load_embeddings(plan)  # first: a text encoder is freed before the transformer is loaded
    if plan["random"]:
        model = random_jax(plan["cfg"], args.seed, dtype)
        ae = random_jax(plan["ae_cfg"], args.seed + 1, dtype)
    else:
        model = mj.load_model(plan["cfg"], args.transformer, dtype=dtype)
        ae = mj.load_model(plan["ae_cfg"], args.ae, dtype=dtype)
    emb = {k: jnp.asarray(v) for k, v in emb.items()}
    encode, decode = nnx.jit(lambda m, x: m.encode(x)), nnx.jit(lambda m, z: m.decode(z))  # one program each
    nhwc = lambda a: jnp.asarray(a, dtype)[None]  # HWC -> (1, H, W, C)
    size = (plan["width"], plan["height"])
    refs = [encode(ae, nhwc(load_image(p, multiple=plan["ppt"], max_pixels=ref_pixels(plan)))) for p in args.ref]
    init = encode(ae, nhwc(load_image(args.init, size))) if args.init is not None else None
    img_cond = None
    if plan["fill"]:
        mask = nhwc(load_image(args.mask, size, gray=True))
        masked = encode(ae, nhwc(load_image(args.init, size)) * (1 - mask))
        img_cond = sampling.fill_conditioning(masked, mask, factor=plan["ppt"] // 2)
        init = None
    if plan["control"]:
        img_cond = sampling.pack(encode(ae, nhwc(load_image(args.control, size))), family)
    noise = sampling.get_noise(len(emb["txt"]), plan["height"], plan["width"], family, args.seed,
                               pixels_per_token=plan["ppt"])
    latents = sampling.sample(model, noise, emb["txt"], emb.get("vec"), steps=plan["steps"],
                              guidance=plan["guidance"], cfg_scale=plan["cfg_scale"], neg_txt=emb.get("neg_txt"),
                              neg_vec=emb.get("neg_vec"), refs=refs, img_cond=img_cond, init=init,
                              strength=args.strength, progress=not args.no_progress)
    images = np.concatenate([np.asarray(decode(ae, z[None].astype(dtype)), np.float32) for z in latents])
    return to_png(images)
