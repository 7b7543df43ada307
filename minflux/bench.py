"""The framework-free half of `minflux bench`: the plan, seeded weights and inputs, memory probes, statistics,
model FLOPs per row, MFU and the ratios a user reads (minflux / diffusers, JAX / PyTorch) (numpy only).

The runners are `minflux_torch/bench.py` (PyTorch, and diffusers as the peer) and `minflux_jax/bench.py`
(twins: the same functions on the same weights and inputs); the command, its table, JSON and plot are
`minflux_cli/bench.py`. Every row runs in its own process, so its peak memory is its own. Rows:

    forward  one denoising step: one transformer forward
    sample   a whole N-step sample: the Euler loop, then the autoencoder decode
    train    a full fine-tuning step: flow-matching loss, backward, global-norm clipping, AdamW
    lora     a LoRA step: the same with the base frozen and rank-r adapters on every block linear
    fp8      one denoising step with the block linears in float8_e4m3fn (fake-quantised off Hopper GPUs)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from minflux import configs, data, family, flops, memory, schedules

KINDS = ("forward", "sample", "train", "lora", "fp8")
BACKENDS = {  # name -> (framework, options); "diffusers" runs in the PyTorch runner
    "torch-eager": ("torch", {"compile": False}),
    "torch-compile": ("torch", {"compile": True}),  # inductor; CUDA graphs for inference on a GPU
    "diffusers-eager": ("diffusers", {"compile": False}),  # the peer: minflux's diffusers export
    "diffusers-compile": ("diffusers", {"compile": True}),
    "jax-xla": ("jax", {"attention": "xla"}),
    # cuDNN fused flash attention: NVIDIA GPUs, bf16 only
    "jax-cudnn": ("jax", {"attention": "cudnn"}),
}
GPU_ONLY = ("jax-cudnn",)
# the rows diffusers runs (its training and sampling loops are not ours to time)
PEER_KINDS = ("forward",)
# XLA flags the JAX workers get (`--xla-flags default`); a flag the installed jaxlib does not know is dropped
# with a warning (`minflux_cli.bench.xla_flags`). On a GPU: measured on or off by bench/gpu_session.sh.
XLA_GPU_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
)
XLA_CPU_FLAGS = (memory.XLA_CPU_SCHEDULER,)  # why: minflux.memory
XLA_DEFAULT_FLAGS = XLA_GPU_FLAGS + XLA_CPU_FLAGS  # each backend ignores the other's
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
# `minflux bench` with no model on a machine without a GPU: about a minute on 2 cores
QUICK = {
    "model": "flux2-tiny",
    "resolution": 64,
    "txt_len": 16,
    "kinds": ("forward", "train"),
    "backends": ("torch-eager", "diffusers-eager", "jax-xla"),
}
# A diffusers row is timed only if its output agrees with minflux's on the same weights: a wrong export gives
# rel-L2 near 1. fp32: DESIGN.md's whole-model bound. bf16: twice it, as diffusers rounds t * 1000 and the
# guidance to bf16 before embedding them (minflux keeps fp32): 0.054 on flux1-tiny's random weights.
PEER_BOUND = {"fp32": 1e-4, "bf16": 0.1}


@dataclass(frozen=True)
class Plan:
    """What one `minflux bench` run measures; every worker gets the same plan."""

    model: str = "flux2-klein-4b"
    resolution: int = 1024  # image side in pixels
    txt_len: int = 512
    batch: int = 1
    steps: int = 4  # denoising steps of the `sample` row
    dtype: str = "bf16"  # weights and compute (training: optimiser state too, unless opt_state says otherwise)
    kinds: tuple[str, ...] = ("forward", "sample", "train", "lora")
    repeats: int = 5  # timed calls per row
    warmup: int = 1  # untimed calls after the first (compiling) one
    seed: int = 0
    remat: str = "full"  # training: per-block remat policy (JAX: train.REMAT_POLICIES; PyTorch: none or full)
    lora_rank: int = 16
    opt_state: str = "param"  # AdamW's first moment: "param" (the weights' dtype) or "bf16"
    fp8: str = "tensor"  # fp8 row's weight scales: "tensor" or "row"
    hidden: int = 0  # a narrower or wider model of the preset: hidden size (heads keep their width); 0: the preset's
    depth: int = -1  # double blocks; -1: the preset's
    depth_single: int = -1  # single blocks; -1: the preset's
    # torch.compile: "blocks" (each block, compiled once per block class) or "full"
    compile_scope: str = "blocks"
    # torch.compile mode; auto: CUDA graphs ("reduce-overhead") for inference on a GPU
    compile_mode: str = "auto"

    @property
    def cfg(self):
        """The preset, with `hidden` / `depth` / `depth_single` applied."""
        cfg = configs.get(self.model)
        changes = {}
        if self.hidden:
            head_dim = cfg.hidden_size // cfg.num_heads
            changes.update(hidden_size=self.hidden, num_heads=self.hidden // head_dim)
        if self.depth >= 0:
            changes["depth"] = self.depth
        if self.depth_single >= 0:
            changes["depth_single_blocks"] = self.depth_single
        return dataclasses.replace(cfg, **changes) if changes else cfg

    @property
    def ae(self) -> str:
        """The autoencoder preset of the model's family (the tiny one for tiny models)."""
        return f"{self.cfg.family[:5]}-ae" + ("-tiny" if self.model.endswith("-tiny") else "")

    @property
    def pixels_per_token(self) -> int:
        """Pixels per token side: the autoencoder's downsampling (2 per level after the first) times 2x2 patches."""
        return 2 ** (len(configs.get(self.ae).ch_mult) - 1) * 2

    @property
    def side(self) -> int:
        """Image tokens per side."""
        return self.resolution // self.pixels_per_token

    def json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        return cls(**{**d, "kinds": tuple(d["kinds"])})


def describe(plan: Plan) -> str:
    """'flux2-klein-4b (hidden 1024, 2 + 4 blocks)' or just the preset."""
    cfg, base = plan.cfg, configs.get(plan.model)
    if cfg == base:
        return plan.model
    return (
        f"{plan.model} (hidden {cfg.hidden_size}, {cfg.depth} + {cfg.depth_single_blocks} blocks)"
    )


def estimate(plan: Plan, kind: str, attention_scores: bool = True) -> dict[str, int]:
    """`minflux.memory.estimate` of one row of the plan."""
    return memory.estimate(
        plan.cfg,
        kind,
        2 if plan.dtype == "bf16" else 4,
        plan.side**2,
        plan.txt_len,
        plan.batch,
        attention_scores,
        plan.resolution,
    )


# ---------------------------------------------------------------------------------------------
# Weights and inputs: the same numbers in both frameworks
# ---------------------------------------------------------------------------------------------

WEIGHT_PIECE = 1 << 22  # elements one core draws at a time (even: see _fill)
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(os.cpu_count() or 1)
    return _POOL


def _range(key: str, shape: tuple[int, ...]) -> tuple[np.float32, np.float32]:
    """(low, width) of `minflux.random.tensor`'s uniform for this key (its rule, repeated here so a tensor can be
    drawn in pieces; tests/test_bench.py checks the two agree bit for bit)."""
    name = key.rsplit(".", 1)[-1]
    if len(shape) >= 2:
        s = 1 / np.sqrt(np.prod(shape[1:]))
        return np.float32(-s), np.float32(2 * s)
    if name in ("scale", "running_var") or (name == "weight" and "norm" in key):
        return np.float32(0.9), np.float32(0.2)
    return np.float32(-0.05), np.float32(0.1)


def to_bf16(x: np.ndarray, out: np.ndarray) -> None:
    """float32 -> bfloat16 bits (uint16 `out`), round to nearest even: ml_dtypes' cast for every finite value,
    but in plain integer ufuncs, which release the GIL (ml_dtypes' cast holds it: one core)."""
    u = x.view(np.uint32)
    r = (u >> 16) & 1
    r += np.uint32(0x7FFF)
    r += u
    np.right_shift(r, 16, out=r)
    np.copyto(out, r, casting="unsafe")


def _fill(
    key: str, shape: tuple[int, ...], seed: int, out: np.ndarray, start: int, stop: int
) -> None:
    """Elements [start, stop) of `random.tensor(key, shape, seed)`, cast to out's dtype, into flat `out`.

    PCG64 draws 64 bits at a time and a float32 uses 32 of them (the low half first), so element e comes from
    draw e // 2: a piece that starts at an even element advances a fresh generator by start / 2 draws and
    continues the very stream `random.tensor` draws in one go.
    """
    bits = np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(key.encode())]))
    bits.advance(start // 2)
    rng = np.random.Generator(bits)
    lo, width = _range(key, shape)
    f32 = out.dtype == np.float32
    x = out[start:stop] if f32 else np.empty(stop - start, np.float32)
    rng.random(dtype=np.float32, out=x)
    x *= width
    x += lo
    if not f32:
        to_bf16(x, out[start:stop].view(np.uint16))


def random_tensor(key: str, shape: tuple[int, ...], seed: int = 0, dtype=np.float32) -> np.ndarray:
    """`minflux.random.tensor(key, shape, seed).astype(dtype)` (float32 or bfloat16), bit for bit, drawn by every
    core in pieces of WEIGHT_PIECE elements: about 169 M elements per core-second, so FLUX.1-dev's 12 B weights
    take seconds on a 16-core GPU host instead of 82 s on one core."""
    # (here: `minflux bench --help` answers without it); before np.dtype, which knows "bfloat16" only once it is in
    import ml_dtypes

    dtype = np.dtype(dtype)

    if dtype not in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
        raise ValueError(f"random_tensor: dtype {dtype.name}: expected float32 or bfloat16")
    out = np.empty(shape, dtype)
    flat, n = out.reshape(-1), out.size
    starts = range(0, n, WEIGHT_PIECE)
    list(_pool().map(lambda s: _fill(key, shape, seed, flat, s, min(s + WEIGHT_PIECE, n)), starts))
    return out


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype=np.float32):
    """(key, array) of `minflux.random.tensors` cast to `dtype`, one tensor at a time (so a 32 B model never
    needs more host memory than its largest tensor), each drawn in parallel (`random_tensor`)."""
    for key, shape in shapes.items():
        yield key, random_tensor(key, shape, seed, dtype)


def inputs(plan: Plan) -> dict[str, np.ndarray]:
    """The transformer's inputs (`data.random_batch`: img tokens, txt, ids, vec, guidance) and times t (B,)."""
    rng = np.random.default_rng(plan.seed)
    batch = data.random_batch(plan.cfg, plan.batch, plan.side, plan.txt_len, rng)
    # logit-normal
    batch["t"] = 1 / (1 + np.exp(-rng.standard_normal(plan.batch))).astype(np.float32)
    batch["noise"] = rng.standard_normal(batch["img"].shape).astype(np.float32)  # training noise
    return batch


def schedule(plan: Plan) -> list[float]:
    """The `sample` row's timesteps (the family's shifted schedule, as `minflux generate`)."""
    return schedules.get_schedule(
        plan.steps,
        plan.side**2,
        plan.cfg.family,
        shift=family.of(plan.cfg).shifts_schedule(plan.cfg),
    )


# ---------------------------------------------------------------------------------------------
# Host memory of this process (Linux): the CPU rows' peak is the peak RSS over the RSS after loading
# ---------------------------------------------------------------------------------------------


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss() -> int | None:
    """This process's resident set now (bytes), None off Linux."""
    return _status("VmRSS")


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc `malloc_trim`), so RSS counts live memory only:
    without it, memory a compile or an earlier call freed stays resident, and the next allocations reuse it
    without raising the peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (`/proc/self/clear_refs` 5 resets VmHWM, Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """The highest RSS since the last `reset_peak_rss` (or the start), bytes."""
    return _status("VmHWM")


# ---------------------------------------------------------------------------------------------
# Statistics, FLOPs, MFU and ratios
# ---------------------------------------------------------------------------------------------


def stats(times: list[float]) -> dict:
    """Median, min, max and the interquartile range of step times (s), with the times themselves."""
    t = np.asarray(times, np.float64)
    q25, q50, q75 = np.percentile(t, [25, 50, 75])
    return {
        "median_s": float(q50),
        "min_s": float(t.min()),
        "max_s": float(t.max()),
        "iqr_s": float(q75 - q25),
        "n": len(times),
        "times_s": [float(x) for x in t],
    }


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64; NaN when either side is not finite (never masked)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_peer(got: np.ndarray, want: np.ndarray, dtype: str) -> float:
    """rel-L2 of the peer's (diffusers') output against minflux's on the same weights and inputs; raises
    ValueError above PEER_BOUND (the row is then an error, never timed)."""
    err = rel_l2(got, want)
    if not err <= PEER_BOUND[dtype]:
        raise ValueError(
            f"diffusers' output differs from minflux's: rel-L2 {err:.3g} > {PEER_BOUND[dtype]:g} ({dtype})"
        )
    return err


def fp8_row(name: str, got: np.ndarray, want: np.ndarray, before: np.ndarray) -> dict:
    """One block's fp8 parity row: rel-L2 of its output and of its update (output - input)."""
    return {
        "name": name,
        "rel_l2": rel_l2(got, want),
        "rel_l2_update": rel_l2(got - before, want - before),
    }


_GEMM_TARGET = re.compile(r"gemm|matmul|cublas|triton", re.IGNORECASE)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s([a-z][\w\-]*)\((.*)$")


def fp8_gemms(hlo: str) -> int:
    """How many matrix multiplies of an optimised HLO module take fp8 operands: `dot`s, GEMM custom calls
    (cuBLASLt: `__cublas$lt$matmul$f8`) and GEMM fusions (Triton), each with an f8 operand type, whether the
    text prints operand types inline or only at their definitions. A dot whose fp8 inputs were converted to a
    wider type first (the fake-quantised path) does not count; nor does "cublas" elsewhere in the text."""
    types, count = {}, 0
    for line in hlo.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, result, op, rest = m.groups()
        types[name] = result
        args = rest.split("), ", 1)[0] if "), " in rest else rest.rsplit(")", 1)[0]
        operand_types = []
        for arg in (a.strip() for a in args.split(",")):
            ref = re.search(r"%([\w.\-]+)\s*$", arg)
            inline = arg[: ref.start()] if ref else arg
            operand_types.append(
                inline if "[" in inline else types.get(ref.group(1), "") if ref else ""
            )
        attrs = rest[len(args) :]
        gemm = op == "dot" or (op in ("custom-call", "fusion") and _GEMM_TARGET.search(attrs))
        if gemm and sum(t.lstrip("(").startswith("f8") for t in operand_types) >= 2:
            count += 1
    return count


def row_flops(kind: str, plan: Plan) -> int:
    """Model FLOPs of one call of a row (`minflux.flops`); `sample` counts its transformer steps, not the decode."""
    f = flops.forward_flops(plan.cfg, plan.side**2, plan.txt_len, plan.batch)
    return {"forward": f, "fp8": f, "sample": plan.steps * f, "train": 3 * f, "lora": 2 * f}[kind]


def merge(rows: list[dict]) -> dict:
    """One backend's row of one kind from its rounds (processes): the times pooled, the peak memory the median
    of the rounds'; each round's median and peak kept under "rounds"."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return rows[-1]
    out = {**ok[-1], **stats([t for r in ok for t in r["times_s"]])}
    peaks = [r["peak_bytes"] for r in ok if r.get("peak_bytes") is not None]
    out["peak_bytes"] = int(np.median(peaks)) if peaks else None
    out["rounds"] = [
        {"median_s": r["median_s"], "peak_bytes": r.get("peak_bytes")}
        for r in rows
        if "error" not in r
    ]
    failed = [r["error"] for r in rows if "error" in r]
    if failed:
        out["failed_rounds"] = failed
    return out


def _ratio(a, b):
    return a / b if a is not None and b else None


def finish(plan: Plan, rows: list[dict], device: str, peak_tflops: float | None = None) -> dict:
    """Add TFLOP/s, MFU (against the device's peak: bf16, or fp8 for the fp8 row) and the ratios: each JAX row's
    time and memory over the fastest PyTorch row of its kind (`ratio`, `memory_ratio`), each minflux row's over
    the matching diffusers row (`diffusers_ratio`, `diffusers_memory_ratio`: eager with eager, compiled with
    compiled, JAX with the faster); returns the report."""
    for r in rows:
        if "error" in r:
            continue
        r["flops"] = row_flops(r["kind"], plan)
        r["tflops"] = r["flops"] / r["median_s"] / 1e12
        peak = (
            peak_tflops * 1e12
            if peak_tflops
            else flops.peak(device, "fp8" if r["kind"] == "fp8" else "bf16")
        )
        r["mfu"] = r["flops"] / r["median_s"] / peak if peak else None
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        same = [o for o in ok if o["kind"] == r["kind"]]
        torch_rows = [o for o in same if o["framework"] == "torch"]
        peers = {o["backend"]: o for o in same if o["framework"] == "diffusers"}
        if r["framework"] == "jax" and torch_rows:
            best = min(torch_rows, key=lambda o: o["median_s"])
            r["ratio"] = r["median_s"] / best["median_s"]
            r["memory_ratio"] = _ratio(r.get("peak_bytes"), best.get("peak_bytes"))
            r["ratio_to"] = best["backend"]
        peer = peers.get(r["backend"].replace("torch-", "diffusers-"))
        if r["framework"] == "jax" and peers:
            peer = min(peers.values(), key=lambda o: o["median_s"])
        if r["framework"] != "diffusers" and peer:
            r["diffusers_ratio"] = r["median_s"] / peer["median_s"]
            r["diffusers_memory_ratio"] = _ratio(r.get("peak_bytes"), peer.get("peak_bytes"))
            r["diffusers_to"] = peer["backend"]
    return {
        "plan": dataclasses.asdict(plan),
        "model": describe(plan),
        "device": device,
        "peak_source": flops.PEAK_SOURCE,
        "rows": rows,
        "note": "ratio / memory_ratio: JAX over the fastest PyTorch row of the same kind (below 1: JAX faster or "
        "leaner); diffusers_ratio / diffusers_memory_ratio: minflux over diffusers on the same weights "
        "(eager vs eager, compiled vs compiled; JAX vs the faster diffusers row); MFU: model FLOPs "
        "(minflux.flops; sample: transformer steps only) / time / dense peak; peak_bytes: on a GPU the "
        "framework allocator's peak (weights included), on a CPU the row's peak RSS over its RSS after "
        "loading (base_bytes)",
    }


def unknown_xla_flags(stderr: str) -> list[str]:
    """The flags XLA refused at start ("Unknown flag(s) in XLA_FLAGS: --a --b"), from a process's stderr."""
    m = re.search(r"Unknown flags? in XLA_FLAGS: (.*)", stderr)
    return m.group(1).split() if m else []
