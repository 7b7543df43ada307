"""Benchmark `minflux generate --offload blocks`: peak RSS and step time of a full-size FLUX.1-dev in fp8, with
and without offloading, in PyTorch and JAX (CPU).

The checkpoint is synthetic: every tensor drawn from `minflux.random` (seeded), the linear weights written as
float8_e4m3fn with per-tensor scales, as `minflux convert --dtype fp8` writes them (11.9 B parameters, about
12 GB); a full-size `flux1-ae` in bf16; one prompt's embeddings (64 T5 tokens and the CLIP vector). Each run is
the command itself in a fresh process, one after another,

    /usr/bin/time -v python -m minflux_cli generate --model flux1-dev --transformer F --ae A --embeddings E
        --width 256 --height 256 --steps 2 --keep-quantized [--offload blocks] --framework X

at the default dtype (bf16). Without offloading the 24 GB bf16 model does not fit this machine, so the resident
runs keep the fp8 weights packed (`--keep-quantized`: 12 GB, widened layer by layer); the offloaded ones do too
(each block read from the file at its turn, packed, and freed after it) and, with `--modes`, also without it
(each block read and cast to bf16 at its turn). Peak RSS is /usr/bin/time's "Maximum resident set size"; the
step time is the second step's (so no compilation is counted), from the command's own progress bar. A watchdog
kills a run whose resident memory passes `--limit` (default: what the machine has free, less 1 GB), and the
table says so. The files are deleted at the end unless `--keep`.

    python bench/bench_offload.py --dir /work/tmp-offload                  # both frameworks
    python bench/bench_offload.py --dir /work/tmp-offload --frameworks torch --modes resident offload offload-bf16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from minflux import checkpoint, configs, keymaps, memory, random

GB = 1e9
MODES = {  # mode -> generate flags
    "resident": ["--keep-quantized"],
    "offload": ["--keep-quantized", "--offload", "blocks"],
    "offload-bf16": ["--offload", "blocks"],
}


def shapes(cfg) -> dict[str, tuple[int, ...]]:
    import torch

    import minflux_torch as mt

    with torch.device("meta"):
        model = mt.load.MODELS[cfg.family](cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_files(d: Path, preset: str, txt_len: int) -> tuple[Path, Path, Path]:
    """(transformer fp8, autoencoder bf16, embeddings): seeded random weights, one tensor in memory at a time."""
    import torch

    import minflux_torch as mt

    cfg = configs.get(preset)
    transformer, ae, emb = (
        d / f"{preset}-fp8.safetensors",
        d / "ae.safetensors",
        d / "emb.safetensors",
    )
    if not transformer.exists():
        specs = shapes(cfg)
        recipes = keymaps.convert(specs, "bfl", "bfl", cfg.family, cfg.hidden_size)
        checkpoint.write_recipes(
            transformer,
            recipes,
            lambda key, a, b: random.tensor(key, specs[key], 0)[a:b],
            {k: "F32" for k in specs},
            dtype="F8_E4M3",
            progress=True,
            digests=False,
        )
    if not ae.exists():
        name = f"{cfg.family}-ae" + ("-tiny" if preset.endswith("-tiny") else "")
        mt.save_model(mt.build_model(name, seed=1, dtype=torch.bfloat16), ae)
    rng = np.random.default_rng(0)
    checkpoint.write_safetensors(
        emb,
        {"txt": ("F32", (1, txt_len, cfg.context_in_dim)), "vec": ("F32", (1, cfg.vec_in_dim))},
        lambda k: rng.standard_normal(
            (1, txt_len, cfg.context_in_dim) if k == "txt" else (1, cfg.vec_in_dim), np.float32
        ),
    )
    return transformer, ae, emb


def _bar_seconds(text: str) -> dict[int, float]:
    """Elapsed seconds at each step the progress bar drew ("n/N [MM:SS<..." or "[H:MM:SS<..."), by n."""
    out = {}
    for n, clock in re.findall(r"\b(\d+)/\d+ \[([\d:]+)<", text):
        parts = [int(p) for p in clock.split(":")]
        out[int(n)] = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return out


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in (proc, *proc.children(recursive=True)):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(argv: list[str], limit: float) -> dict:
    """One `/usr/bin/time -v` run of the command; its peak RSS, step time, and whether the watchdog killed it."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "minflux_cli", *argv]
    t0, load = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched, state = psutil.Process(proc.pid), {"peak": 0, "killed": False}

    def watch():
        while proc.poll() is None:
            rss = _tree_rss(watched)
            state["peak"] = max(state["peak"], rss)
            if rss > limit:
                state["killed"] = True
                for p in watched.children(recursive=True):
                    p.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    bar = _bar_seconds(err)
    return {
        "argv": argv,
        "returncode": proc.returncode,
        "killed_over_bytes": limit if state["killed"] else None,
        "peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
        "watchdog_peak_bytes": state["peak"],
        "step_seconds": bar[2] - bar[1] if 1 in bar and 2 in bar else None,
        "wall_seconds": time.perf_counter() - t0,
        "load_average": load,
        "stdout": out.strip().splitlines()[-1:] if out.strip() else [],
        "stderr_tail": [] if proc.returncode == 0 else err.strip().splitlines()[-5:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the files go (~12.2 GB)")
    parser.add_argument("--preset", default="flux1-dev")
    parser.add_argument("--frameworks", nargs="+", default=["torch", "jax"])
    parser.add_argument("--modes", nargs="+", default=["resident", "offload"], choices=list(MODES))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--txt-len", type=int, default=64)
    parser.add_argument("--limit", type=float, help="GB of RSS at which a run is killed")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if free < 14 * GB and not (args.dir / f"{args.preset}-fp8.safetensors").exists():
        sys.exit(f"{args.dir}: {memory.size(free)} free; the files need about 12.2 GB (+ headroom)")
    t0 = time.perf_counter()
    transformer, ae, emb = write_files(args.dir, args.preset, args.txt_len)
    print(
        f"files: {memory.size(transformer.stat().st_size)} transformer written in "
        f"{time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    rows = []
    try:
        for fw in args.frameworks:
            for mode in args.modes:
                limit = (args.limit * GB) if args.limit else memory.available_bytes() - 1 * GB
                argv = ["generate", "--model", args.preset, "--transformer", str(transformer)]
                argv += ["--ae", str(ae), "--embeddings", str(emb), "--framework", fw]
                argv += ["--width", str(args.size), "--height", str(args.size), "--steps", "2"]
                argv += [*MODES[mode], "--out", str(args.dir / f"{fw}-{mode}.png")]
                r = run(argv, limit) | {"framework": fw, "mode": mode}
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "argv"}), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| framework | mode | peak RSS | step s | step vs resident | load avg |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = next(
            (b for b in rows if b["framework"] == r["framework"] and b["mode"] == "resident"), None
        )
        ratio = (
            f"{r['step_seconds'] / base['step_seconds']:.2f}x"
            if base and base["step_seconds"] and r["step_seconds"]
            else "-"
        )
        peak = (
            f"killed over {memory.size(r['killed_over_bytes'])}"
            if r["killed_over_bytes"]
            else memory.size(r["peak_rss_bytes"] or 0)
        )
        step = f"{r['step_seconds']:.0f}" if r["step_seconds"] is not None else "-"
        print(
            f"| {r['framework']} | {r['mode']} | {peak} | {step} | {ratio} | {r['load_average']:.1f} |"
        )


if __name__ == "__main__":
    main()
