"""Build, load and save models in PyTorch. Twin: `minflux_jax/load.py`.

The module attribute names are the BFL checkpoint keys, so a BFL file loads with
`load_state_dict(strict=True)`; other layouts go through `minflux.keymaps`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from minflux import checkpoint, configs, random
from minflux_torch.autoencoder import AutoEncoder
from minflux_torch.flux1 import Flux
from minflux_torch.flux2 import Flux2

MODELS: dict[str, type[nn.Module]] = {
    "flux1": Flux,
    "flux2": Flux2,
    "ae1": AutoEncoder,
    "ae2": AutoEncoder,
}


def to_torch(arr: np.ndarray) -> torch.Tensor:
    """numpy -> torch without a copy; bf16 (ml_dtypes) travels as its uint16 bits."""
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """torch -> numpy, bit-exact; bf16 becomes ml_dtypes.bfloat16."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(checkpoint.np_dtype("BF16"))
    return t.numpy()


def build_model(
    cfg_or_name, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"
) -> nn.Module:
    """A model with seeded random weights (`minflux.random`, numpy): the same values `minflux_jax.build_model`
    gives for the same seed, so a random-weight model computes the same numbers in both frameworks."""
    cfg = configs.resolve(cfg_or_name)
    with torch.device("meta"):
        model = MODELS[cfg.family](cfg)
    meta = model.state_dict()
    floats = {k: tuple(v.shape) for k, v in meta.items() if v.dtype.is_floating_point}
    state = {
        k: to_torch(v).to(device=device, dtype=dtype)
        for k, v in random.tensors(floats, seed).items()
    }
    state.update(
        {
            k: torch.zeros(v.shape, dtype=v.dtype, device=device)
            for k, v in meta.items()
            if k not in floats
        }
    )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_model(
    cfg_or_name,
    path,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    verify: bool = False,
    keep_quantized: bool = False,
) -> nn.Module:
    """Load a checkpoint: BFL or diffusers names, bare or behind a component prefix, alone or in a bundle; one
    file, a directory of shards or a shard index; bf16 / fp16 / fp32 / fp8 (plain or scaled), NVFP4, GGUF.

    Every tensor is dequantized and cast to `dtype`, or with `keep_quantized` the linear weights a file stores
    quantized stay packed in `minflux_torch.quant.QuantLinear` layers that dequantize at each call (the model
    holds the file's size). `verify` checks each tensor against the SHA-256 its writer recorded (minflux
    convert / save_model). Raises CheckpointError naming the file and the key (see `checkpoint.BflReader`).
    """
    cfg = configs.resolve(cfg_or_name)
    with torch.device("meta"):
        model = MODELS[cfg.family](cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    reader = checkpoint.BflReader(path, expected, cfg, verify)
    from minflux_torch import quant  # here, not on top: quant -> fp8 -> lora -> load

    packed = reader.packed_weights() if keep_quantized else {}
    kept = set(packed)
    state = {}
    for key in list(packed):  # one at a time: each file array freed once its device copy exists
        state.update(quant.swap_linears(model, {key: packed.pop(key)}, dtype, device))
    state.update(
        {
            k: to_torch(a).to(
                device=device,
                dtype=dtype if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else None,
            )
            for k, a in ((k, reader.read(k)) for k in reader.keys() if k not in kept)
        }
    )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_model(model: nn.Module, path, layout: str = "bfl") -> None:
    """Write a model's weights as safetensors in `layout` ("bfl", "bfl-prefixed" or "diffusers"), atomically,
    with a SHA-256 digest per tensor in the metadata (checked by `load_model(..., verify=True)`)."""
    from minflux_torch import quant

    if quant.quantized_layers(model):
        raise ValueError(
            "the model keeps quantized layers (keep_quantized=True): load it dequantized to save it"
        )
    tensors = {k: to_numpy(v) for k, v in model.state_dict().items()}
    checkpoint.save_bfl(path, tensors, model.params, layout)
