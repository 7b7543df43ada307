"""The `minflux` command: parity | convert | generate | train | cache | bench.

One error contract for every command: a user error (a wrong file, preset, number or combination of flags)
prints one line naming the argument or file and exits 2; a parity row over its bound exits 1; Ctrl-C and
SIGTERM print one line and exit 130 / 143, after temporary files are removed (writes clean up in `finally`).

The first moments count too: the signal handlers are installed before anything heavy is imported; only
the named command's module is imported to build the parser (and torch / jax only by the command that needs
them), so `--help` and argument errors answer at once; messages from libraries (absl / orbax log lines,
Python warnings, "Exception ignored in ..." from native callbacks) stay off stderr unless `--verbose`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import warnings

from minflux.errors import CheckpointError
from minflux_cli.args import UsageError, typed_flags

COMMANDS = {
    "parity": "block-by-block agreement of the PyTorch and JAX models (default: tiny checkpoints)",
    "convert": "convert a checkpoint between the BFL and diffusers layouts",
    "generate": "sample images with either framework",
    "train": "train FLUX through JAX",
    "cache": "encode images + captions into the latent shards `train --data` reads",
    "bench": "time PyTorch and JAX side by side: inference, sampling, training, LoRA, fp8",
}
# Our own packages: their warnings and log records are the user's business; other libraries' are not.
OURS = ("minflux", "minflux_torch", "minflux_jax", "minflux_cli", "parity")


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so `finally` blocks (temp files) run as for Ctrl-C."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `minflux CMD: error: ...` and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """`--version`: the installed distribution's version (looked up only when asked: importlib.metadata)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"minflux {version()}")
        parser.exit(0)


def version() -> str:
    """minflux's version: the installed distribution's, else the source tree's pyproject.toml."""
    from importlib import metadata

    try:
        return metadata.version("minflux")
    except metadata.PackageNotFoundError:
        import re
        from pathlib import Path

        text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
        return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def parser(only: str | None = None) -> Parser:
    """The command line. `only`: build that command's arguments alone (importing its module alone); None:
    every command's. The top-level `--help` needs none of them."""
    p = Parser(
        prog="minflux",
        description=__doc__.splitlines()[0],
        epilog="no command: `minflux parity` (tiny checkpoints of every family, both frameworks)",
    )
    p.add_argument("--version", action=_Version, help="print minflux's version and exit")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = p.add_subparsers(
        dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=Parser
    )
    for name, help_ in COMMANDS.items():
        if only not in (None, name):
            sub.add_parser(name, help=help_, description=help_)
            continue
        sp = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(f"minflux_cli.{name}").add_arguments(sp)
        sp.add_argument(
            "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
    p.commands = sub.choices  # each command's parser: it names the flags it does not know
    return p


VERBOSE_HELP = "show libraries' warnings and log messages (absl, orbax, JAX, PyTorch) on stderr too"


def _command_in(argv: list[str]) -> str | None:
    """The command argv names (its first word that is one), or None: `--help`, `--version`, a typo."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


# ---------------------------------------------------------------------------------------------
# Signals: one line and 130 / 143, at every moment
# ---------------------------------------------------------------------------------------------

STOPPED = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}
_running = {"command": None}  # the command being run, for the watchdog's line


def _stop(signum, frame):
    """Ctrl-C / SIGTERM: raise where the program is, so `finally` blocks clean up. An exception raised inside a
    callback of a native library (an XLA GC or host callback) is swallowed there (see `_unraisable`), so a
    watchdog ends the process anyway a few seconds later, with the same line and status."""
    code, word = STOPPED[signum]
    prefix = f"minflux {_running['command']}" if _running["command"] else "minflux"

    def end():
        _clear_progress()
        print(f"{prefix}: {word}", file=sys.stderr, flush=True)
        os._exit(code)

    if _importing(frame):
        # Raised inside an import, the exception can surface in a native extension's initialisation (jaxlib
        # imports numpy), which prints its own traceback; nothing is being written while modules load, so
        # end here, at once.
        end()

    # (a daemon-less timer: it outlives a swallowed exception, not the exit)
    threading.Timer(5.0, end).start()
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


def _importing(frame) -> bool:
    """Whether `frame` runs inside an import (importlib's frames are on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _unraisable(verbose: bool, default):
    """sys.unraisablehook: an exception Python cannot raise (in a GC callback such as JAX's `_xla_gc_callback`,
    or a `__del__`) would print "Exception ignored in ..." with a traceback. Ctrl-C / SIGTERM landing there are
    delivered again a moment later, where they can be raised; other such exceptions are shown with --verbose
    only."""
    redelivered = set()

    def hook(unraisable):
        exc = unraisable.exc_type
        if exc is not None and issubclass(exc, KeyboardInterrupt | Terminated):
            sig = signal.SIGINT if issubclass(exc, KeyboardInterrupt) else signal.SIGTERM
            if sig not in redelivered:  # once: the watchdog ends a process that swallows it again
                redelivered.add(sig)
                timer = threading.Timer(0.05, os.kill, (os.getpid(), sig))
                timer.daemon = True
                timer.start()
            return
        if verbose:
            default(unraisable)

    return hook


# ---------------------------------------------------------------------------------------------
# Libraries' messages: off stderr unless --verbose
# ---------------------------------------------------------------------------------------------


class _OurRecords(logging.Filter):
    """Log records of our own loggers (`minflux...`) pass; with --verbose, every library's too."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.name.split(".")[0] in OURS


@contextlib.contextmanager
def _quiet_libraries(verbose: bool):
    """Within: Python warnings from other libraries ignored, log records of other loggers dropped (absl and
    orbax log through Python's logging: "Waiting for previous save to complete took 1.2 seconds"), unless
    `verbose`. Warnings and records of our own code still reach stderr. Restored on exit."""
    root = logging.getLogger()
    handler = logging.StreamHandler()  # (sys.stderr as it is now: in tests, pytest's capture)
    handler.setLevel(logging.WARNING)
    handler.addFilter(_OurRecords(verbose))
    root.addHandler(handler)  # (a root handler: Python's last-resort printer no longer applies)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.filterwarnings("ignore")
                warnings.filterwarnings("default", module=rf"({'|'.join(OURS)})(\.|$)")
            yield
    finally:
        root.removeHandler(handler)


def _clear_progress() -> None:
    """Before an error line: erase the progress bars still drawn (a terminal), or, in a log file, end the line
    a bar left open, so the error is a line of its own."""
    tqdm = sys.modules.get("tqdm")
    bars = list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or ())
    if not bars:
        return
    tty = sys.stderr.isatty()
    for bar in bars:
        with contextlib.suppress(Exception):
            if tty:
                bar.leave = False  # close() then erases it
                bar.close()
            else:
                bar.disable = True  # no more output
    if not tty:
        print(file=sys.stderr)


# What a command can change when the device runs out of memory after the estimates let it start.
OOM_LEVERS = {
    "generate": "; try --offload blocks, --keep-quantized with a quantized file, --dtype bf16 or a smaller size",
    "train": "; try a smaller --batch-size, --remat full or --lora-rank",
    "bench": "; try a smaller --resolution or --batch",
    "parity": "; try --dtype bf16 or a smaller --resolution",
    "cache": "; try a smaller --batch-size, --max-length or --size, or --dtype bf16",
}


# a NaN / Inf picture or loss (FloatingPointError): the numbers that make a run overflow
NONFINITE_LEVERS = {
    "generate": "; nothing written; check --guidance, --cfg and the --lora scales, or try --dtype fp32",
    "train": "; the last model is not written (--save-every keeps the earlier checkpoints); try a lower --lr "
    "or --precision fp32",
}


def out_of_memory(e: BaseException) -> bool:
    """Whether e is a framework's out-of-memory failure: Python's MemoryError, torch's OutOfMemoryError or CPU
    allocator error, XLA's RESOURCE_EXHAUSTED."""
    text = str(e)
    return (
        isinstance(e, MemoryError)
        or type(e).__name__ == "OutOfMemoryError"
        or "RESOURCE_EXHAUSTED" in text
        or "can't allocate memory" in text
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _command_in(argv)
    if command is None and all(a == "--verbose" for a in argv):
        argv, command = [*argv, "parity"], "parity"  # no command: the default parity run
    previous, previous_hook = {}, sys.unraisablehook
    _running["command"] = command
    prefix = f"minflux {command}" if command else "minflux"
    try:
        # first, before any heavy import, and inside the try: a signal at once is one line
        for sig in STOPPED:
            previous[sig] = signal.signal(sig, _stop)
        try:
            top = parser(only=command or "")
            args, extra = top.parse_known_args(argv)
            if extra:  # "minflux generate: error: unrecognized arguments: --x (see minflux generate --help)"
                top.commands.get(args.command, top).error(
                    f"unrecognized arguments: {' '.join(extra)}"
                )
            args.typed_flags = typed_flags(top, argv)  # (top is not used after this)
        except SystemExit as e:
            # --help (0) or a usage error (2, one line already printed): a return value
            return e.code
        verbose = getattr(args, "verbose", False)
        sys.unraisablehook = _unraisable(verbose, previous_hook)
        with _quiet_libraries(verbose):
            try:
                return importlib.import_module(f"minflux_cli.{args.command}").run(args)
            except (UsageError, CheckpointError) as e:
                _clear_progress()
                print(f"{prefix}: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line
                return 2
            except FloatingPointError as e:
                _clear_progress()
                print(f"{prefix}: error: {e}{NONFINITE_LEVERS.get(command, '')}", file=sys.stderr)
                return 1
            except Exception as e:
                if not out_of_memory(e):
                    raise
                _clear_progress()
                cause = " ".join(str(e).split())[:200] or type(e).__name__
                print(
                    f"{prefix}: error: out of memory ({cause}){OOM_LEVERS.get(command, '')}",
                    file=sys.stderr,
                )
                return 1
    except KeyboardInterrupt:
        _clear_progress()
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        _clear_progress()
        print(f"{prefix}: terminated", file=sys.stderr)
        return 143
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = previous_hook
        _running["command"] = None


def cli() -> None:
    """The console script: `main`, then the exit. After Ctrl-C or SIGTERM the process ends at once (`os._exit`,
    temporary files already removed by `finally`): JAX's and XLA's threads, stopped mid-work, can crash the normal
    interpreter teardown (a segfault, status 139, instead of 130 / 143). Without --verbose, XLA's C++ log lines
    below errors stay off stderr too (TF_CPP_MIN_LOG_LEVEL, unless set)."""
    if "--verbose" not in sys.argv:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from minflux import memory

    memory.use_xla_cpu_memory_scheduler()
    code = main()
    if code in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
