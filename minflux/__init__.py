"""minflux core: configs, key maps and safetensors IO, free of any deep-learning framework."""

from minflux.checkpoint import CheckpointError

__all__ = ["CheckpointError"]
