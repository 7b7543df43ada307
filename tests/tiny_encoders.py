"""Write the tiny seeded files the tests build, to try `minflux cache` (and generate, train) without downloads.

    python tests/tiny_encoders.py tiny/

makes, in tiny/:
  flux1/        CLIP-L + T5 text encoders in the FLUX.1 repository layout (text_encoder/, tokenizer/, ...),
                sized for flux1-tiny (T5 width 40, CLIP width 24)
  qwen3/        a 4-layer Qwen3 model directory for flux2-tiny (3 stacked layers x 16 = 48: --text-encoder-layers 1,2,3)
  flux1-tiny.safetensors, flux2-tiny.safetensors, flux1-ae-tiny.safetensors, flux2-ae-tiny.safetensors
  images/       four small pictures, each with its NAME.txt caption

The encoders are random (seeded) transformers models with small BPE tokenizers trained in-process: the builders
of tests/test_generate_text.py. Their embeddings mean nothing; the files exercise every step of the real path.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np


def main(out: Path) -> None:
    from PIL import Image
    from test_generate_text import make_encoder  # (the script's folder, tests/, is on sys.path)

    import minflux_torch as mt
    from minflux import configs

    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty; pass a new folder")
    f1, f2 = configs.get("flux1-tiny"), configs.get("flux2-tiny")
    make_encoder(out / "flux1" / "text_encoder", "clip", f1.vec_in_dim)
    make_encoder(out / "flux1" / "text_encoder_2", "t5", f1.context_in_dim)
    for sub in ("", "_2"):  # tokenizers in their own folders, as in the FLUX.1 repositories
        tok = out / "flux1" / f"tokenizer{sub}"
        tok.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(out / "flux1" / f"text_encoder{sub}" / name, tok)
    make_encoder(out / "qwen3", "qwen3", f2.context_in_dim)
    for name in ("flux1-tiny", "flux2-tiny", "flux1-ae-tiny", "flux2-ae-tiny"):
        mt.save_model(mt.build_model(name, seed=0), out / f"{name}.safetensors")
    (out / "images").mkdir()
    rng = np.random.default_rng(0)
    captions = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
    for i, caption in enumerate(captions):
        pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(out / "images" / f"im{i}.png")
        (out / "images" / f"im{i}.txt").write_text(caption, encoding="utf-8")
    print(
        f"wrote {out}: flux1/ and qwen3/ text encoders, tiny transformers and autoencoders, images/"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
