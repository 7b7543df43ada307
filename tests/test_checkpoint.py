"""safetensors IO: torch <-> JAX round trips bit for bit, every malformed checkpoint fails loudly (naming the
file and the key) in both frameworks, and the `minflux convert` CLI end to end."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import weakref

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import minflux_jax as mj
import minflux_torch as mt
from minflux import checkpoint, configs
from minflux.checkpoint import Checkpoint, CheckpointError
from minflux_cli import main as cli
from minflux_jax.load import state_dict as jax_state_dict
from minflux_torch.load import to_numpy
from parity import transformer, weights

TINY = ["flux1-tiny", "flux2-tiny"]
LAYOUTS = checkpoint.LAYOUTS


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of an array, so comparisons are bitwise (bf16 as uint16)."""
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (k, a[k].dtype, b[k].dtype)
        assert np.array_equal(bits(a[k]), bits(b[k])), k


def read_all(path) -> dict[str, np.ndarray]:
    with Checkpoint(path) as ckpt:
        return {k: ckpt.get(k) for k in ckpt.meta}


def raw_keys(path) -> set[str]:
    return set(checkpoint.read_header(path))


def torch_state(model) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in model.state_dict().items()}


def convert(*args) -> int:
    return cli.main(["convert", *map(str, args), "--no-progress"])


def no_temp_files(directory) -> bool:
    return not [p for p in os.listdir(directory) if ".tmp" in p]


@pytest.fixture(scope="module", params=TINY)
def tiny(request, tmp_path_factory):
    """(preset, bf16 torch model, {layout: file written by save_model})."""
    name = request.param
    d = tmp_path_factory.mktemp(name)
    model = mt.build_model(name, seed=5, dtype=torch.bfloat16)
    files = {layout: d / f"{layout}.safetensors" for layout in LAYOUTS}
    for layout, path in files.items():
        mt.save_model(model, path, layout=layout)
    return name, model, files


# ---------------------------------------------------------------------------------------------
# torch <-> JAX
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize(
    ("tdtype", "jdtype"), [(torch.bfloat16, jnp.bfloat16), (torch.float32, jnp.float32)]
)
@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_torch_jax_torch_is_bitwise(name, tdtype, jdtype, layout, tmp_path):
    model = mt.build_model(name, seed=3, dtype=tdtype)
    mt.save_model(model, tmp_path / "torch.safetensors", layout=layout)
    jmodel = mj.load_model(name, tmp_path / "torch.safetensors", dtype=jdtype)
    mj.save_model(jmodel, tmp_path / "jax.safetensors", layout=layout)
    assert_same_tensors(
        read_all(tmp_path / "jax.safetensors"), read_all(tmp_path / "torch.safetensors")
    )
    back = mt.load_model(name, tmp_path / "jax.safetensors", dtype=tdtype)
    assert_same_tensors(torch_state(back), torch_state(model))


@pytest.mark.parametrize("name", TINY)
def test_jax_torch_jax_is_bitwise(name, tmp_path):
    jmodel = mj.build_model(name, seed=4, dtype=jnp.bfloat16)
    mj.save_model(jmodel, tmp_path / "jax.safetensors")
    mt.save_model(mt.load_model(name, tmp_path / "jax.safetensors"), tmp_path / "torch.safetensors")
    back = mj.load_model(name, tmp_path / "torch.safetensors", dtype=jnp.bfloat16)
    assert_same_tensors(jax_state_dict(back), jax_state_dict(jmodel))


# ---------------------------------------------------------------------------------------------
# Malformed checkpoints: CheckpointError naming the file (and the key) in both frameworks
# ---------------------------------------------------------------------------------------------

NAME = "flux2-tiny"  # depth 2, depth_single_blocks 2, hidden 64


def _good() -> dict[str, np.ndarray]:
    return torch_state(mt.build_model(NAME, seed=6, dtype=torch.bfloat16))


def _save(path, tensors) -> None:
    checkpoint.write_safetensors(
        path,
        {k: (checkpoint.st_dtype(v.dtype), v.shape) for k, v in tensors.items()},
        tensors.__getitem__,
    )


def _with(tensors, key, value):
    return {**tensors, key: value}


def _poison(tensors, key, value):
    arr = tensors[key].copy()
    arr.reshape(-1)[7] = value
    return _with(tensors, key, arr)


def make_bad(case: str, d) -> tuple[object, list[str]]:
    """A malformed checkpoint under directory `d`, and the fragments its error message must contain."""
    t, path = _good(), d / "model.safetensors"
    if case == "missing key":
        del t["double_blocks.1.img_attn.proj.weight"]
        _save(path, t)
        return path, ["missing", "double_blocks.1.img_attn.proj.weight"]
    if case == "unexpected key":  # no table entry at all
        _save(path, _with(t, "double_blocks.0.img_attn.extra.weight", t["img_in.weight"]))
        return path, ["unexpected", "double_blocks.0.img_attn.extra.weight"]
    if case == "unexpected block":  # a known module, but a block the model does not have
        _save(path, _with(t, "single_blocks.2.linear2.weight", t["single_blocks.1.linear2.weight"]))
        return path, ["unexpected", "single_blocks.2.linear2.weight"]
    if case == "wrong shape":
        _save(path, _with(t, "img_in.weight", np.ascontiguousarray(t["img_in.weight"].T)))
        return path, ["img_in.weight", "expected (64, 128)", "found (128, 64)"]
    if case == "wrong shape (diffusers)":  # to_k missing: the merged qkv comes out short
        diff = d / "diffusers.safetensors"
        mt.save_model(mt.build_model(NAME, dtype=torch.bfloat16), diff, layout="diffusers")
        t = read_all(diff)
        del t["transformer_blocks.0.attn.to_k.weight"]
        _save(path, t)
        return path, [
            "double_blocks.0.img_attn.qkv.weight",
            "expected (192, 64)",
            "found (128, 64)",
        ]
    if case == "integer dtype":
        _save(
            path, _with(t, "txt_in.weight", t["txt_in.weight"].astype(np.float32).astype(np.int32))
        )
        return path, ["txt_in.weight", "I32"]
    if case == "truncated":
        _save(path, t)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)
        return path, ["truncated", repr(list(t)[-1])]
    if case == "corrupt header":
        _save(path, t)
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(b"\x00{not json")
        return path, ["corrupt header"]
    if case == "corrupt header length":
        _save(path, t)
        with open(path, "r+b") as f:
            f.write(struct.pack("<Q", 1 << 40))
        return path, ["corrupt header"]
    if case == "inconsistent header":  # valid JSON whose offsets do not match the shape
        _save(path, t)
        data = path.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = data[8 : 8 + n].replace(b'"shape":[64,128]', b'"shape":[64,127]', 1)
        path.write_bytes(data[:8] + header + data[8 + n :])
        return path, ["corrupt header", "img_in.weight"]
    if case == "NaN":
        _save(path, _poison(t, "single_blocks.1.linear1.weight", np.nan))
        return path, ["single_blocks.1.linear1.weight", "NaN"]
    if case == "Inf":
        _save(path, _poison(t, "double_blocks.0.txt_mlp.2.weight", -np.inf))
        return path, ["double_blocks.0.txt_mlp.2.weight", "Inf"]
    if case == "unknown layout":
        _save(path, {"net." + k: v for k, v in t.items()})
        return path, ["unknown layout"]
    if case == "duplicate key in shards":
        (d / "shards").mkdir()
        _save(d / "shards" / "a.safetensors", t)
        _save(d / "shards" / "b.safetensors", {"img_in.weight": t["img_in.weight"]})
        return d / "shards", ["img_in.weight", "also in"]
    if case == "empty directory":
        (d / "empty").mkdir()
        return d / "empty", ["no *.safetensors"]
    if case == "nonexistent path":
        return d / "nope.safetensors", ["no such file"]
    if case in (
        "offsets shifted by 4",
        "two tensors on the same bytes",
        "repeated key",
        "string offset",
        "float offset",
        "deep nesting",
        "trailing bytes",
    ):
        _save(path, t)
        n, header, data = _split(path.read_bytes())
        pairs = [(k, v) for k, v in header.items()]
        key, info = pairs[3]
        a, b = info["data_offsets"]
        if case == "offsets shifted by 4":
            pairs[3] = (key, {**info, "data_offsets": [a + 4, b + 4]})
        elif (
            case == "two tensors on the same bytes"
        ):  # same size, same offsets: the next one's bytes unread
            size = lambda v: v["data_offsets"][1] - v["data_offsets"][0]  # noqa: E731
            j, k = next(
                (j, k)
                for j in range(len(pairs))
                for k in range(j + 1, len(pairs))
                if size(pairs[j][1]) == size(pairs[k][1])
            )
            key = [pairs[k][0], "overlaps", pairs[j][0]]
            pairs[k] = (key[0], {**pairs[k][1], "data_offsets": pairs[j][1]["data_offsets"]})
        elif case == "repeated key":
            pairs.append((key, info))
        elif case == "string offset":
            pairs[3] = (key, {**info, "data_offsets": [str(a), b]})
        elif case == "float offset":
            pairs[3] = (key, {**info, "data_offsets": [float(a), b]})
        elif case == "deep nesting":
            pairs[3] = (key, {**info, "shape": json.loads("[" * 50 + "1" + "]" * 50)})
        path.write_bytes(_join(pairs, data + (b"\0" * 8 if case == "trailing bytes" else b"")))
        return path, {
            "trailing bytes": ["bytes after the last tensor"],
            "deep nesting": ["nested"],
            "repeated key": ["repeated key", key],
        }.get(case, key if isinstance(key, list) else [key])
    if case == "pickle":
        torch.save({k: torch.from_numpy(v.astype(np.float32)) for k, v in t.items()}, path)
        return path, ["a PyTorch pickle", "not safetensors"]
    if case == "directory in shards":
        (d / "shards").mkdir()
        _save(d / "shards" / "a.safetensors", t)
        (d / "shards" / "x.safetensors").mkdir()
        return d / "shards", ["x.safetensors", "not a file"]
    if case in ("index names a missing shard", "index places a key in the wrong shard"):
        index = _sharded(t, d / "shards")
        weight_map = json.loads(index.read_text())["weight_map"]
        if case == "index names a missing shard":
            (d / "shards" / "model-00002-of-00003.safetensors").unlink()
            return d / "shards", ["model-00002-of-00003.safetensors", "missing", index.name]
        key = next(k for k, f in weight_map.items() if f.startswith("model-00001"))
        weight_map[key] = "model-00003-of-00003.safetensors"
        index.write_text(json.dumps({"weight_map": weight_map}))
        return d / "shards", ["model-00003-of-00003.safetensors", key, index.name]
    raise ValueError(case)


def _split(blob: bytes) -> tuple[int, dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return n, json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(pairs, data: bytes) -> bytes:
    """A safetensors file from header (key, value) pairs, which may repeat keys."""
    blob = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _sharded(
    tensors: dict[str, np.ndarray], directory, parts: int = 3, prefix: str = "model"
) -> object:
    """`tensors` in `parts` shards with a transformers-style index; returns the index path."""
    directory.mkdir(exist_ok=True)
    keys, weight_map = list(tensors), {}
    for i in range(parts):
        name = f"{prefix}-{i + 1:05d}-of-{parts:05d}.safetensors"
        _save(directory / name, {k: tensors[k] for k in keys[i::parts]})
        weight_map.update(dict.fromkeys(keys[i::parts], name))
    index = directory / f"{prefix}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


BAD = [
    "missing key",
    "unexpected key",
    "unexpected block",
    "wrong shape",
    "wrong shape (diffusers)",
    "integer dtype",
    "truncated",
    "corrupt header",
    "corrupt header length",
    "inconsistent header",
    "NaN",
    "Inf",
    "unknown layout",
    "duplicate key in shards",
    "empty directory",
    "nonexistent path",
    "offsets shifted by 4",
    "two tensors on the same bytes",
    "repeated key",
    "string offset",
    "float offset",
    "deep nesting",
    "trailing bytes",
    "pickle",
    "directory in shards",
    "index names a missing shard",
    "index places a key in the wrong shard",
]
LOADERS = {"torch": mt.load_model, "jax": mj.load_model}


@pytest.mark.parametrize("framework", LOADERS)
@pytest.mark.parametrize("case", BAD)
def test_malformed_checkpoint_raises(case, framework, tmp_path):
    path, fragments = make_bad(case, tmp_path)
    with pytest.raises(CheckpointError) as e:
        LOADERS[framework](NAME, path)
    msg = str(e.value)
    for fragment in [str(path), *fragments]:
        assert fragment in msg, (fragment, msg)


def test_good_checkpoint_loads(tmp_path):
    """The control for the malformed cases: the unmodified tensors load in both frameworks."""
    t = _good()
    _save(tmp_path / "model.safetensors", t)
    assert_same_tensors(torch_state(mt.load_model(NAME, tmp_path / "model.safetensors")), t)
    assert_same_tensors(jax_state_dict(mj.load_model(NAME, tmp_path / "model.safetensors")), t)


# ---------------------------------------------------------------------------------------------
# Streaming: what keeps a 64 GB conversion near one tensor of memory
# ---------------------------------------------------------------------------------------------


def test_write_holds_one_tensor_at_a_time(tmp_path):
    """Each tensor is freed once written, before the next one is produced."""
    alive = []

    def produce(key):
        assert all(ref() is None for ref in alive), (
            f"a previous tensor is still alive when producing {key}"
        )
        arr = np.full((64, 32), float(len(alive)), np.float32)
        alive.append(weakref.ref(arr))
        return arr

    specs = {f"t{i}": ("F32", (64, 32)) for i in range(4)}
    checkpoint.write_safetensors(tmp_path / "x.safetensors", specs, produce)
    assert len(alive) == 4 and read_all(tmp_path / "x.safetensors")["t3"][0, 0] == 3.0


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_rows_reads_without_a_memory_map(tiny):
    """Mapped pages stay resident (and count in RSS) until unmapped: a 64 GB file would look like 64 GB."""
    _, _, files = tiny
    with Checkpoint(files["bfl"]) as ckpt:
        key = "double_blocks.0.img_attn.qkv.weight"
        part = ckpt.rows(key, 3, 9)
        assert np.array_equal(bits(part), bits(ckpt.get(key)[3:9]))
        with open("/proc/self/maps") as f:
            assert str(files["bfl"]) not in f.read()


# ---------------------------------------------------------------------------------------------
# `minflux convert`
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src", LAYOUTS)
@pytest.mark.parametrize("dst", LAYOUTS)
def test_convert_every_direction(tiny, src, dst, tmp_path):
    name, model, files = tiny
    out = tmp_path / "out.safetensors"
    assert convert(files[src], out, "--to", dst) == 0
    assert raw_keys(out) == raw_keys(files[dst])  # prefix and all
    assert_same_tensors(read_all(out), read_all(files[dst]))
    assert_same_tensors(torch_state(mt.load_model(name, out)), torch_state(model))


@pytest.mark.parametrize(
    ("src", "dst"), [("bfl", "diffusers"), ("bfl-prefixed", "diffusers"), ("diffusers", "bfl")]
)
def test_convert_default_target_is_the_other_layout(tiny, src, dst, tmp_path):
    _, _, files = tiny
    assert convert(files[src], tmp_path / "out.safetensors") == 0
    assert raw_keys(tmp_path / "out.safetensors") == raw_keys(files[dst])


def test_convert_round_trip_is_bitwise(tiny, tmp_path):
    _, _, files = tiny
    assert convert(files["bfl"], tmp_path / "d.safetensors", "--to", "diffusers") == 0
    assert convert(tmp_path / "d.safetensors", tmp_path / "b.safetensors", "--to", "bfl") == 0
    assert_same_tensors(read_all(tmp_path / "b.safetensors"), read_all(files["bfl"]))


@pytest.mark.parametrize(("flag", "tdtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_convert_casts_like_torch(flag, tdtype, tmp_path):
    """fp32 -> bf16 / fp16 rounds exactly as torch's .to() does (round to nearest even)."""
    model = mt.build_model("flux1-tiny", seed=7, dtype=torch.float32)
    mt.save_model(model, tmp_path / "fp32.safetensors")
    assert (
        convert(
            tmp_path / "fp32.safetensors",
            tmp_path / "out.safetensors",
            "--to",
            "bfl",
            "--dtype",
            flag,
        )
        == 0
    )
    assert_same_tensors(read_all(tmp_path / "out.safetensors"), torch_state(model.to(tdtype)))


def test_convert_widening_cast_is_exact(tiny, tmp_path):
    _, _, files = tiny
    assert (
        convert(files["bfl"], tmp_path / "fp32.safetensors", "--to", "diffusers", "--dtype", "fp32")
        == 0
    )
    assert {m[0] for m in Checkpoint(tmp_path / "fp32.safetensors").meta.values()} == {"F32"}
    assert (
        convert(tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors", "--dtype", "bf16")
        == 0
    )
    assert_same_tensors(read_all(tmp_path / "bf16.safetensors"), read_all(files["bfl"]))


@pytest.mark.parametrize(
    ("src", "dst"), [("bfl", "diffusers"), ("diffusers", "bfl"), ("bfl-prefixed", "bfl")]
)
def test_convert_sharded_directory(tiny, src, dst, tmp_path):
    _, _, files = tiny
    header = checkpoint.read_header(files[src])
    keys = list(header)
    shards = tmp_path / "shards"
    shards.mkdir()
    ckpt = Checkpoint(files[src])
    weight_map = {}
    for i in range(3):
        part = keys[i::3]
        specs = {k: (header[k]["dtype"], tuple(header[k]["shape"])) for k in part}
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        checkpoint.write_safetensors(
            shards / name, specs, lambda k: ckpt.get(k.removeprefix(ckpt.prefix))
        )
        weight_map.update(dict.fromkeys(part, name))
    (shards / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    assert convert(shards, tmp_path / "out.safetensors", "--to", dst) == 0
    assert raw_keys(tmp_path / "out.safetensors") == raw_keys(files[dst])
    assert_same_tensors(read_all(tmp_path / "out.safetensors"), read_all(files[dst]))


AUTOENCODERS = [
    n
    for n, c in configs.PRESETS.items()
    if getattr(c, "family", "").startswith("ae") and "tiny" in n
]


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_convert_autoencoder(name, tmp_path):
    """The family comes from the keys, so autoencoder files convert through the same command."""
    model = mt.build_model(name, seed=8, dtype=torch.bfloat16)
    for layout in ("bfl", "diffusers"):
        mt.save_model(model, tmp_path / f"{layout}.safetensors", layout=layout)
    assert convert(tmp_path / "bfl.safetensors", tmp_path / "d.safetensors") == 0
    assert_same_tensors(
        read_all(tmp_path / "d.safetensors"), read_all(tmp_path / "diffusers.safetensors")
    )
    assert convert(tmp_path / "d.safetensors", tmp_path / "b.safetensors") == 0
    assert_same_tensors(
        read_all(tmp_path / "b.safetensors"), read_all(tmp_path / "bfl.safetensors")
    )


def test_convert_shows_progress(tiny, tmp_path, capsys, monkeypatch):
    _, _, files = tiny
    # on a terminal (a log file gets no bar: its carriage-return lines would precede an error line)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli.main(["convert", str(files["bfl"]), str(tmp_path / "out.safetensors")]) == 0
    out, err = capsys.readouterr()
    assert "writing out.safetensors" in err and "100%" in err
    assert "bfl -> diffusers" in out
    monkeypatch.undo()
    assert cli.main(["convert", str(files["bfl"]), str(tmp_path / "log.safetensors")]) == 0
    assert capsys.readouterr().err == ""


def test_convert_unexpected_key_fails_cleanly(tmp_path, capsys):
    t = _good()
    t["double_blocks.0.img_attn.extra.weight"] = t["img_in.weight"]
    (tmp_path / "in").mkdir()
    _save(tmp_path / "in" / "a.safetensors", {k: v for k, v in t.items() if "extra" not in k})
    _save(tmp_path / "in" / "b.safetensors", {k: v for k, v in t.items() if "extra" in k})
    out = tmp_path / "out.safetensors"
    assert convert(tmp_path / "in", out) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("minflux convert: error: ")
    assert (
        str(tmp_path / "in" / "b.safetensors") in err
        and "double_blocks.0.img_attn.extra.weight" in err
    )
    assert not out.exists() and no_temp_files(tmp_path)


@pytest.mark.parametrize(
    "case", ["truncated", "corrupt header", "unknown layout", "empty directory", "nonexistent path"]
)
def test_convert_bad_input_fails_cleanly(case, tmp_path, capsys):
    path, fragments = make_bad(case, tmp_path)
    out = tmp_path / "out.safetensors"
    assert convert(path, out) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(f in err for f in [str(path), *fragments]), (
        err
    )
    assert not out.exists() and no_temp_files(tmp_path)


def test_convert_rejects_a_fused_tensor_too_short_to_split(tmp_path, capsys):
    t = _good()
    t["double_blocks.1.txt_attn.qkv.weight"] = t["double_blocks.1.txt_attn.qkv.weight"][
        :100
    ]  # needs 3 x 64
    _save(tmp_path / "in.safetensors", t)
    assert convert(tmp_path / "in.safetensors", tmp_path / "out.safetensors") == 2
    err = capsys.readouterr().err
    assert "double_blocks.1.txt_attn.qkv.weight" in err and "too small to split" in err
    assert not (tmp_path / "out.safetensors").exists() and no_temp_files(tmp_path)


def test_convert_failure_midway_keeps_the_old_output(tiny, tmp_path, monkeypatch, capsys):
    """A read that fails after part of the output is written leaves the previous file untouched, no temp file."""
    _, _, files = tiny
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the previous conversion")
    calls, rows = [], Checkpoint.rows

    def failing_rows(self, key, start, stop):
        calls.append(key)
        if len(calls) == 10:
            raise CheckpointError(f"{self.files[key]}: simulated read error in {key!r}")
        return rows(self, key, start, stop)

    monkeypatch.setattr(Checkpoint, "rows", failing_rows)
    assert convert(files["bfl"], out, "--to", "diffusers") == 2
    assert "simulated read error" in capsys.readouterr().err and len(calls) == 10
    assert out.read_bytes() == b"the previous conversion" and no_temp_files(tmp_path)


def test_convert_refuses_to_overwrite_its_input(tiny, tmp_path, capsys):
    _, _, files = tiny
    before = files["bfl"].read_bytes()
    assert convert(files["bfl"], files["bfl"]) == 2
    assert "is the source file" in capsys.readouterr().err and files["bfl"].read_bytes() == before
    assert convert(files["bfl"], tmp_path) == 2
    assert "is a directory" in capsys.readouterr().err


def test_convert_cli_exit_code_and_one_line_error(tmp_path):
    """The installed entry point, in a subprocess: exit code 2 and a single line on stderr, no traceback."""
    missing = tmp_path / "missing.safetensors"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "minflux_cli",
            "convert",
            str(missing),
            str(tmp_path / "o.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"minflux convert: error: {missing}: no such file or directory"
    ]


def test_convert_is_framework_free():
    """`minflux convert` needs neither torch nor jax: the core imports neither."""
    code = (
        "import sys, minflux.convert, minflux.checkpoint, minflux.keymaps; "
        "print(sorted(m for m in ('torch', 'jax', 'flax') if m in sys.modules))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert r.stdout.strip() == "[]"


def test_configs_still_resolve():
    assert configs.resolve(NAME).hidden_size == 64  # the malformed cases above assume these dims
    assert configs.resolve(NAME).depth == 2 and configs.resolve(NAME).depth_single_blocks == 2


# ---------------------------------------------------------------------------------------------
# fp8: plain and scaled, against torch's float8 casts and safetensors' reader
# ---------------------------------------------------------------------------------------------

FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MODELS = ["flux1-tiny", "flux2-tiny", "flux1-ae-tiny", "flux2-ae-tiny"]


def _loaded(framework: str, name, path, **kw) -> dict[str, np.ndarray]:
    """fp32 BFL-layout tensors of a model loaded by `framework`."""
    if framework == "torch":
        return torch_state(mt.load_model(name, path, dtype=torch.float32, **kw))
    return jax_state_dict(mj.load_model(name, path, dtype=jnp.float32, **kw))


def _fp32_state(name, seed=11) -> dict[str, torch.Tensor]:
    return {
        k: v.contiguous()
        for k, v in mt.build_model(name, seed=seed, dtype=torch.float32).state_dict().items()
    }


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    ("dtype", "prefix"), [("F8_E4M3", ""), ("F8_E5M2", "model.diffusion_model.")]
)
def test_plain_fp8_loads_as_torch_casts_it(name, dtype, prefix, tmp_path):
    """Every float tensor stored as fp8 (by torch, written by safetensors): both frameworks read what
    torch's fp8 -> fp32 cast gives, and the reader's raw fp8 bytes are safe_open's."""
    if prefix and "ae" in name:
        prefix = "vae."
    fp8 = {k: v.to(FP8[dtype]) for k, v in _fp32_state(name).items()}
    path = tmp_path / "fp8.safetensors"
    save_file({prefix + k: v for k, v in fp8.items()}, str(path))
    with (
        safe_open(str(path), "pt") as f,
        Checkpoint(path, "ae" if "ae" in name else "transformer") as ckpt,
    ):
        assert {m[0] for m in ckpt.meta.values()} == {dtype}
        for k in ckpt.meta:
            assert (
                ckpt.get(k).tobytes()
                == f.get_tensor(prefix + k).view(torch.uint8).numpy().tobytes()
            ), k
    want = {k: to_numpy(v.to(torch.float32)) for k, v in fp8.items()}
    for framework in LOADERS:
        assert_same_tensors(_loaded(framework, name, path), want)
    bf16 = torch_state(
        mt.load_model(name, path, dtype=torch.bfloat16)
    )  # every fp8 value is exact in bf16
    assert_same_tensors(bf16, {k: to_numpy(v.to(torch.bfloat16)) for k, v in fp8.items()})


def _scaled(state: dict[str, torch.Tensor], convention: str) -> tuple[dict, dict]:
    """(file tensors, expected fp32 tensors) of a scaled-fp8 export made with torch in one convention:
    "comfy-legacy": X.scale_weight 0-d + X.scale_input + the `scaled_fp8` marker (ComfyUI fp8_scaled files);
    "per-row": X.weight_scale (O, 1) + X.input_scale (compressed-tensors / vLLM channel-wise);
    "per-tensor": X.weight_scale (1,) (NVIDIA ModelOpt, ComfyUI's quantized format)."""
    out, want = {}, {}
    if convention == "comfy-legacy":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    for k, w in state.items():
        if not (k.endswith(".weight") and w.ndim == 2):
            out[k] = want[k] = w
            continue
        layer = k.removesuffix(".weight")
        amax = w.abs().amax(dim=1, keepdim=True) if convention == "per-row" else w.abs().amax()
        scale = (amax / 448).clamp(min=1e-12).float()
        q = (w / scale).to(torch.float8_e4m3fn)
        out[k], want[k] = q, q.float() * scale
        if convention == "comfy-legacy":
            out[layer + ".scale_weight"], out[layer + ".scale_input"] = (
                scale.reshape(()),
                torch.tensor(1.0),
            )
        else:
            out[layer + ".weight_scale"] = (
                scale.reshape(-1, 1) if convention == "per-row" else scale.reshape(1)
            )
            out[layer + ".input_scale"] = torch.tensor([0.5])
    return out, want


@pytest.mark.parametrize("name", ["flux1-tiny", "flux2-tiny"])
@pytest.mark.parametrize("convention", ["comfy-legacy", "per-row", "per-tensor"])
def test_scaled_fp8_dequantizes_on_load(name, convention, tmp_path):
    """weight = fp8 * scale, as torch computes it, in both frameworks; activation scales and markers ignored."""
    tensors, want = _scaled(_fp32_state(name), convention)
    path = tmp_path / "scaled.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in tensors.items()}, str(path))
    for framework in LOADERS:
        assert_same_tensors(
            _loaded(framework, name, path), {k: to_numpy(v) for k, v in want.items()}
        )
    assert (
        "F8_E4M3"
        in checkpoint.BflReader(
            path, {k: tuple(v.shape) for k, v in want.items()}, configs.resolve(name)
        ).describe()
    )


def test_scaled_fp8_with_a_block_scale_is_refused(tmp_path):
    tensors, _ = _scaled(_fp32_state("flux2-tiny"), "per-tensor")
    tensors["img_in.weight_scale"] = torch.ones(2, 2)  # block-wise (DeepSeek-style): not read
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"x.safetensors: scale 'img_in.weight_scale' has shape \(2, 2\)"
    ):
        mt.load_model("flux2-tiny", tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    ("name", "layout"),
    [("flux1-tiny", "bfl"), ("flux2-tiny", "diffusers"), ("flux2-tiny", "bfl-prefixed")],
)
def test_convert_to_fp8_round_trip(name, layout, tmp_path):
    """`convert --dtype fp8`: e4m3fn linear weights with per-tensor F32 `weight_scale` (scale = amax / 448), the
    fp8 values torch's cast gives, ComfyUI's `_quantization_metadata`; loads back as fp8 * scale in both."""
    state = _fp32_state(name)
    model = mt.build_model(name, seed=11, dtype=torch.float32)
    mt.save_model(model, tmp_path / "fp32.safetensors")
    mt.save_model(
        model, tmp_path / "ref.safetensors", layout=layout
    )  # the fp32 tensors in the output layout
    with safe_open(str(tmp_path / "ref.safetensors"), "pt") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    out = tmp_path / "fp8.safetensors"
    assert convert(tmp_path / "fp32.safetensors", out, "--to", layout, "--dtype", "fp8") == 0
    prefix = "model.diffusion_model." if layout == "bfl-prefixed" else ""
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    layers = json.loads(meta["_quantization_metadata"])["layers"]
    assert all(v == {"format": "float8_e4m3fn"} for v in layers.values())
    assert sorted(layers) == sorted(
        k.removeprefix(prefix).removesuffix(".weight")
        for k, v in ref.items()
        if k.endswith(".weight") and v.ndim == 2
    )
    for layer in layers:  # scale = amax / 448 in fp32; the fp8 values are torch's cast of w / scale
        w, q, s = (
            ref[prefix + layer + ".weight"],
            stored[prefix + layer + ".weight"],
            stored[prefix + layer + ".weight_scale"],
        )
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == ()
        assert s.item() == np.float32(w.abs().max().item() / 448)
        assert torch.equal(
            q.view(torch.uint8), (w / s).to(torch.float8_e4m3fn).view(torch.uint8)
        ), layer
    for k in set(stored) - {
        prefix + layer + suffix for layer in layers for suffix in (".weight", ".weight_scale")
    }:
        assert torch.equal(stored[k], ref[k]), k  # the rest keeps its dtype and value
    cfg = configs.resolve(
        name
    )  # what `minflux parity --checkpoint FP8FILE --verify` reads and reports
    source = weights.CheckpointWeights(
        out, cfg, transformer.TorchSide(cfg, "fp32", "meta").expected, verify=True
    )
    assert f"F8_E4M3 x{len(layers)} (scaled by weight_scale)" in source.description
    loaded = {framework: _loaded(framework, name, out, verify=True) for framework in LOADERS}
    assert_same_tensors(loaded["torch"], loaded["jax"])
    if layout != "diffusers":  # one BFL tensor per stored one: loads exactly as torch dequantizes
        want = {
            k: to_numpy(
                (w / (s := torch.tensor(np.float32(w.abs().max().item() / 448))))
                .to(torch.float8_e4m3fn)
                .float()
                * s
            )
            if k.endswith(".weight") and w.ndim == 2
            else to_numpy(w)
            for k, w in state.items()
        }
        assert_same_tensors(loaded["torch"], want)
        assert (
            convert(out, tmp_path / "back.safetensors", "--to", "bfl") == 0
        )  # dequantized on the way: F32
        assert_same_tensors(read_all(tmp_path / "back.safetensors"), want)
    for k, v in loaded[
        "torch"
    ].items():  # fp8's 3 mantissa bits: within 1/16 of each value's magnitude
        assert np.all(np.abs(v - to_numpy(state[k])) <= np.abs(to_numpy(state[k])) / 16 + 1e-3), k


# ---------------------------------------------------------------------------------------------
# All-in-one bundles
# ---------------------------------------------------------------------------------------------

BUNDLES = [
    ("flux1-tiny", "flux1-ae-tiny", "model.diffusion_model.", "vae.", "bfl"),
    ("flux1-tiny", "flux1-ae-tiny", "diffusion_model.", "first_stage_model.", "diffusers"),
    ("flux2-tiny", "flux2-ae-tiny", "transformer.", "vae.", "diffusers"),
    ("flux2-tiny", "flux2-ae-tiny", "model.diffusion_model.", "first_stage_model.", "bfl"),
]


def _bundle(d, name, ae_name, t_prefix, ae_prefix, layout) -> tuple[object, dict, dict]:
    """A bundle file: transformer, autoencoder and text-encoder tensors; returns (path, transformer, ae) states."""
    model, ae = mt.build_model(name, seed=12), mt.build_model(ae_name, seed=13)
    mt.save_model(model, d / "t.safetensors", layout=layout)
    mt.save_model(ae, d / "ae.safetensors", layout=layout)
    tensors = {t_prefix + k: v for k, v in read_all(d / "t.safetensors").items()}
    tensors |= {ae_prefix + k: v for k, v in read_all(d / "ae.safetensors").items()}
    rng = np.random.default_rng(0)
    tensors |= {
        f"text_encoders.t5xxl.transformer.encoder.block.{i}.layer.0.SelfAttention.q.weight": rng.standard_normal(
            (8, 8), np.float32
        )
        for i in range(3)
    }
    _save(d / "bundle.safetensors", tensors)
    return d / "bundle.safetensors", torch_state(model), torch_state(ae)


@pytest.mark.parametrize(("name", "ae_name", "t_prefix", "ae_prefix", "layout"), BUNDLES)
def test_bundle_loads_each_component(name, ae_name, t_prefix, ae_prefix, layout, tmp_path, caplog):
    path, want_t, want_ae = _bundle(tmp_path, name, ae_name, t_prefix, ae_prefix, layout)
    for framework in LOADERS:
        assert_same_tensors(_loaded(framework, name, path), want_t)
        assert_same_tensors(_loaded(framework, ae_name, path), want_ae)
    notices = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    n_t, n_ae = (
        len(raw_keys(tmp_path / "t.safetensors")),
        len(raw_keys(tmp_path / "ae.safetensors")),
    )
    assert any(
        f"read the transformer under {t_prefix!r}; ignored {n_ae + 3} other" in m for m in notices
    ), notices
    assert any(
        f"read the autoencoder under {ae_prefix!r}; ignored {n_t + 3} other" in m for m in notices
    ), notices


@pytest.mark.parametrize("bundle", BUNDLES[1:3])
def test_convert_extracts_one_component(bundle, tmp_path, capsys):
    name, ae_name, _, _, layout = bundle
    path, _, _ = _bundle(tmp_path, *bundle)
    assert convert(path, tmp_path / "out.safetensors") == 2  # two components: which one?
    assert "several components" in capsys.readouterr().err
    for what, single in (("transformer", "t"), ("ae", "ae")):
        out = tmp_path / f"{what}.safetensors"
        assert convert(path, out, "--extract", what, "--to", layout) == 0
        assert_same_tensors(read_all(out), read_all(tmp_path / f"{single}.safetensors"))


# ---------------------------------------------------------------------------------------------
# Shard indexes: diffusers' own save_pretrained
# ---------------------------------------------------------------------------------------------


def _diffusers_sharded(name, d) -> tuple[object, dict]:
    """`name`'s seeded model in diffusers' own classes, written by diffusers' save_pretrained in several
    shards with an index; returns (directory, our model's state)."""
    from test_autoencoder import diffusers_model as diffusers_vae
    from test_reference import diffusers_model as diffusers_transformer

    cfg = configs.resolve(name)
    model = mt.build_model(name, seed=14)
    mt.save_model(model, d / "single.safetensors", layout="diffusers")
    if cfg.family.startswith("ae"):
        dm = diffusers_vae(cfg, d / "single.safetensors")
    else:
        dm = diffusers_transformer(cfg)
        dm.load_state_dict(
            {k: torch.from_numpy(v) for k, v in read_all(d / "single.safetensors").items()}
        )
    dm.save_pretrained(d / "diffusers", max_shard_size="200KB", safe_serialization=True)
    return d / "diffusers", torch_state(model)


@pytest.mark.parametrize("name", MODELS)
def test_diffusers_sharded_directory_loads(name, tmp_path, caplog):
    directory, want = _diffusers_sharded(name, tmp_path)
    shards = sorted(directory.glob("*.safetensors"))
    (index,) = directory.glob("*.safetensors.index.json")
    assert len(shards) >= 2
    for framework in LOADERS:
        assert_same_tensors(_loaded(framework, name, directory), want)
    # a stale shard beside the indexed ones: ignored, with a notice, instead of a duplicate-key error
    (directory / "diffusion_pytorch_model-00001-of-00099.safetensors").write_bytes(
        shards[0].read_bytes()
    )
    assert_same_tensors(_loaded("torch", name, directory), want)
    assert any(
        "ignored 1 file(s) the index does not name" in r.getMessage() for r in caplog.records
    )
    assert_same_tensors(_loaded("jax", name, index), want)  # the index file itself as the path
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1]}: missing .named by {index.name}"):
        mt.load_model(name, directory)


# ---------------------------------------------------------------------------------------------
# Interrupted writes
# ---------------------------------------------------------------------------------------------

_SLOW_WRITER = """
import sys, time, numpy as np
from minflux import checkpoint
def produce(key):
    if key == "t1":
        print("writing", flush=True)
        time.sleep(60)
    return np.zeros((256, 256), np.float32)
checkpoint.write_safetensors(sys.argv[1], {f"t{i}": ("F32", (256, 256)) for i in range(3)}, produce)
"""


def _interrupted_write(dst, sig) -> int:
    p = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(dst)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert p.stdout.readline().strip() == "writing"  # the temp file holds the header and t0 by now
    assert (dst.parent / f".{dst.name}.tmp-{p.pid}").exists()
    p.send_signal(sig)
    return p.wait(timeout=60)


def test_sigterm_during_a_write_removes_the_temp_file(tmp_path):
    dst = tmp_path / "out.safetensors"
    assert (
        _interrupted_write(dst, signal.SIGTERM) == -signal.SIGTERM
    )  # still dies of SIGTERM, after cleaning up
    assert not dst.exists() and os.listdir(tmp_path) == []


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path, tiny):
    """SIGKILL cannot be caught: the temp file stays until the next write to the same destination."""
    name, model, _ = tiny
    dst = tmp_path / "out.safetensors"
    assert _interrupted_write(dst, signal.SIGKILL) == -signal.SIGKILL
    (left,) = os.listdir(tmp_path)
    assert left.startswith(".out.safetensors.tmp-")
    other = (
        tmp_path / f".other.safetensors.tmp-{os.getpid() + 1}"
    )  # another destination's: not ours to remove
    old_style = (
        tmp_path / f".out.safetensors.tmp{left.rsplit('-', 1)[1]}"
    )  # the earlier naming, dead process
    live = (
        tmp_path / f".out.safetensors.tmp-{os.getppid()}"
    )  # a live process may still be writing it
    for p in (other, old_style, live):
        p.write_bytes(b"partial")
    mt.save_model(model, dst)
    assert sorted(os.listdir(tmp_path)) == sorted([dst.name, other.name, live.name])
    assert_same_tensors(torch_state(mt.load_model(name, dst)), torch_state(model))


# ---------------------------------------------------------------------------------------------
# Digests
# ---------------------------------------------------------------------------------------------


def test_digests_are_sha256_of_the_bytes_safetensors_reads(tiny, tmp_path):
    name, _, files = tiny
    assert convert(files["bfl"], tmp_path / "d.safetensors", "--to", "diffusers") == 0
    for path in (files["bfl"], files["diffusers"], tmp_path / "d.safetensors"):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            for k in f.keys():  # noqa: SIM118
                data = f.get_tensor(k).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                assert meta["sha256:" + k] == hashlib.sha256(data).hexdigest(), (path, k)
    assert convert(files["bfl"], tmp_path / "plain.safetensors", "--no-digests") == 0
    with safe_open(str(tmp_path / "plain.safetensors"), "pt") as f:
        assert not [k for k in f.metadata() if k.startswith("sha256:")]


@pytest.mark.parametrize("framework", LOADERS)
def test_verify_names_the_tensor_whose_bytes_changed(framework, tiny, tmp_path):
    name, model, files = tiny
    path = tmp_path / "model.safetensors"
    path.write_bytes(files["diffusers"].read_bytes())
    want = torch_state(model.float())
    assert_same_tensors(_loaded(framework, name, path, verify=True), want)
    key = "transformer_blocks.1.attn.to_k.weight"
    start = checkpoint.read_header(path)[key]["start"]
    blob = bytearray(path.read_bytes())
    blob[start + 10] ^= 1  # one low mantissa bit of one bf16 weight: finite, plausible, wrong
    path.write_bytes(bytes(blob))
    _loaded(framework, name, path)  # undetectable without a digest
    with pytest.raises(
        CheckpointError, match=f"{path}: tensor '{key}' does not match its recorded digest"
    ):
        _loaded(framework, name, path, verify=True)
    save_file(
        {k: torch.from_numpy(v.astype(np.float32)) for k, v in read_all(files["bfl"]).items()},
        str(tmp_path / "plain.safetensors"),
    )
    assert_same_tensors(
        _loaded(framework, name, tmp_path / "plain.safetensors"), want
    )  # no digests: as before
    with pytest.raises(CheckpointError, match="no digest recorded"):
        _loaded(framework, name, tmp_path / "plain.safetensors", verify=True)
