"""`minflux parity`: load one checkpoint into PyTorch and JAX and report their agreement block by block.

With no arguments it writes seeded tiny checkpoints of every family, in the official layouts, to a
temporary directory, loads them through the real loading path and checks them all.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from minflux_cli.args import (
    UsageError,
    existing,
    json_file,
    lora_spec,
    nonneg_int,
    pixels,
    png_file,
    positive_int,
    preset,
)

TEMP_PREFIX = "minflux-parity-"  # the default run's checkpoints: $TMPDIR/minflux-parity-PID-XXXX/
TINY_DEFAULTS = [  # (preset, layout written) for the default run
    ("flux1-tiny", "bfl"),
    ("flux2-tiny", "bfl"),
    ("flux2-tiny", "diffusers"),
    ("flux1-ae-tiny", "bfl"),
    ("flux2-ae-tiny", "bfl"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=preset,
        help="preset name (see minflux.configs.names()); with --checkpoint or --random-weights",
    )
    p.add_argument(
        "--checkpoint",
        type=existing,
        help="safetensors file or directory of shards, any supported layout, or a .gguf file "
        "(quantized weights are compared dequantized)",
    )
    p.add_argument(
        "--random-weights", action="store_true", help="seeded random weights of --model's shapes"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="check every tensor against the SHA-256 its writer recorded (minflux convert, save_model)",
    )
    p.add_argument(
        "--dtype", default="fp32", help="fp32, bf16 or both as 'fp32,bf16' (default fp32)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--allow-tf32",
        action="store_true",
        help="canary: leave TF32 on; the fp32 bar must then fail",
    )
    p.add_argument(
        "--resolution",
        type=pixels,
        help="image side in pixels (default: 64 / 32 tiny transformer / autoencoder; 1024 / 512 full size)",
    )
    p.add_argument(
        "--txt-len", type=positive_int, help="text tokens (default 8 tiny, 512 full size)"
    )
    p.add_argument(
        "--trajectory",
        type=nonneg_int,
        metavar="N",
        help="also compare an N-step sampling trajectory from identical noise (transformers; holds both "
        "whole models; default 4 in the no-argument run, else off)",
    )
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument(
        "--lora",
        type=lora_spec,
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="compare the model with this LoRA merged (any common format; repeatable)",
    )
    p.add_argument(
        "--jax-cache",
        metavar="DIR|off",
        default=os.environ.get("MINFLUX_JAX_CACHE"),
        help="JAX's persistent compilation cache, so a repeated run loads its compiled programs instead of "
        "compiling them (default: $MINFLUX_JAX_CACHE, else $XDG_CACHE_HOME/minflux/jax or "
        "~/.cache/minflux/jax; 'off': none)",
    )
    p.add_argument("--json", type=json_file, help="write every figure to this JSON file")
    p.add_argument("--plot", type=png_file, help="write a PNG of error against depth")


def jax_cache_dir(setting: str | None) -> Path | None:
    """The compilation-cache directory for a --jax-cache setting: None when 'off'."""
    if setting and setting.lower() == "off":
        return None
    if setting:
        return Path(setting).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minflux" / "jax"


def enable_jax_cache(path: Path | None) -> None:
    """JAX's persistent compilation cache in `path`, for every program however small or quick to compile (the
    default run's are small and many). Only the command turns it on; the library and the tests leave it off."""
    if path is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _runs(args) -> list[tuple[object, Path | None, str]]:
    """(config, checkpoint path or None for random, label) for each model to check."""
    from minflux import configs

    if args.checkpoint and args.random_weights:
        raise UsageError(
            "--checkpoint and --random-weights exclude each other: weights from a file, or random"
        )
    if args.verify and args.random_weights:
        raise UsageError(
            "--verify checks the digests a --checkpoint file records; --random-weights has none"
        )
    if args.checkpoint or args.random_weights:
        if not args.model:
            raise UsageError(
                "--model NAME is required with --checkpoint / --random-weights; presets: "
                + ", ".join(configs.names())
            )
        return [(configs.resolve(args.model), args.checkpoint, args.model)]
    if args.model:
        raise UsageError(
            f"--model {args.model} needs --checkpoint FILE or --random-weights (without --model, "
            "parity checks the tiny default suite)"
        )
    return []


class WithLoRA:
    """A weight source with LoRA files merged (`minflux.lora.merge`), block by block, the same for both sides."""

    def __init__(self, source, specs: list[tuple[Path, float]], cfg, expected):
        from minflux import lora

        self.source = source
        self.loras = lora.load([p for p, _ in specs], cfg, expected, [s for _, s in specs])
        self.description = (
            f"{source.description} + LoRA {', '.join(f'{p}:{s:g}' for p, s in specs)}"
        )

    def read(self, keys) -> dict:
        from minflux import lora

        return lora.merge(self.source.read(keys), self.loras, strict=False)


def _default_checkpoints(tmp: Path) -> list[tuple[object, Path, str]]:
    """Write the seeded tiny checkpoints of the default run (through the real save path)."""
    import minflux_torch as mt
    from minflux import configs

    out = []
    for name, layout in TINY_DEFAULTS:
        path = tmp / f"{name}-{layout}.safetensors"
        mt.save_model(mt.build_model(name, seed=0), path, layout=layout)
        out.append((configs.get(name), path, f"{name} ({layout} file)"))
    return out


def run(args) -> int:
    from rich.console import Console

    from minflux import family, files
    from parity import autoencoder, precision, report, transformer, weights

    # a run killed with SIGKILL could not remove its own temp folder
    files.remove_stale_temp_folders(TEMP_PREFIX)

    console = Console(width=None if sys.stdout.isatty() else 140)  # logs and CI get the full table
    explicit = _runs(args)  # a model named on the command line; else the default tiny run
    if args.lora and (not explicit or not family.is_transformer(explicit[0][0])):
        raise UsageError("--lora needs a transformer --model with --checkpoint or --random-weights")
    dtypes = [d.strip() for d in args.dtype.split(",")]
    if not dtypes or any(d not in ("fp32", "bf16") for d in dtypes):
        raise UsageError(f"--dtype {args.dtype!r}: use fp32, bf16 or fp32,bf16")
    if args.device == "cuda":
        # Both frameworks share the GPU: JAX must not reserve 75% of it when its backend starts.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but PyTorch sees no CUDA device")
    if args.allow_tf32 and args.device != "cuda":
        raise UsageError(
            "--allow-tf32 is a canary for --device cuda (TF32 exists only on NVIDIA GPUs)"
        )
    cache = jax_cache_dir(args.jax_cache)
    if cache is not None and cache.exists() and not cache.is_dir():
        raise UsageError(f"--jax-cache {cache}: not a directory (pass a directory, or 'off')")
    enable_jax_cache(cache)
    settings = precision.configure(args.device, args.allow_tf32)
    if not args.allow_tf32:
        precision.assert_full_precision()
    # the default run's checkpoints: a folder removed on exit, or by the next run after a SIGKILL
    with files.temp_folder(TEMP_PREFIX) as tmp:
        todo = explicit or _default_checkpoints(Path(tmp))
        run_dtypes = dtypes if explicit else ["fp32", "bf16"]
        steps = args.trajectory if args.trajectory is not None else (0 if explicit else 4)
        runs = []
        for cfg, path, label in todo:
            is_ae = family.is_autoencoder(cfg)
            tiny = cfg.ch < 64 if is_ae else cfg.hidden_size < 1024
            res = (
                args.resolution
                or {(False, True): 64, (False, False): 1024, (True, True): 32, (True, False): 512}[
                    is_ae, tiny
                ]
            )
            txt_len = args.txt_len or (8 if tiny else 512)
            expected = transformer.TorchSide(
                cfg, "fp32", "meta"
            ).expected  # the model's keys and shapes
            # validated once per model, read per dtype (a CheckpointError is a one-line error, exit 2)
            src = (
                weights.CheckpointWeights(path, cfg, expected, args.verify)
                if path
                else weights.RandomWeights(cfg, expected, args.seed)
            )
            if args.lora:
                src = WithLoRA(src, args.lora, cfg, expected)
            for dtype in run_dtypes:
                with console.status(f"{label} {dtype}: comparing") as status:
                    show = lambda s, lb=label, dt=dtype: status.update(f"{lb} {dt}: {s}")  # noqa: E731
                    if is_ae:
                        out = autoencoder.run(
                            cfg,
                            src,
                            src,
                            dtype=dtype,
                            device=args.device,
                            resolution=res,
                            seed=args.seed,
                            tiny=tiny,
                            progress=show,
                        )
                    else:
                        out = transformer.run(
                            cfg,
                            src,
                            src,
                            dtype=dtype,
                            device=args.device,
                            resolution=res,
                            txt_len=txt_len,
                            seed=args.seed,
                            tiny=tiny,
                            progress=show,
                        )
                        if steps:
                            show(f"{steps}-step trajectory")
                            out["rows"] += transformer.trajectory(
                                cfg,
                                src,
                                src,
                                steps,
                                dtype=dtype,
                                device=args.device,
                                resolution=res,
                                txt_len=txt_len,
                                seed=args.seed,
                                tiny=tiny,
                            )
                            out["passed"] = all(r["passed"] for r in out["rows"])
                out.update(model=label, dtype=dtype, device=args.device, source=src.description)
                report.print_run(out, console)
                runs.append(out)
    full = {
        "environment": report.environment(args.device),
        "precision": settings,
        "allow_tf32": args.allow_tf32,
        "runs": runs,
        "passed": all(r["passed"] for r in runs),
    }
    if args.json:
        report.write_json(full, args.json)
    if args.plot:
        report.plot(full, args.plot)
    verdict = (
        "[green]all blocks agree[/green]"
        if full["passed"]
        else "[bold red]parity FAILED[/bold red]"
    )
    console.print(f"minflux parity: {verdict} ({len(runs)} runs)")
    return 0 if full["passed"] else 1
