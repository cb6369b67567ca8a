"""capo_fast.integrations.trl against TRL's own GRPOTrainer loss (TRL's code runs, not a copy of it).

On one batch of a tiny Qwen2 (CPU, fp32), CapoGRPOTrainer's fused loss and the gradient of every
parameter equal those of `trl.GRPOTrainer._compute_loss` for each supported loss_type, with and
without the KL term; unsupported options are refused with an error naming them.
"""

import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from capo_fast.integrations.trl import LOSS_TYPES, CapoGRPOTrainer, check_args  # noqa: E402

ROWS, PROMPT, LENGTH = 4, 3, 6
COMPLETION_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])


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


def test_readme_trl_example_runs(tmp_path, monkeypatch, capsys):
    """The README's "Use it from TRL" example runs as written and trains through the fused loss."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Use it from TRL\n.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    calls = []
    fused = CapoGRPOTrainer._compute_loss
    monkeypatch.setattr(CapoGRPOTrainer, "_compute_loss", lambda *a: calls.append(1) or fused(*a))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(calls) == scope["args"].max_steps  # one micro-batch per step, each through the fused loss
    train_loss = float(capsys.readouterr().out.split()[-1])
    assert math.isfinite(train_loss)
    max_entropy = math.log(scope["trainer"].model.config.vocab_size)
    logged = [entry["entropy"] for entry in scope["trainer"].state.log_history if "entropy" in entry]
    assert logged and all(0 < entropy <= max_entropy for entropy in logged)
