"""Training data (numpy only): in-memory data sets walked in seeded epochs, cached latent shards streamed from disk
in aspect-ratio buckets, the procedural shapes of the training demo, and synthetic batches for benchmarks and tests.

Every data set answers `global_batch(step, batch_size, part)`: process `part` = (index, count)'s share of the
global batch of a step, a pure function of the step, so a resumed run (or another process count) sees the same
batches. `minflux_jax.trainer` feeds it through grain, prefetched in the background.
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from pathlib import Path

import numpy as np

from minflux import configs, ids
from minflux.checkpoint import CheckpointError, np_dtype, parse_header, read_header
from minflux.family import FAMILIES
from minflux.files import write_text

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
    if FAMILIES[cfg.family].pooled_vec:
        out["vec"] = rng.standard_normal((batch, cfg.vec_in_dim)).astype(np.float32)
    if cfg.guidance_embed:
        out["guidance"] = np.full((batch,), 3.5, np.float32)
    return out


def part_bounds(batch_size: int, part: tuple[int, int]) -> tuple[int, int]:
    """[lo, hi): the samples of a global batch that process `part` = (index, count) reads."""
    i, n = part
    return i * batch_size // n, (i + 1) * batch_size // n


class CaptionDropout:
    """Caption dropout, shared by every data set: a fraction `caption_dropout` of the samples gets the empty
    caption (`empty`: one sample's txt, and vec for FLUX.1) instead of its own, so the model also learns the
    unconditional flow that classifier-free guidance needs. Which samples is a pure function of each position
    (the same on resume, for any batch size or process split)."""

    seed: int = 0
    caption_dropout: float = 0.0
    empty: dict[str, np.ndarray] | None = None  # {"txt": (Lt, D)[, "vec": (768,)]}

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

    def _drop(self, out: dict[str, np.ndarray], position: int) -> dict[str, np.ndarray]:
        drop = self.dropped(position, len(out["txt"]))
        if drop.any():
            for k, v in self.empty.items():
                out[k][drop] = v.astype(out[k].dtype)
        return out


class Dataset(CaptionDropout):
    """Samples in memory as arrays with a leading sample axis; `batch(position, size)` walks seeded epochs."""

    arrays: dict[str, np.ndarray]

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
        # fancy indexing copies: the data set is untouched
        idx = self.indices(position, size)
        return self._drop({k: v[idx] for k, v in self.arrays.items()}, position)

    def global_batch(
        self, step: int, batch_size: int, part: tuple[int, int] = (0, 1)
    ) -> dict[str, np.ndarray]:
        """Process `part`'s share of the global batch of step `step` (see `part_bounds`)."""
        lo, hi = part_bounds(batch_size, part)
        return self.batch(step * batch_size + lo, hi - lo)


# ---------------------------------------------------------------------------------------------
# Cached latents: shards on disk, read as training needs them
# ---------------------------------------------------------------------------------------------

META = "cache.json"  # the cache's record: buckets, encoders, shards (written by `minflux cache`)
EMPTY = "empty_caption.safetensors"
SAMPLES = "sample_prompts.safetensors"  # validation prompts' embeddings and conditioning
FORMAT = 1
KEYS = (
    "img",
    "img_ids",
    "txt",
    "txt_ids",
)  # every shard; + vec (FLUX.1), ref / ref_ids, img_cond (pairs)
TEXT_KEYS = ("txt", "txt_ids", "vec")  # one shape across the whole cache
PAIR_KEYS = ("ref", "ref_ids", "img_cond")


def read_meta(directory) -> dict | None:
    """The cache's META record, or None for a cache made before it existed. Raises CheckpointError naming the file
    when it is not a JSON object of this format."""
    path = Path(directory) / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
            raise ValueError("not a cache record (no shard list)")
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable: {e}") from None
    if meta.get("format", FORMAT) > FORMAT:
        raise CheckpointError(f"{path}: format {meta['format']} is newer than this minflux reads")
    return meta


def write_meta(directory, meta: dict) -> None:
    """META, atomically (`minflux.files`): a cache interrupted between shards lists only the shards it finished."""
    write_text(Path(directory) / META, json.dumps({"format": FORMAT, **meta}, indent=1))


class Shard:
    """One safetensors shard, read a row at a time: its header (`checkpoint.read_header`: checked, so a corrupt
    or truncated file fails here, naming it) and positional reads (`os.preadv`: no file position, so the prefetch
    threads share one descriptor). Nothing is held in memory but the header."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries = read_header(self.path)
        self.count = next(iter(self.entries.values()))["shape"][0] if self.entries else 0
        self._fd: int | None = None

    def trailing(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(e["shape"][1:]) for k, e in self.entries.items()}

    def read(self, key: str, rows, out: np.ndarray) -> None:
        """Rows `rows` of tensor `key` into `out` (len(rows), ...) of the stored dtype."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        e = self.entries[key]
        size = e["nbytes"] // e["shape"][0]
        flat = out.reshape(len(rows), -1).view(np.uint8)
        for j, r in enumerate(rows):
            got = os.preadv(self._fd, [flat[j]], e["start"] + int(r) * size)
            if got != size:
                raise CheckpointError(f"{self.path}: truncated while reading {key} row {r}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LatentShards(CaptionDropout):
    """Cached latents for fine-tuning, streamed: a directory of safetensors shards (`minflux cache` writes them),
    read a batch at a time, so memory holds a few batches whatever the size of the set.

    Each shard holds per-sample tensors img (N, L, C) latent tokens, img_ids (N, L, axes), txt (N, Lt, D) (bf16
    or fp32), txt_ids (N, Lt, axes), FLUX.1's vec (N, 768), and for pairs ref (N, Lr, C) + ref_ids (N, Lr, axes)
    (reference tokens, Kontext / FLUX.2) or img_cond (N, L, Cc) (FLUX.1 Fill / Canny / Depth channels). META lists
    the shards and the buckets; a directory without it (made before buckets) is read as its *.safetensors.
    EMPTY holds the empty prompt's embedding, for caption dropout.

    Batches: shards whose per-sample shapes agree form a group (a bucket, and the reference sizes); every batch is
    one group. Epoch e shuffles each group (seeded by (seed, e, group)), cuts it into batches (the last one filled
    by wrapping round), and orders all batches of the epoch (seeded by (seed, e)): the batch of a step is a pure
    function of (seed, step, batch size), so a resumed run, or any number of processes, sees the same batches.

    With `cfg`, every shard is checked against the model's widths (`check_shapes`) before training starts.
    Raises `CheckpointError` naming the directory or the file: no shards, a shard META lists but the folder
    lacks, an unreadable or truncated file, a missing key, tensors that disagree (sample counts; text shapes or
    keys between shards) or do not fit `cfg`, more references than the model takes, a missing EMPTY.
    """

    EMPTY = EMPTY

    def __init__(self, directory, seed: int = 0, caption_dropout: float = 0.0, cfg=None):
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(
                f"{directory}: {'not a directory' if directory.exists() else 'no such directory'}"
            )
        self.directory, self.meta = directory, read_meta(directory) or {}
        if "shards" in self.meta:
            paths = [directory / s["file"] for s in self.meta["shards"]]
            if lost := [p for p in paths if not p.is_file()]:
                raise CheckpointError(f"{lost[0]}: listed in {directory / META} but missing")
        else:
            paths = sorted(
                p for p in directory.glob("*.safetensors") if p.name not in (EMPTY, SAMPLES)
            )
        if not paths:
            raise CheckpointError(
                f"{directory}: no *.safetensors shards (minflux cache writes them)"
            )
        self.refs = int(self.meta.get("refs", 0))
        if cfg is not None and self.refs and cfg.max_refs is not None and self.refs > cfg.max_refs:
            raise CheckpointError(
                f"{directory / META}: pairs of {self.refs} references; the model takes at most "
                f"{cfg.max_refs}"
            )
        self.shards = [Shard(p) for p in paths]
        need = KEYS + (("vec",) if cfg is not None and cfg.vec_in_dim else ())
        first = self.shards[0]
        groups: dict[tuple, list[int]] = {}
        for i, shard in enumerate(self.shards):
            if missing := [k for k in need if k not in shard.entries]:
                raise CheckpointError(
                    f"{shard.path}: missing {missing}; a shard holds {KEYS} (+ vec for FLUX.1)"
                )
            counts = {k: e["shape"][0] if e["shape"] else 0 for k, e in shard.entries.items()}
            if len(set(counts.values())) != 1:
                raise CheckpointError(
                    f"{shard.path}: the tensors hold different numbers of samples: {counts}"
                )
            trailing = shard.trailing()
            # text shapes and the set of tensors are one across the cache; image shapes make the groups
            text = {k: v for k, v in trailing.items() if k in TEXT_KEYS}
            if text != {k: v for k, v in first.trailing().items() if k in TEXT_KEYS} or set(
                trailing
            ) != set(first.entries):
                raise CheckpointError(
                    f"{shard.path}: per-sample shapes {trailing} differ from {first.path.name}'s "
                    f"{first.trailing()}"
                )
            if cfg is not None:
                check_shapes(shard.path, trailing, cfg)
            groups.setdefault(tuple(sorted(trailing.items())), []).append(i)
        # per group: (shard, row) of every sample, in shard order
        self.groups = [
            (
                np.concatenate([np.full(self.shards[i].count, i) for i in members]),
                np.concatenate([np.arange(self.shards[i].count) for i in members]),
            )
            for members in groups.values()
        ]
        self.seed, self.caption_dropout = seed, caption_dropout
        self._plans: dict[tuple[int, int], list] = {}
        self._lock = threading.Lock()
        if caption_dropout > 0:
            file = directory / EMPTY
            if not file.is_file():
                raise CheckpointError(
                    f"{file}: no such file; caption dropout needs the empty prompt's embedding "
                    "(minflux cache writes it)"
                )
            self.empty = {k: v[0] for k, v in read_tensors(file).items()}
            shapes = first.trailing()
            for k, v in self.empty.items():
                if k not in shapes or v.shape != shapes[k]:
                    raise CheckpointError(
                        f"{file}: {k} {v.shape} does not match the shards' {shapes.get(k, 'nothing')}"
                    )

    def __len__(self) -> int:
        return sum(len(shard) for shard, _ in self.groups)

    def group_shapes(self, g: int) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of group g's tensors."""
        return self.shards[int(self.groups[g][0][0])].trailing()

    def batches_per_epoch(self, batch_size: int) -> int:
        return sum(-(-len(shard) // batch_size) for shard, _ in self.groups)

    def _plan(self, epoch: int, batch_size: int) -> list[tuple[int, np.ndarray]]:
        """Epoch `epoch`'s batches: (group, positions in the group) each (class docstring)."""
        with self._lock:
            if (epoch, batch_size) not in self._plans:
                batches = []
                for g, (shard, _) in enumerate(self.groups):
                    perm = np.random.default_rng((self.seed, epoch, g)).permutation(len(shard))
                    n = -(-len(perm) // batch_size)
                    cyc = np.resize(perm, n * batch_size)  # the last batch wraps round the group
                    batches += [(g, cyc[b * batch_size : (b + 1) * batch_size]) for b in range(n)]
                order = np.random.default_rng((self.seed, epoch, 0xBA7C)).permutation(len(batches))
                if len(self._plans) > 2:
                    self._plans.clear()
                self._plans[epoch, batch_size] = [batches[i] for i in order]
            return self._plans[epoch, batch_size]

    def plan(self, step: int, batch_size: int) -> tuple[int, np.ndarray]:
        """(group, positions in the group) of the global batch of `step`."""
        k = self.batches_per_epoch(batch_size)
        return self._plan(step // k, batch_size)[step % k]

    def read(self, g: int, positions) -> dict[str, np.ndarray]:
        """Samples `positions` of group g, stacked: {key: (n, ...)} in the stored dtypes."""
        shard_of, row_of = self.groups[g]
        shard_of, row_of = shard_of[positions], row_of[positions]
        out = {}
        for key, shape in self.group_shapes(g).items():
            dtype = np_dtype(self.shards[int(shard_of[0])].entries[key]["dtype"])
            out[key] = np.empty((len(positions), *shape), dtype)
            for s in np.unique(shard_of):
                (j,) = np.nonzero(shard_of == s)
                part = np.empty((len(j), *shape), dtype)
                self.shards[int(s)].read(key, row_of[j], part)
                out[key][j] = part
        return out

    def global_batch(
        self, step: int, batch_size: int, part: tuple[int, int] = (0, 1)
    ) -> dict[str, np.ndarray]:
        """Process `part`'s share of the global batch of step `step`: only those samples are read."""
        g, positions = self.plan(step, batch_size)
        lo, hi = part_bounds(batch_size, part)
        return self._drop(self.read(g, positions[lo:hi]), step * batch_size + lo)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors (bf16 too); a file that is not one raises CheckpointError naming it (header
    checks of `checkpoint.read_header`: not safetensors, corrupt, truncated)."""
    shard = Shard(path)
    try:
        out = {}
        for key, e in shard.entries.items():
            out[key] = np.empty(e["shape"], np_dtype(e["dtype"]))
            if e["shape"]:
                shard.read(key, range(e["shape"][0]), out[key])
        return out
    finally:
        shard.close()


def check_shapes(path, trailing: dict[str, tuple[int, ...]], cfg) -> None:
    """Raise CheckpointError naming `path` when per-sample shapes (`trailing`: key -> shape without the
    sample axis) do not fit the transformer `cfg`: img (L, C) with C + the img_cond channels = in_channels,
    txt (Lt, context_in_dim), ids (L, Lt or Lr, len(axes_dim)), FLUX.1's vec (vec_in_dim,), references
    ref (Lr, C)."""
    axes = len(cfg.axes_dim)
    length = lambda k: trailing[k][0] if len(trailing.get(k, ())) else None  # noqa: E731
    cond = trailing["img_cond"][-1] if len(trailing.get("img_cond", ())) == 2 else 0
    want = {
        "img": (None, cfg.in_channels - cond),
        "txt": (None, cfg.context_in_dim),
        "img_ids": (length("img"), axes),
        "txt_ids": (length("txt"), axes),
    }
    if cfg.vec_in_dim:
        want["vec"] = (cfg.vec_in_dim,)
    if "ref" in trailing or "ref_ids" in trailing:
        want |= {"ref": (None, cfg.in_channels - cond), "ref_ids": (length("ref"), axes)}
    if "img_cond" in trailing:
        want["img_cond"] = (length("img"), None)

    def fits(found, shape):  # None: any length
        return len(found) == len(shape) and all(
            n is None or n == m for n, m in zip(shape, found, strict=True)
        )

    bad = [
        f"{k} {trailing.get(k, 'missing')} (expected {tuple('L' if n is None else n for n in shape)})"
        for k, shape in want.items()
        if not fits(trailing.get(k, ()), shape)
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
        spec = FAMILIES[family]
        if spec.pooled_vec:
            self.empty["vec"] = np.zeros(context_dim, np.float32)
        rng = np.random.default_rng(seed)
        labels = np.stack(
            [rng.integers(len(self.SHAPES), size=n), rng.integers(len(self.COLOURS), size=n)], 1
        )
        images = np.stack([self.draw(s, c, rng) for s, c in labels])
        txt = self.embed(labels)
        axes, text_axis = spec.id_axes, spec.text_id_axis
        g = size // patch
        self.arrays = {
            "img": self.patchify(images),
            "img_ids": ids.image_ids(n, g, g, axes),
            "txt": txt,
            "txt_ids": ids.text_ids(n, txt.shape[1], axes, text_axis),
        }
        if spec.pooled_vec:
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


def read_samples(directory) -> list[dict]:
    """The validation prompts `minflux cache --sample-prompts` stored (SAMPLES): one dict per prompt with "prompt",
    "grid" (h, w) tokens and its tensors (txt, vec, ref + ref_ids or img_cond), each with a batch of one.
    Raises CheckpointError naming the file when it is missing or unreadable."""
    path = Path(directory) / SAMPLES
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such file (minflux cache --sample-prompts FILE stores the prompts)"
        )
    _, meta = parse_header(path)
    try:
        prompts, grids = json.loads(meta["prompts"]), json.loads(meta["grids"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: no prompt list in its metadata ({e})") from None
    tensors = read_tensors(path)
    out = [{"prompt": p, "grid": tuple(g)} for p, g in zip(prompts, grids, strict=True)]
    for key, v in tensors.items():
        name, _, i = key.rpartition(".")
        out[int(i)][name] = v
    return out
