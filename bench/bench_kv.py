"""Benchmark FLUX.2 klein KV: the cached loop (references' keys and values computed at the first step only)
against the same masked model recomputing the references at every step, at 1, 2 and 4 reference images.

Random weights (seeded numpy, the same in both frameworks); the figures are wall-clock seconds per generation
(median of --repeats, after one warm-up run that also compiles the JAX loop) and the speed-up uncached / cached.
The default shape is small enough for a CPU; pass --preset flux2-klein-9b-kv on a GPU for the real one.

    python bench/bench_kv.py                                   # CPU-sized klein, 256 px, refs 256 px, 4 steps
    python bench/bench_kv.py --preset flux2-klein-9b-kv --side 1024 --ref-side 1024 --txt 512 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np

from minflux import configs

SMALL = configs.Flux2Config(
    context_in_dim=64,
    hidden_size=256,
    num_heads=2,
    depth=2,
    depth_single_blocks=4,
    guidance_embed=False,
    ref_kv=True,
)


def run_torch(cfg, args, n_refs: int) -> dict[bool, float]:
    import torch

    import minflux_torch as mt
    from minflux_torch import sampling

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = mt.build_model(cfg, seed=0, dtype=dtype).to(args.device)
    rng = np.random.default_rng(0)
    tok, ref_tok = args.side // 16, args.ref_side // 16
    noise = torch.from_numpy(rng.standard_normal((1, 128, tok, tok), np.float32)).to(args.device)
    refs = [
        torch.from_numpy(rng.standard_normal((1, 128, ref_tok, ref_tok), np.float32)).to(
            args.device
        )
        for _ in range(n_refs)
    ]
    txt = torch.from_numpy(rng.standard_normal((1, args.txt, cfg.context_in_dim), np.float32)).to(
        args.device
    )
    out = {}
    for cached in (True, False):
        times = []
        for _ in range(args.repeats + 1):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            sampling.sample_kv(model, noise, txt, refs, steps=args.steps, cached=cached)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[cached] = statistics.median(times[1:])
    return out


def run_jax(cfg, args, n_refs: int) -> dict[bool, float]:
    import jax.numpy as jnp

    import minflux_jax as mj
    from minflux_jax import sampling

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
    model = mj.build_model(cfg, seed=0, dtype=dtype)
    rng = np.random.default_rng(0)
    tok, ref_tok = args.side // 16, args.ref_side // 16
    noise = jnp.asarray(rng.standard_normal((1, tok, tok, 128), np.float32))
    refs = [
        jnp.asarray(rng.standard_normal((1, ref_tok, ref_tok, 128), np.float32))
        for _ in range(n_refs)
    ]
    txt = jnp.asarray(rng.standard_normal((1, args.txt, cfg.context_in_dim), np.float32))
    out = {}
    for cached in (True, False):
        times = []
        for _ in range(args.repeats + 1):  # the first run compiles
            t0 = time.perf_counter()
            sampling.sample_kv(
                model, noise, txt, refs, steps=args.steps, cached=cached
            ).block_until_ready()
            times.append(time.perf_counter() - t0)
        out[cached] = statistics.median(times[1:])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset", help="a klein KV preset (default: a CPU-sized klein, hidden 256, 2 + 4 blocks)"
    )
    p.add_argument("--side", type=int, default=256, help="generated image side, pixels")
    p.add_argument("--ref-side", type=int, default=256, help="each reference's side, pixels")
    p.add_argument("--txt", type=int, default=64, help="text tokens")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--refs", default="1,2,4", help="reference counts to measure")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cpu", help="PyTorch device")
    p.add_argument("--frameworks", default="torch,jax")
    args = p.parse_args()
    cfg = dataclasses.replace(configs.get(args.preset), ref_kv=True) if args.preset else SMALL
    print(
        f"klein KV, {args.side} px image ({(args.side // 16) ** 2} tokens), references {args.ref_side} px "
        f"({(args.ref_side // 16) ** 2} tokens each), {args.txt} text tokens, {args.steps} steps, {args.dtype}, "
        f"hidden {cfg.hidden_size}, {cfg.depth} + {cfg.depth_single_blocks} blocks\n"
    )
    print("| framework | refs | cached s | recomputed s | speed-up |\n|---|---|---|---|---|")
    for fw in args.frameworks.split(","):
        for n in map(int, args.refs.split(",")):
            t = (run_torch if fw == "torch" else run_jax)(cfg, args, n)
            print(
                f"| {fw} | {n} | {t[True]:.3f} | {t[False]:.3f} | {t[False] / t[True]:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
