"""Block-by-block parity of the FLUX.1 and FLUX.2 autoencoders.

Stages follow BFL's module tree: encoder conv_in, each down level, mid, out (+ FLUX.2 quant_conv), the
latent normalisation (FLUX.1 scale/shift; FLUX.2 2x2 patchify + BatchNorm), then the decoder's in, mid,
each up level (coarsest first) and out. PyTorch runs NCHW, JAX NHWC: activations are transposed at the
hand-over, so a wrong layout shows up as a failing row, not as a silently "equal" one.

`encode` and `decode` are the autoencoder's two forwards, so free-running restarts at the decoder from
PyTorch's latents: the decoder rows measure what `decode(z)` accumulates, not the encoder's error on top.
"""

from __future__ import annotations

import resource
import time

import jax
import numpy as np
import torch
from flax import nnx

from parity.frameworks import JaxSide, TorchSide, jit_call, nbytes
from parity.metrics import Row, bound, compare


def _sub(model, path: str):
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def stages(cfg) -> list[tuple[str, list[str], object]]:
    """(row name, submodules whose weights the stage needs, fn(model, h, ops) -> h), in execution order.

    Every resnet block, attention block, down- and upsampler is a stage of its own.
    """
    n, quant, bn = len(cfg.ch_mult), cfg.quant_conv, cfg.batch_norm

    def call(path):  # a stage that is one submodule call
        return path, [path], lambda m, h, ops: _sub(m, path)(h)

    def mid(side):
        return [
            call(f"{side}.mid.block_1"),
            call(f"{side}.mid.attn_1"),
            call(f"{side}.mid.block_2"),
        ]

    def enc_out(m, h, ops):
        h = m.encoder.conv_out(ops.silu(m.encoder.norm_out(h)))
        return m.encoder.quant_conv(h) if quant else h

    def dec_in(m, z, ops):
        z = m.inv_normalize(z)
        return m.decoder.conv_in(m.decoder.post_quant_conv(z) if quant else z)

    out = [call("encoder.conv_in")]
    for i in range(n):
        out += [call(f"encoder.down.{i}.block.{j}") for j in range(cfg.num_res_blocks)]
        out += [call(f"encoder.down.{i}.downsample")] if i != n - 1 else []
    out += mid("encoder")
    out += [
        (
            "encoder.out",
            ["encoder.norm_out", "encoder.conv_out"] + (["encoder.quant_conv"] if quant else []),
            enc_out,
        ),
        (
            "latents",
            ["bn"] if bn else [],
            lambda m, h, ops: m.normalize(ops.channels(h, cfg.z_channels)),
        ),
        (
            "decoder.in",
            ["decoder.conv_in"]
            + (["decoder.post_quant_conv"] if quant else [])
            + (["bn"] if bn else []),
            dec_in,
        ),
    ]
    out += mid("decoder")
    for i in reversed(range(n)):
        out += [call(f"decoder.up.{i}.block.{j}") for j in range(cfg.num_res_blocks + 1)]
        out += [call(f"decoder.up.{i}.upsample")] if i != 0 else []
    out += [
        (
            "decoder.out",
            ["decoder.norm_out", "decoder.conv_out"],
            lambda m, h, ops: m.decoder.conv_out(ops.silu(m.decoder.norm_out(h))),
        )
    ]
    return out


def _is_live(path, v) -> bool:
    return isinstance(v.get_value(), jax.Array)


def _jax_stage(name: str, modules: list[str], fn, model):
    """Stage `name` of the JAX model (only its `modules` hold weights) as a compiled function of h, shared by the
    teacher-forced and the free-running call: a one-submodule stage is its submodule's call, compiled once per
    block shape; any other, `fn(model, h, JaxOps)` as one program over the weights the stage assigned."""
    if modules == [name]:
        sub = _sub(model, name)
        return lambda h: jit_call(sub, h)  # one program per block structure and shape
    graphdef, live, rest = nnx.split(model, _is_live, ...)
    jitted = jax.jit(lambda live, h: fn(nnx.merge(graphdef, live, rest), h, JaxOps))
    return lambda h: jitted(live, h)


class TorchOps:
    silu = staticmethod(torch.nn.functional.silu)

    @staticmethod
    def channels(h, k):  # the first k channels (the posterior mean)
        return h[:, :k]


class JaxOps:
    silu = staticmethod(jax.nn.silu)

    @staticmethod
    def channels(h, k):
        return h[..., :k]


def run(
    cfg,
    torch_weights,
    jax_weights,
    dtype: str = "fp32",
    device: str = "cpu",
    resolution: int = 64,
    seed: int = 0,
    tiny: bool = True,
    jax_layout: str = "NHWC",
    progress=None,
) -> dict:
    """Compare the two frameworks on one autoencoder; the same report format as `parity.transformer.run`."""
    T, J = TorchSide(cfg, dtype, device), JaxSide(cfg, dtype, device)
    block_bound, model_bound = (
        bound(dtype, "block", device, tiny),
        bound(dtype, "model", device, tiny),
    )
    to_j = (lambda a: a.transpose(0, 2, 3, 1)) if jax_layout == "NHWC" else (lambda a: a)
    from_j = (lambda a: a.transpose(0, 3, 1, 2)) if jax_layout == "NHWC" else (lambda a: a)
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (1, cfg.in_channels, resolution, resolution)).astype(np.float32)
    rows: list[Row] = []
    peak, t0 = 0, time.perf_counter()

    t_h, j_h = T.input(image).to(T.dtype), J.input(to_j(image), cast=True)
    all_stages = stages(cfg)
    with torch.inference_mode(), jax.default_device(J.device):
        for depth, (name, modules, fn) in enumerate(all_stages):
            keys = [k for k in T.expected if any(k.startswith(m + ".") for m in modules)]
            w_t = torch_weights.read(keys)
            w_j = w_t if jax_weights is torch_weights else jax_weights.read(keys)
            peak = max(peak, nbytes(w_t, dtype))
            saved = {}
            for m in modules:
                T.materialise(
                    T.model.get_submodule(m),
                    {k[len(m) + 1 :]: v for k, v in w_t.items() if k.startswith(m + ".")},
                )
                sub = _sub(J.model, m)
                saved[m] = nnx.state(sub)  # abstract: restored after the stage
                J.assign(sub, {k[len(m) + 1 :]: v for k, v in w_j.items() if k.startswith(m + ".")})
            del w_t, w_j
            t_in = t_h
            if name == "decoder.in":
                # decode(z) is a forward of its own: both start from the same latents
                j_h = J.input(to_j(T.output(t_in)), cast=True)
            t_h = fn(T.model, t_h, TorchOps)
            ref = T.output(t_h)
            j_fn = _jax_stage(name, modules, fn, J.model)
            for mode, j_in in (
                ("teacher", J.input(to_j(T.output(t_in)), cast=True)),
                ("free", j_h),
            ):
                try:
                    got = j_fn(j_in)
                    rows.append(
                        compare(
                            name,
                            mode,
                            from_j(J.output(got)),
                            ref,
                            dtype,
                            block_bound if mode == "teacher" else model_bound,
                            depth,
                        )
                    )
                except Exception as e:  # a layout or shape error fails the row that hit it
                    rows.append(
                        Row(
                            name,
                            mode,
                            dtype,
                            block_bound,
                            False,
                            *[float("nan")] * 4,
                            [],
                            False,
                            depth,
                            error=f"{type(e).__name__}: {e}"[:300],
                        )
                    )
                    got = None
                if mode == "free":
                    j_h = got
            for m in modules:
                T.model.get_submodule(m).to("meta")
                nnx.update(_sub(J.model, m), saved[m])
            if progress:
                progress(name)
            if j_h is None:
                # JAX could not go on: the remaining stages cannot be compared free-running
                j_h = J.input(to_j(T.output(t_h)), cast=True)
    memory = {
        "torch_weights_peak_bytes": peak,
        "jax_weights_peak_bytes": peak,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "model_weights_bytes": sum(int(np.prod(s)) for s in T.expected.values())
        * (4 if dtype == "fp32" else 2),
    }
    return {
        "rows": [r.as_dict() for r in rows],
        "memory": memory,
        "seconds": time.perf_counter() - t0,
        "passed": all(r.passed for r in rows),
        "inputs": {"resolution": resolution, "seed": seed, "jax_layout": jax_layout},
    }
