"""`minflux convert SRC DST`: re-lay a checkpoint between the BFL and diffusers layouts (`minflux.convert`), or a
LoRA file between the diffusers, kohya and BFL forms (`minflux.lora.convert_file`; needs `--model`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from minflux import checkpoint, configs, files, lora
from minflux.convert import DTYPES, EXTRACT, convert
from minflux_cli.args import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        help="a .safetensors file, a directory of shards or a shard index (BFL or diffusers "
        "names, bare, prefixed or in an all-in-one file; bf16/fp16/fp32/fp8, NVFP4), a .gguf file "
        "(dequantized), or a LoRA file in any common format",
    )
    parser.add_argument("dst", help="the output .safetensors file (written atomically)")
    parser.add_argument(
        "--to",
        choices=sorted(set(checkpoint.LAYOUTS) | set(lora.FORMATS)),
        help="target layout (default: diffusers for a BFL source, bfl for a diffusers one); "
        f"LoRA files: one of {', '.join(lora.FORMATS)} (required)",
    )
    parser.add_argument("--model", help="LoRA files: the preset the LoRA is for (family and width)")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="cast floating-point tensors (default: keep); fp8: float8_e4m3fn linear weights with "
        "per-tensor F32 *.weight_scale (ComfyUI's convention)",
    )
    parser.add_argument(
        "--extract",
        choices=EXTRACT,
        help="the component to write from an all-in-one file (transformer or autoencoder)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-digests",
        action="store_true",
        help="skip the per-tensor SHA-256 digests (what `load_model(verify=True)` checks)",
    )


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    try:  # a folder, a device, /proc, a read-only folder, a name too long: before any work
        files.check_output(dst)
    except files.OutputError as e:
        raise UsageError(f"dst {e}") from None
    if src.exists() and dst.exists() and dst.resolve() == src.resolve():
        raise UsageError(f"dst {dst} is the source file: write the conversion to another path")
    if lora.is_lora(src):
        for flag, given in (
            ("--dtype", args.dtype),
            ("--extract", args.extract),
            ("--no-digests", args.no_digests),
        ):
            if given:
                raise UsageError(
                    f"{flag} applies to model checkpoints; {src} is a LoRA file (converted as it is: "
                    "--model PRESET --to FORMAT)"
                )
        if args.model is None or args.to not in lora.FORMATS:
            raise UsageError(
                f"{src} is a LoRA file: pass --model PRESET and --to one of {', '.join(lora.FORMATS)}"
            )
        try:
            cfg = configs.resolve(args.model)
        except KeyError as e:
            raise UsageError(f"--model {args.model}: {e.args[0]}") from None
        if cfg.family not in configs.FAMILIES:
            raise UsageError(
                f"--model {args.model} is {configs.describe(cfg.family)}; a LoRA is for a transformer preset"
            )
        read = lora.convert_file(src, dst, args.to, cfg)
        print(f"wrote {dst}: {len(read.pieces)} adapted modules, {read.format} -> {args.to}")
        return 0
    if args.model is not None:
        raise UsageError(
            f"--model is for LoRA files; {src} is a model checkpoint (its model is read from its keys)"
        )
    if args.to == "kohya":
        raise UsageError(f"--to kohya is a LoRA form; {src} is a model checkpoint")
    s = convert(
        src,
        dst,
        to=args.to,
        dtype=args.dtype,
        progress=not args.no_progress,
        extract=args.extract,
        digests=not args.no_digests,
    )
    print(
        f"wrote {s['dst']}: {s['tensors']} tensors, {s['bytes'] / 1e9:.2f} GB, {s['from']} -> {s['to']}, "
        f"{s['seconds']:.1f} s ({s['bytes'] / 1e9 / max(s['seconds'], 1e-9):.2f} GB/s)"
    )
    return 0
