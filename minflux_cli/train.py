"""`minflux train`: train FLUX through JAX.

With no arguments it trains a tiny FLUX.2 on procedurally drawn coloured shapes, 24x24 pixels, in pixel space
(each 4x4 pixel patch is one 48-channel token), conditioned on the caption's words as fixed random embeddings: a few
minutes on two CPU cores, then a grid of samples per caption and the loss curve under `out/train`.
With `--data DIR` it fine-tunes on cached latents and text embeddings (`minflux cache`: shards streamed from disk
in aspect-ratio buckets, edit / control pairs, see `minflux.data.LatentShards`), from base weights given by `--init`,
optionally as LoRA (`--lora-rank`).

Before anything is built every argument is checked (`plan`), the step's memory too (`check_memory`: a batch or
LoRA rank the device cannot hold is one line, not an allocation failure); a disk that fills during the run is one
line naming the checkpoint folder (`Trainer.save`), the earlier checkpoints kept.

What a run shows: the progress bar (loss, samples/s), TensorBoard event files and one JSON line per step in
`OUT/tensorboard` and `OUT/metrics.jsonl` (`minflux_jax.runlog.RunLog`), and with `--sample-every N` a grid of
validation samples at step 0 and every N steps (`OUT/samples/step-NNNNNN.png`, also in TensorBoard), drawn with the
EMA weights when EMA is on: the demo's captions on the training schedule, or for `--data` the `--sample-prompts`
the cache stored (with their reference or control images) as `minflux generate` would draw them, decoded by the
cache's autoencoder (`--ae`); `minflux_cli.pictures` draws them, and the loss curve.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from minflux import checkpoint, configs, files, keymaps, memory
from minflux import data as datasets
from minflux import lora as lora_files
from minflux.checkpoint import Checkpoint, CheckpointError
from minflux.data import DEMO, LatentShards, Shapes
from minflux_cli.args import (
    UsageError,
    directory,
    existing,
    finite,
    fraction,
    nonneg_float,
    nonneg_int,
    out_dir,
    positive_int,
    preset,
)
from minflux_cli.pictures import demo_grid, sampler, save_grid, save_loss_curve

# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def config_name(text: str) -> str:
    """--config: 'demo' or a transformer preset."""
    if text == "demo":
        return text
    name = preset(text)
    if configs.get(name).family not in configs.FAMILIES:
        raise argparse.ArgumentTypeError(
            f"{name} is an autoencoder; train takes a transformer preset or 'demo'"
        )
    return name


def mesh_axis(text: str) -> int:
    """One --mesh size: >= 1, or -1 for the remaining devices."""
    return -1 if text.strip() == "-1" else positive_int(text)


def decay(text: str) -> float:
    """--ema: a decay in [0, 1); 1.0 would keep the initial weights forever."""
    value = fraction(text)
    if value == 1.0:
        raise argparse.ArgumentTypeError(
            "must be < 1 (1.0 would keep the initial weights), got 1.0"
        )
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--config",
        type=config_name,
        default="demo",
        help="a transformer preset name (configs.names()), or 'demo' (default)",
    )
    p.add_argument(
        "--data", type=directory, help="directory of cached-latent shards; default: the shapes demo"
    )
    p.add_argument(
        "--init",
        type=existing,
        help="base weights (safetensors, BFL or diffusers layout); default: random",
    )
    p.add_argument(
        "--out",
        type=out_dir,
        default=Path("out/train"),
        help="output directory (default: out/train)",
    )
    p.add_argument("--steps", type=positive_int, default=1200, help="optimiser updates")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="global micro-batch, a multiple of the mesh",
    )
    p.add_argument("--accumulate", type=positive_int, default=1, help="micro-batches per update")
    p.add_argument("--lr", type=nonneg_float, default=2e-3)
    p.add_argument("--warmup", type=nonneg_int, default=50)
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0)
    p.add_argument("--clip", type=nonneg_float, default=1.0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed", "bf16"])
    p.add_argument(
        "--remat",
        default="none",
        choices=["none", "full", "dots", "dots_no_batch", "attention", "attention_dots"],
    )
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "xla", "cudnn"],
        help="auto: cuDNN fused flash attention on NVIDIA GPUs in bf16 (1.6x faster steps at 1024 px), "
        "XLA's elsewhere",
    )
    p.add_argument("--timesteps", default="logit_normal", choices=["logit_normal", "uniform"])
    p.add_argument(
        "--logit-mean", type=finite, default=0.3, help="> 0: more high-noise steps (layout)"
    )
    p.add_argument("--logit-std", type=nonneg_float, default=1.0)
    p.add_argument(
        "--shift", action="store_true", help="FLUX's resolution-dependent timestep shift"
    )
    p.add_argument("--weighting", default="none", choices=["none", "cosmap"])
    p.add_argument(
        "--guidance",
        type=finite,
        default=None,
        help="guidance value for guidance-distilled models (default 1.0; 0.0 is honoured)",
    )
    p.add_argument(
        "--mesh",
        type=mesh_axis,
        nargs=2,
        default=(1, 1),
        metavar=("DATA", "FSDP"),
        help="device mesh; -1 in one place takes the remaining devices",
    )
    p.add_argument(
        "--ema",
        type=decay,
        default=0.0,
        help="keep an exponential moving average of the weights with this decay (e.g. 0.999); the "
        "samples and exported files use it",
    )
    p.add_argument(
        "--lora-rank",
        type=positive_int,
        default=None,
        help="train LoRA adapters of this rank (>= 1), base frozen; default: full fine-tuning",
    )
    p.add_argument(
        "--lora-alpha",
        type=finite,
        default=None,
        help="LoRA alpha (default 16): updates scale by alpha / rank",
    )
    p.add_argument(
        "--init-lora",
        type=existing,
        metavar="FILE",
        help="start the adapters from this LoRA file (any "
        "format minflux reads: diffusers/PEFT, kohya, XLabs, ComfyUI, ...); its rank and modules become "
        "the run's",
    )
    p.add_argument(
        "--lora-targets",
        nargs="+",
        default=None,
        help="regexes over BFL module names (with --lora-rank)",
    )
    p.add_argument(
        "--lora-format",
        choices=lora_files.FORMATS,
        default=None,
        help="the LoRA file written (default diffusers): diffusers (load_lora_weights reads it at the "
        "intended strength), kohya (sd-scripts / ComfyUI, with .alpha) or bfl (diffusion_model. names)",
    )
    p.add_argument(
        "--save-every",
        type=nonneg_int,
        default=0,
        help="orbax checkpoint every N micro-steps (0: none)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest intact checkpoint in OUT/ckpt, with the same config, batch size, "
        "accumulation, LoRA, precision, EMA and mesh",
    )
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--sample-steps", type=positive_int, default=24)
    p.add_argument(
        "--sample-every",
        type=nonneg_int,
        default=0,
        help="a grid of validation samples at step 0 and every N micro-steps (0: none; the demo draws its "
        "captions, --data the --sample-prompts)",
    )
    p.add_argument(
        "--sample-prompts",
        type=existing,
        metavar="FILE",
        help="validation prompts (the file given to `minflux cache --sample-prompts`, whose embeddings and "
        "images the cache stored)",
    )
    p.add_argument(
        "--ae",
        type=existing,
        help="autoencoder that decodes --data samples (default: the one the cache was made with)",
    )
    p.add_argument(
        "--caption-dropout",
        type=fraction,
        default=None,
        help="fraction of samples trained on the empty caption, for CFG (default: 0.1 demo, 0 --data; "
        "--data needs the empty_caption.safetensors minflux cache writes)",
    )
    p.add_argument(
        "--cfg",
        type=finite,
        default=None,
        help="samples: classifier-free guidance scale against the empty caption (default 3 for the demo, "
        "1 (none) for --data)",
    )


def check_init(path: Path, cfg, name: str) -> None:
    """--init must hold a transformer of `cfg`'s family and width: said before any key list."""
    # headers only: a file that is not safetensors is a CheckpointError
    with Checkpoint(path, quiet=True) as ckpt:
        try:
            checkpoint.check_holds(ckpt, cfg, name)
        except CheckpointError as e:
            raise UsageError(f"--init {e}") from None
        if keymaps.infer_family(ckpt.meta) is None:
            raise UsageError(
                f"--init {path} holds {configs.describe(None)}; {name} needs "
                f"{configs.describe(cfg.family, cfg.hidden_size)}"
            )


def plan(args):
    """Check every argument before any model is built, cheap checks first, the data last: returns
    (cfg, data, the resolved (data, fsdp) mesh, the validation samples). Raises UsageError naming the argument."""
    cfg = DEMO if args.config == "demo" else configs.get(args.config)
    _check_flags(args, cfg)
    try:
        if args.init:
            check_init(args.init, cfg, args.config)
    except CheckpointError as e:  # not safetensors, corrupt, truncated
        raise UsageError(f"--init {e}") from None
    if not args.data and cfg.in_channels != 4 * 4 * 3:
        raise UsageError(
            f"--config {args.config} takes {cfg.in_channels}-channel tokens; the shapes demo makes 48 "
            "(4x4 RGB patches): pass --data with latents cached for it"
        )
    mesh = _mesh(args)
    _plan_lora(args, cfg)
    data = _data(args, cfg)
    check_memory(args, cfg, data, mesh)
    samples = plan_samples(args, cfg) if args.sample_every else None
    return cfg, data, tuple(int(n) for n in mesh.shape.values()), samples


def _check_flags(args, cfg) -> None:
    """Flags that exclude or need each other, and flags the config or the machine cannot take."""
    import jax

    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: not a directory")
    if args.init_lora is not None and (args.lora_rank is not None or args.lora_targets):
        raise UsageError(
            "--init-lora takes its rank and modules from the file: leave out --lora-rank and "
            "--lora-targets"
        )
    for flag in ("lora_targets", "lora_alpha", "lora_format"):
        if getattr(args, flag) is not None and args.lora_rank is None and args.init_lora is None:
            raise UsageError(f"--{flag.replace('_', '-')} needs --lora-rank (or --init-lora)")
    if args.init_lora is not None and args.lora_alpha is not None:
        raise UsageError("--init-lora takes its alpha from the file: leave out --lora-alpha")
    if args.sample_prompts is not None and not args.data:
        raise UsageError("--sample-prompts needs --data (the demo samples its own captions)")
    for flag in ("sample_prompts", "ae"):
        if getattr(args, flag) is not None and not args.sample_every:
            raise UsageError(
                f"--{flag.replace('_', '-')} is for validation samples: pass --sample-every N"
            )
    if args.guidance is not None and not cfg.guidance_embed:
        raise UsageError(
            f"--guidance: {args.config} is not guidance-distilled (it takes no guidance value)"
        )
    if args.attention == "cudnn" and jax.default_backend() != "gpu":
        raise UsageError(
            f"--attention cudnn needs an NVIDIA GPU; this JAX runs on {jax.default_backend()}"
        )


def _mesh(args):
    """The (data, fsdp) device mesh --mesh asks for, which the batch must divide over."""
    from minflux_jax import trainer as tr

    if tuple(args.mesh) == (-1, -1):
        raise UsageError("--mesh -1 -1: -1 may stand for one axis only")
    try:
        mesh = tr.make_mesh(*args.mesh)
    except ValueError as e:
        raise UsageError(f"--mesh {' '.join(map(str, args.mesh))}: {e}") from None
    if args.batch_size % mesh.size:
        raise UsageError(
            f"--batch-size {args.batch_size} must be a multiple of the mesh's {mesh.size} devices "
            f"(--mesh {' '.join(map(str, args.mesh))})"
        )
    return mesh


def _plan_lora(args, cfg) -> None:
    """Check --lora-targets and --lora-rank against the model; with --init-lora, take rank and alpha from the
    file (for the run record and the options)."""
    from minflux_jax import load
    from minflux_jax.lora import LoRA, linear_names

    if args.lora_targets:
        try:
            lora_files.targets(linear_names(load.abstract_model(cfg)), args.lora_targets)
        except (ValueError, re.error) as e:
            raise UsageError(f"--lora-targets: {e}") from None
    if args.lora_rank is not None and args.init_lora is None:
        limit, layer = memory.lora_rank_limit(cfg, args.lora_targets)
        if args.lora_rank > limit:
            raise UsageError(
                f"--lora-rank {args.lora_rank} exceeds {limit}, the smallest adapted layer's rank "
                f"({layer}: min(in, out))"
            )
    if args.init_lora is not None:
        try:
            lora, _ = LoRA.from_file(args.init_lora, cfg)
        except (CheckpointError, ValueError) as e:
            raise UsageError(f"--init-lora {args.init_lora}: {e}") from None
        args.lora_rank, args.lora_alpha = lora.rank, lora.alpha


def _data(args, cfg):
    """The cached shards of --data (streamed), or the generated shapes of the demo."""
    if args.data:
        dropout = 0.0 if args.caption_dropout is None else args.caption_dropout
        try:
            return LatentShards(args.data, seed=args.seed, caption_dropout=dropout, cfg=cfg)
        except CheckpointError as e:  # each names the shard and the cause
            raise UsageError(f"--data {e}") from None
    dropout = 0.1 if args.caption_dropout is None else args.caption_dropout
    return Shapes(
        context_dim=cfg.context_in_dim, family=cfg.family, seed=args.seed, caption_dropout=dropout
    )


def largest_sample(data) -> tuple[int, int]:
    """(image + reference tokens, text tokens) of the data set's largest sample (its largest bucket): what a
    step's memory follows."""
    if isinstance(data, LatentShards):
        shapes = [data.group_shapes(g) for g in range(len(data.groups))]
    else:
        shapes = [{k: v.shape[1:] for k, v in data.arrays.items()}]
    img = max(s["img"][0] + (s["ref"][0] if "ref" in s else 0) for s in shapes)
    return img, max(s["txt"][0] for s in shapes)


def check_memory(args, cfg, data, mesh) -> None:
    """Refuse, before anything is allocated, a step that cannot fit (`memory.train_bytes` against what the
    device has): on a GPU each device's share (the batch over the mesh, the weights and optimiser state over the
    fsdp axis) against its own free memory; on a CPU, where the devices share the host's memory, the whole
    process's part. Raises UsageError naming --batch-size, the estimate and what is available."""
    import jax

    from minflux_jax.layers import attention_backend

    master, compute = {"fp32": (4, 4), "bf16-mixed": (4, 2), "bf16": (2, 2)}[args.precision]
    head = cfg.hidden_size // cfg.num_heads
    q = jax.ShapeDtypeStruct((1, cfg.num_heads, 1, head), "float32" if compute == 4 else "bfloat16")
    img, txt = largest_sample(data)
    device = jax.local_devices()[0]
    stats = (device.memory_stats() or {}) if device.platform != "cpu" else {}
    if "bytes_limit" in stats:  # a GPU: its own memory, for its share of the batch and the state
        available = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        where, batch, shards = (
            f"each {device.device_kind}",
            args.batch_size // mesh.size,
            mesh.shape["fsdp"],
        )
    else:  # the host's memory, shared by this process's devices
        available, where = memory.available_bytes(), "this machine"
        batch, shards = args.batch_size // jax.process_count(), 1
    estimate = memory.train_bytes(
        cfg,
        img,
        txt,
        max(batch, 1),
        lora_rank=args.lora_rank or 0,
        lora_patterns=args.lora_targets,
        ema=args.ema > 0,
        remat=args.remat != "none",
        dtype_bytes=compute,
        attention_matrix=attention_backend(args.attention, q) == "xla",
        master_bytes=master,
        shards=shards,
    )
    what = (
        f"--batch-size {args.batch_size} ({args.config}, {img} image + {txt} text tokens per sample, "
        f"{args.precision}{f', LoRA rank {args.lora_rank}' if args.lora_rank else ''})"
    )
    try:
        memory.check(estimate, what, available, where)
    except memory.TooLarge as e:
        levers = ["a smaller --batch-size"] + [
            lever
            for lever, unused in (
                ("--remat full", args.remat == "none"),
                ("--precision bf16-mixed", args.precision == "fp32"),
                ("--lora-rank 16", not args.lora_rank),
            )
            if unused
        ]
        raise UsageError(f"{e}: try {', '.join(levers)}") from None


def plan_samples(args, cfg) -> dict | None:
    """--sample-every with --data: the stored validation prompts that --sample-prompts names, and the autoencoder
    that decodes them ({"prompts", "ae_config", "ae_file", "ae_seed"}); None for the demo. Raises UsageError
    naming the flag and the file."""
    if not args.data:
        return None
    if args.sample_prompts is None:
        raise UsageError(
            "--sample-every with --data needs --sample-prompts FILE (cached by minflux cache)"
        )
    try:
        stored = {s["prompt"]: s for s in datasets.read_samples(args.data)}
        wanted = [
            line.split("|")[0].strip()
            for line in args.sample_prompts.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    except (CheckpointError, OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--sample-prompts {args.sample_prompts}: {e}") from None
    if missing := [p for p in wanted if p not in stored]:
        raise UsageError(
            f"--sample-prompts {args.sample_prompts}: {missing[0]!r} is not in "
            f"{args.data / datasets.SAMPLES}; store it with minflux cache --sample-prompts FILE --append"
        )
    if cfg.ref_kv and args.cfg not in (None, 1.0):
        raise UsageError(
            f"--cfg: {args.config} is a klein KV model; its samples take no negative prompt (as generate)"
        )
    ae = (datasets.read_meta(args.data) or {}).get("ae") or {}
    if args.ae is None and not ae:
        raise UsageError(
            f"--sample-every: {args.data} does not record its autoencoder: pass --ae FILE"
        )
    return {
        "prompts": [stored[p] for p in wanted],
        "ae_config": ae.get("config") or f"{cfg.family}-ae",
        "ae_file": str(args.ae) if args.ae else ae.get("file"),
        "ae_seed": ae.get("seed", 1),
    }


def train_options(args, ckpt: Path):
    """The command's arguments as `TrainOptions`; its own checks (ValueError) become a UsageError."""
    from minflux_jax.trainer import TrainOptions

    try:
        return TrainOptions(
            steps=args.steps,
            batch_size=args.batch_size,
            accumulate=args.accumulate,
            lr=args.lr,
            warmup=args.warmup,
            weight_decay=args.weight_decay,
            clip=args.clip,
            precision=args.precision,
            remat=args.remat,
            attention=args.attention,
            timesteps={
                "kind": args.timesteps,
                "mean": args.logit_mean,
                "std": args.logit_std,
                "shift": args.shift,
            },
            weighting=args.weighting,
            guidance=args.guidance,
            seed=args.seed,
            mesh=tuple(args.mesh),
            ema=args.ema,
            lora_rank=0 if args.lora_rank is None else args.lora_rank,
            lora_alpha=16.0 if args.lora_alpha is None else args.lora_alpha,
            **({"lora_targets": tuple(args.lora_targets)} if args.lora_targets else {}),
            init=None if args.init is None else str(args.init),
            init_lora=None if args.init_lora is None else str(args.init_lora),
            ckpt_dir=str(ckpt) if args.save_every or args.resume else None,
            save_every=args.save_every,
        )
    except ValueError as e:  # should one slip past the argument types
        raise UsageError(str(e)) from None


def run(args) -> int:
    import time

    from minflux_jax import trainer as tr

    tr.maybe_initialize_distributed()
    out = args.out
    ckpt = out / "ckpt"
    cfg, data, mesh, samples = plan(args)  # (an --init-lora file sets the run's LoRA rank)
    opts = train_options(args, ckpt)
    # resume: the saved run's options against these, before any model is built or checkpoint read
    if args.resume:
        try:
            tr.check_resume(ckpt, tr.run_record(cfg, opts, mesh))
        except CheckpointError as e:
            raise UsageError(f"--resume: {e}") from None
    elif args.save_every and (steps := tr.saved_steps(ckpt)):
        raise UsageError(
            f"{ckpt} holds checkpoints (latest: step {steps[0]}); pass --resume to continue that run, "
            "or another --out"
        )
    # room for the exported model (fp32) and, with --save-every, orbax's state (weights + Adam's moments)
    params = memory.transformer_params(cfg) * 4
    files.check_folder(
        out, size=params * (1 + (3 if args.save_every and not opts.lora_rank else 0))
    )
    files.make_folders(out)
    trainer = tr.Trainer(cfg, data, opts)
    if args.resume:
        print(f"resumed from step {trainer.restore()}")
    log = tr.RunLog(out, start=trainer.step)
    draw = sampler(args, cfg, data, trainer, samples, log) if args.sample_every else None
    if draw is not None and trainer.step == 0:
        draw(0)  # the starting point, so progress can be seen
    t0 = time.time()
    try:
        losses = trainer.fit(
            progress=not args.no_progress, log=log, every=args.sample_every, callback=draw
        )
    except FloatingPointError:
        # diverged: the save in flight (an earlier, finite step) finishes, so no orbax thread dies at exit
        log.close()
        trainer.close()
        raise
    except BaseException:
        log.abandon()  # the first failure is the one reported (a full disk fails the log's flush too)
        raise
    log.close()
    if trainer.manager is not None:
        trainer.save(wait=True)
    trainer.close()
    if losses:
        print(
            f"{len(losses)} steps in {time.time() - t0:.0f} s; final loss (mean of last 50) "
            f"{np.mean(losses[-50:]):.4f}"
        )
    else:
        print(
            f"no steps left: the checkpoint is at micro-step {trainer.step} of {opts.steps * opts.accumulate}"
        )
    written = [out / "model.safetensors"]
    if losses:
        save_loss_curve(losses, out / "loss.png")
        written.append(out / "loss.png")
    trainer.export(out / "model.safetensors")
    if opts.lora_rank:
        trainer.save_lora(out / "lora.safetensors", args.lora_format or "diffusers")
        written.append(out / "lora.safetensors")
    if isinstance(data, Shapes):
        pictures, captions = demo_grid(args, cfg, data, trainer)
        save_grid(pictures, captions, 6, out / "samples.png")
        written.append(out / "samples.png")
    written += [out / tr.RunLog.JSONL, out / tr.RunLog.EVENTS]
    print("wrote " + ", ".join(map(str, written)))
    return 0
