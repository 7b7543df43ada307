"""Model FLOPs from the config (minflux.flops, used for MFU) against PyTorch's own FLOP counter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import minflux_torch as mt
from minflux import configs, flops, ids
from minflux_torch.sampling import predict


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
@pytest.mark.parametrize("side,txt_len,batch", [(4, 5, 2), (6, 3, 1)])
def test_forward_flops_match_torch_counter(name, side, txt_len, batch):
    cfg = configs.get(name)
    model = mt.build_model(cfg)
    rng = np.random.default_rng(0)
    n_axes = len(cfg.axes_dim)
    img = rng.standard_normal((batch, side * side, cfg.in_channels), np.float32)
    txt = rng.standard_normal((batch, txt_len, cfg.context_in_dim), np.float32)
    t = rng.uniform(size=batch).astype(np.float32)
    pos = ids.image_ids(batch, side, side, n_axes), ids.text_ids(batch, txt_len, n_axes)
    args = [torch.from_numpy(a) for a in (img, pos[0], txt, pos[1], t)]
    vec = torch.randn(batch, cfg.vec_in_dim) if cfg.family == "flux1" else None
    guidance = torch.full((batch,), 3.5) if cfg.guidance_embed else None
    # The math backend runs attention as matmuls the counter sees (CPU's fused kernel is not counted).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        predict(model, *args, vec, guidance)
    assert flops.forward_flops(cfg, side * side, txt_len, batch) == counter.get_total_flops()
    assert flops.train_step_flops(cfg, side * side, txt_len, batch) == 3 * counter.get_total_flops()


def test_full_size_count_and_peaks():
    # flux2-klein-4b at 1024 px: 4096 image + 512 text tokens; about 6 x params x tokens plus attention
    cfg = configs.get("flux2-klein-4b")
    f = flops.forward_flops(cfg, 4096, 512)
    assert 30e12 < f < 40e12
    assert (
        flops.bf16_peak("NVIDIA H100 PCIe") == 756e12 and flops.bf16_peak("NVIDIA H200") == 989e12
    )
    with pytest.raises(ValueError, match="no bf16 peak known"):
        flops.bf16_peak("Some GPU")
    with pytest.raises(ValueError, match="not a transformer"):
        flops.forward_flops(configs.get("flux2-ae"), 16, 0)


def test_attention_implementation_is_validated():
    from minflux_jax import layers

    with pytest.raises(ValueError, match="expected 'auto', 'xla' or 'cudnn'"):
        layers.attention_backend("flash", None)
    assert layers.attention_backend("xla", None) == "xla"
