"""Sampling in JAX / Flax NNX: noise, latent packing, position ids, and the Euler ODE loop.

Follows black-forest-labs/flux `src/flux/sampling.py` (FLUX.1: `get_noise`, `prepare`, Kontext's
`prepare_kontext`, Fill's `prepare_fill`, `denoise`, `unpack`) and black-forest-labs/flux2
`src/flux2/sampling.py` (FLUX.2: `prc_img`, `prc_txt`, `encode_image_refs`, `denoise`, `denoise_cfg`).
Two loops follow diffusers, which BFL's repositories do not have: inpainting with the ordinary models
(`sample_inpaint`: `FluxInpaintPipeline`, `Flux2KleinInpaintPipeline`) and klein KV (`sample_kv`:
`Flux2KleinKVPipeline`, the references' keys and values computed once).
Schedules are framework-free (`minflux.schedules`). Twin: `minflux_torch/sampling.py`, whose images are
NCHW where these are NHWC; token tensors (B, L, C) and ids (B, L, axes) are identical in both.

The whole loop is one compiled program: the model is split into (graphdef, state), and a `jax.jit`-ed
function merges it and runs `lax.scan` over the steps. Times, guidance and the CFG scale are traced
arrays, so a second call with the same shapes reuses the compiled loop (`TRACES` counts traces; the
tests check it). The progress bar ticks from inside the compiled loop through `jax.debug.callback`.
Latents are integrated in fp32 whatever the model dtype, as in the PyTorch twin.
"""

from __future__ import annotations

import collections
from functools import partial

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from tqdm.auto import tqdm

from minflux import configs, ids, random, schedules

Array = jax.Array
TRACES: collections.Counter = collections.Counter()  # how often each compiled function was traced
_PROGRESS = {"bar": None}  # the tqdm bar the compiled loop's callback ticks (None: no bar)

# ---------------------------------------------------------------------------------------------
# Noise, packing and position ids
# ---------------------------------------------------------------------------------------------


def get_noise(
    num_samples: int,
    height: int,
    width: int,
    family: str,
    seed: int,
    dtype=jnp.float32,
    pixels_per_token: int = 16,
) -> Array:
    """Seeded Gaussian latents, NHWC: FLUX.1 (B, H/8, W/8, 16); FLUX.2 (B, H/16, W/16, 128).

    `pixels_per_token` is 16 for the real autoencoders (the tiny test ones downsample less). Drawn in fp32
    numpy (`minflux.random.noise`, NCHW, transposed here), so a seed gives the same latents in both frameworks.
    """
    noise = random.noise_nchw(num_samples, height, width, family, seed, pixels_per_token)
    return jnp.asarray(noise.transpose(0, 2, 3, 1), dtype)


def token_grid(x: Array, family: str) -> tuple[int, int]:
    """(h, w) of the token grid of latents x (NHWC); FLUX.1 tokens are 2x2 latent patches."""
    p = configs.FAMILIES[family].latent_patch
    return x.shape[1] // p, x.shape[2] // p


def pack(x: Array, family: str) -> Array:
    """Latents -> tokens. FLUX.1: 2x2 patches of 16 channels, (B, 2h, 2w, 16) -> (B, h*w, 64);
    FLUX.2: the autoencoder already patchified, (B, h, w, 128) -> (B, h*w, 128)."""
    p = configs.FAMILIES[family].latent_patch
    return rearrange(x, "b (h ph) (w pw) c -> b (h w) (c ph pw)", ph=p, pw=p)


def unpack(x: Array, h: int, w: int, family: str) -> Array:
    """Tokens (B, h*w, C) on an h x w grid -> latents; inverse of `pack`."""
    p = configs.FAMILIES[family].latent_patch
    return rearrange(x, "b (h w) (c ph pw) -> b (h ph) (w pw) c", h=h, w=w, ph=p, pw=p)


def image_ids(batch: int, h: int, w: int, family: str, t: float = 0) -> Array:
    """Position ids of an h x w token grid (`minflux.ids.image_ids`): (B, h*w, 3) rows (t, row, col) for
    FLUX.1, (B, h*w, 4) rows (t, row, col, 0) for FLUX.2; fp32 (small integers, exact)."""
    return jnp.asarray(ids.image_ids(batch, h, w, configs.FAMILIES[family].id_axes, t))


def text_ids(batch: int, length: int, family: str) -> Array:
    """Text position ids (`minflux.ids.text_ids`): zeros for FLUX.1 (B, L, 3); (0, 0, 0, l) for FLUX.2 (B, L, 4)."""
    spec = configs.FAMILIES[family]
    return jnp.asarray(ids.text_ids(batch, length, spec.id_axes, spec.text_id_axis))


def reference_tokens(refs: list[Array], family: str) -> tuple[Array, Array]:
    """Encoded reference latents (each NHWC, any size) -> (tokens, ids) to append after the image tokens.

    FLUX.1 Kontext takes one reference at t = 1; FLUX.2 takes several, reference i at t = 10 + 10 i.
    """
    spec = configs.FAMILIES[family]
    if spec.max_refs is not None and len(refs) > spec.max_refs:
        raise ValueError(
            f"{family} takes at most {spec.max_refs} reference image(s), got {len(refs)}"
        )
    tokens, pos = [], []
    for i, ref in enumerate(refs):
        h, w = token_grid(ref, family)
        tokens.append(pack(ref, family))
        pos.append(image_ids(ref.shape[0], h, w, family, t=spec.ref_time(i)))
    return jnp.concatenate(tokens, axis=1), jnp.concatenate(pos, axis=1)


def fill_conditioning(masked: Array, mask: Array, factor: int = 8) -> Array:
    """FLUX.1 Fill's extra input channels: the encoded masked image (B, H/8, W/8, 16) and the pixel
    mask (B, H, W, 1), 1 = repaint, folded 8x8 into channels -> (B, L, 64 + 256) tokens. `factor` is the
    autoencoder's downsampling (8; less for the tiny test autoencoders)."""
    mask = rearrange(
        mask[..., 0], "b (h ph) (w pw) -> b h w (ph pw)", ph=factor, pw=factor
    )  # (B, H/8, W/8, 64)
    return jnp.concatenate(
        (pack(masked, "flux1"), pack(mask.astype(masked.dtype), "flux1")), axis=-1
    )


def add_noise(x: Array, noise: Array, t: float) -> Array:
    """img2img start: the flow-matching interpolation t * noise + (1 - t) * x (diffusers' `scale_noise`)."""
    return t * noise + (1.0 - t) * x


def inpaint_mask(mask: Array, family: str, factor: int = 8) -> Array:
    """Pixel mask (B, H, W, 1) in [0, 1], 1 = repaint -> per-token blend weights, as diffusers' inpainting
    pipelines derive them: binarised at 0.5 (their mask processor), then FLUX.1 (`FluxInpaintPipeline`) takes the
    nearest pixel per latent, (B, H/8, W/8, 1), packed like the latents -> (B, L, 64); FLUX.2
    (`Flux2KleinInpaintPipeline`) resizes bilinearly (no antialias) to the token grid -> (B, L, 1), which at an
    even factor is the mean of the 2 x 2 pixels at each token's centre. `factor`: the autoencoder's downsampling."""
    spec = configs.FAMILIES[family]
    mask = (mask >= 0.5).astype(jnp.float32)
    if spec.inpaint_resize == "nearest":
        m = mask[:, ::factor, ::factor]
        return pack(jnp.broadcast_to(m, (*m.shape[:3], spec.latent_channels)), family)
    f = 2 * factor  # pixels per token
    lo, hi = (
        (f - 1) // 2,
        f // 2,
    )  # bilinear at align_corners=False samples pixel f * i + (f - 1) / 2
    rows = (mask[:, lo::f] + mask[:, hi::f]) / 2
    return rearrange((rows[:, :, lo::f] + rows[:, :, hi::f]) / 2, "b h w c -> b (h w) c")


# ---------------------------------------------------------------------------------------------
# The Euler loop
# ---------------------------------------------------------------------------------------------


def predict(
    model,
    img: Array,
    img_ids: Array,
    txt: Array,
    txt_ids: Array,
    t: Array,
    vec: Array | None,
    guidance: Array | None,
) -> Array:
    """One model call with each family's keyword names (`forward_kwargs`); t and guidance are (B,)."""
    return model(**model.params.forward_kwargs(img, img_ids, txt, txt_ids, t, vec, guidance))


def conditioning(
    model,
    img_ids: Array,
    txt: Array,
    txt_ids: Array,
    vec=None,
    guidance=None,
    cfg_scale: float = 1.0,
    neg_txt=None,
    neg_vec=None,
    img_cond=None,
    img_cond_seq=None,
    img_cond_seq_ids=None,
) -> dict:
    """Everything but the latents and the time, batched once before the loop.

    Image ids, references, Fill channels and the negative prompt may have a batch of one for any text batch.
    With a negative prompt (`neg_txt`, and `neg_vec` for FLUX.1) the text batch becomes
    [negative, positive] and each step runs both halves in one call (true CFG, as BFL's `denoise_cfg`).
    `guidance` only reaches guidance-distilled models (FLUX.1 dev, FLUX.2 dev); others ignore it, as BFL does.
    """
    b = txt.shape[0]
    batch = lambda a: (
        None if a is None else jnp.broadcast_to(a, (b, *a.shape[1:]))
    )  # one serves every prompt
    img_ids, txt_ids, img_cond, img_cond_seq, img_cond_seq_ids, neg_txt, neg_vec = map(
        batch, (img_ids, txt_ids, img_cond, img_cond_seq, img_cond_seq_ids, neg_txt, neg_vec)
    )
    cfg = neg_txt is not None
    if cfg:
        if neg_txt.shape[1:] != txt.shape[1:]:
            raise ValueError(
                f"negative text {tuple(neg_txt.shape)} and text {tuple(txt.shape)} must have the "
                f"same length and width (pad both to the text encoder's max length)"
            )
        if vec is not None and neg_vec is None:
            raise ValueError("FLUX.1 true CFG needs the negative pooled vector `neg_vec` too")
        txt, txt_ids = jnp.concatenate((neg_txt, txt)), jnp.concatenate((txt_ids, txt_ids))
        vec = jnp.concatenate((neg_vec, vec)) if vec is not None else None
    if img_cond_seq is not None and img_cond_seq_ids is None:
        raise ValueError("pass both or neither of img_cond_seq and img_cond_seq_ids")
    use_guidance = model.params.guidance_embed and guidance is not None
    if model.params.guidance_embed and guidance is None:
        raise ValueError(
            "this model is guidance-distilled: pass guidance (e.g. 3.5 for FLUX.1 dev, 4 for FLUX.2 dev)"
        )
    return {
        "img_ids": img_ids,
        "txt": txt,
        "txt_ids": txt_ids,
        "vec": vec,
        "guidance": jnp.asarray(guidance, jnp.float32) if use_guidance else None,
        "cfg_scale": jnp.asarray(cfg_scale, jnp.float32) if cfg else None,
        "img_cond": img_cond,
        "img_cond_seq": img_cond_seq,
        "img_cond_seq_ids": img_cond_seq_ids,
    }


def velocity(model, img: Array, t: Array, cond: dict) -> Array:
    """The flow at time t (0-d) for image tokens img (B, L, C): Fill channels and reference tokens
    attached, the prediction trimmed back to the image tokens, true CFG applied; fp32."""
    x, ids = img, cond["img_ids"]
    if cond["img_cond"] is not None:  # FLUX.1 Fill: channel-wise
        x = jnp.concatenate((x, cond["img_cond"].astype(x.dtype)), axis=-1)
    if cond["img_cond_seq"] is not None:  # Kontext / FLUX.2 references: sequence-wise
        x = jnp.concatenate((x, cond["img_cond_seq"].astype(x.dtype)), axis=1)
        ids = jnp.concatenate((ids, cond["img_cond_seq_ids"]), axis=1)
    cfg = cond["cfg_scale"] is not None
    if cfg:
        x, ids = jnp.concatenate((x, x)), jnp.concatenate((ids, ids))  # batch [negative, positive]
    b = x.shape[0]
    guidance = jnp.broadcast_to(cond["guidance"], (b,)) if cond["guidance"] is not None else None
    pred = predict(
        model,
        x,
        ids,
        cond["txt"],
        cond["txt_ids"],
        jnp.broadcast_to(t, (b,)),
        cond["vec"],
        guidance,
    )
    pred = pred[:, : img.shape[1]].astype(jnp.float32)
    if cfg:
        neg, pos = jnp.split(pred, 2)
        pred = neg + cond["cfg_scale"] * (pos - neg)
    return pred


def _tick(_):
    """Host callback from inside the compiled loop: one step done."""
    if _PROGRESS["bar"] is not None:
        _PROGRESS["bar"].update(1)


@partial(jax.jit, static_argnames=("graphdef", "trajectory"))
def _denoise_loop(graphdef, state, img: Array, ts: Array, cond: dict, trajectory: bool):
    """The compiled loop: scan over (t_curr, t_prev) pairs; traced once per shapes and options."""
    TRACES["denoise"] += (
        1  # a Python side effect: runs when tracing, never when the compiled loop runs
    )
    model = nnx.merge(graphdef, state)

    def step(x, t_pair):
        t_curr, t_prev = t_pair
        x = x + (t_prev - t_curr) * velocity(model, x, t_curr, cond)
        jax.debug.callback(
            _tick, t_curr
        )  # always there (cheap), so a bar on or off reuses the same program
        return x, x if trajectory else None

    x, states = jax.lax.scan(step, img, (ts[:-1], ts[1:]))
    return jnp.concatenate((img[None], states)) if trajectory else x


def denoise(
    model,
    img: Array,
    img_ids: Array,
    txt: Array,
    txt_ids: Array,
    timesteps: list[float],
    vec=None,
    guidance=None,
    cfg_scale: float = 1.0,
    neg_txt=None,
    neg_vec=None,
    img_cond=None,
    img_cond_seq=None,
    img_cond_seq_ids=None,
    trajectory: bool = False,
    progress: bool = False,
) -> Array:
    """Euler-integrate the flow over `timesteps` (from `schedules.get_schedule`), starting from tokens img.

    img (B, L, C), img_ids (B, L, axes), txt (B, Lt, context_in_dim), txt_ids (B, Lt, axes), vec (B, 768)
    for FLUX.1; conditioning as in `conditioning`. Returns the final tokens (B, L, C) in fp32, or with
    `trajectory=True` every state (steps + 1, B, L, C), the input first: the parity suite compares these.
    """
    cond = conditioning(
        model,
        img_ids,
        txt,
        txt_ids,
        vec,
        guidance,
        cfg_scale,
        neg_txt,
        neg_vec,
        img_cond,
        img_cond_seq,
        img_cond_seq_ids,
    )
    ts = jnp.asarray(
        timesteps, jnp.float32
    )  # traced: a new schedule of the same length does not recompile
    graphdef, state = nnx.split(model)
    with tqdm(total=len(timesteps) - 1, desc="denoising", unit="step", disable=not progress) as bar:
        _PROGRESS["bar"] = bar if progress else None
        try:
            out = _denoise_loop(
                graphdef, state, jnp.asarray(img, jnp.float32), ts, cond, trajectory
            )
            out.block_until_ready()
            jax.effects_barrier()  # every tick delivered before the bar closes
        finally:
            _PROGRESS["bar"] = None
    return out


def sample(
    model,
    noise: Array,
    txt: Array,
    vec=None,
    steps: int = 28,
    guidance=None,
    cfg_scale: float = 1.0,
    neg_txt=None,
    neg_vec=None,
    refs=(),
    img_cond=None,
    init=None,
    strength: float = 1.0,
    shift: bool | None = None,
    progress: bool = False,
) -> Array:
    """Generate latents (NHWC, the shape of `noise`) for text `txt` (and pooled `vec` for FLUX.1).

    refs: encoded reference latents (Kontext, FLUX.2 multi-reference); img_cond: FLUX.1 Fill tokens from
    `fill_conditioning`; init: encoded latents for img2img, noised to the schedule's time at `strength`.
    shift: FLUX.1's resolution shift, on by default except for models without a guidance embedder
    (schnell is the only such FLUX.1); FLUX.2 always shifts.
    """
    family = model.params.family
    h, w = token_grid(noise, family)
    b = noise.shape[0]
    if txt.shape[0] != b:
        raise ValueError(f"text batch {txt.shape[0]} != noise batch {b}")
    img, img_ids = pack(noise, family), image_ids(b, h, w, family)
    shift = model.params.guidance_embed if shift is None else shift
    timesteps = schedules.get_schedule(steps, h * w, family, shift=shift)
    if init is not None:
        timesteps = timesteps[schedules.strength_start(steps, strength) :]
        img = add_noise(
            pack(init, family).astype(jnp.float32), img.astype(jnp.float32), timesteps[0]
        )
    ref_tok, ref_ids = reference_tokens(list(refs), family) if len(refs) else (None, None)
    out = denoise(
        model,
        img,
        img_ids,
        txt,
        text_ids(b, txt.shape[1], family),
        timesteps,
        vec=vec,
        guidance=guidance,
        cfg_scale=cfg_scale,
        neg_txt=neg_txt,
        neg_vec=neg_vec,
        img_cond=img_cond,
        img_cond_seq=ref_tok,
        img_cond_seq_ids=ref_ids,
        progress=progress,
    )
    return unpack(out, h, w, family)


# ---------------------------------------------------------------------------------------------
# Inpainting with the ordinary models: img2img with the known region put back after every step
# ---------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("graphdef",))
def _inpaint_loop(
    graphdef, state, img: Array, ts: Array, cond: dict, init: Array, noise: Array, mask: Array
):
    """The compiled inpainting loop: `_denoise_loop`'s step followed by the blend; traced once per shapes."""
    TRACES["inpaint"] += 1
    model = nnx.merge(graphdef, state)

    def step(x, t_pair):
        t_curr, t_prev = t_pair
        x = x + (t_prev - t_curr) * velocity(model, x, t_curr, cond)
        x = (1 - mask) * add_noise(init, noise, t_prev) + mask * x
        jax.debug.callback(_tick, t_curr)
        return x, None

    x, _ = jax.lax.scan(step, img, (ts[:-1], ts[1:]))
    return x


def denoise_inpaint(
    model,
    img: Array,
    img_ids: Array,
    txt: Array,
    txt_ids: Array,
    timesteps: list[float],
    init: Array,
    noise: Array,
    mask: Array,
    vec=None,
    guidance=None,
    cfg_scale: float = 1.0,
    neg_txt=None,
    neg_vec=None,
    img_cond_seq=None,
    img_cond_seq_ids=None,
    progress: bool = False,
) -> Array:
    """`denoise`, and after every step the known region is reset to the init tokens noised to the new time
    (diffusers' `FluxInpaintPipeline` / `Flux2KleinInpaintPipeline` loops):
    x <- x + (t_prev - t_curr) * v;  x <- (1 - mask) * add_noise(init, noise, t_prev) + mask * x.
    At the last step t_prev = 0, so the known region ends exactly as init. init, noise (B, L, C) tokens; mask from
    `inpaint_mask`, (B, L, C) or (B, L, 1). Returns the final tokens (B, L, C) in fp32.
    """
    cond = conditioning(
        model,
        img_ids,
        txt,
        txt_ids,
        vec,
        guidance,
        cfg_scale,
        neg_txt,
        neg_vec,
        None,
        img_cond_seq,
        img_cond_seq_ids,
    )
    ts = jnp.asarray(timesteps, jnp.float32)
    graphdef, state = nnx.split(model)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    with tqdm(
        total=len(timesteps) - 1, desc="inpainting", unit="step", disable=not progress
    ) as bar:
        _PROGRESS["bar"] = bar if progress else None
        try:
            out = _inpaint_loop(
                graphdef, state, f32(img), ts, cond, f32(init), f32(noise), f32(mask)
            )
            out.block_until_ready()
            jax.effects_barrier()
        finally:
            _PROGRESS["bar"] = None
    return out


def sample_inpaint(
    model,
    noise: Array,
    txt: Array,
    init: Array,
    mask: Array,
    vec=None,
    steps: int = 28,
    strength: float = 1.0,
    guidance=None,
    cfg_scale: float = 1.0,
    neg_txt=None,
    neg_vec=None,
    refs=(),
    factor: int = 8,
    shift: bool | None = None,
    progress: bool = False,
) -> Array:
    """Inpaint with an ordinary model: latents (NHWC, the shape of `noise`) that keep `init` where mask is 0.

    init: the encoded image (FLUX.1 (B, H/8, W/8, 16); FLUX.2 (B, H/16, W/16, 128), normalised as our
    autoencoder's `encode` returns it); mask: pixels (B, H, W, 1), 1 = repaint (see `inpaint_mask`; `factor` is
    the autoencoder's downsampling). The start is init noised to the schedule's time at `strength`, as img2img.
    FLUX.1 follows `FluxInpaintPipeline` (dev, schnell, Krea; Fill has its own conditioning, `fill_conditioning`).
    FLUX.2 follows `Flux2KleinInpaintPipeline`: init is also the first reference image (t = 10), then `refs`.
    Other arguments as in `sample`.
    """
    family = model.params.family
    h, w = token_grid(noise, family)
    b = noise.shape[0]
    if txt.shape[0] != b:
        raise ValueError(f"text batch {txt.shape[0]} != noise batch {b}")
    if init.shape[1:] != noise.shape[1:]:
        raise ValueError(
            f"init latents {tuple(init.shape)} and noise {tuple(noise.shape)} differ in size"
        )
    m = inpaint_mask(mask, family, factor)
    if m.shape[1] != h * w:
        raise ValueError(
            f"mask {tuple(mask.shape)} does not cover the {h} x {w} token grid at factor {factor}"
        )
    shift = model.params.guidance_embed if shift is None else shift
    timesteps = schedules.get_schedule(steps, h * w, family, shift=shift)
    timesteps = timesteps[schedules.strength_start(steps, strength) :]
    init_tok, noise_tok = (
        pack(init, family).astype(jnp.float32),
        pack(noise, family).astype(jnp.float32),
    )
    img, img_ids = add_noise(init_tok, noise_tok, timesteps[0]), image_ids(b, h, w, family)
    refs = [init, *refs] if model.params.inpaint_init_ref else list(refs)
    ref_tok, ref_ids = reference_tokens(refs, family) if refs else (None, None)
    out = denoise_inpaint(
        model,
        img,
        img_ids,
        txt,
        text_ids(b, txt.shape[1], family),
        timesteps,
        init_tok,
        noise_tok,
        m,
        vec=vec,
        guidance=guidance,
        cfg_scale=cfg_scale,
        neg_txt=neg_txt,
        neg_vec=neg_vec,
        img_cond_seq=ref_tok,
        img_cond_seq_ids=ref_ids,
        progress=progress,
    )
    return unpack(out, h, w, family)


# ---------------------------------------------------------------------------------------------
# FLUX.2 klein KV: reference tokens computed once
# ---------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("graphdef", "cached"))
def _kv_loop(
    graphdef,
    state,
    img: Array,
    ts: Array,
    txt: Array,
    txt_ids: Array,
    img_ids: Array,
    ref: Array,
    ref_ids: Array,
    cached: bool,
):
    """The compiled klein KV loop: the first step with the references (filling the caches), then a scan over
    the rest that reads the caches (traced values, part of the program) or recomputes them."""
    TRACES["kv"] += 1
    model = nnx.merge(graphdef, state)
    b, n = txt.shape[0], ref.shape[1]

    # the references in the sequence; returns the velocity and their keys and values
    def with_refs(x, t):
        pred, cache = model.forward_kv(
            x=jnp.concatenate((x, ref.astype(x.dtype)), axis=1),
            x_ids=jnp.concatenate((img_ids, ref_ids), axis=1),
            timesteps=jnp.broadcast_to(t, (b,)),
            ctx=txt,
            ctx_ids=txt_ids,
            n_ref=n,
        )
        return pred[:, : x.shape[1]].astype(jnp.float32), cache

    v, cache = with_refs(img, ts[0])
    x = img + (ts[1] - ts[0]) * v
    jax.debug.callback(_tick, ts[0])

    def step(x, t_pair):
        t_curr, t_prev = t_pair
        if cached:
            pred = model.forward_cached(
                x=x,
                x_ids=img_ids,
                timesteps=jnp.broadcast_to(t_curr, (b,)),
                ctx=txt,
                ctx_ids=txt_ids,
                cache=cache,
            ).astype(jnp.float32)
        else:
            pred = with_refs(x, t_curr)[0]
        x = x + (t_prev - t_curr) * pred
        jax.debug.callback(_tick, t_curr)
        return x, None

    x, _ = jax.lax.scan(step, x, (ts[1:-1], ts[2:]))
    return x


def denoise_kv(
    model,
    img: Array,
    img_ids: Array,
    txt: Array,
    txt_ids: Array,
    timesteps: list[float],
    ref: Array,
    ref_ids: Array,
    cached: bool = True,
    progress: bool = False,
) -> Array:
    """`denoise` for klein KV models (`Flux2Config.ref_kv`; diffusers `Flux2KleinKVPipeline`): the reference
    tokens ref (B or 1, Lr, 128) attend only to themselves and are modulated at t = 0, so their keys and values
    are the same at every step. cached=True computes them at the first step and reuses them (the references
    leave the sequence); cached=False recomputes them at every step (the same numbers, for checking). No guidance
    embedder, no CFG (klein KV is distilled). Returns the final tokens (B, L, C) in fp32.
    """
    if model.params.guidance_embed:
        raise ValueError("klein KV sampling takes no guidance: this model has a guidance embedder")
    b = txt.shape[0]
    img_ids, txt_ids, ref, ref_ids = (
        jnp.broadcast_to(a, (b, *a.shape[1:])) for a in (img_ids, txt_ids, ref, ref_ids)
    )
    ts = jnp.asarray(timesteps, jnp.float32)
    graphdef, state = nnx.split(model)
    with tqdm(total=len(timesteps) - 1, desc="denoising", unit="step", disable=not progress) as bar:
        _PROGRESS["bar"] = bar if progress else None
        try:
            out = _kv_loop(
                graphdef,
                state,
                jnp.asarray(img, jnp.float32),
                ts,
                txt,
                txt_ids,
                img_ids,
                ref,
                ref_ids,
                cached,
            )
            out.block_until_ready()
            jax.effects_barrier()
        finally:
            _PROGRESS["bar"] = None
    return out


def sample_kv(
    model,
    noise: Array,
    txt: Array,
    refs,
    steps: int = 4,
    cached: bool = True,
    progress: bool = False,
) -> Array:
    """Generate latents (NHWC, the shape of `noise`) with a klein KV model from reference latents `refs` (each
    NHWC, any size; reference i at t = 10 + 10 i) and text `txt`; see `denoise_kv`."""
    family = model.params.family
    if not len(refs):
        raise ValueError(
            "klein KV sampling needs at least one reference image (without, use `sample`)"
        )
    h, w = token_grid(noise, family)
    b = noise.shape[0]
    if txt.shape[0] != b:
        raise ValueError(f"text batch {txt.shape[0]} != noise batch {b}")
    timesteps = schedules.get_schedule(steps, h * w, family)
    ref_tok, ref_ids = reference_tokens(list(refs), family)
    out = denoise_kv(
        model,
        pack(noise, family),
        image_ids(b, h, w, family),
        txt,
        text_ids(b, txt.shape[1], family),
        timesteps,
        ref_tok,
        ref_ids,
        cached=cached,
        progress=progress,
    )
    return unpack(out, h, w, family)
