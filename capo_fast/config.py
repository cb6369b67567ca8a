"""Run configuration: typed sections, YAML loading, `--section.key=value` overrides, validation.

Every invalid value raises `ConfigError` naming the key (and the YAML file and line when it came
from one). The defaults are the embedded default run (`make train`): CAPO on the chain-arithmetic task
(capo_fast.chain_arithmetic) with a tiny warmed-up policy and the task's program critic standing in for the
LLM judge, sized to show learning in a few minutes on a 2-core CPU. configs/cpu-smollm2-judge.yaml
runs the same loop with SmolLM2-135M-Instruct as policy and judge.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from capo_fast.credit import REWARD_MODES, CreditConfig, VotingConfig
from capo_fast.critics import CRITIC_BACKENDS, Critic
from capo_fast.critique import VOTING, load_template, make_splitter
from capo_fast.data import INSTRUCTION_WRAPPERS
from capo_fast.errors import ConfigError
from capo_fast.kernels import PolicyLossOptions
from capo_fast.kernels.aggregation import AGGREGATIONS
from capo_fast.plugins import load_callable
from capo_fast.policy_losses import POLICY_LOSSES
from capo_fast.text_files import read_utf8

TruncatedReward = Literal["verify", "zero"]
AnswerFormat = Literal["free", "guided"]
Dtype = Literal["float32", "bfloat16", "float16"]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates every annotation's text: once per class


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


MAX_GENORM_ALPHA = 92.0  # sigmoid(-92) < 1e-40: every larger |alpha| scores like this one


def _check_numbers(section: Any, prefix: str) -> None:
    """One rule for every number of every section: a finite value of the field's type (no NaN or inf,
    which pass every `>=` check by failing it silently or by being infinite)."""
    hints = _type_hints(type(section))
    for f in dataclasses.fields(section):
        value, key, hint = getattr(section, f.name), f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(value):
            _check_numbers(value, key + ".")
        elif hint in (int, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            _check(
                ok and (hint is float or isinstance(value, int)),
                key,
                f"must be a finite {hint.__name__}, got {value!r}",
            )


@dataclass
class SamplingConfig:
    """Generation settings of one engine."""

    temperature: float = 0.7  # sampling temperature; 0: greedy decoding
    top_p: float = 0.9  # nucleus sampling
    max_tokens: int = 256  # new tokens per completion
    stop: list[str] = field(default_factory=list)  # strings that end a generation (kept out of the text)

    def validate(self, key: str) -> None:
        _check(self.temperature >= 0, f"{key}.temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, f"{key}.top_p", "must be in (0, 1]")
        _check(self.max_tokens >= 1, f"{key}.max_tokens", "must be >= 1")


@dataclass
class ModelConfig:
    """`path` is an HF model folder, or `chain` / `smollm2` / `tiny` for the models that ship offline."""

    path: str = "chain"  # HF folder, hub id (org/name), or chain / smollm2 / tiny (offline; chain is warmed up once)
    dtype: Dtype = "float32"  # of training and generation; flash-attn needs bfloat16/float16
    gradient_checkpointing: bool = False  # recompute layers in backward: less memory, ~30% more time
    liger_patches: bool = True  # RMSNorm, SwiGLU, RoPE kernels on CUDA; the loss stays capo-fast's


@dataclass
class DataConfig:
    """`train` / `eval`: a .jsonl/.json/.csv/.parquet file, a saved HF dataset folder, a hub dataset
    `org/name[:config][@split]`, or `gym:<task>[+<task>]` (generated offline)."""

    train: str = "chain:train"  # a file, dataset folder, hub dataset, gym:<task> or chain:train
    eval: str = ""  # empty: held out from the same generator (gym: another seed; chain: its held-out split) or none
    num_train: int = 2000  # size of generated task sets
    num_eval: int = 200  # held-out problems scored before, during and after training
    system_prompt: str = ""  # the policy's system prompt (a chat prompt in the data may bring its own)
    max_prompt_tokens: int = 256  # longer prompts are a data error, named with their index
    seed: int = 0  # of the generated task sets
    # Dotted paths of a row's fields (e.g. reward_model.ground_truth); empty: the usual names, which
    # cover plain rows, verl's parquet rows and TRL/open-r1's problem + solution rows.
    question_key: str = ""
    answer_key: str = ""  # as question_key, for the gold answer
    reference_key: str = ""  # as question_key, for the reference solution the judge sees
    # A dataset's instruction wrapper stripped from every question (data.INSTRUCTION_WRAPPERS), e.g. dapo:
    # DAPO-Math-17k's "... of the form Answer: $Answer ..." around each problem; empty: questions as given.
    strip_instruction: str = ""


@dataclass
class RolloutConfig:
    n: int = 8  # rollouts per prompt
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=80))
    tensor_parallel_size: int = 1  # GPUs per policy engine (consecutive ranks)
    gpu_memory_utilization: float = 0.35  # engine's share of the GPU (the KV cache is sized from demand on CUDA)
    max_model_len: int = 1024  # prompt + answer tokens an engine accepts
    sleep_mode: bool = True  # used only where the platform supports it
    enforce_eager: bool = False  # no CUDA graphs (less memory, slower decoding)


@dataclass
class CriticConfig:
    """The GenPRM. `model` empty: the policy's starting weights, frozen."""

    backend: str = "function"  # critics.CRITIC_BACKENDS: vllm (an engine in each process), remote or function
    model: str = ""  # judge model (folder or name on the server); empty: the policy's start
    num_critiques: int = 2  # N: critiques per rollout, combined by algorithm.voting
    # guided: decoding is constrained to the judgment line, then nothing after Yes, the <incorrect_steps> list
    # after No (small judges rarely keep the format on their own); free: the judge writes as it likes.
    answer_format: AnswerFormat = "guided"  # guided | free, see the comment above
    guided_reasoning_chars: int = 200  # room for reasoning before the closing lines when guided
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_tokens=128))
    include_reference: bool = True  # the reference solution in the prompt, else the gold answer
    function: str = "capo_fast.chain_arithmetic:critique"  # function backend: module:function (critics.FunctionCritic)
    step_splitter: str = ""  # empty: blank lines; a regex whose matches end a step; or module:function
    prompt_template: str = ""  # a text file with {question}, {reference_solution}, {steps}; empty: the packaged one
    gpu_memory_utilization: float = 0.35  # a colocated judge keeps this share all run long
    max_model_len: int = 2048  # judge prompt + critique tokens
    url: str = ""  # remote: base URL of an OpenAI-compatible server, e.g. http://host:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the server's API key
    max_concurrency: int = 16  # requests in flight to the server
    retries: int = 2  # per request, after which its N critiques are failed ones
    timeout_s: float = 120.0  # seconds per request to the remote judge
    # A judge that fails (server down, wrong URL, a format it never keeps) would leave outcome reward
    # alone, silently GRPO: warn each step above the first rate, stop the run above the second.
    warn_failure_rate: float = 0.2  # failed critiques per step above which each step warns
    max_failure_rate: float = 0.5  # ... and above which the run stops

    def backend_class(self) -> type[Critic]:
        """The critics.CRITIC_BACKENDS entry of `backend`: what it needs, how it is described and built."""
        return CRITIC_BACKENDS[self.backend]


@dataclass
class AlgorithmConfig:
    correct_reward: float = 2.0  # C: reward of a verified-correct answer (Eq. 1)
    penalty: float = 1.0  # P: the step penalty of Eq. 1 (GRPO-Rule is reward_mode=outcome)
    format_weight: float = 0.0  # w_f: weight of the format reward (a non-empty boxed answer; paper: 0.2)
    # capo: CAPO (Eq. 1-2); outcome: GRPO-Rule; genorm: GRPO-GenORM (Eq. 3). Names: credit.REWARD_MODES.
    reward_mode: str = "capo"
    # GRPO-GenORM, Eq. 3: sigmoid(alpha * r_m) + (beta * r_v - 1) + w_f * r_f, r_m the judges' majority verdict.
    # The paper gives no values; 1 and 1 are the equation unscaled. With beta = 1 a verified answer always
    # outscores an unverified one (the judge moves a score by sigmoid(alpha) - 1/2 < 1/2 for any alpha), so
    # the verdict only ranks answers the verifier scores alike; a larger alpha widens that gap (to 1/2 at most).
    genorm_alpha: float = 1.0  # alpha of Eq. 3, >= 0
    genorm_beta: float = 1.0  # beta of Eq. 3
    # greedy | intersection | majority | union | average (critique.VOTING). majority flags a step named by at
    # least vote_threshold of the k valid critiques, count >= vote_threshold * k: 0.5 is section 3.1's
    # count >= k/2 (2 of 4 flag a step); above one half, e.g. 0.6, is the strict majority of the overview figure.
    voting: str = "majority"
    vote_threshold: float = 0.5  # majority: the fraction of valid critiques a step needs, in (0, 1]
    min_valid_critiques: int = 1  # fewer valid critiques than this: the rollout gets no step penalty
    verifier: str = "capo_fast.reward:verify_answer"  # module:function(response, gold) -> 0/1, in worker processes
    truncated_reward: TruncatedReward = "verify"  # verify: a cut-off response is scored like any other
    # ppo: the fused CAPO/PPO clipped loss; gspo: sequence-level ratio (GSPO-token); cispo: clipped IS weight
    # on REINFORCE (MiniMax-M1). Names: policy_losses.POLICY_LOSSES; each sees A_t = a - p*e_t and the aggregation.
    policy_loss: str = "ppo"
    eps_low: float = 0.2  # clip range [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.2  # clip-higher when above eps_low
    dual_clip: float = 0.0  # 0: off; otherwise the dual-clip constant c > 1
    kl_coef: float = 0.0  # k3 KL to the starting policy (paper: 0.01)
    entropy_coef: float = 0.0  # entropy bonus
    aggregation: str = "seq-mean-token-mean"  # token-mean (DAPO), seq-mean-token-sum-norm (kernels.aggregation)
    mini_epochs: int = 1  # PPO passes over each rollout batch (paper: 4)
    verifier_timeout_s: float = 5.0  # math-verify budget per answer; past it the answer scores 0

    def credit_options(self) -> CreditConfig:
        """The constants of Eq. 1 to 3 and the reward mode, as credit assignment takes them."""
        return CreditConfig(
            correct_reward=self.correct_reward, penalty=self.penalty, format_weight=self.format_weight,
            reward_mode=self.reward_mode, genorm_alpha=self.genorm_alpha, genorm_beta=self.genorm_beta,
        )  # fmt: skip

    def voting_options(self) -> VotingConfig:
        """How the N critiques of a rollout become step weights."""
        return VotingConfig(mode=self.voting, threshold=self.vote_threshold, min_valid=self.min_valid_critiques)

    def policy_loss_options(self, temperature: float) -> PolicyLossOptions:
        """The loss's scalar options; `temperature` is the rollouts' (greedy rollouts, 0, score logits as they are)."""
        return PolicyLossOptions(
            temperature=temperature or 1.0, eps_low=self.eps_low, eps_high=self.eps_high,
            dual_clip=self.dual_clip, kl_coef=self.kl_coef, entropy_coef=self.entropy_coef,
        )  # fmt: skip


@dataclass
class TrainerConfig:
    steps: int = 30  # rollout batches to train on
    prompts_per_step: int = 16  # global, over all ranks
    mini_batches: int = 2  # optimizer steps per mini-epoch
    micro_batch_tokens: int = 1024  # sdpa keeps [heads, T, T] scores per layer: keep T small on CPU
    lr: float = 1e-4  # peak learning rate (cosine decay after warmup)
    min_lr_ratio: float = 1.0  # final lr / peak lr (1: constant after warmup)
    warmup_steps: int = 2  # optimizer steps of linear warmup
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm
    zero_stage: int = 2  # 1-3: ZeRO skips steps whose gradient norm is not finite, ZeRO-0 applies them
    max_skipped_steps: int = 3  # stop after this many non-finite steps in a row
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU for the whole run
    offload_states_while_generating: bool = True  # CUDA: free optimizer state while the engines generate
    deepspeed_config: str = ""  # JSON file whose keys override the generated DeepSpeed config
    seed: int = 0  # sampling seeds, prompt order, initialisation


Verbosity = Literal["run", "all"]


@dataclass
class LoggingConfig:
    # run: the run's own lines, libraries' logs only at ERROR and their Python warnings off; all: everything
    verbosity: Verbosity = "run"
    output_dir: str = "runs/default"  # metrics, rollout samples, checkpoints, the final model
    rollout_samples: int = 8  # rollouts per step written to rollouts.jsonl (rank 0's first ones)
    tensorboard: bool = True  # write tensorboard/ too
    wandb_project: str = ""  # log to this wandb project too (empty: off)


@dataclass
class CheckpointConfig:
    every: int = 10  # steps; 0 turns periodic checkpoints off
    keep: int = 2  # periodic checkpoints kept (best is kept apart)
    resume: bool = True  # continue from the newest checkpoint in output_dir
    export: bool = True  # HF model folder at the end
    keep_best: bool = True  # checkpoints/best: the highest held-out accuracy of the evaluations


@dataclass
class EvalConfig:
    every: int = 5  # steps; 0: only before and after training
    sets: list[str] = field(default_factory=list)  # NAME=SOURCE, scored with the held-out set: eval/NAME/pass@1
    # NAME=SOURCE sets of the final evaluation (python -m capo_fast.evaluate --config FILE); not scored in training
    benchmarks: list[str] = field(default_factory=list)
    max_tokens: int = 80  # new tokens per evaluation answer


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def needs_judge(self) -> bool:
        """Whether the run reads critiques at all (GRPO-Rule and CAPO with P = 0 do not): the reward mode says."""
        a = self.algorithm
        return REWARD_MODES[a.reward_mode].needs_judge(a.penalty)

    def local_judge(self) -> bool:
        """Whether the run loads a judge model into a vLLM engine of each training process."""
        return self.needs_judge() and self.critic.backend_class().local_model

    def validate(self) -> Config:
        """Checks every value, reads the prompt template and imports the plug-ins, so that a wrong one stops
        the run before anything heavy starts; a ConfigError names the key."""
        _check_numbers(self, "")
        self._validate_rollout()
        self._validate_critic()
        self._validate_algorithm()
        self._validate_trainer()
        r, c = self.rollout, self.critic
        # vLLM keeps one tensor-parallel group per process and asserts its size when a second engine
        # starts (vllm/distributed/parallel_state.py:2392, ensure_model_parallel_initialized).
        _check(
            not (self.local_judge() and r.tensor_parallel_size > 1),
            "critic.backend",
            f"a local vLLM critic runs at tensor parallel size 1 in the policy's process, which vLLM refuses "
            f"beside rollout.tensor_parallel_size={r.tensor_parallel_size}; serve the judge and use "
            f"critic.backend=remote",
        )
        _check(
            1 <= self.algorithm.min_valid_critiques <= c.num_critiques,
            "algorithm.min_valid_critiques",
            f"must be in [1, critic.num_critiques={c.num_critiques}]",
        )
        wrappers = ["", *sorted(INSTRUCTION_WRAPPERS)]
        _check(self.data.strip_instruction in wrappers, "data.strip_instruction", f"must be one of {wrappers}")
        self._validate_ranges()
        return self

    def _validate_rollout(self) -> None:
        r = self.rollout
        r.sampling.validate("rollout.sampling")
        _check(r.n >= 2, "rollout.n", "group normalisation needs at least 2 rollouts per prompt")
        _check(r.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", "must be >= 1")
        _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")

    def _validate_critic(self) -> None:
        c = self.critic
        c.sampling.validate("critic.sampling")
        _check(0 < c.gpu_memory_utilization <= 1, "critic.gpu_memory_utilization", "must be in (0, 1]")
        _check(c.num_critiques >= 1, "critic.num_critiques", "must be >= 1")
        _check(c.guided_reasoning_chars >= 0, "critic.guided_reasoning_chars", "must be >= 0")
        if c.prompt_template:
            load_template(c.prompt_template)  # names the missing file or placeholder
        make_splitter(c.step_splitter)  # a plug-in is imported now
        _check(c.backend in CRITIC_BACKENDS, "critic.backend", f"{c.backend!r} is not one of {sorted(CRITIC_BACKENDS)}")
        c.backend_class().check(c)  # what the backend needs: a URL, a function ...
        _check(
            0 <= c.warn_failure_rate <= c.max_failure_rate <= 1,
            "critic.max_failure_rate",
            f"need 0 <= critic.warn_failure_rate ({c.warn_failure_rate}) <= critic.max_failure_rate <= 1",
        )

    def _validate_algorithm(self) -> None:
        a, c = self.algorithm, self.critic
        load_callable(a.verifier, "algorithm.verifier")  # imported now, like every plug-in
        _check(a.voting in VOTING, "algorithm.voting", f"{a.voting!r} is not one of {sorted(VOTING)}")
        _check(a.aggregation in AGGREGATIONS, "algorithm.aggregation",
               f"{a.aggregation!r} is not one of {sorted(AGGREGATIONS)}")  # fmt: skip
        modes = sorted(REWARD_MODES)
        _check(a.reward_mode in REWARD_MODES, "algorithm.reward_mode", f"{a.reward_mode!r} is not one of {modes}")
        _check(a.penalty >= 0, "algorithm.penalty", "must be >= 0")
        needed = VOTING[a.voting].num_critiques
        _check(needed in (None, c.num_critiques), "algorithm.voting", f"{a.voting} needs critic.num_critiques={needed}")
        _check(0 < a.vote_threshold <= 1, "algorithm.vote_threshold", "must be in (0, 1] (0 would flag every step)")
        _check(math.isfinite(a.genorm_beta), "algorithm.genorm_beta", "must be a finite number")
        _check(a.eps_low >= 0 and a.eps_high >= 0, "algorithm.eps_low", "clip ranges must be >= 0")
        _check(a.dual_clip == 0 or a.dual_clip > 1, "algorithm.dual_clip", "must be 0 (off) or > 1")
        losses = sorted(POLICY_LOSSES)
        _check(a.policy_loss in POLICY_LOSSES, "algorithm.policy_loss", f"{a.policy_loss!r} is not one of {losses}")
        _check(a.dual_clip == 0 or POLICY_LOSSES[a.policy_loss].dual_clip, "algorithm.dual_clip",
               f"policy_loss={a.policy_loss} has no dual clip; set it to 0")  # fmt: skip
        _check(a.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0")
        _check(a.mini_epochs >= 1, "algorithm.mini_epochs", "must be >= 1")

    def _validate_trainer(self) -> None:
        t = self.trainer
        _check(t.steps >= 1, "trainer.steps", "must be >= 1")
        _check(t.prompts_per_step >= 1, "trainer.prompts_per_step", "must be >= 1")
        _check(t.mini_batches >= 1, "trainer.mini_batches", "must be >= 1")
        _check(t.micro_batch_tokens >= 64, "trainer.micro_batch_tokens", "must be >= 64")
        _check(t.lr > 0 and math.isfinite(t.lr), "trainer.lr", "must be a positive number")
        _check(0 <= t.min_lr_ratio <= 1, "trainer.min_lr_ratio", "must be in [0, 1]")
        # deepspeed/runtime/zero/stage_1_and_2.py:3040-3044 and stage3.py:2886-2889 flag a non-finite
        # gradient norm as overflow and the engine skips the step (engine.py:3535-3541); ZeRO-0 has no such check.
        _check(t.zero_stage in (1, 2, 3), "trainer.zero_stage", "must be 1, 2 or 3 (ZeRO-0 applies non-finite steps)")
        _check(t.max_skipped_steps >= 1, "trainer.max_skipped_steps", "must be >= 1")
        _check(
            not t.deepspeed_config or Path(t.deepspeed_config).is_file(),
            "trainer.deepspeed_config",
            f"{t.deepspeed_config} does not exist (paths are relative to the working directory)",
        )

    def _validate_ranges(self) -> None:
        """Values outside these ranges would not fail: they would quietly do something else (a negative
        `every` checkpointing every few steps, a zero timeout scoring every answer 0)."""
        d, r, c, a, t = self.data, self.rollout, self.critic, self.algorithm, self.trainer
        _check(d.num_train >= 1, "data.num_train", "must be >= 1")
        _check(d.num_eval >= 0, "data.num_eval", "must be >= 0")
        _check(d.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")
        _check(r.max_model_len >= 1, "rollout.max_model_len", "must be >= 1")
        _check(c.max_model_len >= 1, "critic.max_model_len", "must be >= 1")
        _check(c.max_concurrency >= 1, "critic.max_concurrency", "must be >= 1")
        _check(c.retries >= 0, "critic.retries", "must be >= 0")
        _check(c.timeout_s > 0, "critic.timeout_s", "must be > 0 seconds")
        _check(a.verifier_timeout_s > 0, "algorithm.verifier_timeout_s", "must be > 0 seconds")
        _check(a.format_weight >= 0, "algorithm.format_weight", "must be >= 0")
        # Eq. 3's sigmoid(alpha * r_m): a negative alpha rewards the judge's No; past 92 it is saturated to 1e-40.
        _check(0 <= a.genorm_alpha <= MAX_GENORM_ALPHA, "algorithm.genorm_alpha",
               f"must be in [0, {MAX_GENORM_ALPHA}] (a negative alpha rewards the judge's No; the sigmoid is "
               f"saturated past {MAX_GENORM_ALPHA})")  # fmt: skip
        _check(t.warmup_steps >= 0, "trainer.warmup_steps", "must be >= 0")
        _check(t.weight_decay >= 0, "trainer.weight_decay", "must be >= 0")
        _check(t.grad_clip >= 0, "trainer.grad_clip", "must be >= 0 (0: no clipping)")
        _check(self.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0: no periodic checkpoints)")
        _check(self.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
        _check(self.eval.every >= 0, "eval.every", "must be >= 0 (0: only before and after training)")
        _check(self.eval.max_tokens >= 1, "eval.max_tokens", "must be >= 1")
        _check(self.logging.rollout_samples >= 0, "logging.rollout_samples", "must be >= 0")

    def check_world_size(self, world: int) -> None:
        """What depends on the number of ranks the launcher started (checked before any heavy work).

        Any number of prompts per step fits any world size: ranks hold whole prompt groups, one more on
        some ranks when the count is not a multiple (train.my_share)."""
        r = self.rollout
        _check(
            world % r.tensor_parallel_size == 0 and (world > 1 or r.tensor_parallel_size == 1),
            "rollout.tensor_parallel_size",
            f"{r.tensor_parallel_size} needs a multiple of that many ranks, got {world}: "
            f"deepspeed --num_gpus {max(r.tensor_parallel_size, world)} capo_fast/train.py ...",
        )


# ---- loading --------------------------------------------------------------------------------------

MAX_YAML_VALUES = 10_000  # values a config may expand to through aliases: a "billion laughs" stops here
_YAML_TAG = "tag:yaml.org,2002:"
# What PyYAML's resolver reads plain text as (`=` and `<<` too: the merge key then is an unknown key), and the
# collections: any other tag (`!x`, `!!python/...`) was written on purpose and is refused, not half-honoured.
_KNOWN_TAGS = {
    _YAML_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp", "value", "merge", "map", "seq")
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else f"{text[:80]}... ({len(text)} characters)"


class _Scalar(typing.NamedTuple):
    """A scalar as the user typed it, and the YAML node that says what YAML would read it as (None: a
    command-line value taken as text). String fields keep `text`: YAML would turn `007` into 7, `3.10`
    into 3.1, `no` into False and `1:30` into 90."""

    text: str
    node: Any = None

    def resolved(self, key: str) -> Any:
        if self.node is None:
            return self.text
        from yaml import YAMLError
        from yaml.constructor import SafeConstructor

        try:
            return SafeConstructor().construct_object(self.node)
        except (YAMLError, ValueError, OverflowError) as err:  # int() refuses 4,300+ digits: ValueError
            raise ConfigError(f"{key}: {_shown(self.text)} cannot be read ({type(err).__name__})") from None


def _tree(node: Any, key: str, where: str, lines: dict[str, int], count: list[int], path: list[int]) -> Any:
    """A composed YAML node as dicts, lists and _Scalar leaves, each key's line recorded in `lines`.

    Aliases share nodes: a node inside itself is a cycle, and the values counted past MAX_YAML_VALUES
    are an alias fan-out; both are refused, as are keys that are not plain text and keys set twice.
    """
    import yaml

    line = f"{where}:{node.start_mark.line + 1}"
    count[0] += 1
    if count[0] > MAX_YAML_VALUES:
        raise ConfigError(f"{line}: {key or 'config'}: more than {MAX_YAML_VALUES} values (aliases expanding?)")
    if id(node) in path:
        raise ConfigError(f"{line}: {key or 'config'}: an alias refers to a value that contains it")
    if node.tag not in _KNOWN_TAGS:
        raise ConfigError(f"{line}: {key or 'config'}: YAML tags ({node.tag}) are not supported")
    if isinstance(node, yaml.ScalarNode):
        return _Scalar(node.value, node)
    path.append(id(node))
    if isinstance(node, yaml.SequenceNode):
        out: Any = [_tree(item, key, where, lines, count, path) for item in node.value]
    else:
        out = {}
        for key_node, value_node in node.value:
            at = f"{where}:{key_node.start_mark.line + 1}"
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _KNOWN_TAGS:
                raise ConfigError(f"{at}: {key or 'config'}: a key must be a plain name")
            name = key_node.value
            dotted = f"{key}.{name}" if key else name
            if name in out:
                raise ConfigError(f"{at}: {dotted}: set twice (also on line {lines[dotted]})")
            lines[dotted] = key_node.start_mark.line + 1
            out[name] = _tree(value_node, dotted, where, lines, count, path)
    path.pop()
    return out


def _read_yaml(text: str, where: str) -> tuple[Any, dict[str, int]]:
    """YAML text as dicts, lists and _Scalar leaves (None when empty), and each dotted key's line."""
    import yaml

    lines: dict[str, int] = {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        return (None if node is None else _tree(node, "", where, lines, [0], [])), lines
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{where}: values nested too deeply") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Converts a YAML or command-line value to the field's type, or raises naming the key."""
    origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, _Scalar):  # one item; empty or null: none
            return [] if value.text == "" or (value.node and value.node.tag == _YAML_TAG + "null") else [value.text]
        if not isinstance(value, list) or not all(isinstance(v, _Scalar) for v in value):
            raise ConfigError(f"{key}: expected a list of strings")
        return [v.text for v in value]
    if not isinstance(value, _Scalar):
        kind = "str" if hint is str or origin is Literal else hint.__name__
        raise ConfigError(f"{key}: expected {kind}, got a {'mapping' if isinstance(value, dict) else 'list'}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value.text not in choices:
            raise ConfigError(f"{key}: {_shown(value.text)} is not one of {list(choices)}")
        return value.text
    if hint is str:
        return value.text
    resolved = value.resolved(key)
    if hint is bool:
        if isinstance(resolved, str) and resolved.lower() in ("true", "false", "1", "0", "yes", "no"):
            return resolved.lower() in ("true", "1", "yes")
        if not isinstance(resolved, bool):
            raise ConfigError(f"{key}: expected true or false, got {_shown(resolved)}")
        return resolved
    if hint in (int, float):
        integral = not isinstance(resolved, float) or resolved.is_integer()
        if isinstance(resolved, bool) or not isinstance(resolved, (int, float, str)) or (hint is int and not integral):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {_shown(resolved)}")
        try:
            return hint(resolved)
        except (ValueError, OverflowError):  # "fast", or int() of a 4,300+ digit string
            raise ConfigError(f"{key}: expected {hint.__name__}, got {_shown(resolved)}") from None
    raise ConfigError(f"{key}: unsupported type {hint}")


def _hint(obj: Any, path: list[str]) -> Any:
    """The type of the field (or section) a dotted path names; None for an unknown key."""
    hint = None
    for name in path:
        hints = _type_hints(type(obj)) if dataclasses.is_dataclass(obj) else {}
        if name not in hints:
            return None
        hint, obj = hints[name], getattr(obj, name)
    return hint


def _assign(obj: Any, path: list[str], value: Any, where: str) -> None:
    key = ".".join(path)
    hints = _type_hints(type(obj))
    name = path[0]
    if name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(obj))
        raise ConfigError(f"{where}{key}: unknown key {_shown(name)} (known here: {known})")
    current = getattr(obj, name)
    if dataclasses.is_dataclass(current):
        if len(path) == 1:
            if not isinstance(value, dict):
                shown = _shown(value.text) if isinstance(value, _Scalar) else "a list"
                raise ConfigError(f"{where}{key}: expected a mapping of keys, got {shown}")
            for sub, subvalue in value.items():
                _assign(current, [sub], subvalue, f"{where}{name}.")
            return
        _assign(current, path[1:], value, f"{where}{name}.")
        return
    if len(path) > 1:
        raise ConfigError(f"{where}{key}: {name!r} is a value, not a section")
    setattr(obj, name, _coerce(value, hints[name], f"{where}{name}"))


def parse_override(arg: str) -> tuple[str, str]:
    """`--section.key=value` -> ("section.key", "value")."""
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body:
        raise ConfigError(f"override {_shown(arg)}: expected --section.key=value")
    key, value = body.split("=", 1)
    return key, value


def _override_value(config: Config, key: str, value: str, arg: str) -> Any:
    """A command-line value: text as typed for text fields (and a list field's one item), else YAML."""
    hint = _hint(config, key.split("."))
    if hint is None or hint is str or typing.get_origin(hint) is Literal:  # (None: the unknown key is named)
        return _Scalar(value)
    if typing.get_origin(hint) is list and not value.lstrip().startswith("["):
        return _Scalar(value)
    tree, _ = _read_yaml(value, f"command line {_shown(arg)}")
    return _Scalar("") if tree is None else tree


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The defaults, updated by the YAML file at `path`, then by `--section.key=value` overrides."""
    config = Config()
    lines: dict[str, int] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data, lines = _read_yaml(read_utf8(path, ConfigError), str(path))
        data = {} if data is None or (isinstance(data, _Scalar) and data.text == "") else data
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for section, values in data.items():
            try:
                _assign(config, [section], values, "")
            except ConfigError as err:
                key = str(err).split(":", 1)[0]
                line = lines.get(key) or lines.get(section)
                raise ConfigError(f"{path}:{line}: {err}") from None
    override_args: dict[str, str] = {}
    for arg in overrides:
        key, value = parse_override(arg)
        override_args[key] = arg
        try:
            _assign(config, key.split("."), _override_value(config, key, value, arg), "")
        except ConfigError as err:
            message = str(err)
            raise ConfigError(
                message if message.startswith("command line") else f"command line {_shown(arg)}: {err}"
            ) from None
    try:
        return config.validate()
    except ConfigError as err:
        key = str(err).split(":", 1)[0]
        if key in override_args:
            raise ConfigError(f"command line {_shown(override_args[key])}: {err}") from None
        if key in lines:
            raise ConfigError(f"{path}:{lines[key]}: {err}") from None
        raise ConfigError(f"{path or 'config'}: {err}") from None


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def _field_comments() -> dict[str, str]:
    """`section.key` -> the comment written beside the field in this file (its meaning)."""
    import ast
    import io
    import tokenize

    source = Path(__file__).read_text()
    comments = {
        tok.start[0]: tok.string.lstrip("# ").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    above, line = [], item.lineno - 1
                    while line in comments and line not in (i.end_lineno for i in node.body if i is not item):
                        above.insert(0, comments[line])
                        line -= 1
                    out[f"{node.name}.{item.target.id}"] = comments.get(item.lineno) or " ".join(above)
    return out


def describe_config(config: Config | None = None) -> str:
    """Every key as `--section.key=value`, with its meaning where this file states one."""
    config = config or Config()
    notes = _field_comments()
    lines = []

    def walk(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            note = notes.get(f"{type(obj).__name__}.{f.name}", "")
            lines.append(f"--{prefix}{f.name}={value!r}" + (f"  # {note}" if note else ""))

    walk(config, "")
    return "\n".join(lines)
