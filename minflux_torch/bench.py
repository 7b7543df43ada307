"""`minflux bench`'s PyTorch runner: one row of a plan (`minflux.bench`) timed on one backend, eager or compiled,
and the peer, diffusers, on the same weights (minflux's diffusers export) and inputs.

Weights come from `minflux.bench.random_weights` by BFL name and the inputs from `minflux.bench.inputs`, so the
JAX twin (`minflux_jax/bench.py`, same functions) runs on the same numbers. Times are wall-clock around a call
plus a device synchronisation; the first call (with `torch.compile`: the compile) is untimed, then `warmup`
more. Peak memory (each row runs in its own process): on a GPU the CUDA caching allocator's peak during the row
(weights included), on a CPU the peak RSS over the RSS after loading.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from minflux import bench, configs, keymaps, lora
from minflux.family import FAMILIES
from minflux.request import Inputs
from minflux_torch import fp8, layers, sampling
from minflux_torch import train as ttrain
from minflux_torch.load import MODELS, to_torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
NP_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def build(cfg_or_name, seed: int, dtype, attention: str = "auto") -> nn.Module:
    """A model of `cfg_or_name` with `minflux.random` weights (the JAX twin's numbers), drawn in `dtype` by every
    core, one tensor at a time, and moved to the device as it comes (never a float32 copy of the whole model)."""
    cfg = configs.resolve(cfg_or_name)
    with torch.device("meta"):
        model = MODELS[cfg.family](cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = bench.random_weights(shapes, seed, NP_DTYPES.get(dtype, "float32"))
    state = {k: to_torch(a).to(device=device(), dtype=dtype) for k, a in weights}
    model.load_state_dict(state, strict=True, assign=True)
    if hasattr(cfg, "depth"):
        layers.set_attention_implementation(model, attention)
    return model.eval()


def tensors(inp: dict) -> dict:
    return {k: torch.from_numpy(v).to(device()) for k, v in inp.items()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Memory:
    """A row's memory: on a GPU the caching allocator's peak (weights included), on a CPU the peak RSS over the
    RSS after loading (the C heap trimmed first, so freed memory does not hide new allocations). `base` is what
    the watched calls started from."""

    def __init__(self):
        self.base = self.peak = None

    def start(self) -> None:
        _sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            now = torch.cuda.memory_allocated()
        else:
            bench.trim_heap()
            now = bench.rss()
            bench.reset_peak_rss()
        self.base = now if self.base is None else self.base

    def stop(self) -> None:
        _sync()
        if torch.cuda.is_available():
            now = torch.cuda.max_memory_allocated()
        else:
            hwm = bench.peak_rss()
            now = hwm - self.base if hwm is not None and self.base is not None else None
        self.peak = now if self.peak is None or (now or 0) > self.peak else self.peak


def timed(plan, call, compiled: bool, mem: Memory, check=None) -> dict:
    """Run `call` once (compiling), `plan.warmup` more times, `check` its first output (a failed check raises:
    the row is never timed), then time `plan.repeats` calls. Memory is watched over all of them but the check
    (the diffusers row's check runs minflux's model); a compiled row's from after its first call, which compiles
    (a compiler's memory is not the step's)."""
    if not compiled:
        mem.start()
    t0 = time.perf_counter()
    first_out = call()
    # to the host at once: a CUDA-graph replay overwrites its outputs
    first_out = _np(first_out) if check is not None else None
    _sync()
    first = time.perf_counter() - t0
    if compiled:
        mem.start()
    for _ in range(plan.warmup):
        call()
    mem.stop()
    checked = check(first_out) if check is not None else None
    mem.start()
    times = []
    for _ in range(plan.repeats):
        t0 = time.perf_counter()
        call()
        _sync()
        times.append(time.perf_counter() - t0)
    mem.stop()
    out = bench.stats(times)
    out["first_s"] = first
    # first call minus a step
    out["compile_s"] = max(first - out["median_s"], 0.0) if compiled else None
    out["peak_bytes"], out["base_bytes"] = mem.peak, mem.base
    if checked is not None:
        out["check_rel_l2"] = checked
    return out


# ---------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------


def compile_mode(plan, inference: bool) -> str | None:
    """`plan.compile_mode`, "auto" resolved: CUDA graphs for inference on a GPU (the launch overhead of ~1000
    kernels per step), plain inductor otherwise."""
    if plan.compile_mode != "auto":
        return plan.compile_mode
    return "reduce-overhead" if inference and torch.cuda.is_available() else None


def compile_model(model: nn.Module, blocks: list[nn.Module], plan, inference: bool):
    """The callable a compiled row times: `plan.compile_scope` "blocks" compiles each block in place (one
    compile per block class, whatever the depth: seconds where the whole 57-block FLUX.1 graph takes minutes),
    "full" the whole model."""
    mode = compile_mode(plan, inference)
    if plan.compile_scope == "full":
        return torch.compile(model, mode=mode)
    for block in blocks:
        block.compile(mode=mode)
    return model


def _forward(fn, x: dict):
    return sampling.predict(
        fn, x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x.get("vec"), x.get("guidance")
    )


def forward_row(plan, model, inp: dict, compiled: bool) -> dict:
    """One denoising step: one transformer forward."""
    mem = Memory()
    if compiled:
        model = compile_model(model, [*model.double_blocks, *model.single_blocks], plan, True)
    # inputs made inside: a compiled model then sees one kind of tensor
    with torch.inference_mode():
        x = tensors(inp)
        return timed(plan, lambda: _forward(model, x), compiled, mem)


def sample_row(plan, model, ae, inp: dict, compiled: bool) -> dict:
    """A whole sample: `plan.steps` Euler steps from the noise tokens, then the autoencoder decode."""
    mem = Memory()
    # inputs made inside: `denoise` runs in inference mode, so no recompile
    with torch.inference_mode():
        x = tensors(inp)
    family, dtype = model.params.family, next(model.parameters()).dtype
    decode = ae.decode
    if compiled:
        model = compile_model(model, [*model.double_blocks, *model.single_blocks], plan, True)
        decode = torch.compile(ae.decode, mode=compile_mode(plan, True))
    guidance = 3.5 if model.params.guidance_embed else None
    ts = bench.schedule(plan)

    inputs = Inputs(
        img_ids=x["img_ids"],
        txt=x["txt"],
        txt_ids=x["txt_ids"],
        vec=x.get("vec"),
        guidance=guidance,
    )

    def call():
        z = sampling.denoise(model, x["noise"], ts, inputs)
        return decode(sampling.unpack(z, plan.side, plan.side, family).to(dtype))

    with torch.inference_mode():
        return timed(plan, call, compiled, mem)


class LoRAWeight(nn.Module):
    """W + alpha / r * B @ A as a parametrisation of a frozen weight (out, in): the unmerged LoRA forward
    W x + s B A x, computed as (W + s B A) x as the JAX step does; A ~ U(+-1/sqrt(in)), B = 0 (PEFT's init)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, seed: int):
        super().__init__()
        d_out, d_in = weight.shape
        g = torch.Generator().manual_seed(seed)
        a = (torch.rand(rank, d_in, generator=g) * 2 - 1) / d_in**0.5
        self.lora_A = nn.Parameter(a.to(weight))
        self.lora_B = nn.Parameter(
            torch.zeros(d_out, rank, dtype=weight.dtype, device=weight.device)
        )
        self.scale = alpha / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.scale * (self.lora_B @ self.lora_A)).to(w.dtype)


def add_lora(model: nn.Module, rank: int) -> list[str]:
    """Freeze the model and put rank-`rank` adapters (alpha = rank) on the `minflux.lora` default targets."""
    model.requires_grad_(False)
    names = lora.targets([n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        parametrize.register_parametrization(
            module, "weight", LoRAWeight(module.weight, rank, float(rank), i)
        )
    return names


def train_row(plan, inp: dict, lora_rank: int, compiled: bool, attention: str = "auto") -> dict:
    """A training step (AdamW, clipping, bf16 or fp32 as the plan); LoRA when lora_rank > 0."""
    model = build(plan.cfg, plan.seed, DTYPES[plan.dtype], attention).train()
    if lora_rank:
        add_lora(model, lora_rank)
    mem = Memory()
    opt, sched = ttrain.make_optimizer(model, lr=1e-5, warmup=0, steps=1000)
    x = tensors(inp)
    batch = {k: x[k] for k in ("img", "img_ids", "txt", "txt_ids", "vec", "guidance") if k in x}
    step = ttrain.train_step
    if compiled:
        # the whole step; the optimiser and schedule stay eager (their lr changes every step, and a compiled one
        # would recompile on each new value): the loss, backward and clipping compile
        opt.step, sched.step = torch.compiler.disable(opt.step), torch.compiler.disable(sched.step)
        step = torch.compile(ttrain.train_step, mode=compile_mode(plan, False))
    # torch checkpoints whole blocks for every policy
    remat = "none" if plan.remat == "none" else "full"
    metrics = {}

    def call():
        metrics.update(step(model, opt, sched, batch, x["noise"], x["t"], remat=remat))

    out = timed(plan, call, compiled, mem)
    out["loss"] = float(metrics["loss"])
    return out


def fp8_row(plan, model, inp: dict, compiled: bool) -> dict:
    """One denoising step with the block linears in fp8 (`minflux_torch.fp8`), quantised in place: the model in
    its own dtype is gone before the row starts (never two copies of a model on the device)."""
    out = forward_row(plan, fp8.quantize_model(model, plan.fp8), inp, compiled)
    out["fp8_kernel"] = "torch._scaled_mm" if torch.cuda.is_available() else "fake-quant (fp32)"
    return out


# ---------------------------------------------------------------------------------------------
# fp8 against the model dtype, block by block
# ---------------------------------------------------------------------------------------------


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _joint(out) -> torch.Tensor:
    """A block's output as one tensor: a double block's (img, txt) side by side."""
    return torch.cat(out, 1) if isinstance(out, tuple) else out


def _quantized_copy(block: nn.Module, scaling: str) -> nn.Module:
    """An fp8 copy of one block (`fp8.quantize_model` names linears by their parent: the copy gets one)."""
    holder = nn.Module()
    holder.block = copy.deepcopy(block)
    return fp8.quantize_model(holder, scaling).block


@torch.inference_mode()
def fp8_parity(model, inp: dict, scaling: str = "tensor") -> list[dict]:
    """rel-L2 of each fp8 block against the same block in the model dtype, on the same inputs (teacher forcing:
    the reference output feeds the next block), and of the whole model's output; rows {"name", "rel_l2",
    "rel_l2_update"}: the second measures only what a block adds to its residual input (out - in), which the
    residual otherwise dilutes. One block is copied at a time; `model` itself is quantised in place at the end
    (for the whole output), so the memory is one model and one block, never two models."""
    x = tensors(inp)
    names = {id(m): name for name, m in model.named_modules()}
    rows = []

    def run(block, *args, **kwargs):  # the model's forward runs each block here, in both dtypes
        want, name = block(*args, **kwargs), names[id(block)]
        if name != "final_layer":
            got = _quantized_copy(block, scaling)(*args, **kwargs)
            before = (kwargs["img"], kwargs["txt"]) if isinstance(want, tuple) else args[0]
            rows.append(
                bench.fp8_row(name, _np(_joint(got)), _np(_joint(want)), _np(_joint(before)))
            )
        return want

    kw = model.params.forward_kwargs(
        x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x.get("vec"), x.get("guidance")
    )
    model(**kw, run=run)
    want = _np(_forward(model, x))
    got = _np(_forward(fp8.quantize_model(model, scaling), x))
    rows.append({"name": "output", "rel_l2": bench.rel_l2(got, want)})
    return rows


# ---------------------------------------------------------------------------------------------
# One row on this backend
# ---------------------------------------------------------------------------------------------


def run(plan, kind: str, options: dict) -> dict:
    """Row `kind` of `plan` on this backend (`options`: {"compile": bool}); a failure is the row's "error". A
    compiled row whose CUDA graphs fail is run again without them (`compile_fallback` says why)."""
    row = _row(plan, kind, options.get("compile", False))
    if (
        "error" in row
        and options.get("compile")
        and compile_mode(plan, kind != "train") == "reduce-overhead"
    ):
        torch._dynamo.reset()
        again = _row(dataclasses.replace(plan, compile_mode="default"), kind, True)
        row = {**again, "compile_fallback": f"reduce-overhead failed: {row['error']}"}
    return {
        "device": device_name(),
        "version": f"torch {torch.__version__}",
        "rows": [{"kind": kind, **row}],
    }


def _warm(dtype) -> None:
    """Start the runtime's thread pools before anything is measured (their stacks are not the row's memory)."""
    x = torch.ones(256, 256, dtype=dtype, device=device())
    float((x @ x).sum())


def _row(plan, kind: str, compiled: bool) -> dict:
    dtype = DTYPES[plan.dtype]
    inp = bench.inputs(plan)
    _warm(dtype)
    try:
        if kind in ("forward", "fp8", "sample"):
            model = build(plan.cfg, plan.seed, dtype)
            if kind == "forward":
                row = forward_row(plan, model, inp, compiled)
            elif kind == "fp8":
                row = fp8_row(plan, model, inp, compiled)
            else:
                row = sample_row(plan, model, build(plan.ae, plan.seed + 1, dtype), inp, compiled)
        else:
            row = train_row(plan, inp, plan.lora_rank if kind == "lora" else 0, compiled)
    except Exception as e:  # noqa: BLE001 -- a failed row (an unsupported kernel, OOM) is reported, not raised
        row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return row


# ---------------------------------------------------------------------------------------------
# The peer (PyTorch only): diffusers' transformer on minflux's diffusers export of the same weights
# ---------------------------------------------------------------------------------------------


def diffusers_transformer(cfg) -> nn.Module:
    """diffusers' FluxTransformer2DModel / Flux2Transformer2DModel with `cfg`'s dimensions, on the meta device."""
    import diffusers

    common = dict(
        patch_size=1,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=tuple(cfg.axes_dim),
    )
    with torch.device("meta"):
        if FAMILIES[cfg.family].pooled_vec:  # FLUX.1 (diffusers' FluxTransformer2DModel)
            return diffusers.FluxTransformer2DModel(
                out_channels=cfg.out_channels, pooled_projection_dim=cfg.vec_in_dim, **common
            )
        return diffusers.Flux2Transformer2DModel(
            mlp_ratio=cfg.mlp_ratio, rope_theta=cfg.theta, **common
        )


def to_diffusers(model: nn.Module) -> nn.Module:
    """diffusers' transformer holding `model`'s weights through minflux's key map (`keymaps.convert`, the
    recipes `save_model(layout="diffusers")` writes with): row slices of our tensors, so most share their
    memory (split qkv, linear1); only concatenated ones (the final layer's swapped halves) are copies."""
    cfg = model.params
    ours = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in ours.items()}
    recipes = keymaps.convert(shapes, "bfl", "diffusers", cfg.family, cfg.hidden_size)
    state = {}
    for key, recipe in recipes.items():
        parts = [ours[k][a:b] for k, a, b in recipe.pieces]
        state[key] = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(recipe.shape)
    peer = diffusers_transformer(cfg)
    peer.load_state_dict(state, strict=True, assign=True)
    return peer.eval()


def diffusers_forward(peer, x: dict, family: str, dtype):
    """One diffusers call on the bench inputs (FLUX.1 takes 2-D ids: one batch element's)."""
    cast = lambda k: x[k].to(dtype)  # noqa: E731 -- diffusers' linears take the model dtype
    if FAMILIES[family].pooled_vec:
        return peer(
            hidden_states=cast("img"),
            encoder_hidden_states=cast("txt"),
            pooled_projections=cast("vec"),
            timestep=x["t"],
            img_ids=x["img_ids"][0],
            txt_ids=x["txt_ids"][0],
            guidance=x.get("guidance"),
            return_dict=False,
        )[0]
    return peer(
        hidden_states=cast("img"),
        encoder_hidden_states=cast("txt"),
        timestep=x["t"],
        img_ids=x["img_ids"],
        txt_ids=x["txt_ids"],
        guidance=x.get("guidance"),
        return_dict=False,
    )[0]


def diffusers_row(plan, compiled: bool) -> dict:
    """One denoising step of diffusers' transformer on minflux's weights and inputs; its first output is checked
    against minflux's forward on the same weights (`bench.check_peer`) before any call is timed."""
    dtype = DTYPES[plan.dtype]
    _warm(dtype)
    model = build(plan.cfg, plan.seed, dtype)
    peer = to_diffusers(model)
    mem = Memory()
    fn = peer
    if compiled:
        fn = compile_model(
            peer, [*peer.transformer_blocks, *peer.single_transformer_blocks], plan, True
        )
    with torch.inference_mode():
        x = tensors(bench.inputs(plan))

        def check(got: np.ndarray) -> float:
            return bench.check_peer(got, _np(_forward(model, x)), plan.dtype)

        return timed(
            plan, lambda: diffusers_forward(fn, x, model.params.family, dtype), compiled, mem, check
        )


def run_peer(plan, kind: str, options: dict) -> dict:
    """`run` for the diffusers backends (forward rows only)."""
    try:
        import diffusers
    except ImportError:
        return {"device": device_name(), "skipped": "diffusers is not installed"}
    try:
        row = diffusers_row(plan, options.get("compile", False))
    except Exception as e:  # noqa: BLE001 -- as in `run`
        row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return {
        "device": device_name(),
        "version": f"diffusers {diffusers.__version__} (torch {torch.__version__})",
        "rows": [{"kind": kind, **row}],
    }
