"""The framework-free half of `minflux bench`: the plan, seeded weights and inputs, statistics, model FLOPs
per row, MFU and the JAX / PyTorch ratio (numpy only).

The runners are `minflux_torch/bench.py` and `minflux_jax/bench.py` (twins: the same functions on the same
weights and inputs); the command, its table, JSON and plot are `minflux_cli/bench.py`. Rows:

    forward  one denoising step: one transformer forward
    sample   a whole N-step sample: the Euler loop, then the autoencoder decode
    train    a full fine-tuning step: flow-matching loss, backward, global-norm clipping, AdamW
    lora     a LoRA step: the same with the base frozen and rank-r adapters on every block linear
    fp8      one denoising step with the block linears in float8_e4m3fn (fake-quantised off Hopper GPUs)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from minflux import configs, data, family, flops, random, schedules

KINDS = ("forward", "sample", "train", "lora", "fp8")
BACKENDS = {  # name -> (framework, options)
    "torch-eager": ("torch", {"compile": False}),
    "torch-compile": ("torch", {"compile": True}),  # inductor; CUDA graphs for inference on a GPU
    "jax-xla": ("jax", {"attention": "xla"}),
    "jax-cudnn": (
        "jax",
        {"attention": "cudnn"},
    ),  # cuDNN fused flash attention: NVIDIA GPUs, bf16 only
}
GPU_ONLY = ("jax-cudnn",)
# XLA flags the JAX workers get on a GPU (`--xla-flags default`); each was measured on or off by bench/gpu_session.sh
XLA_GPU_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_while_loop_double_buffering=true "
    "--xla_gpu_enable_highest_priority_async_stream=true"
)


@dataclass(frozen=True)
class Plan:
    """What one `minflux bench` run measures; every backend worker gets the same plan."""

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

    @property
    def cfg(self):
        return configs.get(self.model)

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


# ---------------------------------------------------------------------------------------------
# Weights and inputs: the same numbers in both frameworks
# ---------------------------------------------------------------------------------------------


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0):
    """(key, float32 array) of `minflux.random.tensors`, generated a block at a time (keys grouped by
    `double_blocks.N.`-style prefixes), so a 12B model never needs its fp32 copy in host memory at once."""
    groups: dict[str, dict] = {}
    for key, shape in shapes.items():
        parts = key.split(".")
        prefix = ".".join(parts[:2]) if parts[0] in ("double_blocks", "single_blocks") else parts[0]
        groups.setdefault(prefix, {})[key] = shape
    for group in groups.values():
        yield from random.tensors(group, seed).items()


def inputs(plan: Plan) -> dict[str, np.ndarray]:
    """The transformer's inputs (`data.random_batch`: img tokens, txt, ids, vec, guidance) and times t (B,)."""
    rng = np.random.default_rng(plan.seed)
    batch = data.random_batch(plan.cfg, plan.batch, plan.side, plan.txt_len, rng)
    batch["t"] = 1 / (1 + np.exp(-rng.standard_normal(plan.batch))).astype(
        np.float32
    )  # logit-normal
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
# Statistics, FLOPs, MFU and ratios
# ---------------------------------------------------------------------------------------------


def stats(times: list[float]) -> dict:
    """Median, min, max and the interquartile range of step times (s)."""
    t = np.asarray(times, np.float64)
    q25, q50, q75 = np.percentile(t, [25, 50, 75])
    return {
        "median_s": float(q50),
        "min_s": float(t.min()),
        "max_s": float(t.max()),
        "iqr_s": float(q75 - q25),
        "n": len(times),
    }


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64; NaN when either side is not finite (never masked)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def fp8_row(name: str, got: np.ndarray, want: np.ndarray, before: np.ndarray) -> dict:
    """One block's fp8 parity row: rel-L2 of its output and of its update (output - input)."""
    return {
        "name": name,
        "rel_l2": rel_l2(got, want),
        "rel_l2_update": rel_l2(got - before, want - before),
    }


def row_flops(kind: str, plan: Plan) -> int:
    """Model FLOPs of one call of a row (`minflux.flops`); `sample` counts its transformer steps, not the decode."""
    f = flops.forward_flops(plan.cfg, plan.side**2, plan.txt_len, plan.batch)
    return {"forward": f, "fp8": f, "sample": plan.steps * f, "train": 3 * f, "lora": 2 * f}[kind]


def finish(plan: Plan, rows: list[dict], device: str, peak_tflops: float | None = None) -> dict:
    """Add TFLOP/s, MFU (against the device's peak: bf16, or fp8 for the fp8 row) and each JAX row's ratio to
    the fastest PyTorch row of its kind; returns the report."""
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
        torch_rows = [o for o in ok if o["framework"] == "torch" and o["kind"] == r["kind"]]
        if r["framework"] == "jax" and torch_rows:
            best = min(torch_rows, key=lambda o: o["median_s"])
            r["ratio"] = r["median_s"] / best["median_s"]
            r["ratio_to"] = best["backend"]
    return {
        "plan": dataclasses.asdict(plan),
        "device": device,
        "peak_source": flops.PEAK_SOURCE,
        "rows": rows,
        "note": "ratio: JAX median / the fastest PyTorch row of the same kind (below 1: JAX faster); "
        "MFU: model FLOPs (minflux.flops; sample: transformer steps only) / time / dense peak",
    }
