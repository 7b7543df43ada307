"""The training run's checkpoint folder, as a resume reads it before orbax does.

Beside orbax's step directories (`minflux_jax.trainer.Trainer.save`), RUN_FILE records the options the train state
depends on (config, batch size, accumulation, LoRA, precision, EMA, mesh); a resume compares them with its own
before orbax reads anything (`check_resume`), and skips checkpoints it cannot read for older ones (`_lacking`,
`_move_aside`). JAX-only, like the trainer: no framework is imported here, only the folder's files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

from minflux.checkpoint import CheckpointError
from minflux.files import OutputError, describe_os_error

RUN_FILE = "run.json"  # beside orbax's step directories in ckpt_dir


def run_record(cfg, opts, mesh: tuple[int, int]) -> dict:
    """The options a resumed run must share with the saved one: the model config, the batch (the data
    position of a step is step x batch_size), accumulation, LoRA, precision, EMA (the state's tree and
    dtypes), and the resolved (data, fsdp) mesh. JSON-ready, as `check_resume` compares it."""
    return json.loads(
        json.dumps(
            {
                "config": {"class": type(cfg).__name__, **dataclasses.asdict(cfg)},
                "batch_size": opts.batch_size,
                "accumulate": opts.accumulate,
                "lora_rank": opts.lora_rank,
                "lora_alpha": opts.lora_alpha,
                "lora_targets": list(opts.lora_targets),
                "precision": opts.precision,
                "ema": opts.ema > 0,
                "mesh": list(mesh),
            }
        )
    )


def write_run(ckpt_dir, record: dict) -> None:
    """RUN_FILE in ckpt_dir, atomically (`minflux.files`: temp file, fsync, rename; OutputError on failure)."""
    from minflux import files

    path = Path(files.make_folders(ckpt_dir)) / RUN_FILE
    files.write_text(path, json.dumps(record, indent=1))


def saved_steps(ckpt_dir) -> list[int]:
    """Steps of the finalised checkpoints in ckpt_dir, newest first (orbax names a finished save by its
    step; one in flight lives in a temporary directory with another name)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted(
        (int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True
    )


def resume_differences(saved: dict, now: dict) -> list[str]:
    """One phrase per option in which this run (`now`) differs from the saved one: "batch_size 8 (saved: 4)"."""
    out = []
    a, b = saved.get("config", {}), now["config"]
    if a.get("class") != b["class"]:
        out.append(f"config {b['class']} (saved: {a.get('class')})")
    elif fields := [
        f"{k} {b.get(k)} (saved: {a.get(k)})"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]:
        out.append("config " + ", ".join(fields[:6]) + (" ..." if len(fields) > 6 else ""))
    adapters = (
        saved.get("lora_rank", 0) > 0 or now["lora_rank"] > 0
    )  # alpha and targets matter only then
    for key in (
        "batch_size",
        "accumulate",
        "lora_rank",
        "lora_alpha",
        "lora_targets",
        "precision",
        "ema",
        "mesh",
    ):
        if saved.get(key) != now[key] and (adapters or key not in ("lora_alpha", "lora_targets")):
            out.append(f"{key} {_show(key, now[key])} (saved: {_show(key, saved.get(key))})")
    return out


def _show(key: str, value) -> str:
    if key == "ema":
        return "on" if value else "off"
    return "x".join(map(str, value)) if key == "mesh" and value else str(value)


def check_resume(ckpt_dir, record: dict) -> None:
    """Raise CheckpointError (one line, naming the directory or RUN_FILE) when ckpt_dir holds no finalised
    checkpoint, or when its run's options differ from `record` (each difference named). Checkpoints
    written before RUN_FILE existed are left to orbax's own checks."""
    root = Path(ckpt_dir)
    if not saved_steps(root):
        why = "no such directory" if not root.exists() else "no finished save in it"
        raise CheckpointError(
            f"{root}: no checkpoint to resume from ({why}; runs save with save_every > 0)"
        )
    if not any(not _lacking(root, step) for step in saved_steps(root)):
        raise CheckpointError(
            f"{root}: no intact checkpoint to resume from: every one lacks state/ or meta/"
        )
    path = root / RUN_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable run record ({_first_line(e)})") from None
    if differences := resume_differences(saved, record):
        raise CheckpointError(
            f"{path}: this run differs from the saved one in " + "; ".join(differences)
        )


def _lacking(root: Path, step: int) -> list[str]:
    """The items (orbax subdirectories) checkpoint `step` lacks."""
    return [item for item in ("state", "meta") if not (root / str(step) / item).is_dir()]


def _move_aside(path: Path) -> None:
    """Rename a step directory out of orbax's sight (a name that is not a number): STEP.unreadable[N]."""
    target, n = path.with_name(f"{path.name}.unreadable"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.unreadable{n}"), n + 1
    path.rename(target)


def _listing(root: Path, failed: dict[int, str]) -> str:
    return "; ".join(f"{root / str(step)} ({why})" for step, why in failed.items())


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = text.split(" See full TensorStore details")[0]  # then a spec dump of the array
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# A save that fails midway: one line, the earlier checkpoints kept
# ---------------------------------------------------------------------------------------------

TEMP_SUFFIX = (
    ".orbax-checkpoint-tmp"  # orbax writes step N into N.orbax-checkpoint-tmp..., renamed when done
)


def os_error_of(e: BaseException) -> OSError | None:
    """The file-system error behind an exception orbax raised while writing: an OSError itself (or its cause), or
    tensorstore's message, which carries only the code ("... No space left on device [os_error_code='28']");
    None when the failure is not the file system's."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e
        if m := re.search(r"os_error_code='?(\d+)", str(e)):
            code = int(m[1])
            return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None


def save_error(ckpt_dir, step: int | None, e: BaseException) -> OutputError | None:
    """The one line for orbax failing to write checkpoint `step` into ckpt_dir because of the file system (no
    space, read-only, permissions: `minflux.files.describe_os_error`), naming the folder and what it keeps; None
    for other failures (left to propagate as they are)."""
    cause = os_error_of(e)
    if cause is None:
        return None
    root = Path(ckpt_dir)
    kept = saved_steps(root)
    which = "a checkpoint" if step is None else f"checkpoint {step}"
    return OutputError(
        f"{root}: cannot write {which}: {describe_os_error(cause)} ("
        + (f"kept: step {', '.join(map(str, kept))})" if kept else "no earlier checkpoint)")
    )


def remove_partial(ckpt_dir) -> None:
    """Remove the temporary directories of saves that did not finish (a failed write leaves its partial files
    there, taking the space a full disk lacks); finished checkpoints are untouched."""
    root = Path(ckpt_dir)
    if root.is_dir():
        for p in root.iterdir():
            if TEMP_SUFFIX in p.name and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
