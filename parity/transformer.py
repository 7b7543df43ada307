"""Block-by-block parity of the FLUX.1 and FLUX.2 transformers, through each model's own forward.

Each framework runs its model's own forward (`Flux` / `Flux2`), which calls every block and the final layer
through a `BlockRunner` (`run(block, *args, **kwargs)`). The runner here loads that stage's weights, runs it,
records its inputs and output, and frees the weights: PyTorch's forward first, then JAX's, so a run holds one
framework's block at a time (and, on the host, PyTorch's activations at every stage boundary).
Stages: the embedders (their outputs are the first block's inputs), each double block, each single block,
the final layer. Per stage two comparisons, JAX against PyTorch:
  teacher  JAX's block also runs on PyTorch's inputs to it, so a row is that stage's own error;
  free     JAX's own forward: a row is the error accumulated so far, composition included (the order of the
           joint sequence, the slicing before the final layer, what reaches each block).
"""

from __future__ import annotations

import copy
import resource
import time

import jax
import numpy as np
import torch
from flax import nnx

from minflux import ids
from minflux.request import Inputs
from parity.frameworks import JaxSide, TorchSide, jit_call, nbytes, strip
from parity.metrics import Row, bound, compare

# not heads; the model's other children are: its embedders
HEAD_EXCLUDES = ("double_blocks", "single_blocks", "final_layer")


def _draw(cfg, resolution: int, txt_len: int, batch: int, seed: int) -> tuple:
    """(img, img_ids, txt, txt_ids, timesteps, vec, guidance), seeded numpy; vec only for FLUX.1."""
    rng = np.random.default_rng(seed)
    side = resolution // 16
    img_ids, txt_ids = ids.for_config(cfg, batch, side, side, txt_len)
    img = rng.standard_normal((batch, side * side, cfg.in_channels), dtype=np.float32)
    txt = rng.standard_normal((batch, txt_len, cfg.context_in_dim), dtype=np.float32)
    vec = rng.standard_normal((batch, cfg.vec_in_dim), dtype=np.float32) if cfg.vec_in_dim else None
    t = np.full((batch,), 0.7, np.float32)
    g = np.full((batch,), 3.5, np.float32) if cfg.guidance_embed else None
    return img, img_ids, txt, txt_ids, t, vec, g


def make_inputs(
    cfg, resolution: int, txt_len: int, batch: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded forward inputs for an image of `resolution` pixels (16 px per token): BFL keyword names."""
    return cfg.forward_kwargs(*_draw(cfg, resolution, txt_len, batch, seed))


def _joint(out) -> np.ndarray:
    """A stage's output as one array: a double block's (img, txt) as the joint [txt, img] sequence."""
    if isinstance(out, tuple):
        return np.concatenate(
            [np.asarray(out[1], np.float32), np.asarray(out[0], np.float32)], axis=1
        )
    return np.asarray(out, np.float32)


def _stage_names(model) -> dict[int, str]:
    """id(module) -> its checkpoint name ("double_blocks.3", "final_layer"): which stage a runner is handed."""
    if isinstance(model, torch.nn.Module):
        return {id(m): name for name, m in model.named_modules()}
    return {id(m): ".".join(map(str, path)) for path, m in nnx.iter_graph(model)}


def _stage_keys(expected, name: str) -> tuple[str, list[str]]:
    prefix = name + "."
    return prefix, [k for k in expected if k.startswith(prefix)]


def _heads(model) -> list[str]:
    """The model's children that are neither blocks nor the final layer: its embedders (and FLUX.2's shared
    modulations), which run before the first block."""
    names = (
        [n for n, _ in model.named_children()]
        if isinstance(model, torch.nn.Module)
        else [n for n, v in vars(model).items() if isinstance(v, nnx.Module)]
    )
    return [n for n in names if n not in HEAD_EXCLUDES]


def _under(tensors: dict, name: str) -> dict:
    return strip({k: v for k, v in tensors.items() if k.startswith(name + ".")}, name + ".")


def _torch_pass(T, source, inputs: dict, dtype: str, progress) -> tuple[list, int]:
    """PyTorch's forward through the streaming runner. Returns ([(name, args, kwargs, output)] as exact numpy,
    the most weight bytes held at once)."""
    heads, names = _heads(T.model), _stage_names(T.model)
    w = source.read([k for k in T.expected if k.split(".", 1)[0] in heads])
    peak = nbytes(w, dtype)
    for name in heads:
        T.materialise(getattr(T.model, name), _under(w, name))
    del w
    records, cache = [], {}

    def run(block, *args, **kwargs):
        nonlocal peak
        if not records:  # the embedders have run: free them before the first block's weights arrive
            for name in heads:
                getattr(T.model, name).to("meta")
        name = names[id(block)]
        prefix, keys = _stage_keys(T.expected, name)
        w = source.read(keys)
        peak = max(peak, nbytes(w, dtype))
        out = T.materialise(block, strip(w, prefix))(*args, **kwargs)
        block.to("meta")
        records.append((name, T.to_numpy(args), T.to_numpy(kwargs, cache), T.to_numpy(out)))
        if progress:
            progress(f"PyTorch {name}")
        return out

    try:
        with torch.inference_mode():
            T.model(**{k: None if v is None else T.input(v) for k, v in inputs.items()}, run=run)
    finally:
        T.model.to("meta")
    return records, peak


def _jax_pass(
    J, source, expected, inputs: dict, records: list, report, dtype: str, progress
) -> int:
    """JAX's forward through the streaming runner. Each stage also runs on PyTorch's recorded inputs (teacher
    forcing); `report(record, args, kwargs, teacher, free)` gets both results. Returns the most weight bytes
    held."""
    model, heads, names = J.model, _heads(J.model), _stage_names(J.model)
    w = source.read([k for k in expected if k.split(".", 1)[0] in heads])
    peak = nbytes(w, dtype)
    # abstract: restored afterwards
    saved = {name: nnx.state(getattr(model, name)) for name in heads}
    for name in heads:
        J.assign(getattr(model, name), _under(w, name))
    del w
    done, cache = [], {}

    def run(block, *args, **kwargs):
        nonlocal peak
        if not done:  # the embedders have run
            for name in heads:
                nnx.update(getattr(model, name), saved[name])
        name = names[id(block)]
        record = records[len(done)] if len(done) < len(records) else (None,)
        if record[0] != name:
            raise RuntimeError(f"the JAX forward ran {name} where PyTorch's ran {record[0]}")
        prefix, keys = _stage_keys(expected, name)
        w = source.read(keys)
        peak = max(peak, nbytes(w, dtype))
        j_block = J.materialise(block, strip(w, prefix))
        del w
        teacher = jit_call(j_block, *J.from_numpy(record[1]), **J.from_numpy(record[2], cache))
        free = jit_call(j_block, *args, **kwargs)
        report(record, args, kwargs, teacher, free)
        done.append(name)
        if progress:
            progress(f"JAX {name}")
        return free

    try:
        with jax.default_device(J.device):
            model(**{k: None if v is None else J.input(v) for k, v in inputs.items()}, run=run)
    finally:
        for name in heads:
            nnx.update(getattr(model, name), saved[name])
    if len(done) != len(records):
        raise RuntimeError(f"the JAX forward ran {len(done)} stages, PyTorch's {len(records)}")
    return peak


def run(
    cfg,
    torch_weights,
    jax_weights,
    dtype: str = "fp32",
    device: str = "cpu",
    resolution: int = 64,
    txt_len: int = 8,
    seed: int = 0,
    tiny: bool = True,
    progress=None,
) -> dict:
    """Compare the two frameworks on one transformer; returns {"rows": [...], "memory": {...}, ...}.

    Rows, in order: embed.img, embed.txt (the first block's inputs), embed.vec (the final layer's), each block,
    final_layer (teacher) and output (free): each teacher and free but the last two.
    """
    T, J = TorchSide(cfg, dtype, device), JaxSide(cfg, dtype, device)
    block_bound, model_bound = (
        bound(dtype, "block", device, tiny),
        bound(dtype, "model", device, tiny),
    )
    inputs = make_inputs(cfg, resolution, txt_len, seed=seed)
    t0 = time.perf_counter()
    records, torch_peak = _torch_pass(T, torch_weights, inputs, dtype, progress)

    embed: list[Row] = []
    rows: list[Row] = []

    def both(name, depth, teacher, free, ref):  # the embedders see identical inputs in both modes
        return [
            compare(name, "teacher", J.output(teacher), ref, dtype, block_bound, depth),
            compare(name, "free", J.output(free), ref, dtype, model_bound, depth),
        ]

    def report(record, args, kwargs, teacher, free):
        name, t_args, t_kwargs, t_out = record
        depth = len(rows) // 2 + 1
        if not rows and name != "final_layer":
            # the first block's inputs are the embedders' outputs
            if name.startswith("double_blocks."):
                inputs = [("embed.img", kwargs["img"], t_kwargs["img"])]
                inputs.append(("embed.txt", kwargs["txt"], t_kwargs["txt"]))
            else:
                inputs = [("embed.joint", args[0], t_args[0])]
            for input_name, a, t in inputs:
                embed.extend(both(input_name, 0, a, a, np.asarray(t, np.float32)))
        ref = _joint(t_out)
        if name == "final_layer":
            embed.extend(both("embed.vec", 0, args[1], args[1], np.asarray(t_args[1], np.float32)))
            rows.append(
                compare("final_layer", "teacher", J.output(teacher), ref, dtype, block_bound, depth)
            )
            rows.append(compare("output", "free", J.output(free), ref, dtype, model_bound, depth))
            return
        if name.startswith("double_blocks."):
            teacher = _joint((J.output(teacher[0]), J.output(teacher[1])))
            free = _joint((J.output(free[0]), J.output(free[1])))
        else:
            teacher, free = J.output(teacher), J.output(free)
        rows.append(compare(name, "teacher", teacher, ref, dtype, block_bound, depth))
        rows.append(compare(name, "free", free, ref, dtype, model_bound, depth))

    jax_peak = _jax_pass(J, jax_weights, T.expected, inputs, records, report, dtype, progress)
    rows = embed + rows
    memory = dict(
        torch_weights_peak_bytes=torch_peak,
        jax_weights_peak_bytes=jax_peak,
        process_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        model_weights_bytes=sum(int(np.prod(s)) for s in T.expected.values())
        * (4 if dtype == "fp32" else 2),
    )
    if device.startswith("cuda"):
        memory["torch_cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        memory["jax_gpu_peak_bytes"] = J.device.memory_stats().get("peak_bytes_in_use")
    return {
        "rows": [r.as_dict() for r in rows],
        "memory": memory,
        "seconds": time.perf_counter() - t0,
        "passed": all(r.passed for r in rows),
        "inputs": {
            "resolution": resolution,
            "txt_len": txt_len,
            "seed": seed,
            "image_tokens": (resolution // 16) ** 2,
        },
    }


def trajectory(
    cfg,
    torch_weights,
    jax_weights,
    steps: int,
    dtype: str = "fp32",
    device: str = "cpu",
    resolution: int = 64,
    txt_len: int = 8,
    seed: int = 0,
    tiny: bool = True,
) -> list[dict]:
    """Rows "step.N": an N-step Euler trajectory from identical noise in each framework, compared per step.

    Unlike the block-by-block comparison this holds both whole models (sampling runs every block each step).
    """
    import minflux_jax.sampling as jsampling
    import minflux_torch.sampling as tsampling
    from minflux import schedules

    T, J = TorchSide(cfg, dtype, device), JaxSide(cfg, dtype, device)
    keys = list(T.expected)
    w_t = torch_weights.read(keys)
    t_model = T.materialise(copy.deepcopy(T.model), w_t)
    j_model = J.materialise(
        J.model, w_t if jax_weights is torch_weights else jax_weights.read(keys)
    )
    del w_t
    img, img_ids, txt, txt_ids, _, vec, _ = _draw(cfg, resolution, txt_len, 1, seed)
    ts = schedules.get_schedule(steps, img.shape[1], cfg.family, shift=cfg.shifts_schedule)

    def inputs(side):
        return Inputs(
            img_ids=side.input(img_ids),
            txt=side.input(txt),
            txt_ids=side.input(txt_ids),
            vec=None if vec is None else side.input(vec),
            guidance=3.5 if cfg.guidance_embed else None,
        )

    t_states = tsampling.denoise(t_model, T.input(img), ts, inputs(T), trajectory=True)
    with jax.default_device(J.device):
        j_states = jsampling.denoise(j_model, J.input(img), ts, inputs(J), trajectory=True)
    b = bound(dtype, "model", device, tiny)
    return [
        compare(
            f"step.{i}", "trajectory", J.output(j_states[i]), T.output(t_states[i]), dtype, b, i
        ).as_dict()
        for i in range(1, steps + 1)
    ]
