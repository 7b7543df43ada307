"""Qwen3 / Mistral decoder (FLUX.2's `ctx`: hidden states of three layers stacked) in PyTorch.

Follows transformers `models/qwen3/modeling_qwen3.py` and `models/mistral/modeling_mistral.py` (Qwen3Model,
MistralModel): attribute names are the checkpoint keys (`embed_tokens`, `layers.N.self_attn.q_proj`,
`...self_attn.q_norm` (Qwen3 only), `...mlp.gate_proj`, `...input_layernorm`). Grouped-query attention, RoPE in
the rotate-half layout, RMSNorm, SwiGLU. Only the first max(layers) layers are built: FLUX.2 reads hidden_states
(9, 18, 27) of Qwen3 and (10, 20, 30) of Mistral, never the final norm. Twin: `minflux_jax/text/decoder.py`.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from minflux.text import DecoderConfig


class RMSNorm(nn.Module):
    """transformers' Qwen3RMSNorm / MistralRMSNorm: normalise in fp32, cast back, then scale by `weight`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(
    length: int, head_dim: int, theta: float, dtype: torch.dtype, device
) -> tuple[Tensor, Tensor]:
    """cos, sin (L, head_dim) for positions 0..L-1: angles in fp32, then cast to the activations' dtype as
    transformers does. The inverse frequencies come from float64 so both frameworks share one table."""
    inv_freq = torch.from_numpy(
        (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)
    ).to(device)
    freqs = (
        torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    )  # (L, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, L, D) rotated in the rotate-half layout (pairs are (i, i + D/2), not interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """GQA self-attention: num_key_value_heads k/v heads, each shared by num_heads / num_kv consecutive q heads."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)
        if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim before RoPE
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor) -> Tensor:
        q = rearrange(self.q_proj(x), "B L (H D) -> B L H D", D=self.cfg.head_dim)
        k = rearrange(self.k_proj(x), "B L (H D) -> B L H D", D=self.cfg.head_dim)
        v = rearrange(self.v_proj(x), "B L (H D) -> B H L D", D=self.cfg.head_dim)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        n_rep = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        # A query with no allowed key (a pad before the prompt, with left padding) gives zeros, as torch's CPU SDPA
        # does and transformers inherits; done explicitly (attend anywhere, then zero) so no kernel can give NaN.
        some = allowed.any(dim=-1, keepdim=True)  # (B, 1, L, 1)
        x = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~some) * some
        return self.o_proj(rearrange(x, "B H L D -> B L (H D)"))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_padding_mask(mask: Tensor) -> Tensor:
    """Causal and key-padding mask (B, L) -> allowed (B, 1, L, L) bool."""
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return causal[None, None] & mask.bool()[:, None, None, :]


class DecoderModel(nn.Module):
    """input_ids, attention_mask (B, L) -> hidden_states[k] for k in `layers`, stacked: (B, L, len(layers) * D)."""

    def __init__(self, cfg: DecoderConfig, layers: tuple[int, ...]):
        super().__init__()
        self.cfg, self.out_layers = cfg, tuple(layers)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(max(layers))])

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(
            x.shape[1], self.cfg.head_dim, self.cfg.rope_theta, x.dtype, x.device
        )
        allowed = causal_padding_mask(attention_mask)
        hidden = {
            0: x
        }  # hidden_states[k] = the residual stream after k layers; keep only the stacked ones
        for k, layer in enumerate(self.layers, start=1):
            x = layer(x, cos, sin, allowed)
            if k in self.out_layers:
                hidden[k] = x
        return rearrange(
            torch.stack([hidden[k] for k in self.out_layers], dim=1), "B C L D -> B L (C D)"
        )
