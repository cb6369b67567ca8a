"""The GPU configs against what reproducing the paper needs: its seven evaluation sets as sources the loader
reads, MATH500 in training, at least one epoch of the RL data with the best checkpoint kept, and the batch
reading stated with G-Core's as a one-line override. No network: hub loads are answered by rows of each set's
shape."""

import json
import shlex
from pathlib import Path

import pytest

from capo_fast.config import load_config
from capo_fast.data import HUB_SOURCE, ROW_READERS
from capo_fast.scoring import load_set, parse_sets

ROOT = Path(__file__).parent.parent
GPU_CONFIGS = sorted((ROOT / "configs").glob("gpu-*.yaml")) + sorted((ROOT / "configs").glob("node-*.yaml"))
PAPER_CONFIGS = [p for p in GPU_CONFIGS if p.name.startswith("gpu-")]

# Prompts in the RL sets (DESIGN.md's table of the paper's setups).
DATASET_SIZES = {"math": 7500, "dapo-math": 9800}

# The paper's evaluation sets (section 4.1): where each lives, (repo, config, split) of its hub copy or None for
# a local file, and one row of that set's shape (its dataset card's columns) with the answer it must yield (for
# multiple choice, the text of the correct option).
GAS = ["ice", "stone", "steam", "wood"]
BENCHMARKS = {
    "math500": (
        ("HuggingFaceH4/MATH-500", None, "test"),
        {"problem": "What is $1+1$?", "solution": "So $1+1=\\boxed{2}$.", "answer": "2", "subject": "Algebra",
         "level": 1, "unique_id": "test/algebra/1.json"},
        "2",
    ),
    "olympiadbench": (  # a local jsonl with answer = final_answer[0] (the config's comment says why)
        None, {"question": "Find $x$ if $2x=1$.", "answer": "$\\frac{1}{2}$"}, "$\\frac{1}{2}$",
    ),
    "aime24": (
        ("HuggingFaceH4/aime_2024", None, "train"),
        {"id": 60, "problem": "Find $n$.", "solution": "...", "answer": "204", "url": "https://x", "year": "2024"},
        "204",
    ),
    "amc23": (("math-ai/amc23", None, "test"), {"id": 0, "question": "Find $m+n$.", "answer": "27"}, "27"),
    "gpqa_diamond": (
        ("Idavidrein/gpqa", "gpqa_diamond", "train"),
        {"Question": "Which is a gas?", "Correct Answer": "steam", "Incorrect Answer 1": "ice",
         "Incorrect Answer 2": "stone", "Incorrect Answer 3": "wood", "Subdomain": "Chemistry"},
        "steam",
    ),
    "arc_c": (
        ("allenai/ai2_arc", "ARC-Challenge", "test"),
        {"id": "Mercury_1", "question": "Which is a gas?", "choices": {"text": GAS, "label": list("ABCD")},
         "answerKey": "C"},
        "steam",
    ),
    "mmlu_pro": (
        ("TIGER-Lab/MMLU-Pro", None, "test"),
        {"question_id": 70, "question": "Which is a gas?", "options": [*GAS, "glass", "salt"], "answer": "C",
         "answer_index": 2, "cot_content": "", "category": "chemistry", "src": "ori_mmlu-chemistry"},
        "steam",
    ),
}  # fmt: skip


def _config(path: Path, overrides: list[str] = ()):
    return load_config(path, list(overrides))


@pytest.fixture(autouse=True)
def _repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # deepspeed_config paths are relative to the repository


def _correct_text(problem) -> str:
    line = next(ln for ln in problem.question.splitlines() if ln.startswith(f"{problem.answer}. "))
    return line[3:]


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_configs_list_the_papers_seven_sets_as_sources_the_loader_reads(path, monkeypatch, tmp_path):
    import datasets

    sets = parse_sets(_config(path).eval.benchmarks)
    assert sorted(sets) == sorted(BENCHMARKS)
    calls = []

    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        return [next(row for hub, row, _ in BENCHMARKS.values() if hub == (repo, config, split))]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for name, source in sets.items():
        hub, row, expected = BENCHMARKS[name]
        if hub is None:  # a local file: a format the loader reads, loaded from a copy of the same name
            assert Path(source).is_absolute() and Path(source).suffix in ROW_READERS, (name, source)
            local = tmp_path / Path(source).name
            local.write_text(json.dumps(row) + "\n")
            source = str(local)
        else:
            match = HUB_SOURCE.match(source)
            assert match and (match["repo"], match["config"], match["split"]) == hub, (name, source)
        (problem,) = load_set(source, seed=0)
        got = _correct_text(problem) if problem.multiple_choice else problem.answer
        assert got == expected, name
        assert problem.multiple_choice == (name in ("gpqa_diamond", "arc_c", "mmlu_pro")), name
    assert sorted(calls) == sorted(hub for hub, _, _ in BENCHMARKS.values() if hub)


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_training_evaluates_on_math500_and_keeps_the_best_checkpoint(path):
    c = _config(path)
    assert c.data.eval == "HuggingFaceH4/MATH-500@test" and c.data.num_eval >= 500
    assert c.checkpoint.keep_best and 1 <= c.eval.every < c.trainer.steps  # evaluations, so a best exists


def _rl_data(config) -> str:
    (data,) = [name for name in DATASET_SIZES if f"/{name}/" in config.data.train]
    return data


def _override_line(path: Path) -> list[str]:
    """The header's G-Core override: the comment line that sets trainer.prompts_per_step=192."""
    lines = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#   --trainer.prompts_per_step")]
    assert len(lines) == 1, path
    return shlex.split(lines[0])


def _launch_world(path: Path) -> int:
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("# deepspeed"))
    argv = shlex.split(line[2:])
    return int(argv[argv.index("--num_gpus") + 1]) if "--num_gpus" in argv else 1


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_configs_train_at_least_one_epoch_of_their_data_under_either_batch_reading(path):
    c = _config(path)
    size = DATASET_SIZES[_rl_data(c)]
    assert c.trainer.steps * c.trainer.prompts_per_step / size >= 1
    g = _config(path, _override_line(path))  # G-Core: 192 prompts for rollouts, 192 samples per optimizer step
    assert g.trainer.prompts_per_step == 192
    assert g.trainer.prompts_per_step * g.rollout.n / g.trainer.mini_batches == 192
    assert g.trainer.steps * g.trainer.prompts_per_step / size >= 1
    assert 1 <= g.eval.every < g.trainer.steps and g.checkpoint.every <= g.trainer.steps
    g.check_world_size(_launch_world(path))


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.name)
def test_paper_configs_state_their_batch_reading(path):
    c = _config(path)
    assert c.trainer.prompts_per_step * c.rollout.n / c.trainer.mini_batches == 192  # 12 x 16, one step
    text = " ".join(ln.lstrip("# ") for ln in path.read_text().splitlines() if ln.startswith("#"))
    assert f"read as {c.trainer.prompts_per_step} prompts x 16 rollouts = 192 responses a step" in text
    assert "G-Core" in text and "counts prompts for rollouts and samples for training" in text


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_dapo_math_configs_strip_its_instruction_wrapper(path):
    c = _config(path)
    assert c.data.strip_instruction == ("dapo" if _rl_data(c) == "dapo-math" else "")


def test_evaluate_takes_the_sets_and_system_prompt_from_a_config():
    from capo_fast.evaluate import _from_config, parse_args

    path = ROOT / "configs" / "gpu-qwen2.5-7b.yaml"
    args = _from_config(parse_args(["--model", "m", "--config", str(path)]))
    assert sorted(parse_sets(args.sets)) == sorted(BENCHMARKS)
    assert args.system_prompt == "Please reason step by step, and put your final answer within \\boxed{}."
    mine = _from_config(parse_args(["--model", "m", "--config", str(path), "--sets", "a=b.jsonl"]))
    assert mine.sets == ["a=b.jsonl"]
    # an empty --system-prompt means none (the chain policy saw its questions alone), with a config or without
    assert _from_config(parse_args(["--model", "m", "--config", str(path), "--system-prompt", ""])).system_prompt == ""
    assert _from_config(parse_args(["--model", "m", "--sets", "a=b", "--system-prompt", ""])).system_prompt == ""
    assert _from_config(parse_args(["--model", "m", "--sets", "a=b"])).system_prompt.startswith("Please reason")
