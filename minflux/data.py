"""Training data (numpy only): in-memory data sets walked in seeded epochs, cached latent shards, the
procedural shapes of the training demo, and synthetic batches for benchmarks and tests.

Batches are a pure function of the position, so a resumed run sees the same batches.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from minflux import configs, ids
from minflux.checkpoint import CheckpointError, read_header

# The default demo model: FLUX.2 blocks at toy width; 48 input channels = 4x4 RGB pixel patches.
DEMO = configs.Flux2Config(
    in_channels=48,
    context_in_dim=32,
    hidden_size=128,
    num_heads=4,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(8, 8, 8, 8),
    guidance_embed=False,
)

# ---------------------------------------------------------------------------------------------
# Data: batches are a pure function of the position, so a resumed run sees the same batches
# ---------------------------------------------------------------------------------------------


def random_batch(
    cfg, batch: int, side: int, txt_len: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """A seeded synthetic batch of `cfg`'s shapes (benchmarks and tests): img tokens on a side x side grid,
    txt embeddings of txt_len tokens, their ids, FLUX.1's pooled vec, and guidance 3.5 where the model takes it."""
    img_ids, txt_ids = ids.for_config(cfg, batch, side, side, txt_len)
    out = {
        "img": rng.standard_normal((batch, side * side, cfg.in_channels)).astype(np.float32),
        "img_ids": img_ids,
        "txt": rng.standard_normal((batch, txt_len, cfg.context_in_dim)).astype(np.float32),
        "txt_ids": txt_ids,
    }
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
        perms = {
            e: np.random.default_rng((self.seed, e)).permutation(n) for e in np.unique(pos // n)
        }
        return np.array([perms[p // n][p % n] for p in pos])

    def batch(self, position: int, size: int) -> dict[str, np.ndarray]:
        idx = self.indices(position, size)
        out = {
            k: v[idx] for k, v in self.arrays.items()
        }  # fancy indexing copies: the data set is untouched
        drop = self.dropped(position, size)
        if drop.any():
            for k, v in self.empty.items():
                out[k][drop] = v
        return out

    def dropped(self, position: int, size: int) -> np.ndarray:
        """(size,) bool: which samples at positions [position, position + size) get the empty caption."""
        if self.caption_dropout <= 0:
            return np.zeros(size, bool)
        return np.array(
            [
                np.random.default_rng((self.seed, 0xD0, p)).random() < self.caption_dropout
                for p in range(position, position + size)
            ]
        )

    def null(self, n: int) -> dict[str, np.ndarray]:
        """The empty caption for n samples: the negative prompt of classifier-free guidance."""
        return {k: np.repeat(v[None], n, axis=0) for k, v in self.empty.items()}


class LatentShards(Dataset):
    """Cached latents for fine-tuning: a directory of safetensors shards, each with per-sample tensors
    img (N, L, C) latent tokens, img_ids (N, L, axes), txt (N, Lt, D), txt_ids (N, Lt, axes), and for
    FLUX.1 vec (N, 768). Write them once with the autoencoder and text encoder; training never runs those.
    `minflux cache` also writes EMPTY (the empty prompt's txt, and vec), which caption dropout uses.

    With `cfg`, every shard is checked against the model's widths (`check_shapes`) before training starts.
    Raises `CheckpointError` naming the directory or the shard: no shards, an unreadable file, a missing key,
    tensors that disagree (sample counts, shapes between shards) or do not fit `cfg`, a missing EMPTY.
    """

    KEYS = ("img", "img_ids", "txt", "txt_ids")
    EMPTY = "empty_caption.safetensors"

    def __init__(self, directory, seed: int = 0, caption_dropout: float = 0.0, cfg=None):
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(
                f"{directory}: {'not a directory' if directory.exists() else 'no such directory'}"
            )
        shards = sorted(p for p in directory.glob("*.safetensors") if p.name != self.EMPTY)
        if not shards:
            raise CheckpointError(
                f"{directory}: no *.safetensors shards (minflux cache writes them)"
            )
        parts = [_read(p) for p in shards]
        first = {k: v.shape[1:] for k, v in parts[0].items()}
        for p, part in zip(shards, parts, strict=True):
            if missing := [
                k
                for k in self.KEYS + (("vec",) if cfg is not None and cfg.family == "flux1" else ())
                if k not in part
            ]:
                raise CheckpointError(
                    f"{p}: missing {missing}; a shard holds {self.KEYS} (+ vec for FLUX.1)"
                )
            counts = {k: v.shape[0] if v.ndim else 0 for k, v in part.items()}
            if len(set(counts.values())) != 1:
                raise CheckpointError(
                    f"{p}: the tensors hold different numbers of samples: {counts}"
                )
            trailing = {k: v.shape[1:] for k, v in part.items()}
            if trailing != first:
                raise CheckpointError(
                    f"{p}: per-sample shapes {trailing} differ from {shards[0].name}'s {first}"
                )
            if cfg is not None:
                check_shapes(p, trailing, cfg)
        self.arrays = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
        self.seed, self.caption_dropout = seed, caption_dropout
        if caption_dropout > 0:
            file = directory / self.EMPTY
            if not file.is_file():
                raise CheckpointError(
                    f"{file}: no such file; caption dropout needs the empty prompt's embedding "
                    "(minflux cache writes it)"
                )
            self.empty = {k: v[0] for k, v in _read(file).items()}
            for k, v in self.empty.items():
                if k not in self.arrays or v.shape != self.arrays[k].shape[1:]:
                    found = self.arrays[k].shape[1:] if k in self.arrays else "nothing"
                    raise CheckpointError(
                        f"{file}: {k} {v.shape} does not match the shards' {found}"
                    )


def _read(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors; a file that is not one raises CheckpointError naming it (header checks
    of `checkpoint.read_header`: not safetensors, corrupt, truncated)."""
    from safetensors.numpy import load_file

    read_header(path)
    return load_file(path)


def check_shapes(path, trailing: dict[str, tuple[int, ...]], cfg) -> None:
    """Raise CheckpointError naming `path` when per-sample shapes (`trailing`: key -> shape without the
    sample axis) do not fit the transformer `cfg`: img (L, in_channels), txt (Lt, context_in_dim), ids
    (L or Lt, len(axes_dim)), FLUX.1's vec (vec_in_dim,)."""
    axes = len(cfg.axes_dim)
    want = {
        "img": (None, cfg.in_channels),
        "txt": (None, cfg.context_in_dim),
        "img_ids": (trailing["img"][0] if len(trailing["img"]) else None, axes),
        "txt_ids": (trailing["txt"][0] if len(trailing["txt"]) else None, axes),
    }
    if cfg.family == "flux1":
        want["vec"] = (cfg.vec_in_dim,)

    def fits(found, shape):  # None: any length
        return len(found) == len(shape) and all(
            n is None or n == m for n, m in zip(shape, found, strict=True)
        )

    bad = [
        f"{k} {trailing[k]} (expected {tuple('L' if n is None else n for n in shape)})"
        for k, shape in want.items()
        if not fits(trailing[k], shape)
    ]
    if bad:
        raise CheckpointError(f"{path}: per-sample shapes do not fit the model: " + "; ".join(bad))


class Shapes(Dataset):
    """Procedural images: a circle, square or triangle in one of four colours on a dark background, at a random
    place and size; captions "a red circle" become two tokens, one fixed random embedding per word. The empty
    caption (for caption dropout) is all-zero embeddings."""

    SHAPES = ("circle", "square", "triangle")
    COLOURS = {
        "red": (0.9, -0.8, -0.8),
        "green": (-0.8, 0.8, -0.8),
        "blue": (-0.7, -0.5, 0.95),
        "yellow": (0.95, 0.85, -0.8),
    }

    def __init__(
        self,
        n: int = 4096,
        size: int = 24,
        patch: int = 4,
        context_dim: int = 32,
        family: str = "flux2",
        seed: int = 0,
        caption_dropout: float = 0.0,
    ):
        self.size, self.patch, self.context_dim, self.family, self.seed = (
            size,
            patch,
            context_dim,
            family,
            seed,
        )
        self.caption_dropout = caption_dropout
        self.empty = {"txt": np.zeros((2, context_dim), np.float32)}
        if family == "flux1":
            self.empty["vec"] = np.zeros(context_dim, np.float32)
        rng = np.random.default_rng(seed)
        labels = np.stack(
            [rng.integers(len(self.SHAPES), size=n), rng.integers(len(self.COLOURS), size=n)], 1
        )
        images = np.stack([self.draw(s, c, rng) for s, c in labels])
        txt = self.embed(labels)
        axes, text_axis = (3, None) if family == "flux1" else (4, 3)
        g = size // patch
        self.arrays = {
            "img": self.patchify(images),
            "img_ids": ids.image_ids(n, g, g, axes),
            "txt": txt,
            "txt_ids": ids.text_ids(n, txt.shape[1], axes, text_axis),
        }
        if family == "flux1":
            self.arrays["vec"] = txt.mean(axis=1)
        self.labels = labels

    def draw(self, shape: int, colour: int, rng) -> np.ndarray:
        """(size, size, 3) in [-1, 1]."""
        s = self.size
        r = (
            rng.uniform(0.30, 0.34) * s
        )  # varied a little in size and place: a demo, learnt in minutes
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
        return (
            np.random.default_rng(zlib.crc32(word.encode()))
            .standard_normal(self.context_dim)
            .astype(np.float32)
        )

    def caption(self, label) -> str:
        return f"a {list(self.COLOURS)[label[1]]} {self.SHAPES[label[0]]}"

    def embed(self, labels) -> np.ndarray:
        """(N, 2, D): the colour word, then the shape word."""
        return np.stack(
            [[self.word(list(self.COLOURS)[c]), self.word(self.SHAPES[s])] for s, c in labels]
        )
