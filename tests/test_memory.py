"""`minflux.memory`: parameter counts against the models themselves, the machine's memory against psutil, and the
one-line refusal of a run that cannot fit."""

from __future__ import annotations

import numpy as np
import pytest

from minflux import configs, memory
from minflux.errors import CheckpointError


@pytest.mark.parametrize(
    "name",
    ["flux1-tiny", "flux2-tiny", "flux1-dev", "flux1-fill-dev", "flux2-dev", "flux2-klein-9b"],
)
def test_transformer_params_match_the_model(name):
    """The count from the config alone equals the PyTorch model's (built on the meta device: no memory)."""
    from parity.frameworks import TorchSide

    cfg = configs.get(name)
    expected = TorchSide(cfg, "fp32", "meta").expected
    assert memory.transformer_params(cfg) == sum(int(np.prod(s)) for s in expected.values())


def test_available_memory_as_psutil_sees_it():
    psutil = pytest.importorskip("psutil")
    ours, theirs = memory.available_bytes(), psutil.virtual_memory().available
    assert (
        ours is not None and ours <= theirs * 1.25
    )  # (a cgroup limit may lower ours; the load moves both)
    if memory._cgroup_limit() is None:
        assert abs(ours - theirs) < 0.25 * theirs


def test_too_large_is_one_line():
    cfg, ae = configs.get("flux1-tiny"), configs.get("flux1-ae-tiny")
    ppt = configs.pixels_per_token(ae)
    small = memory.generate_bytes(
        cfg, ae, 64, 64, txt_tokens=8, dtype_bytes=4, pixels_per_token=ppt
    )
    huge = memory.generate_bytes(
        cfg, ae, 100_000, 100_000, txt_tokens=8, dtype_bytes=4, pixels_per_token=ppt
    )
    assert small < 100e6 < 1e12 < huge  # a 64 px demo fits anywhere; 100000^2 px fits nowhere
    memory.check(small, "--width 64 --height 64", available=1 << 30)
    with pytest.raises(memory.TooLarge) as e:
        memory.check(huge, "--width 100000 --height 100000", available=24 * 10**9)
    assert isinstance(e.value, CheckpointError) and "\n" not in str(e.value)
    assert str(e.value).startswith("--width 100000 --height 100000 needs about ")
    assert str(e.value).endswith("of memory; this machine has 24.0 GB available")


def test_offload_holds_two_blocks():
    """With --offload blocks only the transformer's parts outside its blocks and two blocks (computing, next) are
    resident: full-size FLUX.1-dev in bf16 at 256 px is 24.3 GB resident, 2.0 GB offloaded (measured peak RSS:
    3.7 GB, with the runtimes, bench/bench_offload.py)."""
    cfg, ae = configs.get("flux1-dev"), configs.get("flux1-ae")
    rest, double, single = memory.block_params(cfg)
    assert rest + 19 * double + 38 * single == memory.param_count(cfg)
    kw = {"txt_tokens": 64, "dtype_bytes": 2}
    resident = memory.generate_bytes(cfg, ae, 256, 256, **kw)
    offloaded = memory.generate_bytes(cfg, ae, 256, 256, offload=True, **kw)
    assert resident > 2 * memory.param_count(cfg) > 10 * offloaded
    assert offloaded > 2 * (rest + 2 * double)


def test_training_estimates_grow_with_what_was_asked():
    cfg = configs.get("flux2-klein-4b")
    base = memory.train_bytes(cfg, 4096, 512, batch=1, lora_rank=16)
    assert memory.train_bytes(cfg, 4096, 512, batch=100_000, lora_rank=16) > 1000 * base
    assert memory.train_bytes(cfg, 4096, 512, batch=1, lora_rank=100_000) > 10 * base
    full = memory.train_bytes(cfg, 4096, 512, batch=1)
    assert full > 16 * memory.transformer_params(cfg)  # fp32 weights, gradients, two Adam moments
