"""Cached shards streamed from disk (`minflux.data.LatentShards`): batches of one bucket, a pure function of the step,
split across processes, bf16 text read bit for bit, caches made before buckets, and bad caches named in one line."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from minflux import configs, data
from minflux.checkpoint import CheckpointError, st_dtype, write_safetensors

CFG = data.DEMO  # 48-channel tokens, text width 32, 4 id axes


def write(path, tensors: dict) -> None:
    write_safetensors(
        path, {k: (st_dtype(v.dtype), v.shape) for k, v in tensors.items()}, tensors.__getitem__
    )


def samples(first: int, n: int, side: int, txt_len: int = 3, rng=None, refs: int = 0) -> dict:
    """n samples on a side x side grid; img[:, 0, 0] holds each sample's number (to recognise it); bf16 text."""
    rng = rng or np.random.default_rng(first)
    img = rng.standard_normal((n, side * side, CFG.in_channels)).astype(np.float32)
    img[:, 0, 0] = np.arange(first, first + n)
    img_ids, txt_ids = data.ids.for_config(CFG, n, side, side, txt_len)
    out = {
        "img": img,
        "img_ids": img_ids,
        "txt": rng.standard_normal((n, txt_len, CFG.context_in_dim)).astype(ml_dtypes.bfloat16),
        "txt_ids": txt_ids,
    }
    if refs:
        out["ref"] = rng.standard_normal((n, refs * 4, CFG.in_channels)).astype(np.float32)
        out["ref_ids"] = np.concatenate(
            [data.ids.image_ids(n, 2, 2, 4, CFG.ref_time(i)) for i in range(refs)], axis=1
        )
    return out


def bucketed_cache(folder, sizes=((5, 4), (3, 4), (3, 2)), refs: int = 0) -> dict[int, np.ndarray]:
    """A cache of shards (count, grid side) with cache.json and the empty caption; returns sample number -> txt."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, texts, first = [], {}, 0
    for i, (n, side) in enumerate(sizes):
        part = samples(first, n, side, refs=refs)
        write(folder / f"shard-{i:05d}.safetensors", part)
        texts |= {first + j: part["txt"][j] for j in range(n)}
        names = [f"s{first + j}" for j in range(n)]
        shards.append(
            {
                "file": f"shard-{i:05d}.safetensors",
                "bucket": [side * 4] * 2,
                "count": n,
                "names": names,
            }
        )
        first += n
    data.write_meta(folder, {"refs": refs, "shards": shards})
    write(folder / data.EMPTY, {"txt": np.zeros((1, 3, CFG.context_in_dim), ml_dtypes.bfloat16)})
    return texts


def numbers(batch) -> list[int]:
    return [int(v) for v in batch["img"][:, 0, 0]]


def test_batches_are_one_bucket_a_pure_function_of_the_step_and_split_across_processes(tmp_path):
    texts = bucketed_cache(tmp_path / "c")
    ds = data.LatentShards(tmp_path / "c", seed=3, cfg=CFG)
    assert len(ds) == 11 and len(ds.groups) == 2  # (5 + 3 samples of 4 x 4, 3 of 2 x 2)
    b = 4
    assert ds.batches_per_epoch(b) == 2 + 1
    seen = []
    for step in range(6):
        batch = ds.global_batch(step, b)
        assert {k: v.shape[0] for k, v in batch.items()} == dict.fromkeys(batch, b)
        side = 4 if batch["img"].shape[1] == 16 else 2
        assert (side == 4) == all(n < 8 for n in numbers(batch))  # every sample from one bucket
        for n, txt in zip(numbers(batch), batch["txt"], strict=True):
            assert txt.dtype == ml_dtypes.bfloat16 and np.array_equal(
                txt.view(np.uint16), texts[n].view(np.uint16)
            )  # bf16, bit for bit
        seen.append(numbers(batch))
        # processes read only their share; the shares make up the batch, for 2 or 3 processes
        for count in (2, 3):
            parts = [ds.global_batch(step, b, (i, count)) for i in range(count)]
            assert sum((numbers(p) for p in parts), []) == numbers(batch)
    for epoch in (seen[:3], seen[3:]):  # each epoch visits every sample (short buckets wrap round)
        assert set(sum(epoch, [])) == set(range(11))
    assert seen[:3] != seen[3:]  # and epochs are shuffled anew
    # a pure function of the step: a fresh reader, asked for a late step first, gives the same batch
    again = data.LatentShards(tmp_path / "c", seed=3, cfg=CFG)
    assert numbers(again.global_batch(5, b)) == seen[5]
    assert numbers(data.LatentShards(tmp_path / "c", seed=4).global_batch(5, b)) != seen[5]
    ds.close()


def test_caption_dropout_on_streamed_bf16_text(tmp_path):
    bucketed_cache(tmp_path / "c")
    ds = data.LatentShards(tmp_path / "c", caption_dropout=0.5, cfg=CFG)
    batch = ds.global_batch(0, 8)
    dropped = ds.dropped(0, 8)
    assert 0 < dropped.sum() < 8
    assert not batch["txt"][dropped].astype(np.float32).any()  # the cached empty caption: zeros
    assert batch["txt"][~dropped].astype(np.float32).any(axis=(1, 2)).all()


def test_cache_made_before_buckets_still_loads(tmp_path):
    """No cache.json, fp32 text, every shard one shape (what minflux cache wrote before): the *.safetensors load."""
    folder = tmp_path / "old"
    folder.mkdir()
    parts = [samples(0, 3, 4), samples(3, 2, 4)]
    for i, part in enumerate(parts):
        save_file(
            {**part, "txt": part["txt"].astype(np.float32)}, folder / f"shard-{i:05d}.safetensors"
        )
    ds = data.LatentShards(folder, cfg=CFG)
    assert len(ds) == 5 and ds.meta == {}
    batch = ds.global_batch(0, 5)
    assert sorted(numbers(batch)) == list(range(5)) and batch["txt"].dtype == np.float32


def test_reading_touches_only_the_rows_asked_for(tmp_path, monkeypatch):
    """Streaming: a batch reads its rows (os.preadv), never a whole shard."""
    import os

    bucketed_cache(tmp_path / "c", sizes=((40, 4),))
    ds = data.LatentShards(tmp_path / "c", cfg=CFG)
    read = []
    real = os.preadv

    def counting(fd, buffers, offset):
        read.append(sum(len(b) for b in buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting)
    ds.global_batch(0, 2)
    row = sum(np.prod(s) * (2 if k == "txt" else 4) for k, s in ds.group_shapes(0).items())
    assert sum(read) == 2 * row


def test_bad_caches_are_named_in_one_line(tmp_path):
    bucketed_cache(tmp_path / "c")
    shard = tmp_path / "c" / "shard-00001.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-100])
    with pytest.raises(CheckpointError, match=f"^{shard}: truncated"):
        data.LatentShards(tmp_path / "c")
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"^{shard}: listed in .*cache.json but missing"):
        data.LatentShards(tmp_path / "c")
    shard.write_bytes(whole)
    (tmp_path / "c" / data.META).write_text("{not json")
    with pytest.raises(CheckpointError, match="cache.json: unreadable"):
        data.LatentShards(tmp_path / "c")
    # pairs: more references than the model takes; references the model cannot read
    bucketed_cache(tmp_path / "refs", sizes=((2, 4),), refs=2)
    with pytest.raises(CheckpointError, match="pairs of 2 references; the model takes at most 1"):
        data.LatentShards(tmp_path / "refs", cfg=configs.get("flux1-tiny"))  # Kontext: one
    wide = dataclasses.replace(CFG, in_channels=64)
    with pytest.raises(
        CheckpointError, match=r"do not fit the model: img \(16, 48\) \(expected \('L', 64\)\); ref"
    ):
        data.LatentShards(tmp_path / "refs", cfg=wide)
    # a shard whose tensors differ from the first's (a reference where the first has none)
    mixed = tmp_path / "mixed"
    bucketed_cache(mixed, sizes=((2, 4), (2, 4)))
    write(mixed / "shard-00001.safetensors", samples(2, 2, 4, refs=1))
    with pytest.raises(
        CheckpointError, match="shard-00001.safetensors: per-sample shapes .* differ"
    ):
        data.LatentShards(mixed)
