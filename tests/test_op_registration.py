"""The capo:: custom ops: opcheck (schemas, fake kernels, autograd registration), the one order of the
per-token tensors and of the options, the fake kernels' checks, and torch.compile."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import capo_fast.kernels  # noqa: F401  (registers the ops)
from capo_fast.kernels import fused_policy_loss, reference
from capo_fast.kernels import policy_loss as pl
from capo_fast.kernels.policy_loss import LOSS_TENSORS, OPTION_NAMES, PolicyLossInputs, PolicyLossOptions

OPTIONS = PolicyLossOptions(temperature=0.9, eps_low=0.2, eps_high=0.28, dual_clip=3.0, kl_coef=0.05, entropy_coef=0.01)


def policy_loss_args(n=6, v=33, compute_grad=True, seed=0):
    """(logits, *per-token tensors in schema order, options) of capo::policy_loss."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, requires_grad=compute_grad)
    labels = torch.randint(0, v, (n,), generator=g)
    vec = lambda: torch.randn(n, generator=g) * 0.1 - 3.0  # noqa: E731
    inputs = PolicyLossInputs(
        labels=labels,
        old_logprobs=vec(),
        advantages=torch.randn(n, generator=g),
        loss_weights=torch.full((n,), 1.0 / n),
        credit=torch.rand(n, generator=g),
        group_penalty=torch.full((n,), 0.5),
        ref_logprobs=vec(),
    )
    return (logits, *inputs.op_args(), OPTIONS.as_list())


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
    _, *per_token, options = policy_loss_args(n=n, v=v, seed=3)
    torch.library.opcheck(
        torch.ops.capo.linear_policy_loss.default, (hidden, weight, *per_token, options, 3, requires_grad)
    )
    torch.library.opcheck(torch.ops.capo.linear_logprobs.default, (hidden, weight, per_token[0], 1.0, 4))


def _schema_names(op) -> list[str]:
    return [a.name for a in op.default._schema.arguments]


def test_the_loss_ops_take_the_record_fields_and_one_options_list():
    """Every loss schema: the per-token tensors in PolicyLossInputs' field order, then `float[] options`."""
    loss_args = ["logits", *LOSS_TENSORS, "options"]
    assert _schema_names(torch.ops.capo.policy_loss) == loss_args
    assert _schema_names(torch.ops.capo.policy_loss_) == loss_args
    linear = _schema_names(torch.ops.capo.linear_policy_loss)
    assert linear == ["hidden", "weight", *LOSS_TENSORS, "options", "chunk_size", "compute_grad"]
    assert str(torch.ops.capo.policy_loss.default._schema.arguments[-1].type) == "List[float]"
    assert [f for f in PolicyLossInputs._fields if f not in LOSS_TENSORS] == ["seq_ids"]
    assert OPTION_NAMES == ("temperature", "eps_low", "eps_high", "dual_clip", "kl_coef", "entropy_coef")
    assert PolicyLossOptions.from_list(OPTIONS.as_list()) == OPTIONS
    with pytest.raises(TypeError, match="unknown policy-loss option"):
        fused_policy_loss(*policy_loss_args()[:4], eps_hihg=0.3)
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLossOptions(dual_clip=0.5)


# Each option set alone to a value with a visible effect on the case below (ratios e^-1.5 .. e^1.5 on both
# sides of the clip range, negative advantages past the dual clip, a reference policy, non-zero entropy).
ONE_OPTION = {
    "temperature": 0.7,
    "eps_low": 0.05,
    "eps_high": 0.6,
    "dual_clip": 1.5,
    "kl_coef": 0.3,
    "entropy_coef": 0.07,
}


def _option_case():
    g = torch.Generator().manual_seed(7)
    n, v = 24, 57
    logits = torch.randn(n, v, generator=g) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    logp = reference.token_logprobs_and_entropy(logits.double(), labels)[0].float()
    inputs = PolicyLossInputs(
        labels=labels,
        old_logprobs=logp + (torch.rand(n, generator=g) * 3 - 1.5),
        advantages=torch.randn(n, generator=g),
        loss_weights=torch.full((n,), 1.0 / n),
        ref_logprobs=logp + torch.randn(n, generator=g),
    )
    return logits, inputs


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_each_op_reads_option_k_as_field_k(name, triton_device):
    """Pins the C++ Option enum (and the Triton registration) to PolicyLossOptions' field order: one option
    set alone must give the float64 reference's loss for that option, and differ from the defaults."""
    assert set(ONE_OPTION) == set(OPTION_NAMES)
    logits, inputs = _option_case()
    options = PolicyLossOptions(**{name: ONE_OPTION[name]})
    kw = {k: v.double() for k, v in inputs._asdict().items() if k not in ("labels", "seq_ids") and v is not None}
    expected = reference.policy_loss(logits.double(), inputs.labels, **kw, **options.__dict__)[0]
    default = reference.policy_loss(logits.double(), inputs.labels, **kw)[0]
    assert abs(expected - default) > 1e-3, f"{name} has no effect on the case: the test could not fail"
    args = (*inputs.op_args(), options.as_list())
    dev_args = (*(None if t is None else t.to(triton_device) for t in inputs.op_args()), options.as_list())
    losses = {
        "C++": torch.ops.capo.policy_loss(logits, *args)[0],
        "C++ in place": torch.ops.capo.policy_loss_(logits.clone(), *args)[0],
        "Triton": pl.policy_loss_triton(logits.to(triton_device), *dev_args)[0],
        "Triton in place": pl.policy_loss_inplace_triton(logits.to(triton_device), *dev_args)[0],
    }
    for path, loss in losses.items():
        torch.testing.assert_close(
            loss.cpu().double(), expected, atol=1e-5, rtol=1e-5, msg=lambda m, path=path: f"{path}: {m}"
        )


# ---- fake kernels: a wrong call fails while tracing, with the message of the CPU op ----------------------


def _wrong_loss_calls():
    """(what is wrong, a function of the call's arguments that makes it wrong, the error message)."""
    return {
        "labels shape": (lambda a: a | {"labels": a["labels"][:-1]}, r"labels must have shape \[6\]"),
        "labels dtype": (lambda a: a | {"labels": a["labels"].float()}, "labels must be integers"),
        "advantages dtype": (lambda a: a | {"advantages": a["advantages"].long()}, "advantages must be floating"),
        "weights shape": (lambda a: a | {"loss_weights": a["loss_weights"][None]}, "loss_weights must have shape"),
        "credit alone": (lambda a: a | {"group_penalty": None}, "credit and group_penalty must be given together"),
        "logits 3-D": (lambda a: a | {"logits": a["logits"][None]}, "logits must be 2-D"),
        "logits dtype": (lambda a: a | {"logits": a["logits"].long()}, "logits must be floating point"),
        "options": (lambda a: a | {"options": a["options"][:5]}, "options must hold 6 values"),
        "temperature": (lambda a: a | {"options": [0.0, *a["options"][1:]]}, "temperature must be > 0"),
    }


WRONG_LOSS_CALLS = _wrong_loss_calls()


def _named_loss_args():
    logits, *tensors, options = policy_loss_args(compute_grad=False)
    return {"logits": logits, **dict(zip(LOSS_TENSORS, tensors, strict=True)), "options": options}


def _call_loss(args):
    return torch.ops.capo.policy_loss(args["logits"], *(args[k] for k in LOSS_TENSORS), args["options"])


@pytest.mark.parametrize("mode", ["eager", "fake"])
@pytest.mark.parametrize("case", WRONG_LOSS_CALLS, ids=WRONG_LOSS_CALLS)
def test_a_wrong_loss_call_fails_with_the_same_message_eager_and_fake(case, mode):
    make_wrong, message = WRONG_LOSS_CALLS[case]
    args = make_wrong(_named_loss_args())
    if mode == "eager":
        with pytest.raises(RuntimeError, match=message):
            _call_loss(args)
        return
    with FakeTensorMode() as fake:  # fake copies of the same tensors: only the fake kernel runs
        args = {k: fake.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises(RuntimeError, match=message):
            _call_loss(args)


def test_fake_kernels_check_devices():
    with FakeTensorMode() as mode:
        args = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in _named_loss_args().items()}
        args["advantages"] = torch.empty(6, device="meta")
        with pytest.raises(RuntimeError, match="advantages is on meta, the logits on cpu"):
            _call_loss(args)


def test_fake_kernels_of_the_other_ops_check_their_inputs():
    with FakeTensorMode():
        logits, labels, vec = torch.empty(5, 40), torch.zeros(5, dtype=torch.long), torch.empty(5)
        with pytest.raises(RuntimeError, match="labels must be integers"):
            torch.ops.capo.logprobs(logits, labels.float(), 1.0)
        with pytest.raises(RuntimeError, match=r"grad_entropy must have shape \[5\]"):
            torch.ops.capo.logits_grad(logits, labels, vec, vec, vec, torch.empty(4), 1.0)
        with pytest.raises(RuntimeError, match="lse must be floating point"):
            torch.ops.capo.logits_grad_(logits, labels, labels, vec, vec, vec, 1.0)
        hidden, weight = torch.empty(5, 8), torch.empty(40, 8)
        with pytest.raises(RuntimeError, match="hidden is torch.float32, weight torch.float64"):
            torch.ops.capo.linear_logprobs(hidden, weight.double(), labels, 1.0, 4)
        with pytest.raises(RuntimeError, match=r"hidden \[N, H\] and weight \[V, H\] expected"):
            torch.ops.capo.linear_logprobs(hidden, torch.empty(40, 7), labels, 1.0, 4)
        _, *tensors, options = policy_loss_args(n=5, v=40, compute_grad=False)
        tensors[LOSS_TENSORS.index("old_logprobs")] = torch.empty(6)
        with pytest.raises(RuntimeError, match=r"old_logprobs must have shape \[5\] \(one value per row of the hidden"):
            torch.ops.capo.linear_policy_loss(hidden, weight, *tensors, options, 4, False)
        tensors[LOSS_TENSORS.index("old_logprobs")] = torch.empty(5)
        tensors[LOSS_TENSORS.index("advantages")] = torch.empty(5, device="meta")
        with pytest.raises(RuntimeError, match="advantages is on meta, the hidden states on cpu"):  # not "the logits"
            torch.ops.capo.linear_policy_loss(hidden, weight, *tensors, options, 4, False)


def test_torch_compile_rejects_a_wrong_call_while_tracing():
    """The fake kernel's check stops the trace: the compiled graph is never built or run."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(logits, labels, old, adv):
        return fused_policy_loss(logits, labels, old, adv).loss

    args = policy_loss_args(compute_grad=False)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match="labels must have shape"):
        compiled(args[0], args[1][:-1], args[2][:-1], args[3][:-1])
    assert graphs == []
    torch._dynamo.reset()


def test_compiles_without_graph_breaks():
    def step(logits, labels, old, adv, credit):
        out = fused_policy_loss(logits, labels, old, adv, credit=credit, group_penalty=0.5, eps_high=0.28)
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
