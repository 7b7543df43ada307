"""`minflux cache`: images + captions (+ references, control images, masks) -> the shards `minflux train --data` reads.

The folder convention (kohya / ai-toolkit style), checked in full before any model is loaded:

    NAME.png|jpg|jpeg|webp    the target image (any name without one of the suffixes below)
    NAME.txt                  its caption, UTF-8
    NAME.ref.png              edit pairs (FLUX.1 Kontext, FLUX.2): the reference image; several as
    NAME.ref1.png, ...        NAME.ref1, NAME.ref2, ... (in that order: FLUX.2 reference i sits at t = 10 + 10 i)
    NAME.control.png          FLUX.1 Canny / Depth: the (preprocessed) control image
    NAME.mask.png             FLUX.1 Fill: the mask, white = repaint (the masked image is the target, blanked there)

or in sibling folders with the target's name, as ai-toolkit's `control_path`: `--ref-dir DIR` (repeatable, one per
reference), `--control-dir DIR`, `--mask-dir DIR`. What a pair needs follows the model (`configs.input_kind`).

Buckets: each target goes to the nearest of the aspect-ratio buckets of about `--size`^2 pixels (`minflux.buckets`;
the list is printed and stored), is resized to cover it and centre-cropped; `--square` keeps the old single square
crop. References are sized as the pipelines prepare them (`minflux.references.fit`, as `generate` sizes them;
`--ref-size bucket`: the target's bucket, as diffusers' training scripts pair them); control images
and masks take the target's bucket.

Output (`minflux.data.LatentShards` reads it): safetensors shards, each of one bucket (and one set of reference
sizes), at most `--shard-size` samples and `--shard-mb` megabytes: img latent tokens and ids, txt embeddings in bf16
(`--embedding-dtype fp32` on request) and ids, FLUX.1's vec, ref + ref_ids or img_cond for pairs; `cache.json`
records the buckets, the encoders and every shard with its samples' names; `empty_caption.safetensors` the empty
prompt (caption dropout); `sample_prompts.safetensors` the `--sample-prompts` (validation samples). Every file is
written atomically and `cache.json` after each shard, so an interrupted run keeps every finished shard:
`--append` continues it (and adds new images to a cache later), skipping the names already cached. This file
finds and checks the pairs and runs the command; `minflux_cli.shards` encodes them and writes the shards.

Bad data is one line naming the file, before any model loads: an unreadable or truncated image, an image smaller
than the smallest bucket, a pair missing its reference (or control image, mask), references of another count than
the run's, a caption that is not UTF-8; `--skip-bad` skips those pairs instead and prints how many.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from minflux import buckets, checkpoint, configs, data, family, images, lora, references
from minflux_cli import text_encoders
from minflux_cli.args import (
    UsageError,
    directory,
    existing,
    out_dir,
    pixels,
    positive_float,
    positive_int,
    preset,
)
from minflux_cli.frameworks import Framework
from minflux_cli.shards import (
    Encoders,
    encode_pairs,
    load_pixels,
    reference_tokens,
    shards_of,
    write_shard,
    write_tensors,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ROLE = re.compile(
    r"^(?P<name>.+)\.(?P<role>ref\d*|control|mask)$"
)  # NAME.ref2, NAME.control, NAME.mask


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=directory, help="folder of images, each with a NAME.txt caption")
    p.add_argument("out", type=out_dir, help="output folder for the shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--model",
        type=preset,
        required=True,
        help="transformer preset the cache is for (e.g. flux2-klein-4b)",
    )
    p.add_argument("--ae", type=existing, help="autoencoder checkpoint (safetensors)")
    p.add_argument(
        "--ae-config",
        type=preset,
        help="autoencoder preset (default: flux1-ae / flux2-ae, or the tiny one)",
    )
    p.add_argument(
        "--text-encoder", type=directory, help="as for `minflux generate --text-encoder`"
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="no files: a seeded random autoencoder and random caption embeddings (a smoke test, the README's demo)",
    )
    p.add_argument(
        "--text-encoder-layers",
        help="FLUX.2: hidden_states indices stacked (default: the official)",
    )
    p.add_argument("--max-length", type=positive_int, help="prompt tokens for T5 / FLUX.2")
    p.add_argument(
        "--size",
        type=pixels,
        default=512,
        help="bucket area: about SIZE x SIZE pixels per image (a multiple of 16; default 512)",
    )
    p.add_argument(
        "--square", action="store_true", help="no buckets: one SIZE x SIZE centre crop per image"
    )
    p.add_argument(
        "--bucket-step",
        type=positive_int,
        help="bucket sides in steps of this many pixels (default: 4 tokens, 64 for the real autoencoders)",
    )
    p.add_argument(
        "--max-aspect", type=positive_float, default=4.0, help="bucket aspect-ratio bound (4.0)"
    )
    p.add_argument(
        "--ref-dir",
        type=directory,
        action="append",
        default=[],
        help="folder of reference images named as the targets (repeat for each reference, in order)",
    )
    p.add_argument("--control-dir", type=directory, help="folder of control images (Canny/Depth)")
    p.add_argument("--mask-dir", type=directory, help="folder of masks (Fill)")
    p.add_argument(
        "--ref-size",
        choices=["pipeline", "bucket"],
        default="pipeline",
        help="references at the size the pipeline prepares them (default), or at the target's bucket",
    )
    p.add_argument(
        "--ref-area", type=positive_int, help="pixels per reference (default: the pipeline's)"
    )
    p.add_argument(
        "--sample-prompts",
        type=existing,
        metavar="FILE",
        help="validation prompts, one per line, 'PROMPT | IMAGE | ...' with the pair's conditioning images: "
        "their embeddings are stored for `minflux train --sample-prompts`",
    )
    p.add_argument("--framework", choices=["torch", "jax"], default="torch")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32", help="encoders' dtype")
    p.add_argument(
        "--embedding-dtype",
        choices=["bf16", "fp32"],
        default="bf16",
        help="stored text embeddings (bf16: half the disk and memory)",
    )
    p.add_argument("--device", help="torch device (default: cuda when available)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument(
        "--shard-size", type=positive_int, default=256, help="samples per shard, at most"
    )
    p.add_argument(
        "--shard-mb", type=positive_int, default=1024, help="megabytes per shard, about (1024)"
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="add to (or finish) the cache in OUT: names cached skip",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad pairs (unreadable, too small, incomplete) with a count instead of stopping",
    )


# ---------------------------------------------------------------------------------------------
# The folder: pairs, checked before any model loads
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pair:
    """One training sample: target image, caption, and its conditioning images (paths), with their fits."""

    name: str
    target: Path
    caption: str = ""
    refs: list[Path] = dataclasses.field(default_factory=list)
    control: Path | None = None
    mask: Path | None = None
    bucket: tuple[int, int] | None = None
    fit: buckets.Fit | None = None
    ref_fits: list[buckets.Fit] = dataclasses.field(default_factory=list)
    cond_fits: list[buckets.Fit] = dataclasses.field(default_factory=list)  # control, mask

    def group(self) -> tuple:
        """Samples of one group share every shape: bucket and reference sizes."""
        return (self.bucket, tuple(f.size for f in self.ref_fits))


def read_caption(path: Path) -> str:
    """A caption file's text (stripped); not UTF-8 raises UsageError naming the file and the byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at position {e.start})"
        ) from None


def find_pairs(folder: Path, ref_dirs=(), control_dir=None, mask_dir=None) -> list[Pair]:
    """Every target image in `folder` (sorted by name) with its caption and conditioning images (module
    docstring). Raises UsageError for a folder without images; captions are checked by `check`."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    roles: dict[str, dict[str, Path]] = {}
    targets = []
    for p in files:
        if m := ROLE.match(p.stem):
            roles.setdefault(m["name"], {})[m["role"]] = p
        else:
            targets.append(p)
    if not targets:
        raise UsageError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for t in targets:
        mine = roles.get(t.stem, {})
        refs = [mine[r] for r in sorted((r for r in mine if r.startswith("ref")), key=_ref_order)]
        refs += [q for d in ref_dirs if (q := _beside(d, t.stem)) is not None]
        control = mine.get("control") or (control_dir and _beside(control_dir, t.stem))
        mask = mine.get("mask") or (mask_dir and _beside(mask_dir, t.stem))
        out.append(Pair(t.stem, t, refs=refs, control=control or None, mask=mask or None))
    return out


def _ref_order(role: str) -> int:
    return int(role[3:] or 0)


def _beside(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for s in (suffix, suffix.upper()):
            if (folder / (stem + s)).is_file():
                return folder / (stem + s)
    return None


def _size(path: Path, gray: bool = False) -> tuple[int, int]:
    """(width, height) of an image, decoded in full (so a truncated file fails now); ValueError names it."""
    a = images.load(path, multiple=1, gray=gray)
    return a.shape[1], a.shape[0]


def check(pairs: list[Pair], kind: str, spec: dict, refs: int | None) -> tuple[list[Pair], dict]:
    """Caption, images, sizes and conditioning of every pair, and each pair's bucket and fits. Returns (good
    pairs, {name: why} of the bad ones); without `spec["skip_bad"]` the first bad pair raises UsageError.

    kind: "text" (references optional, `refs` of them each), "control", "fill". spec: size, square, buckets,
    multiple, family (its reference rule), ref_size, ref_area, skip_bad."""
    good, bad = [], {}
    smallest = min(min(b) for b in spec["buckets"])
    for pair in pairs:
        try:
            cap = pair.target.with_suffix(".txt")
            if not cap.is_file():
                raise UsageError(f"{pair.target}: no caption file {cap.name} beside it")
            pair.caption = read_caption(cap)
            w, h = _size(pair.target)
            if min(w, h) < smallest:
                raise UsageError(
                    f"{pair.target}: {w}x{h} is smaller than the smallest bucket side ({smallest} pixels at "
                    f"--size {spec['size']}): a larger picture or a smaller --size"
                )
            pair.bucket = (
                (spec["size"], spec["size"])
                if spec["square"]
                else buckets.nearest_bucket(w, h, spec["buckets"])
            )
            pair.fit = (
                buckets.square_crop(w, h, spec["size"])
                if spec["square"]
                else buckets.cover(w, h, pair.bucket)
            )
            _conditioning(pair, kind, spec, refs)
        except UsageError as e:
            if not spec["skip_bad"]:
                raise
            bad[pair.name] = str(e)
            continue
        except (
            ValueError
        ) as e:  # images.load: unreadable, truncated; buckets: a reference out of bounds
            if not spec["skip_bad"]:
                raise UsageError(str(e)) from None
            bad[pair.name] = str(e)
            continue
        good.append(pair)
    return good, bad


def _conditioning(pair: Pair, kind: str, spec: dict, refs: int | None) -> None:
    """Check and size a pair's references, control image or mask (UsageError / ValueError naming the file)."""
    extra = {"control": pair.control, "mask": pair.mask}
    takes = {"control": kind == "control", "mask": kind == "fill"}
    for role, path in extra.items():
        if path is not None and not takes[role]:
            raise UsageError(f"{path}: a {role} image, but the model takes {kind} pairs")
    if kind == "control" or kind == "fill":
        role = "control" if kind == "control" else "mask"
        path = extra[role]
        if path is None:
            raise UsageError(
                f"{pair.target}: no {role} image ({pair.name}.{role}.png beside it, or in --{role}-dir)"
            )
        if pair.refs:
            raise UsageError(f"{pair.refs[0]}: a reference image, but the model takes {kind} pairs")
        w, h = _size(path, gray=kind == "fill")
        pair.cond_fits = [buckets.cover(w, h, pair.bucket)]
        return
    if refs is not None and len(pair.refs) != refs:
        names = ", ".join(p.name for p in pair.refs) or "none"
        raise UsageError(
            f"{pair.target}: {len(pair.refs)} reference image(s) ({names}), but the run's pairs have {refs}"
            + (f" ({pair.name}.ref.png beside it, or in --ref-dir)" if not pair.refs else "")
        )
    pair.ref_fits = []
    for path in pair.refs:
        w, h = _size(path)
        try:
            fit = (
                buckets.cover(w, h, pair.bucket)
                if spec["ref_size"] == "bucket"
                else references.fit(w, h, spec["family"], spec["multiple"], spec["ref_area"])
            )
        except ValueError as e:
            raise UsageError(f"{path}: {e}") from None
        pair.ref_fits.append(fit)


# ---------------------------------------------------------------------------------------------
# Validation prompts
# ---------------------------------------------------------------------------------------------


def read_sample_prompts(path: Path, kind: str, refs: int) -> list[tuple[str, list[Path]]]:
    """`--sample-prompts FILE`: (prompt, images) per non-empty line ('#' starts a comment), 'PROMPT | IMAGE | ...'
    with the images a pair of this cache takes (its references; the control image; the image and its mask),
    relative to the file's folder. Raises UsageError naming the file and line."""
    out = []
    want = {"text": refs, "control": 1, "fill": 2}[kind]
    for n, line in enumerate(read_caption(path).splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompt, *rest = [part.strip() for part in line.split("|")]
        pics = [path.parent / r for r in rest]
        if len(pics) != want:
            raise UsageError(
                f"--sample-prompts {path} line {n}: {len(pics)} image(s); this cache's pairs take {want}"
            )
        if missing := [p for p in pics if not p.is_file()]:
            raise UsageError(f"--sample-prompts {path} line {n}: {missing[0]}: no such file")
        out.append((prompt, pics))
    if not out:
        raise UsageError(f"--sample-prompts {path}: no prompts")
    return out


def encode_samples(enc: Encoders, prompts, kind: str, spec: dict) -> tuple[dict, dict]:
    """The validation prompts' tensors, prompt i's as KEY.i with a batch of one (each may have its own sizes), and
    the metadata: the prompts and the token grid each is sampled at (the bucket nearest its first image, or the
    most square bucket)."""
    tensors, grids = {}, []
    for i, (prompt, pics) in enumerate(prompts):
        sizes = [_size(p) for p in pics]
        bucket = (
            buckets.nearest_bucket(*sizes[0], spec["buckets"])
            if sizes
            else buckets.nearest_bucket(1, 1, spec["buckets"])
        )
        pair = Pair(f"sample {i}", Path(), prompt, bucket=bucket)
        if kind == "text":
            pair.refs = pics
            _conditioning(pair, kind, spec, len(pics))
        text = enc.captions([prompt])
        tensors |= {f"{k}.{i}": v for k, v in text.items()}
        if kind == "control":
            tensors[f"img_cond.{i}"], _ = enc.tokens(
                load_pixels(pics[0], buckets.cover(*sizes[0], bucket))[None]
            )
        elif kind == "fill":
            pix = load_pixels(pics[0], buckets.cover(*sizes[0], bucket))[None]
            mask = load_pixels(pics[1], buckets.cover(*sizes[1], bucket), gray=True)[None]
            tensors[f"img_cond.{i}"] = enc.fill(pix, mask)
        elif pics:
            refs = [
                reference_tokens(enc, [load_pixels(p, f)], j)
                for j, (p, f) in enumerate(zip(pics, pair.ref_fits, strict=True))
            ]
            tensors[f"ref.{i}"] = np.concatenate([t for t, _ in refs], axis=1)
            tensors[f"ref_ids.{i}"] = np.concatenate([r for _, r in refs], axis=1)
        m = enc.ppt
        grids.append([bucket[1] // m, bucket[0] // m])
    return tensors, {"prompts": json.dumps([p for p, _ in prompts]), "grids": json.dumps(grids)}


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def settings(args, cfg, ae_cfg) -> dict:
    """What a cache is made with, recorded in cache.json; `--append` must match it."""
    ppt = configs.pixels_per_token(ae_cfg)
    step = args.bucket_step or 4 * ppt
    if step % ppt:
        raise UsageError(f"--bucket-step {step}: must be a multiple of {ppt} pixels (one token)")
    if args.size % ppt:
        raise UsageError(f"--size {args.size}: must be a multiple of {ppt} pixels (one token)")
    try:
        table = (
            [(args.size, args.size)]
            if args.square
            else buckets.make_buckets(args.size, step, args.max_aspect)
        )
    except ValueError as e:
        raise UsageError(f"--size {args.size}: {e}") from None
    try:
        kind = configs.input_kind(cfg, ppt)
    except ValueError as e:  # a Fill / control preset with an autoencoder of another downsampling
        raise UsageError(f"--model {args.model} with {ae_cfg_name(args, cfg)}: {e}") from None
    return {
        "model": args.model,
        "kind": kind,
        "size": args.size,
        "square": args.square,
        "bucket_step": step,
        "max_aspect": args.max_aspect,
        "buckets": [list(b) for b in table],
        "ref_size": args.ref_size,
        "ref_area": args.ref_area,
        "embedding_dtype": args.embedding_dtype,
        "ae": {
            "config": ae_cfg_name(args, cfg),
            "file": None if args.random_weights else str(Path(args.ae).absolute()),
            "seed": 1,
        },
        "text_encoder": None if args.random_weights else str(Path(args.text_encoder).absolute()),
        "max_length": args.max_length,
        "text_encoder_layers": args.text_encoder_layers,
    }


def ae_cfg_name(args, cfg) -> str:
    return args.ae_config or f"{cfg.family}-ae" + (
        "-tiny" if args.model.endswith("-tiny") or args.random_weights else ""
    )


def check_ae(path: Path, ae_cfg, name: str) -> None:
    """--ae holds an autoencoder of the model's family, from its header alone, before any image is read (it was
    found after the captions were checked, without naming --ae; a LoRA was told to go to --lora, which cache
    does not have)."""
    if lora.is_lora(path):
        raise UsageError(f"--ae {path}: a LoRA file (low-rank A/B pairs), not an autoencoder")
    try:
        with checkpoint.Checkpoint(path, quiet=True) as ckpt:
            checkpoint.check_holds(ckpt, ae_cfg, name)
    except checkpoint.CheckpointError as e:
        raise UsageError(f"--ae {e}") from None


def plan(args):
    """Every check before a model loads: (cfg, ae_cfg, settings, the existing record or None, pairs to encode,
    the bad ones skipped, the sample prompts or None, the text plan)."""
    cfg = configs.resolve(args.model)
    if not family.is_transformer(cfg):
        raise UsageError(
            f"--model {args.model} is {configs.describe(cfg.family)}, not a transformer"
        )
    if args.random_weights and (args.ae or args.text_encoder):
        raise UsageError(
            "--random-weights builds its own models: leave out --ae and --text-encoder"
        )
    if not args.random_weights:
        for flag in ("ae", "text_encoder"):
            if getattr(args, flag) is None:
                raise UsageError(
                    f"the following arguments are required: --{flag.replace('_', '-')} "
                    "(or --random-weights)"
                )
    ae_cfg = configs.resolve(ae_cfg_name(args, cfg))
    if not family.of(cfg).takes(ae_cfg):
        raise UsageError(
            f"--ae-config {args.ae_config}: {args.model} needs "
            f"{configs.describe(family.of(cfg).autoencoder)}"
        )
    if not args.random_weights:
        check_ae(args.ae, ae_cfg, ae_cfg_name(args, cfg))
    spec = settings(args, cfg, ae_cfg)
    old = data.read_meta(args.out) if args.out.is_dir() else None
    if old is not None and not args.append:
        raise UsageError(
            f"{args.out} holds a cache ({data.META}); pass --append to add to it, or another folder"
        )
    if args.append and args.out.is_dir() and old is None and any(args.out.glob("*.safetensors")):
        raise UsageError(
            f"--append: {args.out} holds shards made before {data.META}: cache into a new folder"
        )
    if old is not None:
        if diff := [k for k in spec if k != "ae" and old.get(k) != spec[k]]:
            raise UsageError(
                f"--append: {args.out / data.META} was made with "
                + ", ".join(f"{k} {old.get(k)!r} (now {spec[k]!r})" for k in diff[:4])
            )
    ppt = configs.pixels_per_token(ae_cfg)
    check_spec = {
        **spec,
        "buckets": [tuple(b) for b in spec["buckets"]],
        "multiple": ppt,
        "family": family.of(cfg),  # the reference rule and limits
        "skip_bad": args.skip_bad,
    }
    pairs = find_pairs(args.images, args.ref_dir, args.control_dir, args.mask_dir)
    done = {n for s in (old or {}).get("shards", []) for n in s["names"]}
    pairs = [p for p in pairs if p.name not in done]
    refs = (old or {}).get("refs")
    if (
        refs is None and pairs
    ):  # the run's count: the most common (then the largest), so the odd pairs are named
        counts = collections.Counter(len(p.refs) for p in pairs)
        refs = max(counts, key=lambda k: (counts[k], k))
    pairs, bad = check(pairs, spec["kind"], check_spec, refs)
    if not pairs and old is None:
        raise UsageError(f"{args.images}: no pair left to cache ({len(bad)} skipped as bad)")
    refs = refs or 0
    if spec["kind"] == "text" and cfg.max_refs is not None and refs > cfg.max_refs:
        raise UsageError(
            f"{pairs[0].target}: {refs} reference images; {args.model} takes at most {cfg.max_refs}"
        )
    prompts = (
        read_sample_prompts(args.sample_prompts, spec["kind"], refs)
        if args.sample_prompts
        else None
    )
    tp = None
    if not args.random_weights:
        captions = sorted({p.caption for p in pairs} | {""} | {p for p, _ in prompts or []})
        tp = text_encoders.text_plan(
            args.model,
            cfg,
            captions,
            None,
            args.text_encoder,
            args.max_length,
            args.text_encoder_layers,
            encode_only=True,
        )
    spec["refs"] = refs
    return cfg, ae_cfg, spec, check_spec, old, pairs, bad, prompts, tp


def run(args) -> int:
    from tqdm.auto import tqdm

    cfg, ae_cfg, spec, check_spec, old, pairs, bad, prompts, tp = plan(args)
    if bad:
        first = next(iter(bad.values()))
        print(f"skipped {len(bad)} bad pair(s) of {len(bad) + len(pairs)} (first: {first})")
    if not spec["square"]:
        table = ", ".join(f"{w}x{h}" for w, h in spec["buckets"])
        print(f"{len(spec['buckets'])} buckets of about {args.size}x{args.size} pixels: {table}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {**spec, "shards": list((old or {}).get("shards", [])), "skipped": sorted(bad)}
    if old is not None:
        record["skipped"] = sorted(set(old.get("skipped", [])) | set(bad))
    fw = Framework(args.framework, args.dtype, args.device)
    enc = Encoders(args, cfg, ae_cfg, fw, tp)
    if old is None or not (args.out / data.EMPTY).is_file():
        write_tensors(args.out / data.EMPTY, enc.captions([""]))
    serial = 1 + max(
        (int(m[1]) for s in record["shards"] if (m := re.search(r"(\d+)\.", s["file"]))),
        default=-1,
    )
    limit = args.shard_mb * 1_000_000
    with tqdm(total=len(pairs), desc="caching", unit="image", disable=args.no_progress) as bar:
        for chunk in shards_of(pairs, args.shard_size):
            parts, size = [], 0
            for start in range(0, len(chunk), args.batch_size):
                batch = chunk[start : start + args.batch_size]
                parts.append((batch, encode_pairs(enc, batch, spec["kind"])))
                size += sum(v.nbytes for v in parts[-1][1].values())
                bar.update(len(batch))
                if size >= limit or start + args.batch_size >= len(chunk):
                    serial = write_shard(args.out, parts, serial, record)
                    parts, size = [], 0
    if prompts is not None:
        tensors, meta = encode_samples(enc, prompts, spec["kind"], check_spec)
        write_tensors(args.out / data.SAMPLES, tensors, meta)
        record["sample_prompts"] = data.SAMPLES
        print(f"wrote {args.out / data.SAMPLES}: {len(prompts)} validation prompt(s)")
    data.write_meta(args.out, record)
    n = sum(s["count"] for s in record["shards"])
    print(
        f"wrote {args.out / data.META}: {n} samples in {len(record['shards'])} shard(s) "
        f"({len(pairs)} new)"
    )
    return 0
