"""The DeepSpeed side of training: model, packing, log-probs, the fused policy loss, checkpoints.

Sequences are packed padding-free into one row per micro-batch (flash-attn varlen through
position_ids where it is installed, sdpa with a block-diagonal causal mask otherwise). The loss is
`algorithm.policy_loss` (capo_fast.policy_losses; default the fused `fused_linear_policy_loss`) on the final
hidden states of the response tokens and the lm_head weight: full [tokens, vocab] logits are never held.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from capo_fast.config import Config
from capo_fast.deepspeed_settings import deepspeed_config, fused_adam_available, states_to_offload
from capo_fast.distributed import all_reduce
from capo_fast.kernels import fused_linear_logprobs
from capo_fast.kernels.aggregation import aggregation_weights
from capo_fast.policy_losses import PolicyLossInputs, compute_policy_loss
from capo_fast.seeds import Stream, sampling_seed
from capo_fast.weights import model_weights


@dataclass
class TrainSequence:
    """One rollout as the trainer sees it. A_t = advantage - group_penalty * credit[t]."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    group_penalty: float  # p_g = P / (std_g + eps) of its prompt group
    credit: torch.Tensor  # [len(response_ids)]
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    attention_mask: torch.Tensor | None  # [1, 1, T, T] bool for sdpa; None with flash-attn varlen
    response_index: torch.Tensor  # [R] rows of T whose hidden state predicts a response token
    labels: torch.Tensor  # [R]
    seq_ids: torch.Tensor  # [R] index of each token's sequence in the packed list
    # flash-attn varlen boundaries, made once here: otherwise every layer re-derives them from
    # position_ids with host synchronisations (transformers/modeling_flash_attention_utils.py:480-517).
    cu_seq_lens: torch.Tensor | None = None  # [S + 1] int32 (flash-attn requires int32)
    max_length: int = 0

    def attention_kwargs(self) -> dict:
        if self.attention_mask is not None:
            return {"attention_mask": self.attention_mask}
        if self.cu_seq_lens is None:
            return {}
        cu, m = self.cu_seq_lens, self.max_length
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}


def pack(sequences: list[TrainSequence], *, block_mask: bool, device: torch.device) -> PackedBatch:
    """Concatenates sequences into one row; position ids restart at 0 for every sequence."""
    ids, positions, segments, index, labels, seq_ids, lengths = [], [], [], [], [], [], []
    offset = 0
    for s, seq in enumerate(sequences):
        tokens = seq.prompt_ids + seq.response_ids
        lengths.append(len(tokens))
        ids += tokens
        positions += range(len(tokens))
        segments += [s] * len(tokens)
        start = offset + len(seq.prompt_ids) - 1  # hidden at t predicts token t + 1
        index += range(start, start + len(seq.response_ids))
        labels += seq.response_ids
        seq_ids += [s] * len(seq.response_ids)
        offset += len(tokens)
    mask, cu_seq_lens = None, None
    if block_mask:
        segment = torch.tensor(segments, device=device)
        causal = torch.ones(offset, offset, dtype=torch.bool, device=device).tril()
        mask = (causal & (segment[:, None] == segment[None, :]))[None, None]
    else:
        cu_seq_lens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return PackedBatch(
        as_long(ids)[None], as_long(positions)[None], mask, as_long(index), as_long(labels), as_long(seq_ids),
        cu_seq_lens, max(lengths, default=0),
    )  # fmt: skip


def split_by_tokens(lengths: list[int], num_groups: int) -> list[list[int]]:
    """Indices split into `num_groups` groups of similar token counts (longest first, into the lightest)."""
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    loads = [0] * num_groups
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        g = loads.index(min(loads))
        groups[g].append(i)
        loads[g] += lengths[i]
    return [sorted(g) for g in groups]


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


class PolicyWithLoss(torch.nn.Module):
    """The causal LM plus the fused head: hidden states of the response tokens meet the lm_head
    weight inside this forward, so ZeRO-3 gathers that weight here (registered as external)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch, temperature: float, loss_args: dict | None = None):
        """Log-probs and entropy of the response tokens; with `loss_args` (name, inputs, options) the policy
        loss of that name in capo_fast.policy_losses."""
        # use_cache=False: from the config it would be True and every training forward would build a KV
        # cache (transformers/utils/generic.py:1037-1042, models/qwen2/modeling_qwen2.py:350-351).
        hidden = self.model.base_model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **batch.attention_kwargs()
        ).last_hidden_state[0]
        hidden = hidden.index_select(0, batch.response_index)
        weight = self.model.get_output_embeddings().weight
        if loss_args is None:
            return fused_linear_logprobs(hidden, weight, batch.labels, temperature=temperature, with_entropy=True)
        return compute_policy_loss(loss_args["name"], hidden, weight, loss_args["inputs"], loss_args["options"])


def attention_implementation(
    dtype: torch.dtype, *, cuda: bool, flash_installed: bool
) -> Literal["flash_attention_2", "sdpa"]:
    """flash-attn only where it runs: CUDA, installed, and fp16/bf16 (flash_api.cpp `mha_fwd` rejects
    other dtypes; transformers/modeling_utils.py:1621-1626 only warns). Else sdpa with a block mask."""
    if cuda and flash_installed and dtype in (torch.bfloat16, torch.float16):
        return "flash_attention_2"
    return "sdpa"


def _cosine_with_warmup(total_steps: int, warmup: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# What an update reports (train_mini_batch, ppo_epochs): sums over this rank's response tokens of the loss
# (already divided by the world size), clipped tokens, entropy and KL; the tokens; skipped optimizer steps.
UPDATE_STATS = ("loss", "clipped", "entropy", "kl", "tokens", "skipped")


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class PolicyTrainer:
    """Owns the DeepSpeed engine of the policy (and a frozen reference model when KL is on)."""

    def __init__(self, config: Config, model_path: str | Path):
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        self.config = config
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        dtype = getattr(torch, config.model.dtype)
        cuda = torch.cuda.is_available()
        attn = attention_implementation(dtype, cuda=cuda, flash_installed=_flash_attn_installed())
        self.flash = attn == "flash_attention_2"
        fused_adam = fused_adam_available()
        ds_config = deepspeed_config(config, fused_adam=fused_adam)
        zero3 = ds_config["zero_optimization"].get("stage", 0) == 3
        # While an HfDeepSpeedConfig lives, from_pretrained loads straight into ZeRO-3 partitions; it is
        # dropped right after, so later loads (the reference model, user code) get whole models.
        hf_zero3 = HfDeepSpeedConfig(ds_config) if zero3 else None
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn)
        del hf_zero3
        if config.model.liger_patches and torch.cuda.is_available():
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(
                model, rms_norm=True, swiglu=True, rope=True, cross_entropy=False, fused_linear_cross_entropy=False
            )
        if config.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module = PolicyWithLoss(model)
        if zero3:
            deepspeed.zero.register_external_parameter(module, model.get_output_embeddings().weight)

        t = config.trainer
        total = t.steps * config.algorithm.mini_epochs * t.mini_batches
        schedule = _cosine_with_warmup(total, t.warmup_steps, t.min_lr_ratio)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            model_parameters=module.parameters(),
            lr_scheduler=(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)),
            config=ds_config,
        )
        self._offload = states_to_offload(
            ds_config, cuda=cuda, wanted=t.offload_states_while_generating, fused_adam=fused_adam
        )
        self._states_offloaded = False
        self.version = 0  # bumped by every applied optimizer step and every checkpoint load
        self._skipped_in_a_row = 0
        self.reference = self._reference_engine(model_path, dtype, attn) if config.algorithm.kl_coef > 0 else None

    def _reference_engine(self, model_path, dtype: torch.dtype, attn: str):
        """The frozen reference policy as an inference-only ZeRO-3 engine: its parameters are partitioned
        over the ranks and gathered layer by layer in forward (a full copy of a 7B model would take
        15 GB of every GPU). DeepSpeed gives a ZeRO-3 engine without optimizer a parameter-offload
        manager only (deepspeed/runtime/engine.py:681-687, 2647-2648, 2718-2721)."""
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        ds = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100_000},
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
            "steps_per_print": 1 << 30,
        }
        hf_zero3 = HfDeepSpeedConfig(ds)  # from_pretrained loads straight into partitions while it lives
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn)
        del hf_zero3
        module = PolicyWithLoss(model).requires_grad_(False)
        deepspeed.zero.register_external_parameter(module, model.get_output_embeddings().weight)
        engine, *_ = deepspeed.initialize(model=module, config=ds)
        engine.eval()
        return engine

    # ---- memory while the engines generate --------------------------------------------------------

    @contextmanager
    def states_offloaded(self):
        """Optimizer state, fp32 master weights and gradient buffers on the CPU for the block (CUDA only),
        so the engines that generate inside it find the memory free; the bf16 parameters stay."""
        if self._states_offloaded or not self._offload:
            yield
            return
        self.engine.offload_states(include=self._offload, non_blocking=True)
        self._states_offloaded = True
        try:
            yield
        finally:
            self.engine.reload_states()
            self._states_offloaded = False

    def weights(self):
        """HF-named full tensors of the current policy (gathered under ZeRO-3), for the rollout engine."""
        return model_weights(self.model)

    @property
    def model(self) -> torch.nn.Module:
        """The HF model inside the engine (HF parameter names, what the rollout engine loads)."""
        return self.engine.module.model

    def _micro_batches(self, sequences: list[TrainSequence]) -> list[list[int]]:
        """The same number of micro-batches on every rank (ZeRO reduces gradients in lockstep)."""
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in sequences]
        local = max(1, math.ceil(sum(lengths) / self.config.trainer.micro_batch_tokens))
        count = int(all_reduce([local], dist.ReduceOp.MAX)[0])
        return split_by_tokens(lengths, count)

    def _pack(self, sequences: list[TrainSequence]) -> PackedBatch:
        return pack(sequences, block_mask=not self.flash, device=self.device)

    @torch.no_grad()
    def compute_logprobs(self, sequences: list[TrainSequence]) -> None:
        """Fills old (and reference) log-probs of every response token, micro-batch by micro-batch."""
        self.engine.eval()  # no dropout; gradient checkpointing is off without a backward anyway
        temperature = self.config.rollout.sampling.temperature or 1.0
        for group in self._micro_batches(sequences):
            batch = self._pack([sequences[i] for i in group] or [_PAD])
            old, _ = self.engine(batch, temperature)
            ref = self.reference(batch, temperature)[0] if self.reference is not None else None
            for s, i in enumerate(group):
                rows = batch.seq_ids == s
                sequences[i].old_logprobs = old[rows].float().cpu()
                if ref is not None:
                    sequences[i].ref_logprobs = ref[rows].float().cpu()

    def train_mini_batch(self, sequences: list[TrainSequence]) -> dict[str, float]:
        """One optimizer step over this rank's part of a mini-batch; returns summed statistics.

        A step whose gradient norm is not finite is skipped by ZeRO (stats["skipped"] = 1); after
        trainer.max_skipped_steps in a row the run stops with TrainingDiverged.
        """
        # from_pretrained returns the model in eval mode (transformers/modeling_utils.py:4340), and
        # GradientCheckpointingLayer checkpoints only in training mode (modeling_layers.py:82).
        self.engine.train()
        a, dev = self.config.algorithm, self.device
        num_seqs = sum(1 for s in sequences if s.response_ids)
        num_tokens = sum(len(s.response_ids) for s in sequences)
        global_seqs, global_tokens = all_reduce([num_seqs, num_tokens])
        # DeepSpeed averages gradients over ranks; the weights already normalise globally.
        world = dist.get_world_size() if dist.is_initialized() else 1
        groups = self._micro_batches(sequences)
        options = a.policy_loss_options(self.config.rollout.sampling.temperature)
        stats = dict.fromkeys(UPDATE_STATS, 0.0)
        for k, group in enumerate(groups):
            chosen = [sequences[i] for i in group]
            batch = self._pack(chosen or [_PAD])
            mask = torch.ones_like(batch.labels, dtype=torch.float32) if chosen else torch.zeros(1, device=dev)
            weights = aggregation_weights(
                mask, batch.seq_ids, a.aggregation, global_num_tokens=max(global_tokens, 1.0),
                global_num_seqs=max(global_seqs, 1.0), norm_length=float(self.config.rollout.sampling.max_tokens),
            )  # fmt: skip
            seqs = chosen or [_PAD]

            def cat(field, seqs=seqs):
                return torch.cat([field(s) for s in seqs]).to(dev)

            inputs = PolicyLossInputs(
                labels=batch.labels,
                old_logprobs=cat(lambda s: s.old_logprobs),
                advantages=cat(lambda s: torch.full((len(s.response_ids),), s.advantage)),
                loss_weights=weights * world,
                seq_ids=batch.seq_ids,
                credit=cat(lambda s: s.credit.float()),
                group_penalty=cat(lambda s: torch.full((len(s.response_ids),), s.group_penalty)),
                ref_logprobs=cat(lambda s: s.ref_logprobs) if self.reference is not None else None,
            )  # fmt: skip
            loss_args = {"name": a.policy_loss, "inputs": inputs, "options": options}
            self.engine.set_gradient_accumulation_boundary(k == len(groups) - 1)
            out = self.engine(batch, options.temperature, loss_args)
            self.engine.backward(out.loss, scale_wrt_gas=False)
            if chosen:
                n = float(mask.sum())
                loss = out.loss.item()
                stats["loss"] += loss / world if math.isfinite(loss) else 0.0
                stats["clipped"] += float((out.clipped > 0).sum())
                stats["entropy"] += out.entropy.detach().sum().item()
                if self.reference is not None:
                    delta = inputs.ref_logprobs - out.logprobs.detach()
                    stats["kl"] += float((delta.exp() - delta - 1).sum())
                stats["tokens"] += n
        self.engine.step()
        self._after_step(stats)
        return stats

    def _after_step(self, stats: dict[str, float]) -> None:
        # ZeRO all-reduces its overflow flag, so every rank agrees (stage_1_and_2.py:3040-3044, 3242).
        if self.engine.was_step_applied():
            self.version += 1
            self._skipped_in_a_row = 0
            return
        stats["skipped"] = 1.0
        self._skipped_in_a_row += 1
        limit = self.config.trainer.max_skipped_steps
        if self._skipped_in_a_row >= limit:
            raise TrainingDiverged(
                f"{self._skipped_in_a_row} optimizer steps in a row had a non-finite loss or gradient norm "
                f"(trainer.max_skipped_steps={limit}); lower trainer.lr or check the advantages and the data"
            )

    def ppo_epochs(self, sequences: list[TrainSequence], step: int) -> dict[str, float]:
        """`algorithm.mini_epochs` passes over the step's sequences, each reshuffled (a seed per step) and cut
        into `trainer.mini_batches` optimizer steps; the loss is averaged over a pass's mini-batches, the
        other sums per pass, all averaged over the passes, and `skipped` counts optimizer steps."""
        epochs, batches = self.config.algorithm.mini_epochs, self.config.trainer.mini_batches
        totals = dict.fromkeys(UPDATE_STATS, 0.0)
        order = torch.Generator().manual_seed(sampling_seed(self.config.trainer.seed, Stream.SHUFFLE, step, 0))
        for _ in range(epochs):
            shuffled = [sequences[i] for i in torch.randperm(len(sequences), generator=order).tolist()]
            size = -(-len(shuffled) // batches)
            for b in range(batches):
                stats = self.train_mini_batch(shuffled[b * size : (b + 1) * size])
                for k in totals:
                    totals[k] += stats[k] / (batches if k == "loss" else 1)
        averages = {k: v / epochs for k, v in totals.items()}  # per mini-epoch
        averages["skipped"] = totals["skipped"]  # a count of optimizer steps, not an average
        return averages

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # ---- checkpoints ------------------------------------------------------------------------------

    def save(self, directory: Path, tag: str, client_state: dict, *, latest: bool = True) -> None:
        """`latest=False` leaves the `latest` pointer (what a restart resumes from) where it was."""
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=latest)

    def load(self, directory: Path, tag: str) -> dict:
        _, client_state = self.engine.load_checkpoint(str(directory), tag=tag)
        self.version += 1
        return client_state or {}

    def export(self, directory: Path, tokenizer, card: str = "") -> None:
        """An HF model folder of the current policy (gathered from all ranks under ZeRO-3), with `card`
        as its README.md (model card)."""
        writer = not dist.is_initialized() or dist.get_rank() == 0
        # Every rank takes part in ZeRO-3's gathers; only the writer copies the full model to host memory
        # (on every rank it would take the model's size in host RAM once per GPU of the node).
        state = {name: t.cpu() for name, t in model_weights(self.model) if writer}
        if writer:
            self.model.save_pretrained(directory, state_dict=state)
            tokenizer.save_pretrained(directory)
            if card:
                (Path(directory) / "README.md").write_text(card)


# A rank with fewer sequences than micro-batches still runs a forward/backward (with zero weight).
_PAD = TrainSequence(
    prompt_ids=[0], response_ids=[0], advantage=0.0, group_penalty=0.0, credit=torch.zeros(1),
    old_logprobs=torch.zeros(1), ref_logprobs=torch.zeros(1),
)  # fmt: skip
