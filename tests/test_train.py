"""Training: JAX's loss and gradients against PyTorch's, learning, bitwise resume, interrupted saves,
sharded vs single-device and two-process runs, EMA, caption dropout, the demo command, LoRA training
(LoRA files and merges: test_lora.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2

import minflux_jax as mj
import minflux_torch as mt
from minflux import configs, data, keymaps, schedules
from minflux.checkpoint import CheckpointError
from minflux_jax import train as jtrain
from minflux_jax import trainer as tr
from minflux_jax.load import assign, torch_keys
from minflux_torch import lora as tlora
from minflux_torch import train as ttrain
from minflux_torch.load import to_numpy

# fp32 on CPU, measured 26 Nov 2026 (rel-L2 per parameter, worst over all parameters): flux2-tiny 1.6e-6,
# flux1-tiny (cosmap weighting) 1.1e-6, flux2-tiny with remat 1.6e-6; loss rel 1.0e-7 / 1.1e-7.
GRAD_BOUND = 1e-4
LOSS_BOUND = 1e-5
# One AdamW step (clip 1.0): the update is ~lr * sign(g), so it inherits the gradients' agreement.
UPDATE_BOUND = 1e-3

# A tiny demo-shaped FLUX.2 (pixel tokens of 4x4x3) and its data: fast enough for several compiles.
TINY = dataclasses.replace(
    data.DEMO,
    in_channels=48,
    hidden_size=64,
    num_heads=2,
    axes_dim=(8, 8, 8, 8),
    depth=1,
    depth_single_blocks=1,
)


TINY_DATA = dict(size=16, patch=4, context_dim=TINY.context_in_dim)


def tiny_data(n=128):
    return data.Shapes(n=n, **TINY_DATA)


def program(body: str) -> str:
    """A Python program for a subprocess: TINY and tiny_data as here (passed by value, so the program needs
    no import of this test module), then `body`."""
    return textwrap.dedent(f"""
        from minflux import data
        from minflux.configs import Flux2Config
        TINY = {TINY!r}
        def tiny_data(n=128):
            return data.Shapes(n=n, **{TINY_DATA!r})
    """) + textwrap.dedent(body)


def torch_and_jax(name):
    """A seeded PyTorch model (norm scales randomised so their gradients matter) and its JAX copy."""
    tm = mt.build_model(name, seed=0)
    with torch.no_grad():
        for k, p in tm.named_parameters():
            if k.endswith("scale"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    jm = mj.build_model(name, seed=1)
    assign(
        jm, {k: to_numpy(v).copy() for k, v in tm.state_dict().items()}
    )  # copy: jax may alias numpy on CPU
    return tm, jm


# ---------------------------------------------------------------------------------------------
# The objective and the step: JAX against PyTorch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,weighting,remat",
    [
        ("flux2-tiny", "none", "none"),
        ("flux1-tiny", "cosmap", "none"),
        ("flux2-tiny", "none", "full"),
        ("flux1-tiny", "none", "attention_dots"),
    ],
)
@pytest.mark.slow
def test_loss_gradients_and_update_match_torch(name, weighting, remat, rng):
    cfg = configs.get(name)
    tm, jm = torch_and_jax(name)
    batch = data.random_batch(cfg, 3, 4, 5, rng)
    noise = rng.standard_normal(batch["img"].shape).astype(np.float32)
    t = np.array([0.05, 0.5, 0.93], np.float32)

    # PyTorch: loss, gradients, one AdamW step with clipping
    opt, sched = ttrain.make_optimizer(tm, lr=1e-3, warmup=0, steps=10, weight_decay=0.1)
    before = {k: to_numpy(v).copy() for k, v in tm.state_dict().items()}
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}
    t_loss = ttrain.flow_loss(
        tm, tb, torch.from_numpy(noise), torch.from_numpy(t), weighting, remat
    )
    t_loss.backward()
    t_grads = {
        k: p.grad.numpy().copy() for k, p in tm.named_parameters()
    }  # before the step clips them
    out = ttrain.train_step(
        tm,
        opt,
        sched,
        tb,
        torch.from_numpy(noise),
        torch.from_numpy(t),
        clip=1.0,
        weighting=weighting,
        remat=remat,
    )
    assert float(out["loss"]) == float(t_loss.detach())
    t_update = {k: to_numpy(v) - before[k] for k, v in tm.state_dict().items()}

    # JAX: the same, on the flat BFL-keyed parameters
    graphdef, params, paths = jtrain.split_params(jm)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    grad_fn = jax.jit(
        lambda p, b, n, t: jax.value_and_grad(jtrain.loss_fn)(
            p, {}, graphdef, paths, b, n, t, weighting=weighting, remat=remat
        )
    )
    loss, grads = grad_fn(params, jb, jnp.asarray(noise), jnp.asarray(t))
    tx = jtrain.make_optimizer(lr=1e-3, warmup=0, steps=10, weight_decay=0.1, clip=1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    layout = {key: param for key, param in torch_keys(jm).values()}  # BFL key -> Flax param name

    assert abs(float(loss) - float(out["loss"])) / float(out["loss"]) < LOSS_BOUND
    assert set(grads) == set(t_grads)
    errs = {
        k: rel_l2(keymaps.flax_to_torch(np.asarray(grads[k]), layout[k]), t_grads[k])
        for k in t_grads
    }
    worst = max(errs, key=errs.get)
    print(
        f"{name}: loss rel {abs(float(loss) / float(out['loss']) - 1):.2e}, worst grad rel-L2 {errs[worst]:.2e} "
        f"({worst})"
    )
    top = sorted(errs, key=errs.get)[-5:]
    assert errs[worst] < GRAD_BOUND, [(k, errs[k], float(np.linalg.norm(t_grads[k]))) for k in top]
    upd = {
        k: rel_l2(keymaps.flax_to_torch(np.asarray(updates[k]), layout[k]), t_update[k])
        for k in t_update
    }
    print(f"{name}: worst AdamW-update rel-L2 {max(upd.values()):.2e}")
    assert max(upd.values()) < UPDATE_BOUND, max(upd.items(), key=lambda kv: kv[1])


def test_timestep_sampling():
    """The shift is the samplers' time_shift; logit-normal and uniform have their distributions; both twins agree."""
    t = np.linspace(0.0, 1.0, 11)
    for mu in (0.5, 1.15):
        np.testing.assert_allclose(
            jtrain.shift_timesteps(jnp.asarray(t), mu),
            schedules.time_shift(mu, 1.0, t),
            rtol=1e-6,
            atol=1e-7,
        )
        np.testing.assert_allclose(
            ttrain.shift_timesteps(torch.from_numpy(t), mu),
            schedules.time_shift(mu, 1.0, t),
            rtol=1e-12,
        )
    z = jtrain.sample_timesteps(jax.random.key(0), 20000, "logit_normal", mean=0.5, std=0.8)
    logit = np.log(np.asarray(z) / (1 - np.asarray(z)))
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
    u = ttrain.sample_timesteps(torch.Generator().manual_seed(0), 20000, "uniform")
    assert abs(float(u.mean()) - 0.5) < 0.01 and float(u.min()) >= 0 and float(u.max()) < 1
    g = torch.Generator().manual_seed(0)
    zt = ttrain.sample_timesteps(g, 20000, "logit_normal", mean=0.5, std=0.8)
    assert abs(float(torch.logit(zt).mean()) - 0.5) < 0.03


# ---------------------------------------------------------------------------------------------
# The loop: learning, checkpoints, export
# ---------------------------------------------------------------------------------------------


def options(tmp_path, **kw):
    base = dict(
        steps=30, batch_size=16, lr=2e-3, warmup=5, ckpt_dir=str(tmp_path / "ckpt"), save_every=15
    )
    return tr.TrainOptions(**{**base, **kw})


@pytest.mark.slow
def test_training_learns_resumes_bitwise_and_exports(tmp_path):
    ds = tiny_data()
    a = tr.Trainer(TINY, ds, options(tmp_path, ema=0.99))
    losses = a.fit(progress=False)
    a.manager.wait_until_finished()
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), (losses[:5], losses[-10:])

    b = tr.Trainer(TINY, ds, options(tmp_path, ema=0.99))
    assert b.restore(15) == 15 and b.step == 15
    resumed = b.fit(progress=False)
    assert resumed == losses[15:]  # bitwise: float equality of every loss
    for part in ("params", "ema"):
        for k in a.state[part]:
            np.testing.assert_array_equal(
                np.asarray(b.state[part][k]), np.asarray(a.state[part][k])
            )
    # the optimiser state came back too: one more step agrees bitwise
    assert a.fit(31, progress=False) == b.fit(31, progress=False)

    a.export(
        tmp_path / "trained.safetensors"
    )  # BFL layout, readable by the PyTorch loader; the EMA weights
    tm = mt.load_model(TINY, tmp_path / "trained.safetensors", dtype=torch.float32)
    exported = mj.load.state_dict(a.model())
    for k, v in tm.state_dict().items():
        np.testing.assert_array_equal(to_numpy(v), exported[k])
        ema = np.asarray(a.state["ema"][k])  # Flax layout: 2-D kernels are (in, out)
        np.testing.assert_array_equal(to_numpy(v), ema.T if ema.ndim == 2 else ema)
    a.close()
    b.close()


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Scalars of TensorBoard event files as TensorBoard shows them, read with tensorboardX's own protobuf
    (TFRecord framing: length, its CRC, the record, its CRC); a SessionLog START at step s (tensorboardX's
    purge_step) drops the events of steps >= s before it, as TensorBoard does."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        raw = path.read_bytes()
        i = 0
        while i < len(raw):
            (n,) = struct.unpack("<Q", raw[i : i + 8])
            event = event_pb2.Event.FromString(raw[i + 12 : i + 12 + n])
            i += 16 + n
            if (
                event.session_log.status == event.session_log.START
            ):  # a resume: TensorBoard purges from here
                out = {k: [(s, v) for s, v in vs if s < event.step] for k, vs in out.items()}
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@pytest.mark.slow
def test_streamed_shards_train_resume_bitwise_and_log(tmp_path):
    """Cached shards streamed through grain (the prefetching iterator yields what a step reads itself); a run
    resumed from its checkpoint (the loader's state restored with it) repeats the losses bitwise, and its metrics
    file and TensorBoard events hold each step once."""
    from test_data import bucketed_cache

    # two shards of one bucket (the README's run trains on two buckets: one compile per bucket)
    bucketed_cache(tmp_path / "c", sizes=((5, 3), (4, 3)))
    shards = lambda: data.LatentShards(tmp_path / "c", seed=1, cfg=TINY)  # noqa: E731
    opts = options(tmp_path, steps=6, batch_size=4, save_every=3, warmup=1)
    a = tr.Trainer(TINY, shards(), opts)
    log = tr.RunLog(tmp_path / "run")
    losses = a.fit(progress=False, log=log)
    log.close()
    a.close()
    ahead = a.loader(2)  # the prefetching grain iterator yields what the step would read itself
    for step in range(2, 6):
        got, want = next(ahead), a.local_batch(step)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert ahead.get_state() == {"next_index": 6}

    b = tr.Trainer(TINY, shards(), opts)
    assert b.restore(3) == 3 and b.loader_state() == {"next_index": 3}
    log = tr.RunLog(tmp_path / "run", start=3)
    assert b.fit(progress=False, log=log) == losses[3:]  # bitwise
    log.close()
    b.close()
    lines = [json.loads(x) for x in (tmp_path / "run" / tr.RunLog.JSONL).read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert [x["loss"] for x in lines] == pytest.approx(losses, rel=1e-7)
    assert {"lr", "grad_norm", "step_time", "samples_per_s", "tokens_per_s"} <= set(lines[0])
    scalars = tensorboard_scalars(tmp_path / "run" / tr.RunLog.EVENTS)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(scalars)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(losses, rel=1e-6)


@pytest.mark.slow
def test_ema_is_the_moving_average_of_the_weights(tmp_path):
    decay = 0.9
    t = tr.Trainer(
        TINY, tiny_data(), options(tmp_path, steps=5, ema=decay, ckpt_dir=None, save_every=0)
    )
    expected = {k: np.asarray(v) for k, v in t.state["params"].items()}
    for step in range(5):
        t.train_step()
        d = np.float32(min(decay, (1 + step) / (10 + step)))
        expected = {
            k: d * e + (1 - d) * np.asarray(t.state["params"][k]) for k, e in expected.items()
        }
    worst = max(rel_l2(t.state["ema"][k], e) for k, e in expected.items())
    assert worst < 1e-6
    assert (
        max(rel_l2(t.state["ema"][k], t.state["params"][k]) for k in expected) > 1e-3
    )  # it does lag
    # with accumulation, only the micro-steps that apply an update move the average
    t = tr.Trainer(
        TINY,
        tiny_data(),
        options(tmp_path, steps=3, accumulate=2, warmup=0, ema=decay, ckpt_dir=None, save_every=0),
    )
    expected = {k: np.asarray(v) for k, v in t.state["params"].items()}
    for step in range(6):
        before = {k: np.asarray(v) for k, v in t.state["params"].items()}
        t.train_step()
        moved = any(not np.array_equal(before[k], np.asarray(t.state["params"][k])) for k in before)
        assert moved == (step % 2 == 1)
        if moved:
            d = np.float32(min(decay, (1 + step) / (10 + step)))
            expected = {
                k: d * e + (1 - d) * np.asarray(t.state["params"][k]) for k, e in expected.items()
            }
    assert max(rel_l2(t.state["ema"][k], e) for k, e in expected.items()) < 1e-6


def test_caption_dropout_is_a_pure_function_of_position():
    ds = data.Shapes(n=64, size=16, patch=4, context_dim=8, caption_dropout=0.25)
    full = ds.batch(0, 64)
    dropped = ~full["txt"].any(axis=(1, 2))
    assert 5 <= dropped.sum() <= 30  # about a quarter
    np.testing.assert_array_equal(
        full["txt"][~dropped], ds.arrays["txt"][ds.indices(0, 64)][~dropped]
    )
    assert ds.arrays["txt"].any(axis=(1, 2)).all()  # the data set itself keeps every caption
    part = ds.batch(10, 5)  # another batch size: the same samples dropped at the same positions
    np.testing.assert_array_equal(part["txt"], full["txt"][10:15])
    assert not data.Shapes(n=64, size=16, patch=4, context_dim=8).dropped(0, 64).any()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,distilled_guidance,refs",
    [("flux1-tiny", True, 1), ("flux1-tiny", False, 0), ("flux2-tiny", False, 2)],
    ids=["flux1-dev-kontext-like", "flux1-schnell-like", "flux2-klein-like-2-refs"],
)
def test_validation_samples_are_drawn_as_generate_draws_them(name, distilled_guidance, refs):
    """`--data` validation samples (`minflux_cli.pictures.data_grid`, from what `minflux cache` stores: embeddings,
    reference tokens at their ids) are the pictures `pipeline.generate` makes for the same model, prompt,
    references and seed: the family's schedule (FLUX.2 and guidance-distilled FLUX.1 shifted by resolution,
    schnell not), the preset's guidance, references as generation encodes them. Before, they were sampled on the
    training schedule (unshifted without --shift), which for a shifting model is another picture."""
    from types import SimpleNamespace

    from minflux import ids
    from minflux.request import Request
    from minflux_cli import pictures
    from minflux_jax import pipeline, sampling

    cfg = dataclasses.replace(configs.get(name), guidance_embed=distilled_guidance)
    model, ae = mj.build_model(cfg, seed=0), mj.build_model(f"{cfg.family}-ae-tiny", seed=1)
    ppt = configs.pixels_per_token(ae.params)
    rng = np.random.default_rng(0)
    txt = rng.standard_normal((1, 6, cfg.context_in_dim)).astype(np.float32)
    vec = rng.standard_normal((1, cfg.vec_in_dim)).astype(np.float32) if cfg.vec_in_dim else None
    sizes = [(3, 2), (2, 2)][:refs]  # reference token grids
    pics = [rng.uniform(-1, 1, (hh * ppt, ww * ppt, 3)).astype(np.float32) for hh, ww in sizes]
    stored = {
        "prompt": "make it blue",
        "grid": (2, 3),
        "txt": txt,
    }  # as minflux cache stores a prompt
    if vec is not None:
        stored["vec"] = vec
    if pics:  # reference tokens and ids as minflux cache --framework jax writes them (`cache.reference_tokens`)
        made = [pipeline.encode_tokens(ae, pic[None], cfg.family) for pic in pics]
        stored["ref"] = np.concatenate([tok for tok, _ in made], axis=1)
        stored["ref_ids"] = np.concatenate(
            [
                ids.image_ids(1, gh, gw, len(cfg.axes_dim), cfg.ref_time(i))
                for i, (_, (gh, gw)) in enumerate(made)
            ],
            axis=1,
        )
    args = SimpleNamespace(config=name, guidance=None, cfg=None, seed=3, sample_steps=3)
    pictures, captions = pictures.data_grid(args, cfg, model, [stored], ae, {})
    request = Request(
        txt=txt,
        vec=vec,
        width=3 * ppt,
        height=2 * ppt,
        steps=3,
        seed=3,
        guidance=3.5 if distilled_guidance else None,  # FLUX.1's default, as `minflux generate`'s
        refs=tuple(pics),
    )
    want = pipeline.generate(model, ae, request)
    assert captions == ["make it blue"] and pictures[0].shape == want[0].shape
    np.testing.assert_array_equal(pictures[0], want[0])
    if distilled_guidance:  # the training schedule (unshifted) would have drawn another picture
        noise = sampling.get_noise(1, 2 * ppt, 3 * ppt, cfg.family, 3, pixels_per_token=ppt)
        cond = pipeline.conditioning(model, ae, request, "text")
        shifted, unshifted = (
            np.asarray(sampling.sample(model, noise, cond, steps=3, shift=shift))
            for shift in (None, False)
        )
        assert rel_l2(unshifted, shifted) > 1e-3  # (measured 1.5e-2; fp32 noise is ~1e-7)


@pytest.mark.slow
def test_interrupted_save_keeps_last_good_checkpoint(tmp_path):
    """A process killed while orbax writes checkpoint 7 leaves checkpoint 0 the latest, intact."""
    script = program(f"""
        import os, jax.numpy as jnp
        from minflux_jax import trainer as tr
        t = tr.Trainer(TINY, tiny_data(32), tr.{options(tmp_path)!r})
        t.save(wait=True)  # step 0: complete
        t.state = {{**t.state, "step": jnp.asarray(7, jnp.int32),
                    "params": {{k: v + 1 for k, v in t.state["params"].items()}}}}
        t.save()  # asynchronous: the write is still in flight when the process dies
        os._exit(3)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    left = os.listdir(tmp_path / "ckpt")
    print("left in the checkpoint directory:", left)
    assert "7" not in left, left  # never finalised
    t = tr.Trainer(TINY, tiny_data(32), options(tmp_path))
    fresh = {k: np.asarray(v) for k, v in t.state["params"].items()}
    t.state = {**t.state, "params": {k: v * 0 for k, v in t.state["params"].items()}}
    assert t.manager.latest_step() == 0 and t.restore() == 0
    for k, v in fresh.items():
        np.testing.assert_array_equal(np.asarray(t.state["params"][k]), v)
    t.save(wait=True)  # and a later save at the same place still works
    t.close()


# ---------------------------------------------------------------------------------------------
# Resume that explains itself: the saved run's options checked first, unreadable checkpoints skipped
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A TINY run that saved checkpoints at micro-steps 2 and 4: (ckpt dir, its options, its params at step 2)."""
    root = tmp_path_factory.mktemp("run") / "ckpt"
    opts = tr.TrainOptions(
        steps=4, batch_size=8, lr=2e-3, warmup=1, ckpt_dir=str(root), save_every=2
    )
    t = tr.Trainer(TINY, tiny_data(32), opts)
    t.fit(2, progress=False)
    at_2 = {k: np.asarray(v).copy() for k, v in t.state["params"].items()}
    t.fit(progress=False)
    t.close()
    assert tr.saved_steps(root) == [4, 2]
    return root, opts, at_2


def copy_run(saved_run, tmp_path):
    root, opts, at_2 = saved_run
    shutil.copytree(root, tmp_path / "ckpt")
    return tmp_path / "ckpt", dataclasses.replace(opts, ckpt_dir=str(tmp_path / "ckpt")), at_2


def test_run_record_is_written_beside_the_checkpoints(saved_run):
    root, opts, _ = saved_run
    assert sorted(p.name for p in root.iterdir()) == [
        "2",
        "4",
        tr.RUN_FILE,
    ]  # no temporary file left
    assert json.loads((root / tr.RUN_FILE).read_text()) == tr.run_record(TINY, opts, (1, 1))


@pytest.mark.parametrize(
    "change,said",
    [
        (
            dict(batch_size=16),
            ["batch_size 16 (saved: 8)"],
        ),  # was "data position 32 does not match its step"
        (dict(accumulate=2), ["accumulate 2 (saved: 1)"]),
        (dict(lora_rank=4), ["lora_rank 4 (saved: 0)"]),  # was orbax's tree dump
        (dict(precision="bf16", ema=0.9), ["precision bf16 (saved: fp32)", "ema on (saved: off)"]),
        (
            dict(
                cfg=dataclasses.replace(TINY, depth=2, hidden_size=128, num_heads=4)
            ),  # was orbax's tree dump
            ["config depth 2 (saved: 1), hidden_size 128 (saved: 64), num_heads 4 (saved: 2)"],
        ),
        (dict(cfg=configs.get("flux1-tiny")), ["config FluxConfig (saved: Flux2Config)"]),
        (
            dict(mesh=(2, 1), batch_size=16, lora_rank=2, lora_alpha=2.0),
            [
                "mesh 2x1 (saved: 1x1)",
                "batch_size 16 (saved: 8)",
                "lora_rank 2 (saved: 0)",
                "lora_alpha 2.0 (saved: 16.0)",
            ],
        ),
    ],
)
def test_resume_names_each_difference(saved_run, change, said):
    root, opts, _ = saved_run
    cfg, mesh = change.pop("cfg", TINY), change.pop("mesh", (1, 1))
    with pytest.raises(CheckpointError) as e:
        tr.check_resume(root, tr.run_record(cfg, dataclasses.replace(opts, **change), mesh))
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(root / tr.RUN_FILE)), message
    assert message.count("(saved: ") == sum(phrase.count("(saved: ") for phrase in said), (
        message
    )  # nothing else
    for phrase in said:
        assert phrase in message, message
    tr.check_resume(
        root, tr.run_record(TINY, dataclasses.replace(opts, steps=9, lr=1.0), (1, 1))
    )  # free to change


def test_restore_checks_options_before_orbax(saved_run):
    """Through the trainer: a wider model is refused by the run record, not by orbax's tree comparison."""
    root, opts, _ = saved_run
    t = tr.Trainer(dataclasses.replace(TINY, hidden_size=128, num_heads=4), tiny_data(32), opts)
    with pytest.raises(
        CheckpointError, match=r"config hidden_size 128 \(saved: 64\), num_heads 4 \(saved: 2\)$"
    ):
        t.restore()
    t.close()


@pytest.mark.slow
def test_resume_falls_back_past_a_truncated_latest_checkpoint(saved_run, tmp_path, capsys):
    root, opts, at_2 = copy_run(saved_run, tmp_path)
    arrays = [f for f in (root / "4" / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert arrays
    for f in arrays:
        f.write_bytes(f.read_bytes()[:10])  # was a tensorstore traceback
    t = tr.Trainer(TINY, tiny_data(32), opts)
    assert t.restore() == 2 and t.step == 2
    warning = capsys.readouterr().err.strip().splitlines()
    assert (
        len(warning) == 1
        and f"{root / '4'} (" in warning[0]
        and warning[0].endswith(f"resuming from {root / '2'}")
    )
    for k, v in at_2.items():
        np.testing.assert_array_equal(np.asarray(t.state["params"][k]), v)
    assert (
        tr.saved_steps(root) == [2] and (root / "4.unreadable").is_dir()
    )  # moved aside: a later save takes its place
    t.fit(progress=False)
    t.close()
    again = tr.Trainer(TINY, tiny_data(32), opts)
    assert again.restore() == 4
    again.close()


def test_resume_with_deleted_state(saved_run, tmp_path, capsys):
    root, opts, _ = copy_run(saved_run, tmp_path)
    shutil.rmtree(
        root / "4" / "state"
    )  # was KeyError: 'Item "state" was not found in the checkpoint'
    t = tr.Trainer(TINY, tiny_data(32), opts)
    assert t.restore() == 2
    warning = capsys.readouterr().err
    assert (
        f"{root / '4'} (incomplete: no state/)" in warning
        and f"resuming from {root / '2'}" in warning
    )
    shutil.rmtree(root / "2" / "state")
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from"):
        tr.check_resume(root, t.record)  # before any model is built
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from"):
        t.restore()
    t.close()


def test_resume_without_checkpoint_or_with_a_broken_record(saved_run, tmp_path):
    _, opts, _ = saved_run
    record = tr.run_record(TINY, opts, (1, 1))
    for root in (tmp_path / "nothing", tmp_path):  # was a FileNotFoundError traceback
        with pytest.raises(
            CheckpointError, match=f"^{re.escape(str(root))}: no checkpoint to resume from"
        ):
            tr.check_resume(root, record)
    root, _, _ = copy_run(saved_run, tmp_path)
    (root / tr.RUN_FILE).write_text("{not json")
    with pytest.raises(
        CheckpointError, match=f"^{re.escape(str(root / tr.RUN_FILE))}: unreadable run record"
    ):
        tr.check_resume(root, record)


def test_explicit_zero_guidance_and_counts_are_honoured():
    cfg = dataclasses.replace(TINY, guidance_embed=True)
    for guidance, fed in (
        (0.0, 0.0),
        (None, 1.0),
        (4.5, 4.5),
    ):  # was `guidance or 1.0`: 0.0 became 1.0
        t = tr.Trainer(cfg, tiny_data(16), tr.TrainOptions(batch_size=4, guidance=guidance))
        np.testing.assert_array_equal(
            np.asarray(t.batch(0)["guidance"]), np.full(4, fed, np.float32)
        )
    for bad in (
        dict(steps=0),
        dict(batch_size=0),
        dict(accumulate=0),
        dict(lora_rank=-3),
        dict(ema=1.0),
    ):
        with pytest.raises(ValueError, match=f"TrainOptions.{next(iter(bad))} must be"):
            tr.TrainOptions(**bad)


SHARDED = program("""
import json, os
import jax, numpy as np
from minflux_jax import trainer as tr
ds = tiny_data(64)
opts = tr.TrainOptions(steps=4, batch_size=8, lr=2e-3, warmup=2)
one = tr.Trainer(TINY, ds, opts, devices=jax.devices()[:1])
a = one.fit(progress=False)
many = tr.Trainer(TINY, ds, tr.TrainOptions(**{**opts.__dict__, "mesh": (2, 4)}))
b = many.fit(progress=False)
specs = {k: str(v.sharding.spec) for k, v in many.state["params"].items()}
mu = many.state["opt_state"][1][0].mu
import collections, re
hlo = many._step.lower(many.state, many.frozen, many.batch(0)).compile().as_text()
kinds = "all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute"
ops = collections.Counter(re.findall(rf" ({kinds})(?:-start)?\(", hlo))
print(json.dumps({"devices": len(jax.devices()), "single": a, "sharded": b, "specs": specs, "collectives": ops,
                  "mu_spec": str(mu["img_in.weight"].sharding.spec),
                  "shards": len(many.state["params"]["img_in.weight"].addressable_shards)}))
""")


@pytest.mark.slow
def test_sharded_run_matches_single_device():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["shards"] == 8
    assert (
        "fsdp" in out["specs"]["img_in.weight"] and "fsdp" in out["mu_spec"]
    )  # params and Adam moments sharded
    # FSDP's communication is weights and gradients: each sharded weight all-gathered where it is used, no
    # activation resharding (before trainer.fsdp_gather, XLA resharded activations with ~100 all-to-alls)
    n_sharded = sum(spec != "PartitionSpec()" for spec in out["specs"].values())
    assert out["collectives"]["all-gather"] == n_sharded, (out["collectives"], n_sharded)
    assert (
        out["collectives"].get("all-to-all", 0) == 0
        and out["collectives"].get("collective-permute", 0) == 0
    )
    a, b = np.array(out["single"]), np.array(out["sharded"])
    print("sharded vs single-device loss rel diff per step:", np.abs(a - b) / a)
    np.testing.assert_allclose(b, a, rtol=1e-5)


MULTI_PROCESS = program("""
import json, sys
import jax
from minflux_jax import trainer as tr
tr.maybe_initialize_distributed()  # from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
opts = tr.TrainOptions(steps=4, batch_size=8, lr=2e-3, warmup=2, mesh=(2, 2), ckpt_dir=sys.argv[1], save_every=2)
t = tr.Trainer(TINY, tiny_data(64), opts)
losses = t.fit(progress=False)
t.close()
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(), "devices": len(jax.devices()),
                  "local": len(jax.local_devices()), "losses": losses}))
""")


@pytest.mark.slow
def test_two_process_run_matches_single_device(tmp_path):
    """Two JAX processes (2 CPU devices each, a 2 x 2 mesh) through jax.distributed: each feeds its half of
    every batch, orbax saves collectively, and the loss curve is the single-device one."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": "2",
    }
    root = os.path.dirname(os.path.dirname(__file__))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MULTI_PROCESS, str(tmp_path / "ckpt")],
            cwd=root,
            text=True,
            env={**env, "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["processes"] == 2 and r["devices"] == 4 and r["local"] == 2 for r in results)
    assert results[0]["losses"] == results[1]["losses"]  # one global computation, seen by both
    assert sorted(int(d.name) for d in (tmp_path / "ckpt").iterdir() if d.name.isdigit()) == [2, 4]

    single = tr.Trainer(
        TINY,
        tiny_data(64),
        tr.TrainOptions(steps=4, batch_size=8, lr=2e-3, warmup=2),
        devices=jax.devices()[:1],
    ).fit(progress=False)
    np.testing.assert_allclose(results[0]["losses"], single, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_training_freezes_base_and_exports(tmp_path):
    ds = tiny_data()
    t = tr.Trainer(
        TINY,
        ds,
        options(tmp_path, steps=4, lr=1e-2, lora_rank=4, lora_alpha=4.0, ckpt_dir=None, ema=0.5),
    )  # the model and the file are then the adapters' EMA
    base = {k: np.asarray(v) for k, v in t.frozen.items()}
    t.fit(progress=False)
    for k, v in t.frozen.items():
        np.testing.assert_array_equal(np.asarray(v), base[k])
    assert (
        set(t.state["params"]) == set(t.lora.modules)
        and "double_blocks.0.img_attn.qkv" in t.lora.modules
    )
    assert (
        float(np.abs(np.asarray(t.state["params"]["double_blocks.0.img_attn.qkv"]["lora_B"])).max())
        > 0
    )
    # the trained adapter file, merged by PyTorch into the base, gives the trainer's own merged model
    t.save_lora(tmp_path / "lora.safetensors")
    mt_model = mt.build_model(TINY)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in mj.load.state_dict(merge_base(t)).items()}
    mt_model.load_state_dict(sd)
    tlora.load_lora(mt_model, tmp_path / "lora.safetensors")
    want = mj.load.state_dict(t.model())
    for k, v in mt_model.state_dict().items():
        assert rel_l2(to_numpy(v), want[k]) < 1e-6, k


@pytest.mark.slow
def test_demo_command_writes_grid_curve_and_weights_and_resumes(tmp_path, capsys):
    from minflux_cli import main as cli

    out = tmp_path / "demo"
    run = [
        "train",
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--sample-steps",
        "2",
        "--save-every",
        "1",
        "--sample-every",
        "2",
    ]
    assert cli.main(run + ["--steps", "3"]) == 0
    for name in ("samples.png", "loss.png", "model.safetensors", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    # validation grids at step 0 (the start) and every 2 steps
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step-000000.png",
        "step-000002.png",
    ]
    assert mt.load_model(data.DEMO, out / "model.safetensors", dtype=torch.float32) is not None
    capsys.readouterr()

    # resume with another batch size: one line naming the difference, exit 2, before any model is built
    assert cli.main(run + ["--steps", "4", "--batch-size", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("minflux train: error: --resume: ")
        and err[0].endswith("batch_size 4 (saved: 8)")
    ), err
    # a truncated latest checkpoint: the command warns, naming both, and goes on from the one before
    for f in (out / "ckpt" / "3" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    assert cli.main(run + ["--steps", "4", "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resumed from step 2" in captured.out
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert (
        len(warnings) == 1
        and str(out / "ckpt" / "3") in warnings[0]
        and str(out / "ckpt" / "2") in warnings[0]
    )
    assert tr.saved_steps(out / "ckpt") == [4, 3]  # step 3 written again on the way to 4


def merge_base(t):
    """The trainer's frozen base as a model."""
    return jtrain.merge_params(
        t.master_graphdef, jax.tree.map(lambda p: p.astype(jnp.float32), t.frozen), t.paths
    )
