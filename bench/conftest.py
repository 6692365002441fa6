"""Benchmark plumbing: machine info for the JSON, run order, the time budget, a fallback fixture.

- ``pytest_benchmark_update_machine_info`` adds GPU name, driver, CUDA, torch and triton versions
  to the benchmark JSON's machine_info, and ``pytest_benchmark_update_json`` the measured copy
  bandwidth / matmul rates beside it (``fastdiff_rates``).
- Items run in priority order (the issue's targets, then fp16 kernels; see ``shapes.priority``)
  so a run cut short by the budget still covers the main cases; ``FASTDIFF_BENCH_DEADLINE``
  (unix time) skips what is left.
- Without pytest-benchmark installed, a minimal ``benchmark`` fixture stands in (the GPU machine
  may lack the plugin); results then come only from ``FASTDIFF_BENCH_RECORDS`` (run_gpu.py reads
  those either way).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from types import SimpleNamespace

import pytest
import torch

from bench import settings, shapes, timing


def pytest_configure(config):
    """Bad FASTDIFF_BENCH_* values end the run before collection, in one line; CPU benchmarks
    run on a deliberate thread count."""
    try:
        settings.check()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    torch.set_num_threads(settings.threads())


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastdiff"] = {**timing.device_info(), "bench_size": shapes.bench_size()}


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The measured rates differ from run to run, so they sit beside machine_info, not in it:
    ``--benchmark-compare`` warns whenever machine_info differs from the saved run's."""
    output_json["fastdiff_rates"] = timing.reference_rates(shapes.bench_device())


def pytest_collection_modifyitems(config, items):
    def key(indexed):
        index, item = indexed
        if item.path.parent.name != "bench":
            return (-1, index)
        params = getattr(getattr(item, "callspec", None), "params", {})
        case = params.get("case")
        if isinstance(case, (shapes.GNCase, shapes.AttnCase, shapes.UpCase)):
            return (shapes.priority(case), index)
        if "impl" in params and "mode" in params:  # test_sampling: case is (name, batch)
            return (shapes.sampling_priority(case[0], params["impl"], params["mode"]), index)
        return (-1, index)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


@pytest.fixture(autouse=True)
def _time_budget():
    timing.TEST_STARTED = time.time()  # each record's wall_s counts from here
    deadline = settings.deadline()
    if deadline is not None and time.time() > deadline:
        pytest.skip("time budget exhausted (FASTDIFF_BENCH_DEADLINE)")


@pytest.fixture(scope="session")
def device() -> torch.device:
    dev = shapes.bench_device()
    timing.reference_rates(dev)  # calibrate once, before any benchmark runs
    return dev


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class _FallbackBenchmark:
    """The part of pytest-benchmark's fixture the benches use: pedantic(), extra_info, stats."""

    def __init__(self, node):
        self.name = node.name
        self.fullname = node.nodeid
        self.group = None
        self.extra_info: dict = {}
        self.stats = None

    def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        times = []
        for i in range(warmup_rounds + rounds):
            call_args, call_kwargs = setup() if setup is not None else (args, kwargs or {})
            t0 = time.perf_counter()
            for _ in range(iterations):
                result = target(*call_args, **call_kwargs)
            if i >= warmup_rounds:
                times.append((time.perf_counter() - t0) / iterations)
        self.stats = SimpleNamespace(
            min=min(times),
            max=max(times),
            mean=statistics.fmean(times),
            median=statistics.median(times),
            stddev=statistics.stdev(times) if len(times) > 1 else 0.0,
            rounds=len(times),
        )
        return result


def _plugin_missing() -> bool:
    """No pytest-benchmark (``FASTDIFF_BENCH_FALLBACK=1`` with ``-p no:benchmark`` rehearses that)."""
    return (
        importlib.util.find_spec("pytest_benchmark") is None
        or os.environ.get("FASTDIFF_BENCH_FALLBACK") == "1"
    )


if _plugin_missing():

    @pytest.fixture
    def benchmark(request):
        return _FallbackBenchmark(request.node)
