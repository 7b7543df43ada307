"""FLUX.1 Redux in PyTorch: the SigLIP vision tower, the Redux image embedder, and the prompt they extend.

```python
from minflux_torch import redux
enc = redux.load_redux("FLUX.1-Redux-dev/", dtype=torch.bfloat16)   # SigLIP + embedder + preprocessing
tokens = enc.encode(["style.png"])                                # (1, 729, 4096), T5 space
txt, vec = redux.redux_prompt(txt, vec, tokens)                   # (1, 512 + 729, 4096), (1, 768)
```

SigLIP follows transformers `models/siglip/modeling_siglip.py` (`SiglipVisionModel`: patch conv, learned
positions, pre-norm blocks with tanh-GELU MLPs, `post_layernorm`; the pooling head is not built, Redux reads
`last_hidden_state`); attribute names are the checkpoint keys. The embedder is BFL's `ReduxImageEncoder`
(black-forest-labs/flux `src/flux/modules/image_embedders.py`; diffusers `pipelines/flux/modeling_flux.py`),
`redux_prompt` is `sampling.prepare_redux` with diffusers `FluxPriorReduxPipeline`'s per-image scales.
Twin: `minflux_jax/redux.py`, whose pixels are NHWC where these are NCHW.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from minflux import redux, text
from minflux.redux import SiglipVisionConfig
from minflux_torch.load import to_torch

# ---------------------------------------------------------------------------------------------
# SigLIP vision tower
# ---------------------------------------------------------------------------------------------


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Embedding(
            (cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size
        )

    def forward(
        self, pixels: Tensor
    ) -> Tensor:  # (B, 3, H, W) -> (B, N, D), N = (H / patch) * (W / patch)
        x = rearrange(self.patch_embedding(pixels), "B D h w -> B (h w) D")
        return (
            x + self.position_embedding.weight
        )  # no interpolation: the image is resized to image_size


class SiglipAttention(nn.Module):
    """Bidirectional multi-head self-attention with biases and the 1/sqrt(D) scale."""

    def __init__(self, cfg: SiglipVisionConfig):
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
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out_proj(rearrange(x, "B H L D -> B L (H D)"))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))  # gelu_pytorch_tanh


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    """pixel values (B, 3, image_size, image_size), normalised to [-1, 1] -> last_hidden_state (B, N, D)."""

    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixels)))


# ---------------------------------------------------------------------------------------------
# The Redux embedder
# ---------------------------------------------------------------------------------------------


class ReduxImageEncoder(nn.Module):
    """SigLIP tokens (B, N, redux_dim) -> T5-space tokens (B, N, txt_in_features): down(silu(up(x)))."""

    def __init__(self, redux_dim: int = 1152, txt_in_features: int = 4096):
        super().__init__()
        self.redux_up = nn.Linear(redux_dim, txt_in_features * 3)
        self.redux_down = nn.Linear(txt_in_features * 3, txt_in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.redux_down(nn.functional.silu(self.redux_up(x)))


def _load(module: nn.Module, directory, spec: text.EncoderSpec, dtype, device) -> nn.Module:
    """Stream a checked checkpoint into `module` (built on the meta device), strictly."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    state = {
        k: to_torch(a).to(device=device, dtype=dtype)
        for k, a in text.read_weights(directory, spec, expected)
    }
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_siglip(
    directory, dtype: torch.dtype = torch.bfloat16, device="cpu"
) -> SiglipVisionTransformer:
    """The SigLIP vision tower from a Hugging Face directory (config.json + safetensors), cast to `dtype`."""
    with torch.device("meta"):
        model = SiglipVisionTransformer(redux.read_config(directory))
    return _load(model, directory, redux.SIGLIP, dtype, device)


def load_embedder(path, dtype: torch.dtype = torch.bfloat16, device="cpu") -> ReduxImageEncoder:
    """The Redux embedder from the official file (flux1-redux-dev.safetensors or diffusers' image_embedder/)."""
    with torch.device("meta"):
        model = ReduxImageEncoder(*redux.embedder_dims(path))
    return _load(model, path, redux.EMBEDDER, dtype, device)


class ReduxEncoder:
    """SigLIP, its preprocessing and the embedder: `encode(images)` -> (N, 729, 4096) tokens for `redux_prompt`."""

    def __init__(
        self,
        siglip: SiglipVisionTransformer,
        embedder: ReduxImageEncoder,
        preprocessor: redux.Preprocessor,
    ):
        self.siglip, self.embedder, self.preprocessor = siglip, embedder, preprocessor

    @torch.no_grad()
    def encode(self, images) -> Tensor:
        """Image paths, PIL images or uint8 (H, W, 3) arrays -> (N, tokens, txt_in_features) in the model dtype."""
        p = next(self.siglip.parameters())
        pixels = torch.from_numpy(self.preprocessor(images)).to(device=p.device, dtype=p.dtype)
        return self.embedder(self.siglip(pixels))


def load_redux(
    directory, dtype: torch.dtype = torch.bfloat16, device="cpu", *, embedder=None
) -> ReduxEncoder:
    """Redux from a repo root (image_encoder/, feature_extractor/, flux1-redux-dev.safetensors or image_embedder/)
    or a SigLIP directory plus `embedder` (the official file). See `minflux.redux.resolve`."""
    files = redux.resolve(directory, embedder)
    proc = (
        redux.Preprocessor.from_file(files.preprocessor)
        if files.preprocessor
        else redux.Preprocessor()
    )
    return ReduxEncoder(
        load_siglip(files.siglip, dtype, device), load_embedder(files.embedder, dtype, device), proc
    )


def redux_prompt(
    txt: Tensor, vec: Tensor | None, image_tokens: Tensor, scale=1.0, pooled_scale=1.0
) -> tuple[Tensor, Tensor | None]:
    """The T5 context with Redux image tokens appended, as the official pipelines build it.

    txt (B, L, D) and vec (B, 768) of B prompts; image_tokens (N, T, D) from `ReduxEncoder.encode`, shared by
    every prompt. For each prompt, each image i gives the row [txt; tokens_i] (BFL `prepare_redux`), scaled by
    scale[i] (diffusers `prompt_embeds_scale`, one number or N), and the rows are summed; vec is scaled by
    pooled_scale[i] and summed likewise (so with N images at scale 1 the text counts N times, as in
    `FluxPriorReduxPipeline`, which one prompt at a time reproduces). Returns (B, L + T, D), (B, 768).
    """
    b, n = txt.shape[0], image_tokens.shape[0]
    s = torch.tensor(redux.scales(n, scale, "scale"), device=txt.device, dtype=txt.dtype)
    tokens = image_tokens.to(txt.dtype).expand(b, *image_tokens.shape)  # (B, N, T, D)
    rows = torch.cat((txt[:, None].expand(b, n, *txt.shape[1:]), tokens), dim=2)  # (B, N, L + T, D)
    if vec is not None:
        p = torch.tensor(
            redux.scales(n, pooled_scale, "pooled_scale"), device=vec.device, dtype=vec.dtype
        )
        vec = (vec[:, None] * p[:, None]).sum(dim=1)
    return (rows * s[:, None, None]).sum(dim=1), vec
