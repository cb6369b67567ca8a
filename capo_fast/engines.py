"""Generation engines: vLLM in the training process, sleep mode, weight sync from the trainer.

Engines live inside the training processes. A single process runs vLLM's uniprocess executor; ranks
started by the deepspeed launcher use `external_launcher`, so every rank owns one engine and
generates for its own prompts. Both keep the model in this process, which is what lets a weight sync
hand vLLM's loader the training tensors themselves (no pickling, no copy through a file).

Sleep mode frees accelerator memory for training between generations. It needs CUDA; elsewhere
(vLLM's CPU build) the same calls run with sleep off, said once in the log.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from capo_fast.distributed import gather_requests, own_slice, tensor_parallel_group

logger = logging.getLogger(__name__)
_sleep_notice_given = False


def sleep_mode_supported() -> bool:
    """vLLM's sleep mode (CuMemAllocator) exists on CUDA only."""
    if not torch.cuda.is_available():
        return False
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


def critic_sleep_mode(*, requested: bool, supported: bool, policy_sleeps: bool) -> bool:
    """Whether an in-process critic engine may use sleep mode: only when the policy engine does not.

    vLLM's CuMemAllocator is one per process (vllm/device_allocator/cumem.py:112-127): a second
    sleep-mode engine fails its start-up check (vllm/v1/worker/gpu_worker.py:399-403), and a level-2
    sleep of the policy would discard every allocation made under it, the critic's weights included
    (cumem.py:256-265). A colocated critic therefore keeps its memory share for the whole run.
    """
    return requested and supported and not policy_sleeps


def _executor_backend(tensor_parallel_size: int) -> str:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        if world_size % tensor_parallel_size:
            raise ValueError(f"rollout.tensor_parallel_size={tensor_parallel_size} does not divide {world_size} ranks")
        return "external_launcher"
    if tensor_parallel_size > 1:
        raise ValueError(
            f"rollout.tensor_parallel_size={tensor_parallel_size} needs that many ranks: "
            f"deepspeed --num_gpus {tensor_parallel_size} capo_fast/train.py ..."
        )
    return "uni"


class Sampling(Protocol):
    """What an engine reads of a sampling section (config.SamplingConfig is one)."""

    temperature: float  # 0: greedy decoding
    top_p: float
    max_tokens: int  # new tokens per completion
    stop: Sequence[str]  # strings that end a generation


@dataclass(frozen=True)
class Completion:
    """One sampled answer: token ids, per-token log-probs (vLLM's raw log-probs), text, finish reason."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class VLLMEngine:
    """A vLLM `LLM` in this process, with sleep/wake and in-place weight reloads.

    Args:
        model: HF model folder.
        sleep_level: 2 for the policy (weights are re-synced every step), 1 for a frozen critic.
        kv_cache_memory_bytes: the KV cache's size on CUDA (default: what gpu_memory_utilization leaves).
        executor_backend: vLLM's distributed_executor_backend; empty: one engine rank per launched process
            (`_executor_backend`); "mp": vLLM's own worker processes (a standalone engine over several GPUs).
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "float32",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.35,
        max_model_len: int = 1024,
        enforce_eager: bool = False,
        sleep_level: int = 2,
        sleep_mode: bool = True,
        kv_cache_memory_bytes: int | None = None,
        executor_backend: str = "",
    ):
        global _sleep_notice_given
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model must live in this process
        on_cuda = torch.cuda.is_available()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if not on_cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        self.sleep_enabled = sleep_mode and sleep_mode_supported()
        if sleep_mode and not self.sleep_enabled and not _sleep_notice_given:
            logger.warning("vLLM sleep mode needs CUDA; engines stay awake on this machine")
            _sleep_notice_given = True
        self.sleep_level = sleep_level
        self.asleep = False
        threads = torch.get_num_threads()
        self.tp_group = tensor_parallel_group(tensor_parallel_size)
        self.llm = LLM(
            model=str(model),
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend=executor_backend or _executor_backend(tensor_parallel_size),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager or not on_cuda,
            enable_sleep_mode=self.sleep_enabled,
            enable_prefix_caching=True,
            # CUDA: the KV cache sized from what this rank asks for (vllm/config/cache.py:257-264, applied at
            # vllm/v1/worker/gpu_worker.py:649-675; gpu_memory_utilization then only sets the start-up check).
            # None: the cache gets what gpu_memory_utilization leaves. The CPU build uses VLLM_CPU_KVCACHE_SPACE.
            kv_cache_memory_bytes=kv_cache_memory_bytes if on_cuda else None,
            # vLLM's CPU build cannot rewind a seeded request's generator when a chunked prefill
            # discards a sample ("CPU Generator does not use offset"): prefill whole prompts there.
            enable_chunked_prefill=on_cuda,
        )
        torch.set_num_threads(threads)  # vLLM's CPU worker lowers it for serving; training needs it back
        self.tokenizer = self.llm.get_tokenizer()

    # ---- sleep ------------------------------------------------------------------------------------

    @property
    def sleep_discards_weights(self) -> bool:
        """A level-2 sleep frees the weights without a backup (vllm/device_allocator/sleep_mode_backend.py:134-137)."""
        return self.sleep_enabled and self.sleep_level == 2

    def sleep(self) -> None:
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Wakes the given parts ("weights", "kv_cache"), or everything."""
        if not (self.sleep_enabled and self.asleep):
            return
        torch.cuda.empty_cache()  # give the allocator's cached blocks back before vLLM maps its own
        self.llm.wake_up(tags)
        if tags is None or "kv_cache" in tags:
            self.asleep = False

    # ---- weights ----------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Reloads the engine's weights in place from HF-named tensors; returns seconds taken.

        Wake order with sleep mode: weights, then the reload, then the KV cache, then a prefix-cache
        reset so no block computed by the old weights is reused.
        """
        start = time.perf_counter()
        self.wake_up(["weights"])
        self.llm.collective_rpc(_reload_weights, args=(iter(weights),))
        self.wake_up(["kv_cache"])
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    # ---- generation -------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[list[int]],
        sampling: Sampling,
        *,
        n: int,
        seeds: Sequence[int],
        regex: Sequence[str | None] | None = None,
    ) -> list[list[Completion]]:
        """n completions per prompt (token ids in, token ids out); one seed per prompt makes a sample
        independent of batch composition, so a resumed run draws what an uninterrupted one drew.
        `regex` (one per prompt) constrains the text through vLLM's structured outputs."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        self.wake_up()
        # Ranks of one tensor-parallel engine submit the same requests: each submits the group's.
        local = list(zip(prompts, seeds, regex or [None] * len(seeds), strict=True))
        requests, counts = gather_requests(local, self.tp_group)
        if not requests:  # a rank without prompts (fewer prompts per step than ranks)
            return []
        prompts, seeds, regex = ([r[k] for r in requests] for k in range(3))
        params = [
            SamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                stop=list(sampling.stop) or None,
                seed=seed,
                logprobs=0,
                structured_outputs=StructuredOutputsParams(regex=rx) if rx else None,
            )
            for seed, rx in zip(seeds, regex, strict=True)
        ]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return own_slice(self._completions(outputs), counts, self.tp_group)

    @staticmethod
    def _completions(outputs) -> list[list[Completion]]:
        return [
            [
                Completion(
                    token_ids=list(c.token_ids),
                    logprobs=[lp[t].logprob for lp, t in zip(c.logprobs or [], c.token_ids, strict=False)],
                    text=c.text,
                    finish_reason="length" if c.finish_reason == "length" else "stop",
                )
                for c in out.outputs
            ]
            for out in outputs
        ]

    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """log p(token_ids[t] | token_ids[:t]) for t >= 1, as the engine computes them."""
        from vllm import SamplingParams

        self.wake_up()
        out = self.llm.generate(
            [{"prompt_token_ids": token_ids}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
        )[0]
        return torch.tensor([out.prompt_logprobs[t][token_ids[t]].logprob for t in range(1, len(token_ids))])


class WeightSource(Protocol):
    """What the policy engine loads from: the trainer."""

    version: int  # changes whenever the weights do

    def weights(self) -> Iterable[tuple[str, torch.Tensor]]: ...

    def states_offloaded(self) -> AbstractContextManager: ...


class PolicyEngine:
    """The only way to generate from the policy: owns the engine's lifecycle.

    Each call frees the trainer's optimizer state (before anything wakes), loads the trainer's weights
    when they changed since the last load or a level-2 sleep discarded them, wakes the engine,
    generates, and puts it back to sleep. No caller can generate from stale or discarded weights.
    """

    def __init__(self, engine: VLLMEngine, source: WeightSource):
        self.engine = engine
        self.source = source
        self._loaded_version: int | None = None
        self.last_sync_s = 0.0

    def generate(self, prompts, sampling: Sampling, *, n: int, seeds) -> list[list[Completion]]:
        with self._awake():
            return self.engine.generate(prompts, sampling, n=n, seeds=seeds)

    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        with self._awake():
            return self.engine.prompt_logprobs(token_ids)

    @contextmanager
    def _awake(self):
        with self.source.states_offloaded():
            self.last_sync_s = 0.0
            if self._loaded_version != self.source.version:
                self.last_sync_s = self.engine.load_weights(self.source.weights())
                self._loaded_version = self.source.version
            try:
                yield
            finally:
                self.engine.sleep()
                if self.engine.sleep_discards_weights:
                    self._loaded_version = None


def _reload_weights(worker, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Runs inside the vLLM worker: vLLM's own loader maps HF names (tied embeddings included)."""
    worker.reload_weights(weights_iterator=weights)
