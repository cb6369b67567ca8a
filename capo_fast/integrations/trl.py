"""TRL's GRPOTrainer with capo-fast's fused linear policy loss, and with CAPO's token credit.

`CapoGRPOTrainer` is a drop-in `trl.GRPOTrainer`: the same arguments and the same loss, computed by
`capo_fast.kernels.fused_linear_policy_loss` from the final hidden states and the lm_head weight (the
[N, V] logits are never held, forward or backward). `CapoCreditGRPOTrainer` adds a capo-fast critic:
TRL's reward functions give each completion its outcome score, the critic's votes give each token its
credit e_t, and the loss gets CAPO's token advantages A_t = a_i - p_g * e_t (DESIGN.md 1.5-1.6).

Everything refers to TRL 1.16 (trl/trainer/grpo_trainer.py, cited as grpo_trainer.py:LINE). Options
whose loss the fused op cannot state are refused at construction with a ValueError naming them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from trl import GRPOConfig, GRPOTrainer

from capo_fast.credit import CreditConfig, Rollout, VotingConfig, assign_credit, rollout_metrics
from capo_fast.critics import Critic, CritiqueRequest
from capo_fast.critique import make_splitter
from capo_fast.kernels import (
    AggregationMode,
    PolicyLossOptions,
    aggregation_weights,
    fused_linear_logprobs,
    fused_linear_policy_loss,
)
from capo_fast.seeds import Stream, sampling_seed

# TRL loss_type -> the aggregation of capo_fast.kernels.aggregation with the same normaliser
# (grpo_trainer.py:3153-3174); dapo's normaliser is the generation batch's token count, given globally.
LOSS_TYPES: dict[str, AggregationMode] = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
}
# Config fields whose logit transform TRL's fused head applies (trl/trainer/utils.py:1576-1590).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")  # fmt: skip
# Per-batch inputs of vision-language models, which the fused path does not forward (grpo_trainer.py:3036-3046).
_MULTIMODAL_INPUTS = (
    "pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes", "token_type_ids",
    "mm_token_type_ids", "image_position_ids", "num_images", "num_tiles",
)  # fmt: skip


def check_args(args: GRPOConfig) -> None:
    """Raises ValueError naming the first GRPOConfig option the fused loss cannot reproduce."""

    def refuse(name: str, why: str) -> None:
        raise ValueError(f"GRPOConfig.{name}={getattr(args, name)!r} is not supported by capo_fast's TRL loss: {why}")

    if args.loss_type not in LOSS_TYPES:
        refuse("loss_type", f"choose one of {sorted(LOSS_TYPES)}")
    if args.importance_sampling_level != "token":
        refuse("importance_sampling_level", "only 'token' (GSPO's sequence-level ratio is not in the fused op)")
    if args.delta is not None:
        refuse("delta", "two-sided clipping of the ratio is not in the fused op; use None")
    if args.top_entropy_quantile < 1.0:
        refuse("top_entropy_quantile", "the high-entropy token mask is not in the fused op; use 1.0")
    if args.off_policy_mask_threshold is not None:
        refuse("off_policy_mask_threshold", "off-policy sequence masking is not in the fused op; use None")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        refuse("entropy_coef", "TRL's entropy bonus is a token mean whatever the loss_type; use 0.0 and no adaptive")
    if args.use_vllm and args.vllm_importance_sampling_correction:
        refuse("vllm_importance_sampling_correction", "the rollout-engine IS ratio is not in the fused op; use False")
    if args.cast_lm_head_to_fp32:
        refuse("cast_lm_head_to_fp32", "the fused op already accumulates in fp32; use False")


def loss_weights(
    mask: torch.Tensor,
    loss_type: str,
    *,
    accumulation: float,
    max_completion_length: int,
    dapo_normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """[B*T] aggregation weights that make `sum(w * loss_t)` TRL's loss for `loss_type`.

    Args:
        mask: [B, T] completion mask (1 for tokens in the loss).
        accumulation: TRL's gradient-accumulation divisor (grpo, bnpo, dr_grpo); 1 in eval.
        max_completion_length: dr_grpo's constant length.
        dapo_normalizer: dapo's token count for this micro-batch (grpo_trainer.py:3170-3172).
    """
    rows, length = mask.shape
    flat = mask.reshape(-1).to(torch.float32)
    seq_ids = torch.arange(rows, device=mask.device).repeat_interleave(length)
    mode = LOSS_TYPES[loss_type]
    if loss_type == "grpo":  # .mean() over all B rows, empty ones included (grpo_trainer.py:3154)
        return aggregation_weights(flat, seq_ids, mode, global_num_seqs=float(rows)) / accumulation
    if loss_type == "bnpo":  # mask.sum().clamp(min=1) (grpo_trainer.py:3159)
        return aggregation_weights(flat, seq_ids, mode) / accumulation
    if loss_type == "dr_grpo":  # B * max_completion_length (grpo_trainer.py:3164)
        w = aggregation_weights(flat, seq_ids, mode, global_num_seqs=float(rows), norm_length=max_completion_length)
        return w / accumulation
    return aggregation_weights(flat, seq_ids, mode, global_num_tokens=dapo_normalizer)  # dapo: no divisor


class CapoGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose policy loss is capo-fast's fused linear op (same arguments, same loss).

    Supported: loss_type grpo, bnpo, dr_grpo, dapo; epsilon / epsilon_high; beta with the k3 KL, with or
    without use_bias_correction_kl; temperature; num_iterations > 1 (TRL's old log-probs); tool masks.
    The others (see `check_args`) raise ValueError here, before the model is loaded.
    """

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, **kwargs):
        check_args(args if args is not None else GRPOConfig(output_dir="trainer_output"))
        super().__init__(model, reward_funcs, args, **kwargs)
        config = self.model.config.get_text_config()
        if self.aux_loss_enabled:
            raise ValueError("MoE router aux loss (config.output_router_logits) is not supported by capo_fast's loss")
        for name in _LOGIT_TRANSFORMS:
            if getattr(config, name, None) not in (None, 1.0):
                raise ValueError(f"model config {name}={getattr(config, name)!r}: the fused op has no logit transform")
        head = self.model.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            raise ValueError("capo_fast's TRL loss needs an lm_head Linear without bias")

    def _hidden_states(self, model, inputs) -> torch.Tensor:
        """[B, T, H] final hidden states (after the last norm) that predict the T completion tokens."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        length = inputs["completion_ids"].size(1)
        # Through the (possibly DDP-wrapped) model, so its gradient hooks run; logits_to_keep=1 keeps the
        # model's own head to one position. TRL's patched forward passes these on (trl/trainer/utils.py:1602-1609).
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                        logits_to_keep=1, use_cache=False)  # fmt: skip
        return out.hidden_states[-1][:, -length - 1 : -1]

    def _compute_loss(self, model, inputs):
        for key in _MULTIMODAL_INPUTS:
            if inputs.get(key) is not None:
                raise ValueError(f"input {key!r}: capo_fast's TRL loss supports text-only models")
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # grpo_trainer.py:3027
            mask = mask * inputs["tool_mask"]
        hidden = self._hidden_states(model, inputs)
        rows, length, width = hidden.shape
        hidden = hidden.reshape(rows * length, width)
        weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        labels = inputs["completion_ids"].masked_fill(mask == 0, -100).reshape(-1)

        old = inputs.get("old_per_token_logps")
        if old is None:  # on-policy: TRL uses the current log-probs, detached (grpo_trainer.py:3063-3064)
            with torch.no_grad():
                old, _ = fused_linear_logprobs(hidden, weight, labels.clamp_min(0), temperature=self.temperature)
        old = old.reshape(-1).float()
        advantages = inputs["advantages"]
        if advantages.dim() == 1:  # per-sequence, or per-token from a subclass (grpo_trainer.py:3056-3058)
            advantages = advantages.unsqueeze(1)
        advantages = advantages.expand(rows, length).reshape(-1).float()
        ref = inputs["ref_per_token_logps"].reshape(-1).float() if self.beta != 0.0 else None
        # TRL weighs the KL by the differentiable ratio by default (grpo_trainer.py:3104-3105): that term is
        # added below on differentiable fused log-probs; the plain k3 KL goes into the fused op.
        bias_corrected_kl = ref is not None and self.args.use_bias_correction_kl

        mode = "train" if self.model.training else "eval"
        weights = self._loss_weights(mode, mask, inputs)
        options = PolicyLossOptions(
            temperature=self.temperature,
            eps_low=self.epsilon_low,
            eps_high=self.epsilon_high,
            kl_coef=0.0 if bias_corrected_kl or ref is None else self.beta,
        )
        out = fused_linear_policy_loss(
            hidden, weight, labels, old, advantages,
            ref_logprobs=None if bias_corrected_kl else ref, loss_weights=weights, options=options,
        )  # fmt: skip
        loss = out.loss
        if bias_corrected_kl:
            kl = _bias_corrected_k3(hidden, weight, labels, old, ref, self.temperature)
            loss = loss + self.beta * (weights * kl).sum()
        self._log_loss_metrics(mode, out, mask, ref)
        return loss

    def _loss_weights(self, mode: str, mask: torch.Tensor, inputs) -> torch.Tensor:
        """[B*T] weights with TRL's normaliser for this micro-batch (grpo_trainer.py:3153-3174)."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        dapo_normalizer = None
        if self.loss_type == "dapo":  # grpo_trainer.py:3169-3172
            dapo_normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                dapo_normalizer = dapo_normalizer * accumulation / self.args.steps_per_generation
        return loss_weights(
            mask, self.loss_type, accumulation=accumulation, max_completion_length=self.max_completion_length,
            dapo_normalizer=dapo_normalizer,
        )  # fmt: skip

    def _log_loss_metrics(self, mode: str, out, mask: torch.Tensor, ref: torch.Tensor | None) -> None:
        """The metrics TRL's loss logs (grpo_trainer.py:3270-3283), from the fused op's outputs."""
        flat = mask.reshape(-1).float()

        def global_mean(x: torch.Tensor) -> float:
            totals = self.accelerator.reduce(torch.stack([(x.float() * flat).sum(), flat.sum()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        metrics["entropy"].append(global_mean(out.entropy))
        if ref is not None:
            d = ref - out.logprobs
            metrics["kl"].append(global_mean(torch.exp(d) - d - 1))
        low, high = out.clipped == 1, out.clipped == 2
        metrics["clip_ratio/low_mean"].append(global_mean(low))
        metrics["clip_ratio/high_mean"].append(global_mean(high))
        metrics["clip_ratio/region_mean"].append(global_mean(low | high))


def _bias_corrected_k3(hidden, weight, labels, old, ref, temperature) -> torch.Tensor:
    """[N] ratio * k3 KL on differentiable chunked log-probs (no [N, V] logits): TRL's default KL term."""
    logp, _ = fused_linear_logprobs(hidden, weight, labels.clamp_min(0), temperature=temperature)
    d = ref - logp
    k3 = torch.exp(d) - d - 1
    return torch.where(labels >= 0, k3 * torch.exp(logp - old), torch.zeros_like(k3))


class CapoCreditGRPOTrainer(CapoGRPOTrainer):
    """CAPO in TRL: `CapoGRPOTrainer` whose advantages are CAPO's per-token A_t = a_i - p_g * e_t.

    TRL's reward functions score each completion (their weighted sum, as TRL sums them, is r_v of Eq. 1,
    scaled by `credit.correct_reward`); `critic` (any capo-fast backend: `FunctionCritic`, `RemoteCritic`,
    `LocalCritic`, e.g. from `capo_fast.critics.build_critic`) writes N critiques of each completion's
    steps; `voting` combines them into e_t per token and `capo_fast.credit.assign_credit` gives the
    advantages of Eq. 2, pooled over each prompt's `num_generations` completions.

    Args:
        critic: the judge.
        voting, credit: as capo-fast's own loop takes them (`algorithm.*` of a run config).
        step_splitter: `critic.step_splitter` (empty: blank lines).
        question_key, reference_key, answer_key: dataset columns shown to the judge (the prompt text when
            there is no question column).
    """

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GRPOConfig | None = None,
        *,
        critic: Critic,
        voting: VotingConfig | None = None,
        credit: CreditConfig | None = None,
        step_splitter: str = "",
        question_key: str = "question",
        reference_key: str = "reference_solution",
        answer_key: str = "answer",
        **kwargs,
    ):
        if args is not None and args.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("GRPOConfig.multi_objective_aggregation must be 'sum_then_normalize' for CAPO credit")
        super().__init__(model, reward_funcs, args, **kwargs)
        if self.accelerator.num_processes != 1:  # Eq. 2 pools a group's tokens; TRL spreads groups over ranks
            raise ValueError("CapoCreditGRPOTrainer runs on one process (a prompt's group must be on one rank)")
        self.critic, self.voting, self.credit = critic, voting or VotingConfig(), credit or CreditConfig()
        self.split_steps = make_splitter(step_splitter)
        self.keys = (question_key, reference_key, answer_key)
        self._rewards_per_func: torch.Tensor | None = None

    def _critique_seed(self) -> int:
        """A block of seeds per training step: critiques never repeat across steps (capo_fast.seeds)."""
        return sampling_seed(self.args.seed, Stream.CRITIQUE, self.state.global_step, 0)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        weights = self.reward_weights.to(self._rewards_per_func.device)
        rewards = (self._rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)  # as TRL does (grpo_trainer.py:2762)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        output["advantages"], metrics = self.token_advantages(
            inputs, output["completion_ids"], output["completion_mask"], rewards, group_size
        )
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        return output

    def token_advantages(
        self,
        inputs: Sequence[dict],
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        rewards: torch.Tensor,
        group_size: int,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """[B, T] CAPO advantages (0 on padding) for B completions, `group_size` consecutive ones per prompt.

        Args:
            inputs: the B dataset rows (TRL repeats each prompt's row `group_size` times).
            completion_ids, completion_mask: [B, T] as TRL pads them.
            rewards: [B] outcome score r_v of each completion.
        """
        if completion_ids.shape[0] % group_size:
            raise ValueError(f"{completion_ids.shape[0]} completions are not groups of {group_size}")
        tokenizer = self.processing_class
        question_key, reference_key, answer_key = self.keys
        rollouts = []
        for i, (ids, keep) in enumerate(zip(completion_ids.tolist(), completion_mask.bool().tolist(), strict=True)):
            token_ids = [t for t, k in zip(ids, keep, strict=True) if k]
            text = tokenizer.decode(token_ids, skip_special_tokens=True)
            truncated = tokenizer.eos_token_id not in token_ids
            rollout = Rollout(token_ids, text, truncated, self.split_steps(text))
            rollout.correct = float(torch.nan_to_num(rewards[i]).item())
            rollouts.append(rollout)
        requests = [
            CritiqueRequest(_question(row, question_key), r.steps, row.get(reference_key), _text(row.get(answer_key)))
            for row, r in zip(inputs, rollouts, strict=True)
        ]
        for r, critiques in zip(rollouts, self.critic.critique(requests, seed=self._critique_seed()), strict=True):
            r.critiques = critiques
        self.critic.sleep()
        groups = [rollouts[g : g + group_size] for g in range(0, len(rollouts), group_size)]
        assign_credit(groups, tokenizer, self.voting, self.credit)
        advantages = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for i, r in enumerate(rollouts):
            token_advantage = r.advantage - r.group_penalty * r.credit.double()  # Eq. 2 in factored form
            advantages[i, completion_mask[i].bool().cpu()] = token_advantage.float()
        metrics = rollout_metrics(rollouts, self.credit, self.critic.config.num_critiques)
        return advantages.to(completion_ids.device), {f"capo/{name}": value for name, value in metrics.items()}


def _text(value) -> str | None:
    return None if value is None else str(value)


def _question(row: dict, key: str) -> str:
    """The question shown to the judge: its column, else the prompt (the last user turn of a chat)."""
    if row.get(key):
        return str(row[key])
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")
