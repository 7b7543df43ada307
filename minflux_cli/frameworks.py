"""The one place a command picks a framework: its package, pipeline, text encoders, dtypes and device."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np

from minflux_cli.args import UsageError


@dataclasses.dataclass(frozen=True)
class Framework:
    """`minflux_torch` or `minflux_jax` behind the same calls; `kw` carries dtype (and the torch device)."""

    name: str  # "torch" | "jax"
    dtype: str  # "fp32" | "bf16"
    device: str | None = None  # torch only; default cuda when available

    def __post_init__(self):
        if self.name == "torch" and self.device is not None:
            import torch

            try:
                device = torch.device(self.device)
            except (RuntimeError, ValueError):
                device = None
            if device is None or device.type not in ("cpu", "cuda", "mps"):
                raise UsageError(
                    f"--device {self.device}: not a device minflux runs on (cpu, cuda, cuda:N, mps)"
                )
            if device.type == "cuda" and not torch.cuda.is_available():
                raise UsageError(f"--device {self.device}, but PyTorch sees no CUDA device")
            if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
                raise UsageError(
                    f"--device {self.device}, but PyTorch sees {torch.cuda.device_count()} CUDA device(s)"
                )
            if device.type == "mps" and not torch.backends.mps.is_available():
                raise UsageError(f"--device {self.device}, but PyTorch sees no Apple GPU (MPS)")

    def _import(self, module: str = ""):
        return importlib.import_module(f"minflux_{self.name}{'.' + module if module else ''}")

    @property
    def package(self):
        return self._import()

    @property
    def pipeline(self):
        return self._import("pipeline")

    @property
    def offload(self):
        return self._import("offload")

    @property
    def text(self):
        return self._import("text")

    @property
    def kw(self) -> dict:
        """dtype= (and device= for torch) for build_model / load_model."""
        if self.name == "torch":
            import torch

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            return {
                "dtype": {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype],
                "device": device,
            }
        import jax.numpy as jnp

        return {"dtype": {"bf16": jnp.bfloat16, "fp32": jnp.float32}[self.dtype]}

    def model(self, cfg, path=None, seed: int = 0):
        """A model of `cfg`: loaded from `path`, or seeded random weights (the same in both frameworks)."""
        if path is None:
            return self.package.build_model(cfg, seed=seed, **self.kw)
        return self.package.load_model(cfg, path, **self.kw)

    def redux_encoder(self, directory, embedder=None):
        """FLUX.1 Redux's SigLIP + embedder (`load_redux`), in this framework's dtype."""
        return self._import("redux").load_redux(directory, **self.kw, embedder=embedder)

    def encode_prompts(
        self, kind: str, directory, prompts: list[str], **kw
    ) -> dict[str, np.ndarray]:
        """Prompt embeddings as numpy in the encoder's dtype (the encoder is freed before this returns)."""
        out = self.text.encode_prompts(kind, directory, prompts, **self.kw, **kw)
        if self.name == "torch":
            from minflux_torch.load import to_numpy

            return {k: to_numpy(v) for k, v in out.items()}
        import jax

        return {k: np.asarray(jax.device_get(v)) for k, v in out.items()}
