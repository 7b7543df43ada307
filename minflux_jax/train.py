"""Training FLUX in JAX: the rectified-flow objective, timestep sampling, the optimiser and the step.

The objective follows SD3 / FLUX practice (Esser et al. 2024, "Scaling Rectified Flow Transformers";
BFL's samplers integrate the same flow from t = 1 to t = 0): x_t = (1 - t) x0 + t eps, the model predicts
the velocity eps - x0, the loss is its mean squared error. Twin: `minflux_torch/train.py`, the same
functions on the same inputs; tests/test_train.py checks that losses and every gradient agree.

Parameters travel as a flat dict keyed by the BFL checkpoint names (`double_blocks.0.img_attn.qkv.weight`)
whose values are in Flax layout (kernels (in, out)): orbax saves it, the mesh shards it, LoRA and the
parity test address it by name, and `nnx.merge` rebuilds the model from it inside the compiled step.
The loop, mesh and checkpoints live in `minflux_jax/trainer.py`; LoRA in `minflux_jax/lora.py`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from minflux import schedules
from minflux_jax.layers import BlockRunner, call_block
from minflux_jax.load import torch_keys

Array = jax.Array

# ---------------------------------------------------------------------------------------------
# Timesteps and the flow-matching loss
# ---------------------------------------------------------------------------------------------


def resolution_mu(image_seq_len: int) -> float:
    """FLUX's resolution-dependent shift: mu linear in the token count (FLUX.1's line, used for both families;
    FLUX.2's sampling mu also depends on the step count, which training does not have)."""
    return schedules.get_lin_function()(image_seq_len)


def shift_timesteps(t: Array, mu: float) -> Array:
    """`schedules.time_shift(mu, 1, t)` = e^mu / (e^mu + 1/t - 1), written to stay finite at t = 0."""
    return math.exp(mu) * t / (1 + (math.exp(mu) - 1) * t)


def sample_timesteps(
    key: Array,
    batch: int,
    kind: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    mu: float | None = None,
) -> Array:
    """(B,) times in (0, 1): logit-normal sigmoid(mean + std z) (SD3's default) or uniform, then shifted by mu."""
    if kind == "uniform":
        t = jax.random.uniform(key, (batch,), jnp.float32)
    elif kind == "logit_normal":
        t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
    else:
        raise ValueError(f"timestep sampling {kind!r}: expected 'logit_normal' or 'uniform'")
    return t if mu is None else shift_timesteps(t, mu)


def loss_weight(t: Array, kind: str = "none") -> Array:
    """Per-sample loss weight: none, or SD3's "cosmap" 2 / (pi (1 - 2t + 2t^2))."""
    if kind == "none":
        return jnp.ones_like(t)
    if kind == "cosmap":
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    raise ValueError(f"loss weighting {kind!r}: expected 'none' or 'cosmap'")


def flow_loss(
    model,
    batch: dict,
    noise: Array,
    t: Array,
    weighting: str = "none",
    remat: str = "none",
    gather=None,
) -> Array:
    """Rectified-flow MSE for clean tokens batch["img"] (B, L, C), noise (B, L, C) and times t (B,).

    batch also holds img_ids, txt, txt_ids, and vec (FLUX.1's pooled vector) and guidance when the model takes them;
    for edit and control pairs, the conditioning `model_inputs` attaches (references, Fill / control channels).
    The loss covers the target tokens only, averaged over this batch's own token count. gather (JAX only): see
    `forward`.
    """
    x0 = batch["img"].astype(jnp.float32)
    tt = t[:, None, None]
    xt = (1 - tt) * x0 + tt * noise  # t = 1 is pure noise, as in the samplers
    x, inputs = model_inputs(xt, batch)
    pred = forward(model, x, t, inputs, remat, gather)[:, : x0.shape[1]]  # the target tokens
    err = jnp.mean((pred.astype(jnp.float32) - (noise - x0)) ** 2, axis=(1, 2))  # (B,)
    return jnp.mean(loss_weight(t, weighting) * err)


def model_inputs(xt: Array, batch: dict) -> tuple[Array, dict]:
    """The tokens the model sees for noisy target tokens xt (B, L, C), and the batch with their ids.

    img_cond (B, L, Cc): FLUX.1 Fill (masked image + mask) or Canny / Depth (control image) channels appended to
    each token, as BFL's `prepare_fill` / `prepare_control`. ref (B, Lr, C) with ref_ids (B, Lr, axes): reference
    tokens appended to the sequence (Kontext at t = 1, FLUX.2 reference i at t = 10 + 10 i), as diffusers'
    `train_dreambooth_lora_flux_kontext.py` and `train_dreambooth_lora_flux2_klein_img2img.py` do.
    """
    x = xt
    if "img_cond" in batch:
        x = jnp.concatenate((x, batch["img_cond"].astype(x.dtype)), axis=-1)
    if "ref" in batch:
        x = jnp.concatenate((x, batch["ref"].astype(x.dtype)), axis=1)
        batch = {**batch, "img_ids": jnp.concatenate((batch["img_ids"], batch["ref_ids"]), axis=1)}
    return x, batch


# ---------------------------------------------------------------------------------------------
# The forward pass, with optional rematerialisation per block
# ---------------------------------------------------------------------------------------------

REMAT_POLICIES = {  # what the backward pass may keep from the forward pass of each block
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything: least memory
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
    # keep each attention output (named in layers.attention): the backward pass recomputes the cheap linears,
    # never the attention kernel, for (B, L, D) per attention call
    "attention": jax.checkpoint_policies.save_only_these_names("attention"),
    "attention_dots": jax.checkpoint_policies.save_from_both_policies(  # attention outputs + weight matmuls
        jax.checkpoint_policies.save_only_these_names("attention"),
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    ),
}


def gather_outside_blocks(params: dict, gather) -> dict:
    """`gather` applied to the weights that are not in a block (embedders, modulations; the final layer is
    gathered where it runs, as the blocks are)."""
    inside = ("double_blocks.", "single_blocks.", "final_layer.")
    return {k: v if k.startswith(inside) else gather(v) for k, v in params.items()}


def block_runner(remat: str = "none", gather=None) -> BlockRunner:
    """The forward's `BlockRunner` in training: each block (and the final layer) an `nnx.remat` region with the
    policy `remat`, its weights gathered by `gather` inside it."""
    if remat == "none" and gather is None:
        return call_block

    def call(block, args, kwargs):  # positional only, as nnx.remat wants
        if gather is not None:  # FSDP: this block's weights, all-gathered here and only here
            graphdef, state = nnx.split(block)
            block = nnx.merge(graphdef, jax.tree.map(gather, state))
        return block(*args, **kwargs)

    if remat != "none":
        call = nnx.remat(call, policy=REMAT_POLICIES[remat])
    return lambda block, *args, **kwargs: call(block, args, kwargs)


def forward(model, x: Array, t: Array, batch: dict, remat: str = "none", gather=None) -> Array:
    """The model's prediction on noisy tokens x (B, L, C): the model's own forward through `block_runner`.

    gather: FSDP training's array -> array constraint (`trainer.fsdp_gather`), applied to each block's weights
    where the block runs, inside its remat region: XLA then all-gathers a block's weights where it runs and
    reduces their gradients, instead of resharding activations to match sharded weights. The weights outside
    blocks are gathered by `loss_fn`.
    """
    kw = model.params.forward_kwargs(
        x,
        batch["img_ids"],
        batch["txt"],
        batch["txt_ids"],
        t,
        batch.get("vec"),
        batch.get("guidance"),
    )
    return model(**kw, run=block_runner(remat, gather))


# ---------------------------------------------------------------------------------------------
# Parameters as a flat dict keyed by BFL names
# ---------------------------------------------------------------------------------------------


def split_params(model) -> tuple[nnx.GraphDef, dict[str, Array], dict[str, tuple]]:
    """(graphdef, {BFL key: Flax-layout array}, {BFL key: Flax state path}) of a model."""
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    paths = {key: path for path, (key, _) in torch_keys(model).items()}
    if len(paths) != len(flat):
        raise ValueError(
            f"{type(model).__name__}: state {len(flat)} entries, BFL names {len(paths)}"
        )
    return graphdef, {key: flat[path][...] for key, path in paths.items()}, paths


def merge_params(graphdef: nnx.GraphDef, params: dict[str, Array], paths: dict[str, tuple]):
    """The model of `graphdef` holding `params`; works on traced arrays, inside jit and grad."""
    nested: dict = {}
    for key, value in params.items():
        *head, last = paths[key]
        d = nested
        for p in head:
            d = d.setdefault(p, {})
        d[last] = value
    return nnx.merge(graphdef, nested)


# ---------------------------------------------------------------------------------------------
# Optimiser and the step
# ---------------------------------------------------------------------------------------------


def lr_schedule(lr: float, warmup: int, steps: int, final: float = 0.1):
    """Linear warm-up from 0 to lr over `warmup` steps, then cosine decay to `final * lr` at `steps`."""
    if warmup == 0:
        return optax.cosine_decay_schedule(lr, max(steps, 1), final)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), final * lr)


def make_optimizer(
    lr: float = 1e-4,
    warmup: int = 0,
    steps: int = 1000,
    weight_decay: float = 0.0,
    clip: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    accumulate: int = 1,
    mu_dtype=None,
) -> optax.GradientTransformation:
    """AdamW on a warm-up + cosine schedule, after global-norm clipping; weight decay on matrices only.

    mu_dtype: the first moment's dtype (e.g. jnp.bfloat16 beside fp32 weights: a quarter less optimiser
    memory); None keeps each parameter's dtype.

    accumulate > 1 wraps it in `optax.MultiSteps`: gradients are averaged over that many calls and the
    update applied on the last (the schedule counts updates, not calls).
    """
    decay = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(
            lr_schedule(lr, warmup, steps),
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            mask=decay,
            mu_dtype=mu_dtype,
        ),
    )
    return optax.MultiSteps(tx, accumulate) if accumulate > 1 else tx


def step_inputs(key: Array, batch: dict, family: str, timesteps: dict) -> tuple[Array, Array]:
    """Noise (B, L, C) and times (B,) for one step, from one key: the data decide nothing random."""
    k_noise, k_t = jax.random.split(key)
    x0 = batch["img"]
    mu = resolution_mu(x0.shape[1]) if timesteps.get("shift") else None
    t = sample_timesteps(
        k_t,
        x0.shape[0],
        timesteps.get("kind", "logit_normal"),
        timesteps.get("mean", 0.0),
        timesteps.get("std", 1.0),
        mu,
    )
    return jax.random.normal(k_noise, x0.shape, jnp.float32), t


def loss_fn(
    trainable: dict,
    frozen: dict,
    graphdef,
    paths,
    batch: dict,
    noise: Array,
    t: Array,
    compute_dtype=jnp.float32,
    weighting: str = "none",
    remat: str = "none",
    lora=None,
    gather=None,
) -> Array:
    """The loss as a function of the trainable parameters (fp32 masters or bf16), cast to the compute dtype.

    Full fine-tuning: trainable holds every weight, frozen is empty. LoRA: trainable holds the adapters,
    frozen the base weights, and `lora.effective` adds B @ A to each targeted kernel (exactly the unmerged
    LoRA forward, W x + s B A x, computed as (W + s B A) x). gather: see `forward`; it receives the weights
    in the compute dtype.
    """
    params = lora.effective(frozen, trainable) if lora is not None else trainable
    params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
    if gather is not None:
        params = gather_outside_blocks(params, gather)
    return flow_loss(
        merge_params(graphdef, params, paths), batch, noise, t, weighting, remat, gather
    )


def ema_decay(step: Array, decay: float) -> Array:
    """The EMA decay at micro-step `step`: min(decay, (1 + step) / (10 + step)), so early weights fade fast."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(
    state: dict,
    frozen: dict,
    batch: dict,
    *,
    graphdef,
    paths,
    tx,
    family: str,
    timesteps: dict,
    compute_dtype=jnp.float32,
    weighting: str = "none",
    remat: str = "none",
    lora=None,
    ema: float = 0.0,
    gather=None,
):
    """One optimiser step: state {"params", "opt_state", "step", "key"[, "ema"]} -> (new state, metrics).

    Noise and times come from fold_in(key, step), so a resumed run draws exactly what the first run would.
    With ema > 0, state["ema"] is an exponential moving average of the trainable parameters, moved with decay
    `ema_decay(step, ema)` on every micro-step that applies an update (with accumulation, the last of each group).
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])
    noise, t = step_inputs(key, batch, family, timesteps)
    loss, grads = jax.value_and_grad(loss_fn)(
        state["params"],
        frozen,
        graphdef,
        paths,
        batch,
        noise,
        t,
        compute_dtype,
        weighting,
        remat,
        lora,
        gather,
    )
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "key": state["key"]}
    if ema > 0:
        updated = tx.has_updated(opt_state) if isinstance(tx, optax.MultiSteps) else True
        d = jnp.where(updated, ema_decay(state["step"].astype(jnp.float32), ema), 1.0)
        new["ema"] = jax.tree.map(
            lambda e, p: (d * e + (1 - d) * p.astype(e.dtype)).astype(e.dtype), state["ema"], params
        )
    return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}
