"""`minflux bench`'s JAX runner: one row of a plan (`minflux.bench`) timed on one attention backend.

Weights come from `minflux.bench.random_weights` by BFL name and the inputs from `minflux.bench.inputs`, so the
PyTorch twin (`minflux_torch/bench.py`, same functions) runs on the same numbers. Every row is one compiled
program: the forward and training steps are compiled ahead of time (`lower().compile()`, timed as the compile),
the training step donates its state and syncs with the host only after the step (no `float(loss)` inside the
loop); the sample is `minflux_jax.sampling`'s compiled loop plus a compiled decode. Peak memory (each row runs
in its own process): on a GPU the allocator's `peak_bytes_in_use` (weights included), on a CPU the peak RSS
over the RSS after loading; `xla_bytes` is XLA's buffer assignment for the compiled program (arguments +
outputs + temporaries - aliased).
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minflux import bench, configs, lora
from minflux.request import Inputs
from minflux_jax import fp8, layers, sampling
from minflux_jax import train as jtrain
from minflux_jax.load import abstract_model, assign, torch_shapes
from minflux_jax.lora import LoRA, linear_names

DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}
NP_DTYPES = {jnp.bfloat16: "bfloat16", jnp.float32: "float32"}


def device() -> str:
    return jax.default_backend()


def device_name() -> str:
    dev = jax.devices()[0]
    return dev.device_kind if dev.platform == "gpu" else dev.platform


def build(cfg_or_name, seed: int, dtype, attention: str = "auto") -> nnx.Module:
    """A model of `cfg_or_name` with `minflux.random` weights (the PyTorch twin's numbers), drawn in `dtype` by
    every core, one tensor at a time, and put on the device as it comes."""
    cfg = configs.resolve(cfg_or_name)
    model = abstract_model(cfg, dtype)
    assign(model, bench.random_weights(torch_shapes(model), seed, NP_DTYPES.get(dtype, "float32")))
    if hasattr(cfg, "depth"):
        layers.set_attention_implementation(model, attention)
    return model


def tensors(inp: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in inp.items()}


def _sync() -> None:
    for a in jax.live_arrays():
        a.block_until_ready()


def _device_memory() -> dict:
    return jax.local_devices()[0].memory_stats() or {}


class Memory:
    """A row's memory: on a GPU the allocator's peak (weights included; JAX cannot reset it, so the process's:
    each row has its own), on a CPU the peak RSS over the RSS after loading and the ahead-of-time compile (the C
    heap trimmed first, so freed memory does not hide new allocations). `base` is what the watched calls
    started from."""

    def __init__(self):
        self.base = self.peak = None

    def start(self) -> None:
        _sync()
        if device() == "gpu":
            now = _device_memory().get("bytes_in_use")
        else:
            bench.trim_heap()
            now = bench.rss()
            bench.reset_peak_rss()
        self.base = now if self.base is None else self.base

    def stop(self) -> None:
        _sync()
        if device() == "gpu":
            now = _device_memory().get("peak_bytes_in_use")
        else:
            hwm = bench.peak_rss()
            now = hwm - self.base if hwm is not None and self.base is not None else None
        self.peak = now if self.peak is None or (now or 0) > self.peak else self.peak


def xla_bytes(compiled) -> int | None:
    """XLA's buffer assignment of a compiled program: arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def timed(plan, call, mem: Memory, compiled=None, compile_s: float | None = None) -> dict:
    """Run `call` once, `plan.warmup` more times, then time `plan.repeats` calls (each ends in a block); memory
    is watched over all of them, or, where the first call compiles (no ahead-of-time `compile_s`), from after it
    (a compiler's memory is not the step's)."""
    if compile_s is not None:
        mem.start()
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    if compile_s is None:
        mem.start()
    for _ in range(plan.warmup):
        call()
    times = []
    for _ in range(plan.repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    mem.stop()
    out = bench.stats(times)
    out["first_s"] = first
    # ahead-of-time compile when timed, else the first call (trace + compile + one step) minus a step
    out["compile_s"] = compile_s if compile_s is not None else max(first - out["median_s"], 0.0)
    out["peak_bytes"], out["base_bytes"] = mem.peak, mem.base
    out["xla_bytes"] = xla_bytes(compiled) if compiled is not None else None
    return out


def _aot(fn, *args):
    """(compiled program, seconds to lower and compile)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------


def _forward(model, x: dict):
    return sampling.predict(
        model,
        x["img"],
        x["img_ids"],
        x["txt"],
        x["txt_ids"],
        x["t"],
        x.get("vec"),
        x.get("guidance"),
    )


def forward_row(plan, model, inp: dict) -> dict:
    """One denoising step: one transformer forward, one compiled program."""
    mem = Memory()
    x = tensors(inp)
    graphdef, state = nnx.split(model)

    def fn(state, x):
        return _forward(nnx.merge(graphdef, state), x)

    compiled, compile_s = _aot(fn, state, x)
    out = timed(plan, lambda: compiled(state, x).block_until_ready(), mem, compiled, compile_s)
    # XLA's GEMM rewriter turned the dequantise-dot pattern into fp8 GEMMs (cuBLASLt or Triton)
    out["fp8_gemms"] = bench.fp8_gemms(compiled.as_text())
    return out


def sample_row(plan, model, ae, inp: dict) -> dict:
    """A whole sample: `plan.steps` Euler steps (one compiled loop), then the compiled autoencoder decode."""
    mem = Memory()
    x = tensors(inp)
    family, dtype = model.params.family, model.dtype
    decode = nnx.jit(lambda m, z: m.decode(z))
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
        return decode(
            ae, sampling.unpack(z, plan.side, plan.side, family).astype(dtype)
        ).block_until_ready()

    return timed(plan, call, mem)


def train_row(plan, inp: dict, lora_rank: int, attention: str = "auto") -> dict:
    """A training step (AdamW, clipping, bf16 or fp32 as the plan, remat policy `plan.remat`, the state donated);
    LoRA when lora_rank > 0."""
    cfg, dtype = plan.cfg, DTYPES[plan.dtype]
    model = build(cfg, plan.seed, dtype, attention)
    mem = Memory()
    graphdef, params, paths = jtrain.split_params(model)
    tx = jtrain.make_optimizer(
        lr=1e-5, warmup=0, steps=1000, mu_dtype=jnp.bfloat16 if plan.opt_state == "bf16" else None
    )
    key = jax.random.key(plan.seed)
    if lora_rank:
        adapters = LoRA(tuple(lora.targets(linear_names(model))), lora_rank, float(lora_rank))
        trainable, frozen = adapters.init(key, params, dtype), params
    else:
        adapters, trainable, frozen = None, params, {}
    del model
    state = {
        "params": trainable,
        "opt_state": tx.init(trainable),
        "step": jnp.zeros((), jnp.int32),
        "key": jax.random.key_data(key),
    }
    x = tensors(inp)
    batch = {k: x[k] for k in ("img", "img_ids", "txt", "txt_ids", "vec", "guidance") if k in x}
    step = partial(
        jtrain.train_step,
        graphdef=graphdef,
        paths=paths,
        tx=tx,
        family=cfg.family,
        timesteps={"kind": "logit_normal"},
        compute_dtype=dtype,
        remat=plan.remat,
        lora=adapters,
    )
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    metrics = {}

    def call():
        nonlocal state
        state, m = compiled(state, frozen, batch)
        metrics.update(m)
        jax.block_until_ready(state)  # the one host sync, after the step

    out = timed(plan, call, mem, compiled, compile_s)
    out["loss"] = float(metrics["loss"])
    return out


def fp8_row(plan, model, inp: dict) -> dict:
    """One denoising step with the block linears in fp8 (`minflux_jax.fp8`), quantised in place: the model in
    its own dtype is gone before the row starts (never two copies of a model on the device)."""
    out = forward_row(plan, fp8.quantize_model(model, plan.fp8), inp)
    gemm = out["fp8_gemms"] > 0
    out["fp8_kernel"] = "fp8 GEMM (XLA's rewrite)" if gemm else "fake-quant (fp32)"
    return out


# ---------------------------------------------------------------------------------------------
# fp8 against the model dtype, block by block
# ---------------------------------------------------------------------------------------------


def _np(t: jax.Array) -> np.ndarray:
    return np.asarray(jax.device_get(t.astype(jnp.float32)))


def _joint(out) -> jax.Array:
    """A block's output as one array: a double block's (img, txt) side by side."""
    return jnp.concatenate(out, 1) if isinstance(out, tuple) else out


@nnx.jit
def _block(block, args: tuple, kw: dict):
    return block(*args, **kw)


def _quantized_copy(block: nnx.Module, scaling: str) -> nnx.Module:
    """An fp8 copy of one block."""
    return fp8.quantize_model(nnx.clone(block), scaling)


def fp8_parity(model, inp: dict, scaling: str = "tensor") -> list[dict]:
    """rel-L2 of each fp8 block against the same block in the model dtype, on the same inputs (teacher forcing:
    the reference output feeds the next block), and of the whole model's output; rows {"name", "rel_l2",
    "rel_l2_update"}: the second measures only what a block adds to its residual input (out - in), which the
    residual otherwise dilutes. One block is copied at a time; `model` itself is quantised in place at the end
    (for the whole output), so the memory is one model and one block, never two models."""
    x = tensors(inp)
    names = {id(m): ".".join(map(str, path)) for path, m in nnx.iter_graph(model)}
    rows = []

    def run(block, *args, **kwargs):  # the model's forward runs each block here, in both dtypes
        want, name = _block(block, args, kwargs), names[id(block)]
        if name != "final_layer":
            got = _block(_quantized_copy(block, scaling), args, kwargs)
            before = (kwargs["img"], kwargs["txt"]) if isinstance(want, tuple) else args[0]
            rows.append(
                bench.fp8_row(name, _np(_joint(got)), _np(_joint(want)), _np(_joint(before)))
            )
        return want

    kw = model.params.forward_kwargs(
        x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x.get("vec"), x.get("guidance")
    )
    model(**kw, run=run)
    call = nnx.jit(lambda m: _forward(m, x))
    want = _np(call(model))
    got = _np(call(fp8.quantize_model(model, scaling)))
    rows.append({"name": "output", "rel_l2": bench.rel_l2(got, want)})
    return rows


# ---------------------------------------------------------------------------------------------
# One row on this backend
# ---------------------------------------------------------------------------------------------


def run(plan, kind: str, options: dict) -> dict:
    """Row `kind` of `plan` on this backend (`options`: {"attention": ...}); a failure is the row's "error"."""
    row = _row(plan, kind, options.get("attention", "auto"))
    return {
        "device": device_name(),
        "version": f"jax {jax.__version__}",
        "rows": [{"kind": kind, **row}],
    }


def _warm(dtype) -> None:
    """Start the runtime's thread pools before anything is measured (their stacks are not the row's memory)."""
    x = jnp.ones((256, 256), dtype)
    float((x @ x).sum())


def _row(plan, kind: str, attention: str) -> dict:
    dtype = DTYPES[plan.dtype]
    inp = bench.inputs(plan)
    _warm(dtype)
    try:
        if kind in ("forward", "fp8", "sample"):
            model = build(plan.cfg, plan.seed, dtype, attention)
            if kind == "forward":
                row = forward_row(plan, model, inp)
            elif kind == "fp8":
                row = fp8_row(plan, model, inp)
            else:
                row = sample_row(plan, model, build(plan.ae, plan.seed + 1, dtype), inp)
        else:
            row = train_row(plan, inp, plan.lora_rank if kind == "lora" else 0, attention)
    except Exception as e:  # noqa: BLE001 -- a failed row (an unsupported kernel, OOM) is reported, not raised
        row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return row
