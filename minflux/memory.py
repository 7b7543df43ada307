"""How much memory a FLUX run needs, from the config alone, and how much the machine has (stdlib only).

A request too large for the machine (`generate --width 100000 --height 100000`, `train --batch-size 100000`,
`bench --model flux2-dev` on a laptop) should be one line naming the estimate before anything is built, not
a 149 GiB allocation failure, a RESOURCE_EXHAUSTED traceback or a SIGABRT a minute later.

The estimates are deliberately simple and on the high side: the resident weights (exact: `param_count` is
checked against the models' own state dicts in tests) plus a rough bound on what one call adds: a block's
largest intermediates, attention scores where an implementation materialises them (XLA's attention; fused
kernels do not), a framework's own runtime, training's gradients and AdamW moments. They say "certainly too
large", not "certainly fits": `check` refuses only what exceeds what the machine has, and `minflux bench`
measures real peaks.

    memory.param_count(cfg)                                   # parameters of a transformer or autoencoder
    memory.estimate(cfg, "forward", 2, img_tokens=4096, txt_tokens=512)   # {"weights": .., "total": ..} bytes
    memory.check(memory.generate_bytes(cfg, ae_cfg, 1024, 1024), "--width 1024 --height 1024")
    memory.available()                                        # {"device": "cpu", "bytes": ...} this machine
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from minflux.errors import CheckpointError
from minflux.family import FAMILIES

KINDS = ("forward", "sample", "fp8", "train", "lora")
RUNTIME = 1_000_000_000  # bytes: a framework's own memory beside the model (libraries, compiler, thread stacks)
AE_PARAMS = 84_000_000  # the official autoencoders at width 128 (both families: within 1%)


class TooLarge(CheckpointError):
    """A run that cannot fit in the memory the machine has: the message names the estimate and the limit."""


def size(n: float) -> str:
    """Bytes for a reader: "3.2 GB", "149.0 GB", "2.1 TB"."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


gb = size  # (the name bench's messages used)


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


def gpu_memory() -> int | None:
    """Total bytes of the first NVIDIA GPU (`nvidia-smi`, which needs no framework), None without one."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return int(out.stdout.split()[0]) * 2**20 if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def available() -> dict:
    """{"device": "gpu" | "cpu" | "limit", "bytes": int | None}: a GPU's total memory where there is one (the
    run builds its models there), else the host's available memory. `MINFLUX_MEMORY_LIMIT` (bytes) overrides."""
    if os.environ.get("MINFLUX_MEMORY_LIMIT", "").isdigit():
        return {"device": "limit", "bytes": int(os.environ["MINFLUX_MEMORY_LIMIT"])}
    gpu = gpu_memory()
    if gpu is not None:
        return {"device": "gpu", "bytes": gpu}
    return {"device": "cpu", "bytes": available_bytes()}


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def param_count(cfg) -> int:
    """Parameters of a FLUX.1 / FLUX.2 transformer (BFL's layout: exact), or of an autoencoder (approximate,
    from the official autoencoders' 84 M scaled by channel width squared)."""
    if not hasattr(cfg, "depth"):
        return int(AE_PARAMS * (cfg.ch / 128) ** 2)
    rest, double, single = block_params(cfg)
    return rest + cfg.depth * double + cfg.depth_single_blocks * single


def block_params(cfg) -> tuple[int, int, int]:
    """(outside the blocks, one double block, one single block): a transformer's parameters in BFL's layout."""
    spec = FAMILIES[cfg.family]
    h, b = cfg.hidden_size, spec.bias
    m = int(h * cfg.mlp_ratio)
    gated = 2 if spec.gated_mlp else 1
    head = h // cfg.num_heads
    mlp_embedder = lambda n_in: _linear(n_in, h, b) + _linear(h, h, b)  # noqa: E731
    n = _linear(cfg.in_channels, h, b) + mlp_embedder(256) + _linear(cfg.context_in_dim, h, b)
    n += mlp_embedder(256) if cfg.guidance_embed else 0
    n += mlp_embedder(cfg.vec_in_dim) if spec.pooled_vec else 0
    qkv_bias = getattr(cfg, "qkv_bias", b)
    # attention: qkv, q/k norms, proj; then the MLP
    stream = _linear(h, 3 * h, qkv_bias) + 2 * head + _linear(h, h, b)
    stream += _linear(h, gated * m, b) + _linear(m, h, b)
    single = _linear(h, 3 * h + gated * m, b) + _linear(h + m, h, b) + 2 * head
    if spec.shared_modulation:  # FLUX.2: three modulations shared by every block
        n += 2 * _linear(h, 6 * h, b) + _linear(h, 3 * h, b)
    else:
        stream += _linear(h, 6 * h, b)
        single += _linear(h, 3 * h, b)
    out_channels = getattr(cfg, "out_channels", cfg.in_channels)
    n += _linear(h, 2 * h, b) + _linear(h, out_channels, b)  # final layer: adaLN, linear
    return n, 2 * stream, single


transformer_params = param_count  # (the name generate's and train's estimates used)


# ---------------------------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------------------------


def block_activation_bytes(
    cfg, tokens: int, batch: int, itemsize: int = 2, attention_scores: bool = False
) -> int:
    """The largest intermediates alive inside one transformer block, for `batch` sequences of `tokens`: about
    24 hidden-wide tensors per token, upcast to fp32 where norms, RoPE and softmax run, and, when attention
    is not fused (`attention_scores`: XLA's attention), the fp32 scores, probabilities and one more of their
    size (B, heads, L, L). Calibrated on XLA's buffer assignment for flux2-klein-4b at 1024 px in bf16 (6.4 GiB
    of temporaries, bench/bench_xla_cpu_memory.py), which this puts at 7.4 GB with the runtime."""
    n = 24 * batch * tokens * cfg.hidden_size * max(itemsize, 4)
    if attention_scores:
        n += 3 * batch * cfg.num_heads * tokens * tokens * 4
    return n


def decode_bytes(ae_cfg, width: int, height: int, batch: int = 1) -> int:
    """The autoencoder decoder's peak at full resolution: about six fp32 (B, H, W, ch) tensors (a resnet
    block's input, norms, convolution outputs, the residual), ch = the first level's width."""
    return 6 * batch * width * height * ae_cfg.ch * ae_cfg.ch_mult[0] * 4


def estimate(
    cfg,
    kind: str,
    itemsize: int,
    img_tokens: int,
    txt_tokens: int,
    batch: int = 1,
    attention_scores: bool = True,
    pixels: int = 0,
) -> dict[str, int]:
    """{"weights", "total"} bytes for one `kind` call of transformer `cfg` (see KINDS) with weights of
    `itemsize` bytes (2 for bf16, 4 for fp32): the weights (fp8: the block linears at 1 byte), one block's
    intermediates (`block_activation_bytes`) and the runtime; training adds gradients + AdamW's two moments
    (3 x weights) and one saved input per block (remat); `sample` adds the autoencoder and its decoder at
    `pixels` x `pixels`. Raises ValueError for an unknown kind."""
    if kind not in KINDS:
        raise ValueError(f"memory.estimate: kind {kind!r} is none of {', '.join(KINDS)}")
    params = param_count(cfg)
    weights = params * itemsize
    tokens = img_tokens + txt_tokens
    act = block_activation_bytes(cfg, tokens, batch, itemsize, attention_scores) + RUNTIME
    total = weights + act
    saved = (cfg.depth + cfg.depth_single_blocks) * batch * tokens * cfg.hidden_size * itemsize
    if kind == "fp8":  # block linears (nearly every weight) at one byte, the rest as before
        total -= int(0.95 * params) * (itemsize - 1)
    elif kind == "sample" and pixels:
        ch = 128 if pixels >= 256 else 32  # the decoder's last width (tiny autoencoders: 32)
        total += 4 * AE_PARAMS + 6 * batch * ch * pixels * pixels * 4
    elif kind == "train":
        total += 3 * weights + saved
    elif kind == "lora":
        total += saved
    return {"weights": weights, "total": int(total)}


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
    offload: bool = False,
) -> int:
    """Peak bytes of `minflux generate`: the weights of both models (with `offload`, the transformer's parts
    outside its blocks and two blocks: the one computing and the next), one block's activations for the image
    and text tokens (twice the batch under true CFG), or the decoder's peak, whichever is larger."""
    img = (width // pixels_per_token) * (height // pixels_per_token)
    b = batch * (2 if cfg_scale else 1)
    rest, double, single = block_params(cfg)
    resident = rest + 2 * max(double, single) if offload else param_count(cfg)
    weights = resident * dtype_bytes + param_count(ae_cfg) * 4
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
    each block's input (B, L, hidden) kept for the backward pass plus one block's intermediates (the block
    being recomputed); without, every block's intermediates.

    Checked against measured peaks: flux2-klein-4b, all bf16, remat, batch 1 x (4096 + 512) tokens on an H200
    (docs/benchmarks.md): 39.2 GB estimated with XLA's attention (`attention_matrix`) where 35.0 GB (32.6 GiB)
    was measured; 33.1 GB with the fused attention where 31.6 GB (29.4 GiB) was."""
    from minflux import lora

    tokens = img_tokens + txt_tokens
    p = param_count(cfg)
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
    saved = blocks * batch * tokens * cfg.hidden_size * dtype_bytes
    return weights // max(shards, 1) + (saved + one if remat else blocks * one)


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


# XLA's CPU backend runs bf16 dots in f32, and its default scheduler converts every bf16 weight to f32 at the
# start of the program: a bf16 forward held an f32 copy of all its weights at once (628 MiB of temporaries for
# 285 MiB of weights; flux2-klein-4b at 1024 px: 12.1 GiB). The memory-optimised scheduler converts each weight
# where it is used (181 MiB; 6.6 GiB), with the same numbers and no slower: bench/bench_xla_cpu_memory.py.
# Quantized layers rely on it too: it dequantizes each weight where it is used (`minflux_jax.quant`).
XLA_CPU_SCHEDULER = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def use_xla_cpu_memory_scheduler() -> None:
    """Add XLA_CPU_SCHEDULER to XLA_FLAGS for this process (before JAX starts), unless the user chose a CPU
    scheduler or the installed jaxlib predates the flag (an unknown flag would end JAX at start)."""
    from importlib import metadata

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_scheduler_type" in flags:
        return
    try:
        version = tuple(int(x) for x in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return
    if version >= (0, 10):  # (known to 0.10.2, the version this was measured with)
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_SCHEDULER}".strip()
