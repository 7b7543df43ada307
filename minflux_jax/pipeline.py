"""Generation as one library call in JAX: prompt embeddings (+ references, init image, mask, control image)
-> decoded images. Twin: `minflux_torch/pipeline.py` (the same functions and arguments; images NHWC here).

Follows BFL flux `cli.py` / `cli_fill.py` / `cli_control.py` / `cli_kontext.py` and flux2 `cli.py`: encode the
conditioning images, draw the noise (numpy, `minflux.random`: the same latents in both frameworks for a seed),
integrate the flow (`sampling.sample`, one compiled loop), decode one image at a time. The autoencoder's
encode and decode are compiled once each (`nnx.jit`). Inputs and outputs are numpy:

    import numpy as np
    import minflux_jax as mj
    from minflux_jax import pipeline
    model = mj.build_model("flux2-tiny", seed=0)                      # or mj.load_model(cfg, path)
    ae = mj.build_model("flux2-ae-tiny", seed=1)
    txt = np.random.default_rng(0).standard_normal((1, 16, 48), np.float32)   # (B, L, context_in_dim)
    out = pipeline.generate(model, ae, txt, width=64, height=64, steps=4)     # (1, 64, 64, 3) uint8
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minflux import configs, images
from minflux_jax import sampling
from minflux_jax.redux import redux_prompt

# ---------------------------------------------------------------------------------------------
# Autoencoder <-> numpy images
# ---------------------------------------------------------------------------------------------


def _layout(x: np.ndarray, like: nnx.Module) -> jax.Array:
    """(N, H, W, C) numpy -> NHWC array in the module's dtype."""
    return jnp.asarray(x, _dtype(like))


def _dtype(module: nnx.Module):
    return jax.tree.leaves(nnx.state(module, nnx.Param))[0].dtype


@nnx.jit
def _encode(ae, x):
    return ae.encode(x)


@nnx.jit
def _decode(ae, z):
    return ae.decode(z)


def encode(ae: nnx.Module, pixels: np.ndarray) -> jax.Array:
    """(N, H, W, 3) float in [-1, 1] -> latents NHWC (the autoencoder's dtype)."""
    return _encode(ae, _layout(pixels, ae))


def decode(ae: nnx.Module, latents: jax.Array) -> np.ndarray:
    """Latents NHWC -> (N, H, W, 3) uint8, one image at a time (bounded memory)."""
    dtype = _dtype(ae)
    out = [np.asarray(_decode(ae, z[None].astype(dtype)), np.float32) for z in latents]
    return images.to_uint8(np.concatenate(out))


def encode_tokens(
    ae: nnx.Module, pixels: np.ndarray, family: str, batch_size: int = 8
) -> tuple[np.ndarray, tuple]:
    """(N, H, W, 3) in [-1, 1] -> packed latent tokens (N, L, C) float32 numpy and the (h, w) token grid:
    what `minflux cache` stores for training."""
    out = []
    for i in range(0, len(pixels), batch_size):
        z = encode(ae, pixels[i : i + batch_size])
        out.append(np.asarray(sampling.pack(z, family), np.float32))
    return np.concatenate(out), sampling.token_grid(z, family)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def generate(
    model: nnx.Module,
    ae: nnx.Module,
    txt: np.ndarray,
    vec: np.ndarray | None = None,
    *,
    width: int,
    height: int,
    seed: int = 0,
    steps: int = 28,
    guidance: float | None = None,
    cfg_scale: float = 1.0,
    neg_txt: np.ndarray | None = None,
    neg_vec: np.ndarray | None = None,
    refs=(),
    init: np.ndarray | None = None,
    strength: float = 1.0,
    mask: np.ndarray | None = None,
    control: np.ndarray | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Images for B prompts: (B, height, width, 3) uint8.

    txt (B, L, context_in_dim) and, for FLUX.1, vec (B, 768): prompt embeddings (numpy, any float dtype);
    neg_txt / neg_vec: the negative prompt for true CFG (`cfg_scale` != 1). Images are numpy (H, W, C) from
    `minflux.images.load`: refs (Kontext: one; FLUX.2: several), init (img2img from `strength`, or the image
    to inpaint with `mask` (H, W, 1), 1 = repaint: FLUX.1 Fill through its conditioning, any other FLUX.1 or
    FLUX.2 model by `sampling.sample_inpaint`, diffusers' `FluxInpaintPipeline` / `Flux2KleinInpaintPipeline`),
    control (FLUX.1 Canny/Depth: the edge or depth map), init, mask and control at width x height. Redux: extend
    txt and vec first (`redux`). klein KV models (`ref_kv`) take refs through `sampling.sample_kv`. Raises
    ValueError for a conditioning the model does not take (names it).
    """
    cfg, family = model.params, model.params.family
    ppt = configs.pixels_per_token(ae.params)
    kind = configs.input_kind(cfg, ppt)
    if (
        (kind == "fill" and mask is None)
        or (mask is not None and kind == "control")
        or (control is not None) != (kind == "control")
    ):
        raise ValueError(
            f"a {kind} model: "
            + {"fill": "pass init and mask", "control": "pass control"}.get(
                kind, "control needs a FLUX.1 Canny / Depth model"
            )
        )
    if mask is not None and init is None:
        raise ValueError("mask: inpainting needs the init image too")
    emb = {
        k: None if v is None else jnp.asarray(np.asarray(v, np.float32))
        for k, v in dict(txt=txt, vec=vec, neg_txt=neg_txt, neg_vec=neg_vec).items()
    }
    img_cond = None
    if kind == "fill":  # BFL prepare_fill: the image with the repaint region blanked, then the mask
        masked = encode(ae, (init * (1 - mask))[None])
        img_cond = sampling.fill_conditioning(masked, _layout(mask[None], ae), factor=ppt // 2)
        init = None
    elif kind == "control":  # BFL prepare_control, after its edge / depth detector
        img_cond = sampling.pack(encode(ae, control[None]), family)
    noise = sampling.get_noise(len(txt), height, width, family, seed, pixels_per_token=ppt)
    if (
        cfg.ref_kv and refs
    ):  # klein KV: the references' keys and values computed once (Flux2KleinKVPipeline)
        if init is not None or emb["neg_txt"] is not None:
            raise ValueError(
                "a klein KV model: pass reference images only (no init image, no negative prompt)"
            )
        latents = sampling.sample_kv(
            model,
            noise,
            emb["txt"],
            [encode(ae, r[None]) for r in refs],
            steps=steps,
            progress=progress,
        )
        return decode(ae, latents)
    if (
        mask is not None and kind == "text"
    ):  # inpainting with an ordinary model: the known region is kept
        latents = sampling.sample_inpaint(
            model,
            noise,
            emb["txt"],
            encode(ae, init[None]),
            _layout(mask[None], ae),
            emb["vec"],
            steps=steps,
            strength=strength,
            guidance=guidance,
            cfg_scale=cfg_scale,
            neg_txt=emb["neg_txt"],
            neg_vec=emb["neg_vec"],
            refs=[encode(ae, r[None]) for r in refs],
            factor=ppt // 2,
            progress=progress,
        )
        return decode(ae, latents)
    latents = sampling.sample(
        model,
        noise,
        emb["txt"],
        emb["vec"],
        steps=steps,
        guidance=guidance,
        cfg_scale=cfg_scale,
        neg_txt=emb["neg_txt"],
        neg_vec=emb["neg_vec"],
        refs=[encode(ae, r[None]) for r in refs],
        img_cond=img_cond,
        init=None if init is None else encode(ae, init[None]),
        strength=strength,
        progress=progress,
    )
    return decode(ae, latents)


def redux(
    encoder, txt: np.ndarray, vec: np.ndarray, pictures, scale=1.0, pooled_scale=1.0
) -> tuple[np.ndarray, np.ndarray]:
    """FLUX.1 Redux: one prompt's embeddings txt (1, L, 4096) and vec (1, 768) extended by the image tokens of
    `pictures` (paths, PIL images or uint8 arrays; SigLIP resizes them itself) from `encoder`
    (`minflux_jax.redux.load_redux`), with per-image scales, as `redux.redux_prompt`: (1, L + 729 N, 4096),
    (1, 768) float32 numpy for `generate`."""
    tokens = encoder.encode(pictures).astype(jnp.float32)
    t, v = redux_prompt(
        jnp.asarray(txt, jnp.float32), jnp.asarray(vec, jnp.float32), tokens, scale, pooled_scale
    )
    return np.asarray(t), np.asarray(v)
