"""scripts/make_sft_data.py: NuminaMath-CoT rows as TRL prompt-completion examples under the paper's system
prompt, and the TRL command keeping the paper's batch of 80."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from capo_fast.data import DataError

SCRIPT = Path(__file__).parent.parent / "scripts" / "make_sft_data.py"
PAPER_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."  # DESIGN.md


@pytest.fixture(scope="module")
def sft():
    spec = importlib.util.spec_from_file_location("make_sft_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_sft_data"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def numina_row(i: int) -> dict:
    """A row of AI-MO/NuminaMath-CoT's shape: source, problem, solution and its own two-message chat."""
    problem, solution = (
        f"What is ${i}+1$?",
        f"Adding one to {i} gives {i + 1}.\n\nSo the answer is $\\boxed{{{i + 1}}}$.",
    )
    return {"source": "synthetic_math", "problem": problem, "solution": solution,
            "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": solution}]}  # fmt: skip


def test_rows_become_prompt_completion_examples_under_the_papers_system_prompt(sft, tmp_path):
    source = tmp_path / "numina.jsonl"
    source.write_text("".join(json.dumps(numina_row(i)) + "\n" for i in range(3)))
    assert sft.write_dataset(str(source), tmp_path / "out", limit=2) == 2
    lines = (tmp_path / "out" / "train.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {
            "prompt": [{"role": "system", "content": PAPER_SYSTEM_PROMPT},
                       {"role": "user", "content": f"What is ${i}+1$?"}],
            "completion": [{"role": "assistant",
                            "content": f"Adding one to {i} gives {i + 1}.\n\nSo the answer is $\\boxed{{{i + 1}}}$."}],
        }
        for i in range(2)
    ]  # fmt: skip
    assert sft.write_dataset(str(source), tmp_path / "all") == 3
    # TRL's script loads the folder with load_dataset(dataset_name) and trains on its train split
    from datasets import load_dataset

    train = load_dataset(str(tmp_path / "all"))["train"]
    assert len(train) == 3 and train[2]["prompt"][1]["content"] == "What is $2+1$?"


def test_a_bad_row_names_its_line_and_leaves_no_data(sft, tmp_path):
    source = tmp_path / "numina.jsonl"
    source.write_text(json.dumps(numina_row(0)) + "\n" + json.dumps({"problem": "x", "solution": " "}) + "\n")
    with pytest.raises(DataError, match=r"numina\.jsonl:2: no solution"):
        sft.write_dataset(str(source), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_trl_command_keeps_the_papers_lr_and_global_batch_of_80(sft, tmp_path):
    recipe = sft.SFTRecipe("Qwen/Qwen2.5-1.5B", "/models/sft", gpus=4, per_device_batch=10)
    command = sft.trl_command(tmp_path, recipe)
    assert command[:6] == ["accelerate", "launch", "--num_processes", "4", "-m", "trl.scripts.sft"]
    flags = dict(zip(command[6::], command[7::], strict=False))
    assert flags["--learning_rate"] == "1e-05" and flags["--dataset_name"] == str(tmp_path)
    assert int(flags["--per_device_train_batch_size"]) * int(flags["--gradient_accumulation_steps"]) * 4 == 80
    assert flags["--model_name_or_path"] == "Qwen/Qwen2.5-1.5B" and flags["--output_dir"] == "/models/sft"
    assert sft.SFTRecipe("m", "o", gpus=8, per_device_batch=10).accumulation() == 1
    with pytest.raises(ValueError, match="80 is not a multiple of 3 GPUs x 10"):
        sft.SFTRecipe("m", "o", gpus=3).accumulation()


def test_main_writes_the_data_prints_the_command_and_runs_it_only_when_asked(sft, tmp_path, monkeypatch, capsys):
    source = tmp_path / "numina.jsonl"
    source.write_text(json.dumps(numina_row(5)) + "\n")
    args = ["--source", str(source), "--out-dir", str(tmp_path / "d"), "--model", "m", "--output-dir", "o"]
    ran = []
    monkeypatch.setattr(sft.subprocess, "run", lambda cmd, check: ran.append(cmd) or type("R", (), {"returncode": 0}))
    assert sft.main(args) == 0 and ran == []
    out = capsys.readouterr().out
    assert "1 examples" in out and "accelerate launch --num_processes 8 -m trl.scripts.sft" in out
    monkeypatch.setattr(sft.importlib.util, "find_spec", lambda name: None)  # TRL not installed (as here)
    assert sft.main([*args, "--run"]) == 2 and "pip install trl" in capsys.readouterr().err and ran == []
    monkeypatch.setattr(sft.importlib.util, "find_spec", lambda name: object())
    assert sft.main([*args, "--run"]) == 0 and ran[0][:2] == ["accelerate", "launch"]
    assert sft.main([*args, "--gpus", "3"]) == 2 and "not a multiple" in capsys.readouterr().err
