"""Every GPU figure minflux records, in one call of at most 9 minutes on one CUDA machine.

    python bench/gpu_session.py OUT_DIR [--budget 540] [--parts env,flux1,...]     # on the GPU machine
    python bench/gpu_session.py OUT_DIR --dry-run                                  # anywhere: tiny models, CPU
    bash bench/gpu_session.sh OUT_DIR [SECONDS] [PART ...]                         # the same, as a shell line

Parts run in order of importance, each in its own process group with a time box: a part's box is its own
limit plus whatever earlier parts left unused, and never eats into the boxes of the parts after it (the
default parts' limits add up to less than the budget, so every one of them gets its full box whatever the
others do). A part that fails or runs out of time is killed with its whole process tree and logged; the next
part starts. Every `minflux bench` part writes its JSON after each row, so a part cut short keeps the rows it
finished. Nothing is installed: the machine's own torch, jax, flax, diffusers are used and recorded.

`--dry-run` runs the same parts on this machine with the tiny presets at 64 px (jax-cudnn replaced by jax-xla,
which runs on a CPU), plus a part that fails and a part that outlives its box, and checks that the session's
limits fit the budget: what a first GPU session would do, end to end, in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = os.environ.get("PYTHON", sys.executable)
BUDGET = 540  # seconds: one device call of at most 9 minutes
MARGIN = 15  # seconds kept back for the driver itself (start, logs, the last kill)
# The default parts' limits add up to 510 s: with MARGIN, 15 s are left, which the dry run's two extra parts use.


@dataclass
class Part:
    name: str
    limit: int  # seconds
    argv: list[str]
    what: str
    json: str | None = None  # the report it writes under OUT
    # its box is its limit, never more (the dry run's failing and overrunning parts)
    fixed: bool = False


def bench(*args: str) -> list[str]:
    return [PY, "-m", "minflux_cli", "bench", "--resolution", "1024", "--txt-len", "512", *args]


def parts(out: Path) -> dict[str, Part]:
    """Every part by name; DEFAULT lists those one call runs, in order."""
    j = lambda name: str(out / name)  # noqa: E731
    return {
        p.name: p
        for p in [
            Part(
                "env",
                30,
                [PY, str(ROOT / "bench" / "gpu_session.py"), "--preflight", j("env.json")],
                "GPU, driver and library versions; every API the parts use, checked",
                "env.json",
            ),
            Part(
                "flux1",
                190,
                bench(
                    "--model", "flux1-dev", "--kinds", "forward", "--timeout", "90",
                    "--backends", "jax-cudnn,torch-compile,diffusers-eager", "--json", j("bench-flux1.json"),
                ),
                "FLUX.1-dev one step, 1024 px, bf16: JAX cuDNN vs torch.compile (CUDA graphs) vs diffusers "
                "eager; time and peak memory (targets: <= 110 ms, JAX within 10%, >= 1.15x diffusers, memory "
                "<= 0.7x diffusers)",
                "bench-flux1.json",
            ),
            Part(
                "klein-train",
                180,
                bench(
                    "--model", "flux2-klein-4b", "--kinds", "train", "--remat", "full", "--timeout", "100",
                    "--backends", "jax-cudnn,torch-compile", "--json", j("bench-klein-train.json"),
                ),
                "flux2-klein-4b full fine-tuning step: MFU (targets: JAX >= 55%, compiled PyTorch >= 45%)",
                "bench-klein-train.json",
            ),
            Part(
                "flux1-fp8",
                110,
                bench(
                    "--model", "flux1-dev", "--kinds", "fp8", "--timeout", "70",
                    "--backends", "jax-cudnn,torch-compile", "--json", j("bench-flux1-fp8.json"),
                ),
                "FLUX.1-dev one fp8 step: time (target <= 75 ms), peak memory with the transformer resident "
                "(target <= 12 GB), whether XLA made fp8 GEMMs",
                "bench-flux1-fp8.json",
            ),
            # ---- by name only (a second call): ----
            Part(
                "flux1-rest",
                300,
                bench(
                    "--model", "flux1-dev", "--kinds", "forward", "--timeout", "120",
                    "--backends", "diffusers-compile,torch-eager,jax-xla", "--json", j("bench-flux1-rest.json"),
                ),
                "FLUX.1-dev one step: diffusers compiled, eager PyTorch, JAX with XLA's attention",
                "bench-flux1-rest.json",
            ),
            Part(
                "flux2dev",
                220,
                bench(
                    "--model", "flux2-dev", "--kinds", "forward", "--repeats", "3", "--timeout", "110",
                    "--backends", "jax-cudnn,torch-compile", "--json", j("bench-flux2dev.json"),
                ),
                "FLUX.2-dev one step (64.4 GB of bf16 weights: JAX without 75% preallocation)",
                "bench-flux2dev.json",
            ),
            Part(
                "klein-rest",
                240,
                bench(
                    "--model", "flux2-klein-4b", "--kinds", "forward,sample,lora", "--timeout", "80",
                    "--backends", "jax-xla,jax-cudnn,torch-eager", "--json", j("bench-klein-rest.json"),
                ),
                "flux2-klein-4b: one step, 4-step sample + decode, LoRA step",
                "bench-klein-rest.json",
            ),
            Part(
                "remat",
                100,
                bench(
                    "--model", "flux2-klein-4b", "--kinds", "train", "--remat", "attention_dots",
                    "--backends", "jax-cudnn", "--json", j("bench-remat.json"),
                ),
                "JAX training step with remat attention_dots (memory for speed)",
                "bench-remat.json",
            ),
            Part(
                "xlaflags",
                100,
                bench(
                    "--model", "flux2-klein-4b", "--kinds", "train", "--xla-flags", "none",
                    "--backends", "jax-cudnn", "--json", j("bench-noflags.json"),
                ),
                "the same step without minflux.bench.XLA_DEFAULT_FLAGS (what the flags buy)",
                "bench-noflags.json",
            ),
            Part(
                "fp8gpu",
                90,
                [PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_fp8.py", "-p", "no:cacheprovider"],
                "the gpu-marked fp8 tests: torch._scaled_mm vs fake-quant, XLA's fp8 GEMM rewrite",
            ),
            Part(
                "mfu",
                320,
                [PY, "bench/bench_train_mfu.py", "--jax-attention", "xla,cudnn", "--timeout", "200",
                 "--json", j("train-mfu.json")],
                "bench_train_mfu.py (issue 14's training MFU)",
                "train-mfu.json",
            ),
        ]
    }  # fmt: skip


DEFAULT = ("env", "flux1", "klein-train", "flux1-fp8")


def dry(part: Part) -> Part:
    """The part on this machine: tiny presets at 64 px, JAX with XLA's attention (cuDNN's needs a GPU)."""
    swap = {"flux1-dev": "flux1-tiny", "flux2-dev": "flux2-tiny", "flux2-klein-4b": "flux2-tiny"}
    argv, i = [], 0
    while i < len(part.argv):
        a = part.argv[i]
        if a in ("--resolution", "--txt-len"):
            argv += [a, "64" if a == "--resolution" else "16"]
            i += 2
            continue
        a = swap.get(a, a)
        if part.argv[i - 1] == "--backends":
            a = ",".join(dict.fromkeys(b.replace("jax-cudnn", "jax-xla") for b in a.split(",")))
        argv.append(a)
        i += 1
    if argv[:4] == [PY, "-m", "minflux_cli", "bench"]:
        argv += ["--repeats", "2"]
    return Part(part.name, part.limit, argv, part.what, part.json, part.fixed)


DRY_EXTRA = [  # what the dry run adds: a part that fails, a part that outlives its box
    Part("fails", 10, [PY, "-c", "raise SystemExit('fails on purpose')"], "fails", fixed=True),
    Part("overruns", 5, [PY, "-c", "import time; time.sleep(600)"], "overruns", fixed=True),
]


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def run_part(part: Part, box: float, log) -> dict:
    """Run one part in its own process group for at most `box` seconds; kill the whole group at the end."""
    log.write(f"== {part.name} (at most {box:.0f} s): {' '.join(part.argv)}\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        part.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        rc = proc.wait(timeout=box)
        status = "ok" if rc == 0 else f"exit {rc}"
    except subprocess.TimeoutExpired:
        status = f"killed after its {box:.0f} s box"
    finally:
        try:  # the part's whole tree: `minflux bench` and its row processes
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    took = time.monotonic() - t0
    log.write(f"== {part.name}: {status} after {took:.0f} s\n")
    log.flush()
    return {"part": part.name, "status": status, "seconds": round(took, 1), "box": round(box)}


def session(out: Path, names: list[str], budget: float, dry_run: bool) -> dict:
    """Run `names` within `budget` seconds; returns the session's summary (also OUT/session.json)."""
    table = parts(out)
    chosen = [dry(table[n]) if dry_run else table[n] for n in names]
    if dry_run:
        chosen += DRY_EXTRA
    total = sum(p.limit for p in chosen)
    if total > budget - MARGIN:
        raise SystemExit(
            f"gpu_session: the parts' limits add up to {total} s, over the budget {budget:.0f} s less "
            f"{MARGIN} s for the driver: drop a part or raise the budget"
        )
    out.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + budget - MARGIN
    done = []
    with open(out / "log.txt", "a") as log:
        log.write(f"== session: {' '.join(p.name for p in chosen)}; budget {budget:.0f} s\n")
        for i, part in enumerate(chosen):
            later = sum(p.limit for p in chosen[i + 1 :])
            box = end - time.monotonic() - later  # its limit plus what earlier parts left
            box = min(box, part.limit) if part.fixed else box
            if box < 1:
                done.append({"part": part.name, "status": "skipped: no time left"})
                continue
            done.append(run_part(part, box, log))
            print(json.dumps(done[-1]), flush=True)
    summary = {"budget_s": budget, "dry_run": dry_run, "parts": done, "limits_s": total}
    (out / "session.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------
# The env part: versions, and the APIs the other parts call, checked before they need them
# ---------------------------------------------------------------------------------------------


def preflight(path: Path) -> int:
    """Record versions and check every API the session relies on, each check on its own (a missing library
    fails its checks, not the part); OUT/env.json, written as it goes. Exit 1 if a check failed."""
    import importlib
    import platform

    info: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "checks": {}}
    checks = info["checks"]

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=1) + "\n")

    def check(name, fn):
        try:
            checks[name] = fn() or "ok"
        except Exception as e:  # noqa: BLE001 -- every check is reported
            checks[name] = f"FAILED: {type(e).__name__}: {e}"
        save()

    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"none ({type(e).__name__})"
    for lib in ("torch", "jax", "jaxlib", "flax", "optax", "diffusers", "numpy"):
        check(f"import {lib}", lambda lib=lib: importlib.import_module(lib).__version__)
        info[lib] = checks[f"import {lib}"]

    def torch_apis():
        import torch

        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        assert callable(torch.compile) and callable(torch.nn.Module.compile)
        assert callable(torch._scaled_mm) and torch.float8_e4m3fn
        return f"torch {torch.__version__}, CUDA {torch.version.cuda}"

    def tf32():
        import torch

        from parity import precision

        precision.configure("cuda" if torch.cuda.is_available() else "cpu")
        precision.assert_full_precision()
        return f"legacy cudnn.allow_tf32 reads {torch.backends.cudnn.allow_tf32}"

    def jax_apis():
        import jax
        import jax.numpy as jnp

        info["jax_devices"] = [str(d) for d in jax.devices()]
        q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
        impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
        jax.nn.dot_product_attention(q, q, q, implementation=impl).block_until_ready()
        assert jax.jit(lambda x: x + 1).lower(1.0).compile().memory_analysis() is not None
        stats = jax.local_devices()[0].memory_stats()
        return f"attention {impl}; memory_stats {'peak_bytes_in_use' in (stats or {})}"

    def flags():
        from minflux import bench as core
        from minflux_cli.bench import probe_xla_flags

        unknown, version = probe_xla_flags(list(core.XLA_DEFAULT_FLAGS))
        return f"jaxlib {version}: " + (f"unknown (dropped) {unknown}" if unknown else "all known")

    def peer():
        import diffusers

        return str((diffusers.FluxTransformer2DModel, diffusers.Flux2Transformer2DModel))

    check("torch APIs", torch_apis)
    check("precision flags", tf32)
    check("jax APIs", jax_apis)
    check("XLA default flags", flags)
    check("diffusers transformers", peer)
    print(json.dumps(info, indent=1))
    return 1 if any(str(v).startswith("FAILED") for v in checks.values()) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="output folder: log.txt, session.json, one JSON per part")
    p.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole session")
    p.add_argument(
        "--parts", default=",".join(DEFAULT), help=f"comma list of {', '.join(parts(Path()))}"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="tiny models on this machine (no GPU needed)"
    )
    p.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.preflight:
        return preflight(args.out)
    names = [n for n in args.parts.split(",") if n]
    unknown = [n for n in names if n not in parts(args.out)]
    if unknown:
        p.error(f"unknown parts {unknown}; parts: {', '.join(parts(args.out))}")
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(
        os.pathsep
    )
    summary = session(args.out, names, args.budget, args.dry_run)
    bad = [
        d
        for d in summary["parts"]
        if d["status"] != "ok" and d["part"] not in ("fails", "overruns")
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
