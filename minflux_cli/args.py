"""Argument types that validate where they are parsed: a bad value is one line naming the flag, exit 2."""

from __future__ import annotations

import argparse
from pathlib import Path

from minflux import configs


class UsageError(Exception):
    """A user error in a command's inputs (missing or wrong file, conflicting flags); the message names them."""


def typed_flags(parser: argparse.ArgumentParser, argv: list[str]) -> frozenset[str]:
    """The dests argv sets itself, whatever their values: `--framework torch` is given even where torch is the
    default. `parser` is changed (its defaults, and its subcommands', are suppressed): parse with it first."""

    def suppress(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    suppress(sub)
            elif action.dest != "help":
                action.default = argparse.SUPPRESS

    suppress(parser)
    return frozenset(vars(parser.parse_known_args(argv)[0]))


# numpy's float32 max, without importing numpy here (`--help` imports nothing heavy)
FLOAT32_MAX = 3.4028234663852886e38


def _number(kind, low=None, multiple=None, high=None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        # the models compute in float32 (or narrower): 1e39 would be inf there, and the picture NaN
        if kind is float and abs(value) > FLOAT32_MAX:
            raise argparse.ArgumentTypeError(
                f"expected a finite number, got {text!r} (beyond float32's {FLOAT32_MAX:.4g})"
            )
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        if multiple and value % multiple:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple}, got {text}")
        return value

    return parse


positive_int = _number(int, low=1)
positive_float = _number(
    float, low=1e-30
)  # peaks, rates: > 0  # steps, batch size, accumulation, LoRA rank, ...
nonneg_int = _number(int, low=0)  # seeds, save intervals
pixels = _number(
    int, low=16, multiple=16
)  # image sides: positive multiples of 16 (0 is an error, not a default)
finite = _number(float)
nonneg_float = _number(float, low=0.0)
fraction = _number(float, low=0.0, high=1.0)  # strength, dropout, EMA decay


def preset(text: str) -> str:
    """A preset name of `minflux.configs`."""
    if text not in configs.PRESETS:
        raise argparse.ArgumentTypeError(
            f"unknown preset {text!r}; presets: {', '.join(configs.names())}"
        )
    return text


def existing(text: str) -> Path:
    """A path that exists (file or directory)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return path


def directory(text: str) -> Path:
    """An existing directory."""
    path = existing(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return path


def lora_spec(text: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` of a LoRA file that exists (`minflux.lora.parse_spec`; scale 1 when absent, finite)."""
    from minflux import lora

    head, _, tail = text.rpartition(":")
    if (
        head and Path(head).exists() and not Path(text).exists()
    ):  # FILE:SCALE with a scale that is no number
        finite(tail)
    path, scale = lora.parse_spec(text)
    if scale != scale or abs(scale) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"{text}: the scale must be a finite number (float32)")
    return existing(path), scale


def out_file(text: str, suffixes: tuple[str, ...] = (), make_parents: bool = False) -> Path:
    """A file to write (`minflux.files.check_output`): not a directory, device or /proc entry; in a directory
    that exists (or, with `make_parents`, can be made: its nearest existing ancestor is a directory) and can be
    written, on a writable file system; a name the file system takes; with one of `suffixes` if given."""
    from minflux import files

    path = Path(text)
    try:
        files.check_output(path, make_parents=make_parents)
    except files.OutputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if suffixes and path.suffix.lower() not in suffixes:
        raise argparse.ArgumentTypeError(f"{text}: expected a {' / '.join(suffixes)} file")
    return path


def out_image(text: str) -> Path:
    """An image file to write, in a format PIL writes (from the suffix)."""
    from PIL import Image

    path = out_file(text, make_parents=True)  # (its folders are made when the image is saved)
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        raise argparse.ArgumentTypeError(
            f"{text}: not an image file name PIL writes (.png, .jpg, .webp, ...)"
        )
    return path


json_file = lambda text: out_file(text, (".json",))  # noqa: E731
png_file = lambda text: out_file(text, (".png",))  # noqa: E731


def out_dir(text: str) -> Path:
    """A directory to write into (`minflux.files.check_folder`): it may not exist yet (its nearest existing
    ancestor is then a directory), but must not be a file or under /proc, and must be writable, on a writable
    file system, with names the file system takes."""
    from minflux import files

    try:
        return files.check_folder(Path(text))
    except files.OutputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
