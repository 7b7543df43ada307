"""Every file minflux writes goes through here: atomic, checked, one clear line on failure.

A write goes to a temp file beside the destination (`.NAME.tmp-PID`), is flushed and fsynced, then
renamed over the destination, and the folder is fsynced: a reader sees the old file or the new one,
never a partial one, whatever happens (no space, Ctrl-C, SIGTERM, a crash). A temp file left by a
killed process is removed by the next write to the same destination. Destinations that are not regular
files (a directory, a device such as /dev/full, anything under /proc) are refused before any work.

OS failures (ENOSPC, EROFS, EACCES, ENAMETOOLONG, ...) become one `OutputError` naming the path; the
old destination stays intact. `OutputError` is a `CheckpointError`, the project's one error, so every
command answers it with one line and exit status 2.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from minflux.errors import CheckpointError

__all__ = [
    "OutputError",
    "atomic_write",
    "check_output",
    "remove_stale_temp_files",
    "temp_name",
    "write_bytes",
    "write_text",
]


class OutputError(CheckpointError):
    """An output could not be written (or would not be): the message names the path and the cause."""


_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.ENOENT: "the folder does not exist",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "it is a folder",
}


def describe_os_error(e: OSError) -> str:
    """A short cause for an OS error, without the path (the caller names it once)."""
    return _CAUSES.get(e.errno, e.strerror or str(e))


def output_error(path, e: OSError, doing: str = "cannot write") -> OutputError:
    """The one-line error for an OS error `e` met while writing `path`."""
    return OutputError(f"{path}: {doing}: {describe_os_error(e)}")


def temp_name(path: Path, pid: int | None = None) -> Path:
    """The temp file a write to `path` goes through: `.NAME.tmp-PID`, beside it, named by its process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover: this process is not writing it now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 1 << 22  # another user's live process (or an impossible id)
    return True


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Remove temp files of earlier writes to `path` whose process is gone (SIGKILL, power loss).

    Both `.NAME.tmp-PID` and the older `.NAME.tmpPID` are recognised; a live process's file is left alone.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-?(\d+)")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            m = pattern.fullmatch(entry.name)
            if m and not _alive(int(m.group(1))) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def check_output(path, size: int | None = None) -> Path:
    """Check, before any long work, that `path` can be written: not a folder, device or /proc entry; its
    folder exists and is writable; the name fits the file system; `size` bytes (an estimate) fit.

    Returns the path. Raises `OutputError` naming the path and the cause.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device or a special file)"
        raise OutputError(f"{path}: cannot write here: it is {kind}")
    if str(path.resolve()).startswith("/proc/") or str(path.resolve()).startswith("/sys/"):
        raise OutputError(f"{path}: cannot write here: /proc and /sys are not for files")
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot write: the folder {parent} does not exist")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(temp_name(path).name.encode()) > name_max:
        raise OutputError(
            f"{path}: cannot write: the file name is too long ({len(path.name.encode())} bytes; "
            f"this file system allows {name_max - len(temp_name(path).name) + len(path.name)})"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write: the folder {parent} is not writable")
    try:
        st = os.statvfs(parent)
    except OSError:
        return path
    if st.f_flag & os.ST_RDONLY:
        raise OutputError(f"{path}: cannot write: the file system is read-only")
    if size is not None and st.f_bavail * st.f_frsize < size:
        free = st.f_bavail * st.f_frsize
        raise OutputError(
            f"{path}: cannot write: about {_size(size)} needed, {_size(free)} free on its file system"
        )
    return path


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


class _Terminated(BaseException):
    """SIGTERM arrived during a write (raised by the handler `_cleanup_on_sigterm` installs)."""


@contextlib.contextmanager
def _cleanup_on_sigterm():
    """Turn SIGTERM into an exception while writing, so `finally` removes the temp file; then die of it.

    Only when SIGTERM has its default action (death without cleanup) and we run in the main thread; a
    program with its own SIGTERM handler (the CLI's exits 143) keeps it, and the exception it raises
    cleans up the same.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    ):
        yield
        return

    def handler(signum, frame):
        raise _Terminated

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated:
        # the death the default action would have given, after cleanup
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temp file beside `path` for writing; on a clean exit fsync it and rename it over `path`.

    `mode` is "wb" or "w" (text, `encoding` default UTF-8). On any exception (including Ctrl-C and
    SIGTERM) the temp file is removed and `path` is untouched. OS errors become `OutputError` naming
    `path`. Raises `OutputError` at once for a destination that is not a regular file.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode={mode!r}: expected 'wb' or 'w'")
    path = Path(path)
    if path.exists() and not path.is_file():
        check_output(path)  # raises: a folder, a device, a special file
    remove_stale_temp_files(path)
    tmp = temp_name(path)
    try:
        with _cleanup_on_sigterm():
            try:
                text = mode == "w"
                with open(tmp, mode, encoding=(encoding or "utf-8") if text else None) as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                _fsync_folder(path.parent)
            finally:
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    tmp.unlink()
    except OSError as e:  # no space, read-only, permissions, name too long: one clear line
        raise output_error(path, e) from None


def write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically (see `atomic_write`)."""
    with atomic_write(path, "w") as f:
        f.write(text)
