"""Where a run computes: its device (this rank's under torchrun), its CPU threads, its engine,
all checked before any network loads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from fastdiff import distributed
from fastdiff.config import unknown_choice
from fastdiff.diffusion.samplers import check_eta, check_eta_range, get_sampler
from fastdiff.engines import CACHED_BUILDS, EngineError, check_engine, default_engine
from fastdiff.engines.sampler import DTYPES
from fastdiff.runs import ranks
from fastdiff.runs.errors import RunError
from fastdiff.runs.folder import check_writable

# The most intra-op threads a run takes: far above any machine's cores, far below what OpenMP
# cannot allocate (2**31 threads aborted libgomp; a count above int64 was torch's OverflowError).
MAX_THREADS = 4096


def choose_threads(threads: int | None) -> int:
    """Intra-op threads: ``--threads``, else OMP_NUM_THREADS, else the cores not already busy.

    torch's default (every core) oversubscribes a loaded machine: on a busy 2-core machine the
    same job took 12x the CPU time of one thread. Under torchrun the ranks on one machine share
    its cores, each taking its part; the OMP_NUM_THREADS=1 torchrun sets for every multi-process
    launch is its default, not the user's choice (--threads is).
    """
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise RunError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}", usage=True)
    local = distributed.local_world_size()
    omp = os.environ.get("OMP_NUM_THREADS", "")
    # 0 or text is no thread count (OpenMP ignores such a value too): the default below
    if threads is None and omp.isdigit() and int(omp) > 0 and not (local > 1 and omp == "1"):
        threads = int(omp)
        if threads > MAX_THREADS:
            raise RunError(f"OMP_NUM_THREADS must be at most {MAX_THREADS}, got {omp}")
    if threads is None:
        cores = usable_cores()
        others = max(0, busy_cores() - (local - 1))  # the sibling ranks starting now are no load
        threads = max(1, (cores - others) // local)
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity, e.g. under taskset or a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cores() -> int:
    """Cores other work keeps busy: the 1-minute load average, but only as far as other tasks are
    runnable right now. The average trails by a minute, so a job that has just ended (the previous
    run of a script) would otherwise leave a core idle; a brief task now, on an unloaded
    machine, does not count either."""
    if not hasattr(os, "getloadavg"):
        return 0
    busy = int(os.getloadavg()[0] + 0.5)
    others = runnable_others()
    return busy if others is None else max(0, min(busy, others))


def runnable_others() -> int | None:
    """Runnable tasks besides this one (Linux /proc/loadavg), None where unknown."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1
    except (OSError, ValueError, IndexError):
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"unknown device '{name}'", usage=True) from None
    if device.type not in ("cpu", "cuda"):
        raise RunError(f"device '{name}' is not supported: use auto, cpu, cuda or cuda:N", usage=True)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device '{name}' requested but CUDA is not available")
    return device


def check_ops_mode() -> None:
    """FASTDIFF_OPS, read by every op as it runs: a bad value is one line before any work, not
    the first layer's ValueError traceback; so is ``triton`` without triton installed, where every
    op would silently run its PyTorch reference instead of the kernels asked for."""
    from fastdiff.ops._backend import ops_mode, triton_problem

    try:
        mode = ops_mode()
    except ValueError as e:
        raise RunError(str(e)) from None
    if mode == "triton" and triton_problem():
        raise RunError(f"FASTDIFF_OPS=triton runs the Triton kernels, but {triton_problem()}")


def emulated_bf16(dev: torch.device) -> bool:
    """Whether bf16 on ``dev`` is a CPU's emulation: without AVX512-BF16 or AMX oneDNN computes
    it in fp32 with conversions around every op, far slower than fp32 itself."""
    if dev.type != "cpu":
        return False
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a torch built without oneDNN: no claim either way
        return False


def check_fp16(dtype: str, device: torch.device, option: str) -> None:
    """fp16 is a GPU format: on the CPU sampling and training (autocast, a CPU GradScaler) run,
    but many times slower than fp32 (training: 14x measured, 1.0 vs 14.3 samples/s) for no gain,
    so sample's --dtype and train's --precision refuse it alike. ``option`` names the one given."""
    if dtype == "fp16" and device.type == "cpu":
        raise RunError(f"{option} fp16 needs a CUDA device; use fp32 or bf16 on the CPU")


def emulated_bf16_note(option: str) -> str:
    """The note a bf16 run on such a CPU prints once its checks have passed, as its work starts
    (it ran, slowly, without a word)."""
    return (
        f"note: this CPU has no native bf16 (AVX512-BF16 or AMX), so {option} runs emulated, many"
        " times slower than fp32 (15-40x measured on an AVX2 CPU)"
    )


def note_emulated_bf16(dtype: torch.dtype, dev: torch.device) -> None:
    """:func:`emulated_bf16_note` for a sampling run's ``--dtype bf16``, on rank 0."""
    if dtype == torch.bfloat16 and emulated_bf16(dev) and distributed.is_main():
        print(emulated_bf16_note("--dtype bf16"), file=sys.stderr)


def check_seed(seed: int, option: str) -> None:
    """A seed is in [0, 2**63): numpy's generators (--classes random) take no negative one, and a
    batch's generator seed is taken modulo 2**63, so a larger one would repeat a smaller one's images."""
    if not 0 <= seed < 2**63:
        raise RunError(f"{option} must be >= 0 and < 2**63, got {seed}", usage=True)


def check_run_options(
    device: str,
    dtype: str,
    threads: int | None,
    engine: str | None,
    sampler: str,
    eta: float,
    seed: int = 0,
    batch_size: int | None = None,
) -> tuple[torch.device, str]:
    """(device, engine) after the checks every sampling run makes before loading anything;
    under torchrun, this rank's device in the process group."""
    check_seed(seed, "--seed")
    check_ops_mode()
    try:
        get_sampler(sampler)
    except ValueError as e:
        raise RunError(str(e)) from None
    if not (isinstance(dtype, str) and dtype in DTYPES):
        raise RunError(unknown_choice("dtype", dtype, DTYPES), usage=True)
    if threads is not None and threads < 1:
        raise RunError(f"--threads must be >= 1, got {threads}", usage=True)
    try:
        check_eta_range(eta)  # outside it no run takes it (exit 2)
    except ValueError as e:
        raise RunError(f"--{e}", usage=True) from None
    try:
        check_eta(sampler, eta)
    except ValueError as e:  # an eta for a sampler that takes none: options that conflict (exit 1)
        raise RunError(f"--{e}") from None
    dev = ranks.join(resolve_device(device))
    check_fp16(dtype, dev, "--dtype")
    choose_threads(threads)
    engine = engine or default_engine(dev)
    try:
        check_engine(engine, dev, DTYPES[dtype], batch_size)
    except EngineError as e:
        raise RunError(str(e)) from None
    if engine in CACHED_BUILDS:  # they export into the cache on first use
        from fastdiff.export.onnx_runtime import cache_dir

        check_writable(cache_dir(), f"the ONNX cache {cache_dir()} (FASTDIFF_CACHE sets where it is)")
    return dev, engine
