"""Who am I in the job: rank discovery for every launcher, CPU threads, the process group.

Owns the one place that reads launcher environments:
  * `deepspeed` and `torchrun` set RANK / WORLD_SIZE / LOCAL_RANK (+ LOCAL_SIZE or
    LOCAL_WORLD_SIZE) and MASTER_ADDR / MASTER_PORT;
  * `mpirun` sets none of those: ranks come from mpi4py, and rank 0 hands out the
    rendezvous address through MPI;
  * a plain `python launch/pretrain.py` is a world of one.
`discover_world()` needs no process group, so config errors can be raised before one exists.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

log = logging.getLogger("dsexit")

_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # "env" (deepspeed / torchrun), "mpi" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_accelerator() -> str:
    """Pick DeepSpeed's accelerator before DeepSpeed is imported: CUDA when present, else CPU."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _from_env() -> WorldInfo:
    env = os.environ
    world_size = int(env["WORLD_SIZE"])
    local_world_size = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world_size)
    return WorldInfo(int(env["RANK"]), world_size, int(env.get("LOCAL_RANK", 0)), local_world_size, "env")


def _from_mpi() -> WorldInfo:
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("This process was started by mpirun, but mpi4py is not installed; "
                           "install it with `pip install 'dsexit[mpi]'`.") from None
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_world_size = node.Get_rank(), node.Get_size()
    single_node = comm.allreduce(local_world_size, op=MPI.MIN) == world_size
    if rank == 0:
        address = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if single_node else socket.gethostname())
        rendezvous = (address, os.environ.get("MASTER_PORT") or str(_free_port()))
    else:
        rendezvous = None
    address, port = comm.bcast(rendezvous, root=0)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(local_world_size), MASTER_ADDR=address, MASTER_PORT=port)
    return WorldInfo(rank, world_size, local_rank, local_world_size, "mpi")


def discover_world() -> WorldInfo:
    """Rank, world size and local layout, from whichever launcher started us; sets the env
    variables torch.distributed reads when the launcher did not."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_env()
    if any(name in env for name in _MPI_SIZE_VARS):
        return _from_mpi()
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    return WorldInfo(0, 1, 0, 1, "single")


def configure_threads(world: WorldInfo) -> int:
    """CPU threads per rank: the user's OMP_NUM_THREADS if set, else usable cores / local ranks."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(1, world.local_world_size))
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for subprocesses (JIT builds, conversions)
    torch.set_num_threads(threads)
    return threads


def init_process_group(world: WorldInfo) -> None:
    """Create the default process group (backend chosen by DeepSpeed's accelerator)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(world.local_rank)
    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
