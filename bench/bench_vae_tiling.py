"""Peak memory of tiled vs one-pass VAE encode/decode, full-size config, random weights, CPU, fp32.

Each measurement runs in its own subprocess, so peak RSS (`ru_maxrss`) belongs to that one
operation; the report gives the peak and the growth over the process after the model and the
input exist. (tracemalloc sees only Python's allocator, not torch's or XLA's buffers, so RSS is
the measure.) `--analysis` adds XLA's own buffer plan for the JAX programs (compile only, no run):
the one-pass 2048 px program needs a 65536^2 attention matrix (16 GiB) that tiling never builds.

    python bench/bench_vae_tiling.py                                   # everything (slow on CPU)
    python bench/bench_vae_tiling.py --framework torch --size 1024 --op decode
    python bench/bench_vae_tiling.py --framework jax --analysis-only   # XLA buffer plans, no runs
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time

MiB = 1 << 20


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB  # Linux reports KiB


def child(
    framework: str, size: int, op: str, mode: str, family: str, tile: int, overlap: int
) -> dict:
    import numpy as np

    from minflux import configs

    cfg = configs.get(family)
    f = 2 ** (len(cfg.ch_mult) - 1)
    rng = np.random.default_rng(0)
    if framework == "torch":
        import torch

        import minflux_torch as mt

        torch.set_grad_enabled(False)
        model = mt.build_model(cfg)
        x = torch.from_numpy(rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32))
        if op == "decode":
            x = torch.from_numpy(
                rng.standard_normal((1, cfg.z_channels, size // f, size // f)).astype(np.float32)
            )
            x = model.normalize(x)
        run = {
            ("encode", "untiled"): model.encode,
            ("decode", "untiled"): model.decode,
            ("encode", "tiled"): lambda x: model.tiled_encode(x, tile, overlap),
            ("decode", "tiled"): lambda x: model.tiled_decode(x, tile, overlap),
        }[op, mode]
        done = lambda y: y  # noqa: E731
    else:
        import jax.numpy as jnp
        from flax import nnx

        from minflux_jax.autoencoder import AutoEncoder
        from minflux_jax.load import assign, torch_shapes

        model = nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0)))
        assign(
            model,
            {
                k: (rng.standard_normal(s) * 0.02).astype(np.float32)
                for k, s in torch_shapes(model).items()
            },
        )
        x = jnp.asarray(rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32))
        if op == "decode":
            x = model.normalize(
                jnp.asarray(
                    rng.standard_normal((1, size // f, size // f, cfg.z_channels)), jnp.float32
                )
            )
        encode, decode = nnx.jit(lambda m, x: m.encode(x)), nnx.jit(lambda m, z: m.decode(z))
        run = {
            ("encode", "untiled"): lambda x: encode(model, x),
            ("decode", "untiled"): lambda x: decode(model, x),
            ("encode", "tiled"): lambda x: model.tiled_encode(x, tile, overlap),
            ("decode", "tiled"): lambda x: model.tiled_decode(x, tile, overlap),
        }[op, mode]
        done = lambda y: y.block_until_ready()  # noqa: E731
    base = peak_rss()
    t0 = time.perf_counter()
    out = done(run(x))
    seconds = time.perf_counter() - t0
    peak = peak_rss()
    return {
        "framework": framework,
        "size": size,
        "op": op,
        "mode": mode,
        "peak_rss_mib": round(peak),
        "growth_mib": round(peak - base),
        "seconds": round(seconds, 1),
        "out_shape": list(out.shape),
    }


def xla_plan(size: int, op: str, mode: str, family: str, tile: int) -> dict:
    """XLA's buffer plan of the JAX program (one pass, or one tile), from shapes alone."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minflux import configs
    from minflux_jax.autoencoder import AutoEncoder

    cfg = configs.get(family)
    f = 2 ** (len(cfg.ch_mult) - 1)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0))))
    n = size if mode == "untiled" else min(tile * f, size)  # image pixels the program sees
    if op == "encode":
        x = jax.ShapeDtypeStruct((1, n, n, 3), jnp.float32)
        fn = lambda s, x: nnx.merge(graphdef, s).encode_mean(x)  # noqa: E731
    else:
        x = jax.ShapeDtypeStruct((1, n // f, n // f, cfg.z_channels), jnp.float32)
        fn = lambda s, z: nnx.merge(graphdef, s).decoder(z)  # noqa: E731
    mem = jax.jit(fn).lower(state, x).compile().memory_analysis()
    return {
        "framework": "jax (XLA plan)",
        "size": size,
        "op": op,
        "mode": mode,
        "temp_mib": round(mem.temp_size_in_bytes / MiB),
        "args_mib": round(mem.argument_size_in_bytes / MiB),
        "out_mib": round(mem.output_size_in_bytes / MiB),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--framework", nargs="+", default=["torch", "jax"], choices=["torch", "jax"])
    p.add_argument("--size", nargs="+", type=int, default=[1024, 2048])
    p.add_argument("--op", nargs="+", default=["encode", "decode"], choices=["encode", "decode"])
    p.add_argument("--mode", nargs="+", default=["tiled", "untiled"], choices=["tiled", "untiled"])
    p.add_argument(
        "--family", default="flux1-ae", help="flux1-ae or flux2-ae (same encoder/decoder sizes)"
    )
    p.add_argument("--tile", type=int, default=64, help="latent pixels per tile side")
    p.add_argument("--overlap", type=int, default=16)
    p.add_argument(
        "--analysis-only", action="store_true", help="only XLA's buffer plans (JAX), no runs"
    )
    p.add_argument(
        "--child", nargs=4, metavar=("FRAMEWORK", "SIZE", "OP", "MODE"), help=argparse.SUPPRESS
    )
    a = p.parse_args()
    if a.child:
        fw, size, op, mode = a.child
        print(json.dumps(child(fw, int(size), op, mode, a.family, a.tile, a.overlap)), flush=True)
        return
    if a.child is None and "jax" in a.framework:
        for size, op, mode in itertools.product(a.size, a.op, a.mode):
            print(json.dumps(xla_plan(size, op, mode, a.family, a.tile)), flush=True)
    if a.analysis_only:
        return
    for fw, size, op, mode in itertools.product(a.framework, a.size, a.op, a.mode):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            fw,
            str(size),
            op,
            mode,
            "--family",
            a.family,
            "--tile",
            str(a.tile),
            "--overlap",
            str(a.overlap),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = (
            r.stdout.strip().splitlines()[-1]
            if r.returncode == 0 and r.stdout.strip()
            else json.dumps(
                {
                    "framework": fw,
                    "size": size,
                    "op": op,
                    "mode": mode,
                    "error": f"exit {r.returncode}",
                    "stderr": r.stderr.strip().splitlines()[-1:] if r.stderr else [],
                }
            )
        )
        print(line, flush=True)


if __name__ == "__main__":
    main()
