"""TRL's GRPOTrainer loss against capo_fast.integrations.trl at a Qwen vocabulary (V=151,936), CPU.

    pytest bench/test_bench_trl.py --benchmark-only --benchmark-json bench/results/cpu-2core-x86_64-trl.json

One micro-batch of `_compute_loss` forward and backward (a one-layer Qwen2 backbone of width 128, so
the vocabulary head dominates): `trl` is TRL 1.16's own path (its chunked log-prob head, then the loss
in PyTorch on [B, T] log-probs), `capo` the fused linear policy loss. Same trainer options (dapo,
beta=0.04, TRL's default bias-corrected KL). Time comes from pytest-benchmark; the peak memory above
the inputs is measured for each provider in a process of its own (this file run with --peak).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import pytest
import torch
from measure import peak_in_own_process, rss_bytes

pytest.importorskip("trl")

VOCAB, WIDTH = 151_936, 128
ROWS, PROMPT, LENGTH = 4, 16, 256  # N = 1024 completion tokens
PROVIDERS = ["trl", "capo"]


def build_model(out_dir: str) -> str:
    """A one-layer Qwen2 with the Qwen vocabulary and a small width, saved with the tiny model's tokenizer
    (TRL loads its reference model from the folder)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from capo_fast.local_models import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(f"{out_dir}/tiny"))
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, head_dim=32, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_trainer(provider: str, model_dir: str):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from capo_fast.integrations.trl import CapoGRPOTrainer

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=ROWS, num_generations=ROWS,
        max_completion_length=LENGTH, loss_type="dapo", beta=0.04, report_to=[], use_cpu=True, bf16=False,
        model_init_kwargs={"dtype": torch.float32},
    )  # fmt: skip
    trainer_class = {"trl": GRPOTrainer, "capo": CapoGRPOTrainer}[provider]
    dataset = Dataset.from_list([{"prompt": "x"}] * ROWS)
    trainer = trainer_class(model_dir, lambda completions, **_: [0.0] * len(completions), args, train_dataset=dataset)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(LENGTH)[None] < torch.tensor([[LENGTH], [LENGTH * 3 // 4], [LENGTH // 2], [LENGTH]])).long()
    return {
        "prompt_ids": torch.randint(0, VOCAB, (ROWS, PROMPT), generator=g),
        "prompt_mask": torch.ones(ROWS, PROMPT, dtype=torch.long),
        "completion_ids": torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g),
        "completion_mask": mask,
        "advantages": torch.randn(ROWS, generator=g),
        "num_items_in_batch": mask.sum().float(),
        "old_per_token_logps": -12.0 + 0.1 * torch.randn(ROWS, LENGTH, generator=g),
        "ref_per_token_logps": -12.0 + 0.1 * torch.randn(ROWS, LENGTH, generator=g),
    }


def step(trainer, inputs) -> float:
    trainer.model.zero_grad(set_to_none=False)  # gradient buffers stay, as in training: the peak is the loss's
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.item()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(str(tmp_path_factory.mktemp("qwen-vocab")))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_trl_loss(benchmark, provider, model_dir):
    trainer, inputs = make_trainer(provider, model_dir), make_inputs()
    step(trainer, inputs)  # warm-up
    benchmark.group = f"TRL GRPO loss dapo beta=0.04 N={ROWS * LENGTH} H={WIDTH} V={VOCAB} fp32 cpu"
    loss = benchmark.pedantic(step, args=(trainer, inputs), rounds=3, iterations=1, warmup_rounds=0)
    peak = peak_in_own_process(__file__, provider, model_dir)
    logits_bytes = ROWS * LENGTH * VOCAB * 4
    benchmark.extra_info.update(
        device="cpu",
        loss=loss,
        tokens=ROWS * LENGTH,
        logits_bytes=logits_bytes,
        peak_extra_bytes=peak,
        peak_extra_over_logits=peak / logits_bytes,
        threads=torch.get_num_threads(),
    )


def _peak_main(argv):
    """--peak PROVIDER MODEL_DIR: one warm-up step, then the peak RSS of one more step above its start."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--peak", required=True, choices=PROVIDERS)
    parser.add_argument("model_dir")
    args = parser.parse_args(argv)
    trainer, inputs = make_trainer(args.peak, args.model_dir), make_inputs()
    step(trainer, inputs)
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the kernel's peak-RSS counter
        f.write("5")
    base = rss_bytes()
    step(trainer, inputs)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"provider": args.peak, "peak_extra_bytes": hwm - base}))


if __name__ == "__main__":
    _peak_main(sys.argv[1:])
