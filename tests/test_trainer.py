"""The DeepSpeed policy: packing, old log-probs, and one update against the reference loss."""

import os
import socket

import pytest
import torch

from capo_fast.config import load_config
from capo_fast.trainer import PolicyTrainer, TrainSequence, pack, split_by_tokens


@pytest.fixture(scope="module")
def single_rank():
    import deepspeed
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deepspeed.init_distributed("gloo", verbose=False)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _sequences(vocab: int, seed: int = 0) -> list[TrainSequence]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, r) in enumerate([(5, 7), (3, 11), (9, 2)]):
        out.append(
            TrainSequence(
                prompt_ids=torch.randint(3, vocab, (p,), generator=g).tolist(),
                response_ids=torch.randint(3, vocab, (r,), generator=g).tolist(),
                advantage=[1.0, -0.5, 0.25][i],
                penalty=0.5,
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

    from capo_fast.rollout import model_weights

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
    advantages = torch.cat([seq.advantage - seq.penalty * seq.credit for seq in seqs]).double()
    stats = trainer.train_mini_batch(seqs)
    assert stats["tokens"] == sum(len(s.response_ids) for s in seqs)
    assert stats["loss"] == pytest.approx(-advantages.mean().item(), abs=1e-5)
    # Full tensors under every HF name (ZeRO-3 gathers them), changed by the update.
    synced = dict(model_weights(trainer.model))
    expected_names = dict(hf.named_parameters(remove_duplicate=False))
    assert synced.keys() == expected_names.keys()
    assert all(synced[n].shape == p.shape for n, p in expected_names.items())
    assert any((synced[n] - p).abs().max() > 0 for n, p in expected_names.items())
