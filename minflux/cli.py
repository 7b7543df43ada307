"""The `minflux` command: parity | convert | generate | train.

Each subcommand lives in its own module with `add_arguments(parser)` and
`run(args) -> int`; torch and jax are imported only by the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "parity": ("parity.cli", "block-by-block agreement of the PyTorch and JAX models (default: tiny checkpoints)"),
    "convert": ("minflux.convert", "convert a checkpoint between the BFL and diffusers layouts"),
    "generate": ("minflux.generate", "sample images with either framework"),
    "train": ("minflux.train", "train FLUX through JAX"),
    "cache": ("minflux.cache", "encode images + captions into the latent shards `train --data` reads"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="minflux", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    modules = {}
    for name, (module, help_) in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a real missing dependency, not a command not built yet
                raise
            continue
        modules[name].add_arguments(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv or ["parity"])  # no arguments: the default parity run
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
