"""Argument types that validate where they are parsed: a bad value is one line naming the flag, exit 2."""

from __future__ import annotations

import argparse
from pathlib import Path

from minflux import configs


class UsageError(Exception):
    """A user error in a command's inputs (missing or wrong file, conflicting flags); the message names them."""


def _number(kind, low=None, multiple=None, high=None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        if multiple and value % multiple:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple}, got {text}")
        return value

    return parse


positive_int = _number(int, low=1)  # steps, batch size, accumulation, LoRA rank, ...
nonneg_int = _number(int, low=0)  # seeds, save intervals
pixels = _number(int, low=16, multiple=16)  # image sides: positive multiples of 16 (0 is an error, not a default)
finite = _number(float)
nonneg_float = _number(float, low=0.0)
fraction = _number(float, low=0.0, high=1.0)  # strength, dropout, EMA decay


def preset(text: str) -> str:
    """A preset name of `minflux.configs`."""
    if text not in configs.PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}; presets: {', '.join(configs.names())}")
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
    """`FILE[:SCALE]` of a LoRA file that exists (`minflux.lora.parse_spec`; scale 1 when absent)."""
    from minflux import lora

    path, scale = lora.parse_spec(text)
    return existing(path), scale
