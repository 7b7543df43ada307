"""Peak memory of a streamed parity check on a synthetic full-size checkpoint.

Writes random bf16 weights in the official BFL layout for a preset (default: flux2-dev, 32B parameters,
64 GB on disk) tensor by tensor, then runs `minflux parity` on it in a subprocess and reports that
process's peak RSS against the model's size. The parity run never holds two whole models: one block
at a time, in each framework.

    python bench/bench_parity_memory.py --model flux2-dev --dir /tmp/bench --resolution 128 --txt-len 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np


def write_random_checkpoint(name: str, path: Path) -> int:
    """Random bf16 weights of preset `name`, streamed to `path`; returns the file size."""
    import ml_dtypes
    import torch

    from minflux import checkpoint, configs
    from minflux_torch.load import MODELS

    cfg = configs.get(name)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MODELS[cfg.family](cfg).state_dict().items()}

    def produce(key):
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        shape = shapes[key]
        n = int(
            np.prod(shape)
        )  # a random block of up to 4M values, tiled: fast, and the values stay sane
        arr = np.resize(rng.random(min(n, 1 << 22), dtype=np.float32) * 2 - 1, shape)
        arr *= (1 / np.sqrt(np.prod(shape[1:]))) if len(shape) > 1 else 0.05
        if key.endswith("scale"):
            arr += 1
        return arr.astype(ml_dtypes.bfloat16)

    checkpoint.write_safetensors(
        path, {k: ("BF16", s) for k, s in shapes.items()}, produce, progress=True
    )
    return path.stat().st_size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux2-dev")
    p.add_argument("--dir", type=Path, default=Path("/tmp/minflux-bench"))
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--txt-len", type=int, default=16)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint afterwards")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    ckpt, report = (
        args.dir / f"{args.model}-random-bf16.safetensors",
        args.dir / f"{args.model}-parity.json",
    )
    t0 = time.perf_counter()
    size = ckpt.stat().st_size if ckpt.exists() else write_random_checkpoint(args.model, ckpt)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "parity",
        "--model",
        args.model,
        "--checkpoint",
        str(ckpt),
        "--dtype",
        args.dtype,
        "--resolution",
        str(args.resolution),
        "--txt-len",
        str(args.txt_len),
        "--json",
        str(report),
    ]
    rc = subprocess.run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result = {
        "model": args.model,
        "checkpoint_bytes": size,
        "fp32_model_bytes": size * 2,
        "parity_exit": rc,
        "parity_peak_rss_bytes": peak,
        "peak_over_bf16_file": peak / size,
        "write_seconds": t_write,
        "parity_seconds": time.perf_counter() - t0,
        "command": " ".join(cmd),
    }
    if report.exists():
        result["memory"] = json.loads(report.read_text())["runs"][0]["memory"]
    print(json.dumps(result, indent=1))
    if not args.keep:
        ckpt.unlink()
    return rc


if __name__ == "__main__":
    sys.exit(main())
