"""Memory estimates from a config alone, checked against what the machine has, before anything is allocated.

A request too large for the machine (`generate --width 100000 --height 100000`, `train --batch-size 100000`,
`--lora-rank 100000`) should be one line naming the estimate, not a 149 GiB allocation failure, a
RESOURCE_EXHAUSTED traceback or a SIGABRT a minute later. The estimates are deliberately rough (within a
factor of about two of a measured peak): weights, optimiser state, and the largest activations of one
transformer block (the rest of the forward pass frees as it goes), never the allocator's slack. They say
"certainly too large", not "certainly fits": `check` refuses only what is over what the machine has.

Framework-free: the device's free memory is the caller's to pass (`torch.cuda.mem_get_info`,
`jax.Device.memory_stats`); `available_bytes` reads the host's (Linux: MemAvailable and the cgroup limit).
"""

from __future__ import annotations

import os
from pathlib import Path

from minflux.errors import CheckpointError

GB = 1e9


class TooLarge(CheckpointError):
    """A run that cannot fit in the memory the machine has: the message names the estimate and the limit."""


def size(n: float) -> str:
    """Bytes for a reader: "3.2 GB", "149.0 GB", "2.1 TB"."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


# ---------------------------------------------------------------------------------------------
# What the machine has
# ---------------------------------------------------------------------------------------------


def _cgroup_limit() -> int | None:
    """The memory a container may use beyond what it uses now (cgroup v2, else v1); None without a limit."""
    for limit, used in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            text = Path(limit).read_text().strip()
            if text == "max" or int(text) >= 1 << 60:
                return None
            return max(0, int(text) - int(Path(used).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def available_bytes() -> int | None:
    """Host memory a new allocation can use now: Linux MemAvailable (free + reclaimable cache), capped by a
    cgroup limit; elsewhere the free physical pages. None when the system does not say."""
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    limit = _cgroup_limit()
    return found if limit is None else min(found, limit)


def nvidia_gpus() -> int:
    """NVIDIA GPUs this process may use, from the driver's files (no CUDA library loaded): 0 without a driver,
    or when CUDA_VISIBLE_DEVICES hides them all."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        n = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        n = sum(1 for d in os.listdir("/dev") if d[6:].isdigit() and d.startswith("nvidia"))
    if visible is not None and n:
        n = min(n, len([v for v in visible.split(",") if v.strip()]))
    return n


# ---------------------------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------------------------


def transformer_params(cfg) -> int:
    """Parameters of a FLUX transformer: every linear layer's weight and bias (`lora.linear_shapes`, tested
    against both models) and the q/k RMSNorm scales; within 0.1% of the models' own count."""
    from minflux import lora

    n = 0
    for out, inp in lora.linear_shapes(cfg).values():
        n += out * inp + (out if cfg.bias else 0)
    head = cfg.hidden_size // cfg.num_heads
    return n + 2 * head * (2 * cfg.depth + cfg.depth_single_blocks)


def autoencoder_params(ae_cfg) -> int:
    """Parameters of a FLUX autoencoder, approximately: 84 M at the official width 128, scaling with width^2."""
    return int(84e6 * (ae_cfg.ch / 128) ** 2)


def block_activation_bytes(
    cfg, tokens: int, batch: int, dtype_bytes: int = 2, attention_matrix: bool = False
) -> int:
    """The largest activations alive inside one transformer block: the stream (B, L, hidden) a few times over
    (input, norm, attention output, residual), q / k / v, the MLP's input projection (B, L, (2) x mlp) and,
    when attention is not fused (`attention_matrix`: XLA on a CPU), the fp32 scores (B, heads, L, L)."""
    h = cfg.hidden_size
    mlp = int(h * cfg.mlp_ratio) * (2 if cfg.gated_mlp else 1)
    n = batch * tokens * (7 * h + 2 * mlp) * dtype_bytes
    if attention_matrix:
        n += batch * cfg.num_heads * tokens * tokens * 4
    return n


def decode_bytes(ae_cfg, width: int, height: int, batch: int = 1, dtype_bytes: int = 4) -> int:
    """The autoencoder decoder's peak at full resolution: about six (B, H, W, ch) tensors (a resnet block's
    input, norms in fp32, convolution outputs, the residual), ch = the first level's width."""
    return 6 * batch * width * height * ae_cfg.ch * ae_cfg.ch_mult[0] * max(dtype_bytes, 4)


def generate_bytes(
    cfg,
    ae_cfg,
    width: int,
    height: int,
    batch: int = 1,
    txt_tokens: int = 512,
    dtype_bytes: int = 2,
    pixels_per_token: int = 16,
    attention_matrix: bool = False,
    cfg_scale: bool = False,
) -> int:
    """Peak bytes of `minflux generate`: the weights of both models, one block's activations for the image
    and text tokens (twice the batch under true CFG), and the decoder's peak (decoded one image at a time
    when it would not fit otherwise is not assumed)."""
    img = (width // pixels_per_token) * (height // pixels_per_token)
    b = batch * (2 if cfg_scale else 1)
    weights = transformer_params(cfg) * dtype_bytes + autoencoder_params(ae_cfg) * 4
    act = block_activation_bytes(cfg, img + txt_tokens, b, dtype_bytes, attention_matrix)
    return weights + max(act, decode_bytes(ae_cfg, width, height, batch))


def lora_rank_limit(cfg, lora_patterns=None) -> tuple[int, str]:
    """The largest useful LoRA rank for `cfg`: min(out, in) of the smallest layer the adapters target (a rank
    above it adds parameters, not expressiveness), and that layer's BFL name. Raises ValueError when the
    patterns target nothing (`lora.targets`)."""
    from minflux import lora

    shapes = lora.linear_shapes(cfg)
    chosen = lora.targets(shapes, lora_patterns) if lora_patterns else lora.targets(shapes)
    name = min(chosen, key=lambda m: min(shapes[m]))
    return min(shapes[name]), name


def train_bytes(
    cfg,
    img_tokens: int,
    txt_tokens: int,
    batch: int,
    lora_rank: int = 0,
    lora_patterns=None,
    ema: bool = False,
    remat: bool = True,
    dtype_bytes: int = 2,
    attention_matrix: bool = False,
    master_bytes: int = 4,
    shards: int = 1,
) -> int:
    """Peak bytes of one training step (`minflux train`) on one device: the master weights (`master_bytes`: 4 for
    fp32, 2 for `--precision bf16`), their gradients and Adam's two moments (+ an EMA copy) for full training,
    plus the weights cast to the compute dtype (`dtype_bytes`) where it differs; for LoRA the frozen weights in
    the compute dtype and the adapters (rank x (in + out) per targeted layer) with their gradients and moments.
    `shards`: the devices of the FSDP axis, over which all of that is sharded. Activations of `batch` samples
    (the per-device batch) of img_tokens + txt_tokens (image and reference tokens, text tokens): with remat,
    each block's input (B, L, hidden) kept for the backward pass plus one block recomputed (x 2 for its
    gradients); without, every block's activations.

    Checked against a measured peak: flux2-klein-4b, all bf16, remat, batch 1 x (4096 + 512) tokens on an H200
    (docs/benchmarks.md): 36.9 GB estimated with XLA's attention (`attention_matrix`) where 35.0 GB (32.6 GiB)
    was measured, 32.8 GB with the fused attention where 31.6 GB (29.4 GiB) was."""
    from minflux import lora

    tokens = img_tokens + txt_tokens
    p = transformer_params(cfg)
    if lora_rank:
        shapes = lora.linear_shapes(cfg)
        chosen = lora.targets(shapes, lora_patterns) if lora_patterns else lora.targets(shapes)
        adapters = sum(lora_rank * (shapes[m][0] + shapes[m][1]) for m in chosen)
        weights = p * dtype_bytes + adapters * master_bytes * (4 + (1 if ema else 0))
    else:
        cast = p * dtype_bytes if dtype_bytes != master_bytes else 0
        weights = p * master_bytes * (4 + (1 if ema else 0)) + cast
    blocks = cfg.depth + cfg.depth_single_blocks
    one = block_activation_bytes(cfg, tokens, batch, dtype_bytes, attention_matrix)
    act = (
        blocks * batch * tokens * cfg.hidden_size * dtype_bytes + 2 * one if remat else blocks * one
    )
    return weights // max(shards, 1) + act


def check(
    estimate: int, what: str, available: int | None = None, where: str = "this machine"
) -> None:
    """Raise `TooLarge` "WHAT needs about 149.0 GB of memory; this machine has 21.3 GB available" when the
    estimate exceeds `available` (default: the host's, `available_bytes`); nothing when it is unknown."""
    available = available_bytes() if available is None else available
    if available is not None and estimate > available:
        raise TooLarge(
            f"{what} needs about {size(estimate)} of memory; {where} has {size(available)} available"
        )
