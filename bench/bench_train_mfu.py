"""Training-step time and MFU of a full-size FLUX transformer, JAX and PyTorch, on one GPU.

Each framework runs in its own subprocess (so neither holds memory the other needs), one after the
other, on the same config, token counts, precision and remat setting: random init, the full step of
`minflux_jax.train.train_step` / `minflux_torch.train.train_step` (flow-matching loss, backward,
global-norm clipping, AdamW). The first steps (JAX: the compile) are excluded; the figure is the median
of the timed steps. MFU = model FLOPs of a step (`minflux.flops.train_step_flops`: 3 forwards, remat
recomputation not counted) / step time / the GPU's dense bf16 peak.

    python bench/bench_train_mfu.py                                     # flux2-klein-4b, 1024 px, bf16, remat
    python bench/bench_train_mfu.py --jax-attention xla,cudnn --json docs/train-mfu.json
    python bench/bench_train_mfu.py --model flux2-tiny --resolution 128 --txt-len 16   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def worker(args) -> dict:
    """One framework's measurement in this process; returns the figures."""
    from minflux import configs, data

    cfg = configs.get(args.model)
    side = (
        args.resolution // 16
    )  # 8x autoencoder, then 2x2 patches: 16 px per token in both families
    b = args.batch
    batch = data.random_batch(cfg, b, side, args.txt_len, np.random.default_rng(0))
    times: list[float] = []
    fw = args.worker
    t_start = time.perf_counter()

    if fw == "torch":
        import torch

        import minflux_torch as mt
        from minflux_torch import train as ttrain

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
        model = mt.build_model(cfg, seed=0, dtype=dtype, device=device).train()
        opt, sched = ttrain.make_optimizer(model, lr=1e-5, warmup=0, steps=1000)
        tb = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
        noise = torch.randn(tb["img"].shape, device=device)
        t = torch.rand(b, device=device)
        setup_s = time.perf_counter() - t_start
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            loss = float(
                ttrain.train_step(model, opt, sched, tb, noise, t, remat=args.remat)["loss"]
            )  # syncs
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        peak_mem = torch.cuda.max_memory_allocated() if device == "cuda" else None
        version = torch.__version__
        first_s = None
    else:
        from functools import partial

        import jax
        import jax.numpy as jnp

        import minflux_jax as mj
        from minflux_jax import layers
        from minflux_jax import train as jtrain

        dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[args.precision]
        model = layers.set_attention_implementation(
            mj.build_model(cfg, seed=0, dtype=dtype), args.jax_attention
        )
        graphdef, params, paths = jtrain.split_params(model)
        tx = jtrain.make_optimizer(lr=1e-5, warmup=0, steps=1000)
        state = {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.asarray(0, jnp.int32),
            "key": jax.random.key_data(jax.random.key(0)),
        }
        jb = {k: jnp.asarray(v) for k, v in batch.items()}
        step = jax.jit(
            partial(
                jtrain.train_step,
                graphdef=graphdef,
                paths=paths,
                tx=tx,
                family=cfg.family,
                timesteps={"kind": "logit_normal"},
                compute_dtype=dtype,
                remat=args.remat,
            ),
            donate_argnums=0,
        )
        jax.block_until_ready(state)
        setup_s = time.perf_counter() - t_start
        t0 = time.perf_counter()
        compiled = step.lower(state, {}, jb).compile()
        first_s = time.perf_counter() - t0  # the compile
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, {}, jb)
            loss = float(metrics["loss"])  # syncs
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        dev = jax.devices()[0]
        device_name = (
            getattr(dev, "device_kind", str(dev)) if dev.platform == "gpu" else dev.platform
        )
        peak_mem = (
            (dev.memory_stats() or {}).get("peak_bytes_in_use") if dev.platform == "gpu" else None
        )
        version = jax.__version__

    if not np.isfinite(loss):
        raise SystemExit(f"{fw}: the loss is {loss}: the measurement is void")
    return {
        "version": version,
        "device": device_name,
        "median_s": float(np.median(times)),
        "min_s": float(min(times)),
        "setup_s": setup_s,
        "compile_s": first_s,
        "peak_bytes": peak_mem,
        "loss": loss,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux2-klein-4b")
    p.add_argument(
        "--resolution", type=int, default=1024, help="image side in pixels (16 px per latent token)"
    )
    p.add_argument("--txt-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--precision",
        default="bf16",
        choices=["bf16", "fp32"],
        help="weights, optimiser and compute",
    )
    p.add_argument(
        "--remat",
        default="full",
        choices=["none", "full", "dots", "dots_no_batch"],
        help="per-block remat policy (PyTorch recomputes whole blocks for every setting but none)",
    )
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--frameworks", default="torch,jax")
    p.add_argument("--jax-attention", default="xla", help="comma list of xla, cudnn")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak (default: from the GPU name)",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per framework")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    from minflux import configs, flops

    cfg = configs.get(args.model)
    img_tokens = (args.resolution // 16) ** 2
    step_flops = flops.train_step_flops(cfg, img_tokens, args.txt_len, args.batch)
    runs = [("torch", None)] if "torch" in args.frameworks.split(",") else []
    if "jax" in args.frameworks.split(","):
        runs += [("jax", a) for a in args.jax_attention.split(",")]
    results = []
    for fw, attn in runs:
        name = f"jax ({attn} attention)" if attn else fw
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            fw,
            "--model",
            args.model,
            "--resolution",
            str(args.resolution),
            "--txt-len",
            str(args.txt_len),
            "--batch",
            str(args.batch),
            "--precision",
            args.precision,
            "--remat",
            args.remat,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        cmd += ["--jax-attention", attn] if attn else []
        print(f"running {name} ...", flush=True)
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results.append({"name": name, "error": f"timed out after {args.timeout} s"})
            continue
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            errors = [ln for ln in out.stderr.splitlines() if "Error" in ln or "error" in ln] or [
                ""
            ]
            results.append({"name": name, "error": errors[-1], "stderr": out.stderr[-4000:]})
            print(out.stderr[-2000:], file=sys.stderr)
            continue
        results.append({"name": name, **json.loads(line[0][len("RESULT ") :])})

    gpu = next((r["device"] for r in results if r.get("device") not in (None, "cpu")), None)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (flops.bf16_peak(gpu) if gpu else None)
    print(
        f"{args.model}: {args.resolution} px ({img_tokens} image + {args.txt_len} text tokens), batch {args.batch}, "
        f"{args.precision}, remat {args.remat}; {step_flops / 1e12:.1f} TFLOP per step (model FLOPs); "
        f"device {gpu or 'cpu'}, bf16 peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s"
    )
    print(
        "| framework | median step (s) | min (s) | TFLOP/s | MFU | peak memory (GiB) | compile (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error']} ||||||")
            continue
        r["tflops"] = step_flops / r["median_s"] / 1e12
        r["mfu"] = step_flops / r["median_s"] / peak if peak else None
        mem = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] else "-"
        comp = f"{r['compile_s']:.0f}" if r["compile_s"] else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        print(
            f"| {r['name']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['tflops']:.0f} | {mfu} | {mem} | "
            f"{comp} |"
        )
    ok = {r["name"]: r for r in results if "error" not in r}
    for name, r in ok.items():
        if "torch" in ok and name != "torch":
            print(
                f"{name} / PyTorch step time: {r['median_s'] / ok['torch']['median_s']:.2f} (below 1: JAX faster)"
            )
    if args.json:
        from parity.report import write_json  # atomic

        write_json(
            {
                "args": vars(args),
                "step_flops": step_flops,
                "peak_flops": peak,
                "results": results,
                "host_cpus": os.cpu_count(),
            },
            args.json,
        )
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
