"""Every file minflux writes goes through here: atomic, checked, one clear line on failure.

A write goes to a temp file beside the destination (`.NAME.tmp-PID`), is flushed and fsynced, then
renamed over the destination, and the folder is fsynced: a reader sees the old file or the new one,
never a partial one, whatever happens (no space, Ctrl-C, SIGTERM, a crash). A temp file left by a
killed process is removed by the next write to the same destination. Destinations that are not regular
files (a directory, a device such as /dev/full, anything under /proc) are refused before any work.

OS failures (ENOSPC, EROFS, EACCES, ENAMETOOLONG, ...) become one `OutputError` naming the path; the
old destination stays intact. `OutputError` is a `CheckpointError`, the project's one error, so every
command answers it with one line and exit status 2.

Before long work, `check_output` (a file) and `check_folder` (a folder of outputs, which may not exist yet)
find an unwritable destination, and too little free space for a size estimate, in the first second rather
than after an hour. Temporary folders (`temp_folder`) carry their process id, so the next run removes the
ones a killed run left behind (SIGKILL cannot be cleaned up after by the process itself).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from minflux.errors import CheckpointError

__all__ = [
    "OutputError",
    "atomic_write",
    "check_folder",
    "check_output",
    "free_bytes",
    "make_folders",
    "remove_stale_temp_files",
    "remove_stale_temp_folders",
    "temp_folder",
    "temp_name",
    "write_bytes",
    "write_figure",
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


def _kind(path: Path) -> str:
    """ "file", "folder", "other" (a device, a socket, ...) or "missing"; never raises (a name too long for
    the file system, or a folder we may not enter, reads as missing: the callers check names and access)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return "missing"
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def _nearest_folder(path: Path) -> Path:
    """The nearest existing ancestor of `path` (itself when it exists): where its folders would be made."""
    path = Path(os.path.abspath(path))
    while _kind(path) == "missing" and path != path.parent:
        path = path.parent
    return path


def _special(path: Path) -> bool:
    resolved = str(Path(path).resolve())
    return resolved.startswith(("/proc/", "/sys/")) or resolved in ("/proc", "/sys")


def free_bytes(path) -> int | None:
    """Bytes free to an unprivileged writer on the file system that holds `path` (or would: its nearest
    existing folder); None when the system does not say."""
    try:
        return shutil.disk_usage(_nearest_folder(Path(path))).free
    except OSError:
        return None


def _check_names(path: Path, folder: Path, names, extra: int = 0) -> None:
    """Each of `names` (to be made in or under `folder`), `extra` bytes longer, fits the file system."""
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for name in names:
        if len(name.encode()) + extra > name_max:
            raise OutputError(
                f"{path}: cannot write: the name is too long ({len(name.encode())} bytes; "
                f"this file system allows {name_max - extra})"
            )


def _check_writable_folder(path: Path, folder: Path, size: int | None) -> None:
    """`folder` exists: it must be a folder we may write in, on a writable file system with `size` bytes free."""
    try:
        st = os.statvfs(folder)
    except OSError:
        st = None
    if st is not None and st.f_flag & os.ST_RDONLY:
        raise OutputError(f"{path}: cannot write: the file system is read-only")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write: the folder {folder} is not writable")
    free = None if st is None else st.f_bavail * st.f_frsize
    if size is not None and free is not None and free < size:
        raise OutputError(
            f"{path}: cannot write: about {_size(size)} needed, {_size(free)} free on its file system"
        )


def check_output(path, size: int | None = None, make_parents: bool = False) -> Path:
    """Check, before any long work, that file `path` can be written: not a folder, device or /proc entry; its
    folder exists (with `make_parents`: can be made, from its nearest existing ancestor) and is writable, on a
    writable file system; the name fits the file system; `size` bytes (an estimate) fit in the free space.

    Returns the path. Raises `OutputError` naming the path and the cause.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if _special(path):
        raise OutputError(f"{path}: cannot write here: /proc and /sys are not for files")
    folder = _nearest_folder(parent)
    # first the names (a name too long makes every other question fail): the folders still to make, then
    # the temp file, the longest name written (`.NAME.tmp-PID`)
    _check_names(path, folder, Path(os.path.abspath(parent)).relative_to(folder).parts)
    _check_names(path, folder, [path.name], len(temp_name(path).name) - len(path.name))
    kind = _kind(path)
    if kind == "folder":
        raise OutputError(f"{path}: is a directory; name the file to write")
    if kind == "other":
        raise OutputError(
            f"{path}: cannot write here: it is not a regular file (a device or a special file)"
        )
    if _kind(parent) != "folder" and not make_parents:
        raise OutputError(
            f"{path}: no such directory {parent}"
            if _kind(parent) == "missing"
            else f"{path}: {parent} is not a directory"
        )
    if _kind(folder) != "folder":
        raise OutputError(f"{path}: {folder} is not a directory")
    _check_writable_folder(path, folder, size)
    return path


def check_folder(path, size: int | None = None) -> Path:
    """`check_output` for a folder of outputs (`train --out`, `cache OUT`): not a file or /proc; it, or the
    nearest ancestor it would be made in, is a writable folder on a writable file system with `size` bytes
    (an estimate) free; every name to be made fits the file system. Returns the path; raises `OutputError`."""
    path = Path(path)
    if _special(path):
        raise OutputError(f"{path}: cannot write here: /proc and /sys are not for files")
    folder = _nearest_folder(path)
    _check_names(path, folder, Path(os.path.abspath(path)).relative_to(folder).parts)
    if _kind(folder) != "folder":
        raise OutputError(
            f"{path}: not a directory"
            if folder == Path(os.path.abspath(path))
            else f"{path}: {folder} is not a directory"
        )
    _check_writable_folder(path, folder, size)
    return path


def make_folders(path) -> Path:
    """`path` and its missing parents made (an existing folder is fine); OS errors -> `OutputError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{path}: cannot make the folder: a file is in the way") from None
    except OSError as e:
        raise output_error(path, e, "cannot make the folder") from None
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
    if _kind(path) in ("folder", "other"):
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


def write_figure(fig, path, **savefig) -> None:
    """A matplotlib figure to `path`, atomically: rendered to memory first (format from the suffix), then
    `write_bytes`, so a full disk or a read-only folder never leaves a 0-byte picture. `savefig`: dpi=..."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".").lower() or "png", **savefig)
    write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Temporary folders, removed by the next run when a killed one leaves them
# ---------------------------------------------------------------------------------------------


def _folder_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"{re.escape(prefix)}(\d+)-\w+")


def remove_stale_temp_folders(prefix: str, where=None) -> list[Path]:
    """Remove `PREFIXPID-XXXX` folders in `where` (default: the system's temp folder) whose process is gone.

    A run killed with SIGKILL (or the OOM killer) cannot remove its own `temp_folder`; the next one does.
    Folders of live processes, and names without a process id, are left alone.
    """
    where = Path(where or tempfile.gettempdir())
    pattern, removed = _folder_pattern(prefix), []
    with contextlib.suppress(OSError):
        for entry in os.scandir(where):
            m = pattern.fullmatch(entry.name)
            if m and not _alive(int(m.group(1))) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def temp_folder(prefix: str, where=None) -> Iterator[Path]:
    """A fresh folder `PREFIXPID-XXXX` in `where` (default: the system's temp folder), removed on exit,
    on Ctrl-C and on SIGTERM; one a killed process left is removed by the next call with the same prefix.
    Raises `OutputError` when it cannot be made (a full or read-only temp file system)."""
    remove_stale_temp_folders(prefix, where)
    where = Path(where or tempfile.gettempdir())
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=where))
    except OSError as e:
        raise output_error(where, e, "cannot make a temporary folder") from None
    try:
        with _cleanup_on_sigterm():
            yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
