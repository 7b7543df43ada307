"""Generation as one library call in PyTorch: prompt embeddings (+ references, init image, mask, control image)
-> decoded images. Twin: `minflux_jax/pipeline.py` (the same functions and arguments; images NCHW here).

Follows BFL flux `cli.py` / `cli_fill.py` / `cli_control.py` / `cli_kontext.py` and flux2 `cli.py`: encode the
conditioning images, draw the noise (numpy, `minflux.random`: the same latents in both frameworks for a seed),
integrate the flow (`sampling.sample`), decode one image at a time. Inputs and outputs are numpy, so a caller
never touches framework tensors:

    import numpy as np
    from minflux.request import Request
    import minflux_torch as mt
    from minflux_torch import pipeline
    model = mt.build_model("flux2-tiny", seed=0)                      # or mt.load_model(cfg, path)
    ae = mt.build_model("flux2-ae-tiny", seed=1)
    txt = np.random.default_rng(0).standard_normal((1, 16, 48), np.float32)   # (B, L, context_in_dim)
    req = Request(txt=txt, width=64, height=64, steps=4)                      # minflux.request.Request
    out = pipeline.generate(model, ae, req)                                   # (1, 64, 64, 3) uint8
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from minflux import configs, images, request
from minflux.request import Conditioning, Request
from minflux_torch import sampling
from minflux_torch.offload import Offloader, streaming
from minflux_torch.redux import redux_prompt

# ---------------------------------------------------------------------------------------------
# Autoencoder <-> numpy images
# ---------------------------------------------------------------------------------------------


def _layout(x: np.ndarray, like: nn.Module) -> torch.Tensor:
    """(N, H, W, C) numpy -> NCHW tensor on the module's device and dtype."""
    p = next(like.parameters())
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(p.device, p.dtype)


@torch.inference_mode()
def _device(model: nn.Module) -> torch.device:
    """Where the model computes: its first tensor not on "meta" (an offloaded model's blocks are there until their
    turn, and a model whose head keeps every linear quantized has buffers, no parameters, before them)."""
    return next(
        t.device for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta"
    )


def encode(ae: nn.Module, pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) float in [-1, 1] -> latents NCHW (the autoencoder's dtype)."""
    return ae.encode(_layout(pixels, ae))


@torch.inference_mode()
def decode(ae: nn.Module, latents: torch.Tensor) -> np.ndarray:
    """Latents NCHW -> (N, H, W, 3) uint8, one image at a time (bounded memory)."""
    dtype = next(ae.parameters()).dtype
    out = [ae.decode(z[None].to(dtype)).float().permute(0, 2, 3, 1).cpu().numpy() for z in latents]
    return images.to_uint8(np.concatenate(out))


@torch.inference_mode()
def encode_tokens(
    ae: nn.Module, pixels: np.ndarray, family: str, batch_size: int = 8
) -> tuple[np.ndarray, tuple]:
    """(N, H, W, 3) in [-1, 1] -> packed latent tokens (N, L, C) float32 numpy and the (h, w) token grid:
    what `minflux cache` stores for training."""
    out = []
    for i in range(0, len(pixels), batch_size):
        z = encode(ae, pixels[i : i + batch_size])
        out.append(sampling.pack(z, family).float().cpu().numpy())
    return np.concatenate(out), sampling.token_grid(z, family)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def noise(model: nn.Module, req: Request, pixels_per_token: int) -> torch.Tensor:
    """The starting latents of `req` (NCHW, fp32, on the model's device): image i's drawn from its seed alone
    (`Request.image_seeds`: seed + i, or seeds[i]), so a row of a batch is the image a single run with that
    seed draws; numpy's draw, the same in both frameworks."""
    device, family = _device(model), model.params.family
    draw = lambda seed: sampling.get_noise(
        1, req.height, req.width, family, seed, device=device, pixels_per_token=pixels_per_token
    )
    return torch.cat([draw(seed) for seed in req.image_seeds])


@torch.inference_mode()
def conditioning(model: nn.Module, ae: nn.Module, req: Request, kind: str) -> Conditioning:
    """What the sampler conditions on: `req`'s embeddings on the model's device, its images encoded
    by `ae` (FLUX.1 Fill: the image with the repaint region blanked, and the mask, as BFL's
    `prepare_fill`; Canny / Depth: the control image's tokens, as BFL's `prepare_control` after its
    edge or depth detector)."""
    device, family = _device(model), model.params.family
    ppt = configs.pixels_per_token(ae.params)
    emb = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.float32)).to(device)
    init, mask, img_cond = req.init, req.mask, None
    if kind == "fill":
        masked = encode(ae, (init * (1 - mask))[None])
        img_cond = sampling.fill_conditioning(masked, _layout(mask[None], ae), factor=ppt // 2)
        init, mask = None, None
    elif kind == "control":
        img_cond = sampling.pack(encode(ae, req.control[None]), family)
    return Conditioning(
        txt=emb(req.txt),
        vec=emb(req.vec),
        neg_txt=emb(req.neg_txt),
        neg_vec=emb(req.neg_vec),
        guidance=req.guidance,
        cfg_scale=req.cfg_scale,
        refs=tuple(encode(ae, r[None]) for r in req.refs),
        img_cond=img_cond,
        init=None if init is None else encode(ae, init[None]),
        strength=req.strength,
        mask=None if mask is None else _layout(mask[None], ae),
        mask_mode=req.mask_mode,
    )


@request.keywords(("model", "ae", "txt", "vec"), Request, "req")
@torch.inference_mode()
def generate(
    model: nn.Module,
    ae: nn.Module,
    req: Request,
    progress: bool = False,
    offload: Offloader | None = None,
) -> np.ndarray:
    """Images for the B prompts of `req` (`minflux.request.Request`): (B, height, width, 3) uint8.

    The request is checked against the model (`Request.check`: the conditioning it takes, sizes,
    references; ValueError naming the field), its images encoded (`conditioning`; references, init
    and mask serve every prompt), its noise drawn (`noise`: image i from seed + i alone), then
    sampled (the mask as `req.mask_mode` says, `minflux.masks`): klein KV models with references
    by `sampling.sample_kv` (the references' keys and values computed once), inpainting with an
    ordinary model (`req.mask`, not Fill) by `sampling.sample_inpaint` (diffusers' `FluxInpaintPipeline` /
    `Flux2KleinInpaintPipeline`), everything else by `sampling.sample`; decoded one image at a time.
    Redux: extend txt and vec first (`redux`). The earlier keyword form `generate(model, ae, txt,
    vec, width=..., height=..., steps=..., guidance=..., seed=..., refs=..., ...)` still works (the
    keywords are `Request`'s fields). offload: the `offload.Offloader` of an offloaded model
    (`offload.load_model`, `offload.offload_model`): every block call goes through it."""
    kind = req.check(model.params, ae.params)
    ppt = configs.pixels_per_token(ae.params)
    cond, x = conditioning(model, ae, req, kind), noise(model, req, ppt)
    with streaming(model, offload) as model:  # offloaded: each block streamed onto the device
        if model.params.ref_kv and cond.refs:
            latents = sampling.sample_kv(model, x, cond, steps=req.steps, progress=progress)
        elif cond.mask is not None:  # inpainting with an ordinary model: the known region is kept
            latents = sampling.sample_inpaint(
                model, x, cond, steps=req.steps, factor=ppt // 2, progress=progress
            )
        else:
            latents = sampling.sample(model, x, cond, steps=req.steps, progress=progress)
    return decode(ae, latents)


def redux(
    encoder, txt: np.ndarray, vec: np.ndarray, pictures, scale=1.0, pooled_scale=1.0
) -> tuple[np.ndarray, np.ndarray]:
    """FLUX.1 Redux: B prompts' embeddings txt (B, L, 4096) and vec (B, 768), each extended by the image tokens
    of `pictures` (paths, PIL images or uint8 arrays; SigLIP resizes them itself) from `encoder`
    (`minflux_torch.redux.load_redux`), with per-image scales, as `redux.redux_prompt`: (B, L + 729, 4096),
    (B, 768) float32 numpy for `generate`."""
    tokens = encoder.encode(pictures).float()
    t, v = (torch.from_numpy(np.asarray(a, np.float32)).to(tokens.device) for a in (txt, vec))
    t, v = redux_prompt(t, v, tokens, scale, pooled_scale)
    return t.cpu().numpy(), v.cpu().numpy()
