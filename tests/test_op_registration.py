"""The capo:: custom ops: opcheck (schemas, fake kernels, autograd registration) and torch.compile."""

import pytest
import torch

import capo_fast.kernels  # noqa: F401  (registers the ops)
from capo_fast.kernels import fused_policy_loss


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
        compute_grad,
    )


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_policy_loss(compute_grad):
    torch.library.opcheck(torch.ops.capo.policy_loss.default, policy_loss_args(compute_grad=compute_grad))


def test_opcheck_policy_loss_inplace():
    args = list(policy_loss_args(compute_grad=False))[:-1]
    torch.library.opcheck(torch.ops.capo.policy_loss_.default, tuple(args))


def test_opcheck_logprobs():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(5, 40, generator=g), torch.randint(0, 40, (5,), generator=g)
    for with_entropy in (True, False):
        torch.library.opcheck(torch.ops.capo.logprobs.default, (logits, labels, 1.1, with_entropy))


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_linear_ops(compute_grad):
    g = torch.Generator().manual_seed(2)
    n, h, v = 7, 8, 29
    hidden = torch.randn(n, h, generator=g, requires_grad=compute_grad)
    weight = torch.randn(v, h, generator=g, requires_grad=compute_grad)
    rest = policy_loss_args(n=n, v=v, seed=3)[1:-1]
    torch.library.opcheck(torch.ops.capo.linear_policy_loss.default, (hidden, weight, *rest, 3, compute_grad))
    torch.library.opcheck(
        torch.ops.capo.linear_logprobs.default, (hidden.detach(), weight.detach(), rest[0], 1.0, True, 4)
    )


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
