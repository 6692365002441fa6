"""guided-diffusion's ``dist_util`` on torch.distributed alone: no MPI, no mpi4py.

Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set) each process is one rank of
the group torchrun describes; without those variables ``setup_dist`` makes a one-process group,
so scripts calling ``dist.all_gather``, ``dist.barrier`` or ``dist.get_rank`` run as they are.
Checkpoints load with ``weights_only=True`` (or through safetensors), each rank reading the file
itself instead of receiving it over MPI.
"""

from __future__ import annotations

import collections
import os

import torch
import torch.distributed as dist

from ..distributed import SLOWEST_RANK, local_rank
from ..models.checkpoint import read_checkpoint, read_metadata

# The original's cluster layout constants (it pins rank % GPUS_PER_NODE); kept for code that reads them.
GPUS_PER_NODE = 8
SETUP_RETRY_COUNT = 3

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """True when torchrun (or anything setting its variables) launched this process."""
    return all(name in os.environ for name in _TORCHRUN_VARS)


def setup_dist() -> None:
    """Join torchrun's process group, or make a one-process group; nothing if one exists."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if under_torchrun():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        dist.init_process_group(backend=backend, init_method="env://", timeout=SLOWEST_RANK)
    else:
        # An in-memory store: no port, no rendezvous, nothing another process could join.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def dev() -> torch.device:
    """This rank's device: its CUDA device when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Weights(dict):
    """A ``.safetensors`` file's tensors and the ``null_label`` its fastdiff metadata records
    (None: none): a classifier-free-guidance model's label table has a row beyond its classes,
    which the compat networks' class-count message must not count as one."""

    def __init__(self, tensors, null_label=None):
        super().__init__(tensors)
        self.null_label = null_label

    def __reduce_ex__(self, protocol):
        """Pickled (torch.save) as the OrderedDict a state_dict is: torch.load(weights_only=True)
        refuses any other class, and the null label is the .safetensors file's to keep."""
        return collections.OrderedDict, (), None, None, iter(self.items())


def load_state_dict(path, map_location=None, weights_only=True):
    """``torch.load(path, map_location=...)`` with ``weights_only=True`` (a ``.safetensors`` file
    is read by safetensors, as :class:`Weights`): what the original's checkpoints and optimizer
    states need, and no pickled code. Read by fastdiff's checkpoint reader, so a missing,
    cut-short or foreign file is one CheckpointError (gd-run's one line), not torch's traceback."""
    if weights_only is not True:
        raise ValueError("fastdiff loads checkpoints with weights_only=True only")
    state = read_checkpoint(path, map_location=map_location)
    if str(path).endswith(".safetensors"):  # read on the CPU
        if map_location is not None:
            state = {k: v.to(map_location) for k, v in state.items()}
        state = Weights(state, read_metadata(path).get("null_label"))
    return state


def sync_params(params) -> None:
    """Make every rank's tensors rank 0's (in place)."""
    for p in params:
        with torch.no_grad():
            dist.broadcast(p, 0)
