"""Generation engines: vLLM policy rollouts and GenPRM critiques, sleep mode, weight sync.

Engines live inside the training processes. A single process runs vLLM's uniprocess executor; ranks
started by the deepspeed launcher use `external_launcher`, so every rank owns one engine and
generates for its own prompts. Both keep the model in this process, which is what lets a weight sync
hand vLLM's loader the training tensors themselves (no pickling, no copy through a file).

Sleep mode frees accelerator memory for training between generations. It needs CUDA; elsewhere
(vLLM's CPU build) the same calls run with sleep off, said once in the log.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from capo_fast.config import Config, CriticConfig, SamplingConfig
from capo_fast.critique import (
    FAILED,
    JUDGMENT_LINE,
    VOTING,
    Critique,
    Step,
    critique_messages,
    load_template,
    parse_critique,
)
from capo_fast.data import chat_token_ids
from capo_fast.seeds import critique_request_seeds

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
        from capo_fast.distributed import tensor_parallel_group

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
        sampling: SamplingConfig,
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

        from capo_fast.distributed import gather_requests, own_slice

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

    def generate(self, prompts, sampling: SamplingConfig, *, n: int, seeds) -> list[list[Completion]]:
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


# ---- weights out of the training model ------------------------------------------------------------


def model_weights(model: torch.nn.Module, *, bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors of a (possibly ZeRO-3 partitioned) model, gathered bucket by bucket.

    Under ZeRO-3 each bucket of parameters is all-gathered on every rank, copied out, and released
    before the next, so peak extra memory is one bucket. ZeRO-0/1/2 keep full parameters: no copy.
    """
    # Tied weights are yielded under every name (lm_head.weight too): vLLM's in-place reload
    # re-initialises any layer it is not given weights for.
    named = list(model.named_parameters(remove_duplicate=False))
    partitioned = any(hasattr(p, "ds_id") for _, p in named)
    if not partitioned:
        for name, param in named:
            yield name, param.detach()
        return
    import deepspeed

    bucket: list[tuple[str, torch.nn.Parameter]] = []
    size = 0
    for index, (name, param) in enumerate(named):
        bucket.append((name, param))
        size += param.ds_numel * param.element_size()
        if size >= bucket_bytes or index == len(named) - 1:
            with deepspeed.zero.GatheredParameters(list({id(p): p for _, p in bucket}.values())):
                copies = [(n, p.detach().clone()) for n, p in bucket]
            yield from copies
            bucket, size = [], 0


# ---- critics --------------------------------------------------------------------------------------


def guided_critique_regex(reasoning_chars: int, num_steps: int) -> str:
    """What `answer_format: guided` lets a critic write: the paper's judgment line first; after "Yes" the
    critique ends there (valid, it flags nothing); after "No", some reasoning and an `<incorrect_steps>`
    list that can only name steps the response has (possibly none: a judge that finds no wrong step is not
    made to pick one).

    The paper asks for the list only when the solution is wrong. A grammar that required a list after "Yes"
    made a small judge fill it: SmolLM2-135M, told to leave it empty, named steps in 93% of its "Yes"
    critiques, and training penalised them. Every text this grammar admits parses as a valid critique
    whose verdict is the one on its first line (the reasoning cannot open a block: it has no "<")."""
    reasoning = f"[^<]{{0,{reasoning_chars}}}\\n" if reasoning_chars else ""
    index = "(" + "|".join(str(k) for k in range(num_steps)) + ")"
    indices = f"({index}(,{index}){{0,{num_steps - 1}}})?" if num_steps else ""
    literal = re.sub(r"([()?.])", r"\\\1", JUDGMENT_LINE)  # no "\\ ": engines differ on it
    return literal + f" (Yes|No\\n{reasoning}<incorrect_steps>{indices}</incorrect_steps>)"


class JudgeError(RuntimeError):
    """Too many critiques failed: the run would silently lose its step credit."""


@dataclass(frozen=True)
class CritiqueRequest:
    question: str
    steps: list[Step]
    reference_solution: str | None = None
    answer: str | None = None  # the gold final answer

    def ground_truth(self) -> str | None:
        """What the judge is shown as right: the reference solution, else the gold final answer (rows of
        DAPO-Math and the like carry only the answer)."""
        if self.reference_solution and self.reference_solution.strip():
            return self.reference_solution
        return f"The final answer is {self.answer}." if self.answer else None


class Critic(ABC):
    """N critiques per rollout; a failed or unparsable one is `FAILED`, never an exception.

    `tokens_generated` counts the judge's completion tokens so far (None for backends that write no tokens).
    """

    def __init__(self, config: CriticConfig):
        self.config = config
        self.tokens_generated: int | None = None

    @abstractmethod
    def critique(self, requests: Sequence[CritiqueRequest], seed: int = 0) -> list[list[Critique]]:
        """Parsed critiques, N per request; request i samples with seeds seed + i*N ... seed + i*N + N - 1."""

    def sleep(self) -> None:  # noqa: B027 - most backends hold nothing to free
        """Frees what it can between critiques (a local engine's accelerator memory)."""

    @staticmethod
    def describe(config: CriticConfig, policy: str) -> str:
        """The judge in words, for the first line a run prints (`policy`: the model a judge defaults to)."""
        return f"critic.backend={config.backend}"

    def probe(self) -> None:  # noqa: B027 - a local engine or a function is there once built
        """Raises JudgeError when the judge cannot answer, so a run stops before its first rollout."""


class ChatCritic(Critic):
    """A chat model as the GenPRM: the critic prompt in, judge text out. Backends provide `_complete`."""

    def __init__(self, config: CriticConfig):
        super().__init__(config)
        self.guided = config.answer_format == "guided"
        self.template = load_template(config.prompt_template or None)
        self.tokens_generated = 0

    @abstractmethod
    def _complete(
        self, messages: list[list[dict]], seeds: list[int], regexes: list[str | None]
    ) -> list[list[str | None]]:
        """N completions per chat (constrained by its regex when there is one); None marks a failure."""

    def critique(self, requests: Sequence[CritiqueRequest], seed: int = 0) -> list[list[Critique]]:
        reference = lambda r: r.ground_truth() if self.config.include_reference else None  # noqa: E731
        messages = [critique_messages(r.question, r.steps, reference(r), self.template) for r in requests]
        regexes = [
            guided_critique_regex(self.config.guided_reasoning_chars, len(r.steps)) if self.guided else None
            for r in requests
        ]
        seeds = critique_request_seeds(seed, len(requests), self.config.num_critiques)  # N children apart
        texts = self._complete(messages, seeds, regexes)
        return [
            [parse_critique(t, len(r.steps)) if t is not None else FAILED for t in per_request]
            for r, per_request in zip(requests, texts, strict=True)
        ]


class LocalCritic(ChatCritic):
    """The GenPRM as a second vLLM engine in this process; sleeps at level 1 (frozen weights)."""

    @staticmethod
    def describe(config: CriticConfig, policy: str) -> str:
        return f"LLM judge {config.model or policy} in a local vLLM engine"

    def __init__(
        self,
        config: CriticConfig,
        model: str,
        *,
        dtype: str,
        seed: int,
        sleep_mode: bool,
    ):
        super().__init__(config)
        self.engine = VLLMEngine(
            model,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=config.gpu_memory_utilization,  # its share: weights, activations, KV cache
            max_model_len=config.max_model_len,
            sleep_level=1,
            sleep_mode=sleep_mode,
        )

    def _complete(self, messages, seeds, regexes):
        tokenizer = self.engine.tokenizer
        limit = self.config.max_model_len - self.config.sampling.max_tokens
        prompts = [chat_token_ids(tokenizer, m) for m in messages]
        fits = [i for i, p in enumerate(prompts) if len(p) <= limit]
        if len(fits) < len(prompts):
            longest = max(len(p) for p in prompts)
            logger.warning(
                "%d of %d critic prompts (up to %d tokens) exceed critic.max_model_len - critic.sampling.max_tokens "
                "= %d: their critiques fail", len(prompts) - len(fits), len(prompts), longest, limit,
            )  # fmt: skip
        n = self.config.num_critiques
        pick = lambda xs: [xs[i] for i in fits]  # noqa: E731
        outputs = self.engine.generate(pick(prompts), self.config.sampling, n=n, seeds=pick(seeds), regex=pick(regexes))
        texts: list[list[str | None]] = [[None] * self.config.num_critiques for _ in prompts]
        for i, completions in zip(fits, outputs, strict=True):
            texts[i] = [c.text for c in completions]  # cut off before its block: an abstention unless it said Yes
            self.tokens_generated += sum(len(c.token_ids) for c in completions)
        return texts

    def sleep(self) -> None:
        self.engine.sleep()


class RemoteCritic(ChatCritic):
    """A judge behind an OpenAI-compatible endpoint (e.g. `vllm serve` of a 72B model elsewhere).

    Requests run with bounded concurrency; each has a timeout and a number of retries, after which
    its N critiques are failed ones.
    """

    @staticmethod
    def describe(config: CriticConfig, policy: str) -> str:
        return f"LLM judge {config.model or '(the served model)'} at {config.url}"

    def __init__(self, config: CriticConfig, model: str = ""):
        super().__init__(config)
        from openai import OpenAI

        self.client = OpenAI(
            base_url=config.url,
            api_key=os.environ.get(config.api_key_env) or "none",
            timeout=config.timeout_s,
            max_retries=config.retries,
        )
        self.model = model or next(iter(self._served_models()), "")

    def _served_models(self) -> list[str]:
        """The server's model list; a judge that is down or behind another key raises JudgeError."""
        try:
            return [m.id for m in self.client.models.list().data]
        except Exception as err:  # connection, HTTP and authentication errors alike
            raise JudgeError(
                f"critic.url={self.config.url!r}: the judge server did not answer ({type(err).__name__}: {err}); "
                f"start it (vllm serve MODEL), or check critic.url and the key in ${self.config.api_key_env}"
            ) from None

    def probe(self) -> None:
        """One request to the model list: a judge that is down or serves another model is found before the
        first rollout, not as a step of failed critiques."""
        served = self._served_models()
        if self.model not in served:
            raise JudgeError(
                f"critic.model={self.model!r} is not served at critic.url={self.config.url!r}; it serves {served}"
            )

    def _one(self, messages: list[dict], seed: int, regex: str | None) -> tuple[list[str | None], int]:
        """N completions of one chat and the tokens the server says it generated for them."""
        s = self.config.sampling
        try:
            response = self.client.chat.completions.create(
                model=self.model,
                messages=messages,
                n=self.config.num_critiques,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_tokens,
                stop=list(s.stop) or None,
                seed=seed,
                extra_body={"structured_outputs": {"regex": regex}} if regex else None,
            )
        except Exception as err:  # network, HTTP and server errors alike: the critiques are failed ones
            logger.warning("remote critic request failed: %s", err)
            return [None] * self.config.num_critiques, 0
        texts: list[str | None] = [c.message.content for c in response.choices]
        tokens = response.usage.completion_tokens if response.usage else 0
        return (texts + [None] * self.config.num_critiques)[: self.config.num_critiques], tokens

    def _complete(self, messages, seeds, regexes):
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency) as pool:
            answers = list(pool.map(self._one, messages, seeds, regexes))
        self.tokens_generated += sum(tokens for _, tokens in answers)
        return [texts for texts, _ in answers]


class FunctionCritic(Critic):
    """Critiques from Python (`critic.function`, `module:function`), for tasks whose steps a program can
    check: `function(requests, num_critiques, seed)` returns, per request, N critique texts (parsed like a
    judge's) or `Critique` objects; None marks a failed one."""

    @staticmethod
    def describe(config: CriticConfig, policy: str) -> str:
        return f"program critic {config.function} (a Python function standing in for an LLM judge)"

    def __init__(self, config: CriticConfig, model: str = ""):
        from capo_fast.plugins import load_callable

        super().__init__(config)
        self.function = load_callable(config.function, "critic.function")

    def critique(self, requests: Sequence[CritiqueRequest], seed: int = 0) -> list[list[Critique]]:
        out = self.function(list(requests), self.config.num_critiques, seed)
        if len(out) != len(requests):
            raise ValueError(f"critic.function returned {len(out)} results for {len(requests)} requests")
        return [
            [c if isinstance(c, Critique) else parse_critique(c, len(r.steps)) if c is not None else FAILED for c in cs]
            for r, cs in zip(requests, out, strict=True)
        ]


CRITIC_BACKENDS = {"vllm": LocalCritic, "remote": RemoteCritic, "function": FunctionCritic}


def build_critic(config: Config, judge: Path | None, *, sleep_mode: bool = False) -> Critic:
    """The critic of a run, as training and the judge evaluation both use it: `critic.backend` with the
    sampling of the voting mode (greedy decodes at temperature 0). A local engine loads `judge` (the
    resolved critic.model, else the policy's start) and holds critic.gpu_memory_utilization of the GPU,
    its KV cache being what weights and activations leave of that share: no kv_cache_memory_bytes, which
    would make vLLM ignore the share (vllm/config/cache.py:257-264; vllm/v1/worker/gpu_worker.py:649-675
    skips the profile, :740-744 sizes the cache from the share). A step's critiques that do not fit at
    once wait in vLLM's queue; `python -m capo_fast.memory_budget` says how many waves that takes."""
    c = config.critic
    critic_config = dataclasses.replace(c, sampling=VOTING[config.algorithm.voting].critic_sampling(c.sampling))
    if c.backend != "vllm":
        critic = CRITIC_BACKENDS[c.backend](critic_config, c.model)
        critic.probe()
        return critic
    return CRITIC_BACKENDS["vllm"](
        critic_config, str(judge), dtype=config.model.dtype, seed=config.trainer.seed, sleep_mode=sleep_mode
    )
