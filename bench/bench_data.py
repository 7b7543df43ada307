"""The training data path, measured: peak memory of `minflux train --data` against the cache's size on disk, a step
fed by the streamed loader against the same step fed from memory, and the pixels aspect-ratio buckets keep.

    python bench/bench_data.py memory --gb 2 16 --dir /tmp/cache-bench   # peak RSS, klein-4b text widths
    python bench/bench_data.py throughput                               # streamed vs in memory, alternating
    python bench/bench_data.py buckets                                  # share of pixels kept vs square crop
    python bench/bench_data.py ... --json out.json

memory: writes a synthetic cache of flux2-klein-4b's shapes (text 512 x 7680 in bf16, 1024 latent tokens of 128
channels per sample; ~8.4 MB a sample) at each size, then runs the command itself, `minflux train --data`, in a fresh
process per size, on a tiny transformer whose text input is 7680 wide (the data path is what is measured), and
reports its peak resident memory (`ru_maxrss`). The caches are deleted afterwards.

throughput: two trainers of the same tiny model and options, one on a cache streamed from disk (`LatentShards`,
grain prefetch), one on the same samples held in memory (`data.Dataset`); after compiling, blocks of steps alternate
between the two, so load changes hit both; the figure is the ratio of the median step times.

buckets: for a set of common photo sizes of mixed aspect ratios, the share of each image's pixels that the nearest
bucket's cover crop keeps (`minflux.buckets`), against one square crop (what `minflux cache` did before).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TXT, TXT_DIM, IMG, CH = (
    512,
    7680,
    1024,
    128,
)  # flux2-klein-4b at 512 px: text tokens, width; latent tokens


def write_cache(folder: Path, gigabytes: float, shard_mb: int = 1024) -> int:
    """A cache of `gigabytes` on disk in minflux cache's format (cache.json, shards of ~shard_mb, one bucket)."""
    import ml_dtypes

    from minflux import data, ids
    from minflux.checkpoint import st_dtype, write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    per = TXT * TXT_DIM * 2 + IMG * CH * 4 + (TXT + IMG) * 4 * 4
    n = int(gigabytes * 1e9 / per)
    per_shard = max(1, shard_mb * 1_000_000 // per)
    rng = np.random.default_rng(0)
    shards = []
    for s, start in enumerate(range(0, n, per_shard)):
        k = min(per_shard, n - start)
        img_ids, txt_ids = ids.image_ids(k, 32, 32, 4), ids.text_ids(k, TXT, 4, 3)
        tensors = {
            "img": rng.standard_normal((k, IMG, CH), np.float32),
            "img_ids": img_ids,
            "txt": rng.standard_normal((k, TXT, TXT_DIM), np.float32).astype(ml_dtypes.bfloat16),
            "txt_ids": txt_ids,
        }
        name = f"shard-{s:05d}.safetensors"
        write_safetensors(
            folder / name,
            {key: (st_dtype(v.dtype), v.shape) for key, v in tensors.items()},
            tensors.__getitem__,
        )
        del tensors
        shards.append(
            {"file": name, "bucket": [512, 512], "count": k, "names": [str(i) for i in range(k)]}
        )
    data.write_meta(folder, {"model": "bench", "refs": 0, "shards": shards})
    return n


# the command in a fresh process: a tiny transformer of klein-4b's text width registered as a preset, then
# `minflux train --data ...` as typed; its peak resident memory printed last
TRAIN = textwrap.dedent("""
    import dataclasses, json, resource, sys
    from minflux import configs
    configs.PRESETS["bench-klein-text"] = dataclasses.replace(configs.get("flux2-tiny"), context_in_dim=7680)
    from minflux_cli.main import main
    code = main(sys.argv[1:])
    print(json.dumps({"code": code, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def memory(args) -> dict:
    results = {}
    root = Path(args.dir)
    for gb in args.gb:
        folder = root / f"cache-{gb}gb"
        t0 = time.time()
        n = write_cache(folder, gb)
        size = sum(p.stat().st_size for p in folder.iterdir()) / 1e9
        print(f"wrote {folder}: {n} samples, {size:.2f} GB ({time.time() - t0:.0f} s)", flush=True)
        argv = [
            "train",
            "--config",
            "bench-klein-text",
            "--data",
            str(folder),
            "--steps",
            str(args.steps),
        ]
        argv += ["--batch-size", str(args.batch), "--out", str(root / f"run-{gb}gb")]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, "-c", TRAIN, *argv], capture_output=True, text=True, env=env, cwd=ROOT
        )
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        results[f"{gb}gb"] = {"samples": n, "disk_gb": round(size, 2), **out}
        print(f"  peak RSS of minflux train --data: {out['peak_rss_mb']:.0f} MB", flush=True)
        shutil.rmtree(folder)
        shutil.rmtree(root / f"run-{gb}gb", ignore_errors=True)
    sizes = [f"{gb}gb" for gb in args.gb]
    if len(sizes) > 1:
        a, b = results[sizes[0]]["peak_rss_mb"], results[sizes[-1]]["peak_rss_mb"]
        results["ratio"] = b / a
        print(f"{sizes[-1]} / {sizes[0]} peak RSS: {b / a:.3f}")
    return results


def throughput(args) -> dict:
    import jax

    from minflux import configs, data
    from minflux_jax import trainer as tr

    folder = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        n = write_cache(folder, args.throughput_gb)
        streamed = data.LatentShards(folder, cfg=None)
        arrays = streamed.read(0, np.arange(len(streamed)))  # every sample, in memory
        memory = data.Dataset()
        memory.arrays = arrays
        cfg = dataclasses.replace(configs.get("flux2-tiny"), context_in_dim=TXT_DIM)
        opts = tr.TrainOptions(steps=10**6, batch_size=args.batch, lr=1e-4, warmup=0)
        trainers = {
            "streamed": tr.Trainer(cfg, streamed, opts),
            "memory": tr.Trainer(cfg, memory, opts),
        }
        for t in trainers.values():  # compile and warm up
            for _ in range(3):
                float(t.train_step()["loss"])
        times = {k: [] for k in trainers}
        for _ in range(args.rounds):
            for name, t in trainers.items():
                for _ in range(args.block):
                    start = time.perf_counter()
                    jax.block_until_ready(t.train_step()["loss"])
                    times[name].append(time.perf_counter() - start)
        med = {k: float(np.median(v)) for k, v in times.items()}
        out = {
            "samples": n,
            "batch": args.batch,
            "steps_each": len(times["streamed"]),
            "median_step_s": med,
            "streamed_over_memory": med["streamed"] / med["memory"],
        }
        print(
            f"median step: streamed {med['streamed'] * 1e3:.1f} ms, in memory {med['memory'] * 1e3:.1f} ms, "
            f"ratio {out['streamed_over_memory']:.3f} ({out['steps_each']} steps each, alternating blocks of "
            f"{args.block})"
        )
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# common photo and screen sizes (width, height): phones, DSLRs, screens, panoramas, portraits
SIZES = [
    (4032, 3024), (3024, 4032), (6000, 4000), (4000, 6000), (1920, 1080), (1080, 1920), (2560, 1080),
    (3000, 1000), (1024, 1024), (2048, 1536), (1200, 1500), (1500, 2100), (3840, 1600), (800, 2000),
]  # fmt: skip


def bucket_shares(args) -> dict:
    from minflux import buckets

    table = buckets.make_buckets(args.size, args.step, args.max_aspect)
    rows = []
    for w, h in SIZES:
        b = buckets.nearest_bucket(w, h, table)
        rows.append(
            {
                "size": [w, h],
                "bucket": list(b),
                "kept_bucket": buckets.kept(w, h, buckets.cover(w, h, b)),
                "kept_square": buckets.kept(w, h, buckets.square_crop(w, h, args.size)),
            }
        )
    for r in rows:
        print(
            f"{r['size'][0]:5d} x {r['size'][1]:<5d} -> {r['bucket'][0]:4d} x {r['bucket'][1]:<4d} "
            f"kept {100 * r['kept_bucket']:5.1f}%   square crop {100 * r['kept_square']:5.1f}%"
        )
    mean_b = float(np.mean([r["kept_bucket"] for r in rows]))
    mean_s = float(np.mean([r["kept_square"] for r in rows]))
    worst_b = float(min(r["kept_bucket"] for r in rows))
    print(
        f"mean kept: buckets {100 * mean_b:.1f}% (worst {100 * worst_b:.1f}%), square crop {100 * mean_s:.1f}%"
    )
    print(
        f"{len(table)} buckets of about {args.size}^2 pixels, step {args.step}, aspect <= {args.max_aspect}"
    )
    return {"buckets": [list(b) for b in table], "images": rows, "mean_kept_buckets": mean_b,
            "mean_kept_square": mean_s, "worst_kept_buckets": worst_b}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["memory", "throughput", "buckets"])
    p.add_argument(
        "--gb", type=float, nargs="+", default=[2, 16], help="memory: cache sizes on disk"
    )
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the caches are written")
    p.add_argument("--steps", type=int, default=20, help="memory: training steps per run")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--throughput-gb", type=float, default=0.5, help="throughput: cache size")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block", type=int, default=5, help="throughput: steps per block")
    p.add_argument("--size", type=int, default=1024, help="buckets: bucket area side")
    p.add_argument("--step", type=int, default=64)
    p.add_argument("--max-aspect", type=float, default=4.0)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    out = {"memory": memory, "throughput": throughput, "buckets": bucket_shares}[args.what](args)
    if args.json:
        from minflux.files import write_text

        write_text(args.json, json.dumps({"what": args.what, "args": vars(args), **out}, indent=1))


if __name__ == "__main__":
    main()
