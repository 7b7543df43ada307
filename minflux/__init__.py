"""minflux core: configs, key maps and safetensors IO, free of any deep-learning framework."""

from minflux.errors import CheckpointError  # (light: the commands' --help must not import numpy)

__all__ = ["CheckpointError"]
