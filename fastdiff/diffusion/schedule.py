"""Beta schedules and timestep respacing, bit-compatible with guided-diffusion.

Everything here is float64 numpy: checkpoints were trained against these exact tables, and
the sampling trajectory of a respaced process depends on every rounding step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

from ..config import unknown_choice


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas of the "linear" (Ho et al., scaled so any T spans the same range) or "cosine" schedule."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(unknown_choice("beta schedule", name, ("linear", "cosine")))


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretize a continuous alpha_bar(s), s in [0, 1]; betas are clipped to max_beta so the
    last step of the cosine schedule does not become a singularity."""
    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


def _count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            "expected 'ddimN' or comma-separated step counts such as '250' or '10,15,20'"
        ) from None


def space_timesteps(num_timesteps: int, spec: str | Iterable[int]) -> list[int]:
    """Kept steps of a ``num_timesteps`` process for a respacing spec, sorted ascending.

    ``"ddimN"`` takes the smallest integer stride giving exactly N steps (DDIM paper striding);
    ``"a,b,c"`` (or a list of counts) splits the process into equal sections and takes evenly
    rounded steps from each, as guided-diffusion does.
    """
    if isinstance(spec, str):
        if spec.startswith("ddim"):
            count = _count(spec[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == count:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {count} steps with an integer stride")
        counts = [_count(part) for part in spec.split(",")]
    else:
        counts = [int(c) for c in spec]
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    steps: set[int] = set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.add(start + round(cur))
            cur += stride
        start += size
    return sorted(steps)


def kept_steps(num_timesteps: int, spec: str | Iterable[int]) -> list[int]:
    """``space_timesteps`` of a user's respacing, refusing one that keeps under 2 steps: no
    process (and no sampler) has fewer. A ValueError says which."""
    kept = space_timesteps(num_timesteps, spec)
    if len(kept) < 2:
        raise ValueError(f"keeps {len(kept)} step(s); a process needs 2")
    return kept


def respace_betas(alphas_cumprod: np.ndarray, use_timesteps: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the process that keeps only ``use_timesteps``, and the kept original steps.

    The new process has the same alpha_bar at every kept step, so a model trained on the full
    process is valid on it when called with the original timesteps (the returned map).
    """
    keep = set(int(t) for t in use_timesteps)
    last = 1.0
    betas, timestep_map = [], []
    for i, alpha_cumprod in enumerate(alphas_cumprod):
        if i in keep:
            betas.append(1 - alpha_cumprod / last)
            last = alpha_cumprod
            timestep_map.append(i)
    return np.array(betas, dtype=np.float64), np.array(timestep_map, dtype=np.int64)
