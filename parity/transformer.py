"""Block-by-block parity of the FLUX.1 and FLUX.2 transformers.

Stages: the head (embedders; its final layer runs last), each double block, each single block.
Per stage two comparisons, JAX against PyTorch:
  teacher  both frameworks get PyTorch's inputs to the stage, so a row is that stage's own error;
  free     each framework runs the whole forward on its own; a row is the error accumulated so far.
"""

from __future__ import annotations

import copy
import resource
import time

import jax
import numpy as np
import torch
from flax import nnx
from torch import nn

from parity.frameworks import JaxSide, TorchSide, nbytes, strip
from parity.metrics import Row, bound, compare


def make_inputs(cfg, resolution: int, txt_len: int, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded forward inputs for an image of `resolution` pixels (16 px per token): BFL keyword names."""
    rng = np.random.default_rng(seed)
    side = resolution // 16
    h, w = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    n_axes = len(cfg.axes_dim)
    img_ids = np.zeros((batch, side * side, n_axes), np.float32)
    img_ids[..., 1], img_ids[..., 2] = h.reshape(-1), w.reshape(-1)
    txt_ids = np.zeros((batch, txt_len, n_axes), np.float32)
    if n_axes == 4:  # FLUX.2: text tokens are told apart by the fourth axis
        txt_ids[..., 3] = np.arange(txt_len)
    t = np.full((batch,), 0.7, np.float32)
    g = np.full((batch,), 3.5, np.float32) if cfg.guidance_embed else None
    img = rng.standard_normal((batch, side * side, cfg.in_channels), dtype=np.float32)
    txt = rng.standard_normal((batch, txt_len, cfg.context_in_dim), dtype=np.float32)
    if cfg.family == "flux1":
        y = rng.standard_normal((batch, cfg.vec_in_dim), dtype=np.float32)
        return dict(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=y, guidance=g)
    return dict(x=img, x_ids=img_ids, timesteps=t, ctx=txt, ctx_ids=txt_ids, guidance=g)


@nnx.jit
def _jit_call(module, *args, **kwargs):
    """One compiled program per block type and input shapes (eager JAX compiles every op separately)."""
    return module(*args, **kwargs)


def _head(model, empty_list):
    """The model without its blocks: embedders and final layer."""
    model.double_blocks, model.single_blocks = empty_list(), empty_list()
    return model


def run(cfg, torch_weights, jax_weights, dtype: str = "fp32", device: str = "cpu", resolution: int = 64,
        txt_len: int = 8, seed: int = 0, tiny: bool = True, progress=None) -> dict:
    """Compare the two frameworks on one transformer; returns {"rows": [...], "memory": {...}, ...}."""
    T, J = TorchSide(cfg, dtype, device), JaxSide(cfg, dtype, device)
    block_bound, model_bound = bound(dtype, "block", device, tiny), bound(dtype, "model", device, tiny)
    inputs = make_inputs(cfg, resolution, txt_len, seed=seed)
    rows: list[Row] = []
    t0 = time.perf_counter()

    def row(name, depth, teacher, free, torch_out):
        ref = T.output(torch_out) if not isinstance(torch_out, np.ndarray) else torch_out
        rows.append(compare(name, "teacher", J.output(teacher), ref, dtype, block_bound, depth))
        rows.append(compare(name, "free", J.output(free), ref, dtype, model_bound, depth))

    def cat(txt, img, side):
        return np.concatenate([side.output(txt), side.output(img)], axis=1)

    head_keys = [k for k in T.expected if not k.startswith(("double_blocks.", "single_blocks."))]

    def read(keys):  # one read when both sides use the same weights
        w_t = torch_weights.read(keys)
        return w_t, (w_t if jax_weights is torch_weights else jax_weights.read(keys))

    w_t, w_j = read(head_keys)
    t_head = T.materialise(_head(copy.deepcopy(T.model), nn.ModuleList), w_t)
    j_head = J.materialise(_head(nnx.clone(J.model), nnx.List), w_j)
    final_bytes = nbytes({k: v for k, v in w_t.items() if k.startswith("final_layer.")}, dtype)
    held = {"torch_weights_peak_bytes": nbytes(w_t, dtype), "jax_weights_peak_bytes": nbytes(w_t, dtype)}
    del w_t, w_j

    with torch.inference_mode(), jax.default_device(J.device):
        t_in = {k: None if v is None else T.input(v) for k, v in inputs.items()}
        j_in = {k: None if v is None else J.input(v) for k, v in inputs.items()}
        t_img, t_txt, t_kw = t_head.embed(**t_in)
        j_img, j_txt, j_kw = j_head.embed(**j_in)
        # Only the final layer is needed from here on: drop the embedders (FLUX.2's modulations are 2 GB).
        t_final, j_final = t_head.final_layer, j_head.final_layer
        del t_head, j_head
        # The embedders see identical inputs in both modes.
        row("embed.img", 0, j_img, j_img, t_img)
        row("embed.txt", 0, j_txt, j_txt, t_txt)
        row("embed.vec", 0, j_kw["vec"], j_kw["vec"], t_kw["vec"])
        jt_kw = T.to_jax(t_kw)  # PyTorch's block inputs, for teacher forcing

        stages = [("double_blocks", i) for i in range(cfg.depth)] + [("single_blocks", i)
                                                                     for i in range(cfg.depth_single_blocks)]
        n_txt = inputs["txt" if cfg.family == "flux1" else "ctx"].shape[1]
        t_x = j_x = None
        for depth, (kind, i) in enumerate(stages, start=1):
            prefix = f"{kind}.{i}."
            w_t, w_j = read([k for k in T.expected if k.startswith(prefix)])
            for side in ("torch_weights_peak_bytes", "jax_weights_peak_bytes"):  # one framework's block at a time
                held[side] = max(held[side], final_bytes + nbytes(w_t, dtype))
            # PyTorch first: its block runs, then is dropped before JAX's copy of the weights is made.
            t_block = T.materialise(getattr(T.model, kind)[i], strip(w_t, prefix))
            if kind == "double_blocks":
                t_in_ = T.to_jax((t_img, t_txt))
                t_img, t_txt = t_block(t_img, t_txt, **t_kw["double"])
                ref = cat(t_txt, t_img, T)
            else:
                if t_x is None:  # the single blocks run on the joint [txt, img] sequence
                    t_x, j_x = torch.cat((t_txt, t_img), 1), jax.numpy.concatenate((j_txt, j_img), 1)
                t_in_ = T.to_jax(t_x)
                t_x = t_block(t_x, **t_kw["single"])
                ref = T.output(t_x)
            t_block.to("meta")
            del t_block, w_t
            j_block = J.materialise(getattr(J.model, kind)[i], strip(w_j, prefix))
            del w_j
            if kind == "double_blocks":
                teacher = _jit_call(j_block, *t_in_, **jt_kw["double"])
                j_img, j_txt = _jit_call(j_block, j_img, j_txt, **j_kw["double"])
                rows.append(compare(f"{kind}.{i}", "teacher", cat(teacher[1], teacher[0], J), ref, dtype,
                                    block_bound, depth))
                rows.append(compare(f"{kind}.{i}", "free", cat(j_txt, j_img, J), ref, dtype, model_bound, depth))
            else:
                teacher = _jit_call(j_block, t_in_, **jt_kw["single"])
                j_x = _jit_call(j_block, j_x, **j_kw["single"])
                row(f"{kind}.{i}", depth, teacher, j_x, ref)
            del j_block, teacher, t_in_
            if progress:
                progress(f"{kind}.{i}")
        if t_x is None:
            t_x, j_x = torch.cat((t_txt, t_img), 1), jax.numpy.concatenate((j_txt, j_img), 1)
        depth = len(stages) + 1
        teacher = j_final(T.to_jax(t_x[:, n_txt:]), jt_kw["vec"])
        free = j_final(j_x[:, n_txt:], j_kw["vec"])
        t_out = t_final(t_x[:, n_txt:], t_kw["vec"])
        rows.append(compare("final_layer", "teacher", J.output(teacher), T.output(t_out), dtype, block_bound, depth))
        rows.append(compare("output", "free", J.output(free), T.output(t_out), dtype, model_bound, depth))

    memory = dict(held, process_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  model_weights_bytes=sum(int(np.prod(s)) for s in T.expected.values()) * (4 if dtype == "fp32" else 2))
    if device.startswith("cuda"):
        memory["torch_cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        memory["jax_gpu_peak_bytes"] = J.device.memory_stats().get("peak_bytes_in_use")
    return {"rows": [r.as_dict() for r in rows], "memory": memory, "seconds": time.perf_counter() - t0,
            "passed": all(r.passed for r in rows), "inputs": {"resolution": resolution, "txt_len": txt_len,
                                                               "seed": seed, "image_tokens": (resolution // 16) ** 2}}


def trajectory(cfg, torch_weights, jax_weights, steps: int, dtype: str = "fp32", device: str = "cpu",
               resolution: int = 64, txt_len: int = 8, seed: int = 0, tiny: bool = True) -> list[dict]:
    """Rows "step.N": an N-step Euler trajectory from identical noise in each framework, compared per step.

    Unlike the block-by-block comparison this holds both whole models (sampling runs every block each step).
    """
    import minflux_jax.sampling as jsampling
    import minflux_torch.sampling as tsampling
    from minflux import schedules
    from minflux_jax.load import assign

    T, J = TorchSide(cfg, dtype, device), JaxSide(cfg, dtype, device)
    keys = list(T.expected)
    w_t = torch_weights.read(keys)
    t_model = T.materialise(copy.deepcopy(T.model), w_t)
    w_j = w_t if jax_weights is torch_weights else jax_weights.read(keys)
    j_model = nnx.clone(J.model)
    with jax.default_device(J.device):
        assign(j_model, w_j)
    del w_t, w_j
    x = make_inputs(cfg, resolution, txt_len, seed=seed)
    flux1 = cfg.family == "flux1"
    img, img_ids, txt, txt_ids = (x["img"], x["img_ids"], x["txt"], x["txt_ids"]) if flux1 else (
        x["x"], x["x_ids"], x["ctx"], x["ctx_ids"])
    ts = schedules.get_schedule(steps, img.shape[1], cfg.family, shift=cfg.guidance_embed or not flux1)
    extra = {"vec": x["y"]} if flux1 else {}
    if cfg.guidance_embed:
        extra["guidance"] = 3.5
    t_states = tsampling.denoise(t_model, *map(T.input, (img, img_ids, txt, txt_ids)), ts, trajectory=True,
                                 **{k: T.input(v) if isinstance(v, np.ndarray) else v for k, v in extra.items()})
    with jax.default_device(J.device):
        j_states = jsampling.denoise(j_model, *map(J.input, (img, img_ids, txt, txt_ids)), ts, trajectory=True,
                                     **{k: J.input(v) if isinstance(v, np.ndarray) else v for k, v in extra.items()})
    b = bound(dtype, "model", device, tiny)
    return [compare(f"step.{i}", "trajectory", J.output(j_states[i]), T.output(t_states[i]), dtype, b, i).as_dict()
            for i in range(1, steps + 1)]
