"""The JAX training loop: mesh and FSDP sharding, mixed precision, LoRA, orbax checkpoints, samples.

JAX-only on purpose (no PyTorch twin): minflux trains through JAX; `minflux_torch/train.py` exists to prove
the objective and the step, and tests/test_train.py compares the two. The step itself is
`minflux_jax.train.train_step`; this file places its inputs on devices and keeps the run going.

Scale: a `jax.sharding.Mesh` with axes ("data", "fsdp"). Every parameter, gradient and optimiser moment is
sharded along "fsdp" on its largest axis divisible by the fsdp size (ZeRO-3 / FSDP: `fsdp_gather` makes XLA
all-gather a weight, in the compute dtype, where its block runs, and reduce its gradient back to the shard);
the batch is split over both axes, so fsdp devices also see different data. Multi-host:
`jax.distributed.initialize` when JAX_COORDINATOR_ADDRESS is set, each process feeding its slice of the
global batch (`jax.make_array_from_process_local_data`).

Data: `minflux_jax.loader` (grain: each process reads its part of every global batch, prefetched in the
background; the iterator's position is saved with the model). Logs: `minflux_jax.runlog` (TensorBoard, JSON lines).

Checkpoints: orbax `CheckpointManager`, asynchronous, every `save_every` steps: params (and their EMA), optimiser
state, step, RNG key, and (as JSON) the data position and the grain iterator's state. Orbax writes into a temporary
directory and renames it on completion, so a save killed midway leaves the previous checkpoint as the latest good
one. Noise and times are drawn from fold_in(key, step) and batches are a pure function of the data position, so a
resumed run reproduces the uninterrupted loss trajectory bitwise (on CPU). Beside the step directories, RUN_FILE
records the options the state depends on (config, batch size, accumulation, LoRA, precision, EMA, mesh); a resume
compares them with its own before orbax reads anything, and skips checkpoints it cannot read for older ones
(`minflux_jax.checkpoints`). A save the file system refuses midway (a disk that filled) is one OutputError naming
the folder; the partial save is removed, the earlier checkpoints kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from minflux import configs, flops
from minflux import lora as lora_files
from minflux.checkpoint import CheckpointError
from minflux.request import Inputs
from minflux_jax import load, sampling
from minflux_jax.checkpoints import (
    RUN_FILE,  # noqa: F401 (moved there; still `trainer.RUN_FILE`)
    _first_line,
    _lacking,
    _listing,
    _move_aside,
    check_resume,
    remove_partial,
    run_record,
    save_error,
    saved_steps,
    write_run,
)
from minflux_jax.layers import set_attention_implementation
from minflux_jax.loader import Batches
from minflux_jax.lora import LoRA, linear_names
from minflux_jax.runlog import RunLog  # noqa: F401 (moved there; still `trainer.RunLog`)
from minflux_jax.train import (
    lr_schedule,
    make_optimizer,
    merge_params,
    resolution_mu,
    shift_timesteps,
    split_params,
    train_step,
)

PRECISIONS = {  # (master weights, compute)
    "fp32": (jnp.float32, jnp.float32),
    "bf16-mixed": (
        jnp.float32,
        jnp.bfloat16,
    ),  # fp32 masters and optimiser state, bf16 forward/backward
    "bf16": (jnp.bfloat16, jnp.bfloat16),  # everything bf16: half the memory, noisier updates
}


@dataclass(frozen=True)
class TrainOptions:
    """Everything a run needs besides the model config and the data."""

    steps: int = 1000  # optimiser updates
    batch_size: int = 8  # per micro-batch, global (all devices)
    lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.0
    clip: float = 1.0
    accumulate: int = 1  # micro-batches per update (optax.MultiSteps)
    precision: str = "fp32"
    remat: str = "none"  # none | full | dots | dots_no_batch | attention | attention_dots (train.REMAT_POLICIES)
    attention: str = (
        "auto"  # the blocks' attention backend: auto (cuDNN on GPU where it applies) | xla | cudnn
    )
    timesteps: dict = field(
        default_factory=lambda: {"kind": "logit_normal", "mean": 0.0, "std": 1.0, "shift": False}
    )
    weighting: str = "none"
    guidance: float | None = None  # the value fed to guidance-distilled models
    seed: int = 0
    mesh: tuple[int, int] = (1, 1)  # (data, fsdp); -1 in one place: all remaining devices
    ema: float = (
        0.0  # > 0: keep an EMA of the trained weights with this decay; sampling and export use it
    )
    lora_rank: int = 0  # > 0: train LoRA adapters, base frozen
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = lora_files.DEFAULT_TARGETS
    init: str | None = None  # base weights (safetensors, any layout) instead of a random init
    init_lora: str | None = (
        None  # start the adapters from this LoRA file (any format): its modules and rank
    )
    ckpt_dir: str | None = None
    save_every: int = 0  # 0: no periodic checkpoints
    keep: int = 2
    prefetch: int = 2  # batches read ahead by background threads (0: read in the step)

    def __post_init__(self):
        # a zero or negative count would train nothing (loss nan) or fail deep inside JAX: say which option
        for name in ("steps", "batch_size", "accumulate", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainOptions.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "lora_rank", "save_every", "prefetch"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainOptions.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"TrainOptions.ema must be in [0, 1), got {self.ema}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"TrainOptions.precision {self.precision!r}: expected one of {list(PRECISIONS)}"
            )


# ---------------------------------------------------------------------------------------------
# Devices: multi-host start, the mesh, FSDP shardings
# ---------------------------------------------------------------------------------------------


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize` when the environment describes a multi-process job."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and not jax.distributed.is_initialized():
        jax.distributed.initialize(
            os.environ["JAX_COORDINATOR_ADDRESS"],
            int(os.environ["JAX_NUM_PROCESSES"]),
            int(os.environ["JAX_PROCESS_ID"]),
        )


def make_mesh(data: int = 1, fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all); -1 takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        data = len(devices) // fsdp
    if fsdp == -1:
        fsdp = len(devices) // data
    if data * fsdp > len(devices):
        raise ValueError(f"mesh {data} x {fsdp} needs {data * fsdp} devices, found {len(devices)}")
    return Mesh(np.array(devices[: data * fsdp]).reshape(data, fsdp), ("data", "fsdp"))


def fsdp_spec(shape: tuple[int, ...], n: int) -> PartitionSpec:
    """Shard the largest axis divisible by n along "fsdp"; replicate what has none (scalars, odd sizes)."""
    axes = [
        i for i in np.argsort(shape, kind="stable")[::-1] if shape[i] % n == 0 and shape[i] >= n
    ]
    if n == 1 or not axes:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[axes[0]] = "fsdp"
    return PartitionSpec(*spec)


def fsdp_shardings(tree, mesh: Mesh):
    """A NamedSharding per array leaf of `tree` (concrete or abstract)."""
    n = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n)), tree)


def fsdp_gather(mesh: Mesh):
    """The constraint FSDP puts on a weight where it is used (`train.forward`): first its own sharding, so
    the cast to the compute dtype happens on the shard (bf16 training then gathers bf16, not fp32), then
    replicated, so XLA all-gathers the weight instead of resharding the activations that meet it."""
    n, replicated = mesh.shape["fsdp"], NamedSharding(mesh, PartitionSpec())

    def gather(x: jax.Array) -> jax.Array:
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, fsdp_spec(tuple(x.shape), n)))
        return jax.lax.with_sharding_constraint(x, replicated)

    return gather


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def check_loss(metrics: dict, step: int) -> float:
    """The step's loss as a float; FloatingPointError when it is NaN or Inf: the run diverged, and its weights,
    NaN from here on, must not be saved as a result."""
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"step {step}: the loss is {loss}: training diverged")
    return loss


class Trainer(Batches):
    """Owns the train state on the mesh, the compiled step and the checkpoint manager."""

    def __init__(self, cfg, data, opts: TrainOptions, devices=None):
        self.cfg, self.data, self.opts = configs.resolve(cfg), data, opts
        master, compute = PRECISIONS[opts.precision]
        self.compute_dtype = compute
        self.mesh = make_mesh(*opts.mesh, devices=devices)
        if opts.batch_size % self.mesh.size:
            raise ValueError(
                f"batch_size {opts.batch_size} must divide over the {self.mesh.size} devices"
            )
        # weights: the master copy is built (or loaded) in the master dtype; the step runs a compute-dtype model
        model = (
            load.load_model(self.cfg, opts.init, master)
            if opts.init
            else load.init_model(self.cfg, opts.seed, master)
        )
        set_attention_implementation(model, opts.attention)
        self.linear_names = linear_names(model)
        _, params, self.paths = split_params(model)
        compute_model = nnx.eval_shape(
            lambda: load.MODELS[self.cfg.family](self.cfg, dtype=compute, rngs=nnx.Rngs(0))
        )
        self.graphdef = nnx.graphdef(set_attention_implementation(compute_model, opts.attention))
        self.master_graphdef = nnx.graphdef(model)
        key = jax.random.key(opts.seed)
        if opts.lora_rank:
            start = None
            if (
                opts.init_lora
            ):  # a downloaded or earlier LoRA: its modules, rank and values are the start
                self.lora, start = LoRA.from_file(opts.init_lora, self.cfg)
            else:
                self.lora = LoRA(
                    tuple(lora_files.targets(self.linear_names, opts.lora_targets)),
                    opts.lora_rank,
                    opts.lora_alpha,
                )
            trainable = self.lora.init(jax.random.fold_in(key, 1), params, master, start=start)
            frozen = jax.tree.map(
                lambda p: p.astype(compute), params
            )  # the base only ever runs in compute dtype
        else:
            self.lora, trainable, frozen = None, params, {}
        self.tx = make_optimizer(
            opts.lr,
            opts.warmup,
            opts.steps,
            opts.weight_decay,
            opts.clip,
            accumulate=opts.accumulate,
        )
        state = {
            "params": trainable,
            "opt_state": self.tx.init(trainable),
            "step": jnp.zeros((), jnp.int32),
            "key": jax.random.key_data(key),
        }
        if opts.ema > 0:
            state["ema"] = jax.tree.map(jnp.copy, trainable)
        self.shardings = fsdp_shardings(state, self.mesh)
        self.state = jax.device_put(state, self.shardings)
        self.frozen = jax.device_put(frozen, fsdp_shardings(frozen, self.mesh))
        step = partial(
            train_step,
            graphdef=self.graphdef,
            paths=self.paths,
            tx=self.tx,
            family=self.cfg.family,
            timesteps=dict(opts.timesteps),
            compute_dtype=compute,
            weighting=opts.weighting,
            remat=opts.remat,
            lora=self.lora,
            ema=opts.ema,
            gather=fsdp_gather(self.mesh) if self.mesh.shape["fsdp"] > 1 else None,
        )
        self._step = jax.jit(step, out_shardings=(self.shardings, None), donate_argnums=0)
        self.record = run_record(self.cfg, opts, tuple(int(n) for n in self.mesh.shape.values()))
        self.lr_at = lr_schedule(opts.lr, opts.warmup, opts.steps)  # of the update count
        self._loader, self._loader_step, self.last = None, None, {}
        self.restored_step, self.manager, self._pending = None, None, None
        if opts.ckpt_dir:
            self.manager = ocp.CheckpointManager(
                Path(opts.ckpt_dir).absolute(),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=opts.keep, enable_async_checkpointing=True
                ),
            )

    # -- data ---------------------------------------------------------------------------------

    @property
    def guidance(self) -> float:
        """The guidance value fed to guidance-distilled models: the option, 1.0 when unset (0.0 stays 0.0)."""
        return 1.0 if self.opts.guidance is None else self.opts.guidance

    @property
    def step(self) -> int:
        return int(self.state["step"])  # micro-steps; updates = step // accumulate

    # -- the loop -----------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One micro-step (one optimiser update every `accumulate`); returns the step's metrics (arrays)."""
        self.state, metrics = self._step(self.state, self.frozen, self.next_batch())
        if (
            self.manager is not None
            and self.opts.save_every
            and self.step % self.opts.save_every == 0
        ):
            check_loss(metrics, self.step)  # never a diverged state as the latest checkpoint
            self.save()
        return metrics

    def measures(self, metrics: dict, seconds: float) -> dict[str, float]:
        """What a logged step reports: loss, learning rate, gradient norm, step time, samples/s, tokens/s (image,
        reference and text tokens) and, on a GPU whose peak `minflux.flops` knows, MFU (model FLOPs of the step as
        `flops.train_step_flops` / `lora_step_flops` count them, over the peak of every device)."""
        b = self.opts.batch_size
        img = self.last.get("img", (b, 0))[1] + self.last.get("ref", (b, 0))[1]
        txt = self.last.get("txt", (b, 0))[1]
        out = {
            "loss": float(metrics["loss"]),
            "lr": float(self.lr_at(max(self.step - 1, 0) // self.opts.accumulate)),
            "grad_norm": float(metrics["grad_norm"]),
            "step_time": seconds,
            "samples_per_s": b / seconds,
            "tokens_per_s": b * (img + txt) / seconds,
        }
        count = flops.lora_step_flops if self.lora is not None else flops.train_step_flops
        peak = flops.peak(jax.devices()[0].device_kind)
        if peak:
            out["mfu"] = count(self.cfg, img, txt, b) / seconds / (peak * self.mesh.size)
        return out

    def fit(
        self,
        steps: int | None = None,
        progress: bool = True,
        log=None,
        every: int = 0,
        callback=None,
    ) -> list[float]:
        """Train up to `steps` micro-steps in all (default: the options' updates x accumulate); returns the losses.

        log: a `RunLog` (or anything with `write(step, measures)`) fed every micro-step's `measures`. callback:
        called with the step after every `every` micro-steps (validation samples)."""
        from tqdm.auto import tqdm

        total = steps if steps is not None else self.opts.steps * self.opts.accumulate
        losses = []
        quiet = not sys.stderr.isatty()  # a log file gets a line a second, not one per step
        with tqdm(
            total=total,
            initial=self.step,
            desc="training",
            unit="step",
            disable=not progress,
            mininterval=1.0 if quiet else 0.1,
        ) as bar:
            while self.step < total:
                start = time.perf_counter()
                metrics = self.train_step()
                losses.append(check_loss(metrics, self.step))  # waits for the step
                m = self.measures(metrics, time.perf_counter() - start)
                if log is not None:
                    log.write(self.step, m)
                # drawn by update, at its interval
                bar.set_postfix(
                    loss=f"{losses[-1]:.4f}", samples_s=f"{m['samples_per_s']:.3g}", refresh=False
                )
                bar.update(1)
                if callback is not None and every and self.step % every == 0:
                    callback(self.step)
        return losses

    # -- checkpoints --------------------------------------------------------------------------

    def save(self, wait: bool = False) -> None:
        """An asynchronous orbax save of the train state and the data position, at the current step; the
        run's options go to RUN_FILE beside the checkpoints first (once), for `restore` to check. A save that
        the file system refuses (a disk that filled after the start-up check) raises OutputError naming the
        folder, here or at the next wait (`_writing`); the earlier checkpoints stay."""
        step = self.step
        if not self._record_written:
            if jax.process_index() == 0:
                write_run(self.opts.ckpt_dir, self.record)
            self._record_written = True
        self._wait()  # the save in flight first (orbax would wait for it too), so its failure is named as its own
        if step in self.manager.all_steps():
            if (
                step == self.restored_step
            ):  # a resumed run saving the step it started from: the same state
                return
            self.manager.delete(step)  # a later step left by a run that fell back past it: replaced
        meta = {
            "step": step,
            "position": step * self.opts.batch_size,
            "config": dataclasses.asdict(self.cfg),
            "loader": self.loader_state(),
        }
        with self._writing(step):
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(self.state), meta=ocp.args.JsonSave(meta)
                ),
            )
        self._pending = step
        if wait:
            self._wait()

    def _wait(self) -> None:
        """Wait for the save in flight (`self._pending`); its file-system failure becomes OutputError."""
        with self._writing(self._pending):
            self.manager.wait_until_finished()
        self._pending = None

    @contextlib.contextmanager
    def _writing(self, step: int | None):
        """orbax's writes of checkpoint `step`: a failure of the file system (ENOSPC, EROFS, EACCES, ... raised
        by orbax or tensorstore, possibly from its background thread) becomes one OutputError naming the folder
        (`checkpoints.save_error`), after the partial save is removed (`remove_partial`); finished checkpoints
        are kept. Other failures propagate unchanged."""
        try:
            yield
        except Exception as e:
            error = save_error(self.opts.ckpt_dir, step, e)
            if error is None:
                raise
            self._pending = None
            if jax.process_index() == 0:
                remove_partial(self.opts.ckpt_dir)
            raise error from None

    _record_written = False

    def restore(self, step: int | None = None) -> int:
        """Load the latest intact checkpoint (or a given one) into this trainer; returns its step.

        First, before orbax reads anything, the saved run's options (RUN_FILE) are compared with this
        trainer's (`check_resume`). A checkpoint that cannot be read (a missing item directory, a truncated
        or corrupt array file) is skipped for the next older one, with a warning on stderr naming both, and
        moved aside (renamed STEP.unreadable).
        Raises CheckpointError (one line, naming the directory): no checkpoint, options that differ, no
        intact checkpoint left.
        """
        self._wait()
        root = Path(self.opts.ckpt_dir)
        check_resume(root, self.record)
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.state,
            self.shardings,
        )
        failed = {}  # step -> why it cannot be read
        for candidate in saved_steps(root) if step is None else [step]:
            try:
                if missing := _lacking(root, candidate):
                    raise CheckpointError(f"incomplete: no {' or '.join(f'{m}/' for m in missing)}")
                out = self.manager.restore(
                    candidate,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
            except (
                Exception
            ) as e:  # orbax and tensorstore raise plain Exceptions for unreadable files
                failed[candidate] = _first_line(e)
                continue
            restored = int(out.state["step"])
            loader = out.meta.get("loader", {"next_index": restored})  # (older checkpoints)
            if (
                out.meta["position"] != restored * self.opts.batch_size
                or loader.get("next_index") != restored
            ):
                raise CheckpointError(
                    f"{root / str(candidate)}: data position {out.meta['position']} (loader at "
                    f"{loader.get('next_index')}) does not match step {restored} x batch size "
                    f"{self.opts.batch_size}"
                )
            if failed:  # moved aside (kept for inspection): the run goes on from an earlier step, saving anew
                print(
                    f"warning: unreadable checkpoint {_listing(root, failed)}, moved aside to STEP.unreadable; "
                    f"resuming from {root / str(candidate)}",
                    file=sys.stderr,
                )
                if jax.process_index() == 0:
                    for bad in failed:
                        _move_aside(root / str(bad))
                self.manager.reload()
            self.state, self.restored_step = out.state, candidate
            self._loader, self._loader_step = self.loader(restored), restored
            self._loader.set_state(loader)
            return candidate
        raise CheckpointError(
            f"{root}: no intact checkpoint to resume from: {_listing(root, failed)}"
        )

    def close(self) -> None:
        if self.manager is not None:
            self._wait()
            self.manager.close()
        self._loader = None
        if hasattr(self.data, "close"):
            self.data.close()

    # -- using the result ---------------------------------------------------------------------

    def weights(self) -> dict:
        """The trained weights: their EMA when the run keeps one, else the current parameters."""
        return self.state["ema"] if "ema" in self.state else self.state["params"]

    def model(self) -> nnx.Module:
        """The trained model (master dtype; the EMA weights if kept), LoRA adapters merged in."""
        params = self.weights()
        if self.lora is not None:
            params = self.lora.effective(
                jax.tree.map(lambda p: p.astype(jnp.float32), self.frozen), params
            )
        return merge_params(self.master_graphdef, jax.device_get(params), self.paths)

    def export(self, path, layout: str = "bfl") -> None:
        """The trained weights as a safetensors file (BFL layout by default), via `save_model`."""
        load.save_model(self.model(), path, layout)

    def save_lora(self, path, fmt: str = "diffusers") -> None:
        lora_files.save(path, self.lora.export(self.weights()), self.cfg, fmt)

    def sample(
        self,
        txt: np.ndarray,
        h: int,
        w: int,
        steps: int = 20,
        seed: int = 0,
        vec=None,
        cfg_scale: float = 1.0,
        neg_txt=None,
        neg_vec=None,
        ref=None,
        ref_ids=None,
        img_cond=None,
    ) -> np.ndarray:
        """Tokens (B, h*w, C) generated for text embeddings txt (B, Lt, D) (and FLUX.1's pooled vec) by the
        JAX Euler sampler (`sampling.denoise`, given `request.Inputs`) on the training schedule: uniform times,
        shifted only when training shifts them (`--shift`); noise from `seed` by jax.random. With neg_txt (and
        neg_vec), classifier-free guidance at cfg_scale. Edit pairs: reference tokens ref (B, Lr, C) at ref_ids;
        Fill and control models: img_cond (B, h*w, Cc).

        This is the demo's sampler (a pixel-space model: no autoencoder, no generation schedule of its own). A
        FLUX model's validation samples are drawn as generation draws them, with its family's schedule,
        guidance and references (`sampling.sample`; `minflux_cli.pictures.data_grid`)."""
        b, fam = txt.shape[0], self.cfg.family
        channels = self.cfg.in_channels - (0 if img_cond is None else img_cond.shape[-1])
        noise = jax.random.normal(jax.random.key(seed), (b, h * w, channels), jnp.float32)
        ts = np.linspace(1.0, 0.0, steps + 1)
        if self.opts.timesteps.get("shift"):
            ts = shift_timesteps(ts, resolution_mu(h * w))
        array = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
        inputs = Inputs(
            img_ids=sampling.image_ids(b, h, w, fam),
            txt=jnp.asarray(txt),
            txt_ids=sampling.text_ids(b, txt.shape[1], fam),
            vec=array(vec),
            guidance=self.guidance if self.cfg.guidance_embed else None,
            cfg_scale=cfg_scale,
            neg_txt=array(neg_txt),
            neg_vec=array(neg_vec),
            img_cond=array(img_cond),
            img_cond_seq=array(ref),
            img_cond_seq_ids=array(ref_ids),
        )
        out = sampling.denoise(self.model(), noise, [float(t) for t in ts], inputs)
        return np.asarray(jax.device_get(out))
