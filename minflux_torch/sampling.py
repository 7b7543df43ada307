"""Sampling in PyTorch: noise, latent packing, position ids, and the Euler ODE loop.

Follows black-forest-labs/flux `src/flux/sampling.py` (FLUX.1: `get_noise`, `prepare`, Kontext's
`prepare_kontext`, Fill's `prepare_fill`, `denoise`, `unpack`) and black-forest-labs/flux2
`src/flux2/sampling.py` (FLUX.2: `prc_img`, `prc_txt`, `encode_image_refs`, `denoise`, `denoise_cfg`).
Two loops follow diffusers, which BFL's repositories do not have: inpainting with the ordinary models
(`sample_inpaint`: `FluxInpaintPipeline`, `Flux2KleinInpaintPipeline`) and klein KV (`sample_kv`:
`Flux2KleinKVPipeline`, the references' keys and values computed once).
Schedules are framework-free (`minflux.schedules`). Twin: `minflux_jax/sampling.py`, whose images are
NHWC where these are NCHW; token tensors (B, L, C) and ids (B, L, axes) are identical in both.

Deliberate differences from BFL's loops: the latents are integrated in fp32 whatever the model dtype
(BFL keeps them in the model dtype), and times are fp32 tensors, so a bf16 model only rounds its own
activations. The official loops are otherwise followed step for step: x <- x + (t_prev - t_curr) * v.
The loop runs under `torch.inference_mode`; `minflux generate --compile` wraps the transformer in
`torch.compile` (every step calls it with the same shapes, so it compiles once).
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce
from torch import Tensor
from tqdm.auto import tqdm

from minflux import ids, masks, random, request, schedules
from minflux.family import FAMILIES
from minflux.request import Batched, Conditioning, Inputs

# ---------------------------------------------------------------------------------------------
# Noise, packing and position ids
# ---------------------------------------------------------------------------------------------


def get_noise(
    num_samples: int,
    height: int,
    width: int,
    family: str,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    pixels_per_token: int = 16,
) -> Tensor:
    """Seeded Gaussian latents, NCHW: FLUX.1 (B, 16, H/8, W/8); FLUX.2 (B, 128, H/16, W/16).

    `pixels_per_token` is 16 for the real autoencoders (the tiny test ones downsample less). Drawn in fp32
    numpy (`minflux.random.noise`, NCHW), so a seed gives the same latents in both frameworks and on every
    device (BFL draws on the GPU in bf16, which no CPU run can reproduce).
    """
    return torch.from_numpy(
        random.noise_nchw(num_samples, height, width, family, seed, pixels_per_token)
    ).to(device=device, dtype=dtype)


def token_grid(x: Tensor, family: str) -> tuple[int, int]:
    """(h, w) of the token grid of latents x (NCHW); FLUX.1 tokens are 2x2 latent patches."""
    p = FAMILIES[family].latent_patch
    return x.shape[-2] // p, x.shape[-1] // p


def pack(x: Tensor, family: str) -> Tensor:
    """Latents -> tokens. FLUX.1: 2x2 patches of 16 channels, (B, 16, 2h, 2w) -> (B, h*w, 64);
    FLUX.2: the autoencoder already patchified, (B, 128, h, w) -> (B, h*w, 128)."""
    p = FAMILIES[family].latent_patch
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=p, pw=p)


def unpack(x: Tensor, h: int, w: int, family: str) -> Tensor:
    """Tokens (B, h*w, C) on an h x w grid -> latents; inverse of `pack`."""
    p = FAMILIES[family].latent_patch
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=p, pw=p)


def image_ids(batch: int, h: int, w: int, family: str, t: float = 0) -> Tensor:
    """Position ids of an h x w token grid (`minflux.ids.image_ids`): (B, h*w, 3) rows (t, row, col) for
    FLUX.1, (B, h*w, 4) rows (t, row, col, 0) for FLUX.2; fp32 (small integers, exact)."""
    return torch.from_numpy(ids.image_ids(batch, h, w, FAMILIES[family].id_axes, t))


def text_ids(batch: int, length: int, family: str) -> Tensor:
    """Text position ids (`minflux.ids.text_ids`): zeros for FLUX.1 (B, L, 3); (0, 0, 0, l) for FLUX.2 (B, L, 4)."""
    spec = FAMILIES[family]
    return torch.from_numpy(ids.text_ids(batch, length, spec.id_axes, spec.text_id_axis))


def reference_tokens(refs: list[Tensor], family: str) -> tuple[Tensor, Tensor]:
    """Encoded reference latents (each NCHW, any size; batch B or 1) -> (tokens, ids) of batch B to append after
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
        tokens.append(pack(ref, family).expand(b, -1, -1))
        pos.append(image_ids(b, h, w, family, t=spec.ref_time(i)).to(ref.device))
    return torch.cat(tokens, dim=1), torch.cat(pos, dim=1)


def fill_conditioning(masked: Tensor, mask: Tensor, factor: int = 8) -> Tensor:
    """FLUX.1 Fill's extra input channels: the encoded masked image (B, 16, H/8, W/8) and the pixel
    mask (B, 1, H, W), 1 = repaint, folded 8x8 into channels -> (B, L, 64 + 256) tokens. `factor` is the
    autoencoder's downsampling (8; less for the tiny test autoencoders)."""
    mask = rearrange(
        mask[:, 0], "b (h ph) (w pw) -> b (ph pw) h w", ph=factor, pw=factor
    )  # (B, 64, H/8, W/8)
    return torch.cat((pack(masked, "flux1"), pack(mask.to(masked.dtype), "flux1")), dim=-1)


def add_noise(x: Tensor, noise: Tensor, t: float) -> Tensor:
    """img2img start: the flow-matching interpolation t * noise + (1 - t) * x (diffusers' `scale_noise`)."""
    return t * noise + (1.0 - t) * x


def inpaint_mask(mask: Tensor, family: str, factor: int = 8, mode: str = "max") -> Tensor:
    """Pixel mask (B, 1, H, W) in [0, 1], 1 = repaint -> per-token blend weights: FLUX.1 one weight per latent
    (`factor` pixels a side), packed like the latents -> (B, L, 64); FLUX.2 one per token (2 x `factor`) ->
    (B, L, 1). `factor`: the autoencoder's downsampling. mode (`minflux.masks`): "max", a latent or token is
    repainted as much as the most repainted pixel of its patch (thin strokes count; soft masks keep their
    values); "center", as diffusers' pipelines: binarised at 0.5, then FLUX.1 (`FluxInpaintPipeline`) takes the
    nearest pixel per latent, FLUX.2 (`Flux2KleinInpaintPipeline`) resizes bilinearly (no antialias) to the
    token grid, at an even factor the mean of the 2 x 2 pixels at each token's centre."""
    spec = FAMILIES[family]
    u = masks.unit(spec, factor)  # pixels per latent (FLUX.1) or token (FLUX.2)
    if mode == "max":
        m = reduce(mask.float(), "b c (h ph) (w pw) -> b c h w", "max", ph=u, pw=u)
    elif mode == "center":
        mask = (mask >= 0.5).float()
        lo, hi = (
            (u - 1) // 2,
            u // 2,
        )  # bilinear at align_corners=False samples pixel u * i + (u - 1) / 2
        nearest = spec.inpaint_resize == "nearest"
        rows = mask[:, :, ::u] if nearest else (mask[:, :, lo::u] + mask[:, :, hi::u]) / 2
        m = rows[..., ::u] if nearest else (rows[..., lo::u] + rows[..., hi::u]) / 2
    else:
        raise ValueError(f"mask mode {mode!r}: expected one of {masks.MODES}")
    if spec.latent_patch > 1:  # FLUX.1: each latent's weight on its 16 channels, packed 2 x 2
        return pack(m.expand(-1, spec.latent_channels, -1, -1), family)
    return rearrange(m, "b c h w -> b (h w) c")


# ---------------------------------------------------------------------------------------------
# The Euler loop
# ---------------------------------------------------------------------------------------------


def predict(
    model,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    t: Tensor,
    vec: Tensor | None,
    guidance: Tensor | None,
) -> Tensor:
    """One model call with each family's keyword names (`forward_kwargs`); t and guidance are (B,)."""
    return model(**model.params.forward_kwargs(img, img_ids, txt, txt_ids, t, vec, guidance))


def prepare(cond: Conditioning, img_ids: Tensor, family: str, refs=None) -> Inputs:
    """The token-level inputs of `cond` for image tokens with ids img_ids (B, L, axes): text ids,
    and the references (`cond.refs` unless `refs` is given) packed into tokens and ids after the
    image's."""
    refs = cond.refs if refs is None else tuple(refs)
    ref_tok, ref_ids = reference_tokens(list(refs), family) if refs else (None, None)
    b, length = cond.txt.shape[:2]
    return Inputs(
        img_ids=img_ids,
        txt=cond.txt,
        txt_ids=text_ids(b, length, family).to(img_ids.device),
        vec=cond.vec,
        guidance=cond.guidance,
        cfg_scale=cond.cfg_scale,
        neg_txt=cond.neg_txt,
        neg_vec=cond.neg_vec,
        img_cond=cond.img_cond,
        img_cond_seq=ref_tok,
        img_cond_seq_ids=None if ref_ids is None else ref_ids.to(img_ids.device),
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
    batch = lambda a: None if a is None else a.expand(b, *a.shape[1:])  # one serves every prompt
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
        txt, txt_ids = torch.cat((neg_txt, txt)), torch.cat((txt_ids, txt_ids))
        vec = torch.cat((neg_vec, vec)) if vec is not None else None
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
        guidance=torch.tensor(float(guidance), device=txt.device) if use_guidance else None,
        cfg_scale=torch.tensor(float(inputs.cfg_scale), device=txt.device) if cfg else None,
        img_cond=img_cond,
        img_cond_seq=img_cond_seq,
        img_cond_seq_ids=img_cond_seq_ids,
    )


def velocity(model, img: Tensor, t: Tensor, cond: Batched) -> Tensor:
    """The flow at time t (0-d) for image tokens img (B, L, C): Fill channels and reference tokens
    attached, the prediction trimmed back to the image tokens, true CFG applied; fp32."""
    x, ids = img, cond.img_ids
    if cond.img_cond is not None:  # FLUX.1 Fill: channel-wise
        x = torch.cat((x, cond.img_cond.to(x.dtype)), dim=-1)
    if cond.img_cond_seq is not None:  # Kontext / FLUX.2 references: sequence-wise
        x = torch.cat((x, cond.img_cond_seq.to(x.dtype)), dim=1)
        ids = torch.cat((ids, cond.img_cond_seq_ids), dim=1)
    cfg = cond.cfg_scale is not None
    if cfg:
        x, ids = torch.cat((x, x)), torch.cat((ids, ids))  # batch [negative, positive]
    b = x.shape[0]
    guidance = cond.guidance.expand(b) if cond.guidance is not None else None
    pred = predict(model, x, ids, cond.txt, cond.txt_ids, t.expand(b), cond.vec, guidance)
    pred = pred[:, : img.shape[1]].float()
    if cfg:
        neg, pos = pred.chunk(2)
        pred = neg + cond.cfg_scale * (pos - neg)
    return pred


def schedule(model, steps: int, image_seq_len: int, shift: bool | None = None) -> list[float]:
    """The model's timesteps (`schedules.get_schedule`); shift: FLUX.1's resolution shift, by
    default on except for models without a guidance embedder (schnell); FLUX.2 always shifts."""
    cfg = model.params
    shift = FAMILIES[cfg.family].shifts_schedule(cfg) if shift is None else shift
    return schedules.get_schedule(steps, image_seq_len, cfg.family, shift=shift)


@request.keywords(request.DENOISE, Inputs, "inputs")
@torch.inference_mode()
def denoise(
    model,
    img: Tensor,
    timesteps: list[float],
    inputs: Inputs,
    trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    """Euler-integrate the flow over `timesteps` (from `schedules.get_schedule`), starting from
    tokens img.

    img (B, L, C); inputs: ids (B, L, axes), txt (B, Lt, context_in_dim) and its ids, vec (B, 768)
    for FLUX.1, guidance, true CFG, references (see `Inputs`, `conditioning`). Returns the final
    tokens (B, L, C) in fp32, or with `trajectory=True` every state (steps + 1, B, L, C), the input
    first: the parity suite compares these. The earlier form `denoise(model, img, img_ids, txt,
    txt_ids, timesteps, vec=..., guidance=..., ...)` still works."""
    cond = conditioning(model, inputs)
    ts = torch.tensor(timesteps, dtype=torch.float32, device=img.device)  # fp32 as the JAX loop's
    x = img.float()
    states = [x]
    for i in tqdm(range(len(timesteps) - 1), desc="denoising", unit="step", disable=not progress):
        x = x + (ts[i + 1] - ts[i]) * velocity(model, x, ts[i], cond)
        if trajectory:
            states.append(x)
    return torch.stack(states) if trajectory else x


@request.keywords(request.SAMPLE, Conditioning, "cond")
def sample(
    model,
    noise: Tensor,
    cond: Conditioning,
    steps: int = 28,
    shift: bool | None = None,
    progress: bool = False,
) -> Tensor:
    """Generate latents (NCHW, the shape of `noise`) for the conditioning `cond` (its prompt,
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
    img, img_ids = pack(noise, family), image_ids(b, h, w, family).to(noise.device)
    timesteps = schedule(model, steps, h * w, shift)
    if cond.init is not None:
        timesteps = timesteps[schedules.strength_start(steps, cond.strength) :]
        img = add_noise(pack(cond.init, family).float(), img.float(), timesteps[0])
    out = denoise(model, img, timesteps, prepare(cond, img_ids, family), progress=progress)
    return unpack(out, h, w, family)


# ---------------------------------------------------------------------------------------------
# Inpainting with the ordinary models: img2img with the known region put back after every step
# ---------------------------------------------------------------------------------------------


@request.keywords(request.DENOISE_INPAINT, Inputs, "inputs")
@torch.inference_mode()
def denoise_inpaint(
    model,
    img: Tensor,
    timesteps: list[float],
    inputs: Inputs,
    init: Tensor,
    noise: Tensor,
    mask: Tensor,
    progress: bool = False,
) -> Tensor:
    """`denoise`, and after every step the known region is reset to the init tokens noised to the new time
    (diffusers' `FluxInpaintPipeline` / `Flux2KleinInpaintPipeline` loops):
    x <- x + (t_prev - t_curr) * v;  x <- (1 - mask) * add_noise(init, noise, t_prev) + mask * x.
    At the last step t_prev = 0, so the known region ends exactly as init. init, noise (B, L, C) tokens; mask from
    `inpaint_mask`, (B, L, C) or (B, L, 1). Returns the final tokens (B, L, C) in fp32.
    """
    cond = conditioning(model, inputs)
    ts = torch.tensor(timesteps, dtype=torch.float32, device=img.device)
    x, init, noise, mask = img.float(), init.float(), noise.float(), mask.float()
    for i in tqdm(range(len(timesteps) - 1), desc="inpainting", unit="step", disable=not progress):
        x = x + (ts[i + 1] - ts[i]) * velocity(model, x, ts[i], cond)
        x = (1 - mask) * add_noise(init, noise, ts[i + 1]) + mask * x
    return x


@request.keywords(request.SAMPLE_INPAINT, Conditioning, "cond")
def sample_inpaint(
    model,
    noise: Tensor,
    cond: Conditioning,
    steps: int = 28,
    factor: int = 8,
    shift: bool | None = None,
    progress: bool = False,
) -> Tensor:
    """Inpaint with an ordinary model: latents (NCHW, the shape of `noise`) that keep `cond.init`
    where `cond.mask` is 0.

    cond.init: the encoded image (FLUX.1 (B, 16, H/8, W/8); FLUX.2 (B, 128, H/16, W/16), normalised
    as our autoencoder's `encode` returns it); cond.mask: pixels (B, 1, H, W), 1 = repaint (see
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
    m = inpaint_mask(cond.mask, family, factor, cond.mask_mode).to(noise.device)
    if m.shape[1] != h * w:
        raise ValueError(
            f"mask {tuple(cond.mask.shape)} does not cover the {h} x {w} token grid at factor {factor}"
        )
    timesteps = schedule(model, steps, h * w, shift)
    timesteps = timesteps[schedules.strength_start(steps, cond.strength) :]
    init_tok, noise_tok = pack(init, family).float(), pack(noise, family).float()
    img, img_ids = (
        add_noise(init_tok, noise_tok, timesteps[0]),
        image_ids(b, h, w, family).to(noise.device),
    )
    refs = (init, *cond.refs) if FAMILIES[family].inpaint_init_ref else cond.refs
    inputs = prepare(cond, img_ids, family, refs)
    out = denoise_inpaint(model, img, timesteps, inputs, init_tok, noise_tok, m, progress=progress)
    return unpack(out, h, w, family)


# ---------------------------------------------------------------------------------------------
# FLUX.2 klein KV: reference tokens computed once
# ---------------------------------------------------------------------------------------------


@request.keywords(request.DENOISE_KV, Inputs, "inputs", rename=request.KV_NAMES)
@torch.inference_mode()
def denoise_kv(
    model,
    img: Tensor,
    timesteps: list[float],
    inputs: Inputs,
    cached: bool = True,
    progress: bool = False,
) -> Tensor:
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
    txt, txt_ids, img_ids = cond.txt, cond.txt_ids, cond.img_ids
    ref, ref_ids, b = cond.img_cond_seq, cond.img_cond_seq_ids, txt.shape[0]
    ts = torch.tensor(timesteps, dtype=torch.float32, device=img.device)
    x, cache = img.float(), None
    for i in tqdm(range(len(timesteps) - 1), desc="denoising", unit="step", disable=not progress):
        t = ts[i].expand(b)
        if cache is None or not cached:
            # the references in the sequence; their keys and values returned
            pred, cache = model.forward_kv(
                x=torch.cat((x, ref.float()), dim=1),
                x_ids=torch.cat((img_ids, ref_ids), dim=1),
                timesteps=t,
                ctx=txt,
                ctx_ids=txt_ids,
                n_ref=ref.shape[1],
            )
        else:
            pred = model.forward_cached(
                x=x, x_ids=img_ids, timesteps=t, ctx=txt, ctx_ids=txt_ids, cache=cache
            )
        x = x + (ts[i + 1] - ts[i]) * pred[:, : x.shape[1]].float()
    return x


@request.keywords(request.SAMPLE_KV, Conditioning, "cond")
def sample_kv(
    model,
    noise: Tensor,
    cond: Conditioning,
    steps: int = 4,
    cached: bool = True,
    progress: bool = False,
) -> Tensor:
    """Generate latents (NCHW, the shape of `noise`) with a klein KV model from the encoded
    reference latents `cond.refs` (each NCHW, any size; reference i at t = 10 + 10 i) and the text
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
    img_ids = image_ids(b, h, w, family).to(noise.device)
    out = denoise_kv(
        model, pack(noise, family), timesteps, prepare(cond, img_ids, family), cached, progress
    )
    return unpack(out, h, w, family)
