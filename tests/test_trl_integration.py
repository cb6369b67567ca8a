"""capo_fast.integrations.trl against TRL's own GRPOTrainer loss (TRL's code runs, not a copy of it).

On one batch of a tiny Qwen2 (CPU, fp32), CapoGRPOTrainer's fused loss and the gradient of every
parameter equal those of `trl.GRPOTrainer._compute_loss` for each supported loss_type, with and
without the KL term; unsupported options are refused with an error naming them.
"""

import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from capo_fast import chain_arithmetic  # noqa: E402
from capo_fast.config import CriticConfig  # noqa: E402
from capo_fast.credit import (  # noqa: E402
    CreditConfig,
    Rollout,
    RolloutSignals,
    VotingConfig,
    assign_credit,
    group_advantages,
    token_rewards,
)
from capo_fast.critics import CritiqueRequest, FunctionCritic  # noqa: E402
from capo_fast.critique import split_steps  # noqa: E402
from capo_fast.integrations.trl import LOSS_TYPES, CapoCreditGRPOTrainer, CapoGRPOTrainer, check_args  # noqa: E402

ROWS, PROMPT, LENGTH = 4, 3, 6
# ragged lengths and one empty completion (grpo and dr_grpo still count it among the B rows)
COMPLETION_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])


def grpo_args(tmp_path, **overrides) -> GRPOConfig:
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=ROWS, num_generations=2, max_completion_length=8,
        report_to=[], use_cpu=True, bf16=False, gradient_accumulation_steps=2,
    )  # fmt: skip
    return GRPOConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def zero_reward(completions, **_):
    return [0.0] * len(completions)


def make_trainer(tiny, tmp_path, **overrides) -> CapoGRPOTrainer:
    model, tokenizer = tiny
    dataset = Dataset.from_list([{"prompt": "Start with 3."}] * 8)
    args = grpo_args(tmp_path, **overrides)
    trainer = CapoGRPOTrainer(model, zero_reward, args, train_dataset=dataset, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 2  # set by Trainer's loop, which this test does not run
    trainer.model.train()
    return trainer


def batch(vocab: int, seed: int, *, off_policy: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "prompt_ids": torch.randint(0, vocab, (ROWS, PROMPT), generator=g),
        "prompt_mask": torch.ones(ROWS, PROMPT, dtype=torch.long),
        "completion_ids": torch.randint(0, vocab, (ROWS, LENGTH), generator=g),
        "completion_mask": COMPLETION_MASK,
        "advantages": torch.randn(ROWS, generator=g),
        "num_items_in_batch": COMPLETION_MASK.sum().float() * 2,  # two micro-batches per generation batch
        # reference log-probs near the tiny model's (about -log 512), so the KL terms are of order 1
        "ref_per_token_logps": -6.2 + 0.5 * torch.randn(ROWS, LENGTH, generator=g),
    }
    if off_policy:  # ratios far enough from 1 that both sides of the clip range are hit
        inputs["old_per_token_logps"] = -6.2 + 0.5 * torch.randn(ROWS, LENGTH, generator=g)
    return inputs


def loss_and_grads(trainer, compute_loss, inputs):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = compute_loss(trainer, model, inputs)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_as_trl(trainer, inputs):
    trl_loss, trl_grads = loss_and_grads(trainer, GRPOTrainer._compute_loss, inputs)
    capo_loss, capo_grads = loss_and_grads(trainer, CapoGRPOTrainer._compute_loss, inputs)
    assert trl_loss.abs() > 1e-3  # a batch where the loss is not trivially zero
    torch.testing.assert_close(capo_loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert set(capo_grads) == set(trl_grads)
    for name, grad in trl_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(capo_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
@pytest.mark.parametrize("kl", ["none", "k3", "k3_bias_corrected"])
def test_loss_and_gradients_equal_trl(tiny, tmp_path, loss_type, kl):
    beta = 0.0 if kl == "none" else 0.04
    trainer = make_trainer(tiny, tmp_path, loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28,
                           use_bias_correction_kl=kl == "k3_bias_corrected")  # fmt: skip
    assert_same_as_trl(trainer, batch(trainer.model.config.vocab_size, seed=len(loss_type) + int(beta * 100)))


def test_on_policy_eval_and_temperature_equal_trl(tiny, tmp_path):
    """No old log-probs (TRL then uses the current ones, detached), eval-mode normalisers, temperature."""
    trainer = make_trainer(tiny, tmp_path, loss_type="grpo", temperature=0.7)
    trainer.model.eval()
    assert_same_as_trl(trainer, batch(trainer.model.config.vocab_size, seed=7, off_policy=False))


@pytest.mark.parametrize(
    "option",
    [
        {"loss_type": "cispo"},
        {"loss_type": "sapo"},
        {"importance_sampling_level": "sequence", "loss_type": "grpo"},
        {"delta": 1.5},
        {"top_entropy_quantile": 0.2},
        {"off_policy_mask_threshold": 0.5},
        {"entropy_coef": 0.01},
        {"cast_lm_head_to_fp32": True},
    ],
)
def test_unsupported_options_are_refused_by_name(tmp_path, option):
    name = next(k for k in option if k != "loss_type" or len(option) == 1)
    with pytest.raises(ValueError, match=f"GRPOConfig.{name}="):
        check_args(grpo_args(tmp_path, **option))


def test_capo_credit_refuses_normalize_then_sum(tmp_path):
    args = grpo_args(tmp_path, multi_objective_aggregation="normalize_then_sum")
    with pytest.raises(ValueError, match="GRPOConfig.multi_objective_aggregation"):
        CapoCreditGRPOTrainer("unused", zero_reward, args, critic=None)


def test_kernels_and_package_do_not_import_trl():
    code = "import sys, capo_fast, capo_fast.kernels, capo_fast.integrations; assert 'trl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def readme_trl_blocks() -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = re.search(r"## Use it from TRL\n(.*?)\n## ", readme, re.S).group(1)
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.parametrize("block", [0, 1], ids=["fused-loss", "capo-credit"])
def test_readme_trl_examples_run(tmp_path, monkeypatch, capsys, block):
    """The README's "Use it from TRL" examples run as written and train through the fused loss."""
    code = readme_trl_blocks()[block]
    monkeypatch.chdir(tmp_path)
    calls = []
    fused = CapoGRPOTrainer._compute_loss
    monkeypatch.setattr(CapoGRPOTrainer, "_compute_loss", lambda *a: calls.append(1) or fused(*a))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    trainer = scope["trainer"]
    assert type(trainer) is (CapoGRPOTrainer, CapoCreditGRPOTrainer)[block]
    assert len(calls) == scope["args"].max_steps  # one micro-batch per step, each through the fused loss
    assert math.isfinite(float(capsys.readouterr().out.split()[-1]))  # the printed train_loss
    max_entropy = math.log(trainer.model.config.vocab_size)
    logged = [entry for entry in trainer.state.log_history if "entropy" in entry]
    assert logged and all(0 < entry["entropy"] <= max_entropy for entry in logged)
    if block == 1:  # every completion was critiqued, none failed
        assert all(entry["capo/credit/failed_critique_rate"] == 0.0 for entry in logged)


def chain_completions(tokenizer, groups: int, per_group: int, seed: int = 3):
    """Worked solutions of chain problems, right ones and ones with a forgotten carry, as TRL pads them."""
    rng = random.Random(seed)
    rows, texts, rewards = [], [], []
    for row in chain_arithmetic.split_rows("train", 40, seed):
        chain = chain_arithmetic.chain_of(row["question"], row["reference_solution"])
        wrong = chain_arithmetic.annotated_solution(chain, rng, wrong=True)
        if wrong is None:
            continue
        right, _ = chain_arithmetic.annotated_solution(chain, rng, wrong=False)
        for k in range(per_group):  # right, wrong, right, wrong, ...
            steps = right if k % 2 == 0 else wrong[0]
            rows.append(row)
            texts.append("\n\n".join(steps))
            rewards.append(float(k % 2 == 0))
        if len(rows) == groups * per_group:
            break
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, ids)) + 2  # padding past the longest, as in a batch
    completion_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    completion_mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row_ids in enumerate(ids):
        completion_ids[i, : len(row_ids)] = torch.tensor(row_ids)
        completion_mask[i, : len(row_ids)] = 1
    return rows, texts, completion_ids, completion_mask, torch.tensor(rewards)


def test_capo_token_advantages_equal_capo_fast_credit(tiny, tmp_path):
    """CapoCreditGRPOTrainer's [B, T] advantages from the program critic equal capo-fast's own credit
    (assign_credit on the same rollouts) and Eq. 2 in its direct form, (R_t - mean_g) / (std_g + eps)."""
    model, tokenizer = tiny
    critic = FunctionCritic(CriticConfig(backend="function", function="capo_fast.chain_arithmetic:critique",
                                         num_critiques=3))  # fmt: skip
    voting, credit = VotingConfig(mode="majority"), CreditConfig(correct_reward=2.0, penalty=1.0)
    trainer = CapoCreditGRPOTrainer(
        model, zero_reward, grpo_args(tmp_path, loss_type="grpo"), critic=critic, voting=voting, credit=credit,
        train_dataset=Dataset.from_list([{"prompt": "Start with 3."}] * 8), processing_class=tokenizer,
    )  # fmt: skip
    group_size = 4
    rows, texts, completion_ids, completion_mask, rewards = chain_completions(tokenizer, 2, group_size)
    inputs = [{"prompt": row["question"], **row} for row in rows]
    advantages, metrics = trainer.token_advantages(inputs, completion_ids, completion_mask, rewards, group_size)

    rollouts = [
        Rollout(completion_ids[i][completion_mask[i].bool()].tolist(), text, False, split_steps(text),
                correct=float(rewards[i]))
        for i, text in enumerate(texts)
    ]  # fmt: skip
    requests = [CritiqueRequest(row["question"], r.steps, row["reference_solution"], row["answer"])
                for row, r in zip(rows, rollouts, strict=True)]  # fmt: skip
    for r, critiques in zip(rollouts, critic.critique(requests), strict=True):
        r.critiques = critiques
    groups = [rollouts[g : g + group_size] for g in range(0, len(rollouts), group_size)]
    assign_credit(groups, tokenizer, voting, credit)

    flagged = 0
    for g, group in enumerate(groups):
        direct = group_advantages([token_rewards(RolloutSignals(r.correct, 0.0, r.credit), credit) for r in group])
        for k, (r, expected) in enumerate(zip(group, direct, strict=True)):
            i, n = g * group_size + k, len(r.token_ids)
            torch.testing.assert_close(advantages[i, :n].double(), r.advantage - r.group_penalty * r.credit.double())
            torch.testing.assert_close(advantages[i, :n].double(), expected, rtol=1e-6, atol=1e-6)
            assert (advantages[i, n:] == 0).all()
            flagged += int((r.credit > 0).any())
            assert (r.credit > 0).any() == (r.correct == 0.0)  # the critic flags the forgotten carry only
    assert flagged == len(rollouts) // 2
    assert metrics["capo/credit/flagged_step_rate_correct"] == 0.0
