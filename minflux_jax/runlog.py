"""What a training run reports: TensorBoard event files and one JSON line per step (`RunLog`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import jax
import numpy as np

from minflux.files import check_output, output_error, write_text


class RunLog:
    """What a run reports, in `directory`: TensorBoard event files (`tensorboard/`, written by tensorboardX, which
    needs no network) and `metrics.jsonl`, one JSON object per step ({"step": ..., "loss": ..., ...}).

    A resumed run (`start` > 0) first drops the lines of steps after `start` (the file is rewritten atomically
    through `minflux.files`) and tells TensorBoard to purge its events after `start`, so both show one
    trajectory; then lines are appended and flushed as steps finish. Only process 0 writes. A write the file
    system refuses (a disk that filled during the run) raises `minflux.files.OutputError` naming the file.
    """

    JSONL = "metrics.jsonl"
    EVENTS = "tensorboard"

    def __init__(self, directory, start: int = 0):
        self.directory = Path(directory)
        self.active = jax.process_index() == 0
        self.tb, self.lines = None, None
        if not self.active:
            return
        from tensorboardX import SummaryWriter

        self.directory.mkdir(parents=True, exist_ok=True)
        path = check_output(self.directory / self.JSONL)
        if path.is_file():
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _step_of(line) is not None and _step_of(line) <= start
            ]
            write_text(path, "".join(line + "\n" for line in kept))
        self.lines = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        # the resumed run's first step is start + 1: TensorBoard drops the older events from there on
        self.tb = SummaryWriter(
            str(self.directory / self.EVENTS), purge_step=start + 1 if start else None
        )

    def write(self, step: int, measures: dict[str, float]) -> None:
        if not self.active:
            return
        for k, v in measures.items():
            self.tb.add_scalar(f"train/{k}", v, step)
        try:
            self.lines.write(json.dumps({"step": step, **measures}) + "\n")
            self.lines.flush()
        except OSError as e:
            self.abandon()
            raise output_error(self.directory / self.JSONL, e) from None

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 picture (the validation grid) into the event files."""
        if self.active:
            self.tb.add_image(tag, image, step, dataformats="HWC")
            try:
                self.tb.flush()
            except OSError as e:
                self.abandon()
                raise output_error(self.directory / self.EVENTS, e) from None

    def close(self) -> None:
        """Flush and close both; OutputError naming the folder when the file system refuses."""
        if self.active:
            try:
                self.lines.close()
                self.tb.close()
            except OSError as e:
                self.abandon()
                raise output_error(self.directory, e) from None

    def abandon(self) -> None:
        """Close both without a word, whatever fails (a run stopping on an earlier error: that one is reported)."""
        if self.active:
            for close in (self.lines.close, self.tb.close):
                with contextlib.suppress(Exception):
                    close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
