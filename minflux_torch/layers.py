"""Layers shared by FLUX.1 and FLUX.2, in PyTorch.

Follows black-forest-labs/flux `src/flux/modules/layers.py` and `src/flux/math.py`
and black-forest-labs/flux2 `src/flux2/model.py`. Attribute names are the
official checkpoint keys, so `load_state_dict(strict=True)` needs no renaming.
Twin: `minflux_jax/layers.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------
# Positional and timestep embeddings (always fp32)
# ---------------------------------------------------------------------------------------------


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices for one id axis: (..., N) positions -> (..., N, dim/2, 2, 2), fp32."""
    # omega in float64 as BFL does, then fp32 for the product: both frameworks use the same table.
    omega = torch.from_numpy(
        (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
    )
    out = pos.float()[..., None] * omega.to(pos.device)  # (..., N, dim/2)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return rearrange(out, "... n d (i j) -> ... n d i j", i=2, j=2)


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q and k (B, H, L, D) pairwise by `freqs_cis` (B, 1, L, D/2, 2, 2), in fp32."""
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


class EmbedND(nn.Module):
    """RoPE over several id axes ((t, h, w) for FLUX.1, (t, h, w, l) for FLUX.2)."""

    def __init__(self, dim: int, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:  # (B, L, n_axes) -> (B, 1, L, D/2, 2, 2)
        emb = torch.cat(
            [rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3
        )
        return emb.unsqueeze(1)


def _freqs(half: int, max_period: int) -> np.ndarray:
    # BFL's (and diffusers') frequencies, exp(-log(max_period) * arange(half) / half) with the exponent in fp32,
    # the table computed once in numpy: the exponent's fp32 products and quotient are IEEE-exact, so bitwise
    # torch's; exp is taken in float64 and rounded once, because the frameworks' fp32 exp() differ in the last
    # bit (torch's from the correctly rounded one in 3 of 128 entries, JAX's on CPU in 14), and at t * 1000
    # an ulp moves sin/cos by ~1e-5. (An exponent kept in float64 instead moves 87 of the 128 frequencies by up
    # to 7 ulps off BFL's, sin/cos by up to 2.3e-4 at guidance 2.5: the gradient of guidance_in then differed
    # from diffusers' training step by 3.2e-5.)
    exponent = (
        np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    )
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(
    t: Tensor, dim: int, max_period: int = 10_000, time_factor: float = 1000.0
) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000), computed in fp32: (B,) -> (B, dim)."""
    # BFL computes this in the model dtype; t * 1000 in bf16 loses three digits, so we stay in fp32.
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.from_numpy(_freqs(half, max_period)).to(t.device)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (time, guidance and pooled-text embedders)."""

    def __init__(self, in_dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(nn.functional.silu(self.in_layer(x)))


# ---------------------------------------------------------------------------------------------
# Norms and attention
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm with a learned `scale`, normalising in fp32 (eps 1e-6)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(x_dtype) * self.scale


class QKNorm(nn.Module):
    """Separate RMSNorms for queries and keys; the results take v's dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


def layer_norm(dim: int) -> nn.LayerNorm:
    """The parameter-free LayerNorm used before every modulation."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def _sdpa(q: Tensor, k: Tensor, v: Tensor, implementation: str = "auto") -> Tensor:
    if implementation == "auto":
        # SDPA's own pick: flash / cuDNN fused kernels on a GPU where they apply
        return nn.functional.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[implementation])):
        return nn.functional.scaled_dot_product_attention(q, k, v)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, implementation: str = "auto") -> Tensor:
    """RoPE, then softmax attention with SDPA's 1/sqrt(D) scale: (B, H, L, D) -> (B, L, H*D).

    implementation: "auto" (SDPA picks) or one of SDPA_BACKENDS forced through `torch.nn.attention.sdpa_kernel`;
    the blocks pass their own `attention_implementation`.
    """
    q, k = apply_rope(q, k, pe)
    return rearrange(_sdpa(q, k, v, implementation), "B H L D -> B L (H D)")


@dataclass(frozen=True)
class RefKV:
    """FLUX.2 klein KV, one block: the keys and values (B, H, n_ref, D), after RoPE, of the reference tokens.
    The references attend only to themselves and are modulated at t = 0, so these are the same at every step
    (diffusers `Flux2KVLayerCache`)."""

    k: Tensor
    v: Tensor


def attention_kv(
    q: Tensor, k: Tensor, v: Tensor, pe: Tensor, kv: RefKV | int, implementation: str = "auto"
) -> tuple[Tensor, RefKV]:
    """`attention` for klein KV; returns (out (B, L, H*D), the references' RefKV).

    kv = n_ref (the first step): the last n_ref tokens are the references; the others attend to every token, the
    references only to themselves, and their keys and values are returned. kv = a RefKV (later steps): the
    sequence holds no references and also attends to kv's keys and values, which are returned unchanged.
    """
    q, k = apply_rope(q, k, pe)
    if isinstance(kv, RefKV):
        k_all, v_all = torch.cat((k, kv.k), dim=2), torch.cat((v, kv.v), dim=2)
        return rearrange(_sdpa(q, k_all, v_all, implementation), "B H L D -> B L (H D)"), kv
    n = kv
    kv = RefKV(k[:, :, -n:], v[:, :, -n:])
    x = torch.cat(
        (
            _sdpa(q[:, :, :-n], k, v, implementation),
            _sdpa(q[:, :, -n:], kv.k, kv.v, implementation),
        ),
        dim=2,
    )
    return rearrange(x, "B H L D -> B L (H D)"), kv


def set_attention_implementation(model: nn.Module, implementation: str) -> nn.Module:
    """Set every block's attention backend ("auto" or a key of SDPA_BACKENDS). Returns the model."""
    if implementation != "auto" and implementation not in SDPA_BACKENDS:
        raise ValueError(
            f"attention implementation {implementation!r}: expected 'auto' or one of "
            f"{', '.join(SDPA_BACKENDS)}"
        )
    for m in model.modules():
        if isinstance(m, (DoubleStreamBlockBase, SingleStreamBlockBase)):
            m.attention_implementation = implementation
    return model


class SelfAttention(nn.Module):
    """Holds the fused qkv projection, QK norm and output projection (used by the double block)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project, split the fused `(K H D)` axis and normalise q, k: 3 x (B, H, L, D)."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


# ---------------------------------------------------------------------------------------------
# Modulation, MLPs and the final layer
# ---------------------------------------------------------------------------------------------


Mod = tuple[Tensor, Tensor, Tensor]  # (shift, scale, gate), each (B, 1, D), or (B, L, D) per token


class Modulation(nn.Module):
    """vec -> (shift, scale, gate) once or twice, each (B, 1, D)."""

    def __init__(self, dim: int, double: bool, bias: bool = True):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=bias)

    def forward(self, vec: Tensor) -> tuple[Mod, Mod | None]:
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return out[:3], (out[3:] if self.multiplier == 6 else None)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * x + shift


class SiLUActivation(nn.Module):
    """SwiGLU's gate: the first half, through SiLU, times the second half (FLUX.2)."""

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return nn.functional.silu(x1) * x2


def mlp_activation(gated: bool) -> nn.Module:
    """GELU(tanh) (FLUX.1), or SwiGLU when `gated` (FLUX.2: the input is twice as wide)."""
    return SiLUActivation() if gated else nn.GELU(approximate="tanh")


def mlp(dim: int, hidden: int, gated: bool, bias: bool) -> nn.Sequential:
    """The double block's MLP; indices 0 and 2 are the checkpoint's `img_mlp.0` / `img_mlp.2`."""
    return nn.Sequential(
        nn.Linear(dim, hidden * (2 if gated else 1), bias=bias),
        mlp_activation(gated),
        nn.Linear(hidden, dim, bias=bias),
    )


class LastLayer(nn.Module):
    """adaLN (shift, scale) -- BFL order; diffusers stores (scale, shift) -- then a linear projection."""

    def __init__(self, hidden_size: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.norm_final = layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels, bias=bias)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=bias)
        )

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------------
# The two block types; flux1.py / flux2.py add where their modulation comes from.
# qkv_bias, bias: whether the qkv / every other linear has a bias; gated_mlp: SwiGLU (FLUX.2) or GELU(tanh).
# ---------------------------------------------------------------------------------------------


class DoubleStreamBlockBase(nn.Module):
    """Separate weights for image and text tokens, joint attention over both (text first)."""

    attention_implementation = "auto"  # see `attention`; `set_attention_implementation` changes it

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        qkv_bias: bool,
        bias: bool,
        gated_mlp: bool,
    ):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_norm1 = layer_norm(hidden_size)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias, proj_bias=bias)
        self.img_norm2 = layer_norm(hidden_size)
        self.img_mlp = mlp(hidden_size, mlp_hidden, gated_mlp, bias)
        self.txt_norm1 = layer_norm(hidden_size)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias, proj_bias=bias)
        self.txt_norm2 = layer_norm(hidden_size)
        self.txt_mlp = mlp(hidden_size, mlp_hidden, gated_mlp, bias)

    def stream(
        self,
        img: Tensor,
        txt: Tensor,
        pe: Tensor,
        img_mod: tuple[Mod, Mod],
        txt_mod: tuple[Mod, Mod],
        kv: RefKV | int | None = None,
    ) -> tuple[Tensor, Tensor, RefKV | None]:
        """img (B, Li, D), txt (B, Lt, D), pe for [txt, img]. Returns img, txt and, with klein KV's `kv` (see
        `attention_kv`), the block's reference keys and values (else None)."""
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = img_mod
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = txt_mod

        img_q, img_k, img_v = self.img_attn.qkv_heads(
            modulate(self.img_norm1(img), img_shift1, img_scale1)
        )
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(
            modulate(self.txt_norm1(txt), txt_shift1, txt_scale1)
        )
        q = torch.cat((txt_q, img_q), dim=2)  # (B, H, Lt+Li, D)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        if kv is None:
            attn = attention(q, k, v, pe, self.attention_implementation)
        else:
            attn, kv = attention_kv(q, k, v, pe, kv, self.attention_implementation)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2))
        return img, txt, kv


class SingleStreamBlockBase(nn.Module):
    """Parallel attention + MLP on the joint sequence, fused into linear1 / linear2."""

    attention_implementation = "auto"

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, *, bias: bool, gated_mlp: bool
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        # linear1 = [q k v | mlp in]; a gated (SwiGLU) mlp part is twice as wide, gate first.
        self.mlp_in = int(hidden_size * mlp_ratio) * (2 if gated_mlp else 1)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_in, bias=bias)
        self.linear2 = nn.Linear(hidden_size + int(hidden_size * mlp_ratio), hidden_size, bias=bias)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = layer_norm(hidden_size)
        self.mlp_act = mlp_activation(gated_mlp)

    def stream(
        self, x: Tensor, pe: Tensor, mod: Mod, kv: RefKV | int | None = None
    ) -> tuple[Tensor, RefKV | None]:
        """x (B, L, D) joint [txt, img] tokens. Returns x and, with klein KV's `kv` (see `attention_kv`), the
        block's reference keys and values (else None)."""
        shift, scale, gate = mod
        qkv, mlp_in = torch.split(
            self.linear1(modulate(self.pre_norm(x), shift, scale)),
            [3 * self.hidden_size, self.mlp_in],
            dim=-1,
        )
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        if kv is None:
            attn = attention(q, k, v, pe, self.attention_implementation)
        else:
            attn, kv = attention_kv(q, k, v, pe, kv, self.attention_implementation)
        out = self.linear2(torch.cat((attn, self.mlp_act(mlp_in)), dim=2))
        return x + gate * out, kv


# ---------------------------------------------------------------------------------------------
# How a forward runs its blocks
# ---------------------------------------------------------------------------------------------


class BlockRunner(Protocol):
    """What a model's forward calls each block and the final layer through: `run(block, *args, **kwargs)`
    returns what `block(*args, **kwargs)` returns; klein KV passes a block's method instead (`block.forward_kv`).
    Training passes one that checkpoints each block (`train.block_runner`); parity one that loads a block's
    weights, runs it, records its inputs and output and frees the weights (`parity.transformer`); offloading one
    that moves a block's weights onto the device before the call and off it after (`offload.Offloader`)."""

    def __call__(self, block: nn.Module, /, *args: Any, **kwargs: Any) -> Any: ...


def call_block(block: nn.Module, /, *args: Any, **kwargs: Any) -> Any:
    """The default `BlockRunner`: run the block."""
    return block(*args, **kwargs)
