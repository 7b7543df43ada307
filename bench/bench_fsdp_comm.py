"""What one FSDP training step communicates: the collectives XLA's SPMD partitioner puts in the step.

Builds the trainer on N simulated CPU devices, compiles one step, and reads the program right after SPMD
partitioning (dumped by XLA), where collectives still carry the dtypes the partitioner chose (the CPU
backend later widens bf16 collectives to f32). `--no-gather` shows the step without `trainer.fsdp_gather`.

    python bench/bench_fsdp_comm.py                          # mesh 1 x 8, bf16-mixed, remat full
    python bench/bench_fsdp_comm.py --mesh 2 4 --precision fp32 --remat none --no-gather
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """{kind: (ops, bytes of their results)} over an HLO module's text."""
    ops, size = collections.Counter(), collections.Counter()
    pattern = re.compile(rf"= (\(.*?\)|\w+\[[\d,]*\])\S* ({'|'.join(KINDS)})(?:-start)?\(")
    for result, kind in pattern.findall(hlo):
        ops[kind] += 1
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result):
            size[kind] += int(np.prod([int(d) for d in dims.split(",") if d])) * BYTES.get(dtype, 4)
    return {k: (ops[k], size[k]) for k in KINDS if ops[k]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--mesh", type=int, nargs=2, default=(1, 8), metavar=("DATA", "FSDP"))
    p.add_argument("--precision", default="bf16-mixed", choices=["fp32", "bf16-mixed", "bf16"])
    p.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument(
        "--batch", type=int, default=16, help="global batch (36 tokens of image + 2 of text each)"
    )
    p.add_argument("--no-gather", action="store_true", help="leave the weights' placement to XLA")
    args = p.parse_args()

    dump = tempfile.mkdtemp(prefix="minflux-hlo-")
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={args.devices} --xla_dump_to={dump} "
        "--xla_dump_hlo_pass_re=spmd-partitioning"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"
    import dataclasses

    import jax

    from minflux import data
    from minflux_jax import trainer as tr

    if args.no_gather:
        tr.fsdp_gather = lambda mesh: None
    cfg = dataclasses.replace(
        data.DEMO, hidden_size=args.hidden, num_heads=args.hidden // 32, axes_dim=(8, 8, 8, 8)
    )
    ds = data.Shapes(n=64, context_dim=cfg.context_in_dim)
    t = tr.Trainer(
        cfg,
        ds,
        tr.TrainOptions(
            batch_size=args.batch, mesh=tuple(args.mesh), precision=args.precision, remat=args.remat
        ),
    )
    t._step.lower(t.state, t.frozen, t.batch(0)).compile()
    files = sorted(Path(dump).glob("*jit_train_step*after_spmd-partitioning*"))
    if not files:
        sys.exit(f"no partitioned train_step module in {dump}")
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(t.state["params"]))
    found = collectives(files[-1].read_text())
    print(
        f"mesh {tuple(args.mesh)}, {args.precision}, remat {args.remat}, fsdp_gather "
        f"{'off' if args.no_gather else 'on'}: {n_params / 1e6:.2f} M parameters "
        f"({4 * n_params / 2**20:.1f} MiB fp32)"
    )
    print("| collective | ops | MiB (results, per device) |")
    print("|---|---|---|")
    for kind, (n, b) in found.items():
        print(f"| {kind} | {n} | {b / 2**20:.1f} |")


if __name__ == "__main__":
    main()
