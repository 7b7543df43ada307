"""safetensors IO: torch <-> JAX round trips bit for bit, every malformed checkpoint fails loudly (naming the
file and the key) in both frameworks, and the `minflux convert` CLI end to end."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import weakref

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import minflux_jax as mj
import minflux_torch as mt
from minflux import checkpoint, configs
from minflux.checkpoint import Checkpoint, CheckpointError
from minflux_cli import main as cli
from minflux_jax.load import state_dict as jax_state_dict
from minflux_torch.load import to_numpy

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
@pytest.mark.parametrize(("tdtype", "jdtype"), [(torch.bfloat16, jnp.bfloat16), (torch.float32, jnp.float32)])
@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_torch_jax_torch_is_bitwise(name, tdtype, jdtype, layout, tmp_path):
    model = mt.build_model(name, seed=3, dtype=tdtype)
    mt.save_model(model, tmp_path / "torch.safetensors", layout=layout)
    jmodel = mj.load_model(name, tmp_path / "torch.safetensors", dtype=jdtype)
    mj.save_model(jmodel, tmp_path / "jax.safetensors", layout=layout)
    assert_same_tensors(read_all(tmp_path / "jax.safetensors"), read_all(tmp_path / "torch.safetensors"))
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
    checkpoint.write_safetensors(path, {k: (checkpoint.st_dtype(v.dtype), v.shape) for k, v in tensors.items()},
                                 tensors.__getitem__)


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
        return path, ["double_blocks.0.img_attn.qkv.weight", "expected (192, 64)", "found (128, 64)"]
    if case == "integer dtype":
        _save(path, _with(t, "txt_in.weight", t["txt_in.weight"].astype(np.float32).astype(np.int32)))
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
        header = data[8:8 + n].replace(b'"shape":[64,128]', b'"shape":[64,127]', 1)
        path.write_bytes(data[:8] + header + data[8 + n:])
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
    raise ValueError(case)


BAD = ["missing key", "unexpected key", "unexpected block", "wrong shape", "wrong shape (diffusers)", "integer dtype",
       "truncated", "corrupt header", "corrupt header length", "inconsistent header", "NaN", "Inf", "unknown layout",
       "duplicate key in shards", "empty directory", "nonexistent path"]
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
        assert all(ref() is None for ref in alive), f"a previous tensor is still alive when producing {key}"
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


@pytest.mark.parametrize(("src", "dst"), [("bfl", "diffusers"), ("bfl-prefixed", "diffusers"), ("diffusers", "bfl")])
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
    assert convert(tmp_path / "fp32.safetensors", tmp_path / "out.safetensors", "--to", "bfl", "--dtype", flag) == 0
    assert_same_tensors(read_all(tmp_path / "out.safetensors"), torch_state(model.to(tdtype)))


def test_convert_widening_cast_is_exact(tiny, tmp_path):
    _, _, files = tiny
    assert convert(files["bfl"], tmp_path / "fp32.safetensors", "--to", "diffusers", "--dtype", "fp32") == 0
    assert {m[0] for m in Checkpoint(tmp_path / "fp32.safetensors").meta.values()} == {"F32"}
    assert convert(tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors", "--dtype", "bf16") == 0
    assert_same_tensors(read_all(tmp_path / "bf16.safetensors"), read_all(files["bfl"]))


@pytest.mark.parametrize(("src", "dst"), [("bfl", "diffusers"), ("diffusers", "bfl"), ("bfl-prefixed", "bfl")])
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
        checkpoint.write_safetensors(shards / name, specs, lambda k: ckpt.get(k.removeprefix(ckpt.prefix)))
        weight_map.update(dict.fromkeys(part, name))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert convert(shards, tmp_path / "out.safetensors", "--to", dst) == 0
    assert raw_keys(tmp_path / "out.safetensors") == raw_keys(files[dst])
    assert_same_tensors(read_all(tmp_path / "out.safetensors"), read_all(files[dst]))


AUTOENCODERS = [n for n, c in configs.PRESETS.items() if getattr(c, "family", "").startswith("ae") and "tiny" in n]


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_convert_autoencoder(name, tmp_path):
    """The family comes from the keys, so autoencoder files convert through the same command."""
    model = mt.build_model(name, seed=8, dtype=torch.bfloat16)
    for layout in ("bfl", "diffusers"):
        mt.save_model(model, tmp_path / f"{layout}.safetensors", layout=layout)
    assert convert(tmp_path / "bfl.safetensors", tmp_path / "d.safetensors") == 0
    assert_same_tensors(read_all(tmp_path / "d.safetensors"), read_all(tmp_path / "diffusers.safetensors"))
    assert convert(tmp_path / "d.safetensors", tmp_path / "b.safetensors") == 0
    assert_same_tensors(read_all(tmp_path / "b.safetensors"), read_all(tmp_path / "bfl.safetensors"))


def test_convert_shows_progress(tiny, tmp_path, capsys):
    _, _, files = tiny
    assert cli.main(["convert", str(files["bfl"]), str(tmp_path / "out.safetensors")]) == 0
    out, err = capsys.readouterr()
    assert "writing out.safetensors" in err and "100%" in err
    assert "bfl -> diffusers" in out


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
    assert str(tmp_path / "in" / "b.safetensors") in err and "double_blocks.0.img_attn.extra.weight" in err
    assert not out.exists() and no_temp_files(tmp_path)


@pytest.mark.parametrize("case", ["truncated", "corrupt header", "unknown layout", "empty directory",
                                  "nonexistent path"])
def test_convert_bad_input_fails_cleanly(case, tmp_path, capsys):
    path, fragments = make_bad(case, tmp_path)
    out = tmp_path / "out.safetensors"
    assert convert(path, out) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(f in err for f in [str(path), *fragments]), err
    assert not out.exists() and no_temp_files(tmp_path)


def test_convert_rejects_a_fused_tensor_too_short_to_split(tmp_path, capsys):
    t = _good()
    t["double_blocks.1.txt_attn.qkv.weight"] = t["double_blocks.1.txt_attn.qkv.weight"][:100]  # needs 3 x 64
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
    assert "is the input" in capsys.readouterr().err and files["bfl"].read_bytes() == before
    assert convert(files["bfl"], tmp_path) == 2
    assert "is a directory" in capsys.readouterr().err


def test_convert_cli_exit_code_and_one_line_error(tmp_path):
    """The installed entry point, in a subprocess: exit code 2 and a single line on stderr, no traceback."""
    missing = tmp_path / "missing.safetensors"
    r = subprocess.run([sys.executable, "-m", "minflux_cli", "convert", str(missing), str(tmp_path / "o.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"minflux convert: error: {missing}: no such file or directory"]


def test_convert_is_framework_free():
    """`minflux convert` needs neither torch nor jax: the core imports neither."""
    code = ("import sys, minflux.convert, minflux.checkpoint, minflux.keymaps; "
            "print(sorted(m for m in ('torch', 'jax', 'flax') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert r.stdout.strip() == "[]"


def test_configs_still_resolve():
    assert configs.resolve(NAME).hidden_size == 64  # the malformed cases above assume these dims
    assert configs.resolve(NAME).depth == 2 and configs.resolve(NAME).depth_single_blocks == 2
