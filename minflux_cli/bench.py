"""`minflux bench`: the framework comparison, side by side on identical weights and inputs, with diffusers as the
peer.

For one preset (random weights from `minflux.random`) it times, under every backend asked for (PyTorch eager,
PyTorch `torch.compile`, diffusers eager and compiled on minflux's diffusers export of the same weights, JAX with
XLA's attention, JAX with cuDNN's fused attention on NVIDIA GPUs), the rows of `minflux.bench`: one denoising
step, a whole N-step sample with the decode, a full fine-tuning step, a LoRA step, and optionally an fp8 step.
Every row runs in its own process, one after the other (neither holds memory the other needs, and each peak is
the row's own; each JAX process gets its XLA flags before JAX starts); `--rounds N` repeats the whole sequence,
alternating, so a shared machine's load falls on every backend alike. Per row: median and spread, TFLOP/s and
MFU, peak memory, compile time, and the ratios minflux / diffusers and JAX / PyTorch for time and memory.

    minflux bench                       # a GPU: flux2-klein-4b, 1024 px, bf16; no GPU: a one-minute tiny run
    minflux bench --model flux1-dev --kinds forward,fp8 --fp8-parity --json out.json --plot out.png
    minflux bench --model flux1-dev --hidden 1024 --blocks 2,4 --resolution 512 --txt-len 256 --kinds forward \\
        --backends torch-eager,diffusers-eager,jax-xla --rounds 3 --dtype fp32    # a mid-size CPU comparison
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from minflux import bench, memory
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

# minflux_jax.train.REMAT_POLICIES
REMAT = ("none", "full", "dots", "dots_no_batch", "attention", "attention_dots")
GPU_DEFAULT = {
    "model": "flux2-klein-4b",
    "resolution": 1024,
    "txt_len": 512,
    "kinds": ("forward", "sample", "train", "lora"),
    "backends": tuple(bench.BACKENDS),
}


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


def _blocks(text: str) -> tuple[int, int]:
    try:
        double, single = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected DOUBLE,SINGLE block counts, got {text!r}"
        ) from None
    if double < 0 or single < 0 or double + single == 0:
        raise argparse.ArgumentTypeError(f"expected block counts >= 0, not both 0, got {text!r}")
    return double, single


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=preset,
        default=None,
        help="a transformer preset (default: flux2-klein-4b on a GPU; without one, a one-minute run of "
        f"{bench.QUICK['model']})",
    )
    p.add_argument(
        "--resolution",
        type=pixels,
        default=None,
        help=f"image side in pixels (default 1024; without a GPU {bench.QUICK['resolution']})",
    )
    p.add_argument(
        "--txt-len",
        type=positive_int,
        default=None,
        help=f"text tokens (default 512; without a GPU {bench.QUICK['txt_len']})",
    )
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
        default=None,
        help=f"rows, a comma list of {', '.join(bench.KINDS)} (default: all but fp8; without a GPU: "
        f"{','.join(bench.QUICK['kinds'])})",
    )
    p.add_argument(
        "--backends",
        type=_choices(tuple(bench.BACKENDS)),
        default=None,
        help=f"a comma list of {', '.join(bench.BACKENDS)} (default: all; without a GPU: "
        f"{','.join(bench.QUICK['backends'])}; jax-cudnn only runs on a GPU, diffusers only the "
        "forward row)",
    )
    p.add_argument(
        "--hidden",
        type=positive_int,
        default=0,
        help="a narrower or wider variant of the preset: hidden size (heads keep their width)",
    )
    p.add_argument(
        "--blocks",
        type=_blocks,
        default=None,
        help="DOUBLE,SINGLE: the variant's block counts (default: the preset's)",
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls per row")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="untimed calls after the first")
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="run every row this many times, alternating backends (times pooled)",
    )
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
        "--compile-scope",
        default="blocks",
        choices=["blocks", "full"],
        help="torch.compile each block (compiled once per block class: fast to compile) or the whole model",
    )
    p.add_argument(
        "--compile-mode",
        default="auto",
        choices=bench.COMPILE_MODES,
        help="torch.compile mode (auto: CUDA graphs for inference on a GPU, falling back to none if "
        "they fail)",
    )
    p.add_argument(
        "--xla-flags",
        default="default",
        help="XLA_FLAGS for the JAX processes: 'default' (minflux.bench.XLA_DEFAULT_FLAGS; any the installed "
        "jaxlib does not know is dropped with a warning), 'none', or flags, as --xla-flags='--a=1 --b' "
        "(an unknown one is an error)",
    )
    p.add_argument(
        "--peak-tflops",
        type=positive_float,
        default=None,
        help="dense peak (default: from the GPU name)",
    )
    p.add_argument("--timeout", type=positive_int, default=900, help="seconds per row (process)")
    p.add_argument("--json", type=json_file, default=None, help="write the report here")
    p.add_argument(
        "--plot", type=png_file, default=None, help="write a bar chart (PNG) of the step times here"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    p.add_argument("--plan", default=None, help=argparse.SUPPRESS)


def defaults(args, gpu: bool) -> str | None:
    """Fill what the user left out: the GPU defaults, or on a machine without a GPU, for no --model or a tiny
    one, the quick plan (`minflux.bench.QUICK`: about a minute on 2 cores); returns the one line that says so,
    or None."""
    quick = not gpu and (args.model is None or args.model.endswith("-tiny"))
    base = bench.QUICK if quick else GPU_DEFAULT
    given = [f for f in ("model", "resolution", "txt_len", "kinds", "backends") if getattr(args, f)]
    for field in ("model", "resolution", "txt_len", "kinds", "backends"):
        if getattr(args, field) is None:
            setattr(args, field, base[field])
    if not quick or len(given) == 5:
        return None
    why = "no GPU and no --model" if "model" not in given else f"no GPU, {args.model}"
    return (
        f"minflux bench: {why}: {args.model}, {args.resolution} px, {args.txt_len} text tokens, rows "
        f"{','.join(args.kinds)}, backends {','.join(args.backends)} (about a minute on 2 cores; "
        "--model PRESET, --resolution, --kinds, --backends for others)"
    )


def plan_of(args) -> bench.Plan:
    double, single = args.blocks or (-1, -1)
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
        hidden=args.hidden,
        depth=double,
        depth_single=single,
        compile_scope=args.compile_scope,
        compile_mode=args.compile_mode,
    )


def check(args, plan: bench.Plan) -> None:
    """Usage errors found before any process starts, the memory check among them: a model too large for the
    machine is refused before it is built, with the estimate."""
    from minflux import configs

    base = configs.get(args.model)
    if not hasattr(base, "depth"):
        raise UsageError(f"--model {args.model}: not a transformer preset")
    head_dim = base.hidden_size // base.num_heads
    if args.hidden % head_dim:
        raise UsageError(
            f"--hidden {args.hidden}: must be a multiple of {args.model}'s head width {head_dim}"
        )
    ppt = plan.pixels_per_token
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
    have = memory.available()
    if have["bytes"] is None:
        return
    fused = any(b in bench.GPU_ONLY for b in args.backends) and have["device"] == "gpu"
    for kind in plan.kinds:
        need = bench.estimate(plan, kind, attention_scores=not fused)
        if need["total"] > have["bytes"]:
            where = {
                "gpu": "the GPU has",
                "cpu": "this machine has",
                "limit": "MINFLUX_MEMORY_LIMIT is",
            }
            raise UsageError(
                f"--model {bench.describe(plan)}: the {kind} row needs about {memory.gb(need['total'])} in "
                f"{plan.dtype} (weights {memory.gb(need['weights'])}); {where[have['device']]} "
                f"{memory.gb(have['bytes'])} available (a smaller --model, --hidden / --blocks, "
                "--resolution or --kinds)"
            )


def _jax_gpu() -> bool:
    """Whether JAX may find an NVIDIA GPU (from the driver's files: jax is not imported for this)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    return memory.nvidia_gpus() > 0 and (not platforms or "cuda" in platforms or "gpu" in platforms)


# ---------------------------------------------------------------------------------------------
# XLA flags: checked against the installed jaxlib before any JAX row starts
# ---------------------------------------------------------------------------------------------


def probe_xla_flags(flags: list[str]) -> tuple[list[str], str]:
    """(flags the installed jaxlib refuses, its version): one short process starts JAX's CPU backend with them
    (XLA parses every flag, GPU ones included, whichever backend starts). An unknown flag would otherwise end
    every JAX process at start."""
    from importlib import metadata

    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", "import jax; jax.devices()"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return [], version
    return bench.unknown_xla_flags(proc.stderr), version


def xla_flags(args) -> str:
    """The XLA_FLAGS of the JAX workers: the environment's, then 'default' or the user's. Unknown default flags
    are dropped with a warning (a newer or older jaxlib than they were written for); an unknown flag the user
    gave, in --xla-flags or XLA_FLAGS, is a usage error."""
    if not any(bench.BACKENDS[b][0] == "jax" for b in args.backends):
        return ""
    env = os.environ.get("XLA_FLAGS", "").split()
    if args.xla_flags == "none":
        chosen = []
    elif args.xla_flags == "default":
        chosen = list(bench.XLA_DEFAULT_FLAGS)
    else:
        chosen = args.xla_flags.split()
    named = {f.split("=")[0] for f in env}
    chosen = [f for f in chosen if f.split("=")[0] not in named]  # the environment's setting wins
    if not env and not chosen:
        return ""
    unknown, version = probe_xla_flags(env + chosen)
    theirs = [f for f in unknown if f in env or (args.xla_flags != "default" and f in chosen)]
    if theirs:
        where = "XLA_FLAGS" if any(f in env for f in theirs) else "--xla-flags"
        raise UsageError(f"{where}: jaxlib {version} does not know {' '.join(theirs)}")
    dropped = [f for f in chosen if f in unknown]
    if dropped:
        print(
            f"minflux bench: warning: jaxlib {version} does not know {' '.join(dropped)}: dropped",
            file=sys.stderr,
        )
    return " ".join(env + [f for f in chosen if f not in unknown])


def jax_env(flags: str) -> dict:
    """A JAX worker's environment: its XLA flags, and GPU memory allocated as needed up to 95% (JAX's default
    preallocates 75% and stops there: FLUX.2-dev's 64.4 GB of bf16 weights do not fit an 80 GB H100's 60 GB)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = flags
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    names = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")
    if not any(env.get(n) for n in names):  # one name only: jaxlib refuses both at once
        env[mem_fraction_name()] = "0.95"
    return env


def mem_fraction_name() -> str:
    """The memory-fraction variable the installed jaxlib reads: XLA_CLIENT_MEM_FRACTION where its client
    knows it (0.10 on), else the older XLA_PYTHON_CLIENT_MEM_FRACTION (read from jaxlib's files, not imported)."""
    from importlib import metadata

    try:
        client = next(f for f in metadata.files("jaxlib") or [] if f.name == "xla_client.py")
        if "XLA_CLIENT_MEM_FRACTION" in client.read_text():
            return "XLA_CLIENT_MEM_FRACTION"
    except (metadata.PackageNotFoundError, StopIteration, OSError):
        pass
    return "XLA_PYTHON_CLIENT_MEM_FRACTION"


# ---------------------------------------------------------------------------------------------
# One row in this process (the worker), every row in its own process (the command)
# ---------------------------------------------------------------------------------------------


def worker(args) -> dict:
    plan = bench.Plan.from_json(args.plan)
    framework, options = bench.BACKENDS[args.worker]
    if framework == "jax":
        from minflux_jax import bench as runner
    else:
        from minflux_torch import bench as runner
    if args.worker in bench.GPU_ONLY and runner.device() not in ("gpu", "cuda"):
        return {"device": runner.device_name(), "skipped": "needs an NVIDIA GPU"}
    if args.kind == "fp8-parity":
        model = runner.build(plan.cfg, plan.seed, runner.DTYPES[plan.dtype])
        parity = runner.fp8_parity(model, bench.inputs(plan), plan.fp8)
        return {"device": runner.device_name(), "fp8_parity": parity, "rows": []}
    if framework == "diffusers":
        return runner.run_peer(plan, args.kind, options)
    return runner.run(plan, args.kind, options)


def spawn(name: str, kind: str, plan: bench.Plan, args, flags: str) -> dict:
    """Run row `kind` of backend `name` in a child process; its report, or {"error": ...}."""
    env = jax_env(flags) if bench.BACKENDS[name][0] == "jax" else dict(os.environ)
    cmd = [sys.executable, "-m", "minflux_cli", "bench", "--worker", name, "--kind", kind]
    cmd += ["--plan", plan.json()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or [
            f"exit {proc.returncode}"
        ]
        return {"error": tail[0], "stderr": proc.stderr[-4000:]}
    return json.loads(lines[-1][len("RESULT ") :])


def jobs(args) -> list[tuple[str, str]]:
    """(backend, kind) in run order: kind by kind, every backend in turn (diffusers: its rows only; jax-cudnn
    without an NVIDIA GPU: none)."""
    gpu = memory.gpu_memory() is not None
    out = []
    for kind in args.kinds:
        for name in args.backends:
            if bench.BACKENDS[name][0] == "diffusers" and kind not in bench.PEER_KINDS:
                continue
            if name in bench.GPU_ONLY and not gpu:
                continue
            out.append((name, kind))
    if args.fp8_parity:  # in the first backend of each framework that has one
        for framework in ("torch", "jax"):
            first = [b for b in args.backends if bench.BACKENDS[b][0] == framework]
            if first and not (first[0] in bench.GPU_ONLY and not gpu):
                out.append((first[0], "fp8-parity"))
    return out


def run(args) -> int:
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    line = defaults(args, memory.gpu_memory() is not None)
    plan = plan_of(args)
    check(args, plan)
    flags = xla_flags(args)
    if line:  # after every usage check: an error stays one line
        print(line, file=sys.stderr, flush=True)
    found: dict[tuple[str, str], list[dict]] = {}
    versions, parity, device = {}, {}, "cpu"
    command = "minflux bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    # the machine's load before and after: on a shared CPU it explains the spread
    load = os.getloadavg()

    def report() -> dict:
        rows = [
            {"backend": b, "framework": bench.BACKENDS[b][0], **bench.merge(rs)}
            for (b, k), rs in found.items()
        ]
        out = bench.finish(plan, rows, device, args.peak_tflops)
        out.update(
            {
                "versions": versions,
                "command": command,
                "xla_flags": flags,
                "rounds": args.rounds,
                "host_cpus": os.cpu_count(),
                "usable_cpus": len(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity")
                else None,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "load_average": {"start": load, "end": os.getloadavg()},
            }
        )
        if parity:
            out["fp8_parity"] = parity
        return out

    todo = jobs(args)
    for r in range(args.rounds):
        for name, kind in todo:
            if kind == "fp8-parity" and r:
                continue
            rounds = f" (round {r + 1} of {args.rounds})" if args.rounds > 1 else ""
            print(f"minflux bench: {name} {kind}{rounds} ...", file=sys.stderr, flush=True)
            out = spawn(name, kind, plan, args, flags)
            if "skipped" in out:
                print(f"minflux bench: {name} skipped: {out['skipped']}", file=sys.stderr)
                continue
            failed = "error" in out
            if failed:
                print(f"minflux bench: {name} {kind} failed: {out['error']}", file=sys.stderr)
                out = {"rows": [{"kind": kind, "error": out["error"]}]}
            else:
                device = out["device"] if out["device"] != "cpu" else device
                if "version" in out:
                    versions[bench.BACKENDS[name][0]] = out["version"]
            if "fp8_parity" in out:
                parity[bench.BACKENDS[name][0]] = out["fp8_parity"]
            for row in out["rows"]:
                if "error" in row and not failed:
                    print(f"minflux bench: {name} {kind}: {row['error']}", file=sys.stderr)
                found.setdefault((name, row["kind"]), []).append(row)
            if args.json:  # after every row: a run cut short by a time limit keeps what it measured
                write_json(report(), args.json)
    final = report()
    print_table(final)
    if args.json:
        write_json(final, args.json)
    if args.plot:
        plot(final, args.plot)
    return 1 if any("error" in r for r in final["rows"]) else 0


def write_json(report: dict, path: Path) -> None:
    from minflux import files

    files.write_text(path, json.dumps(report, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# Table and plot
# ---------------------------------------------------------------------------------------------


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    p = report["plan"]
    gpu = report["device"] != "cpu"
    title = (
        f"{report['model']}: {p['resolution']} px, {p['txt_len']} text tokens, batch {p['batch']}, "
        f"{p['dtype']}, remat {p['remat']}, sample {p['steps']} steps; device {report['device']}; "
        f"{'rounds ' + str(report['rounds']) + '; ' if report['rounds'] > 1 else ''}peak: "
        + ("allocator peak" if gpu else "peak RSS over RSS after loading")
    )
    t = Table(title=title)
    cols = ("row", "backend", "median ms", "IQR ms", "TFLOP/s", "MFU", "peak MiB", "compile s")
    cols += ("/ diffusers", "mem / diffusers", "JAX/PyTorch", "mem JAX/PyTorch")
    for col in cols:
        t.add_column(col, justify="left" if col in ("row", "backend") else "right")
    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    for r in report["rows"]:
        if "error" in r:
            t.add_row(
                r["kind"], r["backend"], f"failed: {r['error']}"[:70], *[""] * (len(cols) - 3)
            )
            continue
        t.add_row(
            r["kind"],
            r["backend"],
            f"{1e3 * r['median_s']:.2f}",
            f"{1e3 * r['iqr_s']:.2f}",
            fmt(r.get("tflops"), "{:.3g}"),
            fmt(r.get("mfu") and 100 * r["mfu"], "{:.1f}%"),
            _mib(r.get("peak_bytes")),
            fmt(r.get("compile_s"), "{:.1f}"),
            fmt(r.get("diffusers_ratio"), "{:.2f}"),
            fmt(r.get("diffusers_memory_ratio"), "{:.2f}"),
            fmt(r.get("ratio"), "{:.2f}"),
            fmt(r.get("memory_ratio"), "{:.2f}"),
        )
    console = Console(width=None if sys.stdout.isatty() else 170)
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

    from minflux import files

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
        f"minflux bench: {report['model']}, {p['resolution']} px, {p['dtype']}, {report['device']}"
    )
    ax.legend()
    fig.tight_layout()

    try:
        files.write_figure(fig, path, dpi=120)  # atomic: rendered in memory first
    finally:
        plt.close(fig)
