"""The README's kernel example runs as written, and its commands are the ones CI and make use."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_kernel_example_runs_and_its_losses_are_the_formulas(capsys):
    import pytest
    import torch

    from capo_fast.kernels import reference

    code = re.search(r"## Use the kernel in your own RL code\n.*?```python\n(.*?)```", README, re.S).group(1)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    loss, *_ = capsys.readouterr().out.split()
    x = {k: ns[k].detach().double() for k in ("logits", "old_logprobs", "advantages", "credit", "weights")}
    kw = dict(credit=x["credit"], group_penalty=0.5, loss_weights=x["weights"], eps_high=0.28)
    expected = reference.policy_loss(x["logits"], ns["labels"], x["old_logprobs"], x["advantages"], **kw)[0]
    assert float(loss) == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    # GSPO with one advantage per sequence: -mean_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t log-ratio)
    logits = ns["hidden"].detach().double() @ ns["lm_head"].detach().double().T
    log_ratio = reference.token_logprobs_and_entropy(logits, ns["labels"])[0] - x["old_logprobs"]
    s = torch.stack([log_ratio[ns["seq_ids"] == i].mean().clamp(-20, 20).exp() for i in range(2)])
    a = torch.tensor([0.8, -0.4], dtype=torch.float64)
    gspo = -torch.minimum(s * a, s.clamp(1 - 3e-4, 1 + 4e-4) * a).mean()
    assert ns["gspo"].loss.item() == pytest.approx(gspo.item(), rel=1e-5, abs=1e-6)
    # the per-token outputs too: the fused loss's log-probs and entropy, and the linear log-prob op's
    logp, entropy = reference.token_logprobs_and_entropy(x["logits"], ns["labels"])
    torch.testing.assert_close(ns["out"].logprobs.double(), logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ns["out"].entropy.double(), entropy, atol=1e-5, rtol=1e-5)
    logp, entropy = reference.token_logprobs_and_entropy(logits, ns["labels"])
    torch.testing.assert_close(ns["logp"].double(), logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ns["entropy"].double(), entropy, atol=1e-5, rtol=1e-5)


def test_first_lines_are_the_train_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make train")
    assert first_block.splitlines()[1].startswith("make test")
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    # the default run leaves the slow set to its own command
    makefile = (ROOT / "Makefile").read_text()
    assert '-m "not slow"' in makefile.split("\ntest:")[1].split("\n\n")[0]
    assert "-m slow" in makefile.split("\ntest-slow:")[1]
    assert "deepspeed capo_fast/train.py" in (ROOT / "Makefile").read_text()
