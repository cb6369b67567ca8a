"""The README's kernel example runs as written, and its commands are the ones CI and make use."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_kernel_example_runs(capsys):
    code = re.search(r"## Use the kernel in your own RL code\n.*?```python\n(.*?)```", README, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    loss, *_ = capsys.readouterr().out.split()
    assert float(loss) == float(loss)  # printed a number, not nan


def test_first_lines_are_the_train_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make train")
    assert first_block.splitlines()[1].startswith("make test")
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "deepspeed capo_fast/train.py" in (ROOT / "Makefile").read_text()
