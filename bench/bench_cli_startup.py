"""The first moments of the `minflux` command: time to the first line of `--help` and of argument errors, and
whether Ctrl-C / SIGTERM at any moment of start-up end with our one line and 130 / 143.

    python bench/bench_cli_startup.py                       # this checkout
    python bench/bench_cli_startup.py --compare /old/tree   # and another checkout, interleaved, side by side

Each command runs as the console script pip writes (`from minflux_cli.main import cli`), with PYTHONPATH set to
the tree; the time is from spawn to the first byte on stdout or stderr, the median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
COMMANDS = [
    ["--help"],
    ["generate", "--steps", "0"],
    ["train", "--steps", "0"],
    ["parity", "--resolution", "0"],
    ["convert", "--help"],
    ["bench", "--peak-tflops", "-1"],
]
DELAYS = (
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
)  # seconds after spawn, for the signal sweep


def script(folder: Path) -> Path:
    path = folder / "minflux"
    path.write_text(
        f"#!{sys.executable}\nimport sys\nfrom minflux_cli.main import cli\nsys.exit(cli())\n"
    )
    path.chmod(0o755)
    return path


def first_line(exe: Path, tree: str, argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": tree}
    t0 = time.perf_counter()
    p = subprocess.Popen([exe, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    ready, _, _ = select.select([p.stdout, p.stderr], [], [])
    os.read(ready[0].fileno(), 1)
    elapsed = time.perf_counter() - t0
    p.communicate()
    return elapsed


def clean_stops(exe: Path, tree: str) -> tuple[int, int]:
    """(SIGINT, SIGTERM) runs of `minflux parity` stopped at each of DELAYS that end with one line and 130/143."""
    env = {**os.environ, "PYTHONPATH": tree}
    clean = [0, 0]
    for delay in DELAYS:
        for i, (sig, code, word) in enumerate(
            ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated"))
        ):
            p = subprocess.Popen(
                [exe, "parity"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                text=True,
            )
            time.sleep(delay)
            p.send_signal(sig)
            _, err = p.communicate(timeout=300)
            lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
            clean[i] += p.returncode == code and lines == [f"minflux parity: {word}"]
    return clean[0], clean[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", help="another checkout to measure beside this one")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--no-signals", action="store_true", help="skip the signal sweep (about 2 minutes)"
    )
    args = ap.parse_args()
    trees = {"this": str(HERE)} | ({"other": args.compare} if args.compare else {})
    with tempfile.TemporaryDirectory() as tmp:
        exe = script(Path(tmp))
        print("| command | " + " | ".join(trees) + " |")
        for argv in COMMANDS:
            times = {name: [] for name in trees}
            for _ in range(args.repeats):  # interleaved: the machine's load falls on both alike
                for name, tree in trees.items():
                    times[name].append(first_line(exe, tree, argv))
            cells = " | ".join(f"{statistics.median(t):.2f} s" for t in times.values())
            print(f"| minflux {' '.join(argv)} | {cells} |", flush=True)
        if not args.no_signals:
            for name, tree in trees.items():
                i, t = clean_stops(exe, tree)
                print(
                    f"{name}: stopped at {len(DELAYS)} moments of start-up: SIGINT clean {i}, SIGTERM {t}"
                )


if __name__ == "__main__":
    main()
