"""The `minflux` command: parity | convert | generate | train | cache | bench.

One error contract for every command: a user error (a wrong file, preset, number or combination of flags)
prints one line naming the argument or file and exits 2; a parity row over its bound exits 1; Ctrl-C and
SIGTERM print one line and exit 130 / 143, after temporary files are removed (writes clean up in `finally`).
torch and jax are imported only by the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from minflux.checkpoint import CheckpointError
from minflux_cli.args import UsageError

COMMANDS = {
    "parity": "block-by-block agreement of the PyTorch and JAX models (default: tiny checkpoints)",
    "convert": "convert a checkpoint between the BFL and diffusers layouts",
    "generate": "sample images with either framework",
    "train": "train FLUX through JAX",
    "cache": "encode images + captions into the latent shards `train --data` reads",
    "bench": "time PyTorch and JAX side by side: inference, sampling, training, LoRA, fp8",
}


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so `finally` blocks (temp files) run as for Ctrl-C."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `minflux CMD: error: ...` and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> Parser:
    p = Parser(
        prog="minflux",
        description=__doc__.splitlines()[0],
        epilog="no command: `minflux parity` (tiny checkpoints of every family, both frameworks)",
    )
    sub = p.add_subparsers(
        dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=Parser
    )
    for name, help_ in COMMANDS.items():
        importlib.import_module(f"minflux_cli.{name}").add_arguments(
            sub.add_parser(name, help=help_, description=help_)
        )
    return p


STOPPED = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}


def _stop(signum, frame):
    """Ctrl-C / SIGTERM: raise where the program is, so `finally` blocks clean up. An exception raised inside a
    callback of a native library (an XLA GC or host callback) is swallowed there, so a watchdog ends the process
    anyway a few seconds later, with the same line and status."""
    code, word = STOPPED[signum]
    command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else "parity"

    def end():
        print(f"minflux {command}: {word}", file=sys.stderr, flush=True)
        os._exit(code)

    threading.Timer(
        5.0, end
    ).start()  # (a daemon-less timer: it outlives a swallowed exception, not the exit)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser().parse_args(argv or ["parity"])  # no arguments: the default parity run
    except (
        SystemExit
    ) as e:  # --help (0) or a usage error (2, one line already printed): a return value
        return e.code
    previous = {sig: signal.signal(sig, _stop) for sig in STOPPED}
    prefix = f"minflux {args.command}"
    try:
        return importlib.import_module(f"minflux_cli.{args.command}").run(args)
    except (UsageError, CheckpointError) as e:
        print(f"{prefix}: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prefix}: terminated", file=sys.stderr)
        return 143
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cli() -> None:
    """The console script: `main`, then the exit. After Ctrl-C or SIGTERM the process ends at once (`os._exit`,
    temporary files already removed by `finally`): JAX's and XLA's threads, stopped mid-work, can crash the normal
    interpreter teardown (a segfault, status 139, instead of 130 / 143)."""
    code = main()
    if code in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
