"""The whole guided step as one CUDA graph, captured on first use and replayed every step.

Every tensor the step reads or writes lives in a static buffer: each call copies x_t, the step
index, the noise and the rule's state into the capture's inputs (device-to-device copies, no
host sync, no allocation) and replays. The noise is drawn outside the graph from the caller's
generator, exactly as the eager loop draws it, so a seed gives the same samples in every engine.
The classifier's forward and input gradient run on a second stream beside the UNet.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor


def _static(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()


class GraphStep:
    """``(x, t, noise, state) -> (x_next, pred_xstart, state)`` replaying one captured graph.

    The returned tensors are the graph's output buffers: the next call overwrites them (the loop
    feeds x_next straight back in; callers keeping a step's output clone it).
    """

    warmup_steps = 3  # eager runs on a side stream before capture (cuDNN/cuBLAS autotuning, lazy init)

    def __init__(self, step):
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_seconds = 0.0

    def _capture(self, x: Tensor, t: Tensor, noise: Tensor | None, state) -> None:
        start = time.perf_counter()
        self.inputs = (
            _static(x),
            _static(t),
            _static(noise),
            _static(state) if isinstance(state, Tensor) else state,
        )
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                self.step(*self.inputs)
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.step.guidance_stream = torch.cuda.Stream(device=x.device)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.outputs = self.step(*self.inputs)
        finally:
            self.step.guidance_stream = None
        torch.cuda.synchronize(x.device)
        self.capture_seconds = time.perf_counter() - start

    def __call__(self, x: Tensor, t: Tensor, noise: Tensor | None, state):
        if self.graph is None:
            self._capture(x, t, noise, state)
        sx, st, snoise, sstate = self.inputs
        for dst, src in ((sx, x), (st, t), (snoise, noise), (sstate, state)):
            if isinstance(dst, Tensor) and src is not dst:
                dst.copy_(src)
        self.graph.replay()
        return self.outputs
