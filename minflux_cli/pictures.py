"""The pictures `minflux train` writes: validation grids and the loss curve.

The demo (a pixel-space model, no autoencoder) draws its captions on the training schedule (`demo_grid`,
`Trainer.sample`); a `--data` run draws the prompts the cache stored as `minflux generate` would (`data_grid`:
`sampling.sample` with a `request.Conditioning`, the family's schedule and guidance, the references), decoded by
the cache's autoencoder. `sampler` writes a grid at a step (`OUT/samples/step-NNNNNN.png`, and into TensorBoard);
every picture is written atomically (`minflux.files`).
"""

from __future__ import annotations

import numpy as np

from minflux import configs, files
from minflux import data as datasets
from minflux.files import atomic_write

# ---------------------------------------------------------------------------------------------
# Pictures: the sample grid and the loss curve
# ---------------------------------------------------------------------------------------------


def save_grid(images, captions: list[str], cols: int, path) -> np.ndarray:
    """Images (each (H, W, 3) in [-1, 1] or uint8; sizes may differ), `cols` per row, each row titled by its caption
    (or, with one row, each image by its own), as a PNG written atomically; returns the picture (h, w, 3) uint8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.25 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(images):
            ax.axis("off")
            continue
        img = images[i]
        shown = img if img.dtype == np.uint8 else np.clip((img + 1) / 2, 0, 1)
        ax.imshow(shown, interpolation="nearest")
        if rows == 1:
            ax.set_title(captions[i][:40], fontsize=6)
        elif i % cols == 0:
            ax.set_ylabel(captions[i // cols].removeprefix("a "), fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.set_dpi(100)
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    from PIL import Image

    with atomic_write(path) as f:
        Image.fromarray(picture).save(f, format="PNG")
    return picture


def save_loss_curve(losses: list[float], path, title: str = "training loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    k = max(1, len(losses) // 20)
    if len(losses) >= k:
        ax.plot(
            steps[k - 1 :],
            np.convolve(losses, np.ones(k) / k, mode="valid"),
            lw=1.5,
            label=f"mean of {k}",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    files.write_figure(fig, path, dpi=100)  # atomic (a full disk leaves no 0-byte picture)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Validation samples
# ---------------------------------------------------------------------------------------------


def demo_grid(args, cfg, data, trainer) -> tuple[list, list[str]]:
    """The demo's samples: six per caption, guided (--cfg, default 3) against the empty caption when caption dropout
    taught the unconditional flow; (pictures in [-1, 1], one caption per row)."""
    scale = 3.0 if args.cfg is None else args.cfg
    cols = 6
    labels = [(s, c) for c in range(len(data.COLOURS)) for s in range(len(data.SHAPES))]
    txt = np.repeat(data.embed(labels), cols, axis=0)
    g = data.size // data.patch
    vec = txt.mean(axis=1) if cfg.vec_in_dim else None
    # no unconditional flow was learnt otherwise
    guide = scale != 1.0 and data.caption_dropout > 0
    neg = data.null(len(txt)) if guide else {}
    tokens = trainer.sample(
        txt,
        g,
        g,
        steps=args.sample_steps,
        seed=args.seed,
        vec=vec,
        cfg_scale=scale if guide else 1.0,
        neg_txt=neg.get("txt"),
        neg_vec=neg.get("vec"),
    )
    return list(data.unpatchify(tokens)), [data.caption(lab) for lab in labels]


def reference_latents(ref: np.ndarray, ref_ids: np.ndarray, family: str) -> tuple:
    """Stored reference tokens (1, Lr, C) and their ids (1, Lr, axes), several references one after the other,
    each at its own t -> each reference's latents (NHWC), as generation's `sampling.sample` takes them (it packs
    them back and gives them the same ids, `sampling.reference_tokens`)."""
    import jax.numpy as jnp

    from minflux_jax import sampling

    times = ref_ids[0, :, 0]
    out = []
    for t in dict.fromkeys(times.tolist()):  # the references' times, in order
        mine = times == t
        h, w = (int(ref_ids[0, mine, axis].max()) + 1 for axis in (1, 2))
        out.append(sampling.unpack(jnp.asarray(ref[:, mine]), h, w, family))
    return tuple(out)


def data_grid(args, cfg, model, prompts: list[dict], ae, empty: dict) -> tuple[list, list[str]]:
    """The --data validation samples, drawn as `minflux generate` draws them (`pipeline.generate`'s path): noise
    from the seed in numpy (`sampling.get_noise`; prompt i from --seed + i), a `request.Conditioning` of the stored
    prompt (its embeddings, references, control or Fill channels; the empty caption as the negative prompt with
    --cfg), sampled by `sampling.sample` (`sample_kv` for klein KV models with references) on the model's own
    schedule (FLUX.2 and guidance-distilled FLUX.1 shifted by resolution, schnell not) with its guidance (--guidance,
    else the preset's, as generate), then decoded by the cache's autoencoder `ae`. Returns the pictures (uint8)
    and the prompts."""
    import jax.numpy as jnp

    from minflux import family
    from minflux.request import Conditioning
    from minflux_jax import pipeline, sampling

    ppt = configs.pixels_per_token(ae.params)
    guidance = None
    if cfg.guidance_embed:
        guidance = (
            args.guidance
            if args.guidance is not None
            else family.default_guidance(args.config, cfg)
        )
    scale = 1.0 if args.cfg is None else args.cfg
    f32 = lambda a: None if a is None else jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
    pictures = []
    for i, s in enumerate(prompts):
        h, w = s["grid"]
        noise = sampling.get_noise(
            1, h * ppt, w * ppt, cfg.family, args.seed + i, pixels_per_token=ppt
        )
        cond = Conditioning(
            txt=f32(s["txt"]),
            vec=f32(s.get("vec")),
            neg_txt=f32(empty.get("txt")) if scale != 1.0 else None,
            neg_vec=f32(empty.get("vec")) if scale != 1.0 else None,
            guidance=guidance,
            cfg_scale=scale,
            refs=reference_latents(np.asarray(s["ref"], np.float32), s["ref_ids"], cfg.family)
            if "ref" in s
            else (),
            img_cond=f32(s.get("img_cond")),
        )
        if cfg.ref_kv and cond.refs:
            latents = sampling.sample_kv(model, noise, cond, steps=args.sample_steps)
        else:
            latents = sampling.sample(model, noise, cond, steps=args.sample_steps)
        pictures.append(pipeline.decode(ae, latents)[0])
    return pictures, [s["prompt"] for s in prompts]


def sampler(args, cfg, data, trainer, samples, log):
    """The validation grid at a step: OUT/samples/step-NNNNNN.png and a TensorBoard image. The demo draws its
    captions on the training schedule (`demo_grid`, `Trainer.sample`); --data runs draw each stored prompt (with its
    references or control channels) at its grid as generation would (`data_grid`), decoded by the cache's
    autoencoder. Seeds are fixed, so grids of different steps compare."""
    folder = args.out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    if samples is None:  # the demo: the final grid's program, compiled once for both

        def draw() -> tuple[list, list[str]]:
            return demo_grid(args, cfg, data, trainer)

    else:
        import jax.numpy as jnp

        import minflux_jax as mj

        ae_cfg = configs.get(samples["ae_config"])
        ae = (
            mj.load_model(ae_cfg, samples["ae_file"], dtype=jnp.float32)
            if samples["ae_file"]
            else mj.build_model(ae_cfg, seed=samples["ae_seed"])
        )
        scale = 1.0 if args.cfg is None else args.cfg
        empty = datasets.read_tensors(args.data / datasets.EMPTY) if scale != 1.0 else {}

        def draw() -> tuple[list, list[str]]:
            return data_grid(args, cfg, trainer.model(), samples["prompts"], ae, empty)

    def at(step: int) -> None:
        pictures, captions = draw()
        cols = 6 if samples is None else len(pictures)  # the demo: six per caption
        picture = save_grid(pictures, captions, cols, folder / f"step-{step:06d}.png")
        log.image("samples", picture, step)

    return at
