"""`minflux generate`: sample a PNG with either framework from local checkpoints.

Inputs are local files only: a transformer checkpoint (`--transformer`, any layout `load_model` reads,
with its preset `--model`), an autoencoder (`--ae`), and a prompt-embedding file (`--embeddings`, the
format `minflux.text.save_embeddings` writes): safetensors holding `txt` (B, L, context_in_dim) and, for
FLUX.1, `vec` (B, 768); B prompts give B images (`out-0.png`, ...). True CFG (`--cfg`, e.g. klein base)
takes the negative prompt from a second file, `--neg-embeddings`. Text encoders are not run here.
`--random-weights` needs no files at all: random tiny models (`flux1-tiny` / `flux2-tiny` and their
tiny autoencoders) and random embeddings, a smoke test of the whole path.

Modes: text-to-image; `--ref` reference images (FLUX.1 Kontext: one; FLUX.2: several); `--init` with
`--strength` (img2img); `--init` with `--mask` (FLUX.1 Fill inpainting, white = repaint).

Progress: PyTorch ticks a tqdm bar per step. JAX compiles the whole loop once (`lax.scan`) and ticks the
bar from inside the compiled loop through `jax.debug.callback`; the first call's bar waits for compilation
before its first tick.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from minflux import checkpoint, configs, keymaps, schedules

AE_FAMILY = {"flux1": "ae1", "flux2": "ae2"}
DEFAULT_GUIDANCE = {"flux1-fill-dev": 30.0, "flux1-kontext-dev": 2.5}  # BFL's cli_fill / cli_kontext defaults
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
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 (fp32 with --random-weights)")
    parser.add_argument("--device", help="PyTorch device (default: cuda if available)")
    parser.add_argument("--compile", action="store_true", help="PyTorch: torch.compile the transformer")
    parser.add_argument("--out", type=Path, default=Path("minflux.png"), help="output PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
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
    if not random:
        transformer = _file(args.transformer, "the transformer checkpoint", "--transformer")
        ae = _file(args.ae, "the autoencoder checkpoint", "--ae")
        _file(args.embeddings, "the prompt embeddings", "--embeddings")
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
    if family == "flux1" and cfg.in_channels not in (64, fill_channels):
        raise GenerateError(f"--model {name} takes {cfg.in_channels - 64} control channels (Canny/Depth): "
                            "not supported by generate")
    if args.mask is not None and not fill:
        raise GenerateError(f"--mask needs a FLUX.1 Fill model (in_channels {fill_channels}); {name} has "
                            f"{cfg.in_channels}")
    if fill and (args.mask is None or args.init is None):
        raise GenerateError(f"{name} is an inpainting (Fill) model: pass --init IMAGE and --mask MASK")
    for p, flag in [(r, "--ref") for r in args.ref] + [(args.init, "--init"), (args.mask, "--mask")]:
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
            "cfg_scale": args.cfg, "fill": fill, "dtype": args.dtype or ("fp32" if random else "bf16")}


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


def load_embeddings(plan: dict) -> dict[str, np.ndarray]:
    """txt (B, L, D), vec (B, 768) for FLUX.1, and neg_txt / neg_vec with --cfg; fp32 numpy."""
    cfg, args = plan["cfg"], plan["args"]
    cfg_on = plan["cfg_scale"] != 1.0
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
    if plan["random"]:
        model = mt.build_model(plan["cfg"], seed=args.seed, dtype=dtype, device=device)
        ae = mt.build_model(plan["ae_cfg"], seed=args.seed + 1, dtype=dtype, device=device)
    else:
        model = mt.load_model(plan["cfg"], args.transformer, dtype=dtype, device=device)
        ae = mt.load_model(plan["ae_cfg"], args.ae, dtype=dtype, device=device)
    if args.compile:
        model = torch.compile(model)  # attribute access (model.params) passes through to the module
    emb = {k: torch.from_numpy(v).to(device) for k, v in load_embeddings(plan).items()}
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
    if plan["random"]:
        model = random_jax(plan["cfg"], args.seed, dtype)
        ae = random_jax(plan["ae_cfg"], args.seed + 1, dtype)
    else:
        model = mj.load_model(plan["cfg"], args.transformer, dtype=dtype)
        ae = mj.load_model(plan["ae_cfg"], args.ae, dtype=dtype)
    emb = {k: jnp.asarray(v) for k, v in load_embeddings(plan).items()}
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
    noise = sampling.get_noise(len(emb["txt"]), plan["height"], plan["width"], family, args.seed,
                               pixels_per_token=plan["ppt"])
    latents = sampling.sample(model, noise, emb["txt"], emb.get("vec"), steps=plan["steps"],
                              guidance=plan["guidance"], cfg_scale=plan["cfg_scale"], neg_txt=emb.get("neg_txt"),
                              neg_vec=emb.get("neg_vec"), refs=refs, img_cond=img_cond, init=init,
                              strength=args.strength, progress=not args.no_progress)
    images = np.concatenate([np.asarray(decode(ae, z[None].astype(dtype)), np.float32) for z in latents])
    return to_png(images)
