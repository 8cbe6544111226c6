"""Who am I in the job: the process's set-up, rank discovery for every launcher, CPU threads, the
process group.

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
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("dsexit")

_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
# What the launchers set (and `discover_world` sets for a world of one): a process that starts independent
# runs removes these from their environment, or they would all join one job.
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    *_MPI_SIZE_VARS,
)


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
        raise RuntimeError(
            "This process was started by mpirun, but mpi4py is not installed; "
            "install it with `pip install 'dsexit[mpi]'`."
        ) from None
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
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_world_size),
        MASTER_ADDR=address,
        MASTER_PORT=port,
    )
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


def put_own_tools_first() -> None:
    """In a virtual environment, its bin directory first on PATH, as activating it does. A launcher that
    starts ranks through a login shell (pdsh over ssh) hands them the shell's PATH, where another
    `ninja` may come first: DeepSpeed's JIT-compiled ops (the CPU shared-memory collective, fused
    optimizers) are then rebuilt, half a minute each time, because two ninja versions keep their build
    logs differently. With the environment's own tools first every launcher reuses the same build."""
    if sys.prefix == sys.base_prefix:  # the system's interpreter: its PATH is the system's to order
        return
    own = os.path.join(sys.prefix, "bin")
    entries = os.environ.get("PATH", "").split(os.pathsep)
    if entries[0] != own:
        os.environ["PATH"] = os.pathsep.join([own, *(entry for entry in entries if entry and entry != own)])


def start_process(*, reexec: bool = True) -> str:
    """The first thing a training process does, before its heavy imports: its environment's tools
    first on PATH, DeepSpeed's accelerator picked, and on a CPU the allocator settings checked and
    tcmalloc's re-execution done (`dsexit.cpu.start_process`, torch-free), so the re-executed process
    imports torch and DeepSpeed once, not twice. Returns the accelerator's name. `setup_process` calls
    it again (a no-op the second time)."""
    put_own_tools_first()
    accelerator = select_accelerator()
    if accelerator == "cpu":
        from dsexit.cpu import start_process as start_cpu_process

        start_cpu_process(reexec=reexec)
    return accelerator


def setup_process(*, cpu_kernels: bool = True, reexec: bool = True) -> tuple[WorldInfo, int]:
    """A training process's start, before any work: its environment's tools first on PATH
    (`put_own_tools_first`); DeepSpeed's accelerator; on a CPU, and only there, the CPU tuning
    (`dsexit.cpu.tune_process`: the host allocator, subnormal floats, and unless `cpu_kernels=False`
    the CPU dropout and attention in the model's kernel slots); then this rank's place in the job and
    its threads. `reexec=False` where this process's command line is not the program's own (a command
    called in process): the tcmalloc re-execution would rerun the caller."""
    put_own_tools_first()
    if select_accelerator() == "cpu":
        from dsexit.cpu import tune_process

        tune_process(kernels=cpu_kernels, reexec=reexec)
    world = discover_world()
    return world, configure_threads(world)


def init_process_group(world: WorldInfo, timeout_s: float = 1800.0) -> None:
    """Create the default process group (backend chosen by DeepSpeed's accelerator); a collective
    that waits longer than `timeout_s` for a peer fails instead of hanging. Then record where
    every rank runs, so that such a failure can name the lost node (`describe_peer_failure`)."""
    import datetime

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(world.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    # DeepSpeed's data-parallel groups come from new_group() without a timeout, which takes
    # torch's module default (30 min), not the world group's: make that default ours too.
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False, timeout=timeout)
    _ROSTER.clear()
    _ROSTER["timeout_s"] = timeout_s
    places: list = [None] * world.world_size
    node_rank = os.environ.get("CROSS_RANK") or os.environ.get("GROUP_RANK")  # deepspeed's, torchrun's
    dist.all_gather_object(places, (socket.gethostname(), _own_address(), node_rank))
    _ROSTER["places"] = places
    _unlink_shm_workspace(world.rank)


def _unlink_shm_workspace(rank: int) -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory all-reduce workspace.

    On CPU, when every rank is on one machine, DeepSpeed maps one 66 MiB segment per rank under
    /dev/shm and never unlinks it: every run, finished or killed, leaves them behind, holding
    memory until the machine restarts. Once every rank has passed the all-gather above, each
    has mapped every peer's segment, so the names can go now; the memory itself is freed when
    the last rank exits, however it exits."""
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}"
    try:
        os.unlink(f"{name}_{os.environ.get('MASTER_PORT', '')}_{rank}")
    except OSError:  # not on this machine's CPU path (a GPU, ranks on several nodes): nothing was created
        pass


def release_shm_workspace() -> None:
    """`_unlink_shm_workspace` for programs that call `deepspeed.init_distributed` themselves."""
    import torch.distributed as dist

    dist.barrier()  # every rank has mapped every peer's segment
    _unlink_shm_workspace(dist.get_rank())


_ROSTER: dict = {}  # filled by init_process_group: {"timeout_s", "places": [(host, address, node) per rank]}
_PEER_ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]:\d+")
_PEER_FAILURE_HINTS = (
    "connection closed by peer",
    "connection reset by peer",
    "timed out",
    "timeout",
    "broken pipe",
    "connection refused",
    "socket",
    "gloo",
    "nccl",
)


def _own_address() -> str:
    """The address this host reaches MASTER_ADDR from (the one its peers talk to)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "1"))))
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostname()


def job_nodes() -> dict[str, dict]:
    """node label -> {"address", "host", "ranks"} from the roster; the launcher's node rank
    (deepspeed's CROSS_RANK, torchrun's GROUP_RANK) when it set one, else the order in which hosts
    first appear. Empty before `init_process_group`."""
    nodes: dict[str, dict] = {}
    for rank, (host, address, node_rank) in enumerate(_ROSTER.get("places", [])):
        key = (host, address)
        label = next((name for name, node in nodes.items() if (node["host"], node["address"]) == key), None)
        if label is None:
            label = f"node {node_rank if node_rank is not None else len(nodes)}"
            nodes[label] = {"host": host, "address": address, "ranks": []}
        nodes[label]["ranks"].append(rank)
    return nodes


def node_of(rank: int, nodes: dict[str, dict]) -> str:
    """The label of the node `rank` runs on ("this node" when the roster does not hold it)."""
    return next((label for label, node in nodes.items() if rank in node["ranks"]), "this node")


def describe_node(label: str, nodes: dict[str, dict]) -> str:
    """`node 1 (10.0.0.2, host b, rank(s) 2,3)`."""
    node = nodes[label]
    return f"{label} ({node['address']}, host {node['host']}, rank(s) {','.join(map(str, node['ranks']))})"


def elastic_restarts_left() -> int | None:
    """Restarts an elastic agent (torchrun, which sets TORCHELASTIC_*) has left for this worker group
    after a failure; None when no elastic agent started this process."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env:
        return None
    return int(env.get("TORCHELASTIC_MAX_RESTARTS", 0)) - int(env.get("TORCHELASTIC_RESTART_COUNT", 0))


def restart_advice() -> str:
    """What happens next after a lost peer: an elastic agent with restarts left re-forms the job by
    itself; anything else needs every node restarted."""
    restarts_left = elastic_restarts_left()
    if restarts_left is not None:
        if restarts_left > 0:
            return (
                "The elastic agent restarts this node's workers in a new rendezvous without the lost node "
                f"({restarts_left} restart(s) left); they resume from the newest complete checkpoint."
            )
        return "The elastic agent has no restarts left (--max-restarts); restart the job with --resume auto."
    return (
        "The job cannot continue; restart every node with --resume auto to continue from the last complete checkpoint."
    )


def describe_peer_failure(error: BaseException, world: WorldInfo) -> str | None:
    """One sentence naming the node(s) a failed collective lost, or None when `error` does not
    look like a communication failure. A closed connection names its peer's address; a
    timeout does not, so then every other node is named as a suspect."""
    text = str(error)
    if not _ROSTER or not any(hint in text.lower() for hint in _PEER_FAILURE_HINTS):
        return None
    nodes = job_nodes()
    mine = node_of(world.rank, nodes)
    first_line = text.strip().splitlines()[-1] if text.strip() else type(error).__name__
    match = _PEER_ADDRESS.search(text)
    lost = [label for label, node in nodes.items() if match and node["address"] == match.group(1)]
    if lost:
        what = f"lost peer {describe_node(lost[0], nodes)}: the connection to it closed"
    else:
        others = [describe_node(label, nodes) for label in nodes if label != mine] or ["another rank on this node"]
        what = (
            f"a collective got no answer within {_ROSTER['timeout_s']:g} s (--dist-timeout); "
            f"lost peer among {'; '.join(others)}"
        )
    return f"rank {world.rank} on {mine}: {what} ({first_line}). {restart_advice()}"


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def several_processes() -> bool:
    """Whether a process group of more than one rank exists."""
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (just `[value]` in a single process)."""
    import torch.distributed as dist

    if not several_processes():
        return [value]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    import torch.distributed as dist

    if not several_processes():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
