"""The whole guided step as one CUDA graph, captured on first use and replayed every step
(``graph``), or all the loop's steps as one graph replayed once per batch (``graph-loop``).

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

from fastdiff.diffusion.samplers import track_first_bad


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

    def _record(self, body, *inputs) -> None:
        """Copy ``inputs`` into static buffers, warm the step up on a side stream, then capture
        ``body(*buffers)`` (the step, or the whole loop) with the guidance on its own stream."""
        start = time.perf_counter()
        self.inputs = tuple(_static(v) if isinstance(v, Tensor) or v is None else v for v in inputs)
        x = self.inputs[0]
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for i in range(self.warmup_steps):
                self.step(*self._step_inputs(i))
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.step.guidance_stream = torch.cuda.Stream(device=x.device)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.outputs = body(*self.inputs)
        finally:
            self.step.guidance_stream = None
        torch.cuda.synchronize(x.device)
        self.capture_seconds = time.perf_counter() - start

    def _step_inputs(self, i: int) -> tuple:
        """The step's arguments for warm-up run i, from the static buffers."""
        return self.inputs

    def _replay(self, *inputs):
        for dst, src in zip(self.inputs, inputs):
            if isinstance(dst, Tensor) and src is not dst:
                dst.copy_(src)
        self.graph.replay()
        return self.outputs

    def __call__(self, x: Tensor, t: Tensor, noise: Tensor | None, state):
        if self.graph is None:
            self._record(self.step, x, t, noise, state)
        return self._replay(x, t, noise, state)


class LoopGraph(GraphStep):
    """The whole sampling loop as one CUDA graph: ``run_steps`` hands it x_T, every step's index
    row and every step's noise (drawn before the loop, in its order) and gets x_0 back from one
    replay: no launch or Python work between steps. Called as a step it runs the step eagerly
    (the Sampler's warm-up before capture). Costs: static noise for all n steps (stochastic
    samplers), and a callback or progress bar sees only the last step."""

    def __call__(self, x: Tensor, t: Tensor, noise: Tensor | None, state):
        return self.step(x, t, noise, state)

    def _step_inputs(self, i: int) -> tuple:
        x, timesteps, noises, state = self.inputs
        k = i % len(timesteps)
        return x, timesteps[k], None if noises is None else noises[k], state

    def _loop(self, x: Tensor, timesteps: Tensor, noises: Tensor | None, state):
        n = len(timesteps)
        first_bad = torch.full((), n, dtype=torch.long, device=x.device)
        pred_xstart = x
        for i in range(n):
            x, pred_xstart, state = self.step(x, timesteps[i], None if noises is None else noises[i], state)
            first_bad = track_first_bad(first_bad, i, x, n)
        return x, pred_xstart, first_bad

    def capture(self, x: Tensor, timesteps: Tensor, noises: Tensor | None, state) -> None:
        """Capture the loop for this batch shape, step count and noise (done once, before use)."""
        self._record(self._loop, x, timesteps, noises, state)

    def run_loop(self, x: Tensor, timesteps: Tensor, noises: Tensor | None, state):
        """-> (x_0, the last step's pred_xstart, the first non-finite step's index or n): one replay
        on these inputs (the outputs are the graph's buffers, overwritten by the next replay)."""
        if self.graph is None:
            self.capture(x, timesteps, noises, state)
        return self._replay(x, timesteps, noises, state)
