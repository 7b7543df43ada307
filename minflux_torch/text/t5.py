"""T5 v1.1 encoder (FLUX.1's `txt`: T5-XXL, 4096 wide) in PyTorch.

Follows transformers `models/t5/modeling_t5.py` (T5EncoderModel): attribute names are the checkpoint keys
(`shared`, `encoder.block.N.layer.0.SelfAttention.q`, `...layer.1.DenseReluDense.wi_0`, ...). T5 quirks kept:
no 1/sqrt(d) attention scale (folded into the init), a relative position bias computed by block 0 and shared by
all blocks, an RMS-style LayerNorm without mean or bias, gated tanh-GELU feed-forward, no biases at all.
Twin: `minflux_jax/text/t5.py`.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from minflux.text import T5Config


def relative_position_bucket(
    relative_position: Tensor, num_buckets: int, max_distance: int
) -> Tensor:
    """Bidirectional buckets: half per direction, exact below num_buckets/4, then log-spaced up to max_distance."""
    num_buckets //= 2
    buckets = (relative_position > 0).long() * num_buckets
    relative_position = relative_position.abs()
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # fp32 log as transformers computes it: the integer floors at bucket boundaries depend on it.
    large = (
        max_exact
        + (
            torch.log(relative_position.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = torch.minimum(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative_position, large)


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


class T5Attention(nn.Module):
    """Unscaled multi-head self-attention with an additive relative position bias."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.cfg = cfg
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(
                cfg.relative_attention_num_buckets, cfg.num_heads
            )

    def compute_bias(self, length: int) -> Tensor:  # -> (1, H, L, L)
        pos = torch.arange(length, device=self.q.weight.device)
        bucket = relative_position_bucket(
            pos[None, :] - pos[:, None],
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        )  # (L query, L key)
        return rearrange(self.relative_attention_bias(bucket), "Lq Lk H -> 1 H Lq Lk")

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        q, k, v = (
            rearrange(lin(x), "B L (H D) -> B H L D", H=self.cfg.num_heads)
            for lin in (self.q, self.k, self.v)
        )
        scores = q @ k.transpose(-1, -2) + position_bias  # (B, H, L, L), no 1/sqrt(D)
        attn = torch.softmax(scores.float(), dim=-1).type_as(scores)
        return self.o(rearrange(attn @ v, "B H L D -> B L (H D)"))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), position_bias)


class T5DenseGatedActDense(nn.Module):
    """gelu_tanh(wi_0 x) * wi_1 x -> wo."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(nn.functional.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList(
            [T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)]
        )

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](x, position_bias))


class T5Stack(nn.Module):
    """The encoder blocks and final norm; the token embedding is the parent's `shared` (a tied weight)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList(
            [T5Block(cfg, has_relative_attention_bias=i == 0) for i in range(cfg.num_layers)]
        )
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        position_bias = self.block[0].layer[0].SelfAttention.compute_bias(x.shape[1])
        for block in self.block:
            x = block(x, position_bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Module):
    """input_ids (B, L) -> last_hidden_state (B, L, d_model). FLUX passes no attention mask."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.encoder(self.shared(input_ids))
