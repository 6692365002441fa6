"""What every update rule is: the one protocol the shared loop (and every engine) calls.

A rule is built once for a process, a device and a dtype; it turns its coefficient
tables into device tensors then, so a step only gathers from them (no host->device copy, nothing
a CUDA graph capture could trip on) and nothing is stored inside the process object.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor


class UpdateRule(Protocol):
    # Where classifier guidance applies: DDPM's mean, or the score, whose x0 is clipped before
    # guiding ("score", guided-diffusion's DDIM) or after ("score_then_clip", DPM-Solver++).
    guidance: Literal["mean", "score", "score_then_clip"]
    needs_noise: bool  # whether a step consumes fresh noise

    def init_state(self, x: Tensor) -> Any: ...

    def __call__(
        self, out: dict, x: Tensor, t: Tensor, noise: Tensor | None, state: Any
    ) -> tuple[Tensor, Any]:
        """x_t and the process's prediction ``out`` at respaced steps ``t`` -> (x_next, state)."""


def device_tables(device, dtype, *arrays: np.ndarray) -> tuple[Tensor, ...]:
    """float64 tables as device tensors of ``dtype`` (float32 when None)."""
    dtype = dtype or torch.float32
    return tuple(
        torch.from_numpy(np.asarray(a, dtype=np.float64)).to(device=device, dtype=dtype) for a in arrays
    )


def per_sample(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """table[t] shaped to broadcast against x."""
    return table[t].view(-1, *([1] * (x.ndim - 1)))
