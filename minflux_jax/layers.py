"""Layers shared by FLUX.1 and FLUX.2, in Flax NNX.

Follows black-forest-labs/flux `src/flux/modules/layers.py` and `src/flux/math.py`
and black-forest-labs/flux2 `src/flux2/model.py`. Attribute names are the
official checkpoint keys; `minflux.keymaps` maps kernels and scales generically.
Twin: `minflux_torch/layers.py` (same classes, order and local names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array

# ---------------------------------------------------------------------------------------------
# Positional and timestep embeddings (always fp32)
# ---------------------------------------------------------------------------------------------


def rope(pos: Array, dim: int, theta: int) -> Array:
    """Rotation matrices for one id axis: (..., N) positions -> (..., N, dim/2, 2, 2), fp32."""
    # omega in float64 as BFL does, then fp32 for the product: both frameworks use the same table.
    omega = jnp.asarray(
        (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
    )
    out = pos.astype(jnp.float32)[..., None] * omega  # (..., N, dim/2)
    out = jnp.stack([jnp.cos(out), -jnp.sin(out), jnp.sin(out), jnp.cos(out)], axis=-1)
    return rearrange(out, "... n d (i j) -> ... n d i j", i=2, j=2)


def apply_rope(xq: Array, xk: Array, freqs_cis: Array) -> tuple[Array, Array]:
    """Rotate q and k (B, H, L, D) pairwise by `freqs_cis` (B, 1, L, D/2, 2, 2), in fp32."""
    xq_ = xq.astype(jnp.float32).reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.astype(jnp.float32).reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(xq.shape).astype(xq.dtype), xk_out.reshape(xk.shape).astype(xk.dtype)


class EmbedND(nnx.Module):
    """RoPE over several id axes ((t, h, w) for FLUX.1, (t, h, w, l) for FLUX.2)."""

    def __init__(self, dim: int, theta: int, axes_dim: tuple[int, ...]):
        self.dim = dim
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def __call__(self, ids: Array) -> Array:  # (B, L, n_axes) -> (B, 1, L, D/2, 2, 2)
        emb = jnp.concatenate(
            [rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], axis=-3
        )
        return emb[:, None]


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
    t: Array, dim: int, max_period: int = 10_000, time_factor: float = 1000.0
) -> Array:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000), computed in fp32: (B,) -> (B, dim)."""
    # BFL computes this in the model dtype; t * 1000 in bf16 loses three digits, so we stay in fp32.
    t = time_factor * jnp.asarray(t, jnp.float32)
    half = dim // 2
    freqs = jnp.asarray(_freqs(half, max_period))
    args = t[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def linear(in_dim: int, out_dim: int, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """nn.Linear's twin: weights stored and computed in `dtype`."""
    return nnx.Linear(in_dim, out_dim, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class MLPEmbedder(nnx.Module):
    """Linear -> SiLU -> Linear (time, guidance and pooled-text embedders)."""

    def __init__(self, in_dim: int, hidden_dim: int, bias: bool = True, *, dtype, rngs: nnx.Rngs):
        self.in_layer = linear(in_dim, hidden_dim, bias, dtype, rngs)
        self.out_layer = linear(hidden_dim, hidden_dim, bias, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


# ---------------------------------------------------------------------------------------------
# Norms and attention
# ---------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """RMSNorm with a learned `scale`, normalising in fp32 (eps 1e-6)."""

    # rngs unused: ones, like BFL
    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs | None = None):
        self.scale = nnx.Param(jnp.ones(dim, dtype))

    def __call__(self, x: Array) -> Array:
        x_dtype = x.dtype
        x = x.astype(jnp.float32)
        rrms = jax.lax.rsqrt(jnp.mean(x**2, axis=-1, keepdims=True) + 1e-6)
        return (x * rrms).astype(x_dtype) * self.scale[...]


class QKNorm(nnx.Module):
    """Separate RMSNorms for queries and keys; the results take v's dtype."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs | None = None):
        self.query_norm = RMSNorm(dim, dtype=dtype)
        self.key_norm = RMSNorm(dim, dtype=dtype)

    def __call__(self, q: Array, k: Array, v: Array) -> tuple[Array, Array]:
        return self.query_norm(q).astype(v.dtype), self.key_norm(k).astype(v.dtype)


def layer_norm(dim: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """The parameter-free LayerNorm used before every modulation; exact (not fast) variance, as torch."""
    return nnx.LayerNorm(
        dim,
        epsilon=1e-6,
        use_bias=False,
        use_scale=False,
        use_fast_variance=False,
        dtype=dtype,
        rngs=rngs,
    )


def attention_backend(implementation: str, q: Array) -> str:
    """The jax.nn.dot_product_attention backend for q (B, H, L, D): "xla", "cudnn", or "auto" = cuDNN's fused
    flash attention on an NVIDIA GPU for bf16/fp16 with head_dim a multiple of 8 up to 128, else XLA's."""
    if implementation not in ("auto", "xla", "cudnn"):
        raise ValueError(
            f"attention implementation {implementation!r}: expected 'auto', 'xla' or 'cudnn'"
        )
    if implementation != "auto":
        return implementation
    d = q.shape[-1]
    fused = (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and d <= 128
        and d % 8 == 0
    )
    return "cudnn" if fused else "xla"


def _sdpa(q: Array, k: Array, v: Array, implementation: str = "auto") -> Array:
    backend = attention_backend(implementation, q)
    # jax.nn.dot_product_attention takes (B, L, H, D)
    qkv = (q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2))
    try:
        x = jax.nn.dot_product_attention(*qkv, implementation=backend)
    except (NotImplementedError, ValueError, RuntimeError):
        # "auto": XLA's where cuDNN refuses the shape
        if implementation != "auto":
            raise
        x = jax.nn.dot_product_attention(*qkv, implementation="xla")
    return x.swapaxes(1, 2)  # (B, H, L, D)


def attention(q: Array, k: Array, v: Array, pe: Array, implementation: str = "auto") -> Array:
    """RoPE, then softmax attention with SDPA's 1/sqrt(D) scale: (B, H, L, D) -> (B, L, H*D).

    implementation: see `attention_backend`; chosen per call when traced (the blocks pass their own
    `attention_implementation`), so it is part of the compiled program, never a global read later.
    """
    q, k = apply_rope(q, k, pe)
    # named, so a remat policy can keep attention outputs (train.REMAT_POLICIES["attention"])
    return checkpoint_name(
        rearrange(_sdpa(q, k, v, implementation), "B H L D -> B L (H D)"), "attention"
    )


@dataclass(frozen=True)
class RefKV:
    """FLUX.2 klein KV, one block: the keys and values (B, H, n_ref, D), after RoPE, of the reference tokens.
    The references attend only to themselves and are modulated at t = 0, so these are the same at every step
    (diffusers `Flux2KVLayerCache`). Inside a compiled loop the arrays are traced values, carried like any other."""

    k: Array
    v: Array


# a pytree: a block's `forward_kv` called as its own compiled program (`offload`) takes and returns one
jax.tree_util.register_dataclass(RefKV)


def attention_kv(
    q: Array, k: Array, v: Array, pe: Array, kv: RefKV | int, implementation: str = "auto"
) -> tuple[Array, RefKV]:
    """`attention` for klein KV; returns (out (B, L, H*D), the references' RefKV).

    kv = n_ref (the first step): the last n_ref tokens are the references; the others attend to every token, the
    references only to themselves, and their keys and values are returned. kv = a RefKV (later steps): the
    sequence holds no references and also attends to kv's keys and values, which are returned unchanged.
    """
    q, k = apply_rope(q, k, pe)
    if isinstance(kv, RefKV):
        k_all, v_all = jnp.concatenate((k, kv.k), axis=2), jnp.concatenate((v, kv.v), axis=2)
        return rearrange(_sdpa(q, k_all, v_all, implementation), "B H L D -> B L (H D)"), kv
    n = kv
    kv = RefKV(k[:, :, -n:], v[:, :, -n:])
    x = jnp.concatenate(
        (
            _sdpa(q[:, :, :-n], k, v, implementation),
            _sdpa(q[:, :, -n:], kv.k, kv.v, implementation),
        ),
        axis=2,
    )
    return rearrange(x, "B H L D -> B L (H D)"), kv


def set_attention_implementation(model: nnx.Module, implementation: str) -> nnx.Module:
    """Set every block's attention backend ("auto", "xla", "cudnn"); a static attribute, so it lives in the
    model's graphdef and each choice compiles its own program. Returns the model."""
    if implementation not in ("auto", "xla", "cudnn"):
        raise ValueError(
            f"attention implementation {implementation!r}: expected 'auto', 'xla' or 'cudnn'"
        )
    for _, m in nnx.iter_graph(model):
        if isinstance(m, (DoubleStreamBlockBase, SingleStreamBlockBase)):
            m.attention_implementation = implementation
    return model


class SelfAttention(nnx.Module):
    """Holds the fused qkv projection, QK norm and output projection (used by the double block)."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool, *, dtype, rngs: nnx.Rngs
    ):
        self.num_heads = num_heads
        self.qkv = linear(dim, dim * 3, qkv_bias, dtype, rngs)
        self.norm = QKNorm(dim // num_heads, dtype=dtype)
        self.proj = linear(dim, dim, proj_bias, dtype, rngs)

    def qkv_heads(self, x: Array) -> tuple[Array, Array, Array]:
        """Project, split the fused `(K H D)` axis and normalise q, k: 3 x (B, H, L, D)."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


# ---------------------------------------------------------------------------------------------
# Modulation, MLPs and the final layer
# ---------------------------------------------------------------------------------------------


Mod = tuple[Array, Array, Array]  # (shift, scale, gate), each (B, 1, D), or (B, L, D) per token


class Modulation(nnx.Module):
    """vec -> (shift, scale, gate) once or twice, each (B, 1, D)."""

    def __init__(self, dim: int, double: bool, bias: bool = True, *, dtype, rngs: nnx.Rngs):
        self.multiplier = 6 if double else 3
        self.lin = linear(dim, self.multiplier * dim, bias, dtype, rngs)

    def __call__(self, vec: Array) -> tuple[Mod, Mod | None]:
        out = jnp.split(self.lin(jax.nn.silu(vec))[:, None, :], self.multiplier, axis=-1)
        return tuple(out[:3]), (tuple(out[3:]) if self.multiplier == 6 else None)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    return (1 + scale) * x + shift


def silu_activation(x: Array) -> Array:
    """SwiGLU's gate: the first half, through SiLU, times the second half (FLUX.2)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jax.nn.silu(x1) * x2


def gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def mlp_activation(gated: bool):
    """GELU(tanh) (FLUX.1), or SwiGLU when `gated` (FLUX.2: the input is twice as wide)."""
    return silu_activation if gated else gelu_tanh


class Sequential(nnx.List):
    """nn.Sequential's twin whose children are named 0, 1, 2 like PyTorch's (nnx.Sequential adds `layers.`)."""

    def __call__(self, x: Array) -> Array:
        for layer in self:
            x = layer(x)
        return x


def mlp(dim: int, hidden: int, gated: bool, bias: bool, dtype, rngs: nnx.Rngs) -> Sequential:
    """The double block's MLP; indices 0 and 2 are the checkpoint's `img_mlp.0` / `img_mlp.2`."""
    return Sequential(
        [
            linear(dim, hidden * (2 if gated else 1), bias, dtype, rngs),
            mlp_activation(gated),
            linear(hidden, dim, bias, dtype, rngs),
        ]
    )


class LastLayer(nnx.Module):
    """adaLN (shift, scale) -- BFL order; diffusers stores (scale, shift) -- then a linear projection."""

    def __init__(
        self, hidden_size: int, out_channels: int, bias: bool = True, *, dtype, rngs: nnx.Rngs
    ):
        self.norm_final = layer_norm(hidden_size, dtype, rngs)
        self.linear = linear(hidden_size, out_channels, bias, dtype, rngs)
        self.adaLN_modulation = Sequential(
            [jax.nn.silu, linear(hidden_size, 2 * hidden_size, bias, dtype, rngs)]
        )

    def __call__(self, x: Array, vec: Array) -> Array:
        shift, scale = jnp.split(self.adaLN_modulation(vec)[:, None, :], 2, axis=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------------
# The two block types; flux1.py / flux2.py add where their modulation comes from.
# qkv_bias, bias: whether the qkv / every other linear has a bias; gated_mlp: SwiGLU (FLUX.2) or GELU(tanh).
# ---------------------------------------------------------------------------------------------


class DoubleStreamBlockBase(nnx.Module):
    """Separate weights for image and text tokens, joint attention over both (text first)."""

    # see `attention_backend`; `set_attention_implementation` changes it
    attention_implementation = "auto"

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        qkv_bias: bool,
        bias: bool,
        gated_mlp: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_norm1 = layer_norm(hidden_size, dtype, rngs)
        self.img_attn = SelfAttention(
            hidden_size, num_heads, qkv_bias, bias, dtype=dtype, rngs=rngs
        )
        self.img_norm2 = layer_norm(hidden_size, dtype, rngs)
        self.img_mlp = mlp(hidden_size, mlp_hidden, gated_mlp, bias, dtype, rngs)
        self.txt_norm1 = layer_norm(hidden_size, dtype, rngs)
        self.txt_attn = SelfAttention(
            hidden_size, num_heads, qkv_bias, bias, dtype=dtype, rngs=rngs
        )
        self.txt_norm2 = layer_norm(hidden_size, dtype, rngs)
        self.txt_mlp = mlp(hidden_size, mlp_hidden, gated_mlp, bias, dtype, rngs)

    def stream(
        self,
        img: Array,
        txt: Array,
        pe: Array,
        img_mod: tuple[Mod, Mod],
        txt_mod: tuple[Mod, Mod],
        kv: RefKV | int | None = None,
    ) -> tuple[Array, Array, RefKV | None]:
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
        q = jnp.concatenate((txt_q, img_q), axis=2)  # (B, H, Lt+Li, D)
        k = jnp.concatenate((txt_k, img_k), axis=2)
        v = jnp.concatenate((txt_v, img_v), axis=2)
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


class SingleStreamBlockBase(nnx.Module):
    """Parallel attention + MLP on the joint sequence, fused into linear1 / linear2."""

    attention_implementation = "auto"

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        bias: bool,
        gated_mlp: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        # linear1 = [q k v | mlp in]; a gated (SwiGLU) mlp part is twice as wide, gate first.
        self.mlp_in = int(hidden_size * mlp_ratio) * (2 if gated_mlp else 1)
        self.linear1 = linear(hidden_size, 3 * hidden_size + self.mlp_in, bias, dtype, rngs)
        self.linear2 = linear(
            hidden_size + int(hidden_size * mlp_ratio), hidden_size, bias, dtype, rngs
        )
        self.norm = QKNorm(hidden_size // num_heads, dtype=dtype)
        self.pre_norm = layer_norm(hidden_size, dtype, rngs)
        self.mlp_act = mlp_activation(gated_mlp)

    def stream(
        self, x: Array, pe: Array, mod: Mod, kv: RefKV | int | None = None
    ) -> tuple[Array, RefKV | None]:
        """x (B, L, D) joint [txt, img] tokens. Returns x and, with klein KV's `kv` (see `attention_kv`), the
        block's reference keys and values (else None)."""
        shift, scale, gate = mod
        qkv, mlp_in = jnp.split(
            self.linear1(modulate(self.pre_norm(x), shift, scale)), [3 * self.hidden_size], axis=-1
        )
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        if kv is None:
            attn = attention(q, k, v, pe, self.attention_implementation)
        else:
            attn, kv = attention_kv(q, k, v, pe, kv, self.attention_implementation)
        out = self.linear2(jnp.concatenate((attn, self.mlp_act(mlp_in)), axis=2))
        return x + gate * out, kv


# ---------------------------------------------------------------------------------------------
# How a forward runs its blocks
# ---------------------------------------------------------------------------------------------


class BlockRunner(Protocol):
    """What a model's forward calls each block and the final layer through: `run(block, *args, **kwargs)`
    returns what `block(*args, **kwargs)` returns; klein KV passes a block's method instead (`block.forward_kv`).
    Training passes one that remats each block and gathers its FSDP-sharded weights (`train.block_runner`);
    parity one that loads a block's weights, runs it, records its inputs and output and frees the weights
    (`parity.transformer`); offloading one that moves a block's weights onto the device before the call and
    off it after (`offload.Offloader`)."""

    def __call__(self, block: nnx.Module, /, *args: Any, **kwargs: Any) -> Any: ...


def call_block(block: nnx.Module, /, *args: Any, **kwargs: Any) -> Any:
    """The default `BlockRunner`: run the block."""
    return block(*args, **kwargs)
