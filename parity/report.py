"""Report a parity run: a coloured terminal table, a JSON file with every figure, a plot of error vs depth."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def environment(device: str) -> dict:
    """Versions and, on CUDA, the GPU and driver: recorded with every report."""
    import flax
    import jax
    import numpy
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "jax": jax.__version__, "flax": flax.__version__, "numpy": numpy.__version__, "device": device,
           "jax_backend": jax.default_backend()}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["driver"] = os.popen("nvidia-smi --query-gpu=driver_version --format=csv,noheader").read().strip()
        env["jax_devices"] = [str(d) for d in jax.devices()]
    return env


def print_run(run: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    status = "[green]PASS[/green]" if run["passed"] else "[bold red]FAIL[/bold red]"
    table = Table(title=f"{run['model']}  {run['dtype']}  {run['device']}  {status}  ({run['source']})",
                  title_justify="left")
    for col in ("block", "mode", "rel L2", "bound", "max abs", "max rel", "cosine", "worst index", ""):
        table.add_column(col, justify="left" if col in ("block", "mode", "worst index") else "right")
    for r in run["rows"]:
        ok = "[green]ok[/green]" if r["passed"] else "[bold red]FAIL[/bold red]"
        if not r["finite"]:
            ok = "[bold red]NaN/Inf[/bold red]"
        table.add_row(r["name"], r["mode"], f"{r['rel_l2']:.2e}", f"{r['bound']:.0e}", f"{r['max_abs']:.2e}",
                      f"{r['max_rel']:.2e}", f"{r['cosine']:.8f}", str(tuple(r["worst_index"])), ok)
    console.print(table)
    mem = run.get("memory", {})
    if mem:
        console.print("  memory: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in mem.items() if v))
    worst = {m: max((r for r in run["rows"] if r["mode"] == m), key=lambda r: r["rel_l2"] / r["bound"], default=None)
             for m in ("teacher", "free", "trajectory")}
    for mode, r in worst.items():
        if r:
            console.print(f"  worst {mode}: {r['name']} rel L2 {r['rel_l2']:.2e} "
                          f"({r['rel_l2'] / r['bound']:.1%} of the bound {r['bound']:.0e})")


def write_json(report: dict, path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def plot(report: dict, path) -> None:
    """Relative L2 error against depth: one panel per model, teacher and free, one line per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for run in (r for r in runs if r["model"] == model):
            for mode, style in (("teacher", "o-"), ("free", "s--"), ("trajectory", "^:")):
                rows = [r for r in run["rows"] if r["mode"] == mode]
                if rows:
                    ax.semilogy([r["depth"] for r in rows], [max(r["rel_l2"], 1e-12) for r in rows], style,
                                ms=3, label=f"{run['dtype']} {mode}")
            for scope_bound in sorted({r["bound"] for r in run["rows"]}):
                ax.axhline(scope_bound, color="grey", lw=0.6, ls=":")
        ax.set_title(model)
        ax.set_xlabel("depth (stage)")
        ax.set_ylabel("relative L2, JAX vs PyTorch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
