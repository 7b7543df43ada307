"""The same picture in both frameworks: `minflux generate` from the same files and seed in PyTorch and JAX,
and the pixel difference between the two PNGs (mean and max over uint8 pixels), in fp32 and bf16.

    python bench/bench_generate_frameworks.py [--size 64] [--steps 8]

The files are tiny seeded checkpoints in BFL layout and random prompt embeddings (no downloads); the noise is
drawn once in numpy from the seed, so any difference is the frameworks' arithmetic.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

import minflux_torch as mt
from minflux import configs
from minflux_cli.main import main


def run(size: int, steps: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model in ("flux1-tiny", "flux2-tiny"):
            cfg, ae = configs.get(model), model.replace("-tiny", "-ae-tiny")
            for name in (model, ae):
                mt.save_model(mt.build_model(name, seed=1), tmp / f"{name}.safetensors")
            rng = np.random.default_rng(0)
            emb = {"txt": rng.standard_normal((1, 16, cfg.context_in_dim), np.float32)}
            if cfg.family == "flux1":
                emb["vec"] = rng.standard_normal((1, cfg.vec_in_dim), np.float32)
            save_file(emb, tmp / "emb.safetensors")
            for dtype in ("fp32", "bf16"):
                png = {}
                for fw in ("torch", "jax"):
                    png[fw] = tmp / f"{model}-{dtype}-{fw}.png"
                    assert (
                        main(
                            [
                                "generate",
                                "--model",
                                model,
                                "--transformer",
                                str(tmp / f"{model}.safetensors"),
                                "--ae",
                                str(tmp / f"{ae}.safetensors"),
                                "--embeddings",
                                str(tmp / "emb.safetensors"),
                                "--framework",
                                fw,
                                "--dtype",
                                dtype,
                                "--steps",
                                str(steps),
                                "--width",
                                str(size),
                                "--height",
                                str(size),
                                "--seed",
                                "7",
                                "--no-progress",
                                "--out",
                                str(png[fw]),
                            ]
                        )
                        == 0
                    )
                a, b = (np.asarray(Image.open(png[fw]), np.int16) for fw in ("torch", "jax"))
                d = np.abs(a - b)
                rows.append(
                    {
                        "model": model,
                        "dtype": dtype,
                        "mean": float(d.mean()),
                        "max": int(d.max()),
                        "equal": float((d == 0).mean()),
                    }
                )
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    rows = run(args.size, args.steps)
    print(
        "\n| model | dtype | mean abs pixel difference (of 255) | max | pixels equal |\n|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['model']} | {r['dtype']} | {r['mean']:.3f} | {r['max']} | {100 * r['equal']:.1f}% |"
        )
