"""`minflux cache`'s second half: checked pairs encoded a batch at a time and written as shards.

`minflux_cli.cache` finds and checks the pairs (the folder convention, buckets, sizes) and runs the command; here
the encoders (autoencoder and text encoder, or seeded random ones) turn a batch of pairs of one group into the
shard tensors (`encode_pairs`), and the shards are written atomically, `cache.json` after each (`write_shard`), so
an interrupted run keeps every finished shard.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from minflux import buckets, checkpoint, configs, data, ids, images
from minflux_cli.frameworks import Framework

if TYPE_CHECKING:
    from minflux_cli.cache import Pair

# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


class Encoders:
    """The autoencoder and the text encoder, loaded once and used a batch at a time (or, with random weights, a
    seeded random autoencoder and embeddings seeded by each caption)."""

    def __init__(self, args, cfg, ae_cfg, fw: Framework, text_plan):
        self.cfg, self.ae_cfg, self.fw, self.family = cfg, ae_cfg, fw, cfg.family
        self.ppt = configs.pixels_per_token(ae_cfg)
        self.dtype = checkpoint.np_dtype("BF16" if args.embedding_dtype == "bf16" else "F32")
        self.ae = fw.model(ae_cfg, None if args.random_weights else args.ae, seed=1)
        self.text = None
        if text_plan is not None:
            tp = text_plan
            self.text = fw.text.load_text_encoder(
                tp.kind, tp.directory, **fw.kw, max_length=tp.max_length, layers=tp.layers
            )

    def captions(self, captions: list[str]) -> dict[str, np.ndarray]:
        """txt (n, Lt, D) and FLUX.1's vec (n, 768), in the stored embedding dtype."""
        if self.text is None:  # random: one fixed embedding per caption
            rngs = [np.random.default_rng(zlib.crc32(c.encode())) for c in captions]
            out = {
                "txt": np.stack([r.standard_normal((16, self.cfg.context_in_dim)) for r in rngs])
            }
            if self.cfg.vec_in_dim:
                out["vec"] = np.stack([r.standard_normal(self.cfg.vec_in_dim) for r in rngs])
        else:
            out = _numpy(self.fw, self.text.encode(captions))
            out["txt"] = out.pop("ctx", out.get("txt"))
        return {
            k: np.ascontiguousarray(v.astype(np.float32).astype(self.dtype)) for k, v in out.items()
        }

    def tokens(self, pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """(n, H, W, 3) in [-1, 1] -> latent tokens (n, L, C) float32 and the (h, w) token grid."""
        return self.fw.pipeline.encode_tokens(self.ae, pixels, self.family, len(pixels))

    def fill(self, pixels: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """FLUX.1 Fill's extra channels (n, L, 64 + 4 f^2): the encoded masked image, then the mask folded f x f
        (f: the autoencoder's downsampling) and packed 2 x 2, as `sampling.fill_conditioning` (BFL `prepare_fill`)."""
        masked, _ = self.tokens(pixels * (1 - masks))
        n, hh, ww, _ = masks.shape
        f = self.ppt // 2
        m = masks[..., 0].reshape(n, hh // f, f, ww // f, f).transpose(0, 1, 3, 2, 4)
        m = m.reshape(n, hh // f, ww // f, f * f)  # b (h ph) (w pw) -> b h w (ph pw)
        m = m.reshape(n, hh // f // 2, 2, ww // f // 2, 2, f * f).transpose(0, 1, 3, 5, 2, 4)
        return np.concatenate((masked, m.reshape(n, masked.shape[1], -1)), axis=-1)


def _numpy(fw: Framework, arrays: dict) -> dict[str, np.ndarray]:
    if fw.name == "torch":
        from minflux_torch.load import to_numpy

        return {k: to_numpy(v) for k, v in arrays.items()}
    import jax

    return {k: np.asarray(jax.device_get(v)) for k, v in arrays.items()}


def load_pixels(path: Path, fit: buckets.Fit, gray: bool = False) -> np.ndarray:
    return buckets.apply(images.load(path, multiple=1, gray=gray), fit)


def encode_pairs(enc: Encoders, pairs: list[Pair], kind: str) -> dict[str, np.ndarray]:
    """One batch of pairs of one group -> the shard tensors (module docstring)."""
    cfg, n = enc.cfg, len(pairs)
    img, (gh, gw) = enc.tokens(np.stack([load_pixels(p.target, p.fit) for p in pairs]))
    out = {"img": img}
    out["img_ids"], _ = ids.for_config(cfg, n, gh, gw, 0)
    text = enc.captions([p.caption for p in pairs])
    out["txt"] = text["txt"]
    out["txt_ids"] = ids.text_ids(n, text["txt"].shape[1], len(cfg.axes_dim), cfg.text_id_axis)
    if "vec" in text:
        out["vec"] = text["vec"]
    if kind == "control":
        out["img_cond"], _ = enc.tokens(
            np.stack([load_pixels(p.control, p.cond_fits[0]) for p in pairs])
        )
    elif kind == "fill":
        pix = np.stack([load_pixels(p.target, p.fit) for p in pairs])
        masks = np.stack([load_pixels(p.mask, p.cond_fits[0], gray=True) for p in pairs])
        out["img_cond"] = enc.fill(pix, masks)
    refs = [
        reference_tokens(enc, [load_pixels(p.refs[i], p.ref_fits[i]) for p in pairs], i)
        for i in range(len(pairs[0].refs))
    ]
    if refs:
        out["ref"] = np.concatenate([t for t, _ in refs], axis=1)
        out["ref_ids"] = np.concatenate([i for _, i in refs], axis=1)
    return out


def reference_tokens(
    enc: Encoders, pixels: list[np.ndarray], i: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reference slot i of a batch: tokens (n, Lr, C) and ids at the model's time of reference i
    (`cfg.ref_time`: Kontext t = 1, FLUX.2 t = 10 + 10 i)."""
    tok, (h, w) = enc.tokens(np.stack(pixels))
    return tok, ids.image_ids(len(pixels), h, w, len(enc.cfg.axes_dim), enc.cfg.ref_time(i))


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------


def shards_of(pairs: list[Pair], size: int) -> list[list[Pair]]:
    """Pairs grouped by shapes (bucket, reference sizes), each group in name order, cut into chunks of `size`."""
    groups: dict[tuple, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(p.group(), []).append(p)
    return [g[i : i + size] for _, g in sorted(groups.items()) for i in range(0, len(g), size)]


def write_tensors(path: Path, tensors: dict[str, np.ndarray], metadata=None) -> None:
    checkpoint.write_safetensors(
        path,
        {k: (checkpoint.st_dtype(v.dtype), v.shape) for k, v in tensors.items()},
        lambda k: np.ascontiguousarray(tensors[k]),
        metadata,
    )


def write_shard(out: Path, parts, serial: int, record: dict) -> int:
    """Parts (pairs, tensors) of one group as shard number `serial`, then cache.json: returns the next serial."""
    tensors = {k: np.concatenate([t[k] for _, t in parts]) for k in parts[0][1]}
    names = [p.name for batch, _ in parts for p in batch]
    bucket = parts[0][0][0].bucket
    path = out / f"shard-{serial:05d}.safetensors"
    write_tensors(path, tensors)
    record["shards"].append(
        {"file": path.name, "bucket": list(bucket), "count": len(names), "names": names}
    )
    data.write_meta(out, record)  # after the shard: an interrupted run lists only whole shards
    shapes = ", ".join(
        f"{k} {v.shape[1:]}" for k, v in tensors.items() if k in ("img", "txt", "ref")
    )
    print(f"wrote {path}: {len(names)} samples, {bucket[0]}x{bucket[1]} pixels, {shapes}")
    return serial + 1
