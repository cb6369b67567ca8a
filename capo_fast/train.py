"""Entry point: `deepspeed capo_fast/train.py [--config configs/X.yaml] [--section.key=value ...]`.

One step: rollouts (policy engine) -> outcome verifier, overlapping with GenPRM critiques -> votes
and token credit -> group advantages -> PPO mini-epochs with the fused loss -> weights to the engine.
With no arguments it runs the embedded default (config.py): SmolLM2-135M-Instruct on offline
arithmetic, about ten minutes on a 2-core CPU.
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
from pathlib import Path

import torch

from capo_fast.checkpoints import Checkpoints
from capo_fast.config import Config, ConfigError, describe_config, load_config, to_dict
from capo_fast.console import quiet_libraries
from capo_fast.credit import COUNTED_METRICS as CREDIT_COUNTS
from capo_fast.credit import CreditConfig, Rollout, VotingConfig, assign_credit, describe, rollout_metrics
from capo_fast.critique import make_splitter
from capo_fast.data import (
    EVAL_SEED_OFFSET,
    DataError,
    DataKeys,
    PromptGroup,
    PromptSampler,
    encode_prompts,
    held_out_source,
    is_generated,
    load_problems,
)
from capo_fast.distributed import (
    all_reduce,
    check_same_environment,
    check_shared_folder,
    fail_together,
    rank_and_world,
    start_process_group,
)
from capo_fast.evaluate import EvalOptions, evaluate_set, load_set, parse_sets
from capo_fast.launch_env import required_env
from capo_fast.memory_budget import Architecture, kv_cache_bytes
from capo_fast.metrics import (
    MetricsLog,
    RolloutSamples,
    accuracy_change,
    binomial_se,
    format_line,
    plot_run,
    run_summary,
    write_run_info,
)
from capo_fast.models import resolve_model_once
from capo_fast.reward import COUNTED_METRICS as REWARD_COUNTS
from capo_fast.reward import OutcomeVerifier, outcome_metrics, outcome_reward
from capo_fast.rollout import (
    CRITIC_BACKENDS,
    CritiqueRequest,
    JudgeError,
    PolicyEngine,
    VLLMEngine,
    build_critic,
    critic_sleep_mode,
    sleep_mode_supported,
)
from capo_fast.seeds import Stream, rank_seeds, sampling_seed
from capo_fast.trainer import PolicyTrainer, TrainingDiverged, TrainSequence

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


# ---- the run -----------------------------------------------------------------------------------------


class Run:
    def __init__(self, config: Config):
        from transformers import AutoTokenizer

        self.config = c = config
        self.started = time.monotonic()
        self.rank, self.world = rank_and_world()
        a = c.algorithm
        self.credit_config = CreditConfig(
            correct_reward=a.correct_reward, penalty=a.penalty, format_weight=a.format_weight,
            reward_mode=a.reward_mode, genorm_alpha=a.genorm_alpha, genorm_beta=a.genorm_beta,
        )  # fmt: skip
        judge = CRITIC_BACKENDS[c.critic.backend].describe(c.critic, c.model.path) if c.needs_judge() else "no judge"
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
        local_judge = c.needs_judge() and c.critic.backend == "vllm"
        self.critic_path = (
            resolve_model_once(c.critic.model, "critic.model") if local_judge and c.critic.model else None
        )
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)

        # Data errors stop every rank here, before deepspeed.initialize or an engine starts.
        fail_together(self._load_data, "loading the data")
        # A judge server (or a critic function) answers now, not after the first rollouts.
        remote_judge = c.needs_judge() and c.critic.backend != "vllm"
        self.critic = fail_together(lambda: build_critic(c, None), "reaching the judge") if remote_judge else None

        self.trainer = PolicyTrainer(c, self.model_path)
        self.checkpoints = Checkpoints(
            self.out / "checkpoints", self.trainer, self.sampler, rank=self.rank, keep=c.checkpoint.keep
        )
        r = c.rollout
        arch = Architecture.from_hf_config(json.loads((self.model_path / "config.json").read_text()))
        self.policy = PolicyEngine(
            VLLMEngine(
                self.model_path, dtype=c.model.dtype, seed=c.trainer.seed, tensor_parallel_size=r.tensor_parallel_size,
                gpu_memory_utilization=r.gpu_memory_utilization, max_model_len=r.max_model_len,
                enforce_eager=r.enforce_eager, sleep_level=2, sleep_mode=r.sleep_mode,
                kv_cache_memory_bytes=kv_cache_bytes(c, arch, self.world),
            ),
            self.trainer,
        )  # fmt: skip
        self.voting = VotingConfig(a.voting, a.vote_threshold, a.min_valid_critiques)
        # The reward mode says whether critiques are read at all: GRPO-Rule and CAPO with P = 0 skip the judge.
        if c.needs_judge() and self.critic is None:  # a local engine: after the policy's (one sleep-mode engine)
            sleeps = c.critic.backend == "vllm" and critic_sleep_mode(
                requested=r.sleep_mode, supported=sleep_mode_supported(), policy_sleeps=self.policy.engine.sleep_enabled
            )
            self.critic = build_critic(c, self.critic_path or self.model_path, sleep_mode=sleeps)
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

    def _load_data(self) -> None:
        """Training, held-out and eval.sets problems and their prompt tokens; DataError names what is wrong."""
        c = self.config
        d = c.data
        keys = DataKeys(d.question_key, d.answer_key, d.reference_key, d.strip_instruction)
        self.train_set = load_problems(d.train, size=d.num_train, seed=d.seed, keys=keys)
        eval_source = d.eval or held_out_source(d.train)
        eval_seed = d.seed + EVAL_SEED_OFFSET
        self.eval_set = []
        if eval_source:
            self.eval_set = load_problems(eval_source, size=d.num_eval, seed=eval_seed, keys=keys)[: d.num_eval]
        self.train_prompts = encode_prompts(self.tokenizer, self.train_set, d.system_prompt)
        self.eval_sets = {}  # eval.sets: NAME=SOURCE, scored like the held-out set
        for name, source in parse_sets(c.eval.sets).items():
            problems = load_set(source, seed=eval_seed, limit=d.num_eval if is_generated(source) else 0, keys=keys)
            self.eval_sets[name] = (problems, encode_prompts(self.tokenizer, problems, d.system_prompt))
        self.eval_prompts = encode_prompts(self.tokenizer, self.eval_set, d.system_prompt)
        too_long = [i for i, p in enumerate(self.train_prompts) if len(p) > d.max_prompt_tokens]
        if too_long:
            raise DataError(
                f"{d.train}: {len(too_long)} prompts exceed data.max_prompt_tokens, e.g. problem {too_long[0]}"
            )
        self.sampler = PromptSampler(len(self.train_set), c.trainer.seed)

    def resume(self) -> None:
        """Continues from the newest checkpoint when checkpoint.resume is on and there is one."""
        step = self.checkpoints.resume() if self.config.checkpoint.resume else None
        if step is not None:
            self.step = step
            self.log.truncate_after(step)
            self.samples.truncate_after(step)

    # ---- one step ------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Greedy pass@1, response length and truncation on the held-out problems and on every set of
        eval.sets (capo_fast.evaluate's code), each rank answering its share; `eval/accuracy` is the
        held-out pass@1."""
        options = EvalOptions(runs=1, max_tokens=self.config.eval.max_tokens, seed=self.config.trainer.seed)
        metrics = {"eval/accuracy": float("nan")}
        sets = {"heldout": (self.eval_set, self.eval_prompts), **self.eval_sets}
        for name, (problems, prompts) in sets.items():
            if not problems:
                continue
            mine = list(range(len(problems)))[self.rank :: self.world]
            local = evaluate_set([problems[i] for i in mine], [prompts[i] for i in mine], self.policy.generate,
                                 self.verifier.score, options)  # fmt: skip
            n = local["problems"]
            sources = sorted({p.data_source for p in problems if p.data_source})  # the same list on every rank
            by_source = [local.get("by_source", {}).get(s, {"pass@1": 0.0, "problems": 0}) for s in sources]
            per_source = [v for b in by_source for v in (b["pass@1"] * b["problems"], b["problems"])]
            sums = all_reduce([local["pass@1"] * n, local["length"] * n, local["truncated"] * n, n, *per_source])
            total = max(sums[3], 1)
            for key, value in zip(("pass@1", "length", "truncated"), sums, strict=False):
                metrics[f"eval/{name}/{key}"] = value / total
            if len(sources) > 1:
                for i, src in enumerate(sources):
                    correct, count = sums[4 + 2 * i : 6 + 2 * i]
                    metrics[f"eval/{name}/{src}/pass@1"] = correct / max(count, 1)
        metrics["eval/accuracy"] = metrics.get("eval/heldout/pass@1", float("nan"))
        return metrics

    def train_step(self) -> dict[str, float]:
        c, times = self.config, {}
        global_batch = self.sampler.next_batch(c.trainer.prompts_per_step)
        positions = my_share(list(range(len(global_batch))), self.rank, self.world)
        groups = [PromptGroup(self.train_set[global_batch[p]], self.train_prompts[global_batch[p]]) for p in positions]
        n = c.rollout.n

        with timed(times, "rollout"):  # includes the weight sync, reported apart as time/sync
            seeds = rank_seeds(c.trainer.seed, self.step, positions, n, c.critic.num_critiques)
            completions = self.policy.generate([g.prompt_ids for g in groups], c.rollout.sampling, n=n,
                                               seeds=seeds.rollouts)  # fmt: skip
        times["time/sync"] = self.policy.last_sync_s
        for group, answers in zip(groups, completions, strict=True):
            group.rollouts = [
                Rollout(a.token_ids, a.text, a.finish_reason == "length", self.split_steps(a.text)) for a in answers
            ]
        answered = [(g.problem, r) for g in groups for r in g.rollouts]
        rollouts = [r for _, r in answered]

        with timed(times, "critique"), ThreadPoolExecutor(1) as pool:  # the verifier runs meanwhile
            verified = pool.submit(self.verifier.score, [r.text for r in rollouts], [p.answer for p, _ in answered])
            if self.critic is not None:
                requests = [CritiqueRequest(p.question, r.steps, p.reference_solution, p.answer) for p, r in answered]
                for r, critiques in zip(rollouts, self.critic.critique(requests, seed=seeds.critiques), strict=True):
                    r.critiques = critiques
                self.critic.sleep()
            scores = verified.result()
        zero_truncated = c.algorithm.truncated_reward == "zero"
        for (problem, r), score in zip(answered, scores, strict=True):
            r.correct = outcome_reward(r.text, score.correct, choice=problem.correct_choice, truncated=r.truncated,
                                       zero_if_truncated=zero_truncated)  # fmt: skip
            r.formatted = score.formatted

        num_critiques = c.critic.num_critiques if self.critic else 0
        with timed(times, "credit"):
            assign_credit([g.rollouts for g in groups], self.tokenizer, self.voting, self.credit_config)
            judged = rollout_metrics(rollouts, self.credit_config, num_critiques)
            if self.critic is not None:  # before the update: a dead judge must not leave a step on outcome alone
                failed, total = all_reduce([judged["credit/failed_critique_rate"] * len(rollouts), len(rollouts)])
                failed /= max(total, 1)  # ranks may hold different numbers of rollouts
                check_critique_failures(failed, c.critic, self.step + 1)
            sequences = [
                TrainSequence(g.prompt_ids, r.token_ids, r.advantage, r.penalty, r.credit)
                for g in groups
                for r in g.rollouts
            ]

        with timed(times, "logprobs"):
            self.trainer.compute_logprobs(sequences)
        with timed(times, "update"):
            stats = self._ppo_epochs(sequences)

        local = {
            **outcome_metrics(scores),
            **judged,
            "reward/mean": _mean([self.credit_config.correct_reward * r.correct for r in rollouts]),
            "response/length": _mean([len(r.token_ids) for r in rollouts]),
            "response/truncated": _mean([float(r.truncated) for r in rollouts]),
        }
        self.samples.write(self.step + 1, groups)
        metrics = reduce_step_metrics(local, len(rollouts))
        stat_keys = ("loss", "clipped", "entropy", "kl", "tokens")
        loss, clipped, entropy, kl, tokens = all_reduce([stats[k] for k in stat_keys])
        metrics.update({
            "actor/skipped_steps": stats["skipped"],  # the same on every rank: ZeRO reduces its overflow flag
            "actor/loss": loss, "actor/clip_fraction": clipped / max(tokens, 1),
            "actor/entropy": entropy / max(tokens, 1), "actor/kl": kl / max(tokens, 1), "actor/lr": self.trainer.lr,
        })  # fmt: skip
        metrics.update(times)
        generated = all_reduce([sum(len(r.token_ids) for r in rollouts)])[0]
        metrics["perf/tokens_per_s"] = generated / max(times["time/rollout"], 1e-9)
        return metrics

    def _ppo_epochs(self, sequences) -> dict[str, float]:
        c = self.config
        totals = {"loss": 0.0, "clipped": 0.0, "entropy": 0.0, "kl": 0.0, "tokens": 0.0, "skipped": 0.0}
        order = torch.Generator().manual_seed(sampling_seed(c.trainer.seed, Stream.SHUFFLE, self.step, 0))
        for _ in range(c.algorithm.mini_epochs):
            shuffled = [sequences[i] for i in torch.randperm(len(sequences), generator=order).tolist()]
            size = -(-len(shuffled) // c.trainer.mini_batches)
            for b in range(c.trainer.mini_batches):
                stats = self.trainer.train_mini_batch(shuffled[b * size : (b + 1) * size])
                for k in totals:
                    totals[k] += stats[k] / (c.trainer.mini_batches if k == "loss" else 1)
        averages = {k: v / c.algorithm.mini_epochs for k, v in totals.items()}  # per mini-epoch
        averages["skipped"] = totals["skipped"]  # a count of optimizer steps, not an average
        return averages

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
        accuracy = final["eval/accuracy"]
        self._report_eval("after training", final)
        if c.checkpoint.keep_best:
            self.checkpoints.keep_if_best(self.step, accuracy)
        self.log.log(self.step, {"eval/accuracy_final": accuracy})
        if c.checkpoint.export:
            self.trainer.export(self.out / "final", self.tokenizer, self.model_card(final))
            if self.rank == 0:
                shutil.copy(self.out / "run.json", self.out / "final" / "run.json")
        if self.rank == 0:
            summary = run_summary(self.log.rows(), problems=len(self.eval_set), seconds=time.monotonic() - self.started,
                                  method=self.method)  # fmt: skip
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            curves = plot_run(self.log.path, self.out / "curves.png")
            print(f"logs: {self.log.path}  curves: {curves}  checkpoints: {self.checkpoints.folder}  final model: "
                  f"{self.out / 'final'}")  # fmt: skip
        self.log.close()
        self.verifier.close()

    def model_card(self, final: dict[str, float]) -> str:
        """README.md of the exported model: where it started, what it trained on, how, and how it scores."""
        c = self.config
        before = next((r for r in self.log.rows() if "eval/accuracy_before" in r), {})
        sets = sorted({k.split("/")[1] for k in final if k.startswith("eval/") and k.endswith("/pass@1")})
        scores = "".join(
            f"| {name} | {before.get(f'eval/{name}/pass@1', float('nan')):.4f} | {final[f'eval/{name}/pass@1']:.4f} |\n"
            for name in sets
        )
        return (
            f"# {Path(c.logging.output_dir).name}\n\n"
            f"Trained with capo-fast: {describe(self.credit_config)}, voting={c.algorithm.voting}, "
            f"N={c.critic.num_critiques} critiques by {c.critic.model or c.model.path}.\n\n"
            f"- base model: {c.model.path}\n- RL data: {c.data.train} (eval: {c.data.eval or 'generated held-out'})\n"
            f"- steps: {self.step} x {c.trainer.prompts_per_step} prompts x {c.rollout.n} rollouts, lr {c.trainer.lr}\n"
            f"- held-out accuracy on {len(self.eval_set)} problems: {before.get('eval/accuracy_before', 'n/a')} "
            f"before, {final['eval/accuracy']:.4f} after (greedy)\n\n"
            f"| set | pass@1 before | pass@1 after |\n| --- | ---: | ---: |\n{scores}\n"
            f"run.json beside this card holds the whole run config, the package versions and the commit.\n"
        )

    def _report_eval(self, when: str, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        accuracy, n = metrics["eval/accuracy"], len(self.eval_set)
        line = f"eval accuracy {when}: {accuracy:.3f} ± {binomial_se(accuracy, n):.3f} (SE) on {n} held-out problems"
        before = next((r["eval/accuracy_before"] for r in self.log.rows() if "eval/accuracy_before" in r), None)
        if when == "after training" and before is not None:
            change, se = accuracy_change(before, accuracy, n)
            line += f"; change {change:+.3f} ± {se:.3f} ({change / se if se else float('nan'):+.1f} SE)"
        print(line, flush=True)
        self.log.log(self.step, {f"eval/accuracy_{when.split()[0]}": accuracy, **metrics})


def check_critique_failures(rate: float, config, step: int) -> None:
    """Warns above critic.warn_failure_rate and stops above critic.max_failure_rate: without critiques,
    CAPO silently trains on outcome reward alone. `rate` is reduced over ranks, so all ranks agree."""
    if rate > config.max_failure_rate:
        where = f"critic.url={config.url!r} and ${config.api_key_env}" if config.backend == "remote" else "the judge"
        raise JudgeError(
            f"step {step}: {rate:.0%} of critiques failed (critic.max_failure_rate={config.max_failure_rate}); "
            f"the run would train on outcome reward alone. Check {where}, and critic.answer_format "
            "(guided keeps small judges to the format)"
        )
    if rate > config.warn_failure_rate:
        logger.warning("step %d: %.0f%% of critiques failed (critic.warn_failure_rate=%s)", step, 100 * rate,
                       config.warn_failure_rate)  # fmt: skip


def reduce_step_metrics(local: dict[str, float], rollouts: int) -> dict[str, float]:
    """Step metrics over all ranks, by name: counts summed, rates weighted by each rank's number of rollouts
    (ranks may hold different numbers of prompt groups)."""
    keys = sorted(local)  # the same keys on every rank
    *sums, total = all_reduce([local[k] if k in COUNTED_METRICS else local[k] * rollouts for k in keys] + [rollouts])
    return {k: v if k in COUNTED_METRICS else v / max(total, 1) for k, v in zip(keys, sums, strict=True)}


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
