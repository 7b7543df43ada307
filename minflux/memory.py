"""How much memory a FLUX run needs, from the config alone, and how much the machine has (stdlib only).

The estimates are deliberately simple and on the high side: the resident weights (exact: `param_count` is
checked against the models' own state dicts in tests/test_bench.py) plus a rough bound on what one call adds
(the largest block's activations, attention scores where an implementation materialises them, training's
gradients and AdamW moments). They exist to refuse a run that cannot fit before anything is built, naming
the figure, not to predict a peak: `minflux bench` measures peaks.

    memory.param_count(cfg)                                   # parameters of a transformer or autoencoder
    memory.estimate(cfg, "forward", 2, img_tokens=4096, txt_tokens=512)   # {"weights": .., "total": ..} bytes
    memory.available()                                        # {"device": "cpu", "bytes": ...} this machine
"""

from __future__ import annotations

import os
import shutil
import subprocess

KINDS = ("forward", "sample", "fp8", "train", "lora")
RUNTIME = 1_000_000_000  # bytes: a framework's own memory beside the model (libraries, compiler, thread stacks)


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def param_count(cfg) -> int:
    """Parameters of a FLUX.1 / FLUX.2 transformer (BFL's layout), or of an autoencoder (approximate, from the
    full autoencoders' 84 M scaled by channel width squared)."""
    if not hasattr(cfg, "depth"):
        return int(84e6 * (cfg.ch / 128) ** 2)
    h, b = cfg.hidden_size, cfg.bias
    m = int(h * cfg.mlp_ratio)
    gated = 2 if cfg.gated_mlp else 1
    head = h // cfg.num_heads
    mlp_embedder = lambda n_in: _linear(n_in, h, b) + _linear(h, h, b)  # noqa: E731
    n = _linear(cfg.in_channels, h, b) + mlp_embedder(256) + _linear(cfg.context_in_dim, h, b)
    n += mlp_embedder(256) if cfg.guidance_embed else 0
    n += mlp_embedder(cfg.vec_in_dim) if cfg.family == "flux1" else 0
    qkv_bias = getattr(cfg, "qkv_bias", b)
    # attention: qkv, q/k norms, proj
    stream = _linear(h, 3 * h, qkv_bias) + 2 * head + _linear(h, h, b)
    stream += _linear(h, gated * m, b) + _linear(m, h, b)  # MLP
    single = _linear(h, 3 * h + gated * m, b) + _linear(h + m, h, b) + 2 * head
    if cfg.shared_modulation:  # FLUX.2: three modulations shared by every block
        n += 2 * _linear(h, 6 * h, b) + _linear(h, 3 * h, b)
    else:
        stream += _linear(h, 6 * h, b)
        single += _linear(h, 3 * h, b)
    out_channels = getattr(cfg, "out_channels", cfg.in_channels)
    n += cfg.depth * 2 * stream + cfg.depth_single_blocks * single
    return n + _linear(h, 2 * h, b) + _linear(h, out_channels, b)  # final layer: adaLN, linear


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
    `itemsize` bytes (2 for bf16, 4 for fp32).

    total = weights (fp8: the block linears at 1 byte) + activations: a block's largest intermediates (about 24
    hidden-wide fp32 tensors per token), attention scores and probabilities in fp32 when `attention_scores`
    (XLA's attention; fused kernels do not hold them), 1 GB for the runtime, and for training gradients +
    AdamW's two moments (3 x weights) and one saved input per block (remat). `sample` adds the autoencoder and
    its decoder's activations at `pixels` x `pixels`.
    """
    if kind not in KINDS:
        raise ValueError(f"memory.estimate: kind {kind!r} is none of {', '.join(KINDS)}")
    params = param_count(cfg)
    weights = params * itemsize
    tokens = batch * (img_tokens + txt_tokens)
    h = cfg.hidden_size
    # a block's intermediates, upcast to fp32 where norms, RoPE and softmax run, and the runtime itself (a
    # compiler, thread pools): XLA's buffer assignment for flux2-klein-4b at 1024 px in bf16 holds 6.4 GiB of
    # temporaries (bench/bench_xla_cpu_memory.py), which this puts at 7.4 GB
    act = 24 * tokens * h * max(itemsize, 4) + RUNTIME
    if attention_scores:  # scores, probabilities and one more of their size, in fp32
        act += 3 * batch * cfg.num_heads * (img_tokens + txt_tokens) ** 2 * 4
    total = weights + act
    if kind == "fp8":  # block linears (nearly every weight) at one byte, the rest as before
        total -= int(0.95 * params) * (itemsize - 1)
    elif kind == "sample" and pixels:
        ch = 128 if pixels >= 256 else 32  # the decoder's last width (tiny autoencoders: 32)
        total += 4 * 84_000_000 + 6 * batch * ch * pixels * pixels * 4
    elif kind == "train":
        total += 3 * weights + (cfg.depth + cfg.depth_single_blocks) * tokens * h * itemsize
    elif kind == "lora":
        total += (cfg.depth + cfg.depth_single_blocks) * tokens * h * itemsize
    return {"weights": weights, "total": int(total)}


def host_available() -> int | None:
    """Bytes this process could still allocate on the host: MemAvailable, capped by a cgroup memory limit."""
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ":" in ln}
        avail = info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return None
    for path, used in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            with open(path) as f, open(used) as g:
                limit, current = f.read().strip(), g.read().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            avail = min(avail, int(limit) - int(current))
    return avail


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
    """{"device": "gpu" | "cpu", "bytes": int | None}: a GPU's total memory where there is one (the run builds
    its models there), else the host's available memory. `MINFLUX_MEMORY_LIMIT` (bytes) overrides both."""
    if os.environ.get("MINFLUX_MEMORY_LIMIT", "").isdigit():
        return {"device": "limit", "bytes": int(os.environ["MINFLUX_MEMORY_LIMIT"])}
    gpu = gpu_memory()
    if gpu is not None:
        return {"device": "gpu", "bytes": gpu}
    return {"device": "cpu", "bytes": host_available()}


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"
