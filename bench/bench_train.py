"""Benchmark one training step, JAX against PyTorch, on small FLUX configs on CPU (fp32).

Both frameworks run the same full step on the same weights, batch, noise and times: the flow-matching
loss, its backward pass, global-norm clipping and an AdamW update (`minflux_jax.train.train_step`, jitted,
compile time excluded; `minflux_torch.train.train_step`, eager). Steps alternate between the two, so a
change in machine load hits both; the figure is the ratio of the medians.

    python bench/bench_train.py                     # flux2 blocks at width 256, 256 image tokens, batch 4
    python bench/bench_train.py --hidden 128 --tokens 64 --repeats 20
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from functools import partial

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="flux2", choices=["flux1", "flux2"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--single", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256, help="image tokens (a square grid)")
    p.add_argument("--txt", type=int, default=32, help="text tokens")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    import minflux_jax as mj
    import minflux_torch as mt
    from minflux import configs, data
    from minflux_jax import train as jtrain
    from minflux_jax.load import assign
    from minflux_torch import train as ttrain
    from minflux_torch.load import to_numpy

    base = configs.get(f"{args.family}-tiny")
    heads = args.hidden // 32
    axes = (8, 12, 12) if args.family == "flux1" else (8, 8, 8, 8)
    cfg = dataclasses.replace(
        base,
        hidden_size=args.hidden,
        num_heads=heads,
        axes_dim=axes,
        depth=args.depth,
        depth_single_blocks=args.single,
    )
    side = int(args.tokens**0.5)
    rng = np.random.default_rng(0)
    b = args.batch
    batch = data.random_batch(cfg, b, side, args.txt, rng)
    noise = rng.standard_normal(batch["img"].shape).astype(np.float32)
    t = rng.uniform(0.05, 0.95, b).astype(np.float32)

    tm = mt.build_model(cfg, seed=0).train()
    jm = mj.build_model(cfg, seed=0)
    assign(jm, {k: to_numpy(v).copy() for k, v in tm.state_dict().items()})
    n_params = sum(p.numel() for p in tm.parameters())

    opt, sched = ttrain.make_optimizer(tm, lr=1e-4, warmup=0, steps=1000)
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}
    tn, tt = torch.from_numpy(noise), torch.from_numpy(t)

    graphdef, params, paths = jtrain.split_params(jm)
    tx = jtrain.make_optimizer(lr=1e-4, warmup=0, steps=1000)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    jn, jt = jnp.asarray(noise), jnp.asarray(t)

    @partial(jax.jit, donate_argnums=(0, 1))
    def jax_step(
        params, opt_state
    ):  # train_step's body on given noise and times (it draws its own)
        loss, grads = jax.value_and_grad(jtrain.loss_fn)(params, {}, graphdef, paths, jb, jn, jt)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), opt_state, loss

    state = [params, tx.init(params)]

    def run_jax():
        state[0], state[1], loss = jax_step(*state)
        return float(loss)

    def run_torch():
        return float(ttrain.train_step(tm, opt, sched, tb, tn, tt)["loss"])

    t0 = time.perf_counter()
    run_jax()
    compile_s = time.perf_counter() - t0
    run_torch()
    times = {"jax": [], "torch": []}
    load0 = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, fn in (("jax", run_jax), ("torch", run_torch)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(
        f"{cfg.family}: hidden {args.hidden}, {args.depth}+{args.single} blocks, {n_params / 1e6:.2f} M params, "
        f"batch {b} x ({side * side} img + {args.txt} txt) tokens, fp32, {torch.get_num_threads()} torch threads"
    )
    print(f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}; JAX compile {compile_s:.1f} s")
    print("| framework | median step (ms) | min (ms) |")
    print("|---|---|---|")
    for k in ("jax", "torch"):
        print(f"| {k} | {1e3 * med[k]:.1f} | {1e3 * min(times[k]):.1f} |")
    print(f"JAX / PyTorch step time: {med['jax'] / med['torch']:.2f} (below 1: JAX faster)")


if __name__ == "__main__":
    main()
