"""The typed request (`minflux.request`): checked once, with one-line errors naming the field (or the
command's flag); the samplers' and pipelines' earlier keyword forms still accepted; per-image seeds drawn the
same way in both frameworks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from minflux import configs, request
from minflux.request import Request

TXT = np.zeros((2, 5, 48), np.float32)  # two flux2-tiny prompts
IMG = np.zeros((32, 32, 3), np.float32)
MASK = np.zeros((32, 32, 1), np.float32)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"txt": np.zeros((5, 48))}, r"txt: expected prompt embeddings \(B, L, D\)"),
        ({"vec": np.zeros((3, 768))}, r"vec: expected \(2, D\)"),
        ({"neg_txt": np.zeros((1, 6, 48))}, "must have the same length and width"),
        ({"neg_vec": np.zeros((2, 768))}, "neg_vec needs neg_txt"),
        ({"width": 0}, "width: expected an integer >= 1"),
        ({"steps": 2.5}, "steps: expected an integer >= 1"),
        ({"cfg_scale": float("nan")}, "cfg_scale: expected a finite number"),
        ({"strength": 1.5, "init": IMG}, r"strength: must be in \[0, 1\]"),
        ({"seeds": (1,)}, "seeds: expected 2 seeds"),
        ({"mask": MASK}, "mask needs init IMAGE"),
        ({"init": np.zeros((16, 32, 3))}, r"init: expected an image \(32, 32, 3\)"),
        ({"refs": [np.zeros((8, 8))]}, r"refs\[0\]: expected an image \(H, W, 3\)"),
        ({"mask_mode": "blur"}, "mask_mode: expected one of"),
    ],
)
def test_request_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        Request(**{"txt": TXT, "width": 32, "height": 32, **kw})


def test_request_is_frozen_and_normalised():
    req = Request(txt=TXT, width=32, height=32, refs=[IMG], seeds=[3, 4])
    assert req.refs[0] is IMG and req.seeds == (3, 4) and not req.true_cfg
    with pytest.raises(AttributeError):
        req.steps = 3


@pytest.mark.parametrize(
    "model,kw,match",
    [
        (
            "flux1-fill-dev",
            {"init": IMG},
            "is an inpainting \\(Fill\\) model: pass init IMAGE and mask",
        ),
        (
            "flux1-canny-dev",
            {},
            "is a structural-control \\(Canny/Depth\\) model: pass control IMAGE",
        ),
        ("flux1-dev", {"control": IMG}, "control needs a FLUX.1 Canny/Depth model"),
        ("flux1-dev", {"refs": [IMG, IMG]}, "FLUX.1 Kontext takes one refs image, got 2"),
        (
            "flux1-dev",
            {"init": IMG, "strength": 0.0, "steps": 4},
            "strength 0.0: strength 0.0 with 4",
        ),
        (
            "flux2-klein-9b-kv",
            {"refs": [IMG], "init": IMG},
            "a klein KV model: pass reference images only",
        ),
        ("flux2-klein-4b", {"width": 40}, "width 40 is not a positive multiple of 16"),
    ],
)
def test_check_model(model, kw, match):
    """The model-dependent rules, on a plain object with the request's fields (as `minflux generate` passes its
    plan), the fields named by the library's default names."""

    class Asks:
        width, height, steps, strength, true_cfg = 32, 32, 28, 1.0, False
        refs, init, mask, control = (), None, None, None

    asks = Asks()
    for k, v in kw.items():
        setattr(asks, k, v)
    ae = "flux1-ae" if model.startswith("flux1") else "flux2-ae"
    with pytest.raises(ValueError, match=match):
        request.check_model(asks, configs.get(model), configs.get(ae))


def test_request_check_reads_the_embeddings():
    cfg, ae = configs.get("flux1-tiny"), configs.get("flux1-ae-tiny")
    txt = np.zeros((1, 5, cfg.context_in_dim), np.float32)
    with pytest.raises(ValueError, match="vec: FLUX.1 takes a pooled vector of width 24, got none"):
        Request(txt=txt, width=32, height=32).check(cfg, ae)
    with pytest.raises(ValueError, match="txt: width 40, but the model has context_in_dim 48"):
        Request(txt=txt, width=32, height=32).check(configs.get("flux2-tiny"), ae)
    vec = np.zeros((1, cfg.vec_in_dim), np.float32)
    assert Request(txt=txt, vec=vec, width=32, height=32).check(cfg, ae) == "text"


def test_earlier_keyword_forms():
    """A call in the earlier keyword form builds the typed value (and warns); a typed call passes through."""
    seen = []

    @request.keywords(("model", "noise", "txt", "vec"), request.Conditioning, "cond")
    def sample(model, noise, cond, steps=28):
        seen.append((model, noise, cond, steps))

    txt = np.zeros((1, 5, 48), np.float32)
    with pytest.warns(DeprecationWarning, match="sample: loose keyword arguments are deprecated"):
        sample("m", "n", txt, None, steps=3, guidance=2.0, refs=[txt])
    cond = seen[-1][2]
    assert seen[-1][3] == 3 and cond.txt is txt and cond.guidance == 2.0 and cond.refs == (txt,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample("m", "n", cond)
    assert seen[-1][2] is cond
    with pytest.raises(TypeError, match="multiple values"):
        sample("m", "n", txt, txt=txt)
    with pytest.raises(TypeError, match="at most 4 positional"):
        sample("m", "n", txt, None, 3)


@pytest.mark.slow
def test_per_image_seeds_both_frameworks():
    """Image i of a batch is drawn from seed + i (or seeds[i]) alone, so a batch row is the single run of its
    seed; the same pictures in both frameworks (the noise is numpy's)."""
    import minflux_jax as mj
    import minflux_torch as mt
    from minflux_jax import pipeline as jp
    from minflux_torch import pipeline as tp

    txt = np.random.default_rng(0).standard_normal((2, 5, 48), np.float32)
    kw = {"width": 32, "height": 32, "steps": 2, "guidance": 4.0}
    tm, tae = mt.build_model("flux2-tiny", seed=0), mt.build_model("flux2-ae-tiny", seed=1)
    jm, jae = mj.build_model("flux2-tiny", seed=0), mj.build_model("flux2-ae-tiny", seed=1)
    batch = tp.generate(tm, tae, Request(txt=txt, seed=3, **kw))  # rows from seeds 3 and 4
    for i in range(2):
        one = tp.generate(tm, tae, Request(txt=txt[i : i + 1], seed=3 + i, **kw))
        # CPU GEMMs block a batch of 1 and of 2 differently, so a rounding step may differ by one level;
        # drawing row i from the wrong seed changed pixels by up to 251 levels.
        assert np.abs(batch[i].astype(int) - one[0]).max() <= 1
    chosen = tp.generate(tm, tae, Request(txt=txt, seeds=(3, 5), **kw))
    np.testing.assert_array_equal(chosen[0], batch[0])
    assert np.abs(chosen[1].astype(int) - batch[1]).max() > 10  # seed 5, not 4
    j = jp.generate(jm, jae, Request(txt=txt, seed=3, **kw))
    assert np.abs(j.astype(int) - batch).max() <= 1
