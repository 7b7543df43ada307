"""FLUX text encoders in Flax NNX: T5 v1.1 and CLIP-L (FLUX.1), Qwen3 and Mistral Small 3.x (FLUX.2).

```python
from minflux_jax import text
enc = text.load_text_encoder("qwen3", "FLUX.2-klein-4B/", dtype=jnp.bfloat16)     # or "flux1", "mistral", ...
out = enc.encode(["a cat"])          # {"ctx": (1, 512, 7680)}; FLUX.1: {"txt": (1, 512, 4096), "vec": (1, 768)}
text.save_prompt_embeddings("cat.safetensors", out, "qwen3", ["a cat"])
del enc                              # frees the encoder before the transformer is loaded
```
"""

from minflux.text import load_embeddings
from minflux_jax.text.encoder import (
    Flux1TextEncoder,
    TextEncoder,
    encode_prompts,
    load_model,
    load_text_encoder,
    save_prompt_embeddings,
)

__all__ = [
    "Flux1TextEncoder",
    "TextEncoder",
    "encode_prompts",
    "load_embeddings",
    "load_model",
    "load_text_encoder",
    "save_prompt_embeddings",
]
