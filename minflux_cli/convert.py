"""`minflux convert SRC DST`: re-lay a checkpoint between the BFL and diffusers layouts (`minflux.convert`)."""

from __future__ import annotations

import argparse
import sys

from minflux import checkpoint
from minflux.checkpoint import CheckpointError
from minflux.convert import DTYPES, convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a .safetensors file or a directory of shards (BFL, prefixed BFL or diffusers)")
    parser.add_argument("dst", help="the output .safetensors file (written atomically)")
    parser.add_argument("--to", choices=checkpoint.LAYOUTS,
                        help="target layout (default: diffusers for a BFL source, bfl for a diffusers one)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="cast floating-point tensors (default: keep)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        s = convert(args.src, args.dst, to=args.to, dtype=args.dtype, progress=not args.no_progress)
    except CheckpointError as e:
        print("minflux convert: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line
        return 2
    print(f"wrote {s['dst']}: {s['tensors']} tensors, {s['bytes'] / 1e9:.2f} GB, {s['from']} -> {s['to']}, "
          f"{s['seconds']:.1f} s ({s['bytes'] / 1e9 / max(s['seconds'], 1e-9):.2f} GB/s)")
    return 0
