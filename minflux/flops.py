"""Model FLOPs of the FLUX transformers, from the config alone (for MFU).

Counts every matrix multiply of one forward pass at 2 FLOPs per multiply-add: the linear layers (each
applied to the tokens that pass through it, or once per sample for the embedders and modulations) and
attention's two products, Q K^T and P V (4 L^2 hidden per block). Element-wise work (norms, RoPE,
softmax, activations) is left out, as is usual for MFU. A training step is counted as 3 forwards
(the backward pass does two matmuls per forward matmul); recomputation under remat is not model work
and is not counted. tests/test_train.py checks the count against PyTorch's FLOP counter.
"""

from __future__ import annotations

from minflux import family


def _linear(n_in: int, n_out: int, rows: int) -> int:
    return 2 * n_in * n_out * rows


def forward_flops(cfg, img_tokens: int, txt_tokens: int, batch: int = 1) -> int:
    """FLOPs of one forward pass of `cfg`'s transformer on `batch` samples of img_tokens + txt_tokens tokens."""
    if not family.is_transformer(cfg):
        raise ValueError(f"forward_flops: {cfg.family!r} is not a transformer config")
    spec = family.of(cfg)
    h, li, lt = cfg.hidden_size, img_tokens, txt_tokens
    n = li + lt
    m = int(h * cfg.mlp_ratio)
    gated = 2 if spec.gated_mlp else 1  # FLUX.2's SwiGLU projects to 2 m
    out_channels = getattr(
        cfg, "out_channels", cfg.in_channels
    )  # FLUX.2 predicts its input's width

    per_sample = _linear(256, h, 1) + _linear(h, h, 1)  # time_in
    per_sample += (_linear(256, h, 1) + _linear(h, h, 1)) if cfg.guidance_embed else 0
    if spec.pooled_vec:
        per_sample += _linear(cfg.vec_in_dim, h, 1) + _linear(h, h, 1)  # vector_in
    if spec.shared_modulation:  # three modulations shared by all blocks
        per_sample += 2 * _linear(h, 6 * h, 1) + _linear(h, 3 * h, 1)
    else:
        per_sample += cfg.depth * 2 * _linear(h, 6 * h, 1) + cfg.depth_single_blocks * _linear(
            h, 3 * h, 1
        )
    per_sample += _linear(h, 2 * h, 1)  # final adaLN

    tokens = (
        _linear(cfg.in_channels, h, li)
        + _linear(cfg.context_in_dim, h, lt)
        + _linear(h, out_channels, li)
    )

    def stream(rows: int) -> int:  # qkv, proj, MLP in and out
        return (
            _linear(h, 3 * h, rows)
            + _linear(h, h, rows)
            + _linear(h, gated * m, rows)
            + _linear(m, h, rows)
        )

    attention = 4 * n * n * h
    tokens += cfg.depth * (stream(li) + stream(lt) + attention)
    tokens += cfg.depth_single_blocks * (
        _linear(h, 3 * h + gated * m, n) + _linear(h + m, h, n) + attention
    )
    return batch * (per_sample + tokens)


def train_step_flops(cfg, img_tokens: int, txt_tokens: int, batch: int = 1) -> int:
    """Model FLOPs of one training step: forward + backward = 3 forwards (remat recomputation excluded)."""
    return 3 * forward_flops(cfg, img_tokens, txt_tokens, batch)


def lora_step_flops(cfg, img_tokens: int, txt_tokens: int, batch: int = 1) -> int:
    """Model FLOPs of one LoRA step: forward + the backward pass's input gradients = 2 forwards (the frozen
    weights get no gradient; the rank-r adapters' own matmuls are under 1% at rank 16 and left out)."""
    return 2 * forward_flops(cfg, img_tokens, txt_tokens, batch)


# Dense (no sparsity) tensor-core peaks in FLOP/s, (bf16, fp8 e4m3), matched against the device name.
PEAK_SOURCE = (
    "NVIDIA data sheets (H100/H200 SXM and PCIe/NVL, A100, L40S, B200), dense tensor-core figures, "
    "half the 'with sparsity' numbers"
)
PEAKS = {
    "H200": (989e12, 1979e12),
    "GH200": (989e12, 1979e12),
    "H100 PCIe": (756e12, 1513e12),
    "H100 NVL": (835e12, 1671e12),
    "H100": (989e12, 1979e12),
    "A100": (312e12, None),
    "L40S": (362e12, 733e12),
    "B200": (2250e12, 4500e12),
}
BF16_PEAK = {name: bf16 for name, (bf16, _) in PEAKS.items()}


def peak(device_name: str, dtype: str = "bf16") -> float | None:
    """The dense peak of a GPU from its name ("NVIDIA H100 80GB HBM3") for "bf16" or "fp8"; None when unknown."""
    for key in sorted(PEAKS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in device_name:
            return PEAKS[key][0 if dtype == "bf16" else 1]
    return None


def bf16_peak(device_name: str) -> float:
    """The bf16 dense peak of a GPU from its name ("NVIDIA H100 80GB HBM3"); ValueError when unknown."""
    value = peak(device_name)
    if value is None:
        raise ValueError(f"no bf16 peak known for GPU {device_name!r}: pass --peak-tflops")
    return value
