"""Every collective the training loop issues, and the start-up checks that need all ranks.

NCCL serves CUDA tensors only (torch/distributed/distributed_c10d.py:311-313, `backend_capability`),
gloo serves CPU ones: each collective here puts its tensors on the device the default group's
backend serves, so the same code runs on gloo (CPU, CI) and on NCCL (GPUs).
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from capo_fast.errors import ConfigError

T = TypeVar("T")

# The deepspeed launcher's pdsh/mpi runners forward only variables with these prefixes to other nodes
# (deepspeed/launcher/runner.py:36 EXPORT_ENVS, plus NCCL from accelerator/cuda_accelerator.py:411);
# anything else must be listed in .deepspeed_env (runner.py:37-38, 604-610).
LAUNCHER_EXPORTED_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")


SHM_DIR = Path("/dev/shm")


def deepspeed_shm_buffer(rank: int) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce creates for `rank` of this job
    (deepspeed/ops/csrc/cpu/comm/shm.cpp:348-368: buffer, uid, MASTER_ADDR, MASTER_PORT, rank)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_deepspeed_shm_names() -> None:
    """Unlinks this rank's DeepSpeed shared-memory buffer once every rank has mapped every buffer.

    DeepSpeed's CPU all-reduce gives each rank a 69 MB file in /dev/shm and never unlinks it
    (shm.cpp's shared_close is never called): every CPU run, and every run killed, left 69 MB per rank
    in memory until the machine ran out. Ranks map all buffers inside init_distributed (shm.cpp:393-404);
    after a barrier the names can go, and the memory is freed when the processes exit, however they exit.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    deepspeed_shm_buffer(dist.get_rank()).unlink(missing_ok=True)


def start_process_group() -> None:
    """The launcher's ranks join: NCCL with each rank on its own GPU before any collective (a barrier on
    an unset device runs on cuda:0 for every rank), or gloo, where DeepSpeed's CPU shared-memory
    all-reduce is in use and its /dev/shm names are released."""
    import deepspeed

    if torch.cuda.is_available():
        deepspeed.init_distributed(dist_backend="nccl")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        deepspeed.init_distributed(dist_backend="gloo")
        release_deepspeed_shm_names()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def collective_device(backend_config: str | None = None, local: torch.device | None = None) -> torch.device:
    """Where a collective's tensors must live: the CPU when the default group serves CPU tensors
    (gloo, or "cpu:gloo,cuda:nccl"), else this rank's GPU (NCCL).

    Args:
        backend_config: `dist.get_backend_config()` of the default group, e.g. "cuda:nccl".
        local: this rank's CUDA device (default: the current one).
    """
    config = backend_config if backend_config is not None else dist.get_backend_config()
    if any(pair.split(":")[0] == "cpu" for pair in config.split(",")):
        return torch.device("cpu")
    return local if local is not None else torch.device("cuda", torch.cuda.current_device())


def all_reduce(values: list[float], op=None) -> list[float]:
    """Sums (or `op`s) a few floats over the ranks, in float64; a no-op in a single process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_objects(obj, group=None) -> list:
    """Every rank's `obj` (picklable), in rank order of `group`; [obj] in a single process.

    Objects travel through the group's backend; torch moves them to the device it serves
    (distributed_c10d.py `all_gather_object`, "the current device" for NCCL).
    """
    if not dist.is_initialized():
        return [obj]
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


def fail_together(action: Callable[[], T], what: str) -> T:
    """Runs `action` on every rank; a failure on any rank stops every rank with it.

    Without this, a rank whose data or judge check fails leaves the others waiting in the next collective
    (deepspeed.initialize, an engine's start) until the NCCL timeout. The failing rank re-raises its own
    error; the others raise the same type (ConfigError, DataError ...) with its message and rank.
    """
    rank, world = rank_and_world()
    try:
        result, failure = action(), None
    except Exception as err:  # any failure must reach the gather below, or the other ranks hang
        result, failure, mine = None, (_picklable_type(err), str(err)), err
    failures = [(r, f) for r, f in enumerate(all_gather_objects(failure)) if f is not None]
    if not failures:
        return result
    if failure is not None:
        raise mine
    first, (kind, message) = failures[0]
    where = f"rank {first} of {world} ({what})"
    try:
        error = kind(f"{where}: {message}")
    except Exception:  # an exception type whose constructor takes other arguments
        error = RuntimeError(f"{where}: {kind.__name__}: {message}")
    raise error


def _picklable_type(err: Exception) -> type[Exception]:
    try:
        pickle.dumps(type(err))
        return type(err)
    except Exception:  # a class defined inside a function travels as a RuntimeError
        return RuntimeError


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (picklable); `obj` itself in a single process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---- tensor-parallel groups of the rollout engine ----------------------------------------------------


def tp_group_ranks(world: int, tp: int) -> list[list[int]]:
    """The ranks that form one vLLM tensor-parallel engine: blocks of `tp` consecutive ranks, vLLM's
    own layout (vllm/distributed/parallel_state.py:2135-2147, `all_ranks.view(-1, tp)`)."""
    if world % tp:
        raise ValueError(f"rollout.tensor_parallel_size={tp} does not divide {world} ranks")
    return [list(range(g * tp, (g + 1) * tp)) for g in range(world // tp)]


def tensor_parallel_group(tp: int):
    """This rank's TP group (gloo: only token ids and seeds cross it), or None when tp == 1.

    Every rank must call it, in the same order: group creation is collective.
    """
    if tp == 1 or not dist.is_initialized():
        return None
    group, _ = dist.new_subgroups_by_enumeration(tp_group_ranks(dist.get_world_size(), tp), backend="gloo")
    return group


def gather_requests(local: list, group) -> tuple[list, list[int]]:
    """The requests of every rank of a TP group, in group-rank order, and how many each rank sent.

    vLLM's external_launcher requires all ranks of a TP group to submit identical requests
    (vllm/v1/executor/uniproc_executor.py:161-175): each rank submits the group's requests.
    """
    if group is None:
        return list(local), [len(local)]
    parts = all_gather_objects(list(local), group)
    return [r for part in parts for r in part], [len(p) for p in parts]


def own_slice(outputs: list, counts: list[int], group) -> list:
    """This rank's part of outputs made for `gather_requests`' combined list."""
    index = dist.get_rank(group) if group is not None else 0
    start = sum(counts[:index])
    return outputs[start : start + counts[index]]


# ---- start-up checks across nodes -------------------------------------------------------------------


def check_same_environment(names: list[str]) -> None:
    """Every rank sees the same set of these environment variables (their presence, never values).

    Each rank's list may differ (it is read from that rank's own environment, e.g. its HF_* names):
    a name listed on any rank is checked on all of them.
    """
    names = [n for n in names if n]
    seen = all_gather_objects((socket.gethostname(), {n: n in os.environ for n in names}))
    for name in sorted({n for _, present in seen for n in present}):
        have = sorted({host for host, present in seen if present.get(name, False)})
        lack = sorted({host for host, present in seen if not present.get(name, False)})
        if have and lack:
            raise ConfigError(
                f"{name} is set on {', '.join(have)} but not on {', '.join(lack)}: the deepspeed launcher "
                f"forwards only {', '.join(p + '*' for p in LAUNCHER_EXPORTED_PREFIXES)} to other nodes; list "
                f"it in .deepspeed_env in the launch folder or ~ (python -m capo_fast.launch_env --config ...)"
            )


def check_shared_folder(folder: Path, wait_s: float = 10.0) -> None:
    """Every rank sees the same `folder`: DeepSpeed writes `latest` on rank 0 only and each rank's
    shards where it runs (deepspeed/runtime/engine.py `_save_checkpoint`), so resuming needs one
    folder that every node mounts."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    rank = dist.get_rank()
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = Path(folder) / f".capo-shared-{token[0]}"
    if rank == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("")
    dist.barrier()
    deadline = time.monotonic() + wait_s
    while not marker.exists() and time.monotonic() < deadline:  # NFS may cache attributes briefly
        time.sleep(0.2)
    seen = all_gather_objects((socket.gethostname(), rank, marker.exists()))
    dist.barrier()
    if rank == 0:
        marker.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for host, r, ok in seen if not ok]
    if blind:
        raise ConfigError(
            f"logging.output_dir: {folder} is not shared: {', '.join(blind)} cannot see what rank 0 wrote there. "
            "Checkpoints need one folder that every node mounts (a shared filesystem)."
        )
