"""The capo:: custom ops: opcheck (schemas, fake kernels, autograd registration) and torch.compile."""

import dataclasses

import pytest
import torch

import capo_fast.kernels  # noqa: F401  (registers the ops)
from capo_fast.kernels import fused_policy_loss
from capo_fast.kernels.policy_loss import N_LOSS_INPUTS, PolicyLossOptions


def policy_loss_args(n=6, v=33, compute_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, requires_grad=compute_grad)
    labels = torch.randint(0, v, (n,), generator=g)
    vec = lambda: torch.randn(n, generator=g) * 0.1 - 3.0  # noqa: E731
    return (
        logits,
        labels,
        vec(),
        torch.randn(n, generator=g),
        torch.rand(n, generator=g),
        torch.full((n,), 0.5),
        vec(),
        torch.full((n,), 1.0 / n),
        0.9,
        0.2,
        0.28,
        3.0,
        0.05,
        0.01,
    )


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_policy_loss(requires_grad):
    torch.library.opcheck(torch.ops.capo.policy_loss.default, policy_loss_args(compute_grad=requires_grad))


def test_opcheck_policy_loss_inplace():
    torch.library.opcheck(torch.ops.capo.policy_loss_.default, policy_loss_args(compute_grad=False))


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_logprobs_and_logits_grad(requires_grad):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, generator=g, requires_grad=requires_grad)
    labels = torch.randint(0, 40, (5,), generator=g)
    torch.library.opcheck(torch.ops.capo.logprobs.default, (logits, labels, 1.1))
    _, entropy, lse = torch.ops.capo.logprobs(logits.detach(), labels, 1.1)
    grad_args = (labels, lse, entropy, torch.randn(5, generator=g), torch.randn(5, generator=g), 1.1)
    torch.library.opcheck(torch.ops.capo.logits_grad.default, (logits.detach(), *grad_args))
    torch.library.opcheck(torch.ops.capo.logits_grad_.default, (logits.detach().clone(), *grad_args))


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_linear_ops(requires_grad):
    g = torch.Generator().manual_seed(2)
    n, h, v = 7, 8, 29
    hidden = torch.randn(n, h, generator=g, requires_grad=requires_grad)
    weight = torch.randn(v, h, generator=g, requires_grad=requires_grad)
    args = policy_loss_args(n=n, v=v, seed=3)
    per_token, options = args[1:8], list(args[8:])
    torch.library.opcheck(
        torch.ops.capo.linear_policy_loss.default, (hidden, weight, *per_token, options, 3, requires_grad)
    )
    torch.library.opcheck(torch.ops.capo.linear_logprobs.default, (hidden, weight, per_token[0], 1.0, 4))


def test_option_object_matches_the_op_schema():
    """PolicyLossOptions is the one Python statement of the scalar options: same names, same order."""
    schema_args = [a.name for a in torch.ops.capo.policy_loss.default._schema.arguments]
    fields = [f.name for f in dataclasses.fields(PolicyLossOptions)]
    assert schema_args[1 + N_LOSS_INPUTS :] == fields
    assert [a.name for a in torch.ops.capo.policy_loss_.default._schema.arguments] == schema_args
    with pytest.raises(TypeError, match="unknown policy-loss option"):
        fused_policy_loss(*policy_loss_args()[:4], eps_hihg=0.3)
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLossOptions(dual_clip=0.5)


def test_compiles_without_graph_breaks():
    def step(logits, labels, old, adv, credit):
        out = fused_policy_loss(logits, labels, old, adv, credit=credit, penalty=0.5, eps_high=0.28)
        return out.loss * 2.0, out.entropy.mean()

    args = policy_loss_args()
    eager = step(args[0], args[1], args[2], args[3], args[4])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    logits = args[0].detach().clone().requires_grad_(True)
    loss, ent = compiled(logits, args[1], args[2], args[3], args[4])
    loss.backward()
    torch.testing.assert_close(loss, eager[0])
    torch.testing.assert_close(ent, eager[1])
    eager[0].backward()
    torch.testing.assert_close(logits.grad, args[0].grad)
