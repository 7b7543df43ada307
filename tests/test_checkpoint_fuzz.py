"""Fuzzing the reader against safetensors' own: every mutation of a small model file either raises
CheckpointError or reads exactly the tensors `safetensors.safe_open` reads, in the shared reader and in both
frameworks' `load_model`. Never another exception, never different bytes.

The file is a tiny FLUX.2 transformer written by `safetensors.torch.save_file` (not by us); the mutations are
seeded: truncations, appended bytes, byte flips in header and data, the header length, offsets (shifted,
overlapping, swapped, wrong types), dtypes, shapes, keys (renamed, repeated, dropped), nesting, metadata.
`pytest tests/test_checkpoint_fuzz.py -s` prints the counts.
"""

from __future__ import annotations

import json
import struct
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import save_file

import minflux_jax as mj
import minflux_torch as mt
from minflux import checkpoint
from minflux.checkpoint import Checkpoint, CheckpointError
from minflux_jax.load import state_dict as jax_state_dict
from minflux_torch.load import to_numpy

NAME, SEED, MUTATIONS = "flux2-tiny", 2026, 300
JAX_EVERY = (
    4  # a JAX load costs ~50 ms: it runs on every file the reader reads, and every 4th other one
)
DTYPES = [
    "F32",
    "F16",
    "BF16",
    "F8_E4M3",
    "F8_E5M2",
    "I8",
    "U8",
    "I16",
    "I64",
    "BOOL",
    "F4",
    "XYZ",
    3,
    None,
]


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def reference(path) -> dict[str, torch.Tensor] | None:
    """What safetensors reads from `path`, or None when it refuses the file (any exception)."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no mapping)
    except Exception:
        return None


def same_as_reference(
    ours: dict[str, np.ndarray], ref: dict[str, torch.Tensor] | None, cast=None
) -> bool:
    """Our tensors equal safetensors' (cast by torch to `cast` first, as a loader does), bit for bit."""
    if ref is None or sorted(ours) != sorted(ref):
        return False
    for k, t in ref.items():
        t = t.to(cast) if cast is not None and t.is_floating_point() else t
        a = np.ascontiguousarray(ours[k])
        if tuple(a.shape) != tuple(t.shape) or a.dtype.itemsize != t.element_size():
            return False
        if cast is None and checkpoint.st_dtype(a.dtype) != str(t.dtype).removeprefix("torch."):
            if (checkpoint.st_dtype(a.dtype), str(t.dtype)) not in TORCH_NAMES:
                return False
        if a.reshape(-1).view(np.uint8).tobytes() != _bytes(t):
            return False
    return True


TORCH_NAMES = {
    ("F32", "torch.float32"),
    ("F16", "torch.float16"),
    ("BF16", "torch.bfloat16"),
    ("F64", "torch.float64"),
    ("F8_E4M3", "torch.float8_e4m3fn"),
    ("F8_E5M2", "torch.float8_e5m2"),
    ("I8", "torch.int8"),
    ("U8", "torch.uint8"),
    ("I16", "torch.int16"),
    ("I32", "torch.int32"),
    ("I64", "torch.int64"),
    ("BOOL", "torch.bool"),
    ("U16", "torch.uint16"),
    ("U32", "torch.uint32"),
    ("U64", "torch.uint64"),
}


# ---------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------


def _file(pairs: list[tuple[str, object]], data: bytes, pad: bool = True) -> bytes:
    """A safetensors file from header (key, value) pairs, which may repeat keys."""
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"
    blob = text.encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def mutate(base: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One seeded mutation of the file `base`: (kind, bytes)."""
    n = struct.unpack("<Q", base[:8])[0]
    header, data = json.loads(base[8 : 8 + n]), base[8 + n :]
    pairs = list(header.items())
    tensors = [i for i, (k, _) in enumerate(pairs) if k != "__metadata__"]
    i = int(rng.choice(tensors))
    key, info = pairs[i][0], dict(pairs[i][1])
    kind = str(
        rng.choice(
            [
                "truncate",
                "append",
                "header byte",
                "data byte",
                "header length",
                "offsets",
                "dtype",
                "shape",
                "key",
                "nesting",
                "metadata",
                "swap",
            ]
        )
    )
    if kind == "truncate":
        return kind, base[: int(rng.integers(0, len(base)))]
    if kind == "append":
        return kind, base + rng.bytes(int(rng.integers(1, 17)))
    if kind in ("header byte", "data byte"):
        lo, hi = (8, 8 + n) if kind == "header byte" else (8 + n, len(base))
        out = bytearray(base)
        for _ in range(int(rng.integers(1, 4))):
            out[int(rng.integers(lo, hi))] ^= int(rng.integers(1, 256))
        return kind, bytes(out)
    if kind == "header length":
        m = int(rng.choice([n - 8, n - 1, n + 1, n + 8, 0, len(base), 1 << 40, (1 << 64) - 1]))
        return kind, struct.pack("<Q", m % (1 << 64)) + base[8:]
    if kind == "offsets":
        a, b = info["data_offsets"]
        other = pairs[int(rng.choice(tensors))][1]["data_offsets"]
        info["data_offsets"] = [
            [a + 4, b + 4],
            [a - 4, b - 4],
            [a + 2, b + 2],
            [a, b + 4],
            [a + 4, b],
            other,
            [str(a), b],
            [float(a), b],
            [a, b, b],
            [-a - 1, b],
            None,
            [b, a],
            [a],
        ][int(rng.integers(0, 13))]
    elif kind == "dtype":
        info["dtype"] = DTYPES[int(rng.integers(0, len(DTYPES)))]
    elif kind == "shape":
        s = list(info["shape"])
        info["shape"] = [
            s[::-1],
            s + [1],
            [1] + s,
            s[:-1],
            [d + 1 for d in s],
            [-d for d in s],
            [float(d) for d in s],
            [],
            [0],
            "x",
            [str(d) for d in s],
            [*s[:-1], s[-1] * 2],
        ][int(rng.integers(0, 12))]
    elif kind == "key":
        choice = int(rng.integers(0, 4))
        if choice == 0:  # repeated: a second entry under an existing name
            other = pairs[int(rng.choice(tensors))][0]
            pairs[i] = (other, info)
            return kind, _file(pairs, data)
        if choice == 1:  # dropped: its bytes stay behind
            del pairs[i]
            return kind, _file(pairs, data)
        pairs[i] = (
            ["", key + ".x", key.replace("double", "single"), "\udc80"][int(rng.integers(0, 4))],
            info,
        )
        return kind, _file(pairs, data)
    elif kind == "nesting":
        depth = int(rng.choice([1, 2, 10, 100, 5000]))
        field = str(rng.choice(["shape", "data_offsets", "dtype"]))
        info[field] = (
            json.loads("[" * depth + json.dumps(info[field]) + "]" * depth) if depth < 500 else None
        )
        if depth >= 500:  # too deep for json.dumps itself: write the text directly
            text = _file(pairs, data).decode("latin-1")
            hdr = f'{{"__metadata__":{"[" * depth}{"]" * depth},'
            return kind, _raw(text.replace("{", hdr, 1), data)
    elif kind == "metadata":
        pairs.insert(
            0,
            (
                "__metadata__",
                [{"a": 1}, {"a": "1", "b": ["x"]}, "x", {"a": {"b": "c"}}, [], {"format": "pt"}][
                    int(rng.integers(0, 6))
                ],
            ),
        )
        if rng.random() < 0.3:
            pairs.insert(0, ("__metadata__", {"format": "pt"}))
    elif (
        kind == "swap"
    ):  # two tensors of the same size exchange their bytes: a valid file, reordered
        sizes = Counter(
            pairs[t][1]["data_offsets"][1] - pairs[t][1]["data_offsets"][0] for t in tensors
        )
        same = [
            t
            for t in tensors
            if sizes[pairs[t][1]["data_offsets"][1] - pairs[t][1]["data_offsets"][0]] > 1
        ]
        j, k = rng.choice(same, 2, replace=False)
        a, b = dict(pairs[j][1]), dict(pairs[k][1])
        a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]
        pairs[j], pairs[k] = (pairs[j][0], a), (pairs[k][0], b)
        return kind, _file(pairs, data)
    pairs[i] = (key, info)
    return kind, _file(pairs, data)


def _raw(header_text: str, data: bytes) -> bytes:
    blob = header_text.encode("latin-1")
    return struct.pack("<Q", len(blob)) + blob + data


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------


def _read(path) -> dict[str, np.ndarray]:
    with Checkpoint(path) as ckpt:
        return {ckpt.sources[k]: ckpt.get(k) for k in ckpt.meta}


def _outcome(load, ref, cast=None) -> str:
    try:
        ours = load()
    except CheckpointError:
        return "CheckpointError"
    except Exception as e:  # anything else is a bug: reported with its type
        return f"other: {type(e).__name__}: {e}"
    return "equal" if same_as_reference(ours, ref, cast) else "different"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> bytes:
    model = mt.build_model(NAME, seed=9, dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("fuzz") / "base.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path),
        metadata={"format": "pt"},
    )
    return path.read_bytes()


@pytest.mark.slow
def test_fuzzed_files_fail_cleanly_or_match_safetensors(base, tmp_path, monkeypatch):
    # The abstract JAX model (0.2 s to trace) is built once and cloned per load; reading and assigning run in full.
    model = mj.load.abstract_model(NAME, jnp.bfloat16)
    monkeypatch.setattr(mj.load, "abstract_model", lambda cfg, dtype: nnx.clone(model))
    rng = np.random.default_rng(SEED)
    path = tmp_path / "fuzz.safetensors"
    counts = {"reader": Counter(), "torch": Counter(), "jax": Counter()}
    kinds, failures = Counter(), []
    for m in range(MUTATIONS):
        kind, blob = mutate(base, rng)
        kinds[kind] += 1
        path.write_bytes(blob)
        ref = reference(path)
        results = {"reader": _outcome(lambda: _read(path), ref)}
        results["torch"] = _outcome(
            lambda: {
                k: to_numpy(v)
                for k, v in mt.load_model(NAME, path, torch.bfloat16).state_dict().items()
            },
            ref,
            torch.bfloat16,
        )
        if results["reader"] != "CheckpointError" or m % JAX_EVERY == 0:
            results["jax"] = _outcome(
                lambda: jax_state_dict(mj.load_model(NAME, path, jnp.bfloat16)), ref, torch.bfloat16
            )
        for side, r in results.items():
            counts[side][r.split(":")[0]] += 1
            if r not in ("CheckpointError", "equal"):
                failures.append(
                    f"mutation {m} ({kind}), {side}: {r}; safetensors {'reads' if ref else 'refuses'} it"
                )
    print(
        f"\nfuzz: {MUTATIONS} mutations of a {len(base)}-byte {NAME} file (seed {SEED}); kinds {dict(kinds)}"
    )
    for side, c in counts.items():
        print(
            f"  {side:6s}: {sum(c.values())} loads: {c['CheckpointError']} CheckpointError, {c['equal']} equal to "
            f"safetensors, {sum(c.values()) - c['CheckpointError'] - c['equal']} anything else"
        )
    assert not failures, "\n".join(failures[:20])
    for side in counts:  # the mutations must reach both outcomes, or the test proves little
        assert counts[side]["equal"] >= 10 and counts[side]["CheckpointError"] >= 40, (
            side,
            counts[side],
        )
