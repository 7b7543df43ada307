"""Benchmark `minflux convert`: peak memory and throughput on a multi-GB synthetic FLUX checkpoint.

Writes a BFL-layout checkpoint with random bf16 weights and FLUX.2-dev's tensor shapes (fewer blocks,
so it is a few GB; every kind of tensor is there, including the largest, `single_blocks.N.linear1`),
then, each from a cold page cache (the file's pages are dropped with posix_fadvise), measures

  raw read:  reading the file sequentially (the floor for any converter),
  raw copy:  copying it and fsyncing the copy (read + write, no conversion),
  convert:   `minflux convert SRC DST --to diffusers` in a subprocess, its peak RSS from getrusage,

and prints the figures and the ratios as a markdown table.

    python bench/bench_convert.py                      # flux2-dev dims, 1 double + 1 single block (4.6 GB)
    python bench/bench_convert.py --depth 2 --single 4 --dir /mnt/scratch
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from minflux import checkpoint, configs

GB = 1e9
# Runs the CLI, then writes its own peak RSS (VmHWM: the high-water mark of this process's memory since
# exec; getrusage of a child would also count the parent's RSS at fork) to the file named by argv[1].
CHILD = """
import sys
from minflux_cli import main as cli
try:
    rc = cli.main(sys.argv[2:])
except SystemExit as e:  # --help
    rc = e.code
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0].split()[1]
open(sys.argv[1], "w").write(hwm)
sys.exit(rc)
"""


def drop_cache(path: Path) -> None:
    """Evict a file's clean pages from the page cache (no root needed), so the next read hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def model_shapes(preset: str, depth: int, single: int) -> dict[str, tuple[int, ...]]:
    """BFL key -> shape of a preset with fewer blocks, from the PyTorch model built on the meta device."""
    import torch

    from minflux_torch.load import MODELS

    cfg = dataclasses.replace(configs.get(preset), depth=depth, depth_single_blocks=single)
    with torch.device("meta"):
        model = MODELS[cfg.family](cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_random(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> None:
    """Random finite bf16 weights, written tensor by tensor (bit 14 cleared: |x| < 2, never Inf/NaN)."""
    rng = np.random.default_rng(seed)
    bf16 = checkpoint.np_dtype("BF16")

    def produce(key):
        bits = rng.integers(0, 1 << 16, size=shapes[key], dtype=np.uint16)
        bits &= 0xBFFF
        return bits.view(bf16)

    checkpoint.write_safetensors(
        path, {k: ("BF16", s) for k, s in shapes.items()}, produce, progress=True
    )


def raw_read(path: Path, chunk: int = 64 << 20) -> float:
    buf = bytearray(chunk)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def raw_copy(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def run_cli(args: list[str], work: Path) -> tuple[int, int]:
    """`minflux ARGS` in a subprocess: its exit code and peak RSS in bytes."""
    peak = work / "peak_kib"
    rc = subprocess.run(
        [sys.executable, "-c", CHILD, str(peak), *args], stdout=subprocess.DEVNULL
    ).returncode
    kib = int(peak.read_text())
    peak.unlink()
    return rc, kib * 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="flux2-dev")
    p.add_argument("--depth", type=int, default=1, help="double blocks")
    p.add_argument("--single", type=int, default=1, help="single blocks")
    p.add_argument(
        "--dir", default="/tmp/minflux-bench", help="scratch directory (needs 3x the file size)"
    )
    p.add_argument("--keep", action="store_true", help="keep the files")
    args = p.parse_args()

    shapes = model_shapes(args.preset, args.depth, args.single)
    size = sum(int(np.prod(s)) * 2 for s in shapes.values())
    largest = max(shapes, key=lambda k: int(np.prod(shapes[k])))
    largest_bytes = int(np.prod(shapes[largest])) * 2
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < 3 * size + (1 << 30):
        print(f"{work}: {free / GB:.1f} GB free, need {3 * size / GB + 1:.1f} GB", file=sys.stderr)
        return 1
    src, dst, copy = (
        work / "bfl.safetensors",
        work / "diffusers.safetensors",
        work / "copy.safetensors",
    )
    load0 = os.getloadavg()[0]
    print(
        f"{args.preset} dims, {args.depth} double + {args.single} single blocks: {len(shapes)} tensors, "
        f"{size / GB:.2f} GB; largest {largest} {shapes[largest]} = {largest_bytes / GB:.2f} GB",
        flush=True,
    )
    try:
        t0 = time.perf_counter()
        write_random(src, shapes)
        t_gen = time.perf_counter() - t0

        drop_cache(src)
        t_read = raw_read(src)
        drop_cache(src)
        t_copy = raw_copy(src, copy)
        copy.unlink()

        drop_cache(src)
        t0 = time.perf_counter()
        rc, peak = run_cli(["convert", str(src), str(dst), "--to", "diffusers"], work)
        t_conv = time.perf_counter() - t0
        if rc:
            print(f"convert failed with exit code {rc}", file=sys.stderr)
            return rc
        _, floor = run_cli(
            ["convert", "--help"], work
        )  # the same process, everything imported, no work

        # spot check: the swapped final layer and one split qkv part are what the recipes say
        a, b = checkpoint.Checkpoint(src), checkpoint.Checkpoint(dst)
        fin = a.get("final_layer.adaLN_modulation.1.weight")
        h = fin.shape[0] // 2
        assert (
            b.get("norm_out.linear.weight").view(np.uint16)
            == np.concatenate([fin[h:], fin[:h]]).view(np.uint16)
        ).all()
        d = shapes["img_in.weight"][0]
        assert (
            b.get("transformer_blocks.0.attn.to_v.weight").view(np.uint16)
            == a.rows("double_blocks.0.img_attn.qkv.weight", 2 * d, 3 * d).view(np.uint16)
        ).all()
    finally:
        if not args.keep:
            for f in (src, dst, copy):
                f.unlink(missing_ok=True)

    gbs = lambda t: size / GB / t
    print(
        f"\n{os.cpu_count()} CPUs; 1-minute load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} "
        f"at the end (other work on the machine slows the CPU-bound parts)\n"
    )
    print("| measure | time (s) | GB/s | throughput vs raw read | vs raw copy |")
    print("|---|---|---|---|---|")
    print(f"| generate + write the random source | {t_gen:.1f} | {gbs(t_gen):.2f} | | |")
    print(f"| raw sequential read (cold cache) | {t_read:.1f} | {gbs(t_read):.2f} | 1.00 | |")
    print(
        f"| raw copy + fsync (cold cache) | {t_copy:.1f} | {gbs(t_copy):.2f} | {t_read / t_copy:.2f} | 1.00 |"
    )
    print(
        f"| `minflux convert --to diffusers` (cold cache, whole process) | {t_conv:.1f} | {gbs(t_conv):.2f} | "
        f"{t_read / t_conv:.2f} | {t_copy / t_conv:.2f} |"
    )
    print()
    print("| memory | GB | vs largest tensor | vs file |")
    print("|---|---|---|---|")
    print(
        f"| convert peak RSS | {peak / GB:.2f} | {peak / largest_bytes:.2f} | {peak / size:.3f} |"
    )
    print(f"| same process, imports only | {floor / GB:.2f} | | |")
    print(
        f"| peak RSS above imports | {(peak - floor) / GB:.2f} | {(peak - floor) / largest_bytes:.2f} | "
        f"{(peak - floor) / size:.3f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
