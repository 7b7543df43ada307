"""`minflux train`'s memory estimate (`minflux.memory.train_bytes`) against a measured peak, on this machine's CPU.

    python bench/bench_train_memory.py                      # the demo at batch 512 and 2048, remat none and full
    python bench/bench_train_memory.py --batch 256 1024 --remat none

Each (batch, remat) runs in a fresh process: a `Trainer` on the demo's shapes (`data.DEMO`, `data.Shapes`), two
steps, and the growth of its peak resident memory (`ru_maxrss`) from before the trainer was built. The figure to
read is the growth per sample between two batch sizes (what the estimate's activation term predicts; the
runtime's own memory cancels), against the estimate's. A GPU figure is in docs/training.md (flux2-klein-4b on an
H200, from docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

RUN = """
import json, resource, sys
from minflux import data, memory
from minflux_jax import trainer as tr
batch, remat = int(sys.argv[1]), sys.argv[2]
cfg = data.DEMO
ds = data.Shapes(n=max(batch, 64), context_dim=cfg.context_in_dim)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = tr.Trainer(cfg, ds, tr.TrainOptions(steps=2, batch_size=batch, remat=remat, prefetch=0))
t.fit(steps=2, progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
img, txt = ds.arrays["img"].shape[1], ds.arrays["txt"].shape[1]
estimate = memory.train_bytes(cfg, img, txt, batch, remat=remat != "none", dtype_bytes=4, attention_matrix=True)
print(json.dumps({"batch": batch, "remat": remat, "growth": peak - before, "estimate": estimate}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs=2, default=[512, 2048])
    p.add_argument("--remat", nargs="+", default=["none", "full"])
    args = p.parse_args()
    for remat in args.remat:
        runs = []
        for batch in args.batch:
            out = subprocess.run(
                [sys.executable, "-c", RUN, str(batch), remat],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        (a, b), n = runs, args.batch[1] - args.batch[0]
        measured, estimated = (b["growth"] - a["growth"]) / n, (b["estimate"] - a["estimate"]) / n
        print(
            f"remat {remat}: per sample {measured / 1e6:.2f} MB measured, {estimated / 1e6:.2f} MB estimated "
            f"(measured / estimated {measured / estimated:.2f}); at batch {b['batch']}: peak growth "
            f"{b['growth'] / 1e9:.2f} GB, estimate {b['estimate'] / 1e9:.2f} GB"
        )


if __name__ == "__main__":
    main()
