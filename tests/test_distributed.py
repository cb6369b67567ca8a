"""Collectives on the device their backend serves, vLLM's tensor-parallel layout, start-up checks."""

import ast
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from capo_fast import distributed
from capo_fast.config import ConfigError

PACKAGE = Path(distributed.__file__).parent
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list",
               "reduce_scatter", "gather", "scatter", "gather_object", "scatter_object_list"}  # fmt: skip


def test_collective_device_follows_the_backend():
    gpu = torch.device("cuda", 3)  # a device object needs no CUDA build
    assert distributed.collective_device("cuda:nccl", gpu) == gpu  # NCCL serves CUDA tensors only
    assert distributed.collective_device("cpu:gloo,cuda:gloo", gpu) == torch.device("cpu")
    assert distributed.collective_device("cpu:gloo,cuda:nccl", gpu) == torch.device("cpu")


def test_no_collective_outside_the_distributed_module():
    """Every collective goes through capo_fast.distributed, which picks the device."""
    offenders = []
    for path in PACKAGE.glob("*.py"):
        if path.name == "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                owner = ast.unparse(node.func.value)
                if owner in ("dist", "torch.distributed"):
                    offenders.append(f"{path.name}:{node.lineno} {owner}.{node.func.attr}")
    assert not offenders, offenders


def test_all_reduce_builds_its_tensor_on_the_backends_device(monkeypatch):
    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    real_tensor = torch.tensor

    def record(data, *, dtype=None, device=None):
        seen.append(torch.device(device))
        return real_tensor(data, dtype=dtype)  # built on the CPU here: this machine has no GPU

    monkeypatch.setattr(distributed.torch, "tensor", record)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: t.mul_(2))
    assert distributed.all_reduce([1.0, 2.5]) == [2.0, 5.0]
    assert seen == [torch.device("cuda", 1)]


def test_tp_groups_follow_vllms_layout():
    # vllm/distributed/parallel_state.py:2135-2147: arange(world).reshape(-1, dp, pp, pcp, tp).view(-1, tp)
    expected = torch.arange(8).reshape(-1, 1, 1, 1, 2).view(-1, 2).tolist()
    assert distributed.tp_group_ranks(8, 2) == expected
    with pytest.raises(ValueError, match="does not divide"):
        distributed.tp_group_ranks(6, 4)


def _two_ranks(rank: int, port: int, folders: list[str], failures):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # a TP group of both ranks submits the same requests, and each rank gets its own answers back
        group = distributed.tensor_parallel_group(2)
        local = [f"r{rank}p{i}" for i in range(rank + 1)]
        requests, counts = distributed.gather_requests(local, group)
        assert requests == ["r0p0", "r1p0", "r1p1"] and counts == [1, 2]
        assert distributed.own_slice([r.upper() for r in requests], counts, group) == [r.upper() for r in local]
        # the environment the run reads is the same on every rank
        os.environ.pop("CAPO_TEST_KEY", None)
        distributed.check_same_environment(["CAPO_TEST_KEY"])
        if rank == 0:
            os.environ["CAPO_TEST_KEY"] = "x"
        try:
            distributed.check_same_environment(["CAPO_TEST_KEY"])
            failures.put(f"rank {rank}: a variable set on one rank only went unnoticed")
        except ConfigError as err:
            assert ".deepspeed_env" in str(err)
        # checkpoints need one folder every rank sees
        distributed.check_shared_folder(Path(folders[0]))
        try:
            distributed.check_shared_folder(Path(folders[1]) / f"rank{rank}")
            failures.put(f"rank {rank}: a folder rank 1 cannot see passed as shared")
        except ConfigError as err:
            assert "not shared" in str(err)
        _decisions_made_once(rank, Path(folders[1]) / f"rank{rank}", failures)
    except Exception as err:  # reported to the parent, which fails the test
        failures.put(f"rank {rank}: {type(err).__name__}: {err}")
    finally:
        dist.destroy_process_group()


def _decisions_made_once(rank: int, own_folder: Path, failures):
    """What two ranks must agree on: a data error anywhere stops both; the best checkpoint is rank 0's
    decision; step metrics weight each rank by its rollouts."""
    from capo_fast.checkpoints import Checkpoints
    from capo_fast.data import DataError
    from capo_fast.train import reduce_step_metrics

    def load():
        if rank == 1:
            raise DataError("train.jsonl:7: blank question")
        return "loaded"

    try:
        distributed.fail_together(load, "loading the data")
        failures.put(f"rank {rank}: rank 1's data error did not stop rank {rank}")
    except DataError as err:
        assert "train.jsonl:7: blank question" in str(err), err
        assert rank == 1 or "rank 1 of 2 (loading the data)" in str(err), err
    assert distributed.fail_together(lambda: rank, "nothing wrong") == rank

    # rank 1 sees a stale best.json claiming 0.9; rank 0's says 0.5: 0.7 is the best, and both ranks save
    saves = []
    trainer = SimpleNamespace(save=lambda directory, tag, state, latest=True: saves.append(tag))
    folder = own_folder / "checkpoints"
    checkpoints = Checkpoints(folder, trainer, SimpleNamespace(state_dict=lambda: {}), rank=rank, keep=2)
    folder.mkdir(parents=True)
    (folder / "best.json").write_text(json.dumps({"step": 1, "eval/accuracy": 0.5 if rank == 0 else 0.9}))
    checkpoints.keep_if_best(5, 0.7)
    if saves != ["best"]:
        failures.put(f"rank {rank}: the best-checkpoint decision was not rank 0's ({saves})")

    # 1 rollout on rank 0, 3 on rank 1 (12 prompts on 8 ranks hold 1 or 2 groups): rates by rollouts
    local = {"reward/accuracy": 1.0 if rank == 0 else 0.0, "reward/verifier_timeouts": float(rank + 1)}
    metrics = reduce_step_metrics(local, 1 if rank == 0 else 3)
    if metrics != {"reward/accuracy": 0.25, "reward/verifier_timeouts": 3.0}:
        failures.put(f"rank {rank}: step metrics {metrics}")


def test_tp_gather_environment_and_shared_folder_checks_on_two_ranks(tmp_path, free_port):
    failures = mp.get_context("spawn").SimpleQueue()
    folders = [str(tmp_path / "shared"), str(tmp_path / "local")]
    mp.spawn(_two_ranks, args=(free_port(), folders, failures), nprocs=2, join=True)
    messages = []
    while not failures.empty():
        messages.append(failures.get())
    assert not messages, messages
    assert not list((tmp_path / "shared").glob(".capo-shared-*")), "the marker file must be removed"


def test_a_variable_only_another_node_lists_is_reported_not_a_crash(monkeypatch):
    """Each rank lists the variables of its own environment (HF_HOME on one node only): the check must
    name the variable and the nodes, not fail on a name this rank never listed."""
    monkeypatch.delenv("CAPO_TEST_ONLY_THERE", raising=False)

    def gather(local, group=None):  # this node lists nothing extra; node-b has CAPO_TEST_ONLY_THERE
        return [local, ("node-b", {**local[1], "CAPO_TEST_ONLY_THERE": True})]

    monkeypatch.setattr(distributed, "all_gather_objects", gather)
    with pytest.raises(ConfigError, match=r"CAPO_TEST_ONLY_THERE is set on node-b but not on "):
        distributed.check_same_environment(["PATH"])


@pytest.mark.parametrize("cuda", [True, False], ids=["cuda-nccl", "cpu-gloo"])
def test_joining_the_process_group_binds_the_gpu_or_releases_the_shm_names(cuda, monkeypatch):
    """NCCL: each rank on its LOCAL_RANK GPU before anything else runs, no /dev/shm work. gloo: DeepSpeed's
    shared-memory buffer names are released right after joining."""
    import deepspeed

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend: calls.append(("init", dist_backend)))
    monkeypatch.setattr(distributed, "release_deepspeed_shm_names", lambda: calls.append(("release",)))
    monkeypatch.setenv("LOCAL_RANK", "3")
    distributed.start_process_group()
    assert calls == ([("init", "nccl"), ("set_device", 3)] if cuda else [("init", "gloo"), ("release",)])
