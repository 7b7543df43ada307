"""`minflux bench`'s PyTorch runner: each row of a plan (`minflux.bench`) timed on one backend, eager or compiled.

Weights come from `minflux.random` by BFL name and the inputs from `minflux.bench.inputs`, so the JAX twin
(`minflux_jax/bench.py`, same functions) runs on the same numbers. Times are wall-clock around a call plus a
device synchronisation; the first call (with `torch.compile`: the compile) is untimed, then `warmup` more.
Peak memory: the CUDA caching allocator's peak during the row (None on CPU).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from minflux import bench, configs, lora
from minflux_torch import fp8, layers, sampling
from minflux_torch import train as ttrain
from minflux_torch.load import MODELS, to_torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def build(name: str, seed: int, dtype, attention: str = "auto") -> nn.Module:
    """A model of preset `name` with `minflux.random` weights (the JAX twin's numbers), on the device."""
    cfg = configs.get(name)
    with torch.device("meta"):
        model = MODELS[cfg.family](cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {
        k: to_torch(a).to(device=device(), dtype=dtype)
        for k, a in bench.random_weights(shapes, seed)
    }
    model.load_state_dict(state, strict=True, assign=True)
    if hasattr(cfg, "depth"):
        layers.set_attention_implementation(model, attention)
    return model.eval()


def tensors(inp: dict) -> dict:
    return {k: torch.from_numpy(v).to(device()) for k, v in inp.items()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(plan, call, compiled: bool) -> dict:
    """Run `call` once (compiling), `plan.warmup` more times, then time `plan.repeats` calls."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    call()
    _sync()
    first = time.perf_counter() - t0
    for _ in range(plan.warmup):
        call()
    _sync()
    times = []
    for _ in range(plan.repeats):
        t0 = time.perf_counter()
        call()
        _sync()
        times.append(time.perf_counter() - t0)
    out = bench.stats(times)
    out["first_s"] = first
    out["compile_s"] = (
        max(first - out["median_s"], 0.0) if compiled else None
    )  # first call minus a step
    out["peak_bytes"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return out


# ---------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------


def _compile(fn, compiled: bool, inference: bool):
    if not compiled:
        return fn
    # CUDA graphs for inference on a GPU (the launch overhead of ~1000 kernels per step); plain inductor otherwise
    mode = "reduce-overhead" if inference and torch.cuda.is_available() else None
    return torch.compile(fn, mode=mode)


def forward_row(plan, model, inp: dict, compiled: bool) -> dict:
    """One denoising step: one transformer forward."""
    fn = _compile(model, compiled, inference=True)
    with (
        torch.inference_mode()
    ):  # inputs made inside too: a compiled model then sees one kind of tensor
        x = tensors(inp)
        return timed(
            plan,
            lambda: sampling.predict(
                fn,
                x["img"],
                x["img_ids"],
                x["txt"],
                x["txt_ids"],
                x["t"],
                x.get("vec"),
                x.get("guidance"),
            ),
            compiled,
        )


def sample_row(plan, model, ae, inp: dict, compiled: bool) -> dict:
    """A whole sample: `plan.steps` Euler steps from the noise tokens, then the autoencoder decode."""
    with (
        torch.inference_mode()
    ):  # inputs made inside: `denoise` runs in inference mode, so no recompile
        x = tensors(inp)
    family, dtype = model.params.family, next(model.parameters()).dtype
    fn, decode = (
        _compile(model, compiled, inference=True),
        _compile(ae.decode, compiled, inference=True),
    )
    guidance = 3.5 if model.params.guidance_embed else None
    ts = bench.schedule(plan)

    def call():
        z = sampling.denoise(
            fn, x["noise"], x["img_ids"], x["txt"], x["txt_ids"], ts, x.get("vec"), guidance
        )
        return decode(sampling.unpack(z, plan.side, plan.side, family).to(dtype))

    with torch.inference_mode():
        return timed(plan, call, compiled)


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
    model = build(plan.model, plan.seed, DTYPES[plan.dtype], attention).train()
    if lora_rank:
        add_lora(model, lora_rank)
    opt, sched = ttrain.make_optimizer(model, lr=1e-5, warmup=0, steps=1000)
    x = tensors(inp)
    batch = {k: x[k] for k in ("img", "img_ids", "txt", "txt_ids", "vec", "guidance") if k in x}
    step = ttrain.train_step
    if (
        compiled
    ):  # the whole step; the optimiser and schedule stay eager (their lr changes every step, and a
        # compiled one would recompile on each new value): the loss, backward and clipping compile
        opt.step, sched.step = torch.compiler.disable(opt.step), torch.compiler.disable(sched.step)
        step = torch.compile(ttrain.train_step)
    remat = (
        "none" if plan.remat == "none" else "full"
    )  # torch checkpoints whole blocks for every policy
    metrics = {}

    def call():
        metrics.update(step(model, opt, sched, batch, x["noise"], x["t"], remat=remat))

    out = timed(plan, call, compiled)
    out["loss"] = float(metrics["loss"])
    return out


def fp8_row(plan, model, inp: dict, compiled: bool) -> dict:
    """One denoising step with the block linears in fp8 (`minflux_torch.fp8`)."""
    out = forward_row(plan, fp8.quantize_model(copy.deepcopy(model), plan.fp8), inp, compiled)
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


@torch.inference_mode()
def fp8_parity(model, inp: dict, scaling: str = "tensor") -> list[dict]:
    """rel-L2 of each fp8 block against the same block in the model dtype, on the same inputs (teacher forcing:
    the reference output feeds the next block), and of the whole model's output; rows {"name", "rel_l2",
    "rel_l2_update"}: the second measures only what a block adds to its residual input (out - in), which the
    residual otherwise dilutes."""
    quant = fp8.quantize_model(copy.deepcopy(model), scaling)
    x = tensors(inp)
    names = {id(m): name for name, m in model.named_modules()}
    rows = []

    def run(block, *args, **kwargs):  # the model's forward runs each block here, in both dtypes
        want, name = block(*args, **kwargs), names[id(block)]
        if name != "final_layer":
            got = quant.get_submodule(name)(*args, **kwargs)
            before = (kwargs["img"], kwargs["txt"]) if isinstance(want, tuple) else args[0]
            rows.append(
                bench.fp8_row(name, _np(_joint(got)), _np(_joint(want)), _np(_joint(before)))
            )
        return want

    kw = model.params.forward_kwargs(
        x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x.get("vec"), x.get("guidance")
    )
    model(**kw, run=run)
    call = lambda m: sampling.predict(
        m, x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x.get("vec"), x.get("guidance")
    )
    rows.append({"name": "output", "rel_l2": bench.rel_l2(_np(call(quant)), _np(call(model)))})
    return rows


# ---------------------------------------------------------------------------------------------
# One backend, every row of the plan
# ---------------------------------------------------------------------------------------------


def run(plan, options: dict, report=None) -> dict:
    """Every row of `plan` on this backend (`options`: {"compile": bool}); a failing row is reported, not raised;
    `report(row)` (if given) sees each row as soon as it is done."""
    compiled = options.get("compile", False)
    dtype = DTYPES[plan.dtype]
    inp = bench.inputs(plan)
    rows = []

    def row(kind, fn):
        try:
            rows.append({"kind": kind, **fn()})
        except Exception as e:  # noqa: BLE001 -- one failed row (an unsupported kernel, OOM) must not end the run
            rows.append(
                {
                    "kind": kind,
                    "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                }
            )
        if report is not None:
            report(rows[-1])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    inference = [k for k in plan.kinds if k in ("forward", "sample", "fp8")]
    if inference:
        model = build(plan.model, plan.seed, dtype)
        if "forward" in plan.kinds:
            row("forward", lambda: forward_row(plan, model, inp, compiled))
        if "fp8" in plan.kinds:
            row("fp8", lambda: fp8_row(plan, model, inp, compiled))
        if "sample" in plan.kinds:
            ae = build(plan.ae, plan.seed + 1, dtype)
            row("sample", lambda: sample_row(plan, model, ae, inp, compiled))
            del ae
        del model
    if "train" in plan.kinds:
        row("train", lambda: train_row(plan, inp, 0, compiled))
    if "lora" in plan.kinds:
        row("lora", lambda: train_row(plan, inp, plan.lora_rank, compiled))
    return {"device": device_name(), "version": f"torch {torch.__version__}", "rows": rows}
