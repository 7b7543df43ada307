"""`minflux cache`: images + captions -> the cached latents and text embeddings `minflux train --data` reads.

Every image `NAME.png|jpg|jpeg|webp` in a folder needs a caption `NAME.txt` beside it. Images are centre-cropped
and resized to `--size` pixels, encoded by the model family's autoencoder, captions by its text encoder
(chosen as `minflux generate` chooses it), both in `--framework`; the encoders are dropped in turn. The output
is safetensors shards (`minflux.data.LatentShards`): img (N, L, C) latent tokens, img_ids, txt, txt_ids and,
for FLUX.1, vec; each shard is written atomically, so an interrupted run leaves only whole shards. The empty
prompt's embedding goes to `empty_caption.safetensors`, for caption dropout (`minflux train --caption-dropout`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from minflux import checkpoint, configs, ids, images
from minflux_cli.args import UsageError, directory, existing, out_dir, pixels, positive_int, preset
from minflux_cli.frameworks import Framework

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=directory, help="folder of images, each with a NAME.txt caption")
    p.add_argument("out", type=out_dir, help="output folder for the shards")
    p.add_argument(
        "--model",
        type=preset,
        required=True,
        help="transformer preset the cache is for (e.g. flux2-klein-4b)",
    )
    p.add_argument(
        "--ae", type=existing, required=True, help="autoencoder checkpoint (safetensors)"
    )
    p.add_argument(
        "--ae-config",
        type=preset,
        help="autoencoder preset (default: flux1-ae / flux2-ae, or the tiny one)",
    )
    p.add_argument(
        "--text-encoder",
        type=directory,
        required=True,
        help="as for `minflux generate --text-encoder`",
    )
    p.add_argument(
        "--text-encoder-layers",
        help="FLUX.2: hidden_states indices stacked (default: the official)",
    )
    p.add_argument("--max-length", type=positive_int, help="prompt tokens for T5 / FLUX.2")
    p.add_argument(
        "--size", type=pixels, default=512, help="square image side in pixels, a multiple of 16"
    )
    p.add_argument("--framework", choices=["torch", "jax"], default="torch")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    p.add_argument("--device", help="torch device (default: cuda when available)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--shard-size", type=positive_int, default=256, help="samples per shard")


def pairs(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) for every image in `folder`, sorted by name."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such directory")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise UsageError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for img in found:
        cap = img.with_suffix(".txt")
        if not cap.is_file():
            raise UsageError(f"{img}: no caption file {cap.name} beside it")
        out.append((img, cap.read_text().strip()))
    return out


def run(args) -> int:
    from minflux.data import LatentShards
    from minflux_cli import text_encoders as gen

    cfg = configs.resolve(args.model)
    family = cfg.family
    if family not in gen.AE_FAMILY:
        raise UsageError(f"--model {args.model} is {configs.describe(family)}, not a transformer")
    ae_cfg = configs.resolve(
        args.ae_config or f"{family}-ae" + ("-tiny" if args.model.endswith("-tiny") else "")
    )
    if ae_cfg.family != gen.AE_FAMILY.get(family):
        raise UsageError(
            f"--ae-config {args.ae_config}: {args.model} needs {configs.describe(gen.AE_FAMILY[family])}"
        )
    data = pairs(args.images)
    # captions: the same checks and encoder choice as `minflux generate --prompt`, plus the empty caption
    fw = Framework(args.framework, args.dtype, args.device)
    tp = gen.text_plan(
        args.model,
        cfg,
        [c for _, c in data] + [""],
        None,
        args.text_encoder,
        args.max_length,
        args.text_encoder_layers,
        encode_only=True,
    )
    try:
        pixels = np.stack([images.load(p, (args.size, args.size), square=True) for p, _ in data])
    except ValueError as e:
        raise UsageError(str(e)) from None
    emb = tp.encode(fw)
    ae = fw.model(ae_cfg, args.ae)
    img, (gh, gw) = fw.pipeline.encode_tokens(ae, pixels, family, args.batch_size)
    del ae
    n = len(data)
    empty = {
        k: np.ascontiguousarray(v[n:], np.float32) for k, v in emb.items() if k in ("txt", "vec")
    }
    emb = {k: v[:n] for k, v in emb.items()}
    txt = emb["txt"].astype(np.float32)
    img_ids, txt_ids = ids.for_config(cfg, n, gh, gw, txt.shape[1])
    arrays = {"img": img, "img_ids": img_ids, "txt": txt, "txt_ids": txt_ids}
    if "vec" in emb:
        arrays["vec"] = emb["vec"].astype(np.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, n, args.shard_size)):
        part = {
            k: np.ascontiguousarray(v[start : start + args.shard_size]) for k, v in arrays.items()
        }
        path = args.out / f"shard-{s:05d}.safetensors"
        checkpoint.write_safetensors(
            path, {k: ("F32", v.shape) for k, v in part.items()}, part.__getitem__
        )
        print(
            f"wrote {path}: {len(part['img'])} samples, img {part['img'].shape[1:]}, txt {part['txt'].shape[1:]}"
        )
    path = args.out / LatentShards.EMPTY
    checkpoint.write_safetensors(
        path, {k: ("F32", v.shape) for k, v in empty.items()}, empty.__getitem__
    )
    print(f"wrote {path}: the empty prompt, for caption dropout")
    return 0
