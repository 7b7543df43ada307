"""Against an implementation we did not write: diffusers' FLUX.1 and FLUX.2 transformers.

The diffusers models are built from a diffusers-layout file that our key map wrote from a BFL file;
both of our frameworks load the BFL file. Same inputs, outputs must agree in fp32.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
import torch
from conftest import rel_l2, transformer_inputs
from safetensors.torch import load_file
from twins import out

import minflux_jax as mj
import minflux_torch as mt
from minflux import configs

diffusers = pytest.importorskip("diffusers")


def diffusers_model(cfg):
    head_dim = cfg.hidden_size // cfg.num_heads
    if cfg.family == "flux1":
        return diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            num_layers=cfg.depth,
            num_single_layers=cfg.depth_single_blocks,
            attention_head_dim=head_dim,
            num_attention_heads=cfg.num_heads,
            joint_attention_dim=cfg.context_in_dim,
            pooled_projection_dim=cfg.vec_in_dim,
            guidance_embeds=cfg.guidance_embed,
            axes_dims_rope=tuple(cfg.axes_dim),
        )
    return diffusers.Flux2Transformer2DModel(
        patch_size=1,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        mlp_ratio=cfg.mlp_ratio,
        axes_dims_rope=tuple(cfg.axes_dim),
        rope_theta=cfg.theta,
        guidance_embeds=cfg.guidance_embed,
    )


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
def test_against_diffusers(name, tiny_checkpoint, rng):
    cfg = configs.get(name)
    ref = diffusers_model(cfg).eval()
    ref.load_state_dict(load_file(tiny_checkpoint(name, "diffusers")), strict=True)
    x = transformer_inputs(cfg, rng, batch=1)  # diffusers' FLUX.1 takes 2-D ids: one batch element
    t = {k: None if v is None else torch.from_numpy(v) for k, v in x.items()}
    with torch.inference_mode():
        if cfg.family == "flux1":
            expected = ref(
                hidden_states=t["img"],
                encoder_hidden_states=t["txt"],
                pooled_projections=t["y"],
                timestep=t["timesteps"],
                img_ids=t["img_ids"][0],
                txt_ids=t["txt_ids"][0],
                guidance=t["guidance"],
            ).sample
        else:
            expected = ref(
                hidden_states=t["x"],
                encoder_hidden_states=t["ctx"],
                timestep=t["timesteps"],
                img_ids=t["x_ids"],
                txt_ids=t["ctx_ids"],
                guidance=t["guidance"],
            ).sample
        ours_t = mt.load_model(name, tiny_checkpoint(name, "bfl"), dtype=torch.float32)(**t)
    ours_j = mj.load_model(name, tiny_checkpoint(name, "bfl"), dtype=jnp.float32)(
        **{k: None if v is None else jnp.asarray(v) for k, v in x.items()}
    )
    assert rel_l2(out(ours_t), out(expected)) < 1e-5
    assert rel_l2(out(ours_j), out(expected)) < 1e-5
