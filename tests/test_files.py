"""`minflux.files`, the one writer: outputs checked before work, written whole or not at all, temp folders of
killed runs removed. The command-level rows (full and read-only file systems) are in test_cli_errors.py."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from minflux import files
from minflux.errors import CheckpointError


def test_output_errors_are_checkpoint_errors():
    assert issubclass(files.OutputError, CheckpointError)  # one line and exit 2 in every command


@pytest.mark.parametrize(
    "path,cause",
    [
        ("/dev/full", "not a regular file"),
        ("/proc/self/o.png", "/proc and /sys are not for files"),
        ("{tmp}", "is a directory"),
        ("{tmp}/nodir/o.png", "no such directory"),
        ("{tmp}/" + "a" * 300 + ".png", "the name is too long (304 bytes"),
        # the temp name `.NAME.tmp-PID` is what must fit: a name 2 bytes under the limit does not
        ("{tmp}/" + "b" * 253, "the name is too long (253 bytes; this file system allows"),
        ("{tmp}/" + "c" * 300 + "/o.png", "the name is too long (300 bytes"),
    ],
)
def test_check_output_refuses(path, cause, tmp_path):
    with pytest.raises(files.OutputError, match=cause.replace("(", r"\(")):
        files.check_output(path.format(tmp=tmp_path))


def test_check_output_space_and_parents(tmp_path):
    free = files.free_bytes(tmp_path)
    assert free == os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize  # as df counts it
    files.check_output(tmp_path / "o.bin", size=1000)
    with pytest.raises(files.OutputError, match=r"needed, .* free on its file system"):
        files.check_output(tmp_path / "o.bin", size=free * 2)
    files.check_output(
        tmp_path / "a" / "b" / "o.png", make_parents=True
    )  # folders made when written
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(files.OutputError, match="is not a directory"):
        files.check_output(tmp_path / "file" / "o.png", make_parents=True)


def test_check_folder(tmp_path):
    assert files.check_folder(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(files.OutputError, match="not a directory"):
        files.check_folder(tmp_path / "f")
    with pytest.raises(files.OutputError, match="/proc and /sys"):
        files.check_folder("/proc/x")


@pytest.mark.parametrize(
    "code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENAMETOOLONG, errno.EDQUOT]
)
def test_os_errors_at_any_moment_leave_the_old_file(code, tmp_path, monkeypatch):
    """The error strikes during the write, at the fsync or at the rename: the old file stays, the temp file
    goes, and the error is one line naming the path and the cause."""
    dst = tmp_path / "o.json"
    dst.write_text("old")
    for stage in ("write", "fsync", "replace"):

        def fail(*args, **kwargs):
            raise OSError(code, os.strerror(code))

        with monkeypatch.context() as m:
            if stage == "write":
                m.setattr(files, "open", lambda *a, **k: _Failing(code), raising=False)
            else:
                m.setattr(files.os, stage, fail)
            with pytest.raises(files.OutputError) as e:
                files.write_text(dst, "new")
        assert str(e.value).startswith(f"{dst}: cannot write: ") and "\n" not in str(e.value)
        assert files._CAUSES[code] in str(e.value)
        assert dst.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["o.json"]


class _Failing:
    """A file whose writes fail with an OS error."""

    def __init__(self, code):
        self.code = code

    def write(self, data):
        raise OSError(self.code, os.strerror(self.code))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_write_figure_is_atomic(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    files.write_figure(fig, tmp_path / "p.png", dpi=50)
    plt.close(fig)
    assert Image.open(tmp_path / "p.png").size == (100, 50)  # the figure PIL reads back
    assert os.listdir(tmp_path) == ["p.png"]


def test_temp_folders_of_dead_processes_are_removed(tmp_path):
    """`temp_folder` names its folder after its process; a later call removes the folders of processes that are
    gone (SIGKILL) and leaves a live process's alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"minflux-x-{dead.pid}-abcd1234"
    live = tmp_path / f"minflux-x-{os.getppid()}-abcd1234"  # (our parent: alive)
    for folder in (stale, live):
        folder.mkdir()
        (folder / "f.safetensors").write_bytes(b"x" * 100)
    with files.temp_folder("minflux-x-", tmp_path) as tmp:
        assert tmp.name.startswith(f"minflux-x-{os.getpid()}-") and tmp.is_dir()
        assert not stale.exists() and live.exists()
    assert not tmp.exists()


def test_image_save_is_atomic(tmp_path, monkeypatch):
    """`minflux.images.save` (every PNG a command writes) goes through the writer: a full disk mid-write leaves
    the old picture whole (it used to become a truncated 4 KB file)."""
    from minflux import images

    old = np.zeros((8, 8, 3), np.uint8)
    images.save(old, tmp_path / "o.png")
    before = (tmp_path / "o.png").read_bytes()
    monkeypatch.setattr(files, "open", lambda *a, **k: _Failing(errno.ENOSPC), raising=False)
    with pytest.raises(files.OutputError, match="no space left on the device"):
        images.save(np.full((8, 8, 3), 255, np.uint8), tmp_path / "o.png")
    assert (tmp_path / "o.png").read_bytes() == before and os.listdir(tmp_path) == ["o.png"]
