"""Why a bf16 JAX forward holds XLA temporaries twice the size of its weights on a CPU (issue 22), measured.

    python bench/bench_xla_cpu_memory.py                      # mid-size FLUX.1 and FLUX.2, fp32 and bf16
    python bench/bench_xla_cpu_memory.py --preset flux2-klein-4b --full --resolution 1024 --txt-len 512 --dtype bf16

Compiles one transformer forward (abstract weights: nothing is allocated) twice, with XLA's default CPU
scheduler and with `xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED` (a per-program compiler
option), and reports XLA's buffer assignment (`memory_analysis()`), plus what the programs hold: in the
lowered program (ours), the dots' operand dtypes and any weight-sized converts; in the optimised program
(XLA's), the bf16 -> f32 converts of whole weights and where in the entry computation they are scheduled.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minflux import configs, data
from minflux_jax import sampling
from minflux_jax.load import abstract_model

MEMORY_OPTIMIZED = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compile_forward(cfg, dtype, side: int, txt_len: int, options):
    model = abstract_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    batch = data.random_batch(cfg, 1, side, txt_len, np.random.default_rng(0))
    batch["t"] = np.full((1,), 0.5, np.float32)
    x = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}

    def fn(state, x):
        return sampling.predict(
            nnx.merge(graphdef, state),
            x["img"],
            x["img_ids"],
            x["txt"],
            x["txt_ids"],
            x["t"],
            x.get("vec"),
            x.get("guidance"),
        )

    lowered = jax.jit(fn, compiler_options=options).lower(state, x)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    weights = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in jax.tree.leaves(state))
    return lowered, compiled, weights, time.perf_counter() - t0


def weight_converts(hlo: str) -> tuple[int, int]:
    """(bf16 -> f32 converts whose operand is an entry parameter, how many of them come before the first dot
    or custom call of the entry computation)."""
    entry = hlo[hlo.index("\nENTRY ") :]
    lines = entry.splitlines()
    params = {m.group(1) for ln in lines if (m := re.match(r"\s*%(\S+) = bf16\[.*parameter\(", ln))}
    converts, before, seen_compute = 0, 0, False
    for ln in lines:
        m = re.match(r"\s*(?:ROOT )?%\S+ = f32\[[\d,]+\]\S* (\w[\w-]*)\((.*)", ln)
        if not m:
            continue
        op, args = m.groups()
        if op in ("fusion", "convert") and re.fullmatch(
            r"%(\S+?)\)?(,.*)?", args.split(")")[0] + ")"
        ):
            name = args.split(")")[0].lstrip("%").split(",")[0]
            if name in params:
                converts += 1
                before += not seen_compute
                continue
        if op in ("dot", "custom-call") or (op == "fusion" and "dot" in ln):
            seen_compute = True
    return converts, before


def report(name: str, cfg, dtype, side: int, txt_len: int) -> None:
    for label, options in (("default scheduler", None), ("memory-optimised", MEMORY_OPTIMIZED)):
        lowered, compiled, weights, seconds = compile_forward(cfg, dtype, side, txt_len, options)
        m = compiled.memory_analysis()
        mlir = lowered.as_text()
        dots = re.findall(r"stablehlo.dot_general .*?-> tensor<[^>]*x(\w+)>", mlir)
        ours = sorted(set(re.findall(r"\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> ", mlir)))
        converts, before = weight_converts(compiled.as_text())
        print(
            f"{name} {jnp.dtype(dtype).name} {label}: weights {weights / 2**20:.0f} MiB, "
            f"temporaries {m.temp_size_in_bytes / 2**20:.0f} MiB, arguments {m.argument_size_in_bytes / 2**20:.0f} "
            f"MiB; lowered: {len(dots)} dots, operand dtypes {ours[:3]}; optimised: {converts} bf16->f32 weight "
            f"converts, {before} of them before the first matmul (compile {seconds:.0f} s)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset", default=None, help="one preset (default: mid-size FLUX.1 and FLUX.2)"
    )
    p.add_argument(
        "--full", action="store_true", help="the preset as it is, not its mid-size variant"
    )
    p.add_argument("--resolution", type=int, default=512, help="pixels (16 per token)")
    p.add_argument("--txt-len", type=int, default=256)
    p.add_argument("--dtype", default="fp32,bf16")
    args = p.parse_args()
    presets = [args.preset] if args.preset else ["flux1-dev", "flux2-klein-4b"]
    for preset in presets:
        cfg = configs.get(preset)
        if not args.full:  # mid-size: hidden 1024, 2 double + 4 single blocks
            cfg = dataclasses.replace(
                cfg, hidden_size=1024, num_heads=8, depth=2, depth_single_blocks=4
            )
        for d in args.dtype.split(","):
            dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[d]
            report(preset, cfg, dtype, args.resolution // 16, args.txt_len)


if __name__ == "__main__":
    main()
