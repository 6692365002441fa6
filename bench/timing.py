"""Timing helpers shared by the benchmarks and the GPU runner.

Every timed callable ends with ``torch.cuda.synchronize()`` on CUDA, so pytest-benchmark's wall
clock covers the kernels and not just their launch. On CUDA each benchmark is also timed with
``triton.testing.do_bench`` (CUDA events, L2 flushed before every run) in the same process, so
the torch.compile baselines are not rebuilt for it. Reference rates (device copy bandwidth and
matmul throughput) are measured once per process and turn times into "% of what this device
can do".
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence

import torch

from bench import baselines, settings

GB = 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_ms(fn: Callable[[], object], device: torch.device, warmup_ms: int = 5, rep_ms: int = 25) -> float:
    """Median time of ``fn`` in ms: triton's do_bench on CUDA, a perf_counter loop on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    return 1e3 * _median_seconds(fn, device, reps=3)


def kernel_ms_with_setup(
    setup: Callable[[], tuple], fn: Callable, device: torch.device, rep_ms: float = 25
) -> float:
    """Median ms of ``fn(*setup())`` timing only ``fn``: do_bench's method (CUDA events, L2 flushed
    before each run) with an untimed setup per run, which do_bench has no hook for."""
    args = setup()
    fn(*args)
    if device.type != "cuda":
        times = []
        for _ in range(3):
            args = setup()
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    args = setup()
    fn(*args)
    torch.cuda.synchronize(device)
    estimate_ms = 1e3 * (time.perf_counter() - t0)
    times = []
    for _ in range(max(5, min(200, int(rep_ms / max(estimate_ms, 1e-3))))):
        args = setup()
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        times.append((start, end))
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in times)


BACKWARD_ONLY = ("bwd", "dx")  # modes that time a backward alone, its forward made untimed


def kernel_timer_name(device: torch.device, mode: str = "fwd") -> str:
    if device.type != "cuda":
        return "perf_counter"
    return "cuda events, setup forward untimed" if mode in BACKWARD_ONLY else "triton.testing.do_bench"


@functools.cache
def copy_bandwidth_gbps(device: torch.device) -> float:
    """Achievable memory bandwidth: ``y.copy_(x)`` of 1 GiB (CUDA) or 64 MiB (CPU), 2 bytes moved per byte."""
    nbytes = 2**30 if device.type == "cuda" else 2**26
    x = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    y = torch.empty_like(x)
    ms = kernel_ms(lambda: y.copy_(x), device, warmup_ms=10, rep_ms=100)
    return 2 * nbytes / (ms * 1e-3) / GB


@functools.cache
def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Achievable dense matmul rate for ``dtype``: 8192^3 on CUDA, 256^3 on the CPU."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = kernel_ms(lambda: a @ b, device, warmup_ms=25, rep_ms=100)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0].strip() if out.strip() else None


@functools.cache
def device_info() -> dict:
    """GPU name, driver, CUDA, torch and triton versions (what a benchmark JSON must carry)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "python_version": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "gpu_name": None,
        "gpu_driver_version": None,
        "cpu_count": os.cpu_count(),
        "bench_threads": settings.threads(),  # bench/conftest.py's
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu_name=props.name,
            gpu_driver_version=_nvidia_smi("driver_version"),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_sm_count=props.multi_processor_count,
            gpu_capability=f"{props.major}.{props.minor}",
            cudnn_version=torch.backends.cudnn.version(),
        )
    return info


def reference_rates(device: torch.device) -> dict:
    """The device's measured copy bandwidth and matmul rates (cached per process)."""
    rates = {"device": str(device), "copy_gbps": float(f"{copy_bandwidth_gbps(device):.4g}")}
    for dt in (torch.float16, torch.bfloat16):
        rates[f"matmul_tflops_{str(dt).split('.')[-1]}"] = float(f"{matmul_tflops(device, dt):.4g}")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the calibration tensors are gone; give their memory back
    return rates


def fastdiff_op(module: str, name: str):
    """The fastdiff op under test, or a skip while that op is not importable yet."""
    import pytest

    fn = getattr(pytest.importorskip(module), name, None)
    if fn is None:
        pytest.skip(f"{module} has no {name!r} yet")
    return fn


def implementation(name: str, device: torch.device, fastdiff: tuple[str, str], eager, **others):
    """A benchmark's implementation by name: ``fastdiff`` (module, function), ``eager`` (the
    baseline function), any of ``others`` (e.g. sdpa=...), or ``compile`` (torch.compile of eager,
    skipped where :func:`baselines.compile_enabled` says so)."""
    import pytest

    if name == "fastdiff":
        return fastdiff_op(*fastdiff)
    if name == "eager":
        return eager
    if name in others:
        return others[name]
    if not baselines.compile_enabled(device):
        pytest.skip("torch.compile baselines run on CUDA only (building them on the CPU is too slow)")
    return baselines.compiled(eager)


def tune(call: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], mode: str) -> None:
    """One call of a fastdiff op inside ``fastdiff.ops.autotuning`` (its backward too where
    ``mode`` has one), as the Sampler's warm-up makes it: the GPU-dependent choices (GroupNorm's
    backend, attention tiles) are measured there, untimed, and the timed rounds use them."""
    from fastdiff.ops import autotuning

    with autotuning(), torch.enable_grad():
        out = call()
        if mode != "fwd":
            _grad(out, inputs, torch.ones_like(out))


def interpreting(device: torch.device) -> bool:
    """Triton's CPU interpreter runs kernels ~1e5x slower: time one round, nothing more."""
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _rounds(seconds_per_call: float, device: torch.device) -> int:
    if interpreting(device):
        return 1
    target = settings.target_s(device.type)
    low, high = (5, 200) if device.type == "cuda" else (3, 50)
    return max(low, min(high, int(target / max(seconds_per_call, 1e-7))))


def _grad(out: torch.Tensor, inputs: Sequence[torch.Tensor], dout: torch.Tensor):
    return torch.autograd.grad(out, inputs, dout)


def bench(
    benchmark,
    call: Callable[[], torch.Tensor],
    *,
    mode: str,
    inputs: Sequence[torch.Tensor],
    device: torch.device,
    info: dict,
    nbytes: int,
    flops: int | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> None:
    """Time ``call`` in ``mode`` (fwd, bwd, dx or fwdbwd) and fill ``benchmark.extra_info``.

    fwd runs under ``no_grad`` (the sampling path). bwd times ``autograd.grad`` of a forward made
    in the (untimed) setup of every round; dx is bwd by the input alone (classifier guidance's
    gradient); fwdbwd times both. ``inputs`` are the tensors that get gradients.
    """
    warmup_calls = 1 if interpreting(device) else 3
    if mode == "fwd":

        def target():
            with torch.no_grad():
                call()
            sync(device)

        setup = None
    else:
        with torch.enable_grad():
            dout = torch.randn_like(call())

        if mode in BACKWARD_ONLY:

            def setup():
                with torch.enable_grad():
                    out = call()
                sync(device)
                return (out,), {}

            def target(out):
                _grad(out, inputs, dout)
                sync(device)

        else:
            setup = None

            def target():
                with torch.enable_grad():
                    _grad(call(), inputs, dout)
                sync(device)

    def run_once():
        if setup is None:
            target()
        else:
            args, _ = setup()
            target(*args)

    t0 = time.perf_counter()
    run_once()  # compiles / autotunes
    first_s = time.perf_counter() - t0
    last_s = first_s
    for _ in range(warmup_calls - 1):
        t0 = time.perf_counter()
        run_once()
        last_s = time.perf_counter() - t0

    rounds = _rounds(last_s, device)
    if setup is None:
        benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)
    else:
        benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)

    extra = benchmark.extra_info
    extra.update(info)
    extra.update(mode=mode, bytes=nbytes, first_call_s=round(first_s, 4), rounds=rounds)
    if flops is not None:
        extra["flops"] = flops
    rates = reference_rates(device)
    extra.update(copy_gbps=rates["copy_gbps"])
    if matmul_dtype is not None:
        extra["matmul_tflops"] = rates[f"matmul_tflops_{str(matmul_dtype).split('.')[-1]}"]

    median = _median_of(benchmark)
    if median is not None:
        extra["median_s"] = median
        _add_rates(extra, "", median)
    if os.environ.get("FASTDIFF_BENCH_KERNEL_TIMER", "1") != "0" and not interpreting(device):
        try:
            ms = _kernel_ms_for_mode(call, mode, inputs, device)
        except Exception as exc:  # noqa: BLE001 - a timer failure must not lose the pytest timing
            extra["kernel_error"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            extra["kernel_timer"] = kernel_timer_name(device, mode)
            extra["kernel_s"] = ms * 1e-3
            _add_rates(extra, "kernel_", ms * 1e-3)
    _record(benchmark, extra)


def _kernel_ms_for_mode(call, mode: str, inputs, device: torch.device) -> float:
    """do_bench for fwd and fwdbwd; bwd needs a fresh forward per run (compiled backwards donate
    their buffers, so a retained graph can't be replayed), hence the timer with a setup."""
    if mode == "fwd":
        with torch.no_grad():
            return kernel_ms(call, device)
    with torch.enable_grad():
        dout = torch.randn_like(call())
        if mode in BACKWARD_ONLY:
            return kernel_ms_with_setup(lambda: (call(),), lambda out: _grad(out, inputs, dout), device)
        return kernel_ms(lambda: _grad(call(), inputs, dout), device)


def _add_rates(extra: dict, prefix: str, seconds: float) -> None:
    gbps = extra["bytes"] / seconds / GB
    extra[prefix + "gbps"] = round(gbps, 2)
    extra[prefix + "pct_copy"] = round(100 * gbps / extra["copy_gbps"], 1)
    if "flops" in extra:
        tflops = extra["flops"] / seconds / 1e12
        extra[prefix + "tflops"] = round(tflops, 3)
        if extra.get("matmul_tflops"):
            extra[prefix + "pct_matmul"] = round(100 * tflops / extra["matmul_tflops"], 1)


def _median_of(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    stats = getattr(stats, "stats", stats)
    median = getattr(stats, "median", None)
    return float(median) if median is not None else None


def _stats_dict(benchmark) -> dict:
    stats = getattr(benchmark, "stats", None)
    stats = getattr(stats, "stats", stats)
    return {k: getattr(stats, k, None) for k in ("min", "max", "mean", "median", "stddev", "rounds")}


# time.time() when the running benchmark's setup began (bench/conftest.py sets it)
TEST_STARTED: float | None = None


def _record(benchmark, extra: dict) -> None:
    """Append one JSON line per benchmark to $FASTDIFF_BENCH_RECORDS (survives a cut-short run).
    ``wall_s``: the benchmark's whole cost so far (setup, compiles, autotuning, timed rounds),
    what planning a time budget needs."""
    path = os.environ.get("FASTDIFF_BENCH_RECORDS")
    if not path:
        return
    line = {
        "name": getattr(benchmark, "name", None),
        "fullname": getattr(benchmark, "fullname", None),
        "group": getattr(benchmark, "group", None),
        "stats": _stats_dict(benchmark),
        "extra_info": extra,
        "wall_s": None if TEST_STARTED is None else round(time.time() - TEST_STARTED, 3),
    }
    with open(path, "a") as f:
        f.write(json.dumps(line, default=str) + "\n")
