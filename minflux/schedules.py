"""Framework-free sampling arithmetic: timestep schedules, img2img start, size checks (numpy only).

Follows black-forest-labs/flux `src/flux/sampling.py` (`time_shift`, `get_lin_function`,
`get_schedule`) and black-forest-labs/flux2 `src/flux2/sampling.py` (`compute_empirical_mu`,
`generalized_time_snr_shift`). diffusers computes the same numbers another way (sigmas
`linspace(1, 1/n, n)` shifted by `FlowMatchEulerDiscreteScheduler`, then a 0 appended, with mu from
`FluxPipeline.calculate_shift` / `Flux2Pipeline.compute_empirical_mu`); tests/test_sampling.py checks
that both agree to 1e-6. Both `minflux_torch/sampling.py` and `minflux_jax/sampling.py` use this file,
so the two frameworks integrate over exactly the same float64 timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from minflux import family

# Pixels per latent token: the VAE downsamples 8x and the transformer sees 2x2 patches.
PIXELS_PER_TOKEN = 16


def time_shift(mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
    """exp(mu) / (exp(mu) + (1/t - 1)^sigma): moves the schedule toward t = 1 (more noise) as mu grows."""
    t = np.asarray(t, np.float64)
    with np.errstate(divide="ignore"):  # t = 0 -> 1/t = inf -> shift(0) = 0, as in BFL's code
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(
    x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15
) -> Callable[[float], float]:
    """FLUX.1's mu: the line through (256 tokens, 0.5) and (4096 tokens, 1.15)."""
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's mu, fitted by BFL: linear in the step count between fits at 10 and 200 steps,
    and only in the sequence length above 4300 tokens (constants copied from the official code)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


# The schedule shift mu of each family (`minflux.family.Family.mu`), from (image tokens, steps).
MU: dict[str, Callable[[int, int], float]] = {
    "resolution": lambda seq_len, steps: get_lin_function()(seq_len),  # FLUX.1
    "empirical": compute_empirical_mu,  # FLUX.2
}


def get_schedule(num_steps: int, image_seq_len: int, name: str, shift: bool = True) -> list[float]:
    """num_steps + 1 times from 1 (noise) to 0 (image), for the family called `name` ("flux1",
    "flux2").

    FLUX.1 shifts with mu linear in the token count; schnell runs unshifted (`shift=False`). FLUX.2
    always shifts, with BFL's empirical mu that also depends on the step count. `image_seq_len`
    counts the generated image's tokens only, never reference tokens. Raises ValueError for fewer
    than one step or an unknown family."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    spec = family.get(name)
    timesteps = np.linspace(1.0, 0.0, num_steps + 1)  # float64: both frameworks get the same list
    if shift or spec.shift_always:
        timesteps = time_shift(MU[spec.mu](image_seq_len, num_steps), 1.0, timesteps)
    return [float(t) for t in timesteps]


def strength_start(num_steps: int, strength: float) -> int:
    """img2img: index of the first step to run, as diffusers' `FluxImg2ImgPipeline.get_timesteps`.

    strength 1 runs every step from pure noise; strength 0.6 skips the first 40% of the schedule and
    starts from the image noised to the time at that index.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init_timestep = min(num_steps * strength, num_steps)
    start = int(max(num_steps - init_timestep, 0))
    if start >= num_steps:
        raise ValueError(f"strength {strength} with {num_steps} steps leaves no step to run")
    return start


def check_size(width: int, height: int, multiple: int = PIXELS_PER_TOKEN) -> None:
    """Image sides must be positive multiples of 16 pixels (8x VAE downsampling, then 2x2 patches)."""
    for name, v in (("width", width), ("height", height)):
        if v <= 0 or v % multiple:
            raise ValueError(
                f"{name} {v} is not a positive multiple of {multiple} pixels "
                f"(the autoencoder downsamples {multiple // 2}x and the transformer sees 2x2 latent "
                f"patches); try {max(multiple, round(v / multiple) * multiple)}"
            )


def token_grid(
    width: int, height: int, pixels_per_token: int = PIXELS_PER_TOKEN
) -> tuple[int, int]:
    """(h, w) of the image-token grid for a width x height picture (checked to be multiples of the token size).

    16 pixels per token for the real autoencoders; the tiny test autoencoders downsample less.
    """
    check_size(width, height, pixels_per_token)
    return height // pixels_per_token, width // pixels_per_token
