"""Prompt data: file loaders with row-level errors, offline generators, the resumable sampler."""

import json

import pytest

from capo_fast.data import DataError, Problem, PromptSampler, encode_prompts, load_problems


def test_jsonl_rows_and_aliases(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"question": "1+1?", "answer": 2}, {"problem": "2*3?", "gold": "6", "solution": "2*3=6"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_problems(str(path), size=0, seed=0) == [Problem("1+1?", "2"), Problem("2*3?", "6", "2*3=6")]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "x"', "train.jsonl:2: not valid JSON"),
        ('{"question": "x"}', "train.jsonl:2: no answer"),
        ('{"answer": "1"}', "train.jsonl:2: no question"),
        ("[1, 2]", "train.jsonl:2: expected an object"),
    ],
)
def test_bad_jsonl_row_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_problems(str(path), size=0, seed=0)


def test_parquet_and_saved_dataset(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["a", "b"], "answer": ["1", None]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: row 1: no answer"):
        load_problems(str(tmp_path / "t.parquet"), size=0, seed=0)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"question": ["q"], "answer": ["3"]}).save_to_disk(tmp_path / "saved")
    assert load_problems(str(tmp_path / "saved"), size=0, seed=0) == [Problem("q", "3")]


def test_unknown_sources_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_problems(str(tmp_path / "missing.jsonl"), size=0, seed=0)
    (tmp_path / "x.txt").write_text("q,a\n")
    with pytest.raises(DataError, match="unknown format"):
        load_problems(str(tmp_path / "x.txt"), size=0, seed=0)
    (tmp_path / "empty.csv").write_text("q,a\n")
    with pytest.raises(DataError, match="holds no rows"):
        load_problems(str(tmp_path / "empty.csv"), size=0, seed=0)
    with pytest.raises(DataError, match="gym:no_such_task"):
        load_problems("gym:no_such_task", size=4, seed=0)


def test_generated_tasks_are_deterministic_and_mixed():
    a = load_problems("gym:basic_arithmetic+gsm_symbolic", size=6, seed=3)
    b = load_problems("gym:basic_arithmetic+gsm_symbolic", size=6, seed=3)
    c = load_problems("gym:basic_arithmetic+gsm_symbolic", size=6, seed=4)
    assert a == b and a != c and len(a) == 6
    assert a[0].question.startswith("Calculate") and not a[1].question.startswith("Calculate")
    for p in a:
        float(p.answer)  # numeric answers the verifier can compare


def test_sampler_resumes_where_it_stopped():
    full = PromptSampler(7, seed=1)
    batches = [full.next_batch(3) for _ in range(5)]  # crosses epoch boundaries
    assert sorted(batches[0] + batches[1] + batches[2][:1]) == list(range(7))
    resumed = PromptSampler(7, seed=1)
    first = PromptSampler(7, seed=1)
    first.next_batch(3), first.next_batch(3)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.next_batch(3) for _ in range(3)] == batches[2:]
    with pytest.raises(DataError, match="different training set"):
        PromptSampler(8, seed=1).load_state_dict(first.state_dict())


def test_prompts_use_the_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = encode_prompts(tokenizer, [Problem("What is 2 + 3?", "5")], "Be brief.")[0]
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3+4?"}]


def test_chat_message_prompts_are_messages_not_text(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from capo_fast.data import prompt_messages

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": CHAT, "answer": "7"}) + "\n")
    (problem,) = load_problems(str(path), size=0, seed=0)
    assert problem.question == "What is 3+4?" and problem.messages == tuple(CHAT)
    assert prompt_messages(problem, "ignored: the data brings its own system prompt") == CHAT
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (ids,) = encode_prompts(tok, [problem], "x")
    text = tok.decode(ids)
    assert "What is 3+4?" in text and "[{'role'" not in text


def test_verl_parquet_rows_load_unchanged(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"data_source": "lighteval/MATH", "prompt": [CHAT[1]], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": "7"}, "extra_info": {"index": 0}}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    (problem,) = load_problems(str(tmp_path / "train.parquet"), size=0, seed=0)
    assert (problem.question, problem.answer, problem.data_source) == ("What is 3+4?", "7", "lighteval/MATH")


def test_trl_open_r1_rows_take_the_answer_from_the_solution(tmp_path):
    path = tmp_path / "numina.json"
    path.write_text(json.dumps([{"problem": "Find 3+4.", "solution": "Adding, $3+4=\\boxed{7}$."}]))
    (problem,) = load_problems(str(path), size=0, seed=0)
    assert problem.answer == "7" and problem.reference_solution == "Adding, $3+4=\\boxed{7}$."


def test_csv_and_dotted_keys(tmp_path):
    from capo_fast.data import DataKeys

    path = tmp_path / "t.csv"
    path.write_text("q,a\n1+1?,2\n2+2?,\n")
    with pytest.raises(DataError, match=r"t\.csv:3: no answer \(a"):
        load_problems(str(path), size=0, seed=0, keys=DataKeys(question="q", answer="a"))
    nested = tmp_path / "n.jsonl"
    nested.write_text(json.dumps({"input": {"text": "1+2?"}, "target": {"value": 3}}) + "\n")
    keys = DataKeys(question="input.text", answer="target.value")
    assert load_problems(str(nested), size=0, seed=0, keys=keys) == [Problem("1+2?", "3")]


def test_a_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"nobody-here/no-such-set@test: the hub dataset could not be loaded"):
        load_problems("nobody-here/no-such-set@test", size=0, seed=0)


def test_a_hub_source_names_its_config_and_split(monkeypatch):
    """`org/name[:config][@split]` reaches datasets.load_dataset as repo, config name and split."""
    import datasets

    calls = []

    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        return [{"problem": "1+1?", "answer": "2", "data_source": repo}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (p,) = load_problems("HuggingFaceH4/MATH-500@test", size=0, seed=0)
    load_problems("allenai/ai2_arc:ARC-Challenge@validation", size=0, seed=0)
    load_problems("openai/gsm8k:main", size=0, seed=0)
    assert calls == [("HuggingFaceH4/MATH-500", None, "test"), ("allenai/ai2_arc", "ARC-Challenge", "validation"),
                     ("openai/gsm8k", "main", "train")]  # fmt: skip
    assert (p.question, p.answer, p.data_source) == ("1+1?", "2", "HuggingFaceH4/MATH-500")


# A DAPO-Math-17k row as the dataset stores it (verl's shape; the wrapper as in its README's example rows).
DAPO_PROBLEM = "Find the largest possible real part of \\[(75+117i)z+\\frac{96+144i}{z}\\] for $|z|=4$."
DAPO_ROW = {
    "data_source": "math_dapo",
    "prompt": [{"role": "user", "content": (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        f"{DAPO_PROBLEM}\n\nRemember to put your answer on its own line after \"Answer:\".")}],
    "ability": "MATH",
    "reward_model": {"ground_truth": "540", "style": "rule-lighteval/MATH_v2"},
    "extra_info": {"index": "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"},
}  # fmt: skip


def test_dapo_instruction_wrapper_is_stripped_by_the_row_option(tmp_path):
    from capo_fast.data import DataKeys, prompt_messages

    path = tmp_path / "dapo.jsonl"
    plain = {"problem": "What is $1+1$?", "answer": "2"}  # a MATH500-shaped row read with the same keys
    path.write_text(json.dumps(DAPO_ROW) + "\n" + json.dumps(plain) + "\n")
    as_given, _ = load_problems(str(path), size=0, seed=0)
    assert as_given.question.startswith("Solve the following") and "Answer:" in as_given.question
    dapo, math = load_problems(str(path), size=0, seed=0, keys=DataKeys(instruction="dapo"))
    assert dapo.question == DAPO_PROBLEM and dapo.answer == "540" and dapo.data_source == "math_dapo"
    assert dapo.messages == ({"role": "user", "content": DAPO_PROBLEM},)  # what the policy reads too
    system = "Please reason step by step, and put your final answer within \\boxed{}."
    assert prompt_messages(dapo, system) == [
        {"role": "system", "content": system}, {"role": "user", "content": DAPO_PROBLEM}]  # fmt: skip
    assert (math.question, math.answer) == ("What is $1+1$?", "2")  # no wrapper: kept as it is
    with pytest.raises(DataError, match=r"data.strip_instruction: 'dapo2' is not one of \['dapo'\]"):
        load_problems(str(path), size=0, seed=0, keys=DataKeys(instruction="dapo2"))


def test_strip_instruction_is_a_validated_config_key(tmp_path):
    from capo_fast.config import Config, ConfigError

    config = Config()
    config.data.strip_instruction = "dapo"
    config.validate()
    config.data.strip_instruction = "Dapo"
    with pytest.raises(ConfigError, match="data.strip_instruction: must be one of"):
        config.validate()
