"""Report a parity run: a coloured terminal table, a JSON file with every figure, a plot of error vs depth."""

from __future__ import annotations

import json
import os
import platform


def environment(device: str) -> dict:
    """Versions and, on CUDA, the GPU and driver: recorded with every report."""
    import flax
    import jax
    import numpy
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": numpy.__version__,
        "device": device,
        "jax_backend": jax.default_backend(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["driver"] = (
            os.popen("nvidia-smi --query-gpu=driver_version --format=csv,noheader").read().strip()
        )
        env["jax_devices"] = [str(d) for d in jax.devices()]
    return env


def print_run(run: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    status = "[green]PASS[/green]" if run["passed"] else "[bold red]FAIL[/bold red]"
    table = Table(
        title=f"{run['model']}  {run['dtype']}  {run['device']}  {status}  ({run['source']})",
        title_justify="left",
    )
    for col in (
        "block",
        "mode",
        "rel L2",
        "bound",
        "max abs",
        "max rel",
        "cosine",
        "worst index",
        "",
    ):
        table.add_column(
            col, justify="left" if col in ("block", "mode", "worst index") else "right"
        )
    for r in run["rows"]:
        ok = "[green]ok[/green]" if r["passed"] else "[bold red]FAIL[/bold red]"
        if not r["finite"]:
            ok = "[bold red]NaN/Inf[/bold red]"
        table.add_row(
            r["name"],
            r["mode"],
            f"{r['rel_l2']:.2e}",
            f"{r['bound']:.0e}",
            f"{r['max_abs']:.2e}",
            f"{r['max_rel']:.2e}",
            f"{r['cosine']:.8f}",
            str(tuple(r["worst_index"])),
            ok,
        )
    console.print(table)
    mem = run.get("memory", {})
    if mem:
        console.print(
            "  memory: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in mem.items() if v)
        )
    # a NaN ratio never compares greater: non-finite rows rank first, as the worst
    worst = {
        m: max(
            (r for r in run["rows"] if r["mode"] == m),
            default=None,
            key=lambda r: r["rel_l2"] / r["bound"] if r["rel_l2"] == r["rel_l2"] else float("inf"),
        )
        for m in ("teacher", "free", "trajectory")
    }
    for mode, r in worst.items():
        if r:
            console.print(
                f"  worst {mode}: {r['name']} rel L2 {r['rel_l2']:.2e} "
                f"({r['rel_l2'] / r['bound']:.1%} of the bound {r['bound']:.0e})"
            )


def write_json(report: dict, path) -> None:
    """The report as JSON, atomically (`minflux.files.write_text`): OutputError naming the path on failure."""
    from minflux import files

    files.write_text(path, json.dumps(report, indent=1))


def plot(report: dict, path) -> None:
    """Relative L2 error against depth: one panel per model; teacher and free, one colour per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    cols = min(3, len(models))
    rows_ = -(-len(models) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.2 * cols, 3.8 * rows_), squeeze=False)
    colours = {"fp32": "tab:blue", "bf16": "tab:red"}
    for ax, model in zip(axes.flat, models, strict=False):
        for run in (r for r in runs if r["model"] == model):
            for mode, style in (("teacher", "o-"), ("free", "s--"), ("trajectory", "^:")):
                worst: dict[
                    int, float
                ] = {}  # the worst row at each depth (the embedders share depth 0)
                for r in run["rows"]:
                    if r["mode"] == mode and r["finite"]:
                        worst[r["depth"]] = max(worst.get(r["depth"], 0.0), r["rel_l2"])
                if worst:
                    d = sorted(worst)
                    ax.semilogy(
                        d,
                        [max(worst[i], 1e-10) for i in d],
                        style,
                        ms=3,
                        color=colours.get(run["dtype"]),
                        label=f"{run['dtype']} {mode}",
                    )
            for b in sorted({r["bound"] for r in run["rows"]}):
                ax.axhline(b, color=colours.get(run["dtype"]), lw=0.6, ls=":")
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("depth (stage)")
        ax.set_ylabel("rel. L2, JAX vs PyTorch")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(models) :]:
        ax.axis("off")
    fig.suptitle("minflux parity (dotted: bounds)", fontsize=11)
    fig.tight_layout()
    from minflux import files

    try:
        files.write_figure(fig, path, dpi=110)  # atomic: rendered in memory first
    finally:
        plt.close(fig)
