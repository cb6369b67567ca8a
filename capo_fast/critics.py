"""Critics: the GenPRM backends that write N critiques per rollout, the registry that names them, and
the check that stops a run whose judge fails.

Each backend in CRITIC_BACKENDS says what it needs (a judge model loaded into this process, a server
URL, environment variables, a Python function), how it is described and built, and where to look when
its critiques fail; nothing outside this file compares backend names. Critics read the run's `critic`
section (config.CriticConfig) by its fields: this module sits below config and does not import it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

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
from capo_fast.engines import Sampling, VLLMEngine
from capo_fast.errors import ConfigError, JudgeError
from capo_fast.plugins import load_callable
from capo_fast.seeds import critique_request_seeds

logger = logging.getLogger(__name__)

class CriticSettings(Protocol):
    """What the critics read of a run's `critic` section (config.CriticConfig is one; this module stays below
    the config, which names the backends from CRITIC_BACKENDS)."""

    backend: str
    model: str
    num_critiques: int
    answer_format: str
    guided_reasoning_chars: int
    sampling: Sampling
    include_reference: bool
    function: str
    prompt_template: str
    gpu_memory_utilization: float
    max_model_len: int
    url: str
    api_key_env: str
    max_concurrency: int
    retries: int
    timeout_s: float
    warn_failure_rate: float
    max_failure_rate: float


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
    The class attributes and class methods say what a backend needs before one is built.
    """

    # A judge model in a vLLM engine of each training process: its weights are resolved with the policy's,
    # it holds critic.gpu_memory_utilization of the GPU, and it is built after the policy's engine.
    local_model: ClassVar[bool] = False

    def __init__(self, config: CriticSettings):
        self.config = config
        self.tokens_generated: int | None = None

    @abstractmethod
    def critique(self, requests: Sequence[CritiqueRequest], seed: int = 0) -> list[list[Critique]]:
        """Parsed critiques, N per request; request i samples with seeds seed + i*N ... seed + i*N + N - 1."""

    def sleep(self) -> None:  # noqa: B027 - most backends hold nothing to free
        """Frees what it can between critiques (a local engine's accelerator memory)."""

    @staticmethod
    def describe(config: CriticSettings, policy: str) -> str:
        """The judge in words, for the first line a run prints (`policy`: the model a judge defaults to)."""
        return f"critic.backend={config.backend}"

    @staticmethod
    def judge_name(config: CriticSettings, policy: str) -> str:
        """The judge's name in results (`policy`: the model a judge defaults to)."""
        return config.model or policy

    @staticmethod  # noqa: B027 - a local judge's model is resolved when the run starts
    def check(config: CriticSettings) -> None:
        """Raises ConfigError naming the key when the section lacks what this backend needs (at load time)."""

    @staticmethod
    def env_vars(config: CriticSettings) -> list[str]:
        """Environment variables the backend reads (a multi-node launch forwards them to every node)."""
        return []

    @staticmethod
    def failure_hint(config: CriticSettings) -> str:
        """Where to look when its critiques fail."""
        return "the judge"

    @classmethod
    def build(cls, config: CriticSettings, judge: Path | None, *, dtype: str, seed: int, sleep_mode: bool) -> Critic:
        """The critic of a run; `judge`, `dtype`, `seed` and `sleep_mode` concern backends with a local model."""
        return cls(config, config.model)

    def probe(self) -> None:  # noqa: B027 - a local engine or a function is there once built
        """Raises JudgeError when the judge cannot answer, so a run stops before its first rollout."""


class ChatCritic(Critic):
    """A chat model as the GenPRM: the critic prompt in, judge text out. Backends provide `_complete`."""

    def __init__(self, config: CriticSettings):
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

    local_model = True

    @classmethod
    def build(cls, config: CriticSettings, judge: Path | None, *, dtype: str, seed: int, sleep_mode: bool) -> Critic:
        return cls(config, str(judge), dtype=dtype, seed=seed, sleep_mode=sleep_mode)

    @staticmethod
    def describe(config: CriticSettings, policy: str) -> str:
        return f"LLM judge {config.model or policy} in a local vLLM engine"

    def __init__(
        self,
        config: CriticSettings,
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
    def describe(config: CriticSettings, policy: str) -> str:
        return f"LLM judge {config.model or '(the served model)'} at {config.url}"

    @staticmethod
    def check(config: CriticSettings) -> None:
        if not config.url.startswith("http"):
            raise ConfigError("critic.url: remote critic needs an http(s) URL")

    @staticmethod
    def env_vars(config: CriticSettings) -> list[str]:
        return [config.api_key_env] if config.api_key_env else []

    @staticmethod
    def failure_hint(config: CriticSettings) -> str:
        return f"critic.url={config.url!r} and ${config.api_key_env}"

    def __init__(self, config: CriticSettings, model: str = ""):
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
    def describe(config: CriticSettings, policy: str) -> str:
        return f"program critic {config.function} (a Python function standing in for an LLM judge)"

    @staticmethod
    def judge_name(config: CriticSettings, policy: str) -> str:
        return config.function

    @staticmethod
    def check(config: CriticSettings) -> None:
        """Imported now, so a wrong name stops the run before anything heavy starts."""
        if not config.function:
            raise ConfigError("critic.function: the function backend needs module:function")
        load_callable(config.function, "critic.function")

    def __init__(self, config: CriticSettings, model: str = ""):
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


# critic.backend: the one place the backends are named.
CRITIC_BACKENDS: dict[str, type[Critic]] = {
    "vllm": LocalCritic,
    "remote": RemoteCritic,
    "function": FunctionCritic,
}


def build_critic(
    settings: CriticSettings, judge: Path | None, *, voting: str, dtype: str, seed: int, sleep_mode: bool = False
) -> Critic:
    """The critic of a run, as training and the judge evaluation both use it: `critic.backend` with the
    sampling of the voting mode (greedy decodes at temperature 0), probed so that a judge that cannot
    answer stops the run now. `voting` is algorithm.voting, `dtype` model.dtype, `seed` trainer.seed.

    A local engine loads `judge` (the resolved critic.model, else the policy's start) and holds
    critic.gpu_memory_utilization of the GPU, its KV cache being what weights and activations leave of that
    share: no kv_cache_memory_bytes, which would make vLLM ignore the share (vllm/config/cache.py:257-264;
    vllm/v1/worker/gpu_worker.py:649-675 skips the profile, :740-744 sizes the cache from the share). A
    step's critiques that do not fit at once wait in vLLM's queue; `python -m capo_fast.memory_budget` says
    how many waves that takes."""
    voted = dataclasses.replace(settings, sampling=VOTING[voting].critic_sampling(settings.sampling))
    critic = CRITIC_BACKENDS[settings.backend].build(voted, judge, dtype=dtype, seed=seed, sleep_mode=sleep_mode)
    critic.probe()
    return critic


def check_critique_failures(rate: float, config: CriticSettings, step: int) -> None:
    """Warns above critic.warn_failure_rate and stops above critic.max_failure_rate: without critiques,
    CAPO silently trains on outcome reward alone. `rate` is reduced over ranks, so all ranks agree."""
    if rate > config.max_failure_rate:
        where = CRITIC_BACKENDS[config.backend].failure_hint(config)
        raise JudgeError(
            f"step {step}: {rate:.0%} of critiques failed (critic.max_failure_rate={config.max_failure_rate}); "
            f"the run would train on outcome reward alone. Check {where}, and critic.answer_format "
            "(guided keeps small judges to the format)"
        )
    if rate > config.warn_failure_rate:
        logger.warning("step %d: %.0f%% of critiques failed (critic.warn_failure_rate=%s)", step, 100 * rate,
                       config.warn_failure_rate)  # fmt: skip
