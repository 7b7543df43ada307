"""`minflux cache`: images + captions -> the cached latents and text embeddings `minflux train --data` reads.

Every image `NAME.png|jpg|jpeg|webp` in a folder needs a caption `NAME.txt` beside it. Images are centre-cropped
and resized to `--size` pixels, encoded by the model family's autoencoder, captions by its text encoder
(chosen as `minflux generate` chooses it), both in `--framework`; the encoders are dropped in turn. The output
is safetensors shards (`minflux.train.LatentShards`): img (N, L, C) latent tokens, img_ids, txt, txt_ids and,
for FLUX.1, vec; each shard is written atomically, so an interrupted run leaves only whole shards. The empty
prompt's embedding goes to `empty_caption.safetensors`, for caption dropout (`minflux train --caption-dropout`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class CacheError(Exception):
    """Bad input to `minflux cache`; the message names the file or flag."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path, help="folder of images, each with a NAME.txt caption")
    p.add_argument("out", type=Path, help="output folder for the shards")
    p.add_argument("--model", required=True, help="transformer preset the cache is for (e.g. flux2-klein-4b)")
    p.add_argument("--ae", type=Path, required=True, help="autoencoder checkpoint (safetensors)")
    p.add_argument("--ae-config", help="autoencoder preset (default: flux1-ae / flux2-ae, or the tiny one)")
    p.add_argument("--text-encoder", type=Path, required=True, help="as for `minflux generate --text-encoder`")
    p.add_argument("--text-encoder-layers", help="FLUX.2: hidden_states indices stacked (default: the official)")
    p.add_argument("--max-length", type=int, help="prompt tokens for T5 / FLUX.2")
    p.add_argument("--size", type=int, default=512, help="square image side in pixels, a multiple of 16")
    p.add_argument("--framework", choices=["torch", "jax"], default="torch")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    p.add_argument("--device", help="torch device (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")


def pairs(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) for every image in `folder`, sorted by name."""
    if not folder.is_dir():
        raise CacheError(f"{folder}: no such directory")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CacheError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for img in images:
        cap = img.with_suffix(".txt")
        if not cap.is_file():
            raise CacheError(f"{img}: no caption file {cap.name} beside it")
        out.append((img, cap.read_text().strip()))
    return out


def load_square(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) float32 in [-1, 1]: centre crop to a square, then resize (Lanczos)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)
        return np.asarray(im, np.float32) / 127.5 - 1.0


def encode_images(images: np.ndarray, ae_cfg, ae_path: Path, family: str, args) -> tuple[np.ndarray, tuple]:
    """(N, S, S, 3) images -> (N, L, C) latent tokens (fp32) and the (h, w) token grid, in the chosen framework."""
    out = []
    if args.framework == "torch":
        import torch

        import minflux_torch as mt
        from minflux_torch import sampling

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        ae = mt.load_model(ae_cfg, ae_path, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype],
                           device=device)
        with torch.inference_mode():
            for i in range(0, len(images), args.batch_size):
                x = torch.from_numpy(images[i : i + args.batch_size].transpose(0, 3, 1, 2).copy()).to(device)
                z = ae.encode(x.to(next(ae.parameters()).dtype))
                out.append(sampling.pack(z, family).float().cpu().numpy())
                grid = sampling.token_grid(z, family)
    else:
        import jax
        import jax.numpy as jnp

        import minflux_jax as mj
        from minflux_jax import sampling

        ae = mj.load_model(ae_cfg, ae_path, dtype={"bf16": jnp.bfloat16, "fp32": jnp.float32}[args.dtype])
        for i in range(0, len(images), args.batch_size):
            z = ae.encode(jnp.asarray(images[i : i + args.batch_size], ae.dtype if hasattr(ae, "dtype") else None))
            out.append(np.asarray(jax.device_get(sampling.pack(z, family).astype(jnp.float32))))
            grid = sampling.token_grid(z, family)
    return np.concatenate(out), grid


def run(args) -> int:
    import sys

    from minflux.train import LatentShards

    from minflux import checkpoint, configs
    from minflux import generate as gen

    try:
        cfg = configs.resolve(args.model)
        family = cfg.family
        if args.size % 16:
            raise CacheError(f"--size {args.size} is not a multiple of 16")
        ae_cfg = configs.resolve(args.ae_config or f"{family}-ae" + ("-tiny" if args.model.endswith("-tiny") else ""))
        if not args.ae.is_file():
            raise CacheError(f"--ae {args.ae}: no such file")
        data = pairs(args.images)
        # captions: the same checks and encoder choice as `minflux generate --prompt`
        ns = argparse.Namespace(prompt=[c for _, c in data] + [""], text_encoder=args.text_encoder,  # + the empty one
                                negative_prompt=None, save_embeddings=None, max_length=args.max_length, embeddings=None,
                                neg_embeddings=None, cfg=1.0, text_encoder_layers=args.text_encoder_layers,
                                framework=args.framework, device=args.device)
        emb = gen.encode_text({"text": gen.text_plan(ns, args.model, cfg), "args": ns, "dtype": args.dtype})
        img, (gh, gw) = encode_images(np.stack([load_square(p, args.size) for p, _ in data]), ae_cfg, args.ae,
                                      family, args)
    except (CacheError, gen.GenerateError, checkpoint.CheckpointError, KeyError, ValueError) as e:
        print(f"minflux cache: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    n, axes = len(data), len(cfg.axes_dim)
    empty = {k: np.ascontiguousarray(v[n:], np.float32) for k, v in emb.items() if k in ("txt", "vec")}
    emb = {k: v[:n] for k, v in emb.items()}
    img_ids = np.zeros((n, gh * gw, axes), np.float32)  # rows (0, row, col[, 0]), as sampling.image_ids
    img_ids[..., 1], img_ids[..., 2] = np.divmod(np.arange(gh * gw), gw)
    txt = emb["txt"].astype(np.float32)
    txt_ids = np.zeros((n, txt.shape[1], axes), np.float32)
    if family == "flux2":
        txt_ids[..., 3] = np.arange(txt.shape[1])
    arrays = {"img": img, "img_ids": img_ids, "txt": txt, "txt_ids": txt_ids}
    if "vec" in emb:
        arrays["vec"] = emb["vec"].astype(np.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, n, args.shard_size)):
        part = {k: np.ascontiguousarray(v[start : start + args.shard_size]) for k, v in arrays.items()}
        path = args.out / f"shard-{s:05d}.safetensors"
        checkpoint.write_safetensors(path, {k: ("F32", v.shape) for k, v in part.items()}, part.__getitem__)
        print(f"wrote {path}: {len(part['img'])} samples, img {part['img'].shape[1:]}, txt {part['txt'].shape[1:]}")
    path = args.out / LatentShards.EMPTY
    checkpoint.write_safetensors(path, {k: ("F32", v.shape) for k, v in empty.items()}, empty.__getitem__)
    print(f"wrote {path}: the empty prompt, for caption dropout")
    return 0
