"""The command line's error contract, one table: each bad invocation exits 2 with one stderr line
`minflux CMD: error: ...` that names the argument or file, and never a traceback.

A row is (argv, exit code, a substring of that line). `{name}` in an argument is a file or directory of the
`files` fixture (tiny, seeded, in the official layouts). Rows run in-process through `minflux_cli.main.main`;
the train rows must fail before any model is built (a Trainer built during a row fails the test).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from minflux import data
from minflux.data import LatentShards
from minflux_cli.main import COMMANDS, main

TRAIN = [
    # numbers, validated where they are parsed (--steps 0 and --accumulate 0 used to train nothing, exit 0)
    (["train", "--steps", "0"], 2, "argument --steps: must be >= 1, got 0"),
    (["train", "--steps", "ten"], 2, "argument --steps: expected an integer, got 'ten'"),
    (["train", "--batch-size", "0"], 2, "argument --batch-size: must be >= 1"),
    (["train", "--accumulate", "0"], 2, "argument --accumulate: must be >= 1"),
    (["train", "--lora-rank", "-3"], 2, "argument --lora-rank: must be >= 1, got -3"),
    (["train", "--lora-rank", "0"], 2, "argument --lora-rank: must be >= 1, got 0"),
    (["train", "--lr", "nan"], 2, "argument --lr: expected a finite number"),
    (["train", "--warmup", "-1"], 2, "argument --warmup: must be >= 0"),
    (["train", "--ema", "1.5"], 2, "argument --ema: must be <= 1.0"),
    (["train", "--ema", "1.0"], 2, "argument --ema: must be < 1"),
    (["train", "--caption-dropout", "-0.1"], 2, "argument --caption-dropout: must be >= 0.0"),
    (["train", "--seed", "-1"], 2, "argument --seed: must be >= 0"),
    (["train", "--save-every", "-2"], 2, "argument --save-every: must be >= 0"),
    (["train", "--sample-steps", "0"], 2, "argument --sample-steps: must be >= 1"),
    (["train", "--precision", "fp8"], 2, "argument --precision: invalid choice: 'fp8'"),
    # the model
    (["train", "--config", "nosuch"], 2, "argument --config: unknown preset 'nosuch'"),
    (["train", "--config", "flux1-ae"], 2, "argument --config: flux1-ae is an autoencoder"),
    (
        ["train", "--config", "flux2-tiny"],
        2,
        "--config flux2-tiny takes 128-channel tokens; the shapes demo makes 48",
    ),
    (["train", "--guidance", "0.0"], 2, "--guidance: demo is not guidance-distilled"),
    # the mesh
    (["train", "--mesh", "0", "1"], 2, "argument --mesh: must be >= 1, got 0"),
    (["train", "--mesh", "-1", "-1"], 2, "--mesh -1 -1: -1 may stand for one axis only"),
    (["train", "--mesh", "4096", "1"], 2, "--mesh 4096 1: mesh 4096 x 1 needs 4096 devices, found"),
    # LoRA
    (
        ["train", "--lora-rank", "2", "--lora-targets", "nomatch"],
        2,
        "--lora-targets: no linear layer matches the LoRA targets ['nomatch']",
    ),
    (
        ["train", "--lora-rank", "2", "--lora-targets", "("],
        2,
        "--lora-targets: missing ), unterminated subpattern",
    ),
    (["train", "--lora-targets", "qkv"], 2, "--lora-targets needs --lora-rank"),
    (["train", "--lora-alpha", "4"], 2, "--lora-alpha needs --lora-rank"),
    (["train", "--lora-format", "kohya"], 2, "--lora-format needs --lora-rank"),
    # --init: the file, its family and width, before any key list
    (
        ["train", "--init", "{tmp}/nosuch.safetensors"],
        2,
        "argument --init: {tmp}/nosuch.safetensors: no such file",
    ),
    (
        ["train", "--init", "{flux2_tiny}"],
        2,
        "--init {flux2_tiny} holds a FLUX.2 transformer of width 64; demo needs a FLUX.2 transformer of width 128",
    ),
    (
        ["train", "--config", "flux1-dev", "--init", "{flux2_tiny}"],
        2,
        "holds a FLUX.2 transformer of width 64; flux1-dev needs a FLUX.1 transformer of width 3072",
    ),
    (
        ["train", "--init", "{flux1_ae}"],
        2,
        "--init {flux1_ae} holds a FLUX.1 autoencoder; demo needs a FLUX.2",
    ),
    (["train", "--init", "{pickle}"], 2, "--init {pickle}: "),
    # --data: the directory, each shard, their shapes against the config
    (
        ["train", "--data", "{tmp}/nosuch"],
        2,
        "argument --data: {tmp}/nosuch: no such file or directory",
    ),
    (["train", "--data", "{flux2_tiny}"], 2, "argument --data: {flux2_tiny}: not a directory"),
    (["train", "--data", "{empty}"], 2, "--data {empty}: no *.safetensors shards"),
    (["train", "--data", "{no_ids}"], 2, "--data {no_ids}/0.safetensors: missing ['txt_ids']"),
    (
        ["train", "--data", "{wide}"],
        2,
        "--data {wide}/0.safetensors: per-sample shapes do not fit the model: img (16, 64) (expected ('L', 48))",
    ),
    (["train", "--data", "{ragged}"], 2, "--data {ragged}/1.safetensors: per-sample shapes"),
    (["train", "--data", "{corrupt}"], 2, "--data {corrupt}/0.safetensors: "),
    (
        ["train", "--config", "flux1-tiny", "--data", "{shards}"],
        2,
        "--data {shards}/0.safetensors: missing ['vec']",
    ),
    (
        ["train", "--data", "{shards}", "--caption-dropout", "0.1"],
        2,
        "--data {shards}/empty_caption.safetensors: no such file; caption dropout needs",
    ),
    # --out and --resume
    (["train", "--out", "{flux2_tiny}"], 2, "argument --out: {flux2_tiny}: not a directory"),
    (
        ["train", "--resume", "--out", "{tmp}/fresh"],
        2,
        "--resume: {tmp}/fresh/ckpt: no checkpoint to resume from",
    ),
    (
        ["train", "--save-every", "5", "--out", "{saved}"],
        2,
        "{saved}/ckpt holds checkpoints (latest: step 4); pass",
    ),
    (
        ["train", "--resume", "--batch-size", "16", "--accumulate", "2", "--out", "{saved}"],
        2,
        "--resume: {saved}/ckpt/run.json: this run differs from the saved one in batch_size 16 (saved: 8); "
        "accumulate 2 (saved: 1)",
    ),
]

GENERATE = [
    (["generate", "--random-weights", "--width", "0"], 2, "argument --width: must be >= 16, got 0"),
    (
        ["generate", "--random-weights", "--height", "40"],
        2,
        "argument --height: must be a multiple of 16, got 40",
    ),
    (["generate", "--random-weights", "--steps", "0"], 2, "argument --steps: must be >= 1, got 0"),
    (["generate", "--random-weights", "--strength", "0.5"], 2, "--strength needs --init IMAGE"),
    (
        ["generate", "--random-weights", "--init", "{png}", "--strength", "1.5"],
        2,
        "argument --strength: must be <=",
    ),
    (["generate", "--random-weights", "--seed", "-1"], 2, "argument --seed: must be >= 0"),
    (
        ["generate", "--random-weights", "--cfg", "nan"],
        2,
        "argument --cfg: expected a finite number",
    ),
    (
        ["generate", "--random-weights", "--framework", "tf"],
        2,
        "argument --framework: invalid choice: 'tf'",
    ),
    (["generate", "--model", "nosuch"], 2, "argument --model: unknown preset 'nosuch'"),
    (
        ["generate", "--model", "flux1-ae", "--random-weights"],
        2,
        "--model flux1-ae is a FLUX.1 autoencoder, not",
    ),
    (
        ["generate", "--random-weights", "--ae-config", "flux2-ae-tiny"],
        2,
        "--ae-config flux2-ae-tiny is a FLUX.2 autoencoder; flux1-tiny needs a FLUX.1 autoencoder",
    ),
    (["generate", "--model", "flux1-tiny"], 2, "--transformer is required"),
    (
        [
            "generate",
            "--model",
            "flux1-tiny",
            "--transformer",
            "{flux2_tiny}",
            "--ae",
            "{flux1_ae}",
            "--embeddings",
            "{flux2_tiny}",
        ],
        2,
        "--transformer {flux2_tiny} holds a FLUX.2 transformer of width 64; flux1-tiny needs",
    ),
    (
        ["generate", "--random-weights", "--ref", "{tmp}/nosuch.png"],
        2,
        "argument --ref: {tmp}/nosuch.png: no such",
    ),
    (
        ["generate", "--random-weights", "--ref", "{flux2_tiny}"],
        2,
        "{flux2_tiny}: not an image PIL can read",
    ),
    (
        ["generate", "--random-weights", "--ref", "{png}", "--ref", "{png}"],
        2,
        "FLUX.1 Kontext takes one --ref",
    ),
    (["generate", "--random-weights", "--mask", "{png}"], 2, "--mask needs --init IMAGE"),
    (
        ["generate", "--random-weights", "--redux", "{png}"],
        2,
        "--redux needs a FLUX.1 model and --redux-model DIR",
    ),
    (
        [
            "generate",
            "--random-weights",
            "--model",
            "flux2-tiny",
            "--redux",
            "{png}",
            "--redux-model",
            "{tmp}",
        ],
        2,
        "--redux is for FLUX.1 models; flux2-tiny is FLUX.2",
    ),
    (
        ["generate", "--random-weights", "--redux-model", "{tmp}"],
        2,
        "--redux-model / --redux-embedder need --redux",
    ),
    (
        ["generate", "--random-weights", "--control", "{png}"],
        2,
        "--control needs a FLUX.1 Canny/Depth model",
    ),
    (["generate", "--random-weights", "--prompt", "a cat"], 2, "--prompt needs --text-encoder DIR"),
    (
        ["generate", "--random-weights", "--save-embeddings", "{tmp}/e.safetensors"],
        2,
        "--save-embeddings needs --prompt",
    ),
    (
        ["generate", "--random-weights", "--text-encoder", "{tmp}"],
        2,
        "--text-encoder needs --prompt",
    ),
    (
        ["generate", "--random-weights", "--out", "{tmp}"],
        2,
        "argument --out: {tmp}: is a directory",
    ),
    (
        ["generate", "--random-weights", "--out", "{tmp}/x.txt"],
        2,
        "not an image file name PIL writes",
    ),
    (
        ["generate", "--random-weights", "--out", "{flux2_tiny}/x.png"],
        2,
        "{flux2_tiny} is not a directory",
    ),
    (
        ["generate", "--random-weights", "--transformer", "{flux2_tiny}"],
        2,
        "--random-weights and --transformer exclude each other",
    ),
    (
        ["generate", "--random-weights", "--framework", "jax", "--compile"],
        2,
        "--compile is torch.compile",
    ),
    (
        ["generate", "--random-weights", "--device", "cuda:7"],
        2,
        "--device cuda:7, but PyTorch sees no CUDA",
    ),
    (
        ["generate", "--random-weights", "--lora", "{flux2_tiny}:abc"],
        2,
        "argument --lora: expected a number, got",
    ),
    (
        ["generate", "--random-weights", "--lora", "{flux2_tiny}:nan"],
        2,
        "argument --lora: expected a finite number",
    ),
    (
        [
            "generate",
            "--model",
            "flux2-tiny",
            "--transformer",
            "{flux2_tiny}",
            "--ae",
            "{flux2_ae}",
            "--embeddings",
            "{nan_emb}",
        ],
        2,
        "--embeddings {nan_emb}: 'txt' holds NaN or Inf values",
    ),
]

PARITY = [
    (["parity", "--model", "nosuch"], 2, "argument --model: unknown preset 'nosuch'"),
    (
        ["parity", "--model", "flux1-tiny"],
        2,
        "--model flux1-tiny needs --checkpoint FILE or --random-weights",
    ),
    (
        ["parity", "--random-weights"],
        2,
        "--model NAME is required with --checkpoint / --random-weights",
    ),
    (
        ["parity", "--model", "flux1-tiny", "--random-weights", "--checkpoint", "{flux2_tiny}"],
        2,
        "--checkpoint and --random-weights exclude each other",
    ),
    (
        ["parity", "--model", "flux1-tiny", "--checkpoint", "{tmp}/nosuch"],
        2,
        "argument --checkpoint: {tmp}/nosuch",
    ),
    (["parity", "--dtype", "fp16"], 2, "--dtype 'fp16': use fp32, bf16 or fp32,bf16"),
    (["parity", "--resolution", "0"], 2, "argument --resolution: must be >= 16, got 0"),
    (["parity", "--resolution", "24"], 2, "argument --resolution: must be a multiple of 16"),
    (["parity", "--txt-len", "0"], 2, "argument --txt-len: must be >= 1"),
    (["parity", "--device", "tpu"], 2, "argument --device: invalid choice: 'tpu'"),
    (["parity", "--json", "{tmp}"], 2, "argument --json: {tmp}: is a directory"),
    (
        ["parity", "--plot", "{tmp}/nodir/x.png"],
        2,
        "argument --plot: {tmp}/nodir/x.png: no such directory",
    ),
    (["parity", "--allow-tf32"], 2, "--allow-tf32 is a canary for --device cuda"),
    (["parity", "--jax-cache", "{flux2_tiny}"], 2, "--jax-cache {flux2_tiny}: not a directory"),
    (
        ["parity", "--model", "flux1-dev", "--checkpoint", "{flux2_tiny}"],
        2,
        "{flux2_tiny} holds a FLUX.2 transformer of width 64; the model needs a FLUX.1 transformer of width 3072",
    ),
    (["parity", "--model", "flux1-tiny", "--checkpoint", "{corrupt}/0.safetensors"], 2, "corrupt"),
]

CONVERT = [
    (
        ["convert", "{tmp}/nosuch.safetensors", "{tmp}/o.safetensors"],
        2,
        "{tmp}/nosuch.safetensors: no such file",
    ),
    (["convert", "{flux2_tiny}", "{tmp}"], 2, "dst {tmp}: is a directory"),
    (["convert", "{flux2_tiny}", "{flux2_tiny}"], 2, "is the source file"),
    (["convert", "{corrupt}/0.safetensors", "{tmp}/o.safetensors"], 2, "{corrupt}/0.safetensors: "),
    (["convert", "{pickle}", "{tmp}/o.safetensors"], 2, "{pickle}: "),
    (
        ["convert", "{flux2_tiny}", "{tmp}/o.safetensors", "--to", "onnx"],
        2,
        "argument --to: invalid choice",
    ),
    (
        ["convert", "{flux2_tiny}", "{tmp}/nodir/o.safetensors"],
        2,
        "dst {tmp}/nodir/o.safetensors: no such directory",
    ),
]

CACHE = [
    (
        [
            "cache",
            "{tmp}/nosuch",
            "{tmp}/c",
            "--model",
            "flux2-tiny",
            "--ae",
            "{flux1_ae}",
            "--text-encoder",
            "{tmp}",
        ],
        2,
        "argument images: {tmp}/nosuch: no such file or directory",
    ),
    (
        [
            "cache",
            "{empty}",
            "{tmp}/c",
            "--model",
            "nosuch",
            "--ae",
            "{flux1_ae}",
            "--text-encoder",
            "{tmp}",
        ],
        2,
        "argument --model: unknown preset 'nosuch'",
    ),
    (
        [
            "cache",
            "{empty}",
            "{tmp}/c",
            "--model",
            "flux2-tiny",
            "--ae",
            "{flux1_ae}",
            "--text-encoder",
            "{tmp}",
        ],
        2,
        "{empty}: no images",
    ),
    (
        [
            "cache",
            "{empty}",
            "{tmp}/c",
            "--model",
            "flux2-tiny",
            "--ae",
            "{flux1_ae}",
            "--text-encoder",
            "{tmp}",
            "--size",
            "0",
        ],
        2,
        "argument --size: must be >= 16, got 0",
    ),
    (
        [
            "cache",
            "{empty}",
            "{tmp}/c",
            "--model",
            "flux2-tiny",
            "--ae",
            "{flux1_ae}",
            "--text-encoder",
            "{tmp}",
            "--batch-size",
            "0",
        ],
        2,
        "argument --batch-size: must be >= 1",
    ),
    (
        [
            "cache",
            "{empty}",
            "{flux2_tiny}",
            "--model",
            "flux2-tiny",
            "--ae",
            "{flux1_ae}",
            "--text-encoder",
            "{tmp}",
        ],
        2,
        "argument out: {flux2_tiny}: not a directory",
    ),
    (
        [
            "cache",
            "{empty}",
            "{tmp}/c",
            "--model",
            "flux2-ae-tiny",
            "--ae",
            "{flux1_ae}",
            "--text-encoder",
            "{tmp}",
        ],
        2,
        "--model flux2-ae-tiny is a FLUX.2 autoencoder, not a transformer",
    ),
    (
        ["cache", "{empty}", "{tmp}/c", "--model", "flux2-tiny", "--ae", "{flux1_ae}"],
        2,
        "the following arguments are required: --text-encoder",
    ),
]

BENCH = [
    (["bench", "--json", "{tmp}"], 2, "argument --json: {tmp}: is a directory"),
    (["bench", "--plot", "{tmp}"], 2, "argument --plot: {tmp}: is a directory"),
    (["bench", "--peak-tflops", "-1"], 2, "argument --peak-tflops: must be >="),
    (["bench", "--peak-tflops", "nan"], 2, "argument --peak-tflops: expected a finite number"),
    (["bench", "--model", "nosuch"], 2, "argument --model: unknown preset 'nosuch'"),
]

TOP = [
    (["nosuch"], 2, "invalid choice: 'nosuch' (choose from 'parity'"),
]

ROWS = TRAIN + GENERATE + PARITY + CONVERT + CACHE + BENCH + TOP


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint):
    """The files the rows name: checkpoints, latent shards (good and broken), a saved run's directory."""
    tmp = tmp_path_factory.mktemp("cli")
    shapes = data.Shapes(
        n=4, size=16, patch=4, context_dim=data.DEMO.context_in_dim
    )  # fits the demo config
    good = {k: np.ascontiguousarray(v) for k, v in shapes.arrays.items()}
    out = {
        "tmp": tmp,
        "flux2_tiny": tiny_checkpoint("flux2-tiny"),
        "flux1_ae": tiny_checkpoint("flux1-ae-tiny"),
    }
    for name, shards in {
        "empty": [],
        "shards": [good],
        "no_ids": [{k: v for k, v in good.items() if k != "txt_ids"}],
        "wide": [{**good, "img": np.zeros((4, 16, 64), np.float32)}],
        "ragged": [good, {**good, "txt": np.zeros((4, 3, 32), np.float32)}],
    }.items():
        (tmp / name).mkdir()
        for i, shard in enumerate(shards):
            save_file(shard, tmp / name / f"{i}.safetensors")
        out[name] = tmp / name
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "0.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header"
    )
    out["corrupt"] = tmp / "corrupt"
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp / "img.png")
    out["png"] = tmp / "img.png"
    out["flux2_ae"] = tiny_checkpoint("flux2-ae-tiny")
    save_file({"txt": np.full((1, 4, 48), np.nan, np.float32)}, tmp / "nan_emb.safetensors")
    out["nan_emb"] = tmp / "nan_emb.safetensors"
    out["pickle"] = tmp / "model.pt"
    out["pickle"].write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)  # a zip, as torch.save writes
    assert len(LatentShards(out["shards"], cfg=data.DEMO)) == 4  # the good shards do load
    # a saved run: its record and two (empty) checkpoint directories; the rows stop at the record
    from minflux_jax import trainer as tr

    ckpt = tmp / "saved" / "ckpt"
    for step in (2, 4):
        for item in ("state", "meta"):
            (ckpt / str(step) / item).mkdir(parents=True)
    tr.write_run(ckpt, tr.run_record(data.DEMO, tr.TrainOptions(batch_size=8), (1, 1)))
    out["saved"] = tmp / "saved"
    return {k: str(v) for k, v in out.items()}


@pytest.fixture
def no_models(monkeypatch):
    """Fail any row that gets as far as building a trainer: every mistake is found before that."""
    from minflux_jax import trainer as tr

    def built(*args, **kwargs):
        raise AssertionError(
            "a Trainer was built: the mistake was not caught while checking the arguments"
        )

    monkeypatch.setattr(tr.Trainer, "__init__", built)
    from minflux_cli.frameworks import Framework

    monkeypatch.setattr(Framework, "model", built)


@pytest.mark.parametrize("argv,code,expected", ROWS, ids=[" ".join(argv) for argv, _, _ in ROWS])
def test_bad_invocation(argv, code, expected, files, no_models, capsys):
    argv = [a.format(**files) for a in argv]
    if argv[0] == "train" and "--out" not in argv:
        argv += ["--out", f"{files['tmp']}/out"]  # never the working directory's out/train
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's errors
        rc = e.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err + captured.out
    assert rc == code, captured.err
    assert len(lines) == 1, captured.err
    command = f"minflux {argv[0]}" if argv[0] in COMMANDS else "minflux"
    assert lines[0].startswith(f"{command}: error: "), lines[0]
    assert expected.format(**files) in lines[0], lines[0]


def test_batch_must_divide_over_the_mesh():
    """Two (forced) CPU devices in a fresh process: a batch of 3 cannot split over a 2 x 1 mesh."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "minflux_cli", "train", "--mesh", "2", "1", "--batch-size", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert (
        lines[0]
        == "minflux train: error: --batch-size 3 must be a multiple of the mesh's 2 devices (--mesh 2 1)"
    )


# ---------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: one line, no traceback, 130 / 143
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sig,code,word,framework",
    [
        (signal.SIGINT, 130, "interrupted", "torch"),
        (signal.SIGTERM, 143, "terminated", "torch"),
        (signal.SIGINT, 130, "interrupted", "jax"),
    ],
)
def test_signals_give_one_line_and_their_exit_code(tmp_path, sig, code, word, framework):
    """A long `minflux generate` is stopped once its loop runs (its progress bar has appeared). In JAX the signal
    lands inside the compiled loop's progress callback, where the exception is swallowed: the watchdog still ends
    the run with the same line and status (it used to crash, status 139)."""
    cmd = [
        sys.executable,
        "-m",
        "minflux_cli",
        "generate",
        "--random-weights",
        "--steps",
        "100000",
        "--framework",
        framework,
        "--out",
        str(tmp_path / "never.png"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []

    def read():
        for line in iter(lambda: proc.stderr.read(1), ""):
            seen.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while "denoising" not in "".join(seen):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)[-2000:]
        time.sleep(0.2)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code
    reader.join(timeout=10)
    err = "".join(seen).replace("\r", "\n")
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("minflux")] == [
        f"minflux generate: {word}"
    ]
    assert not (tmp_path / "never.png").exists()
