"""The trainers' name for :mod:`fastdiff.distributed` (one implementation, shared with sampling)."""

from fastdiff.distributed import (
    all_gather_cat,
    all_gather_objects,
    barrier,
    broadcast_module,
    cleanup,
    data_parallel,
    is_initialized,
    is_main,
    launched_world_size,
    rank,
    setup,
    world_size,
)

__all__ = [
    "all_gather_cat",
    "all_gather_objects",
    "barrier",
    "broadcast_module",
    "cleanup",
    "data_parallel",
    "is_initialized",
    "is_main",
    "launched_world_size",
    "rank",
    "setup",
    "world_size",
]
