"""Wall time of the README's main job, `minflux parity` with no arguments, before and after a change.

Exports an earlier commit (default c37fe85, before the one-forward / compile-cache work) with `git archive`
and runs the job from it and from this checkout, alternately in one process, so both see the same machine
and load: each first on a fresh install (an empty cache directory), then once more (the repeat: this
checkout's run finds the JAX compilation cache the first run filled in $XDG_CACHE_HOME/minflux/jax).
Prints, per run, the wall time, the CPU seconds the job used, the 1-minute load average before it, and the
report's row count and verdict (both must pass, with the same rows).

    python bench/bench_parity_startup.py                 # before = c37fe85
    python bench/bench_parity_startup.py --before HEAD~3 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export(commit: str, into: Path) -> Path:
    """The tree of `commit`, written to `into` (no git worktree: nothing is registered in the repository)."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main_job(tree: Path, cache_home: Path, report: Path) -> dict:
    """`python -m minflux_cli parity --json report` run from `tree`; wall and CPU seconds, load before it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MINFLUX_JAX_CACHE", "JAX_COMPILATION_CACHE_DIR")
    }
    env.update(PYTHONPATH=str(tree), XDG_CACHE_HOME=str(cache_home))
    load = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "minflux_cli", "parity", "--json", str(report)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    runs = json.loads(report.read_text())["runs"]
    return {
        "wall_s": wall,
        "cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
        "load": load,
        "rows": sum(len(r["rows"]) for r in runs),
        "passed": all(r["passed"] for r in runs),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--before", default="c37fe85", help="the commit to compare against (default c37fe85)"
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="fresh + repeat pairs per side (default 1)"
    )
    args = p.parse_args()
    print(f"{os.cpu_count()} CPUs; before = {args.before}, after = this checkout ({ROOT})")
    with tempfile.TemporaryDirectory(prefix="minflux-bench-") as tmp:
        tmp = Path(tmp)
        trees = {"before": export(args.before, tmp / "before"), "after": ROOT}
        results: dict[str, list] = {"before": [], "after": []}
        for r in range(args.rounds):
            caches = {side: tmp / f"cache-{side}-{r}" for side in trees}  # empty: a fresh install
            for attempt in ("fresh", "repeat"):
                for side, tree in trees.items():
                    out = main_job(tree, caches[side], tmp / f"{side}.json")
                    results[side].append((attempt, out))
                    print(
                        f"{side:6s} {attempt:6s}  {out['wall_s']:6.1f} s wall  {out['cpu_s']:6.1f} s CPU  "
                        f"load {out['load']:.2f} before  {out['rows']} rows  "
                        f"{'pass' if out['passed'] else 'FAIL'}",
                        flush=True,
                    )
    for attempt in ("fresh", "repeat"):
        b = [o["wall_s"] for a, o in results["before"] if a == attempt]
        a = [o["wall_s"] for a_, o in results["after"] if a_ == attempt]
        print(
            f"{attempt}: before {min(b):.1f} s, after {min(a):.1f} s (best of {len(a)}): x{min(b) / min(a):.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
