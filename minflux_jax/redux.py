"""FLUX.1 Redux in Flax NNX: the SigLIP vision tower, the Redux image embedder, and the prompt they extend.

```python
from minflux_jax import redux
enc = redux.load_redux("FLUX.1-Redux-dev/", dtype=jnp.bfloat16)   # SigLIP + embedder + preprocessing
tokens = enc.encode(["style.png"])                              # (1, 729, 4096), T5 space
txt, vec = redux.redux_prompt(txt, vec, tokens)                 # (1, 512 + 729, 4096), (1, 768)
```

SigLIP follows transformers `models/siglip/modeling_siglip.py` (`SiglipVisionModel`: patch conv, learned
positions, pre-norm blocks with tanh-GELU MLPs, `post_layernorm`; the pooling head is not built, Redux reads
`last_hidden_state`); attribute names are the checkpoint keys, loaded by the generic layout rules. The embedder is
BFL's `ReduxImageEncoder` (black-forest-labs/flux `src/flux/modules/image_embedders.py`; diffusers
`pipelines/flux/modeling_flux.py`), `redux_prompt` is `sampling.prepare_redux` with diffusers
`FluxPriorReduxPipeline`'s per-image scales. Twin: `minflux_torch/redux.py`, whose pixels are NCHW where these
are NHWC.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from minflux import redux, text
from minflux.redux import SiglipVisionConfig
from minflux_jax.layers import Array, linear
from minflux_jax.load import assign, torch_shapes
from minflux_jax.text.clip import layer_norm

# ---------------------------------------------------------------------------------------------
# SigLIP vision tower
# ---------------------------------------------------------------------------------------------


class SiglipVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.patch_embedding = nnx.Conv(
            cfg.num_channels,
            cfg.hidden_size,
            (p, p),
            (p, p),
            padding="VALID",
            dtype=dtype,
            param_dtype=dtype,
            rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            (cfg.image_size // p) ** 2, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )

    def __call__(
        self, pixels: Array
    ) -> Array:  # (B, H, W, 3) -> (B, N, D), N = (H / patch) * (W / patch)
        x = rearrange(self.patch_embedding(pixels), "B h w D -> B (h w) D")
        return (
            x + self.position_embedding.embedding[...]
        )  # no interpolation: the image is resized to image_size


class SiglipAttention(nnx.Module):
    """Bidirectional multi-head self-attention with biases and the 1/sqrt(D) scale."""

    def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj = linear(d, d, True, dtype, rngs)
        self.k_proj = linear(d, d, True, dtype, rngs)
        self.v_proj = linear(d, d, True, dtype, rngs)
        self.out_proj = linear(d, d, True, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        # jax.nn.dot_product_attention takes (B, L, H, D).
        q, k, v = (
            rearrange(lin(x), "B L (H D) -> B L H D", H=self.num_heads)
            for lin in (self.q_proj, self.k_proj, self.v_proj)
        )
        x = jax.nn.dot_product_attention(q, k, v)
        return self.out_proj(rearrange(x, "B L H D -> B L (H D)"))


class SiglipMLP(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, True, dtype, rngs)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, True, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))  # gelu_pytorch_tanh


class SiglipEncoderLayer(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.layer_norm1 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)
        self.self_attn = SiglipAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)
        self.mlp = SiglipMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List(
            SiglipEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)
        )

    def __call__(self, x: Array) -> Array:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nnx.Module):
    """pixel values (B, image_size, image_size, 3), normalised to [-1, 1] -> last_hidden_state (B, N, D)."""

    def __init__(self, cfg: SiglipVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = SiglipVisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = SiglipEncoder(cfg, dtype=dtype, rngs=rngs)
        self.post_layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)

    def __call__(self, pixels: Array) -> Array:
        return self.post_layernorm(self.encoder(self.embeddings(pixels)))


# ---------------------------------------------------------------------------------------------
# The Redux embedder
# ---------------------------------------------------------------------------------------------


class ReduxImageEncoder(nnx.Module):
    """SigLIP tokens (B, N, redux_dim) -> T5-space tokens (B, N, txt_in_features): down(silu(up(x)))."""

    def __init__(
        self,
        redux_dim: int = 1152,
        txt_in_features: int = 4096,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.redux_up = linear(redux_dim, txt_in_features * 3, True, dtype, rngs)
        self.redux_down = linear(txt_in_features * 3, txt_in_features, True, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.redux_down(jax.nn.silu(self.redux_up(x)))


def _load(model: nnx.Module, directory, spec: text.EncoderSpec) -> nnx.Module:
    """Stream a checked checkpoint into `model` (abstract, from `nnx.eval_shape`), strictly."""
    assign(model, text.read_weights(directory, spec, torch_shapes(model)))
    return model


def load_siglip(directory, dtype=jnp.bfloat16) -> SiglipVisionTransformer:
    """The SigLIP vision tower from a Hugging Face directory (config.json + safetensors), cast to `dtype`."""
    cfg = redux.read_config(directory)
    model = nnx.eval_shape(lambda: SiglipVisionTransformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return _load(model, directory, redux.SIGLIP)


def load_embedder(path, dtype=jnp.bfloat16) -> ReduxImageEncoder:
    """The Redux embedder from the official file (flux1-redux-dev.safetensors or diffusers' image_embedder/)."""
    dims = redux.embedder_dims(path)
    model = nnx.eval_shape(lambda: ReduxImageEncoder(*dims, dtype=dtype, rngs=nnx.Rngs(0)))
    return _load(model, path, redux.EMBEDDER)


@nnx.jit
def _encode(siglip: SiglipVisionTransformer, embedder: ReduxImageEncoder, pixels: Array) -> Array:
    return embedder(siglip(pixels))


class ReduxEncoder:
    """SigLIP, its preprocessing and the embedder: `encode(images)` -> (N, 729, 4096) tokens for `redux_prompt`."""

    def __init__(
        self,
        siglip: SiglipVisionTransformer,
        embedder: ReduxImageEncoder,
        preprocessor: redux.Preprocessor,
    ):
        self.siglip, self.embedder, self.preprocessor = siglip, embedder, preprocessor

    def encode(self, images) -> Array:
        """Image paths, PIL images or uint8 (H, W, 3) arrays -> (N, tokens, txt_in_features) in the model dtype."""
        dtype = self.siglip.post_layernorm.scale.dtype
        pixels = jnp.asarray(self.preprocessor(images).transpose(0, 2, 3, 1), dtype)  # NCHW -> NHWC
        return _encode(self.siglip, self.embedder, pixels)


def load_redux(directory, dtype=jnp.bfloat16, *, embedder=None) -> ReduxEncoder:
    """Redux from a repo root (image_encoder/, feature_extractor/, flux1-redux-dev.safetensors or image_embedder/)
    or a SigLIP directory plus `embedder` (the official file). See `minflux.redux.resolve`."""
    files = redux.resolve(directory, embedder)
    proc = (
        redux.Preprocessor.from_file(files.preprocessor)
        if files.preprocessor
        else redux.Preprocessor()
    )
    return ReduxEncoder(
        load_siglip(files.siglip, dtype), load_embedder(files.embedder, dtype), proc
    )


def redux_prompt(
    txt: Array, vec: Array | None, image_tokens: Array, scale=1.0, pooled_scale=1.0
) -> tuple[Array, Array | None]:
    """The T5 context with Redux image tokens appended, as the official pipelines build it.

    txt (B, L, D) and vec (B, 768) of B prompts; image_tokens (N, T, D) from `ReduxEncoder.encode`, shared by
    every prompt. For each prompt, each image i gives the row [txt; tokens_i] (BFL `prepare_redux`), scaled by
    scale[i] (diffusers `prompt_embeds_scale`, one number or N), and the rows are summed; vec is scaled by
    pooled_scale[i] and summed likewise (so with N images at scale 1 the text counts N times, as in
    `FluxPriorReduxPipeline`, which one prompt at a time reproduces). Returns (B, L + T, D), (B, 768).
    """
    b, n = txt.shape[0], image_tokens.shape[0]
    s = jnp.asarray(redux.scales(n, scale, "scale"), txt.dtype)
    tokens = jnp.broadcast_to(
        image_tokens.astype(txt.dtype), (b, *image_tokens.shape)
    )  # (B, N, T, D)
    rows = jnp.concatenate(
        (jnp.broadcast_to(txt[:, None], (b, n, *txt.shape[1:])), tokens), axis=2
    )  # (B, N, L + T, D)
    if vec is not None:
        p = jnp.asarray(redux.scales(n, pooled_scale, "pooled_scale"), vec.dtype)
        vec = (vec[:, None] * p[:, None]).sum(axis=1)
    return (rows * s[:, None, None]).sum(axis=1), vec
