"""fp32 on CUDA means TF32 off in both frameworks: set it, then assert it (never trust it)."""

from __future__ import annotations


def configure(device: str, allow_tf32: bool = False) -> dict:
    """Set matmul/conv fp32 precision in PyTorch and JAX; return the settings actually in force."""
    import jax
    import torch

    mode = "tf32" if allow_tf32 else "ieee"
    # The legacy flags first, to the same value: torch raises on a later read of the legacy
    # `torch.backends.cudnn.allow_tf32` (torch.compile's conv lowering reads it) when it disagrees with the
    # per-op settings; set after them, the legacy setter would reset the per-op settings to "none".
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.fp32_precision = mode
    # cuDNN conv TF32 is on by default (matters for the VAE); rnn too, so conv and rnn agree
    torch.backends.cudnn.conv.fp32_precision = mode
    torch.backends.cudnn.rnn.fp32_precision = mode
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if allow_tf32 else "highest")
    return settings()


def settings() -> dict:
    import jax
    import torch

    return {
        "torch_matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        "torch_cudnn_conv_fp32_precision": torch.backends.cudnn.conv.fp32_precision,
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
    }


def assert_full_precision() -> dict:
    """Raise unless fp32 matmuls and convolutions are IEEE fp32 in both frameworks."""
    s = settings()
    expected = {
        "torch_matmul_fp32_precision": "ieee",
        "torch_cudnn_conv_fp32_precision": "ieee",
        "jax_default_matmul_precision": "highest",
    }
    wrong = {k: v for k, v in s.items() if v != expected[k]}
    if wrong:
        raise RuntimeError(f"fp32 parity needs TF32 off; these settings are not: {wrong}")
    return s
