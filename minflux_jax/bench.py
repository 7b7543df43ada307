"""`minflux bench`'s JAX runner: each row of a plan (`minflux.bench`) timed on one attention backend.

Weights come from `minflux.random` by BFL name and the inputs from `minflux.bench.inputs`, so the PyTorch twin
(`minflux_torch/bench.py`, same functions) runs on the same numbers. Every row is one compiled program: the
forward and training steps are compiled ahead of time (`lower().compile()`, timed as the compile), the training
step donates its state and syncs with the host only after the step (no `float(loss)` inside the loop); the
sample is `minflux_jax.sampling`'s compiled loop plus a compiled decode. Peak memory: XLA's buffer assignment
for the compiled program (arguments + outputs + temporaries - aliased), None where no program is at hand.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minflux import bench, configs, lora
from minflux_jax import fp8, layers, sampling
from minflux_jax import train as jtrain
from minflux_jax.load import abstract_model, assign, torch_shapes
from minflux_jax.lora import LoRA, linear_names

DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}


def device() -> str:
    return jax.default_backend()


def device_name() -> str:
    dev = jax.devices()[0]
    return dev.device_kind if dev.platform == "gpu" else dev.platform


def build(name: str, seed: int, dtype, attention: str = "auto") -> nnx.Module:
    """A model of preset `name` with `minflux.random` weights (the PyTorch twin's numbers), on the device."""
    cfg = configs.get(name)
    model = abstract_model(cfg, dtype)
    assign(model, bench.random_weights(torch_shapes(model), seed))
    if hasattr(cfg, "depth"):
        layers.set_attention_implementation(model, attention)
    return model


def tensors(inp: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in inp.items()}


def _memory(compiled) -> int | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def timed(plan, call, compiled=None, compile_s: float | None = None) -> dict:
    """Run `call` once, `plan.warmup` more times, then time `plan.repeats` calls (each ends in a block)."""
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    for _ in range(plan.warmup):
        call()
    times = []
    for _ in range(plan.repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    out = bench.stats(times)
    out["first_s"] = first
    # ahead-of-time compile when timed, else the first call (trace + compile + one step) minus a step
    out["compile_s"] = compile_s if compile_s is not None else max(first - out["median_s"], 0.0)
    out["peak_bytes"] = _memory(compiled) if compiled is not None else None
    return out


def _aot(fn, *args):
    """(compiled program, seconds to lower and compile)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------


def forward_row(plan, model, inp: dict) -> dict:
    """One denoising step: one transformer forward, one compiled program."""
    x = tensors(inp)
    graphdef, state = nnx.split(model)

    def fn(state, x):
        return sampling.predict(
            nnx.merge(graphdef, state),
            x["img"],
            x["img_ids"],
            x["txt"],
            x["txt_ids"],
            x["t"],
            x.get("vec"),
            x.get("guidance"),
        )

    compiled, compile_s = _aot(fn, state, x)
    out = timed(plan, lambda: compiled(state, x).block_until_ready(), compiled, compile_s)
    if "f8e4m3fn" in compiled.as_text() and "cublas" in compiled.as_text():
        out["fp8_gemm"] = True  # XLA rewrote the dequantise-dot pattern into cuBLASLt's fp8 GEMM
    return out


def sample_row(plan, model, ae, inp: dict) -> dict:
    """A whole sample: `plan.steps` Euler steps (one compiled loop), then the compiled autoencoder decode."""
    x = tensors(inp)
    family, dtype = model.params.family, model.dtype
    decode = nnx.jit(lambda m, z: m.decode(z))
    guidance = 3.5 if model.params.guidance_embed else None
    ts = bench.schedule(plan)

    def call():
        z = sampling.denoise(
            model, x["noise"], x["img_ids"], x["txt"], x["txt_ids"], ts, x.get("vec"), guidance
        )
        return decode(
            ae, sampling.unpack(z, plan.side, plan.side, family).astype(dtype)
        ).block_until_ready()

    return timed(plan, call)


def train_row(plan, inp: dict, lora_rank: int, attention: str = "auto") -> dict:
    """A training step (AdamW, clipping, bf16 or fp32 as the plan, remat policy `plan.remat`, the state donated);
    LoRA when lora_rank > 0."""
    cfg, dtype = configs.get(plan.model), DTYPES[plan.dtype]
    model = build(plan.model, plan.seed, dtype, attention)
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

    out = timed(plan, call, compiled, compile_s)
    out["loss"] = float(metrics["loss"])
    return out


def fp8_row(plan, model, inp: dict) -> dict:
    """One denoising step with the block linears in fp8 (`minflux_jax.fp8`)."""
    out = forward_row(plan, fp8.quantize_model(nnx.clone(model), plan.fp8), inp)
    out["fp8_kernel"] = (
        "cuBLASLt fp8 GEMM (XLA)" if out.pop("fp8_gemm", False) else "fake-quant (fp32)"
    )
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


def fp8_parity(model, inp: dict, scaling: str = "tensor") -> list[dict]:
    """rel-L2 of each fp8 block against the same block in the model dtype, on the same inputs (teacher forcing:
    the reference output feeds the next block), and of the whole model's output; rows {"name", "rel_l2",
    "rel_l2_update"}: the second measures only what a block adds to its residual input (out - in), which the
    residual otherwise dilutes."""
    quant = fp8.quantize_model(nnx.clone(model), scaling)
    x = tensors(inp)
    names = {id(m): ".".join(map(str, path)) for path, m in nnx.iter_graph(model)}
    twins = {".".join(map(str, path)): m for path, m in nnx.iter_graph(quant)}
    rows = []

    def run(block, *args, **kwargs):  # the model's forward runs each block here, in both dtypes
        want, name = _block(block, args, kwargs), names[id(block)]
        if name != "final_layer":
            got = _block(twins[name], args, kwargs)
            before = (kwargs["img"], kwargs["txt"]) if isinstance(want, tuple) else args[0]
            rows.append(
                bench.fp8_row(name, _np(_joint(got)), _np(_joint(want)), _np(_joint(before)))
            )
        return want

    kw = model.params.forward_kwargs(
        x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x.get("vec"), x.get("guidance")
    )
    model(**kw, run=run)
    call = nnx.jit(
        lambda m: sampling.predict(
            m,
            x["img"],
            x["img_ids"],
            x["txt"],
            x["txt_ids"],
            x["t"],
            x.get("vec"),
            x.get("guidance"),
        )
    )
    rows.append({"name": "output", "rel_l2": bench.rel_l2(_np(call(quant)), _np(call(model)))})
    return rows


# ---------------------------------------------------------------------------------------------
# One backend, every row of the plan
# ---------------------------------------------------------------------------------------------


def run(plan, options: dict, report=None) -> dict:
    """Every row of `plan` on this backend (`options`: {"attention": ...}); a failing row is reported, not raised;
    `report(row)` (if given) sees each row as soon as it is done."""
    attention = options.get("attention", "auto")
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

    inference = [k for k in plan.kinds if k in ("forward", "sample", "fp8")]
    if inference:
        model = build(plan.model, plan.seed, dtype, attention)
        if "forward" in plan.kinds:
            row("forward", lambda: forward_row(plan, model, inp))
        if "fp8" in plan.kinds:
            row("fp8", lambda: fp8_row(plan, model, inp))
        if "sample" in plan.kinds:
            ae = build(plan.ae, plan.seed + 1, dtype)
            row("sample", lambda: sample_row(plan, model, ae, inp))
            del ae
        del model
    if "train" in plan.kinds:
        row("train", lambda: train_row(plan, inp, 0, attention))
    if "lora" in plan.kinds:
        row("lora", lambda: train_row(plan, inp, plan.lora_rank, attention))
    return {"device": device_name(), "version": f"jax {jax.__version__}", "rows": rows}
