"""fp8 inference in PyTorch: float8_e4m3fn weights with scales, activations quantised on the fly.

Each block linear that sees tokens (qkv, proj, MLPs, linear1/2: the LoRA targets of `minflux.lora`) becomes an
`FP8Linear`: its weight is stored as e4m3 values q and an fp32 scale s with W ~ q * s, per tensor or per output
row; each call quantises its input the same way (per tensor or per token) and multiplies in fp8. On a CUDA
device that is `torch._scaled_mm` (cuBLASLt's fp8 GEMM on Hopper and later: fp8 products, fp32 accumulation);
elsewhere the same numbers are fake-quantised: q * s dequantised to fp32 and multiplied in fp32. Scales follow
the usual amax recipe (torchao's float8 "dynamic" scaling, NVIDIA Transformer Engine): s = amax / 448, the
largest finite e4m3 value. Embedders, modulations and the final layer stay in the model dtype.
Twin: `minflux_jax/fp8.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from minflux import lora

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value


def quantize(x: Tensor, axis: int | None = None) -> tuple[Tensor, Tensor]:
    """x -> (q float8_e4m3fn, scale fp32) with x ~ q * scale; one scale (axis None) or one per slice along the
    other axes (amax over `axis`, kept as a size-1 axis). Rounds to nearest even; clamps at +-448 first (a cast
    of anything larger would be NaN)."""
    amax = x.abs().amax() if axis is None else x.abs().amax(dim=axis, keepdim=True)
    scale = torch.clamp(amax.float(), min=1e-12) * (
        1 / E4M3_MAX
    )  # not / 448: XLA makes that this product
    q = torch.clamp(x.float() / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """q * scale in fp32."""
    return q.float() * scale


class FP8Linear(nn.Module):
    """An nn.Linear in fp8: weight (out, in) as e4m3 + scale, input quantised per call; output in the model dtype."""

    def __init__(self, linear: nn.Linear, scaling: str = "tensor"):
        super().__init__()
        if scaling not in ("tensor", "row"):
            raise ValueError(f"fp8 scaling {scaling!r}: expected 'tensor' or 'row'")
        self.scaling = scaling
        self.axis = (
            -1 if scaling == "row" else None
        )  # row: a scale per output row (weight) / per token (input)
        weight_q, weight_scale = quantize(linear.weight.detach(), self.axis)
        self.register_buffer("weight_q", weight_q)  # (out, in)
        self.register_buffer("weight_scale", weight_scale)  # () or (out, 1)
        self.bias = linear.bias
        self.out_dtype = linear.weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        xq, xs = quantize(x.reshape(-1, shape[-1]), self.axis)  # (M, in), () or (M, 1)
        if (
            xq.is_cuda
        ):  # fp8 x fp8 -> fp32 accumulate -> out dtype; the weight as a column-major (in, out)
            y = torch._scaled_mm(
                xq,
                self.weight_q.t(),
                scale_a=xs,
                scale_b=self.weight_scale.t(),
                out_dtype=self.out_dtype,
            )
        else:  # the same numbers, fake-quantised
            y = (dequantize(xq, xs) @ dequantize(self.weight_q, self.weight_scale).t()).to(
                self.out_dtype
            )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1)


def quantize_model(model: nn.Module, scaling: str = "tensor") -> nn.Module:
    """Swap every token-wise block linear (the `minflux.lora.DEFAULT_TARGETS`) for an FP8Linear, in place."""
    names = lora.targets([n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
    for name in names:
        parent, child = name.rsplit(".", 1)
        module = model.get_submodule(parent)
        setattr(module, child, FP8Linear(getattr(module, child), scaling))
    return model
