"""The DeepSpeed config of a run, and what it decides: the optimizer, offload, the states moved off the GPU.

Read by the trainer (which builds the engine from it) and by memory_budget and gpu_cost (which size a run
from it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from capo_fast.config import Config


def deep_merge(base: dict, override: dict) -> dict:
    """`base` updated by `override`, nested mappings merged key by key (a JSON file's
    zero_optimization block adds to the generated one instead of replacing it)."""
    merged = dict(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if nested else value
    return merged


def offload_device(ds: dict) -> str:
    return (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")


def deepspeed_config(config: Config, *, fused_adam: bool) -> dict:
    """The DeepSpeed config of the run: generated from the trainer section, then the JSON file's keys.

    DeepSpeed builds the optimizer from the "optimizer" block (deepspeed/runtime/engine.py:2377-2409):
    DeepSpeedCPUAdam under optimizer offload, FusedAdam on CUDA (which `offload_states` requires,
    runtime/zero/stage3.py:3868-3869), and torch's AdamW ("torch_adam") on machines without CUDA.
    """
    t = config.trainer
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # accumulation boundaries are set by hand per mini-batch
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": config.model.dtype == "bfloat16"},
        "fp16": {"enabled": config.model.dtype == "float16"},
        "steps_per_print": 1 << 30,
    }
    if t.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if t.deepspeed_config:
        ds = deep_merge(ds, json.loads(Path(t.deepspeed_config).read_text()))
    params = {"lr": t.lr, "weight_decay": t.weight_decay}
    if not fused_adam and offload_device(ds) == "none":
        params["torch_adam"] = True
    ds.setdefault("optimizer", {"type": "AdamW", "params": params})
    return ds


def zero_setup(config: Config) -> tuple[int, bool]:
    """The ZeRO stage of the run's merged DeepSpeed config, and whether it offloads the optimizer."""
    ds = deepspeed_config(config, fused_adam=True)
    return ds["zero_optimization"].get("stage", 0), offload_device(ds) != "none"


def fused_adam_available() -> bool:
    """Whether DeepSpeed can give this run FusedAdam: prebuilt, or compiled on first use, which needs nvcc
    (deepspeed/ops/op_builder/builder.py:43-55). Without it the run keeps torch's AdamW rather than
    failing at its first step; ZeRO-3 then cannot offload its states while generating."""
    if not torch.cuda.is_available():
        return False
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.builder import installed_cuda_version

    if installed_ops.get("fused_adam"):
        return True
    try:
        installed_cuda_version()
    except Exception:  # no CUDA_HOME or no nvcc in it: MissingCUDAException
        return False
    return True


def states_to_offload(ds: dict, *, cuda: bool, wanted: bool, fused_adam: bool = True) -> list:
    """DeepSpeed states to move to the CPU while the engines generate, decided from the merged config.

    Nothing without CUDA, or with parameter offload (engine.py:6049-6050 refuses it). The bf16
    parameters stay (the weight sync reads them); under optimizer offload, master weights and
    optimizer state already live on the CPU (engine.py:6027-6031 drops them, and lp_grads at ZeRO-3).
    """
    from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum as State

    zero = ds.get("zero_optimization", {})
    if not (wanted and cuda) or (zero.get("offload_param") or {}).get("device", "none") != "none":
        return []
    if zero.get("stage") == 3 and not fused_adam and offload_device(ds) == "none":
        return []  # runtime/zero/stage3.py:3868-3869: ZeRO-3 offloads states of FusedAdam only
    states = [st for st in State if st != State.lp_params]
    if offload_device(ds) != "none":
        dropped = {State.hp_params, State.optim_states} | ({State.lp_grads} if zero.get("stage") == 3 else set())
        states = [st for st in states if st not in dropped]
    return states
