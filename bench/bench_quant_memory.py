"""Benchmark quantized loading: resident memory and load time of a full-size model, per file format and load
mode, in PyTorch and JAX, against the bf16 model and a plain safetensors read.

A full-size FLUX.1-dev is 12B parameters (24 GB in bf16): more than this machine may hold. So the model is
measured in three pieces and extrapolated, which is exact for what grows with depth:

  V0 = the embedders and final layer (no blocks),  V1 = V0 + one double block,  V2 = V0 + one single block,
  full = V0 + depth * (V1 - V0) + depth_single_blocks * (V2 - V0).

For each format (bf16 safetensors; BFL FP8R and NVFP4 safetensors; GGUF Q8_0, Q4_0, Q4_K) a synthetic file of
each piece is written with random valid packed data of that format (random bytes, finite scales; the layout
and sizes are the format's, the values need not be a trained model's), then each is loaded in a fresh
subprocess, from a cold page cache, in each mode:

  read       safetensors' own `load_file` of the bf16 file (the plain read, the baseline for load time),
  dequant    `load_model(..., dtype=bf16)`: every tensor dequantized and cast to bf16 on load,
  keep       `load_model(..., dtype=bf16, keep_quantized=True)`: quantized linear weights stay packed,

reporting the resident bytes of the model's arrays (exact), the process's RSS growth over the load (after
`malloc_trim`, so freed heap does not count), and the load time. Files are deleted at the end.

    python bench/bench_quant_memory.py                          # flux1-dev, all formats (~8 GB of files)
    python bench/bench_quant_memory.py --formats bf16 Q4_0 --frameworks torch --dir /mnt/scratch
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from minflux import checkpoint, configs, gguf_file, quant

GB = 1e9
FORMATS = ("bf16", "fp8r", "nvfp4", "Q8_0", "Q4_0", "Q4_K")
PIECES = {"V0": (0, 0), "V1": (1, 0), "V2": (0, 1)}  # (double blocks, single blocks)


def drop_cache(path: Path) -> None:
    """Evict a file's clean pages from the page cache, so the next read hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def piece(preset: str, name: str):
    depth, single = PIECES[name]
    return dataclasses.replace(configs.get(preset), depth=depth, depth_single_blocks=single)


def shapes(cfg) -> dict[str, tuple[int, ...]]:
    import torch

    import minflux_torch as mt

    with torch.device("meta"):
        model = mt.load.MODELS[cfg.family](cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Synthetic files: random valid packed data of each format
# ---------------------------------------------------------------------------------------------


def _fp8_bytes(rng, shape) -> np.ndarray:
    """Random float8_e4m3fn values, no NaN (0x7F / 0xFF)."""
    b = rng.integers(0, 256, shape, dtype=np.uint8)
    b[(b & 0x7F) == 0x7F] = 0x38  # 1.0
    return b.view(ml_dtypes.float8_e4m3fn)


def _gguf_blocks(rng, qtype: str, shape) -> np.ndarray:
    block, size = quant.gguf_sizes(qtype)
    b = rng.integers(0, 256, (shape[0] * shape[1] // block, size), dtype=np.uint8)
    for off in quant.GGUF_FP16_FIELDS[qtype]:
        b[:, off : off + 2] = np.full((len(b), 1), 1e-4, np.float16).view(np.uint8)
    return b.reshape(shape[0], -1)


def _quantizable(key: str, shape, fmt: str) -> bool:
    if not (key.endswith(".weight") and len(shape) == 2):
        return False
    block = {"fp8r": 1, "nvfp4": quant.NVFP4_BLOCK}.get(fmt) or quant.gguf_sizes(fmt)[0]
    return shape[1] % block == 0


def write(path: Path, cfg, fmt: str, seed: int = 0) -> None:
    """A synthetic checkpoint of `cfg` in `fmt`, one tensor at a time (memory near the largest tensor)."""
    rng = np.random.default_rng(seed)
    bf16 = lambda s: (rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16)  # noqa: E731
    if fmt.startswith(
        "Q"
    ):  # GGUF: quantized weights, other tensors F32 (as ComfyUI-GGUF keeps 1-D ones)
        tensors = {}
        for k, s in shapes(cfg).items():
            if _quantizable(k, s, fmt):
                tensors[k] = (fmt, _gguf_blocks(rng, fmt, s))
            else:
                tensors[k] = ("BF16" if len(s) == 2 else "F32", bf16(s).astype(np.float32))
        gguf_file.write(path, tensors)
        return
    specs, made = {}, {}
    for k, s in shapes(cfg).items():
        base = k.removesuffix("weight")
        if fmt == "fp8r" and _quantizable(k, s, fmt):
            specs[k], specs[base + "weight_scale"] = ("F8_E4M3", s), ("F32", (s[0],))
            made[k] = lambda s=s: _fp8_bytes(rng, s)
            made[base + "weight_scale"] = lambda s=s: np.full(s[0], 1e-3, np.float32)
        elif fmt == "nvfp4" and _quantizable(k, s, fmt):
            specs[k] = ("U8", (s[0], s[1] // 2))
            specs[base + "weight_scale"] = ("F8_E4M3", (s[0], s[1] // quant.NVFP4_BLOCK))
            specs[base + "weight_scale_2"] = ("F32", ())
            specs[base + "input_scale"] = ("F32", ())
            made[k] = lambda s=s: rng.integers(0, 256, (s[0], s[1] // 2), dtype=np.uint8)
            made[base + "weight_scale"] = lambda s=s: np.full(
                (s[0], s[1] // quant.NVFP4_BLOCK), 1.0, ml_dtypes.float8_e4m3fn
            )
            made[base + "weight_scale_2"] = lambda: np.array(1e-3, np.float32)
            made[base + "input_scale"] = lambda: np.array(1.0, np.float32)
        else:
            specs[k] = ("BF16", s)
            made[k] = lambda s=s: bf16(s)
    checkpoint.write_safetensors(path, specs, lambda k: np.asarray(made[k]()))


# ---------------------------------------------------------------------------------------------
# One measurement, in a fresh process
# ---------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024


def child(framework: str, mode: str, path: str, cfg_json: str) -> dict:
    """Load once and report {"seconds", "rss", "bytes"}: time, RSS growth and the arrays' exact bytes."""
    cfg = configs.resolve(json.loads(cfg_json)["preset"])
    cfg = dataclasses.replace(cfg, **json.loads(cfg_json)["fields"])
    if framework == "torch":
        import torch

        import minflux_torch as mt
        from minflux_torch import quant as q

        dtype = torch.bfloat16
    else:
        import jax
        import jax.numpy as jnp

        import minflux_jax as mt
        from minflux_jax import quant as q

        dtype = jnp.bfloat16
        jax.device_put(
            np.zeros(4)
        ).block_until_ready()  # the runtime's own memory, before the baseline
    before, t0 = _rss(), time.perf_counter()
    if mode == "read":
        from safetensors.numpy import load_file

        tensors = load_file(path)
        nbytes = sum(a.nbytes for a in tensors.values())
    else:
        model = mt.load_model(cfg, path, dtype=dtype, keep_quantized=mode == "keep")
        if framework == "jax":
            from flax import nnx

            jax.block_until_ready(nnx.state(model))
        nbytes = q.resident_bytes(model)
    seconds = time.perf_counter() - t0
    # hand freed heap back to the OS first (glibc keeps freed blocks under 32 MB): RSS is then what is live
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return {"seconds": seconds, "rss": _rss() - before, "bytes": nbytes}


def measure(framework: str, mode: str, path: Path, preset: str, name: str) -> dict:
    drop_cache(path)
    fields = dict(zip(("depth", "depth_single_blocks"), PIECES[name], strict=True))
    arg = json.dumps({"preset": preset, "fields": fields})
    r = subprocess.run(
        [sys.executable, __file__, "--child", framework, mode, str(path), arg],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise RuntimeError(f"{framework} {mode} {path.name}: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def extrapolate(rows: dict[str, dict], cfg) -> dict:
    """full = V0 + depth * (V1 - V0) + single * (V2 - V0), per figure."""
    v0, v1, v2 = (rows[n] for n in PIECES)
    return {
        k: v0[k] + cfg.depth * (v1[k] - v0[k]) + cfg.depth_single_blocks * (v2[k] - v0[k])
        for k in v0
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="flux1-dev")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--frameworks", nargs="+", default=["torch", "jax"], choices=["torch", "jax"])
    p.add_argument("--dir", type=Path, help="where the synthetic files go (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write every figure here")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # one measurement (run by `measure`)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    cfg = configs.get(args.model)
    work = Path(tempfile.mkdtemp(prefix="quant-bench-", dir=args.dir))
    results = []
    try:
        for fmt in args.formats:
            suffix = ".gguf" if fmt.startswith("Q") else ".safetensors"
            files = {n: work / f"{fmt}-{n}{suffix}" for n in PIECES}
            t0 = time.perf_counter()
            for n, path in files.items():
                write(path, piece(args.model, n), fmt)
            size = extrapolate({n: {"file": files[n].stat().st_size} for n in PIECES}, cfg)["file"]
            print(
                f"{fmt}: wrote {sum(f.stat().st_size for f in files.values()) / GB:.2f} GB in "
                f"{time.perf_counter() - t0:.0f} s (full model: {size / GB:.2f} GB)",
                flush=True,
            )
            modes = (
                (["read"] if fmt == "bf16" else [])
                + ["dequant"]
                + ([] if fmt == "bf16" else ["keep"])
            )
            for framework in args.frameworks:
                for mode in modes:
                    if mode == "read" and framework == "jax":
                        continue  # one plain read is the baseline for both
                    rows = {n: measure(framework, mode, files[n], args.model, n) for n in PIECES}
                    full = extrapolate(rows, cfg)
                    results.append(
                        {"format": fmt, "framework": framework, "mode": mode, "file": size, **full}
                    )
                    print(json.dumps(results[-1]), flush=True)
            for path in files.values():
                path.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base_bytes = {
        r["framework"]: r["bytes"]
        for r in results
        if (r["format"], r["mode"]) == ("bf16", "dequant")
    }
    read_s = next((r["seconds"] for r in results if r["mode"] == "read"), None)
    print(f"\n{args.model}, extrapolated from V0 / V1 / V2 (see the docstring); GB = 1e9 bytes\n")
    print(
        "| format | framework | mode | file GB | model arrays GB | vs bf16 | RSS growth GB | load s | vs read |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        vs = (
            r["bytes"] / base_bytes[r["framework"]]
            if r["framework"] in base_bytes
            else float("nan")
        )
        t = r["seconds"] / read_s if read_s else float("nan")
        print(
            f"| {r['format']} | {r['framework']} | {r['mode']} | {r['file'] / GB:.2f} | {r['bytes'] / GB:.2f} | "
            f"{vs:.2f} | {r['rss'] / GB:.2f} | {r['seconds']:.1f} | {t:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
