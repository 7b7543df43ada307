"""The command line's error contract, one table: each bad invocation exits 2 with one stderr line
`minflux CMD: error: ...` that names the argument or file, and never a traceback.

A row is (argv, exit code, a substring of that line). `{name}` in an argument is a file or directory of the
`files` fixture (tiny, seeded, in the official layouts). Rows run in-process through `minflux_cli.main.main`;
the train rows must fail before any model is built (a Trainer built during a row fails the test).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import png_header
from safetensors.numpy import save_file

from minflux import data, memory
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
    # sizes checked against memory before anything is allocated (once RESOURCE_EXHAUSTED; SIGABRT after 79 s)
    (
        ["train", "--lora-rank", "100000"],
        2,
        "--lora-rank 100000 exceeds 128, the smallest adapted layer's rank (double_blocks.0.img_attn.qkv",
    ),
    (
        ["train", "--lora-rank", "64", "--lora-targets", "img_in$", "qkv"],
        2,
        "--lora-rank 64 exceeds 48, the smallest adapted layer's rank (img_in: min(in, out))",
    ),
    (
        ["train", "--batch-size", "100000"],
        2,
        "--batch-size 100000 (demo, 36 image + 2 text tokens per sample, fp32) needs about ",
    ),
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
            "{flux2_ae}",
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
    # --ae from its header, before the images, naming the flag (a LoRA was told to use --lora, which cache lacks)
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
        "--ae {flux1_ae} holds a FLUX.1 autoencoder; flux2-ae-tiny needs a FLUX.2 autoencoder",
    ),
    (
        [
            "cache",
            "{empty}",
            "{tmp}/c",
            "--model",
            "flux1-tiny",
            "--ae",
            "{lora}",
            "--text-encoder",
            "{tmp}",
        ],
        2,
        "--ae {lora}: a LoRA file (low-rank A/B pairs), not an autoencoder$",
    ),
    (
        [
            "cache",
            "{empty}",
            "{tmp}/c",
            "--model",
            "flux2-tiny",
            "--ae",
            "{flux2_tiny}",
            "--text-encoder",
            "{tmp}",
        ],
        2,
        "--ae {flux2_tiny} holds a FLUX.2 transformer of width 64; flux2-ae-tiny needs",
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
    (["--verbose", "nosuch"], 2, "invalid choice: 'nosuch' (choose from 'parity'"),
    (["--nosuch"], 2, "unrecognized arguments: --nosuch (see minflux --help)"),
    # a flag the command does not know is the command's error, pointing at its help (was `minflux --help`)
    (
        ["train", "--no-such-flag"],
        2,
        "unrecognized arguments: --no-such-flag (see minflux train --help)",
    ),
    (
        ["generate", "--random-weights", "--nosuch", "1"],
        2,
        "unrecognized arguments: --nosuch 1 (see minflux generate --help)",
    ),
    (["parity", "extra"], 2, "unrecognized arguments: extra (see minflux parity --help)"),
    # finite in Python, inf in float32: the picture came out NaN, written with exit 0
    (
        ["generate", "--random-weights", "--guidance", "1e39"],
        2,
        "argument --guidance: expected a finite number, got '1e39' (beyond float32's",
    ),
    (["train", "--lr", "1e39"], 2, "argument --lr: expected a finite number, got '1e39'"),
    (
        ["generate", "--random-weights", "--lora", "{lora}:1e39"],
        2,
        "argument --lora: expected a finite number, got '1e39'",
    ),
]

# Issue 23: what a new user tried that was not clean. `{long}` is a 300-character file name.
OUTPUTS = [  # destinations that cannot be written, refused before any work
    (
        ["convert", "{flux2_tiny}", "/dev/full"],
        2,
        "dst /dev/full: cannot write here: it is not a regular file",
    ),
    (["convert", "{flux2_tiny}", "/proc/x/o.safetensors"], 2, "/proc and /sys are not for files"),
    (["convert", "{flux2_tiny}", "{tmp}/{long}.safetensors"], 2, "the name is too long"),
    (
        ["generate", "--random-weights", "--out", "/proc/x/o.png"],
        2,
        "argument --out: /proc/x/o.png: cannot",
    ),
    (["generate", "--random-weights", "--out", "{tmp}/{long}.png"], 2, "the name is too long"),
    (["generate", "--random-weights", "--out", "{tmp}/{long}/o.png"], 2, "the name is too long"),
    (
        ["parity", "--json", "{tmp}/{long}.json"],
        2,
        "argument --json: {tmp}/{long}.json: cannot write",
    ),
    (
        ["parity", "--plot", "/proc/self/p.png"],
        2,
        "argument --plot: /proc/self/p.png: cannot write here",
    ),
    (["train", "--out", "/proc/x"], 2, "argument --out: /proc/x: cannot write here"),
    (["train", "--out", "{tmp}/{long}"], 2, "argument --out: {tmp}/{long}: cannot write"),
    (
        [
            "cache",
            "{empty}",
            "/proc/x",
            "--model",
            "flux2-tiny",
            "--ae",
            "{flux1_ae}",
            "--text-encoder",
            "{tmp}",
        ],
        2,
        "argument out: /proc/x: cannot write here",
    ),
    (
        ["bench", "--json", "{tmp}/{long}.json"],
        2,
        "argument --json: {tmp}/{long}.json: cannot write",
    ),
]
INPUTS = [  # files checked where they enter
    (
        ["parity", "--model", "flux1-tiny", "--random-weights", "--lora", "{flux1_tiny}"],
        2,
        "{flux1_tiny}: holds a FLUX.1 transformer of width 64 and no LoRA pairs",
    ),
    (
        ["generate", "--random-weights", "--lora", "{flux1_tiny}"],
        2,
        "{flux1_tiny}: holds a FLUX.1 transformer of width 64 and no LoRA pairs",
    ),
    (
        ["parity", "--model", "flux1-tiny", "--checkpoint", "{lora}"],
        2,
        "{lora}: a LoRA file (low-rank A/B pairs), not a model checkpoint",
    ),
    (
        [
            "generate",
            "--model",
            "flux1-tiny",
            "--transformer",
            "{lora}",
            "--ae",
            "{flux1_ae}",
            "--embeddings",
            "{nan_emb}",
        ],
        2,
        "--transformer {lora}: a LoRA file (low-rank A/B pairs), not a model checkpoint",
    ),
    (["train", "--config", "flux1-tiny", "--init", "{lora}"], 2, "--init {lora}: a LoRA file"),
    (
        [
            "convert",
            "{lora}",
            "{tmp}/o.safetensors",
            "--model",
            "flux1-tiny",
            "--to",
            "diffusers",
            "--dtype",
            "fp8",
        ],
        2,
        "--dtype applies to model checkpoints; {lora} is a LoRA file",
    ),
    (
        [
            "convert",
            "{lora}",
            "{tmp}/o.safetensors",
            "--model",
            "flux1-tiny",
            "--to",
            "kohya",
            "--extract",
            "ae",
        ],
        2,
        "--extract applies to model checkpoints; {lora} is a LoRA file",
    ),
    (
        ["convert", "{lora}", "{tmp}/o.safetensors", "--model", "flux1-ae-tiny", "--to", "kohya"],
        2,
        "--model flux1-ae-tiny is a FLUX.1 autoencoder; a LoRA is for a transformer preset",
    ),
    (
        ["convert", "{flux2_tiny}", "{tmp}/o.safetensors", "--model", "flux2-tiny"],
        2,
        "--model is for LoRA files; {flux2_tiny} is a model checkpoint",
    ),
    (
        ["convert", "{missing_key}", "{tmp}/o.safetensors"],
        2,
        "{missing_key}: an incomplete FLUX.1 transformer of width 64: missing 'img_in.weight'",
    ),
    (
        ["convert", "{missing_piece}", "{tmp}/o.safetensors"],
        2,
        "an incomplete FLUX.1 transformer of width 64: missing 'transformer_blocks.0.attn.to_q.weight'",
    ),
    # (no --no-progress: the bar of the write that fails is not drawn into a log, or is erased on a terminal)
    (
        ["convert", "{nan_model}", "{tmp}/o.safetensors"],
        2,
        "{nan_model}: tensor 'img_in.weight' holds NaN or Inf",
    ),
    (
        ["convert", "{i32_model}", "{tmp}/o.safetensors", "--dtype", "bf16"],
        2,
        "{i32_model}: tensor 'img_in.weight' is I32; FLUX weights are floating point",
    ),
    (
        ["generate", "--random-weights", "--init", "{bomb}", "--strength", "0.5"],
        2,
        "{bomb}: 20000 x 20000 pixels (400 MP) is over the 134 MP limit for an input image",
    ),
    (
        ["generate", "--random-weights", "--ref", "{bomb}", "--model", "flux2-tiny"],
        2,
        "{bomb}: 20000 x 20000 pixels",
    ),
    (
        ["generate", "--random-weights", "--device", "banana"],
        2,
        "--device banana: not a device minflux runs on (cpu, cuda, cuda:N, mps)",
    ),
    (
        ["parity", "--model", "flux1-tiny", "--random-weights", "--verify"],
        2,
        "--verify checks the digests a --checkpoint file records; --random-weights has none",
    ),
]
if not memory.nvidia_gpus():  # (on a GPU machine the backend runs)
    INPUTS.append(
        (["bench", "--backends", "jax-cudnn"], 2, "--backends jax-cudnn runs on an NVIDIA GPU only")
    )

# Issue 20 / 23: generate's flags that would do nothing, references, masks, seeds, memory, outputs.
GENERATE_EDGES = [
    # a notice about the file (skipped activation scales) said before its refusal made two lines
    (
        [
            "generate",
            "--model",
            "flux1-tiny",
            "--transformer",
            "{aux_scales}",
            "--ae",
            "{flux1_ae}",
            "--embeddings",
            "{flux2_tiny}",
        ],
        2,
        "--transformer {aux_scales} holds a FLUX.2 transformer of width 64; flux1-tiny needs",
    ),
    (
        ["train", "--init", "{aux_scales}"],
        2,
        "--init {aux_scales} holds a FLUX.2 transformer of width 64",
    ),
    # a transformer given as --ae is not "from different families" ($: the line ends there)
    (
        [
            "generate",
            "--model",
            "flux1-tiny",
            "--transformer",
            "{flux1_tiny}",
            "--ae",
            "{flux1_tiny}",
            "--embeddings",
            "{flux2_tiny}",
        ],
        2,
        "--ae {flux1_tiny} holds a FLUX.1 transformer of width 64; flux1-ae-tiny needs a FLUX.1 autoencoder$",
    ),
    (
        [
            "generate",
            "--model",
            "flux1-tiny",
            "--transformer",
            "{flux1_tiny}",
            "--ae",
            "{flux2_ae}",
            "--embeddings",
            "{flux2_tiny}",
        ],
        2,
        "needs a FLUX.1 autoencoder (the transformer and autoencoder come from different families)",
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
            "--neg-embeddings",
            "{nan_emb}",
        ],
        2,
        "--neg-embeddings applies with --cfg SCALE (true CFG); without it the negative prompt is not used",
    ),
    (
        ["generate", "--random-weights", "--prompt", "a cat", "--negative-prompt", "a dog"],
        2,
        "--negative-prompt applies with --cfg SCALE (true CFG); without it the negative prompt is not used",
    ),
    (
        ["generate", "--random-weights", "--model", "flux1-schnell", "--guidance", "3"],
        2,
        "--guidance: flux1-schnell has no guidance embedder, so distilled guidance does not apply",
    ),
    (
        ["generate", "--random-weights", "--redux-scale", "0.5"],
        2,
        "--redux-scale applies with --redux IMAGE",
    ),
    (
        ["generate", "--random-weights", "--mask-mode", "center"],
        2,
        "--mask-mode applies with --mask MASK",
    ),
    (
        [
            "generate",
            "--random-weights",
            "--model",
            "flux1-fill-dev",
            "--ae-config",
            "flux1-ae",
            "--init",
            "{png}",
            "--mask",
            "{png}",
            "--mask-mode",
            "max",
        ],
        2,
        "--mask-mode: flux1-fill-dev is a Fill model, which reads the mask's pixels itself",
    ),
    (
        [
            "generate",
            "--prompt",
            "a cat",
            "--save-embeddings",
            "{tmp}/e.safetensors",
            "--steps",
            "3",
        ],
        2,
        "--steps does not apply with --save-embeddings, which encodes the prompts and stops",
    ),
    (
        ["generate", "--prompt", "a cat", "--save-embeddings", "/proc/x/e.safetensors"],
        2,
        "argument --save-embeddings: /proc/x/e.safetensors: cannot",
    ),
    (
        ["generate", "--prompt", "a cat", "--save-embeddings", "{tmp}/{long}.safetensors"],
        2,
        "the name is too long",
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
            "--keep-quantized",
        ],
        2,
        "--keep-quantized keeps the quantized weights a --transformer file stores; {flux2_tiny} stores none (F32)",
    ),
    (
        ["generate", "--random-weights", "--model", "flux1-dev", "--ref", "{png}"],
        2,
        "--ref: flux1-dev takes no reference images (FLUX.1 Kontext and FLUX.2 do)",
    ),
    (
        ["generate", "--random-weights", "--model", "flux2-tiny", "--ref", "{thin_ref}"],
        2,
        "--ref {thin_ref}: 400x20: aspect ratio 20.0:1 is over 8:1, the limit for a FLUX.2 reference",
    ),
    (
        ["generate", "--random-weights", "--width", "100000", "--height", "100000"],
        2,
        "flux1-tiny (fp32) at --width 100000 --height 100000 needs about",
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
            "{many_emb}",
            "--width",
            "1024",
            "--height",
            "1024",
        ],
        2,
        "flux2-tiny (bf16) at --width 1024 --height 1024 with 2000 prompts needs about",
    ),
    (
        ["generate", "--random-weights", "--init", "{png}", "--mask", "{black}"],
        2,
        "--mask {black}: nothing to repaint: no latent is marked in mask mode 'max' (white = repaint)",
    ),
    (
        [
            "generate",
            "--random-weights",
            "--init",
            "{png}",
            "--mask",
            "{stroke}",
            "--mask-mode",
            "center",
            "--width",
            "32",
            "--height",
            "32",
        ],
        2,
        "--mask {stroke}: nothing to repaint: no latent is marked in mask mode 'center'; mask mode 'max' repaints",
    ),
    (
        ["generate", "--random-weights", "--only", "3"],
        2,
        "--only 3: the batch has 1 image(s), 0 to 0",
    ),
    (
        ["generate", "--from-png", "{png}"],
        2,
        "--from-png {png}: no minflux settings in its metadata",
    ),
    (
        ["generate", "--from-png", "{png}", "--steps", "2"],
        2,
        "--from-png {png} replays the settings the file records; --steps cannot be added",
    ),
]

ROWS = TRAIN + GENERATE + PARITY + CONVERT + CACHE + BENCH + TOP + OUTPUTS + INPUTS + GENERATE_EDGES


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
    out.update(edge_files(tmp, tiny_checkpoint))
    return {k: str(v) for k, v in out.items()}


def edge_files(tmp, tiny_checkpoint) -> dict:
    """Issue 23's inputs: a LoRA, a model missing a key (and a diffusers one missing a piece), NaN and I32
    weights, a PNG whose header says 20000 x 20000, a 300-character name."""
    from safetensors.numpy import load_file

    from minflux import configs, lora
    from minflux.convert import convert

    out = {"flux1_tiny": tiny_checkpoint("flux1-tiny"), "long": "a" * 300}
    cfg, rng = configs.get("flux1-tiny"), np.random.default_rng(0)
    shapes = lora.linear_shapes(cfg)
    adapters = {
        m: {
            "lora_A": rng.standard_normal((2, shapes[m][1]), np.float32),
            "lora_B": rng.standard_normal((shapes[m][0], 2), np.float32),
            "alpha": 2.0,
        }
        for m in ("img_in", "double_blocks.0.img_attn.qkv")
    }
    out["lora"] = tmp / "lora.safetensors"
    lora.save(out["lora"], adapters, cfg)
    model = load_file(out["flux1_tiny"])
    for name, change in {
        "missing_key": lambda d: d.pop("img_in.weight"),
        "nan_model": lambda d: d.update(
            {"img_in.weight": np.full_like(d["img_in.weight"], np.nan)}
        ),
        "i32_model": lambda d: d.update({"img_in.weight": d["img_in.weight"].astype(np.int32)}),
    }.items():
        d = dict(model)
        change(d)
        out[name] = tmp / f"{name}.safetensors"
        save_file(d, out[name])
    convert(out["flux1_tiny"], tmp / "diffusers.safetensors", digests=False)
    d = load_file(tmp / "diffusers.safetensors")
    del d["transformer_blocks.0.attn.to_q.weight"]
    out["missing_piece"] = tmp / "missing_piece.safetensors"
    save_file(d, out["missing_piece"])
    # FLUX.2 with an activation scale beside a weight, as quantized files carry: the reader notices it
    d = load_file(tiny_checkpoint("flux2-tiny"))
    d["img_in.input_scale"] = np.ones((), np.float32)
    out["aux_scales"] = tmp / "aux_scales.safetensors"
    save_file(d, out["aux_scales"])
    out["bomb"] = tmp / "bomb.png"
    out["bomb"].write_bytes(png_header(20000, 20000))
    from PIL import Image

    # issue 20: a mask that repaints nothing, a 1-pixel stroke (between the pixels diffusers samples), a
    # reference over FLUX.2's 8:1, embeddings of 2000 one-token prompts
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp / "black.png")
    stroke = np.zeros((32, 32), np.uint8)
    stroke[:, 5] = 255
    Image.fromarray(stroke).save(tmp / "stroke.png")
    Image.fromarray(np.full((20, 400, 3), 90, np.uint8)).save(tmp / "thin_ref.png")
    save_file({"txt": np.zeros((2000, 1, 48), np.float32)}, tmp / "many_emb.safetensors")
    out.update(
        {k: tmp / f"{k}.{e}" for k, e in [("black", "png"), ("stroke", "png"), ("thin_ref", "png")]}
    )
    out["many_emb"] = tmp / "many_emb.safetensors"
    return out


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
    if expected.endswith("$"):  # the whole end of the line: no hint after it
        assert lines[0].endswith(expected[:-1].format(**files)), lines[0]
    assert expected.removesuffix("$").format(**files) in lines[0], lines[0]


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


# ---------------------------------------------------------------------------------------------
# Hostile file systems: full, read-only. Exit 2, one line, no traceback, the old file intact, no temp file left
# ---------------------------------------------------------------------------------------------

TINY_PARITY = [
    "parity",
    "--model",
    "flux1-tiny",
    "--random-weights",
    "--resolution",
    "16",
    "--txt-len",
    "2",
]
HOSTILE = [  # (argv, the line's text, the destination that already holds a good file)
    (
        ["generate", "--random-weights", "--no-progress", "--out", "{full}/o.png"],
        "{full}/o.png: cannot write: no space left on the device",
        "o.png",
    ),
    pytest.param(
        [
            "generate",
            "--random-weights",
            "--framework",
            "jax",
            "--no-progress",
            "--out",
            "{full}/o.png",
        ],
        "{full}/o.png: cannot write: no space left on the device",
        "o.png",
        marks=pytest.mark.slow,
    ),
    (
        ["convert", "{flux2_tiny}", "{full}/o.safetensors", "--no-progress"],
        "{full}/o.safetensors: cannot write: about",
        "o.safetensors",
    ),
    pytest.param(
        [*TINY_PARITY, "--json", "{full}/r.json", "--plot", "{full}/p.png"],
        "{full}/r.json: cannot write: no space left on the device",
        "r.json",
        marks=pytest.mark.slow,
    ),
    (
        ["train", "--steps", "1", "--save-every", "1", "--out", "{full}/run"],
        "{full}/run: cannot write: about",
        None,
    ),
    (
        ["generate", "--random-weights", "--out", "{ro}/o.png"],
        "{ro}/o.png: cannot write: the file system is read-only",
        "o.png",
    ),
    (
        ["convert", "{flux2_tiny}", "{ro}/o.safetensors"],
        "the file system is read-only",
        "o.safetensors",
    ),
    (
        ["parity", "--plot", "{ro}/p.png"],
        "argument --plot: {ro}/p.png: cannot write: the file system is read-only",
        "p.png",
    ),
    (
        ["bench", "--json", "{ro}/r.json"],
        "argument --json: {ro}/r.json: cannot write: the file system is read-only",
        "r.json",
    ),
    (
        ["train", "--out", "{ro}/run"],
        "argument --out: {ro}/run: cannot write: the file system is read-only",
        None,
    ),
    (
        [
            "cache",
            "{empty}",
            "{ro}/c",
            "--model",
            "flux2-tiny",
            "--ae",
            "{flux1_ae}",
            "--text-encoder",
            "{tmp}",
        ],
        "argument out: {ro}/c: cannot write: the file system is read-only",
        None,
    ),
]
OLD = {
    "o.png": b"\x89PNG old picture",
    "o.safetensors": b"old weights",
    "r.json": b"{}",
    "p.png": b"old plot",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """{full}: a 1 MB tmpfs holding the old files, then filled to the last byte; {ro}: a read-only bind mount
    holding them. Where mounting is not allowed (not root, a container without CAP_SYS_ADMIN), the same
    folders are made plain and `fake` is set: the test then makes the OS refuse their writes (monkeypatch)."""
    root = tmp_path_factory.mktemp("hostile")
    full, ro = root / "full", root / "ro"
    full.mkdir()
    ro.mkdir()
    mounted = []
    try:
        if os.environ.get("MINFLUX_TEST_NO_MOUNT"):  # (to try the fallback where mounting works)
            raise OSError("mounting not wanted")
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)],
            check=True,
            capture_output=True,
        )
        mounted.append(full)
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        for folder in (full, ro):
            for name, body in OLD.items():
                (folder / name).write_bytes(body)
        if mounted:
            for n, chunk in enumerate(
                (1 << 16, 512, 1)
            ):  # to the last byte: every later write fails
                with (
                    contextlib.suppress(OSError),
                    open(full / f"filler{n}", "wb", buffering=0) as f,
                ):
                    while True:
                        f.write(b"\0" * chunk)
            try:
                subprocess.run(
                    ["mount", "--bind", str(ro), str(ro)], check=True, capture_output=True
                )
                mounted.append(ro)
                subprocess.run(
                    ["mount", "-o", "remount,ro,bind", str(ro)], check=True, capture_output=True
                )
            except (OSError, subprocess.CalledProcessError):
                pass
        yield {"full": str(full), "ro": str(ro), "fake": len(mounted) < 2}
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", str(m)], capture_output=True)


def refuse_writes(monkeypatch, hostile):
    """Without mounts: writes under {full} fail with ENOSPC once opened, {ro} reports a read-only file system and
    refuses to open files (EROFS), as the kernel would."""
    import builtins
    import errno

    from minflux import files

    real_open, real_statvfs = builtins.open, os.statvfs

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).startswith(hostile["ro"]):
            raise OSError(errno.EROFS, "Read-only file system")
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if "w" in mode and str(path).startswith(hostile["full"]) else f

    def fake_statvfs(path):
        st = real_statvfs(path)
        if str(path).startswith(hostile["ro"]):
            return os.statvfs_result((*st[:8], st.f_flag | os.ST_RDONLY, st.f_namemax))
        if str(path).startswith(hostile["full"]):
            return os.statvfs_result((*st[:4], 0, st[5], st[6], 0, st.f_flag, st.f_namemax))
        return st

    monkeypatch.setattr(files, "open", fake_open, raising=False)
    monkeypatch.setattr(files.os, "statvfs", fake_statvfs)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: (0, 0, 0))


@pytest.mark.parametrize(
    "argv,expected,old",
    HOSTILE,
    ids=[" ".join(getattr(r, "values", r)[0]) for r in HOSTILE],
)
def test_hostile_file_systems(argv, expected, old, files, hostile, monkeypatch, capsys, request):
    if argv[0] == "train":  # refused before any model is built
        request.getfixturevalue("no_models")
    if hostile["fake"]:
        refuse_writes(monkeypatch, hostile)
    names = {**files, **hostile}
    argv = [a.format(**names) for a in argv]
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err + captured.out
    assert rc == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith(f"minflux {argv[0]}: error: "), lines[0]
    assert expected.format(**names) in lines[0], lines[0]
    for folder in (hostile["full"], hostile["ro"]):
        assert not [p for p in os.listdir(folder) if ".tmp" in p], os.listdir(
            folder
        )  # no temp file left
        if old is not None:
            assert (Path(folder) / old).read_bytes() == OLD[old]  # the old destination intact


@pytest.fixture
def filling(tmp_path):
    """A 40 MB tmpfs: room for the start-up check of the demo's `--save-every` run (weights and one optimiser
    state, about 26 MB) and its first two checkpoints (about 19.5 MB each), not for the third. Where mounting is
    not allowed, a plain folder and None: the test makes orbax's third save fail as tensorstore reports ENOSPC."""
    folder = tmp_path / "filling"
    folder.mkdir()
    try:
        if os.environ.get("MINFLUX_TEST_NO_MOUNT"):
            raise OSError("mounting not wanted")
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(folder)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        yield folder, None
        return
    try:
        yield folder, True
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def fail_third_save(monkeypatch):
    """Without a tmpfs: orbax's third save raises what tensorstore raises on a full disk."""
    import orbax.checkpoint as ocp

    real, calls = ocp.CheckpointManager.save, []

    def save(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) >= 3:
            raise ValueError(
                f'RESOURCE_EXHAUSTED: Error writing "params" in OCDBT database: Failed writing: "{step}": '
                "Failed to write 2940928 bytes to file 12: No space left on device [os_error_code='28']"
            )
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)


@pytest.mark.slow
def test_disk_filling_during_training_keeps_the_earlier_checkpoints(filling, monkeypatch, capsys):
    """`train --save-every 1` on a disk that fills after the start-up check: orbax's failed save (tensorstore's
    RESOURCE_EXHAUSTED from a background thread, once 63 tracebacks) is one line naming the checkpoint folder,
    exit 2; the partial save is removed, the earlier checkpoints stay, and the latest restores."""
    from minflux_jax import trainer as tr

    folder, mounted = filling
    if not mounted:
        fail_third_save(monkeypatch)
    out = folder / "run"
    rc = main(
        ["train", "--steps", "6", "--batch-size", "8", "--save-every", "1", "--out", str(out)]
    )
    captured = capsys.readouterr()
    # (a progress bar, ended by a newline in a log file, may precede the line; a terminal erases it)
    lines = [line for line in captured.err.splitlines() if line.strip() and "training:" not in line]
    assert "Traceback" not in captured.err + captured.out
    assert rc == 2 and len(lines) == 1, captured.err
    kept = tr.saved_steps(out / "ckpt")
    assert lines[0].startswith(f"minflux train: error: {out / 'ckpt'}: cannot write checkpoint "), (
        lines[0]
    )
    assert kept and lines[0].endswith(
        f": no space left on the device (kept: step {', '.join(map(str, kept))})"
    ), lines[0]
    assert not [
        p.name for p in (out / "ckpt").iterdir() if "tmp" in p.name
    ]  # the partial save removed
    # the latest kept checkpoint restores, with the command's options
    trainer = tr.Trainer(
        data.DEMO,
        data.Shapes(context_dim=data.DEMO.context_in_dim),
        tr.TrainOptions(batch_size=8, ckpt_dir=str(out / "ckpt")),
    )
    assert trainer.restore() == kept[0]
    trainer.close()


# ---------------------------------------------------------------------------------------------
# The first moments: light start-up, --version, interrupts during imports, library messages
# ---------------------------------------------------------------------------------------------

HEAVY = ("torch", "jax", "ml_dtypes", "matplotlib", "PIL", "transformers", "orbax")


@pytest.mark.parametrize(
    "argv,light",
    [
        (["--help"], HEAVY + ("numpy",)),
        (["--version"], HEAVY + ("numpy",)),
        (["generate", "--steps", "0"], HEAVY),
        (["train", "--steps", "0"], HEAVY),
        (["convert", "--help"], HEAVY),
        (["bench", "--help"], HEAVY),
        (["cache", "--help"], HEAVY),
        (["parity", "--resolution", "0"], HEAVY + ("numpy",)),
    ],
)
def test_help_and_argument_errors_import_nothing_heavy(argv, light):
    """`--help` and argument errors answer before torch, jax or ml_dtypes (a second here) are imported: only the
    named command's module is imported to build the parser."""
    code = (
        "import sys\nfrom minflux_cli.main import main\nrc = main(sys.argv[1:])\n"
        f"print(sorted(m for m in {light!r} if m in sys.modules), rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip().splitlines()[-1] in ("[] 0", "[] 2"), proc.stdout + proc.stderr


def test_version(capsys):
    import tomllib

    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    want = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"minflux {want}"


def caught(pid: int, sig: int) -> bool:
    """Whether process pid has a handler for sig (Linux: the SigCgt mask of /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(
        next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16
    )
    return bool(mask >> (sig - 1) & 1)


def console_script(tmp_path) -> Path:
    """A `minflux` script like the one pip writes for the console entry point."""
    script = tmp_path / "minflux"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nfrom minflux_cli.main import cli\nsys.exit(cli())\n"
    )
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(
    "sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_signal_during_imports(tmp_path, sig, code, word):
    """As soon as its handlers are in, `minflux parity` is still importing torch and jax: one line and 130 / 143,
    not a KeyboardInterrupt traceback (status 1) or a silent death by the signal (status -15)."""
    proc = subprocess.Popen(
        [console_script(tmp_path), "parity"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Sent once minflux's handlers are in (SIGTERM caught: Python's own start-up catches SIGINT only), before
    # the frameworks are imported: a fixed sleep raced Python's start-up on a loaded machine.
    deadline = time.monotonic() + 30
    while not caught(proc.pid, signal.SIGTERM):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and err.strip().splitlines() == [f"minflux parity: {word}"], err


def test_interrupt_swallowed_by_a_native_callback_is_delivered_again():
    """Ctrl-C landing in a GC callback (JAX's `_xla_gc_callback`) cannot be raised there: Python reports it as
    "Exception ignored in ...". The hook `main` installs prints nothing and sends the signal again, so it is
    raised where the program is."""
    code = """
import os, signal, sys, time
from minflux_cli import main as m
signal.signal(signal.SIGINT, m._stop)
sys.unraisablehook = m._unraisable(False, sys.unraisablehook)
class Callback:
    def __del__(self):
        raise KeyboardInterrupt  # what the handler raised inside the callback
try:
    Callback()
    time.sleep(10)
    print("lost")
except KeyboardInterrupt:
    print("delivered", flush=True)
    os._exit(0)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "delivered" and proc.stderr == "", proc.stdout + proc.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_library_messages_off_stderr_unless_verbose(verbose, capsys):
    import logging
    import warnings

    from minflux_cli.main import _quiet_libraries

    # (pytest records warnings instead of printing them: `seen` is what would reach stderr)
    with warnings.catch_warnings(record=True) as seen, _quiet_libraries(verbose):
        logging.getLogger("absl").warning("Waiting for previous save to complete took 1.2 seconds")
        warnings.warn_explicit(
            "a library's deprecation", UserWarning, "lib.py", 1, module="orbax.checkpoint"
        )
        logging.getLogger("minflux").warning("our notice")
        warnings.warn_explicit("our warning", UserWarning, "lora.py", 1, module="minflux.lora")
    err = capsys.readouterr().err + "".join(str(w.message) for w in seen)
    assert "our notice" in err and "our warning" in err
    assert ("Waiting for previous save" in err) == verbose and (
        "a library's deprecation" in err
    ) == verbose


@pytest.mark.slow
def test_temp_folder_of_a_killed_parity_run_is_removed_by_the_next(tmp_path, monkeypatch):
    """SIGKILL leaves `minflux-parity-PID-XXXX/` behind (no process can clean up after SIGKILL); the next
    parity run, even one that stops at an argument error, removes it."""
    import tempfile

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "minflux_cli", "parity"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("minflux-parity-*/*.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    left = list(tmp_path.glob("minflux-parity-*"))
    assert len(left) == 1 and left[0].name.startswith(f"minflux-parity-{proc.pid}-")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["parity", "--model", "flux1-tiny", "--random-weights", "--verify"]) == 2
    assert not left[0].exists()


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 47536061032 bytes."),  # XLA
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        ),
        MemoryError(),
    ],
)
def test_out_of_memory_is_one_line_with_the_levers(monkeypatch, capsys, error):
    """A run the estimates let start that then runs out of memory (XLA's RESOURCE_EXHAUSTED, torch's allocator):
    one line naming it and what the command can change, exit 1, not a traceback. Other failures stay
    tracebacks (a bug must show where it is)."""
    from minflux_cli import generate

    def fail(args):
        raise error

    monkeypatch.setattr(generate, "run", fail)
    assert main(["generate", "--random-weights"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minflux generate: error: out of memory ("), (
        lines
    )
    assert lines[0].endswith(
        "try --offload blocks, --keep-quantized with a quantized file, --dtype bf16 or a smaller size"
    )
    monkeypatch.setattr(generate, "run", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["generate", "--random-weights"])


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_nan_picture_is_one_line_and_writes_nothing(framework, tmp_path, capsys):
    """--guidance 1e38 is a float32 number, but the sampler overflows: the picture was written black with exit 0
    (and numpy's "invalid value encountered in cast" on stderr). Now one line naming the numbers to check, exit 1,
    the existing file as it was."""
    out = tmp_path / "keep.png"
    out.write_bytes(b"an earlier picture")
    argv = ["generate", "--random-weights", "--framework", framework, "--guidance", "1e38"]
    argv += ["--width", "16", "--height", "16", "--steps", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "minflux generate: error: the picture holds NaN or Inf values"
    ), lines
    assert lines[0].endswith("check --guidance, --cfg and the --lora scales, or try --dtype fp32")
    assert out.read_bytes() == b"an earlier picture"


@pytest.mark.slow
def test_diverged_training_is_one_line_and_keeps_the_finite_checkpoints(tmp_path):
    """--lr 1e30: the loss turns NaN at step 3. The run wrote a NaN model.safetensors with exit 0 (and with
    --save-every, NaN checkpoints as the latest). Now one line, exit 1, no model written, the checkpoints of the
    finite steps complete (no orbax thread dying at exit with a traceback, no temporary save left)."""
    out = tmp_path / "run"
    argv = ["train", "--steps", "4", "--lr", "1e30", "--save-every", "1", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "minflux_cli", *argv], capture_output=True, text=True, timeout=300
    )
    errors = [
        line
        for line in proc.stderr.replace("\r", "\n").splitlines()
        if line.strip() and "training:" not in line
    ]
    assert proc.returncode == 1, proc.stderr
    assert len(errors) == 1 and errors[0].startswith(
        "minflux train: error: step 3: the loss is nan"
    ), errors
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["1", "2", "run.json"]


def test_out_of_memory_in_cache_names_its_levers(tmp_path, monkeypatch, capsys):
    """`cache --max-length 100000` ran out of memory with no lever named (cache had no entry)."""
    from minflux_cli import cache

    def fail(args):
        raise MemoryError

    monkeypatch.setattr(cache, "run", fail)
    assert main(["cache", str(tmp_path), str(tmp_path / "out"), "--model", "flux2-tiny"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minflux cache: error: out of memory (")
    assert lines[0].endswith("try a smaller --batch-size, --max-length or --size, or --dtype bf16")
