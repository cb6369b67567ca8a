"""The DeepSpeed policy: packing, old log-probs, and one update against the reference loss."""

from pathlib import Path

import pytest
import torch

from capo_fast.config import load_config
from capo_fast.deepspeed_settings import deepspeed_config, fused_adam_available, offload_device, states_to_offload
from capo_fast.trainer import (
    PolicyTrainer,
    TrainingDiverged,
    TrainSequence,
    attention_implementation,
    pack,
    split_by_tokens,
)


def _sequences(vocab: int, seed: int = 0) -> list[TrainSequence]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, r) in enumerate([(5, 7), (3, 11), (9, 2)]):
        out.append(
            TrainSequence(
                prompt_ids=torch.randint(3, vocab, (p,), generator=g).tolist(),
                response_ids=torch.randint(3, vocab, (r,), generator=g).tolist(),
                advantage=[1.0, -0.5, 0.25][i],
                group_penalty=0.5,
                credit=(torch.rand(r, generator=g) > 0.5).float(),
            )
        )
    return out


def test_split_by_tokens_balances():
    groups = split_by_tokens([10, 1, 9, 2, 5], 2)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    loads = [sum([10, 1, 9, 2, 5][i] for i in g) for g in groups]
    assert abs(loads[0] - loads[1]) <= 3
    assert split_by_tokens([4], 3) == [[0], [], []]


def test_packed_forward_equals_separate(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    seqs = _sequences(model.config.vocab_size)
    batch = pack(seqs, block_mask=True, device=torch.device("cpu"))
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                       attention_mask=batch.attention_mask).logits[0]  # fmt: skip
        for s, seq in enumerate(seqs):
            alone = model(input_ids=torch.tensor([seq.prompt_ids + seq.response_ids])).logits[0]
            rows = packed[batch.response_index[batch.seq_ids == s]]
            torch.testing.assert_close(rows, alone[len(seq.prompt_ids) - 1 : -1], atol=1e-5, rtol=1e-5)
            assert batch.labels[batch.seq_ids == s].tolist() == seq.response_ids


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_logprobs_and_one_update_match_the_reference(single_rank, tiny_model_dir, zero_stage):
    from transformers import AutoModelForCausalLM

    from capo_fast.weights import model_weights

    overrides = [
        f"--trainer.zero_stage={zero_stage}",
        "--model.path=tiny",
        "--trainer.micro_batch_tokens=64",
        "--trainer.lr=1e-3",
        "--algorithm.aggregation=token-mean",
        "--rollout.sampling.temperature=1.0",
    ]
    config = load_config(None, overrides)
    trainer = PolicyTrainer(config, tiny_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    seqs = _sequences(hf.config.vocab_size)
    trainer.compute_logprobs(seqs)  # 3 sequences, 44 tokens over 64-token micro-batches
    for seq in seqs:
        ids = torch.tensor([seq.prompt_ids + seq.response_ids])
        with torch.no_grad():
            logits = hf(ids).logits[0, len(seq.prompt_ids) - 1 : -1]
        expected = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(seq.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(seq.old_logprobs.double(), expected, atol=1e-5, rtol=0)

    # At ratio 1 the clipped loss is -mean_t(A_t) with A_t = a - p * e_t (token-mean).
    advantages = torch.cat([seq.advantage - seq.group_penalty * seq.credit for seq in seqs]).double()
    stats = trainer.train_mini_batch(seqs)
    assert stats["tokens"] == sum(len(s.response_ids) for s in seqs)
    assert stats["loss"] == pytest.approx(-advantages.mean().item(), abs=1e-5)
    # Full tensors under every HF name (ZeRO-3 gathers them), changed by the update.
    synced = dict(model_weights(trainer.model))
    expected_names = dict(hf.named_parameters(remove_duplicate=False))
    assert synced.keys() == expected_names.keys()
    assert all(synced[n].shape == p.shape for n, p in expected_names.items())
    assert any((synced[n] - p).abs().max() > 0 for n, p in expected_names.items())


@pytest.mark.parametrize(
    "dtype, cuda, installed, expected",
    [
        (torch.float32, True, True, "sdpa"),  # flash_api.cpp mha_fwd: fp16 and bf16 only
        (torch.bfloat16, True, True, "flash_attention_2"),
        (torch.float16, True, True, "flash_attention_2"),
        (torch.bfloat16, False, True, "sdpa"),
        (torch.bfloat16, True, False, "sdpa"),
    ],
)
def test_attention_implementation(dtype, cuda, installed, expected):
    assert attention_implementation(dtype, cuda=cuda, flash_installed=installed) == expected


def test_deepspeed_config_is_merged_and_decides_optimizer_and_offload(monkeypatch):
    from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum as State

    monkeypatch.chdir(Path(__file__).parent.parent)
    plain3 = deepspeed_config(load_config(None, ["--trainer.zero_stage=3", "--trainer.lr=2e-6"]), fused_adam=True)
    assert plain3["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-6, "weight_decay": 0.0}}  # FusedAdam
    states = states_to_offload(plain3, cuda=True, wanted=True)
    assert State.optim_states in states and State.hp_params in states and State.lp_params not in states
    assert states_to_offload(plain3, cuda=False, wanted=True) == []
    # without nvcc DeepSpeed cannot build FusedAdam: torch's AdamW, and ZeRO-3 keeps its states (stage3.py:3869)
    assert deepspeed_config(load_config(None, ["--trainer.zero_stage=3"]), fused_adam=False)["optimizer"]["params"][
        "torch_adam"
    ]
    assert states_to_offload(plain3, cuda=True, wanted=True, fused_adam=False) == []
    assert not fused_adam_available()  # no CUDA here
    cpu = deepspeed_config(load_config(None), fused_adam=False)
    assert cpu["optimizer"]["params"]["torch_adam"] is True  # engine.py:2377-2382: torch.optim.AdamW
    # the JSON file turns CPU offload on by itself: decided from the merged config, not trainer.offload_optimizer
    zero3 = deepspeed_config(load_config(None, ["--trainer.deepspeed_config=configs/deepspeed/zero3.json"]),
                             fused_adam=True)  # fmt: skip
    assert offload_device(zero3) == "cpu" and "torch_adam" not in zero3["optimizer"]["params"]
    assert states_to_offload(zero3, cuda=True, wanted=True) == [State.contiguous_grad_buffer]
    # a nested block of the file adds to the generated one instead of replacing it
    merged = deepspeed_config(
        load_config(
            None, ["--trainer.offload_optimizer=true", "--trainer.deepspeed_config=configs/deepspeed/zero2.json"]
        ),
        fused_adam=True,
    )
    assert offload_device(merged) == "cpu" and merged["zero_optimization"]["overlap_comm"] is True


def test_pack_precomputes_flash_attention_boundaries(tiny_model_dir):
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    seqs = _sequences(100)
    batch = pack(seqs, block_mask=False, device=torch.device("cpu"))
    (cu, _), (max_len, _) = prepare_fa_kwargs_from_position_ids(batch.position_ids)  # transformers' own
    assert batch.cu_seq_lens.dtype == torch.int32 and torch.equal(batch.cu_seq_lens, cu.to(torch.int32))
    assert batch.max_length == int(max_len)
    assert set(batch.attention_kwargs()) == {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert set(pack(seqs, block_mask=True, device=torch.device("cpu")).attention_kwargs()) == {"attention_mask"}


def test_update_runs_in_training_mode_with_checkpointing_and_no_cache(single_rank, tiny_model_dir):
    config = load_config(None, ["--model.path=tiny", "--model.gradient_checkpointing=true",
                                "--trainer.micro_batch_tokens=64"])  # fmt: skip
    trainer = PolicyTrainer(config, tiny_model_dir)
    records = []

    def hook(module, args, kwargs):
        records.append((module.training, kwargs.get("use_cache"), kwargs.get("past_key_values")))

    layers = trainer.model.model.layers
    for layer in layers:
        layer.register_forward_pre_hook(hook, with_kwargs=True)
    seqs = _sequences(trainer.model.config.vocab_size)
    trainer.compute_logprobs(seqs)
    assert records and all(not training and cache is None for training, _, cache in records)
    records.clear()
    trainer.train_mini_batch(seqs)
    assert all(training and not use_cache and cache is None for training, use_cache, cache in records)
    # gradient checkpointing recomputes every layer in backward: two forwards per layer and micro-batch
    assert len(records) == 2 * len(layers) * len(trainer._micro_batches(seqs))


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(single_rank, tiny_model_dir):
    from capo_fast.weights import model_weights

    config = load_config(None, ["--model.path=tiny", "--trainer.max_skipped_steps=2", "--trainer.lr=1e-3"])
    trainer = PolicyTrainer(config, tiny_model_dir)
    vocab = trainer.model.config.vocab_size
    poisoned, finite = _sequences(vocab), _sequences(vocab)
    poisoned[0].advantage = float("nan")
    trainer.compute_logprobs(poisoned)
    trainer.compute_logprobs(finite)

    def snapshot():
        return {n: t.clone() for n, t in model_weights(trainer.model)}

    before, version = snapshot(), trainer.version
    stats = trainer.train_mini_batch(poisoned)
    assert stats["skipped"] == 1.0 and trainer.version == version
    assert all(torch.equal(before[n], t) for n, t in model_weights(trainer.model)), "a NaN step changed weights"
    stats = trainer.train_mini_batch(finite)  # a finite step resets the count
    assert stats["skipped"] == 0.0 and trainer.version == version + 1
    assert any(not torch.equal(before[n], t) for n, t in model_weights(trainer.model))
    trainer.train_mini_batch(poisoned)
    with pytest.raises(TrainingDiverged, match="2 optimizer steps in a row"):
        trainer.train_mini_batch(poisoned)


def test_reference_model_is_partitioned_and_gives_the_starting_policys_logprobs(single_rank, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    config = load_config(
        None,
        ["--model.path=tiny", "--algorithm.kl_coef=0.01", "--trainer.zero_stage=2", "--rollout.sampling.temperature=1"],
    )
    trainer = PolicyTrainer(config, tiny_model_dir)
    assert all(hasattr(p, "ds_id") for p in trainer.reference.module.parameters()), "a full copy per GPU"
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    seqs = _sequences(hf.config.vocab_size)
    trainer.compute_logprobs(seqs)
    for seq in seqs:
        with torch.no_grad():
            logits = hf(torch.tensor([seq.prompt_ids + seq.response_ids])).logits[0, len(seq.prompt_ids) - 1 : -1]
        expected = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(seq.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(seq.ref_logprobs.double(), expected, atol=1e-5, rtol=0)
