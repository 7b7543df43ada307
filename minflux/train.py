"""`minflux train`: train FLUX through JAX; and the training data (numpy only).

With no arguments it trains a tiny FLUX.2 on procedurally drawn coloured shapes, 24x24 pixels, in pixel space
(each 4x4 pixel patch is one 48-channel token), conditioned on the caption's words as fixed random embeddings: a few
minutes on two CPU cores, then a grid of samples per caption and the loss curve under `out/train`.
With `--data DIR` it fine-tunes on cached latents and text embeddings (safetensors shards, see
`LatentShards`), from base weights given by `--init`, optionally as LoRA (`--lora-rank`).
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import numpy as np

from minflux import configs

# The default demo model: FLUX.2 blocks at toy width; 48 input channels = 4x4 RGB pixel patches.
DEMO = configs.Flux2Config(in_channels=48, context_in_dim=32, hidden_size=128, num_heads=4, depth=2,
                           depth_single_blocks=2, axes_dim=(8, 8, 8, 8), guidance_embed=False)

# ---------------------------------------------------------------------------------------------
# Data: batches are a pure function of the position, so a resumed run sees the same batches
# ---------------------------------------------------------------------------------------------


def image_ids(n: int, h: int, w: int, axes: int) -> np.ndarray:
    """(n, h*w, axes) rows (0, row, col[, 0]), as `sampling.image_ids`."""
    ids = np.zeros((h, w, axes), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(h)[:, None], np.arange(w)[None, :]
    return np.broadcast_to(ids.reshape(1, h * w, axes), (n, h * w, axes)).copy()


def text_ids(n: int, length: int, axes: int) -> np.ndarray:
    """(n, length, axes): zeros for FLUX.1, (0, 0, 0, l) for FLUX.2, as `sampling.text_ids`."""
    ids = np.zeros((n, length, axes), np.float32)
    if axes == 4:
        ids[..., 3] = np.arange(length)
    return ids


def random_batch(cfg, batch: int, side: int, txt_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A seeded synthetic batch of `cfg`'s shapes (benchmarks and tests): img tokens on a side x side grid,
    txt embeddings of txt_len tokens, their ids, FLUX.1's pooled vec, and guidance 3.5 where the model takes it."""
    axes = len(cfg.axes_dim)
    out = {"img": rng.standard_normal((batch, side * side, cfg.in_channels)).astype(np.float32),
           "img_ids": image_ids(batch, side, side, axes),
           "txt": rng.standard_normal((batch, txt_len, cfg.context_in_dim)).astype(np.float32),
           "txt_ids": text_ids(batch, txt_len, axes)}
    if cfg.family == "flux1":
        out["vec"] = rng.standard_normal((batch, cfg.vec_in_dim)).astype(np.float32)
    if cfg.guidance_embed:
        out["guidance"] = np.full((batch,), 3.5, np.float32)
    return out


class Dataset:
    """Samples in memory as arrays with a leading sample axis; `batch(position, size)` walks seeded epochs.

    Caption dropout: a fraction `caption_dropout` of the samples gets the empty caption (`empty`: one sample's
    txt, and vec for FLUX.1) instead of its own, so the model also learns the unconditional flow that
    classifier-free guidance needs. Which samples is a pure function of each position (the same on resume,
    for any batch size or process split).
    """

    arrays: dict[str, np.ndarray]
    seed: int = 0
    caption_dropout: float = 0.0
    empty: dict[str, np.ndarray] | None = None  # {"txt": (Lt, D)[, "vec": (768,)]}

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def indices(self, position: int, size: int) -> np.ndarray:
        """Sample indices at positions [position, position + size): epoch e is permutation e of the data."""
        pos = np.arange(position, position + size)
        n = len(self)
        perms = {e: np.random.default_rng((self.seed, e)).permutation(n) for e in np.unique(pos // n)}
        return np.array([perms[p // n][p % n] for p in pos])

    def batch(self, position: int, size: int) -> dict[str, np.ndarray]:
        idx = self.indices(position, size)
        out = {k: v[idx] for k, v in self.arrays.items()}  # fancy indexing copies: the data set is untouched
        drop = self.dropped(position, size)
        if drop.any():
            for k, v in self.empty.items():
                out[k][drop] = v
        return out

    def dropped(self, position: int, size: int) -> np.ndarray:
        """(size,) bool: which samples at positions [position, position + size) get the empty caption."""
        if self.caption_dropout <= 0:
            return np.zeros(size, bool)
        return np.array([np.random.default_rng((self.seed, 0xD0, p)).random() < self.caption_dropout
                         for p in range(position, position + size)])

    def null(self, n: int) -> dict[str, np.ndarray]:
        """The empty caption for n samples: the negative prompt of classifier-free guidance."""
        return {k: np.repeat(v[None], n, axis=0) for k, v in self.empty.items()}


class LatentShards(Dataset):
    """Cached latents for fine-tuning: a directory of safetensors shards, each with per-sample tensors
    img (N, L, C) latent tokens, img_ids (N, L, axes), txt (N, Lt, D), txt_ids (N, Lt, axes), and for
    FLUX.1 vec (N, 768). Write them once with the autoencoder and text encoder; training never runs those.
    `minflux cache` also writes EMPTY (the empty prompt's txt, and vec), which caption dropout uses."""

    KEYS = ("img", "img_ids", "txt", "txt_ids")
    EMPTY = "empty_caption.safetensors"

    def __init__(self, directory, seed: int = 0, caption_dropout: float = 0.0):
        from safetensors.numpy import load_file

        directory = Path(directory)
        shards = sorted(p for p in directory.glob("*.safetensors") if p.name != self.EMPTY)
        if not shards:
            raise FileNotFoundError(f"{directory}: no *.safetensors shards")
        parts = [load_file(p) for p in shards]
        for p, part in zip(shards, parts, strict=True):
            if missing := [k for k in self.KEYS if k not in part]:
                raise KeyError(f"{p}: missing {missing}; a shard holds {self.KEYS} (+ vec for FLUX.1)")
        self.arrays = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
        self.seed, self.caption_dropout = seed, caption_dropout
        if caption_dropout > 0:
            file = directory / self.EMPTY
            if not file.is_file():
                raise FileNotFoundError(f"{file}: no such file; caption dropout needs the empty prompt's embedding "
                                        "(minflux cache writes it)")
            self.empty = {k: v[0] for k, v in load_file(file).items()}
            for k, v in self.empty.items():
                if k not in self.arrays or v.shape != self.arrays[k].shape[1:]:
                    found = self.arrays[k].shape[1:] if k in self.arrays else "nothing"
                    raise ValueError(f"{file}: {k} {v.shape} does not match the shards' {found}")


class Shapes(Dataset):
    """Procedural images: a circle, square or triangle in one of four colours on a dark background, at a random
    place and size; captions "a red circle" become two tokens, one fixed random embedding per word. The empty
    caption (for caption dropout) is all-zero embeddings."""

    SHAPES = ("circle", "square", "triangle")
    COLOURS = {"red": (0.9, -0.8, -0.8), "green": (-0.8, 0.8, -0.8), "blue": (-0.7, -0.5, 0.95),
               "yellow": (0.95, 0.85, -0.8)}

    def __init__(self, n: int = 4096, size: int = 24, patch: int = 4, context_dim: int = 32, family: str = "flux2",
                 seed: int = 0, caption_dropout: float = 0.0):
        self.size, self.patch, self.context_dim, self.family, self.seed = size, patch, context_dim, family, seed
        self.caption_dropout = caption_dropout
        self.empty = {"txt": np.zeros((2, context_dim), np.float32)}
        if family == "flux1":
            self.empty["vec"] = np.zeros(context_dim, np.float32)
        rng = np.random.default_rng(seed)
        labels = np.stack([rng.integers(len(self.SHAPES), size=n), rng.integers(len(self.COLOURS), size=n)], 1)
        images = np.stack([self.draw(s, c, rng) for s, c in labels])
        txt = self.embed(labels)
        axes = 3 if family == "flux1" else 4
        g = size // patch
        self.arrays = {"img": self.patchify(images), "img_ids": image_ids(n, g, g, axes), "txt": txt,
                       "txt_ids": text_ids(n, txt.shape[1], axes)}
        if family == "flux1":
            self.arrays["vec"] = txt.mean(axis=1)
        self.labels = labels

    def draw(self, shape: int, colour: int, rng) -> np.ndarray:
        """(size, size, 3) in [-1, 1]."""
        s = self.size
        r = rng.uniform(0.30, 0.34) * s  # varied a little in size and place: a demo, learnt in minutes
        cy, cx = s / 2 + rng.uniform(-0.05, 0.05, size=2) * s
        y, x = np.mgrid[:s, :s] + 0.5
        dy, dx = y - cy, x - cx
        if self.SHAPES[shape] == "circle":
            mask = dy**2 + dx**2 <= r**2
        elif self.SHAPES[shape] == "square":
            mask = (np.abs(dy) <= 0.8 * r) & (np.abs(dx) <= 0.8 * r)
        else:  # upright triangle: below the two sloped edges, above the base
            mask = (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))
        img = np.full((s, s, 3), -0.85, np.float32)
        img[mask] = list(self.COLOURS.values())[colour]
        return img

    def patchify(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) -> (N, H/p * W/p, p*p*3) tokens, row-major."""
        n, h, w, c = images.shape
        p = self.patch
        x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, tokens: np.ndarray) -> np.ndarray:
        n, p, g = tokens.shape[0], self.patch, self.size // self.patch
        x = tokens.reshape(n, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, self.size, self.size, 3)

    def word(self, word: str) -> np.ndarray:
        """A fixed unit-variance embedding per word (seeded by the word itself)."""
        return np.random.default_rng(zlib.crc32(word.encode())).standard_normal(self.context_dim).astype(np.float32)

    def caption(self, label) -> str:
        return f"a {list(self.COLOURS)[label[1]]} {self.SHAPES[label[0]]}"

    def embed(self, labels) -> np.ndarray:
        """(N, 2, D): the colour word, then the shape word."""
        return np.stack([[self.word(list(self.COLOURS)[c]), self.word(self.SHAPES[s])] for s, c in labels])


# ---------------------------------------------------------------------------------------------
# Pictures: the sample grid and the loss curve
# ---------------------------------------------------------------------------------------------


def save_grid(images: np.ndarray, captions: list[str], cols: int, path) -> None:
    """Images (N, H, W, 3) in [-1, 1], `cols` per row, each row titled by its caption, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(images) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.25 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.imshow(np.clip((images[i] + 1) / 2, 0, 1), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if i % cols == 0:
            ax.set_ylabel(captions[i // cols].removeprefix("a "), fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_loss_curve(losses: list[float], path, title: str = "training loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    k = max(1, len(losses) // 20)
    if len(losses) >= k:
        ax.plot(steps[k - 1 :], np.convolve(losses, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="demo", help="a preset name (configs.names()), or 'demo' (default)")
    p.add_argument("--data", help="directory of cached-latent shards; default: the procedural shapes demo")
    p.add_argument("--init", help="base weights (safetensors, BFL or diffusers layout); default: random init")
    p.add_argument("--out", default="out/train", help="output directory (default: out/train)")
    p.add_argument("--steps", type=int, default=1200, help="optimiser updates")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per update")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed", "bf16"])
    p.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
    p.add_argument("--attention", default="xla", choices=["xla", "cudnn"],
                   help="cudnn: fused flash attention on NVIDIA GPUs, bf16 only (1.6x faster steps at 1024 px)")
    p.add_argument("--timesteps", default="logit_normal", choices=["logit_normal", "uniform"])
    p.add_argument("--logit-mean", type=float, default=0.3, help="> 0: more high-noise steps (layout)")
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--shift", action="store_true", help="FLUX's resolution-dependent timestep shift")
    p.add_argument("--weighting", default="none", choices=["none", "cosmap"])
    p.add_argument("--guidance", type=float, default=None, help="guidance value for guidance-distilled models")
    p.add_argument("--mesh", type=int, nargs=2, default=(1, 1), metavar=("DATA", "FSDP"),
                   help="device mesh; -1 in one place takes the remaining devices")
    p.add_argument("--ema", type=float, default=0.0,
                   help="keep an exponential moving average of the weights with this decay (e.g. 0.999); the "
                        "samples and exported files use it")
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: train LoRA adapters of this rank, base frozen")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", nargs="+", default=None, help="regexes over BFL module names")
    p.add_argument("--save-every", type=int, default=0, help="orbax checkpoint every N micro-steps (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/ckpt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-steps", type=int, default=24)
    p.add_argument("--caption-dropout", type=float, default=None,
                   help="fraction of samples trained on the empty caption, for CFG (default: 0.1 demo, 0 --data; "
                        "--data needs the empty_caption.safetensors minflux cache writes)")
    p.add_argument("--cfg", type=float, default=3.0,
                   help="demo sample grid: classifier-free guidance scale against the empty caption (1: none)")


def run(args) -> int:
    import time

    from minflux_jax import layers
    from minflux_jax import trainer as tr

    layers.set_attention_implementation(args.attention)
    tr.maybe_initialize_distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DEMO if args.config == "demo" else configs.get(args.config)
    if args.data:
        data = LatentShards(args.data, seed=args.seed, caption_dropout=args.caption_dropout or 0.0)
    else:
        dropout = 0.1 if args.caption_dropout is None else args.caption_dropout
        data = Shapes(context_dim=cfg.context_in_dim, family=cfg.family, seed=args.seed, caption_dropout=dropout)
    opts = tr.TrainOptions(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
        clip=args.clip, accumulate=args.accumulate, precision=args.precision, remat=args.remat,
        timesteps={"kind": args.timesteps, "mean": args.logit_mean, "std": args.logit_std, "shift": args.shift},
        weighting=args.weighting, guidance=args.guidance, seed=args.seed, mesh=tuple(args.mesh),
        ema=args.ema, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        **({"lora_targets": tuple(args.lora_targets)} if args.lora_targets else {}),
        init=args.init, ckpt_dir=str(out / "ckpt") if args.save_every or args.resume else None,
        save_every=args.save_every)
    trainer = tr.Trainer(cfg, data, opts)
    if args.resume:
        print(f"resumed from step {trainer.restore()}")
    t0 = time.time()
    losses = trainer.fit()
    if trainer.manager is not None:
        trainer.save(wait=True)
    trainer.close()
    print(f"{len(losses)} steps in {time.time() - t0:.0f} s; final loss (mean of last 50) "
          f"{np.mean(losses[-50:]):.4f}")
    if losses:
        save_loss_curve(losses, out / "loss.png")
    trainer.export(out / "model.safetensors")
    written = [out / "loss.png", out / "model.safetensors"]
    if opts.lora_rank:
        trainer.save_lora(out / "lora.safetensors")
        written.append(out / "lora.safetensors")
    if isinstance(data, Shapes):
        cols = 6
        labels = [(s, c) for c in range(len(data.COLOURS)) for s in range(len(data.SHAPES))]
        txt = np.repeat(data.embed(labels), cols, axis=0)
        g = data.size // data.patch
        vec = txt.mean(axis=1) if cfg.family == "flux1" else None
        guide = args.cfg != 1.0 and data.caption_dropout > 0  # no unconditional flow was learnt otherwise
        neg = data.null(len(txt)) if guide else {}
        tokens = trainer.sample(txt, g, g, steps=args.sample_steps, seed=args.seed, vec=vec,
                                cfg_scale=args.cfg if guide else 1.0, neg_txt=neg.get("txt"), neg_vec=neg.get("vec"))
        save_grid(data.unpatchify(tokens), [data.caption(lab) for lab in labels], cols, out / "samples.png")
        written.append(out / "samples.png")
    print("wrote " + ", ".join(map(str, written)))
    return 0
