"""Process-group setup from torchrun's environment, and the few collectives the trainers and
the sampling commands need.

Launch with ``torchrun --nproc_per_node N -m fastdiff.cli.main train ...`` (or ``sample``;
multi-node: add ``--nnodes``/``--rdzv_endpoint``). Without torchrun's variables everything
degrades to a single process, so callers use these helpers unconditionally.
"""

from __future__ import annotations

import inspect
import os
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


# How long a collective waits for the slowest rank: a sampling rank done with its block, or
# training ranks while rank 0 alone samples a preview grid or writes a checkpoint (a slower GPU,
# a loaded machine). torch's default (10 minutes on nccl, 30 on gloo) would end a healthy run;
# a rank that dies is reported by torchrun, which ends the job long before this.
SLOWEST_RANK = timedelta(hours=24)


def setup(device: str | None = None) -> torch.device:
    """Join the process group named by torchrun's env vars; return this rank's device.

    NCCL on CUDA, gloo on the CPU. Each rank uses the GPU ``LOCAL_RANK``. ``auto`` (every
    command's spelling) or None: CUDA where there is one.
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if launched() and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=SLOWEST_RANK)
    return dev


def launched_world_size() -> int:
    """The ranks torchrun started (WORLD_SIZE), 1 without torchrun: known before the process
    group is set up, when options are checked."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as torchrun numbered it (RANK), 0 without torchrun: known without a
    process group, for work only rank 0 does (printing, taking a lock) that needs no collective."""
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """True when torchrun started this process as one of several ranks (WORLD_SIZE > 1)."""
    return launched_world_size() > 1


def local_rank() -> int:
    """This rank's number on its machine (torchrun's LOCAL_RANK), 0 without torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Ranks on this machine (torchrun's LOCAL_WORLD_SIZE), 1 without torchrun: they share its cores."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Only rank 0 writes files and logs, so ranks never race on the same path."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks in rank order (the global batch order)."""
    if not is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (any picklable value)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_initialized():
        return [obj]
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def gather_objects(obj: T) -> list[T] | None:
    """Every rank's ``obj`` in rank order on rank 0, None on the others (``[obj]`` alone)."""
    if not is_initialized():
        return [obj]
    parts: list | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def broadcast_module(module: torch.nn.Module) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if not is_initialized():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def data_parallel(module: torch.nn.Module, device: torch.device, **options) -> DistributedDataParallel:
    """DDP over ``module`` that leaves buffers alone in forward (guided-diffusion's
    ``broadcast_buffers=False``; the ranks start from rank 0's weights anyway). torch 2.13 renamed
    the option and warns about the old name on every rank, so the name this torch knows is used."""
    ids = [device] if device.type == "cuda" else None
    known = inspect.signature(DistributedDataParallel).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=ids, **{no_sync: False}, **options)


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
