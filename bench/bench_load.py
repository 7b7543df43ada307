"""Loading a bf16 checkpoint: `load_model` in PyTorch and JAX, before and after a change, beside diffusers.

    python bench/bench_load.py                       # 2.6 GB: FLUX.1-dev shapes, 2 double + 4 single blocks
    python bench/bench_load.py --before a62e4a8 --rounds 3 --dir /tmp/minflux-bench-load --keep

Writes one synthetic bf16 checkpoint in BFL layout (seeded random weights) and the same weights as minflux's
diffusers export (a diffusers model folder: config.json + diffusion_pytorch_model.safetensors), then times, each
in a fresh process with the file in the page cache, alternating round by round:

    torch before / after   minflux_torch.load_model(cfg, file, torch.bfloat16) at `--before` and at this checkout
    jax before / after     minflux_jax.load_model(cfg, file, jnp.bfloat16)
    diffusers single-file  FluxTransformer2DModel.from_single_file(file, config=folder, torch_dtype=bf16)
    diffusers pretrained   FluxTransformer2DModel.from_pretrained(folder, torch_dtype=bf16)

Times cover the load call only (imports excluded); each process also reports its peak RSS over its RSS before
the call. The files are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import dataclasses, json, os, sys, time
def status(f):
    return int(next(l for l in open('/proc/self/status') if l.startswith(f)).split()[1]) * 1024
kind, path, folder = sys.argv[1:4]
from minflux import configs
cfg = dataclasses.replace(configs.get('flux1-dev'), depth=2, depth_single_blocks=4)
if kind == 'torch':
    import torch, minflux_torch as m
    load = lambda: m.load_model(cfg, path, torch.bfloat16)
elif kind == 'jax':
    import jax, jax.numpy as jnp, minflux_jax as m
    load = lambda: m.load_model(cfg, path, jnp.bfloat16)
else:
    import torch, diffusers
    cls = diffusers.FluxTransformer2DModel
    if kind == 'single-file':
        load = lambda: cls.from_single_file(path, config=folder, torch_dtype=torch.bfloat16, local_files_only=True)
    else:
        load = lambda: cls.from_pretrained(folder, torch_dtype=torch.bfloat16, local_files_only=True)
open('/proc/self/clear_refs', 'w').write('5')
base = status('VmRSS')
t0 = time.perf_counter()
model = load()
seconds = time.perf_counter() - t0
print(json.dumps({'seconds': seconds, 'peak_over_base': status('VmHWM') - base}))
"""


def write_files(folder: Path) -> tuple[Path, Path]:
    """The BFL file and the diffusers folder, same weights (minflux.bench.random_weights, bf16)."""
    import dataclasses

    import ml_dtypes

    from minflux import bench, checkpoint, configs, memory
    from minflux_torch import bench as tbench

    cfg = dataclasses.replace(configs.get("flux1-dev"), depth=2, depth_single_blocks=4)
    print(f"{memory.param_count(cfg) / 1e9:.2f} B parameters, bf16", flush=True)
    import torch

    from minflux_torch.load import MODELS

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MODELS["flux1"](cfg).state_dict().items()}
    tensors = dict(bench.random_weights(shapes, 0, ml_dtypes.bfloat16))
    bfl = folder / "flux1-mid.safetensors"
    checkpoint.save_bfl(bfl, tensors, cfg, "bfl")
    diff = folder / "diffusers"
    diff.mkdir(exist_ok=True)
    checkpoint.save_bfl(diff / "diffusion_pytorch_model.safetensors", tensors, cfg, "diffusers")
    tbench.diffusers_transformer(cfg).save_config(diff)
    return bfl, diff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/minflux-bench-load"))
    p.add_argument("--before", default="a62e4a8", help="the revision to compare with")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the files")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    before = Path(tempfile.mkdtemp(prefix="minflux-before-", dir=args.dir))
    archive = subprocess.run(
        ["git", "archive", args.before], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
    try:
        bfl, diff = write_files(args.dir)
        size = bfl.stat().st_size
        print(f"{bfl}: {size / 1e9:.2f} GB; load average {os.getloadavg()}", flush=True)
        variants = {
            "torch before": ("torch", before),
            "torch after": ("torch", ROOT),
            "jax before": ("jax", before),
            "jax after": ("jax", ROOT),
            "diffusers from_single_file": ("single-file", ROOT),
            "diffusers from_pretrained": ("pretrained", ROOT),
        }
        results = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, (kind, tree) in variants.items():
                for f in (bfl, diff / "diffusion_pytorch_model.safetensors"):  # in the page cache
                    with open(f, "rb") as fh:
                        while fh.read(1 << 26):
                            pass
                env = {**os.environ, "PYTHONPATH": str(tree)}
                out = subprocess.run(
                    [sys.executable, "-c", CODE, kind, str(bfl), str(diff)],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=tree,
                )
                if out.returncode:
                    print(f"{name}: failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[name].append(res)
                print(f"round {r + 1} {name}: {res['seconds']:.2f} s", flush=True)
        print(f"\nload average at the end {os.getloadavg()}")
        print(
            "| load | median s | GB/s | peak RSS over base (GB) | runs (s) |\n|---|---|---|---|---|"
        )
        for name, runs in results.items():
            if not runs:
                continue
            s = float(np.median([x["seconds"] for x in runs]))
            peak = max(x["peak_over_base"] for x in runs) / 1e9
            each = ", ".join(f"{x['seconds']:.2f}" for x in runs)
            print(f"| {name} | {s:.2f} | {size / 1e9 / s:.2f} | {peak:.2f} | {each} |")
    finally:
        shutil.rmtree(before, ignore_errors=True)
        if not args.keep:
            for f in (args.dir / "flux1-mid.safetensors", args.dir / "diffusers"):
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
