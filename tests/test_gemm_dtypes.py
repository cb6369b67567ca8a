"""On CUDA every GEMM of the linear ops keeps bf16/fp16 operands (tensor cores) and accumulates in fp32.

The dtypes the CUDA path hands to each matmul are recorded on CPU: a TorchDispatchMode sees every aten
matmul call, and the one decision that depends on the device (`gemm_accumulates_in_fp32`) is answered
as CUDA would answer it. The CUDA-only `out_dtype` overloads have no CPU kernel, so the recorder
computes them in fp32 itself (the same numbers cuBLAS accumulates to, up to summation order).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from capo_fast.kernels import fused_linear_logprobs, fused_linear_policy_loss
from capo_fast.kernels import linear_policy_loss as lpl

aten = torch.ops.aten
GEMMS = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.matmul}
OUT_DTYPE_OVERLOADS = {aten.mm.dtype, aten.mm.dtype_out, aten.addmm.dtype, aten.addmm.dtype_out}
N, H, V = 37, 48, 211  # no two sizes equal, so an operand's shape says which model dimension it spans


# The linear ops are Python custom ops: a dispatch mode sees each as one call, so the recorder runs their
# Python bodies (CustomOpDef._init_fn, torch/_library/custom_ops.py:295) under itself to see inside.
PYTHON_OPS = {
    torch.ops.capo.linear_policy_loss.default: lpl._linear_policy_loss._init_fn,
    torch.ops.capo.linear_logprobs.default: lpl._linear_logprobs._init_fn,
}


class GemmRecorder(TorchDispatchMode):
    """Records (op, operand dtypes, operand shapes, output dtype) of every matmul."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple, tuple, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PYTHON_OPS:
            with self:
                return PYTHON_OPS[func](*args, **kwargs)
        if func.overloadpacket not in GEMMS:
            return func(*args, **kwargs)
        first = 1 if func.overloadpacket in (aten.addmm, aten.addmm_, aten.baddbmm) else 0
        a, b = args[first], args[first + 1]
        if func in OUT_DTYPE_OVERLOADS and a.device.type == "cpu":
            result = self._fp32_emulation(func, args, kwargs)
        else:
            result = func(*args, **kwargs)
        self.calls.append((func.name(), (a.dtype, b.dtype), (tuple(a.shape), tuple(b.shape)), result.dtype))
        return result

    @staticmethod
    def _fp32_emulation(func, args, kwargs):
        out = kwargs.get("out")
        if func.overloadpacket is aten.mm:
            value = torch.mm(args[0].float(), args[1].float())
        else:
            beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
            value = torch.addmm(args[0].float(), args[1].float(), args[2].float(), beta=beta, alpha=alpha)
        return value if out is None else out.copy_(value)


def model_size_fp32_gemms(calls):
    """fp32-operand matmuls that span the hidden size or the vocabulary (the lm_head's dimensions)."""
    return [c for c in calls if torch.float32 in c[1] and any(d in (H, V) for shape in c[2] for d in shape)]


def as_on_cuda(monkeypatch):
    monkeypatch.setattr(lpl, "gemm_accumulates_in_fp32", lambda device, dtype: dtype in (torch.bfloat16, torch.float16))


def case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)
    old = torch.randn(N, generator=g) - 5.0
    adv = torch.randn(N, generator=g)
    return hidden, weight, labels, old, adv


def loss_step(hidden, weight, labels, old, adv):
    fused_linear_policy_loss(hidden, weight, labels, old, adv, chunk_budget_bytes=10 * V * 6).loss.backward()


def logprobs_step(hidden, weight, labels, old, adv):
    lp, ent = fused_linear_logprobs(hidden, weight, labels, with_entropy=True, chunk_budget_bytes=10 * V * 6)
    ((lp - old) * adv).sum().add(ent.sum() * 0.1).backward()


def test_the_device_decision(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert lpl.gemm_accumulates_in_fp32(cuda, torch.bfloat16) and lpl.gemm_accumulates_in_fp32(cuda, torch.float16)
    assert not lpl.gemm_accumulates_in_fp32(cuda, torch.float32)  # fp32 inputs: fp32 is the user's choice
    assert not lpl.gemm_accumulates_in_fp32(cpu, torch.bfloat16)  # aten::addmm.dtype has no CPU kernel
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # a V100: no such GEMM
    assert not lpl.gemm_accumulates_in_fp32(cuda, torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("step", [loss_step, logprobs_step], ids=["loss", "logprobs"])
def test_cuda_path_hands_low_precision_operands_to_every_gemm(step, dtype, monkeypatch):
    as_on_cuda(monkeypatch)
    args = case(dtype)
    with GemmRecorder() as rec:
        step(*args)
    assert rec.calls, "no matmul recorded"
    assert not model_size_fp32_gemms(rec.calls), rec.calls
    assert {c[1] for c in rec.calls} == {(dtype, dtype)}
    accumulations = [c for c in rec.calls if c[0].startswith("aten::addmm")]
    assert accumulations and all(c[0] == "aten::addmm.dtype_out" and c[3] == torch.float32 for c in accumulations)
    assert len(accumulations) == 4  # one per chunk of 10 tokens (37 tokens)
    assert args[0].grad.dtype == args[1].grad.dtype == dtype


@pytest.mark.parametrize("step", [loss_step, logprobs_step], ids=["loss", "logprobs"])
def test_cpu_path_widens_and_gives_the_same_gradients(step, monkeypatch):
    """Without the CUDA overload the operands are widened to fp32 (the recorder sees it, and would flag it
    on CUDA); both ways accumulate the same bf16 products in fp32, so the gradients agree."""
    cpu_args = case(torch.bfloat16, seed=1)
    with GemmRecorder() as rec:
        step(*cpu_args)
    assert model_size_fp32_gemms(rec.calls)  # the check does catch an fp32 GEMM of model size
    as_on_cuda(monkeypatch)
    cuda_args = case(torch.bfloat16, seed=1)
    with GemmRecorder():
        step(*cuda_args)
    torch.testing.assert_close(cuda_args[1].grad, cpu_args[1].grad, atol=0, rtol=0)
    torch.testing.assert_close(cuda_args[0].grad, cpu_args[0].grad, atol=0, rtol=0)


def test_trainer_forward_and_backward_keep_low_precision_gemms(monkeypatch):
    """The trainer's PolicyWithLoss (a bf16 causal LM, then the fused head) on the CUDA decision path:
    the model's projections and the lm_head's GEMMs all take bf16 operands (a small fp32 product spanning
    neither H nor V, such as a rotary embedding's, would be let through). Attention (sdpa) is one op."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from capo_fast.trainer import PolicyWithLoss, TrainSequence, pack

    as_on_cuda(monkeypatch)
    config = Qwen2Config(
        vocab_size=V, hidden_size=H, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(1)
    seqs = [
        TrainSequence(torch.randint(0, V, (p,), generator=g).tolist(), torch.randint(0, V, (r,), generator=g).tolist(),
                      advantage=0.5, group_penalty=0.1, credit=torch.ones(r))
        for p, r in ((5, 7), (3, 9))
    ]  # fmt: skip
    batch = pack(seqs, block_mask=True, device=torch.device("cpu"))
    n = batch.labels.shape[0]
    from capo_fast.kernels import PolicyLossOptions
    from capo_fast.policy_losses import PolicyLossInputs

    inputs = PolicyLossInputs(labels=batch.labels, old_logprobs=torch.full((n,), -5.0),
                              advantages=torch.full((n,), 0.5), loss_weights=torch.full((n,), 1.0 / n),
                              seq_ids=batch.seq_ids)  # fmt: skip
    loss_args = {"name": "ppo", "inputs": inputs, "options": PolicyLossOptions()}
    with GemmRecorder() as rec:
        out = PolicyWithLoss(model)(batch, 1.0, loss_args)
        out.loss.backward()
    assert len(rec.calls) > 20
    assert not model_size_fp32_gemms(rec.calls), model_size_fp32_gemms(rec.calls)
    lm_head = [c for c in rec.calls if V in c[2][0] + c[2][1]]
    assert lm_head and all(c[1] == (torch.bfloat16, torch.bfloat16) for c in lm_head)
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.dtype == torch.bfloat16
