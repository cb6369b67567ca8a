"""Entry point: `deepspeed capo_fast/train.py [--config configs/X.yaml] [--section.key=value ...]`.

One step: rollouts (policy engine) -> outcome verifier, overlapping with GenPRM critiques -> votes
and token credit -> group advantages -> PPO mini-epochs with the fused loss -> weights to the engine.
With no arguments it runs the embedded default (config.py): a tiny warmed-up policy on the
chain-arithmetic task with its program critic, a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from capo_fast.checkpoints import Checkpoints
from capo_fast.config import Config, describe_config, load_config, to_dict
from capo_fast.console import quiet_libraries
from capo_fast.credit import COUNTED_METRICS as CREDIT_COUNTS
from capo_fast.credit import Rollout, assign_credit, describe, rollout_metrics
from capo_fast.critics import CritiqueRequest, build_critic, check_critique_failures
from capo_fast.critique import make_splitter
from capo_fast.data import (
    EVAL_SEED_OFFSET,
    DataKeys,
    Problem,
    PromptGroup,
    PromptSampler,
    encode_prompts,
    held_out_source,
    is_generated,
    load_problems,
)
from capo_fast.distributed import (
    check_same_environment,
    check_shared_folder,
    fail_together,
    rank_and_world,
    start_process_group,
)
from capo_fast.engines import PolicyEngine, VLLMEngine, critic_sleep_mode, sleep_mode_supported
from capo_fast.errors import ConfigError, DataError, JudgeError
from capo_fast.launch_env import required_env
from capo_fast.metrics import MetricsLog, RolloutSamples, all_reduce_named, format_line, write_run_info
from capo_fast.model_shapes import Architecture, kv_cache_bytes
from capo_fast.models import resolve_model_once
from capo_fast.reward import COUNTED_METRICS as REWARD_COUNTS
from capo_fast.reward import Answer, OutcomeScore, OutcomeVerifier, format_reward, outcome_rewards, verifier_metrics
from capo_fast.run_report import eval_line, model_card, write_summary
from capo_fast.scoring import EvalOptions, evaluate_on_ranks, load_set, parse_sets
from capo_fast.seeds import rank_seeds
from capo_fast.trainer import UPDATE_STATS, PolicyTrainer, TrainingDiverged, TrainSequence

logger = logging.getLogger("capo_fast")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description="CAPO training (launch with the deepspeed launcher)")
    parser.add_argument("--config", type=Path, default=None, help="YAML run config (default: the embedded one)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("--print-config", action="store_true", help="print every key, its value and meaning, and exit")
    args, rest = parser.parse_known_args(argv)
    return args, rest


COUNTED_METRICS = CREDIT_COUNTS | REWARD_COUNTS  # summed over ranks; the other step metrics are averaged
# ---- distributed helpers -----------------------------------------------------------------------------


def my_share(items: list, rank: int, world: int) -> list:
    """A contiguous block per rank, so every rank keeps whole prompt groups; when len(items) is not a
    multiple of world the blocks differ by one (12 prompts on 8 ranks: 1 or 2 each). Uneven shares are
    safe downstream: micro-batch counts are equalised across ranks (trainer._micro_batches), the loss is
    normalised by global counts, and step metrics are weighted by each rank's rollouts."""
    return items[rank * len(items) // world : (rank + 1) * len(items) // world]


def describe_shares(prompts: int, world: int) -> str | None:
    """What a launch whose ranks hold unequal numbers of prompt groups should know, or None."""
    if prompts % world == 0:
        return None
    sizes = sorted({len(my_share(list(range(prompts)), r, world)) for r in range(world)})
    idle = " (ranks without a prompt still join every collective and optimizer step)" if sizes[0] == 0 else ""
    return (
        f"{prompts} prompts per step over {world} ranks: each rank holds {' or '.join(map(str, sizes))} prompt "
        f"groups{idle}; a step waits for the busiest rank, so trainer.prompts_per_step a multiple of {world} "
        f"uses every GPU fully"
    )


@contextmanager
def timed(times: dict[str, float], phase: str):
    start = time.perf_counter()
    yield
    times[f"time/{phase}"] = times.get(f"time/{phase}", 0.0) + time.perf_counter() - start


# ---- what a run reads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunData:
    """The training problems with their prompt ids and the order they come in (the sampler's position is
    checkpointed), and the evaluation sets as (problems, prompt ids), the held-out set first (an eval.sets
    entry named `heldout` replaces it, so a run can score its own held-out file; `heldout_size` stays the
    held-out set's)."""

    train: list[Problem]
    train_prompts: list[list[int]]
    sampler: PromptSampler
    eval_sets: dict[str, tuple[list[Problem], list[list[int]]]]
    heldout_size: int

    def group(self, index: int) -> PromptGroup:
        """A fresh record for training prompt `index` (a sampler index), before its rollouts."""
        return PromptGroup(self.train[index], self.train_prompts[index])


def load_data(config: Config, tokenizer) -> RunData:
    """Training, held-out and eval.sets problems and their prompt tokens; DataError names what is wrong."""
    d = config.data
    keys = DataKeys(d.question_key, d.answer_key, d.reference_key, d.strip_instruction)
    train = load_problems(d.train, size=d.num_train, seed=d.seed, keys=keys)
    eval_source = d.eval or held_out_source(d.train)
    eval_seed = d.seed + EVAL_SEED_OFFSET
    heldout = []
    if eval_source:
        heldout = load_problems(eval_source, size=d.num_eval, seed=eval_seed, keys=keys)[: d.num_eval]
    train_prompts = encode_prompts(tokenizer, train, d.system_prompt)
    sets = {}  # eval.sets: NAME=SOURCE, scored like the held-out set
    for name, source in parse_sets(config.eval.sets).items():
        problems = load_set(source, seed=eval_seed, limit=d.num_eval if is_generated(source) else 0, keys=keys)
        sets[name] = (problems, encode_prompts(tokenizer, problems, d.system_prompt))
    sets = {"heldout": (heldout, encode_prompts(tokenizer, heldout, d.system_prompt)), **sets}
    too_long = [i for i, p in enumerate(train_prompts) if len(p) > d.max_prompt_tokens]
    if too_long:
        raise DataError(f"{d.train}: {len(too_long)} prompts exceed data.max_prompt_tokens, e.g. problem {too_long[0]}")
    return RunData(train, train_prompts, PromptSampler(len(train), config.trainer.seed), sets, len(heldout))


def build_policy_engine(config: Config, model_path: Path, world: int) -> VLLMEngine:
    """The policy's vLLM engine: sleeps between rollouts (level 2, weights from the trainer), its KV cache
    sized by model_shapes.kv_cache_bytes."""
    c, r = config, config.rollout
    arch = Architecture.from_hf_config(json.loads((model_path / "config.json").read_text()))
    return VLLMEngine(
        model_path, dtype=c.model.dtype, seed=c.trainer.seed, tensor_parallel_size=r.tensor_parallel_size,
        gpu_memory_utilization=r.gpu_memory_utilization, max_model_len=r.max_model_len,
        enforce_eager=r.enforce_eager, sleep_level=2, sleep_mode=r.sleep_mode,
        kv_cache_memory_bytes=kv_cache_bytes(c, arch, world),
    )  # fmt: skip


# ---- the run -----------------------------------------------------------------------------------------


class Run:
    """A CAPO run: `train_step` is one step of the algorithm; `run` steps, evaluates, checkpoints, reports."""

    def __init__(self, config: Config):
        from transformers import AutoTokenizer

        self.config = c = config
        self.started = time.monotonic()
        self.rank, self.world = rank_and_world()
        a = c.algorithm
        self.credit_config = a.credit_options()
        judge = c.critic.backend_class().describe(c.critic, c.model.path) if c.needs_judge() else "no judge"
        self.method = f"{describe(self.credit_config)}, voting={a.voting}; {judge}"
        if self.rank == 0:
            print(f"method: {self.method}", flush=True)  # the first line the run prints
        c.check_world_size(self.world)
        shares = describe_shares(c.trainer.prompts_per_step, self.world)
        if shares and self.rank == 0:
            print(f"note: {shares}", flush=True)
        check_same_environment(required_env(c))
        self.out = Path(c.logging.output_dir)
        self.model_path = resolve_model_once(c.model.path)
        # A local judge's weights are found (or fail) now too, not after the policy's engines have started.
        self.critic_path = (
            resolve_model_once(c.critic.model, "critic.model") if c.local_judge() and c.critic.model else None
        )
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)

        # Data errors stop every rank here, before deepspeed.initialize or an engine starts.
        self.data = fail_together(lambda: load_data(c, self.tokenizer), "loading the data")
        # A judge server (or a critic function) answers now, not after the first rollouts.
        critic_options = {"voting": a.voting, "dtype": c.model.dtype, "seed": c.trainer.seed}
        self.critic = None
        if c.needs_judge() and not c.local_judge():
            self.critic = fail_together(lambda: build_critic(c.critic, None, **critic_options), "reaching the judge")

        self.trainer = PolicyTrainer(c, self.model_path)
        self.checkpoints = Checkpoints(
            self.out / "checkpoints", self.trainer, self.data.sampler, rank=self.rank, keep=c.checkpoint.keep
        )
        r = c.rollout
        self.policy = PolicyEngine(build_policy_engine(c, self.model_path, self.world), self.trainer)
        self.voting = a.voting_options()
        # The reward mode says whether critiques are read at all: GRPO-Rule and CAPO with P = 0 skip the judge.
        if c.needs_judge() and self.critic is None:  # a local engine: after the policy's (one sleep-mode engine)
            sleeps = critic_sleep_mode(
                requested=r.sleep_mode, supported=sleep_mode_supported(), policy_sleeps=self.policy.engine.sleep_enabled
            )
            judge = self.critic_path or self.model_path
            self.critic = build_critic(c.critic, judge, sleep_mode=sleeps, **critic_options)
        self.verifier = OutcomeVerifier(num_workers=1, timeout_s=a.verifier_timeout_s, verifier=a.verifier)
        self.split_steps = make_splitter(c.critic.step_splitter)
        self.log = MetricsLog(
            self.out, enabled=self.rank == 0, tensorboard=c.logging.tensorboard,
            wandb_project=c.logging.wandb_project, config=to_dict(c),
        )  # fmt: skip
        self.samples = RolloutSamples(
            self.out / "rollouts.jsonl", enabled=self.rank == 0, per_step=c.logging.rollout_samples
        )
        if self.rank == 0:
            write_run_info(self.out, to_dict(c))
        self.step = 0

    # ---- one step ------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """Prompt groups -> rollouts -> verify + critique -> vote + credit -> advantages -> log-probs ->
        update, on this rank's share of the step's prompts; the step's metrics, reduced over the ranks."""
        c, times = self.config, {}
        positions, groups = self._sample_prompt_groups()
        with timed(times, "rollout"):  # includes the weight sync, reported apart as time/sync
            seeds = rank_seeds(c.trainer.seed, self.step, positions, c.rollout.n, c.critic.num_critiques)
            self._generate_rollouts(groups, seeds.rollouts)
        times["time/sync"] = self.policy.last_sync_s
        with timed(times, "critique"):  # the verifier runs meanwhile
            scores = self._verify_and_critique(groups, seeds.critiques)
        rollouts = [r for g in groups for r in g.rollouts]
        with timed(times, "credit"):
            assign_credit([g.rollouts for g in groups], self.tokenizer, self.voting, self.credit_config)
            credit_stats = rollout_metrics(rollouts, self.credit_config, c.critic.num_critiques if self.critic else 0)
            if self.critic is not None:  # before the update: a dead judge must not leave a step on outcome alone
                check_critique_failures(failed_critique_rate(credit_stats, len(rollouts)), c.critic, self.step + 1)
            sequences = [
                TrainSequence(g.prompt_ids, r.token_ids, r.advantage, r.group_penalty, r.credit)
                for g in groups
                for r in g.rollouts
            ]
        with timed(times, "logprobs"):
            self.trainer.compute_logprobs(sequences)
        with timed(times, "update"):
            stats = self.trainer.ppo_epochs(sequences, self.step)
        self.samples.write(self.step + 1, groups)
        reward = self.credit_config.correct_reward
        return step_metrics(rollouts, scores, credit_stats, stats, times, reward, self.trainer.lr)

    def _sample_prompt_groups(self) -> tuple[list[int], list[PromptGroup]]:
        """This rank's share of the step's prompts: their positions in the step's batch (what the seeds
        are drawn from) and a group record for each."""
        batch = self.data.sampler.next_batch(self.config.trainer.prompts_per_step)
        positions = my_share(list(range(len(batch))), self.rank, self.world)
        return positions, [self.data.group(batch[p]) for p in positions]

    def _generate_rollouts(self, groups: list[PromptGroup], seeds: list[int]) -> None:
        n, sampling = self.config.rollout.n, self.config.rollout.sampling
        answers = self.policy.generate([g.prompt_ids for g in groups], sampling, n=n, seeds=seeds)
        for group, completions in zip(groups, answers, strict=True):
            group.rollouts = [
                Rollout(a.token_ids, a.text, a.finish_reason == "length", self.split_steps(a.text)) for a in completions
            ]

    def _verify_and_critique(self, groups: list[PromptGroup], seeds: list[int]) -> list[OutcomeScore]:
        """r_v and r_f of every rollout (the verifier in a thread) while the judge critiques it; the verifier's
        scores, for its timeout and error counts."""
        answered = [(g.problem, r) for g in groups for r in g.rollouts]
        answers = [Answer(r.text, p.answer, p.correct_choice, r.truncated) for p, r in answered]
        zero = self.config.algorithm.truncated_reward == "zero"
        with ThreadPoolExecutor(1) as pool:
            verified = pool.submit(outcome_rewards, answers, self.verifier.score, zero_if_truncated=zero)
            if self.critic is not None:
                requests = [CritiqueRequest(p.question, r.steps, p.reference_solution, p.answer) for p, r in answered]
                for (_, r), critiques in zip(answered, self.critic.critique(requests, seed=seeds), strict=True):
                    r.critiques = critiques
                self.critic.sleep()
            rewards, scores = verified.result()
        for (_, r), reward in zip(answered, rewards, strict=True):
            r.correct, r.formatted = reward, format_reward(r.text)
        return scores

    def evaluate(self) -> dict[str, float]:
        """Greedy pass@1, response length and truncation on the held-out problems and on every set of
        eval.sets (capo_fast.scoring, as `python -m capo_fast.evaluate` scores), each rank answering its
        share; `eval/accuracy` is the held-out pass@1."""
        options = EvalOptions(runs=1, max_tokens=self.config.eval.max_tokens, seed=self.config.trainer.seed)
        metrics = evaluate_on_ranks(self.data.eval_sets, self.policy.generate, self.verifier.score, options,
                                    rank=self.rank, world=self.world)  # fmt: skip
        return {"eval/accuracy": metrics.get("eval/heldout/pass@1", float("nan")), **metrics}

    # ---- the loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        from tqdm import tqdm

        c = self.config
        check_shared_folder(self.checkpoints.folder)
        self.resume()
        if self.step == 0:
            self._report_eval("before training", self.evaluate())
        bar = tqdm(total=c.trainer.steps, initial=self.step, desc="CAPO", disable=self.rank != 0, file=sys.stdout)
        while self.step < c.trainer.steps:
            metrics = self.train_step()
            self.step += 1
            if c.eval.every and self.step % c.eval.every == 0 and self.step < c.trainer.steps:
                metrics.update(self.evaluate())
                if c.checkpoint.keep_best:
                    self.checkpoints.keep_if_best(self.step, metrics["eval/accuracy"])
            self.log.log(self.step, metrics)
            if self.rank == 0:
                bar.write(format_line(self.step, metrics))
            bar.update(1)
            if c.checkpoint.every and self.step % c.checkpoint.every == 0:
                self.checkpoints.save(self.step)
        bar.close()
        final = self.evaluate()
        self._report_eval("after training", final)
        if c.checkpoint.keep_best:
            self.checkpoints.keep_if_best(self.step, final["eval/accuracy"])
        self.log.log(self.step, {"eval/accuracy_final": final["eval/accuracy"]})
        if c.checkpoint.export:
            card = model_card(c, method=describe(self.credit_config), steps=self.step,
                              heldout=self.data.heldout_size, rows=self.log.rows(), final=final)  # fmt: skip
            self.trainer.export(self.out / "final", self.tokenizer, card)
            if self.rank == 0:
                shutil.copy(self.out / "run.json", self.out / "final" / "run.json")
        if self.rank == 0:
            write_summary(self.out, self.log.path, self.log.rows(), heldout=self.data.heldout_size,
                          seconds=time.monotonic() - self.started, method=self.method,
                          checkpoints=self.checkpoints.folder)  # fmt: skip
        self.log.close()
        self.verifier.close()

    def resume(self) -> None:
        """Continues from the newest checkpoint when checkpoint.resume is on and there is one."""
        step = self.checkpoints.resume() if self.config.checkpoint.resume else None
        if step is not None:
            self.step = step
            self.log.truncate_after(step)
            self.samples.truncate_after(step)

    def _report_eval(self, when: str, metrics: dict[str, float]) -> None:
        if self.rank == 0:
            print(eval_line(when, metrics["eval/accuracy"], self.data.heldout_size, self.log.rows()), flush=True)
            self.log.log(self.step, {f"eval/accuracy_{when.split()[0]}": metrics["eval/accuracy"], **metrics})


# ---- step metrics, reduced over the ranks by name ----------------------------------------------------


def failed_critique_rate(credit_stats: dict[str, float], rollouts: int) -> float:
    """The share of the step's critiques that failed, over every rank (ranks may hold different numbers
    of rollouts), so that all ranks agree on stopping."""
    totals = all_reduce_named({"failed": credit_stats["credit/failed_critique_rate"] * rollouts, "rollouts": rollouts})
    return totals["failed"] / max(totals["rollouts"], 1)


def reduce_step_metrics(local: dict[str, float], rollouts: int) -> dict[str, float]:
    """Step metrics over all ranks, by name: counts summed, rates weighted by each rank's number of rollouts
    (ranks may hold different numbers of prompt groups)."""
    weighted = {k: v if k in COUNTED_METRICS else v * rollouts for k, v in local.items()}
    totals = all_reduce_named({**weighted, "rollouts": rollouts})  # metric names all have a "/"
    return {k: totals[k] if k in COUNTED_METRICS else totals[k] / max(totals["rollouts"], 1) for k in sorted(local)}


ACTOR_SUMS = [k for k in UPDATE_STATS if k != "skipped"]  # summed over ranks; skipped steps agree already


def step_metrics(
    rollouts: list[Rollout],
    scores: list[OutcomeScore],
    credit_stats: dict[str, float],
    stats: dict[str, float],
    times: dict[str, float],
    correct_reward: float,
    lr: float,
) -> dict[str, float]:
    """The line a step logs: outcome and credit metrics (reduce_step_metrics), the update's statistics per
    token over all ranks, the phases' times and the generation throughput."""
    local = {
        **verifier_metrics(scores),
        **credit_stats,
        "reward/accuracy": _mean([r.correct for r in rollouts]),  # r_v, as the advantages see it
        "reward/format_rate": _mean([r.formatted for r in rollouts]),
        "reward/mean": _mean([correct_reward * r.correct for r in rollouts]),
        "response/length": _mean([len(r.token_ids) for r in rollouts]),
        "response/truncated": _mean([float(r.truncated) for r in rollouts]),
    }
    metrics = reduce_step_metrics(local, len(rollouts))
    generated = sum(len(r.token_ids) for r in rollouts)
    totals = all_reduce_named({**{k: stats[k] for k in ACTOR_SUMS}, "generated": generated})
    tokens = max(totals["tokens"], 1)
    metrics.update({
        "actor/skipped_steps": stats["skipped"],  # the same on every rank: ZeRO reduces its overflow flag
        "actor/loss": totals["loss"], "actor/clip_fraction": totals["clipped"] / tokens,
        "actor/entropy": totals["entropy"] / tokens, "actor/kl": totals["kl"] / tokens, "actor/lr": lr,
    })  # fmt: skip
    metrics.update(times)
    metrics["perf/tokens_per_s"] = totals["generated"] / max(times["time/rollout"], 1e-9)
    return metrics


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"capo-fast: {err}", file=sys.stderr)
        return 2
    quiet_libraries(config.logging.verbosity)
    if args.print_config:
        print(describe_config(config))
        return 0
    start_process_group()
    torch.manual_seed(config.trainer.seed)
    random.seed(config.trainer.seed)
    try:
        Run(config).run()
    except (ConfigError, DataError, JudgeError, TrainingDiverged) as err:
        print(f"capo-fast: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
