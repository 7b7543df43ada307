"""CLIP text tower (FLUX.1's `vec`: CLIP-L pooled output, 768 wide) in PyTorch.

Follows transformers `models/clip/modeling_clip.py` (CLIPTextTransformer, the `text_model` of CLIPTextModel):
attribute names are the checkpoint keys (`embeddings.token_embedding`, `encoder.layers.N.self_attn.q_proj`,
`...mlp.fc1`, `final_layer_norm`). Pre-norm blocks, causal attention, quick_gelu; the pooled output is the final
hidden state at the first EOS token. Twin: `minflux_jax/text/clip.py`.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from minflux.text import CLIPTextConfig


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:  # (B, L) -> (B, L, D)
        return (
            self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]
        )


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with biases and the 1/sqrt(D) scale."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (
            rearrange(lin(x), "B L (H D) -> B H L D", H=self.num_heads)
            for lin in (self.q_proj, self.k_proj, self.v_proj)
        )
        x = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(x, "B H L D -> B L (H D)"))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick_gelu


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    """input_ids (B, L) -> (last_hidden_state (B, L, D), pooled (B, D)). FLUX passes no attention mask."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids)))
        # Legacy configs (eos_token_id 2, as CLIP-L's) pool at argmax(ids): EOS is the largest id in the vocab.
        eos = (
            input_ids if self.cfg.eos_token_id == 2 else (input_ids == self.cfg.eos_token_id).int()
        )
        return x, x[torch.arange(x.shape[0], device=x.device), eos.argmax(dim=-1)]
