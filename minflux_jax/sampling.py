"""Sampling in JAX / Flax NNX: noise, latent packing, position ids, and the Euler ODE loop.

Follows black-forest-labs/flux `src/flux/sampling.py` (FLUX.1: `get_noise`, `prepare`, Kontext's
`prepare_kontext`, Fill's `prepare_fill`, `denoise`, `unpack`) and black-forest-labs/flux2
`src/flux2/sampling.py` (FLUX.2: `prc_img`, `prc_txt`, `encode_image_refs`, `denoise`,
`denoise_cfg`). Two loops follow diffusers, which BFL's repositories do not have: inpainting with
the ordinary models (`sample_inpaint`: `FluxInpaintPipeline`, `Flux2KleinInpaintPipeline`) and klein
KV (`sample_kv`: `Flux2KleinKVPipeline`, the references' keys and values computed once). Schedules
are framework-free (`minflux.schedules`). Twin: `minflux_torch/sampling.py`, whose images are NCHW
where these are NHWC; token tensors (B, L, C) and ids (B, L, axes) are identical in both.

The whole loop is one compiled program: the model is split into (graphdef, state), and a
`jax.jit`-ed function merges it and runs `lax.scan` over the steps. Times, guidance and the CFG
scale are traced arrays, so a second call with the same shapes reuses the compiled loop (`TRACES`
reads how many programs each loop has; the tests check it). The progress bar is drawn from inside
the compiled loop through `jax.debug.callback`, from its arguments alone (whether to show it, the
start time): no state outside. Latents are integrated in fp32 whatever the model dtype, as in the
PyTorch twin."""

from __future__ import annotations

import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
from einops import rearrange, reduce
from flax import nnx
from tqdm.auto import tqdm

from minflux import ids, masks, random, request, schedules
from minflux.family import FAMILIES
from minflux.request import Batched, Conditioning, Inputs

Array = jax.Array
# a pytree: the compiled loops take it as traced arguments
jax.tree_util.register_dataclass(Batched)

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
    p = FAMILIES[family].latent_patch
    return x.shape[1] // p, x.shape[2] // p


def pack(x: Array, family: str) -> Array:
    """Latents -> tokens. FLUX.1: 2x2 patches of 16 channels, (B, 2h, 2w, 16) -> (B, h*w, 64);
    FLUX.2: the autoencoder already patchified, (B, h, w, 128) -> (B, h*w, 128)."""
    p = FAMILIES[family].latent_patch
    return rearrange(x, "b (h ph) (w pw) c -> b (h w) (c ph pw)", ph=p, pw=p)


def unpack(x: Array, h: int, w: int, family: str) -> Array:
    """Tokens (B, h*w, C) on an h x w grid -> latents; inverse of `pack`."""
    p = FAMILIES[family].latent_patch
    return rearrange(x, "b (h w) (c ph pw) -> b (h ph) (w pw) c", h=h, w=w, ph=p, pw=p)


def image_ids(batch: int, h: int, w: int, family: str, t: float = 0) -> Array:
    """Position ids of an h x w token grid (`minflux.ids.image_ids`): (B, h*w, 3) rows (t, row, col) for
    FLUX.1, (B, h*w, 4) rows (t, row, col, 0) for FLUX.2; fp32 (small integers, exact)."""
    return jnp.asarray(ids.image_ids(batch, h, w, FAMILIES[family].id_axes, t))


def text_ids(batch: int, length: int, family: str) -> Array:
    """Text position ids (`minflux.ids.text_ids`): zeros for FLUX.1 (B, L, 3); (0, 0, 0, l) for FLUX.2 (B, L, 4)."""
    spec = FAMILIES[family]
    return jnp.asarray(ids.text_ids(batch, length, spec.id_axes, spec.text_id_axis))


def reference_tokens(refs: list[Array], family: str) -> tuple[Array, Array]:
    """Encoded reference latents (each NHWC, any size; batch B or 1) -> (tokens, ids) of batch B to append after
    the image tokens.

    FLUX.1 Kontext takes one reference at t = 1; FLUX.2 takes several, reference i at t = 10 + 10 i.
    """
    spec = FAMILIES[family]
    if spec.max_refs is not None and len(refs) > spec.max_refs:
        raise ValueError(
            f"{family} takes at most {spec.max_refs} reference image(s), got {len(refs)}"
        )
    b = max(ref.shape[0] for ref in refs)  # references of batch one serve any batch
    tokens, pos = [], []
    for i, ref in enumerate(refs):
        h, w = token_grid(ref, family)
        tok = pack(ref, family)
        tokens.append(jnp.broadcast_to(tok, (b, *tok.shape[1:])))
        pos.append(image_ids(b, h, w, family, t=spec.ref_time(i)))
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


def inpaint_mask(mask: Array, family: str, factor: int = 8, mode: str = "max") -> Array:
    """Pixel mask (B, H, W, 1) in [0, 1], 1 = repaint -> per-token blend weights: FLUX.1 one weight per latent
    (`factor` pixels a side), packed like the latents -> (B, L, 64); FLUX.2 one per token (2 x `factor`) ->
    (B, L, 1). `factor`: the autoencoder's downsampling. mode (`minflux.masks`): "max", a latent or token is
    repainted as much as the most repainted pixel of its patch (thin strokes count; soft masks keep their
    values); "center", as diffusers' pipelines: binarised at 0.5, then FLUX.1 (`FluxInpaintPipeline`) takes the
    nearest pixel per latent, FLUX.2 (`Flux2KleinInpaintPipeline`) resizes bilinearly (no antialias) to the
    token grid, at an even factor the mean of the 2 x 2 pixels at each token's centre."""
    spec = FAMILIES[family]
    u = masks.unit(spec, factor)  # pixels per latent (FLUX.1) or token (FLUX.2)
    if mode == "max":
        m = reduce(mask.astype(jnp.float32), "b (h ph) (w pw) c -> b h w c", "max", ph=u, pw=u)
    elif mode == "center":
        mask = (mask >= 0.5).astype(jnp.float32)
        lo, hi = (
            (u - 1) // 2,
            u // 2,
        )  # bilinear at align_corners=False samples pixel u * i + (u - 1) / 2
        nearest = spec.inpaint_resize == "nearest"
        rows = mask[:, ::u] if nearest else (mask[:, lo::u] + mask[:, hi::u]) / 2
        m = rows[:, :, ::u] if nearest else (rows[:, :, lo::u] + rows[:, :, hi::u]) / 2
    else:
        raise ValueError(f"mask mode {mode!r}: expected one of {masks.MODES}")
    if spec.latent_patch > 1:  # FLUX.1: each latent's weight on its 16 channels, packed 2 x 2
        return pack(jnp.broadcast_to(m, (*m.shape[:3], spec.latent_channels)), family)
    return rearrange(m, "b h w c -> b (h w) c")


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


def prepare(cond: Conditioning, img_ids: Array, family: str, refs=None) -> Inputs:
    """The token-level inputs of `cond` for image tokens with ids img_ids (B, L, axes): text ids,
    and the references (`cond.refs` unless `refs` is given) packed into tokens and ids after the
    image's."""
    refs = cond.refs if refs is None else tuple(refs)
    ref_tok, ref_ids = reference_tokens(list(refs), family) if refs else (None, None)
    b, length = cond.txt.shape[:2]
    return Inputs(
        img_ids=img_ids,
        txt=cond.txt,
        txt_ids=text_ids(b, length, family),
        vec=cond.vec,
        guidance=cond.guidance,
        cfg_scale=cond.cfg_scale,
        neg_txt=cond.neg_txt,
        neg_vec=cond.neg_vec,
        img_cond=cond.img_cond,
        img_cond_seq=ref_tok,
        img_cond_seq_ids=ref_ids,
    )


def conditioning(model, inputs: Inputs) -> Batched:
    """Everything but the latents and the time, batched once before the loop.

    Image ids, references, Fill channels and the negative prompt may have a batch of one for any
    text batch. With a negative prompt (`neg_txt`, and `neg_vec` for FLUX.1) the text batch becomes
    [negative, positive] and each step runs both halves in one call (true CFG, as BFL's
    `denoise_cfg`). `guidance` only reaches guidance-distilled models (FLUX.1 dev, FLUX.2 dev);
    others ignore it, as BFL does. Raises ValueError when a guidance-distilled model gets no
    guidance."""
    b = inputs.txt.shape[0]
    # one serves every prompt
    batch = lambda a: None if a is None else jnp.broadcast_to(a, (b, *a.shape[1:]))
    img_ids, txt_ids, img_cond, img_cond_seq, img_cond_seq_ids, neg_txt, neg_vec = map(
        batch,
        (
            inputs.img_ids,
            inputs.txt_ids,
            inputs.img_cond,
            inputs.img_cond_seq,
            inputs.img_cond_seq_ids,
            inputs.neg_txt,
            inputs.neg_vec,
        ),
    )
    txt, vec, guidance = inputs.txt, inputs.vec, inputs.guidance
    cfg = neg_txt is not None
    if cfg:
        txt, txt_ids = jnp.concatenate((neg_txt, txt)), jnp.concatenate((txt_ids, txt_ids))
        vec = jnp.concatenate((neg_vec, vec)) if vec is not None else None
    use_guidance = model.params.guidance_embed and guidance is not None
    if model.params.guidance_embed and guidance is None:
        raise ValueError(
            "this model is guidance-distilled: pass guidance (e.g. 3.5 for FLUX.1 dev, 4 for FLUX.2 dev)"
        )
    return Batched(
        img_ids=img_ids,
        txt=txt,
        txt_ids=txt_ids,
        vec=vec,
        guidance=jnp.asarray(guidance, jnp.float32) if use_guidance else None,
        cfg_scale=jnp.asarray(inputs.cfg_scale, jnp.float32) if cfg else None,
        img_cond=img_cond,
        img_cond_seq=img_cond_seq,
        img_cond_seq_ids=img_cond_seq_ids,
    )


def velocity(model, img: Array, t: Array, cond: Batched) -> Array:
    """The flow at time t (0-d) for image tokens img (B, L, C): Fill channels and reference tokens
    attached, the prediction trimmed back to the image tokens, true CFG applied; fp32."""
    x, ids = img, cond.img_ids
    if cond.img_cond is not None:  # FLUX.1 Fill: channel-wise
        x = jnp.concatenate((x, cond.img_cond.astype(x.dtype)), axis=-1)
    if cond.img_cond_seq is not None:  # Kontext / FLUX.2 references: sequence-wise
        x = jnp.concatenate((x, cond.img_cond_seq.astype(x.dtype)), axis=1)
        ids = jnp.concatenate((ids, cond.img_cond_seq_ids), axis=1)
    cfg = cond.cfg_scale is not None
    if cfg:
        x, ids = jnp.concatenate((x, x)), jnp.concatenate((ids, ids))  # batch [negative, positive]
    b = x.shape[0]
    guidance = jnp.broadcast_to(cond.guidance, (b,)) if cond.guidance is not None else None
    pred = predict(
        model, x, ids, cond.txt, cond.txt_ids, jnp.broadcast_to(t, (b,)), cond.vec, guidance
    )
    pred = pred[:, : img.shape[1]].astype(jnp.float32)
    if cfg:
        neg, pos = jnp.split(pred, 2)
        pred = neg + cond.cfg_scale * (pos - neg)
    return pred


def schedule(model, steps: int, image_seq_len: int, shift: bool | None = None) -> list[float]:
    """The model's timesteps (`schedules.get_schedule`); shift: FLUX.1's resolution shift, by
    default on except for models without a guidance embedder (schnell); FLUX.2 always shifts."""
    cfg = model.params
    shift = FAMILIES[cfg.family].shifts_schedule(cfg) if shift is None else shift
    return schedules.get_schedule(steps, image_seq_len, cfg.family, shift=shift)


def _clock() -> int:
    """Milliseconds modulo 2^32: exact as a uint32 argument of a compiled loop (differences wrap
    correctly)."""
    return time.monotonic_ns() // 1_000_000 % 2**32


def _draw(desc: str, total: int, done: int, show, start) -> None:
    """Draw a loop's progress bar on stderr in tqdm's format: `done` of `total` steps since `start`
    (`_clock`)."""
    if show:
        elapsed = (_clock() - int(start)) % 2**32 / 1000
        bar = tqdm.format_meter(done, total, elapsed, prefix=desc, unit="step")
        sys.stderr.write("\r" + bar + ("\n" if done == total else ""))
        sys.stderr.flush()


def _tick(desc: str, total: int, bar) -> None:
    """Host callback from inside a compiled loop (`jax.debug.callback`): bar = (show, start, step i)
    from `_at`, one uint32 array (each operand costs a transfer per step). Stateless: everything
    arrives as arguments; at most ~100 redraws, and `_run` draws the last."""
    show, start, i = (int(v) for v in bar)
    if i + 1 < total and (i + 1) % max(1, total // 100) == 0:
        _draw(desc, total, i + 1, show, start)


def _at(bar: Array, ts: Array, t: Array) -> Array:
    """The progress a loop reports at time t: (show, start) and t's index in the schedule ts (whose
    times are distinct)."""
    return jnp.append(bar, jnp.argmin(jnp.abs(ts - t)).astype(jnp.uint32))


def _run(loop, desc: str, steps: int, progress: bool, *args) -> Array:
    """Run a compiled loop with its progress bar: drawn at 0 before, from inside while it runs, at
    the end after. Whether to show it and the start time are a traced argument (bar), so a bar on or
    off reuses the same program."""
    start = _clock()
    _draw(desc, steps, 0, progress, start)
    try:
        out = loop(*args, jnp.asarray([progress, start], jnp.uint32))
        out.block_until_ready()
        jax.effects_barrier()  # every in-loop draw delivered before the last one
    # (Ctrl-C): end the bar's line before the exception is reported, as tqdm does
    except BaseException:
        if progress:
            sys.stderr.write("\n")
        raise
    _draw(desc, steps, steps, progress, start)
    return out


@partial(jax.jit, static_argnames=("graphdef", "trajectory"))
def _denoise_loop(graphdef, state, img: Array, ts: Array, cond: Batched, trajectory: bool, bar):
    """The compiled loop: scan over (t_curr, t_prev) pairs; traced once per shapes and options."""
    model = nnx.merge(graphdef, state)
    n = ts.shape[0] - 1

    def step(x, t_pair):
        t_curr, t_prev = t_pair
        x = x + (t_prev - t_curr) * velocity(model, x, t_curr, cond)
        jax.debug.callback(partial(_tick, "denoising", n), _at(bar, ts, t_curr))
        return x, x if trajectory else None

    x, states = jax.lax.scan(step, img, (ts[:-1], ts[1:]))
    return jnp.concatenate((img[None], states)) if trajectory else x


@request.keywords(request.DENOISE, Inputs, "inputs")
def denoise(
    model,
    img: Array,
    timesteps: list[float],
    inputs: Inputs,
    trajectory: bool = False,
    progress: bool = False,
) -> Array:
    """Euler-integrate the flow over `timesteps` (from `schedules.get_schedule`), starting from
    tokens img.

    img (B, L, C); inputs: ids (B, L, axes), txt (B, Lt, context_in_dim) and its ids, vec (B, 768)
    for FLUX.1, guidance, true CFG, references (see `Inputs`, `conditioning`). Returns the final
    tokens (B, L, C) in fp32, or with `trajectory=True` every state (steps + 1, B, L, C), the input
    first: the parity suite compares these. The earlier form `denoise(model, img, img_ids, txt,
    txt_ids, timesteps, vec=..., guidance=..., ...)` still works."""
    cond = conditioning(model, inputs)
    # traced: a new schedule of the same length does not recompile
    ts = jnp.asarray(timesteps, jnp.float32)
    graphdef, state = nnx.split(model)
    x = jnp.asarray(img, jnp.float32)
    steps = len(timesteps) - 1
    return _run(
        _denoise_loop, "denoising", steps, progress, graphdef, state, x, ts, cond, trajectory
    )


@request.keywords(request.SAMPLE, Conditioning, "cond")
def sample(
    model,
    noise: Array,
    cond: Conditioning,
    steps: int = 28,
    shift: bool | None = None,
    progress: bool = False,
) -> Array:
    """Generate latents (NHWC, the shape of `noise`) for the conditioning `cond` (its prompt,
    guidance, encoded references (Kontext, FLUX.2 multi-reference), FLUX.1 Fill / control channels,
    init latents for img2img, noised to the schedule's time at `cond.strength`). shift: see
    `schedule`. The earlier form `sample(model, noise, txt, vec, steps=..., guidance=..., refs=...,
    init=...)` still works."""
    family = model.params.family
    if cond.mask is not None:
        raise ValueError("mask: inpainting runs through `sample_inpaint`")
    h, w = token_grid(noise, family)
    b = noise.shape[0]
    if cond.txt.shape[0] != b:
        raise ValueError(f"text batch {cond.txt.shape[0]} != noise batch {b}")
    img, img_ids = pack(noise, family), image_ids(b, h, w, family)
    timesteps = schedule(model, steps, h * w, shift)
    if cond.init is not None:
        timesteps = timesteps[schedules.strength_start(steps, cond.strength) :]
        img = add_noise(
            pack(cond.init, family).astype(jnp.float32), img.astype(jnp.float32), timesteps[0]
        )
    out = denoise(model, img, timesteps, prepare(cond, img_ids, family), progress=progress)
    return unpack(out, h, w, family)


# ---------------------------------------------------------------------------------------------
# Inpainting with the ordinary models: img2img with the known region put back after every step
# ---------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("graphdef",))
def _inpaint_loop(
    graphdef, state, img: Array, ts: Array, cond: Batched, init: Array, noise: Array, mask, bar
):
    """The compiled inpainting loop: `_denoise_loop`'s step followed by the blend; traced once per shapes."""
    model = nnx.merge(graphdef, state)
    n = ts.shape[0] - 1

    def step(x, t_pair):
        t_curr, t_prev = t_pair
        x = x + (t_prev - t_curr) * velocity(model, x, t_curr, cond)
        x = (1 - mask) * add_noise(init, noise, t_prev) + mask * x
        jax.debug.callback(partial(_tick, "inpainting", n), _at(bar, ts, t_curr))
        return x, None

    x, _ = jax.lax.scan(step, img, (ts[:-1], ts[1:]))
    return x


@request.keywords(request.DENOISE_INPAINT, Inputs, "inputs")
def denoise_inpaint(
    model,
    img: Array,
    timesteps: list[float],
    inputs: Inputs,
    init: Array,
    noise: Array,
    mask: Array,
    progress: bool = False,
) -> Array:
    """`denoise`, and after every step the known region is reset to the init tokens noised to the new time
    (diffusers' `FluxInpaintPipeline` / `Flux2KleinInpaintPipeline` loops):
    x <- x + (t_prev - t_curr) * v;  x <- (1 - mask) * add_noise(init, noise, t_prev) + mask * x.
    At the last step t_prev = 0, so the known region ends exactly as init. init, noise (B, L, C) tokens; mask from
    `inpaint_mask`, (B, L, C) or (B, L, 1). Returns the final tokens (B, L, C) in fp32.
    """
    cond = conditioning(model, inputs)
    ts = jnp.asarray(timesteps, jnp.float32)
    graphdef, state = nnx.split(model)
    x, init, noise, mask = (jnp.asarray(a, jnp.float32) for a in (img, init, noise, mask))
    steps = len(timesteps) - 1
    return _run(
        _inpaint_loop,
        "inpainting",
        steps,
        progress,
        graphdef,
        state,
        x,
        ts,
        cond,
        init,
        noise,
        mask,
    )


@request.keywords(request.SAMPLE_INPAINT, Conditioning, "cond")
def sample_inpaint(
    model,
    noise: Array,
    cond: Conditioning,
    steps: int = 28,
    factor: int = 8,
    shift: bool | None = None,
    progress: bool = False,
) -> Array:
    """Inpaint with an ordinary model: latents (NHWC, the shape of `noise`) that keep `cond.init`
    where `cond.mask` is 0.

    cond.init: the encoded image (FLUX.1 (B, H/8, W/8, 16); FLUX.2 (B, H/16, W/16, 128), normalised
    as our autoencoder's `encode` returns it); cond.mask: pixels (B, H, W, 1), 1 = repaint (see
    `inpaint_mask`; `factor` is the autoencoder's downsampling). The start is init noised to the
    schedule's time at `cond.strength`, as img2img. FLUX.1 follows `FluxInpaintPipeline` (dev,
    schnell, Krea; Fill has its own conditioning, `fill_conditioning`). FLUX.2 follows
    `Flux2KleinInpaintPipeline`: init is also the first reference image (t = 10), then `cond.refs`.
    Other arguments as in `sample`; the earlier form `sample_inpaint(model, noise, txt, init, mask,
    vec, steps=..., ...)` still works."""
    family = model.params.family
    init = cond.init
    if init is None or cond.mask is None:
        raise ValueError("inpainting needs cond.init and cond.mask")
    h, w = token_grid(noise, family)
    b = noise.shape[0]
    if cond.txt.shape[0] != b:
        raise ValueError(f"text batch {cond.txt.shape[0]} != noise batch {b}")
    if init.shape[1:] != noise.shape[1:]:
        raise ValueError(
            f"init latents {tuple(init.shape)} and noise {tuple(noise.shape)} differ in size"
        )
    m = inpaint_mask(cond.mask, family, factor, cond.mask_mode)
    if m.shape[1] != h * w:
        raise ValueError(
            f"mask {tuple(cond.mask.shape)} does not cover the {h} x {w} token grid at factor {factor}"
        )
    timesteps = schedule(model, steps, h * w, shift)
    timesteps = timesteps[schedules.strength_start(steps, cond.strength) :]
    init_tok, noise_tok = (
        pack(init, family).astype(jnp.float32),
        pack(noise, family).astype(jnp.float32),
    )
    img, img_ids = add_noise(init_tok, noise_tok, timesteps[0]), image_ids(b, h, w, family)
    refs = (init, *cond.refs) if FAMILIES[family].inpaint_init_ref else cond.refs
    inputs = prepare(cond, img_ids, family, refs)
    out = denoise_inpaint(model, img, timesteps, inputs, init_tok, noise_tok, m, progress=progress)
    return unpack(out, h, w, family)


# ---------------------------------------------------------------------------------------------
# FLUX.2 klein KV: reference tokens computed once
# ---------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("graphdef", "cached"))
def _kv_loop(graphdef, state, img: Array, ts: Array, cond: Batched, cached: bool, bar):
    """The compiled klein KV loop: the first step with the references (filling the caches), then a scan over
    the rest that reads the caches (traced values, part of the program) or recomputes them."""
    model = nnx.merge(graphdef, state)
    txt, txt_ids, img_ids = cond.txt, cond.txt_ids, cond.img_ids
    ref, ref_ids, steps = cond.img_cond_seq, cond.img_cond_seq_ids, ts.shape[0] - 1
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
    jax.debug.callback(partial(_tick, "denoising", steps), _at(bar, ts, ts[0]))

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
        jax.debug.callback(partial(_tick, "denoising", steps), _at(bar, ts, t_curr))
        return x, None

    x, _ = jax.lax.scan(step, x, (ts[1:-1], ts[2:]))
    return x


@request.keywords(request.DENOISE_KV, Inputs, "inputs", rename=request.KV_NAMES)
def denoise_kv(
    model,
    img: Array,
    timesteps: list[float],
    inputs: Inputs,
    cached: bool = True,
    progress: bool = False,
) -> Array:
    """`denoise` for klein KV models (`Flux2Config.ref_kv`; diffusers `Flux2KleinKVPipeline`): the
    reference tokens (`inputs.img_cond_seq`, B or 1, Lr, 128) attend only to themselves and are
    modulated at t = 0, so their keys and values are the same at every step. cached=True computes
    them at the first step and reuses them (the references leave the sequence); cached=False
    recomputes them at every step (the same numbers, for checking). No guidance embedder, no CFG
    (klein KV is distilled). Returns the final tokens (B, L, C) in fp32."""
    if model.params.guidance_embed:
        raise ValueError("klein KV sampling takes no guidance: this model has a guidance embedder")
    if inputs.img_cond_seq is None or inputs.neg_txt is not None or inputs.img_cond is not None:
        raise ValueError("klein KV sampling takes text and reference tokens only (no CFG, no Fill)")
    cond = conditioning(model, inputs)
    ts = jnp.asarray(timesteps, jnp.float32)
    graphdef, state = nnx.split(model)
    x = jnp.asarray(img, jnp.float32)
    steps = len(timesteps) - 1
    return _run(_kv_loop, "denoising", steps, progress, graphdef, state, x, ts, cond, cached)


@request.keywords(request.SAMPLE_KV, Conditioning, "cond")
def sample_kv(
    model,
    noise: Array,
    cond: Conditioning,
    steps: int = 4,
    cached: bool = True,
    progress: bool = False,
) -> Array:
    """Generate latents (NHWC, the shape of `noise`) with a klein KV model from the encoded
    reference latents `cond.refs` (each NHWC, any size; reference i at t = 10 + 10 i) and the text
    `cond.txt`; see `denoise_kv`. The earlier form `sample_kv(model, noise, txt, refs, steps=...)`
    still works."""
    family = model.params.family
    if not cond.refs:
        raise ValueError(
            "klein KV sampling needs at least one reference image (without, use `sample`)"
        )
    if cond.init is not None or cond.img_cond is not None:
        raise ValueError("klein KV sampling takes text and reference images only (no init image)")
    h, w = token_grid(noise, family)
    b = noise.shape[0]
    if cond.txt.shape[0] != b:
        raise ValueError(f"text batch {cond.txt.shape[0]} != noise batch {b}")
    timesteps = schedule(model, steps, h * w)
    img_ids = image_ids(b, h, w, family)
    out = denoise_kv(
        model, pack(noise, family), timesteps, prepare(cond, img_ids, family), cached, progress
    )
    return unpack(out, h, w, family)


# ---------------------------------------------------------------------------------------------
# How often each compiled loop was traced
# ---------------------------------------------------------------------------------------------


class _Traces:
    """Read-only: how many programs jax holds for each compiled loop ("denoise", "inpaint", "kv"), i.e.
    how often it was traced. The tests check that a second call with the same shapes traces nothing."""

    def __getitem__(self, name: str) -> int:
        loops = {"denoise": _denoise_loop, "inpaint": _inpaint_loop, "kv": _kv_loop}
        return loops[name]._cache_size()


TRACES = _Traces()
