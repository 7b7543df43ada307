"""Input files other than checkpoints, checked where they enter: caption text files (images: `minflux.images`).

Every failure is one `InputError` naming the file and the cause. It is a `CheckpointError` (the project's
one error: every command answers it with one line and exit status 2) and a `ValueError` (what callers of
`minflux.images.load` caught before it existed).
"""

from __future__ import annotations

import codecs
from pathlib import Path

from minflux.errors import CheckpointError

MAX_CAPTION_BYTES = 1 << 20  # a caption is a sentence or a paragraph; a megabyte is a wrong file

# Byte-order marks, longest first: UTF-32's little-endian mark starts with UTF-16's.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class InputError(CheckpointError, ValueError):
    """An input file (image, caption) that cannot be used; the message names it and says why."""


def read_caption(path, max_bytes: int = MAX_CAPTION_BYTES) -> str:
    """The text of a caption file, stripped of surrounding white space (as `Path.read_text().strip()`).

    UTF-8 with or without a byte-order mark (Windows Notepad writes one), and UTF-16 / UTF-32 with one (what
    Windows calls "Unicode"), are read; anything else raises `InputError` naming the file and the first byte
    that is not UTF-8. Also raised for a missing or unreadable file, one over `max_bytes`, and NUL characters
    (a binary file).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InputError(
                f"{path}: {size:,} bytes is no caption (over {max_bytes:,} bytes); a wrong file?"
            )
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read the caption: {e.strerror or e}") from None
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path}: not {'UTF-8' if encoding == 'utf-8' else encoding.upper()} text (byte "
            f"0x{data[e.start]:02x} at offset {e.start}); save the caption as UTF-8"
        ) from None
    text = text.lstrip("\ufeff")  # (utf-16 / utf-32 keep no mark; utf-8-sig removed its own)
    if "\x00" in text:
        raise InputError(f"{path}: holds NUL characters: a binary file, not a caption")
    return text.strip()
