"""The guided step with its batch split across CPU threads, one core each.

Every part of a guided step is per-sample (convolutions, GroupNorm, attention, the classifier's
input gradient of a sum of per-sample log-probabilities, the update rule), so running batch
slices concurrently gives the same samples as one call, up to float rounding (a convolution
over a slice may round otherwise than over the whole batch: the bundled UNet's eps by 1e-6 at 8
against 16). Measured on the 2-core CI machine (bench/results): as fast as torch's intra-op
threads when the machine is idle, and much faster
when it is loaded, since a one-core worker never waits at an OpenMP barrier for a thread the
scheduler has parked (a tiny model's 6-step run took 0.25 s here against 6 s with two intra-op
threads under load). The slices are views (labels too), and the noise is drawn by the caller for
the whole batch, so a seed gives the same images as the eager engine.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from fastdiff.diffusion.samplers import narrow_batch

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _one_thread(barrier: threading.Barrier) -> None:
    # A thread's intra-op count is set lazily from the process-wide one on its first torch call;
    # trigger that first, then pin this worker to one core's worth of intra-op threads.
    torch.get_num_threads()
    torch.set_num_threads(1)
    barrier.wait()


def worker_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads that each run torch with one intra-op thread.

    Setting a worker's thread count also sets the process default, so it is put back once every
    worker has started: the caller's own thread count is left as it was."""
    with _pools_lock:
        if workers not in _pools:
            previous = torch.get_num_threads()
            barrier = threading.Barrier(workers + 1)
            pool = ThreadPoolExecutor(workers, thread_name_prefix="fastdiff-step")
            for _ in range(workers):
                pool.submit(_one_thread, barrier)
            barrier.wait()
            torch.set_num_threads(previous)
            _pools[workers] = pool
        return _pools[workers]


def _chunks(n: int, workers: int) -> list[tuple[int, int]]:
    """(start, length) of at most ``workers`` near-equal slices of a batch of n."""
    k = max(1, min(workers, n))
    sizes = [n // k + (i < n % k) for i in range(k)]
    starts = [sum(sizes[:i]) for i in range(k)]
    return list(zip(starts, sizes))


def _join(parts: list):
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, tuple | list):
        return type(first)(_join(list(p)) for p in zip(*parts))
    return first


class BatchParallelStep:
    """``(x, t, noise, state) -> (x_next, pred_xstart, state)`` over ``workers`` batch slices.

    ``step`` is a ``SamplingStep``; one narrowed copy per slice (its label views included) is made
    the first time a batch size is seen. A batch smaller than ``workers`` uses fewer workers.
    """

    def __init__(self, step, workers: int):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.step, self.workers = step, workers
        self._slices: dict[int, list[tuple[int, int, object]]] = {}

    def _slices_for(self, n: int):
        if n not in self._slices:
            self._slices[n] = [(a, m, self.step.narrow(a, m, n)) for a, m in _chunks(n, self.workers)]
        return self._slices[n]

    def __call__(self, x: Tensor, t: Tensor, noise: Tensor | None, state):
        n = x.shape[0]
        slices = self._slices_for(n)
        # A single slice (batch 1) runs on a one-core worker too: on the caller's thread it took
        # torch's intra-op threads, 0.114 s a guided step of the bundled model at 2 threads
        # against 0.034 s on one (OpenMP's barriers at a batch too small to split).
        pool = worker_pool(self.workers)
        # autocast is per thread: the caller's (a notebook's `with torch.autocast("cpu")`) goes
        # with each slice, or the slices would compute in fp32 where the eager step does not
        enabled, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

        def run(a: int, m: int, sub):
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=enabled):
                return sub(*(narrow_batch(v, a, m, n) for v in (x, t, noise, state)))

        futures = [pool.submit(run, a, m, sub) for a, m, sub in slices]
        parts = [f.result() for f in futures]
        return parts[0] if len(parts) == 1 else _join(parts)  # one slice's outputs are whole
