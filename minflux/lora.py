"""LoRA adapters as data (numpy only): target selection, merging, and the two safetensors file formats.

An adapter set is `{BFL module: {"lora_A": (r, in), "lora_B": (out, r), "alpha": float}}` in PyTorch layout;
the update to the module's weight (out, in) is `alpha / r * B @ A` (Hu et al. 2021; PEFT's convention).
The JAX trainer (`minflux_jax/lora.py`) trains such a set; both frameworks merge one into a model.

Files:
- diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`, with
  `__metadata__["lora_adapter_metadata"] = {"r", "lora_alpha"}` (as diffusers' `save_lora_weights`).
  Module names go through `minflux.keymaps`' BFL -> diffusers table. A fused BFL layer that diffusers
  splits (double-block `qkv` -> to_q / to_k / to_v; FLUX.1 single-block `linear1` -> to_q / to_k / to_v /
  proj_mlp) is written as one adapter per part that shares the fused A and takes its rows of B: each part's
  B_i @ A is exactly the fused update's rows, so nothing is approximated. Reading fuses them back: parts that
  share A become the original (A, B) bitwise; parts with different A (an adapter trained on diffusers'
  split layers) fuse exactly into rank sum(r_i) with A stacked and B block-diagonal.
  The final layer's (shift, scale) <-> (scale, shift) swap permutes B's rows.
- kohya (sd-scripts): `lora_unet_<BFL module with . -> _>.lora_down.weight` (A), `.lora_up.weight` (B),
  `.alpha` (a scalar per module).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from minflux import checkpoint, keymaps

DIFFUSERS_PREFIX = "transformer."
KOHYA_PREFIX = "lora_unet_"
# Every linear layer of both attention paths and both MLPs (the usual FLUX LoRA targets).
DEFAULT_TARGETS = (r"_attn\.(qkv|proj)$", r"_mlp\.[02]$", r"linear[12]$")


def targets(modules, patterns=DEFAULT_TARGETS) -> list[str]:
    """The module names (BFL) that any regex in `patterns` finds (re.search)."""
    found = [m for m in modules if any(re.search(p, m) for p in patterns)]
    if not found:
        raise ValueError(f"no linear layer matches the LoRA targets {list(patterns)}")
    return found


def delta(a: dict) -> np.ndarray:
    """alpha / r * B @ A, float32, (out, in)."""
    A, B = np.asarray(a["lora_A"], np.float32), np.asarray(a["lora_B"], np.float32)
    return np.float32(a["alpha"] / A.shape[0]) * (B @ A)


def merge(weights: dict[str, np.ndarray], adapters: dict[str, dict]) -> dict[str, np.ndarray]:
    """PyTorch-layout weights with every adapter added (in float32, cast back to each weight's dtype)."""
    out = dict(weights)
    for module, a in adapters.items():
        w = weights[module + ".weight"]
        out[module + ".weight"] = (w.astype(np.float32) + delta(a)).astype(w.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def to_diffusers(adapters: dict[str, dict], family: str, hidden_size: int) -> tuple[dict, dict]:
    """(tensors, metadata) in the diffusers / PEFT layout."""
    tensors, alphas, ranks = {}, set(), set()
    for module, a in adapters.items():
        B = np.asarray(a["lora_B"])
        recipes = keymaps.to_diffusers({module + ".weight": B.shape}, family, hidden_size)
        for name, recipe in recipes.items():
            base = DIFFUSERS_PREFIX + name.removesuffix(".weight")
            tensors[base + ".lora_A.weight"] = np.asarray(a["lora_A"])
            tensors[base + ".lora_B.weight"] = keymaps.apply(recipe, lambda k, i, j, B=B: B[i:j])
        alphas.add(float(a["alpha"]))
        ranks.add(int(a["lora_A"].shape[0]))
    if len(alphas) > 1 or len(ranks) > 1:
        raise ValueError(f"the diffusers LoRA format holds one rank and alpha; found ranks {ranks}, alphas {alphas}")
    meta = {"r": ranks.pop(), "lora_alpha": alphas.pop()} if adapters else {}
    return tensors, {"lora_adapter_metadata": json.dumps(meta)}


def from_diffusers(tensors: dict[str, np.ndarray], metadata: dict, family: str) -> dict[str, dict]:
    """Adapters from a diffusers / PEFT file; without metadata alpha = r (scale 1, diffusers' default)."""
    meta = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    mods = {k.removeprefix(DIFFUSERS_PREFIX).removesuffix(".lora_A.weight")
            for k in tensors if k.endswith(".lora_A.weight")}
    A = {m: tensors[f"{DIFFUSERS_PREFIX}{m}.lora_A.weight"] for m in mods}
    B = {m: tensors[f"{DIFFUSERS_PREFIX}{m}.lora_B.weight"] for m in mods}
    recipes = keymaps.to_bfl({m + ".weight": b.shape for m, b in B.items()}, family)
    out = {}
    for name, recipe in recipes.items():
        parts = [(k.removesuffix(".weight"), i, j) for k, i, j in recipe.pieces]
        As = [A[m] for m, _, _ in parts]
        r = As[0].shape[0]
        alpha = float(meta.get("lora_alpha", r))
        if all(np.array_equal(a, As[0]) for a in As):  # written by `to_diffusers`: the fused adapter, bitwise
            b = np.concatenate([B[m][i:j] for m, i, j in parts])
            out[name.removesuffix(".weight")] = {"lora_A": As[0], "lora_B": b, "alpha": alpha}
            continue
        # separate adapters on the parts: stack the A's, B block-diagonal, rank sum(r_i), scale folded into B
        rank = sum(a.shape[0] for a in As)
        b = np.zeros((sum(j - i for _, i, j in parts), rank), np.float32)
        row = col = 0
        for (m, i, j), a in zip(parts, As, strict=True):
            b[row : row + j - i, col : col + a.shape[0]] = B[m][i:j].astype(np.float32) * (alpha / a.shape[0])
            row, col = row + j - i, col + a.shape[0]
        out[name.removesuffix(".weight")] = {"lora_A": np.concatenate(As), "lora_B": b.astype(B[parts[0][0]].dtype),
                                             "alpha": float(rank)}
    return out


def to_kohya(adapters: dict[str, dict]) -> dict[str, np.ndarray]:
    out = {}
    for module, a in adapters.items():
        base = KOHYA_PREFIX + module.replace(".", "_")
        out[base + ".lora_down.weight"] = np.asarray(a["lora_A"])
        out[base + ".lora_up.weight"] = np.asarray(a["lora_B"])
        out[base + ".alpha"] = np.asarray(a["alpha"], np.float32)
    return out


def from_kohya(tensors: dict[str, np.ndarray], modules) -> dict[str, dict]:
    """Adapters from a kohya file; `modules` (the model's linear layers) resolve the underscored names."""
    names = {KOHYA_PREFIX + m.replace(".", "_"): m for m in modules}
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            base = key.removesuffix(".lora_down.weight")
            if base not in names:
                raise checkpoint.CheckpointError(f"kohya LoRA module {base!r} is no linear layer of this model")
            A = tensors[key]
            alpha = float(tensors.get(base + ".alpha", np.float32(A.shape[0])))
            out[names[base]] = {"lora_A": A, "lora_B": tensors[base + ".lora_up.weight"], "alpha": alpha}
    return out


def save(path, adapters: dict[str, dict], cfg, fmt: str = "diffusers") -> None:
    """Write adapters as safetensors, "diffusers" (PEFT keys) or "kohya"; atomic like every minflux write."""
    if fmt == "diffusers":
        tensors, meta = to_diffusers(adapters, cfg.family, cfg.hidden_size)
    elif fmt == "kohya":
        tensors, meta = to_kohya(adapters), None
    else:
        raise ValueError(f"LoRA format {fmt!r}: expected 'diffusers' or 'kohya'")
    specs = {k: (checkpoint.st_dtype(v.dtype), v.shape) for k, v in tensors.items()}
    checkpoint.write_safetensors(path, specs, tensors.__getitem__, metadata=meta)


def load(path, cfg, modules) -> dict[str, dict]:
    """Read a LoRA file in either format (detected from its keys); `modules`: the model's linear layer names."""
    path = Path(path)
    tensors = load_file(path)
    if any(k.startswith(DIFFUSERS_PREFIX) for k in tensors):
        from safetensors import safe_open

        with safe_open(path, "np") as f:
            metadata = f.metadata() or {}
        adapters = from_diffusers(tensors, metadata, cfg.family)
    elif any(k.startswith(KOHYA_PREFIX) for k in tensors):
        adapters = from_kohya(tensors, modules)
    else:
        raise checkpoint.CheckpointError(f"{path}: not a LoRA file (no 'transformer.' or 'lora_unet_' keys)")
    unknown = sorted(set(adapters) - set(modules))
    if unknown:
        raise checkpoint.CheckpointError(f"{path}: LoRA modules that are no linear layer of this model: {unknown[:5]}")
    return adapters
