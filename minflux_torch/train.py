"""Training FLUX in PyTorch: the rectified-flow objective, timestep sampling, the optimiser and the step.

The PyTorch twin of `minflux_jax/train.py` (same functions, same order, same local names), here to prove
the math: tests/test_train.py feeds both the same batch, noise and times and compares the loss and every
gradient. Objective (Esser et al. 2024, SD3; BFL's samplers integrate the same flow): x_t = (1 - t) x0 +
t eps, target eps - x0, mean squared error. Large-scale training (mesh, FSDP, orbax) is JAX-only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from minflux import schedules
from minflux_torch.layers import BlockRunner, call_block

# ---------------------------------------------------------------------------------------------
# Timesteps and the flow-matching loss
# ---------------------------------------------------------------------------------------------


def resolution_mu(image_seq_len: int) -> float:
    """FLUX's resolution-dependent shift: mu linear in the token count (FLUX.1's line, used for both families;
    FLUX.2's sampling mu also depends on the step count, which training does not have)."""
    return schedules.get_lin_function()(image_seq_len)


def shift_timesteps(t: Tensor, mu: float) -> Tensor:
    """`schedules.time_shift(mu, 1, t)` = e^mu / (e^mu + 1/t - 1), written to stay finite at t = 0."""
    return math.exp(mu) * t / (1 + (math.exp(mu) - 1) * t)


def sample_timesteps(
    generator: torch.Generator,
    batch: int,
    kind: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    mu: float | None = None,
) -> Tensor:
    """(B,) times in (0, 1): logit-normal sigmoid(mean + std z) (SD3's default) or uniform, then shifted by mu."""
    if kind == "uniform":
        t = torch.rand(batch, generator=generator)
    elif kind == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    else:
        raise ValueError(f"timestep sampling {kind!r}: expected 'logit_normal' or 'uniform'")
    return t if mu is None else shift_timesteps(t, mu)


def loss_weight(t: Tensor, kind: str = "none") -> Tensor:
    """Per-sample loss weight: none, or SD3's "cosmap" 2 / (pi (1 - 2t + 2t^2))."""
    if kind == "none":
        return torch.ones_like(t)
    if kind == "cosmap":
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    raise ValueError(f"loss weighting {kind!r}: expected 'none' or 'cosmap'")


def flow_loss(
    model, batch: dict, noise: Tensor, t: Tensor, weighting: str = "none", remat: str = "none"
) -> Tensor:
    """Rectified-flow MSE for clean tokens batch["img"] (B, L, C), noise (B, L, C) and times t (B,).

    batch also holds img_ids, txt, txt_ids, and vec (FLUX.1's pooled vector) and guidance when the model takes them;
    for edit and control pairs, the conditioning `model_inputs` attaches (references, Fill / control channels).
    The loss covers the target tokens only, averaged over this batch's own token count.
    """
    x0 = batch["img"].float()
    tt = t[:, None, None]
    xt = (1 - tt) * x0 + tt * noise  # t = 1 is pure noise, as in the samplers
    x, inputs = model_inputs(xt, batch)
    pred = forward(model, x, t, inputs, remat)[:, : x0.shape[1]]  # the target tokens
    err = torch.mean((pred.float() - (noise - x0)) ** 2, dim=(1, 2))  # (B,)
    return torch.mean(loss_weight(t, weighting) * err)


def model_inputs(xt: Tensor, batch: dict) -> tuple[Tensor, dict]:
    """The tokens the model sees for noisy target tokens xt (B, L, C), and the batch with their ids.

    img_cond (B, L, Cc): FLUX.1 Fill (masked image + mask) or Canny / Depth (control image) channels appended to
    each token, as BFL's `prepare_fill` / `prepare_control`. ref (B, Lr, C) with ref_ids (B, Lr, axes): reference
    tokens appended to the sequence (Kontext at t = 1, FLUX.2 reference i at t = 10 + 10 i), as diffusers'
    `train_dreambooth_lora_flux_kontext.py` and `train_dreambooth_lora_flux2_klein_img2img.py` do.
    """
    x = xt
    if "img_cond" in batch:
        x = torch.cat((x, batch["img_cond"].to(x.dtype)), dim=-1)
    if "ref" in batch:
        x = torch.cat((x, batch["ref"].to(x.dtype)), dim=1)
        batch = {**batch, "img_ids": torch.cat((batch["img_ids"], batch["ref_ids"]), dim=1)}
    return x, batch


# ---------------------------------------------------------------------------------------------
# The forward pass, with optional rematerialisation (activation checkpointing) per block
# ---------------------------------------------------------------------------------------------


def block_runner(remat: str = "none") -> BlockRunner:
    """The forward's `BlockRunner` in training: with remat, each block (and the final layer) checkpointed, its
    activations recomputed in the backward pass (torch keeps no per-op policy: every remat setting recomputes
    the whole block)."""
    if remat == "none":
        return call_block
    return lambda block, *args, **kwargs: checkpoint(block, *args, use_reentrant=False, **kwargs)


def forward(model, x: Tensor, t: Tensor, batch: dict, remat: str = "none") -> Tensor:
    """The model's prediction on noisy tokens x (B, L, C): the model's own forward through `block_runner`."""
    kw = model.params.forward_kwargs(
        x,
        batch["img_ids"],
        batch["txt"],
        batch["txt_ids"],
        t,
        batch.get("vec"),
        batch.get("guidance"),
    )
    return model(**kw, run=block_runner(remat))


# ---------------------------------------------------------------------------------------------
# Optimiser and the step
# ---------------------------------------------------------------------------------------------


def lr_schedule(lr: float, warmup: int, steps: int, final: float = 0.1):
    """Linear warm-up from 0 to lr over `warmup` steps, then cosine decay to `final * lr` at `steps`
    (optax.warmup_cosine_decay_schedule's formula)."""
    steps = max(steps, warmup + 1)

    def at(step: int) -> float:
        if step < warmup:
            return lr * step / warmup
        frac = min(step - warmup, steps - warmup) / (steps - warmup)
        return final * lr + (lr - final * lr) * 0.5 * (1 + math.cos(math.pi * frac))

    return at


def make_optimizer(
    model,
    lr: float = 1e-4,
    warmup: int = 0,
    steps: int = 1000,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
):
    """(AdamW, LambdaLR) on the warm-up + cosine schedule; weight decay on matrices only. Clipping is in the step."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=eps)
    at = lr_schedule(lr, warmup, steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: at(step) / lr)


def step_inputs(
    generator: torch.Generator, batch: dict, family: str, timesteps: dict
) -> tuple[Tensor, Tensor]:
    """Noise (B, L, C) and times (B,) for one step, from one generator: the data decide nothing random."""
    x0 = batch["img"]
    mu = resolution_mu(x0.shape[1]) if timesteps.get("shift") else None
    t = sample_timesteps(
        generator,
        x0.shape[0],
        timesteps.get("kind", "logit_normal"),
        timesteps.get("mean", 0.0),
        timesteps.get("std", 1.0),
        mu,
    )
    return torch.randn(x0.shape, generator=generator), t


def train_step(
    model,
    opt,
    sched,
    batch: dict,
    noise: Tensor,
    t: Tensor,
    clip: float = 1.0,
    weighting: str = "none",
    remat: str = "none",
) -> dict:
    """One optimiser step on given noise and times; returns the loss and the gradient norm before clipping."""
    opt.zero_grad(set_to_none=True)
    loss = flow_loss(model, batch, noise, t, weighting, remat)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], clip
    )
    opt.step()
    sched.step()
    return {"loss": loss.detach(), "grad_norm": grad_norm}
