"""`minflux bench`: the framework comparison, side by side on identical weights and inputs.

For one preset (random weights from `minflux.random`; full size on a GPU, the tiny presets on a CPU) it times,
under every backend asked for (PyTorch eager, PyTorch `torch.compile`, JAX with XLA's attention, JAX with
cuDNN's fused attention on NVIDIA GPUs), the rows of `minflux.bench`: one denoising step, a whole N-step sample
with the decode, a full fine-tuning step, a LoRA step, and optionally an fp8 step. Each backend runs in its own
process, one after the other (neither holds memory the other needs; each JAX process gets its XLA flags before
JAX starts). Per row: median and spread, TFLOP/s and MFU, peak memory, compile time, and JAX / PyTorch.

    minflux bench                                                   # flux2-klein-4b, 1024 px, bf16, on the GPU
    minflux bench --model flux1-dev --kinds forward,fp8 --fp8-parity --json out.json --plot out.png
    minflux bench --model flux2-tiny --resolution 32 --txt-len 8 --backends torch-eager,jax-xla   # a CPU run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from minflux import bench
from minflux_cli.args import (
    UsageError,
    json_file,
    nonneg_int,
    pixels,
    png_file,
    positive_float,
    positive_int,
    preset,
)

REMAT = (
    "none",
    "full",
    "dots",
    "dots_no_batch",
    "attention",
    "attention_dots",
)  # minflux_jax.train.REMAT_POLICIES


def _choices(allowed):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t for t in text.split(",") if t)
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a comma list of {', '.join(allowed)}"
            )
        return items

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=preset, default="flux2-klein-4b", help="a transformer preset")
    p.add_argument("--resolution", type=pixels, default=1024, help="image side in pixels")
    p.add_argument("--txt-len", type=positive_int, default=512, help="text tokens")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument(
        "--steps", type=positive_int, default=4, help="denoising steps of the sample row"
    )
    p.add_argument(
        "--dtype",
        default="bf16",
        choices=["bf16", "fp32"],
        help="weights, compute, optimiser state",
    )
    p.add_argument(
        "--kinds",
        type=_choices(bench.KINDS),
        default=("forward", "sample", "train", "lora"),
        help=f"rows, a comma list of {', '.join(bench.KINDS)} (default: all but fp8)",
    )
    p.add_argument(
        "--backends",
        type=_choices(tuple(bench.BACKENDS)),
        default=tuple(bench.BACKENDS),
        help=f"a comma list of {', '.join(bench.BACKENDS)} (default: all; jax-cudnn only runs on a GPU)",
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls per row")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="untimed calls after the first")
    p.add_argument(
        "--remat",
        default="full",
        choices=REMAT,
        help="training: per-block remat policy (PyTorch: none, or whole blocks for any other)",
    )
    p.add_argument("--lora-rank", type=positive_int, default=16)
    p.add_argument(
        "--opt-state",
        default="param",
        choices=["param", "bf16"],
        help="JAX training: AdamW's first moment in the weights' dtype or in bf16",
    )
    p.add_argument(
        "--fp8",
        default="tensor",
        choices=["tensor", "row"],
        help="fp8 row: scales per tensor or row",
    )
    p.add_argument(
        "--fp8-parity",
        action="store_true",
        help="also compare fp8 against the model dtype block by block, in both frameworks",
    )
    p.add_argument(
        "--xla-flags",
        default="default",
        help="XLA_FLAGS for the JAX processes: 'default' (minflux.bench.XLA_GPU_FLAGS), 'none', or flags",
    )
    p.add_argument(
        "--peak-tflops",
        type=positive_float,
        default=None,
        help="dense peak (default: from the GPU name)",
    )
    p.add_argument("--timeout", type=positive_int, default=900, help="seconds per backend")
    p.add_argument("--json", type=json_file, default=None, help="write the report here")
    p.add_argument(
        "--plot", type=png_file, default=None, help="write a bar chart (PNG) of the step times here"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parity", action="store_true", help=argparse.SUPPRESS)


def plan_of(args) -> bench.Plan:
    return bench.Plan(
        model=args.model,
        resolution=args.resolution,
        txt_len=args.txt_len,
        batch=args.batch,
        steps=args.steps,
        dtype=args.dtype,
        kinds=tuple(args.kinds),
        repeats=args.repeats,
        warmup=args.warmup,
        remat=args.remat,
        lora_rank=args.lora_rank,
        opt_state=args.opt_state,
        fp8=args.fp8,
    )


def check(args) -> None:
    """Usage errors found before any process starts."""
    from minflux import configs

    cfg = configs.get(args.model)
    if not hasattr(cfg, "depth"):
        raise UsageError(f"--model {args.model}: not a transformer preset")
    ppt = bench.Plan(model=args.model).pixels_per_token
    if args.resolution % ppt:
        raise UsageError(
            f"--resolution {args.resolution}: must be a multiple of {ppt} px for {args.model}"
        )
    for path in (args.json, args.plot):
        if path is not None and not path.parent.is_dir():
            raise UsageError(f"{path}: the directory {path.parent} does not exist")
    named = [b for b in args.backends if b in bench.GPU_ONLY]
    if named and tuple(args.backends) != tuple(bench.BACKENDS) and not _jax_gpu():
        raise UsageError(
            f"--backends {','.join(named)} runs on an NVIDIA GPU only, and JAX has none here "
            "(jax-xla runs anywhere)"
        )


def _jax_gpu() -> bool:
    """Whether JAX may find an NVIDIA GPU (from the driver's files: jax is not imported for this)."""
    from minflux import memory

    platforms = os.environ.get("JAX_PLATFORMS", "")
    return memory.nvidia_gpus() > 0 and (not platforms or "cuda" in platforms or "gpu" in platforms)


# ---------------------------------------------------------------------------------------------
# One backend in this process (the worker), every backend in its own process (the command)
# ---------------------------------------------------------------------------------------------


def worker(args) -> dict:
    plan = bench.Plan.from_json(args.plan)
    framework, options = bench.BACKENDS[args.worker]
    if framework == "torch":
        from minflux_torch import bench as runner
    else:
        from minflux_jax import bench as runner
    if args.worker in bench.GPU_ONLY and runner.device() not in ("gpu", "cuda"):
        return {"device": runner.device_name(), "skipped": "needs an NVIDIA GPU"}
    out = runner.run(plan, options, lambda row: print("ROW " + json.dumps(row), flush=True))
    if args.parity:
        model = runner.build(plan.model, plan.seed, runner.DTYPES[plan.dtype])
        out["fp8_parity"] = runner.fp8_parity(model, bench.inputs(plan), plan.fp8)
    return out


def spawn(name: str, plan: bench.Plan, args) -> dict:
    """Run backend `name` in a child process; its report, or {"error": ...}."""
    env = dict(os.environ)
    if bench.BACKENDS[name][0] == "jax" and args.xla_flags != "none":
        flags = bench.XLA_GPU_FLAGS if args.xla_flags == "default" else args.xla_flags
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    framework = bench.BACKENDS[name][
        0
    ]  # the fp8 parity rows: in the first backend of each framework
    parity = args.fp8_parity and name == next(
        b for b in args.backends if bench.BACKENDS[b][0] == framework
    )
    cmd = [sys.executable, "-m", "minflux_cli", "bench", "--worker", name, "--plan", plan.json()]
    cmd += ["--parity"] if parity else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired as e:  # the rows finished before the limit still count
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        done = [
            json.loads(ln[len("ROW ") :]) for ln in stdout.splitlines() if ln.startswith("ROW ")
        ]
        return {"error": f"timed out after {args.timeout} s", "rows": done}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or [
            f"exit {proc.returncode}"
        ]
        return {"error": tail[0], "stderr": proc.stderr[-4000:]}
    return json.loads(lines[-1][len("RESULT ") :])


def run(args) -> int:
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    check(args)
    plan = plan_of(args)
    rows, versions, parity, device = [], {}, {}, "cpu"
    command = "minflux bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    load = (
        os.getloadavg()
    )  # the machine's load before and after: on a shared CPU it explains the spread

    def report() -> dict:
        out = bench.finish(plan, rows, device, args.peak_tflops)
        out.update(
            {
                "versions": versions,
                "command": command,
                "host_cpus": os.cpu_count(),
                "load_average": {"start": load, "end": os.getloadavg()},
            }
        )
        if parity:
            out["fp8_parity"] = parity
        return out

    for name in args.backends:
        framework = bench.BACKENDS[name][0]
        print(f"minflux bench: {name} ...", file=sys.stderr, flush=True)
        out = spawn(name, plan, args)
        if "skipped" in out:
            print(f"minflux bench: {name} skipped: {out['skipped']}", file=sys.stderr)
            continue
        if "error" in out:
            print(f"minflux bench: {name} failed: {out['error']}", file=sys.stderr)
            done = out.get("rows", [])
            rows += [{"backend": name, "framework": framework, **r} for r in done]
            rows += [
                {"backend": name, "framework": framework, "kind": k, "error": out["error"]}
                for k in plan.kinds
                if k not in {r["kind"] for r in done}
            ]
            continue
        device = out["device"] if out["device"] != "cpu" else device
        versions[framework] = out["version"]
        rows += [{"backend": name, "framework": framework, **r} for r in out["rows"]]
        if "fp8_parity" in out:
            parity[framework] = out["fp8_parity"]
        if args.json:  # after every backend: a run cut short by a time limit keeps what it measured
            from parity.report import write_json  # atomic

            write_json(report(), args.json)
    final = report()
    print_table(final)
    if args.json:
        from parity.report import write_json

        write_json(final, args.json)
    if args.plot:
        plot(final, args.plot)
    return 1 if any("error" in r for r in rows) else 0


# ---------------------------------------------------------------------------------------------
# Table and plot
# ---------------------------------------------------------------------------------------------


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    p = report["plan"]
    title = (
        f"{p['model']}: {p['resolution']} px, {p['txt_len']} text tokens, batch {p['batch']}, {p['dtype']}, "
        f"remat {p['remat']}, sample {p['steps']} steps; device {report['device']}"
    )
    t = Table(title=title)
    for col in (
        "row",
        "backend",
        "median ms",
        "IQR ms",
        "TFLOP/s",
        "MFU",
        "peak GiB",
        "compile s",
        "JAX/PyTorch",
    ):
        t.add_column(col, justify="left" if col in ("row", "backend") else "right")
    fmt = lambda v, f: "-" if v is None else f.format(v)
    for r in report["rows"]:
        if "error" in r:
            t.add_row(r["kind"], r["backend"], f"failed: {r['error']}"[:60], *[""] * 6)
            continue
        t.add_row(
            r["kind"],
            r["backend"],
            f"{1e3 * r['median_s']:.2f}",
            f"{1e3 * r['iqr_s']:.2f}",
            fmt(r.get("tflops"), "{:.3g}"),
            fmt(r.get("mfu") and 100 * r["mfu"], "{:.1f}%"),
            fmt(r.get("peak_bytes") and r["peak_bytes"] / 2**30, "{:.2f}"),
            fmt(r.get("compile_s"), "{:.1f}"),
            fmt(r.get("ratio"), "{:.2f}"),
        )
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(t)
    for framework, rows in report.get("fp8_parity", {}).items():
        worst = max((r for r in rows if r["name"] != "output"), key=lambda r: r["rel_l2_update"])
        out = next(r for r in rows if r["name"] == "output")
        console.print(
            f"fp8 vs {p['dtype']} ({framework}, {p['fp8']} scales): worst block {worst['name']} rel-L2 "
            f"{worst['rel_l2']:.2e} (its update {worst['rel_l2_update']:.2e}); output {out['rel_l2']:.2e}"
        )


def plot(report: dict, path: Path) -> None:
    """Grouped bars: one group per row kind, one bar per backend, median step time (ms, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in report["rows"] if "error" not in r]
    kinds = [k for k in bench.KINDS if any(r["kind"] == k for r in rows)]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(kinds) * max(len(backends), 1) / 2), 4))
    width = 0.8 / max(len(backends), 1)
    for i, b in enumerate(backends):
        vals = [
            next(
                (1e3 * r["median_s"] for r in rows if r["kind"] == k and r["backend"] == b), np.nan
            )
            for k in kinds
        ]
        ax.bar(np.arange(len(kinds)) + i * width, vals, width, label=b)
    ax.set_xticks(np.arange(len(kinds)) + width * (len(backends) - 1) / 2, kinds)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms)")
    p = report["plan"]
    ax.set_title(
        f"minflux bench: {p['model']}, {p['resolution']} px, {p['dtype']}, {report['device']}"
    )
    ax.legend()
    fig.tight_layout()
    from minflux import files

    try:
        files.write_figure(fig, path, dpi=120)  # atomic: rendered in memory first
    finally:
        plt.close(fig)
