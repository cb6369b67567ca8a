"""Property tests of the data loader, one file format at a time: rows the test writes come back as the
same Problems, and a bad row among good ones is named by its file and line (or row)."""

import csv
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capo_fast.data import DataError, Problem, load_problems

# Text of any characters (no surrogates: they are not text, and are refused on their own); an answer
# has no backslash so that it never holds a \boxed{}.
CHARS = st.characters(blacklist_categories=("Cs",))
TEXT = st.text(CHARS, min_size=1, max_size=30).filter(lambda s: s.strip())
ANSWER_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\\"), min_size=1, max_size=12)
ANSWER = st.one_of(ANSWER_TEXT.filter(lambda s: s.strip()), st.integers(-(10**12), 10**12))
ROW = st.fixed_dictionaries({"question": TEXT, "answer": ANSWER, "solution": st.one_of(st.none(), TEXT)})
FORMATS = [".jsonl", ".json", ".csv", ".parquet"]
SINGLE_LINE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), min_size=1,
                      max_size=20).filter(lambda s: s.strip())  # fmt: skip
SMALL = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LARGE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write(path, rows, text_only=False):
    """`rows` in the file format `path` names, as another program would write them."""
    if text_only:  # CSV and parquet columns hold one type: answers as text
        rows = [{**r, "answer": str(r["answer"]) if isinstance(r["answer"], int) else r["answer"]} for r in rows]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), path)


def expected(row) -> Problem:
    return Problem(row["question"], str(row["answer"]), row["solution"])


def check_round_trip(tmp_path, suffix, rows):
    path = tmp_path / f"train{suffix}"
    write(path, rows, text_only=suffix in (".csv", ".parquet"))
    assert load_problems(str(path), size=0, seed=0) == [expected(r) for r in rows]


BAD_ANSWERS = [[], {"x": 1}, True, math.nan, " ", "\\boxed{ }", "\\boxed{}"]


def check_bad_row_named(tmp_path, suffix, rows, index, bad):
    """Row `index` replaced by a bad one: the error names its line (JSON Lines, CSV) or row (JSON, parquet)."""
    path = tmp_path / f"train{suffix}"
    rows = list(rows)
    rows.insert(index, {**rows[0], **bad})
    write(path, rows, text_only=suffix in (".csv", ".parquet"))
    where = {".jsonl": f"{path}:{index + 1}: ", ".json": f"{path}: row {index}: ",
             ".csv": f"{path}:{index + 2}: ", ".parquet": f"{path}: row {index}: "}[suffix]  # fmt: skip
    with pytest.raises(DataError) as err:
        load_problems(str(path), size=0, seed=0)
    assert str(err.value).startswith(where), (str(err.value), where)
    assert "blank" in str(err.value) or "must be text" in str(err.value), err.value


def bad_rows(suffix):
    if suffix in (".csv", ".parquet"):  # text columns: only text can be wrong
        answers = [a for a in BAD_ANSWERS if isinstance(a, str)]
    else:
        answers = BAD_ANSWERS
    return st.one_of(st.sampled_from(answers).map(lambda a: {"answer": a}), st.just({"question": " \t"}))


def rows_for(suffix):
    if suffix != ".csv":
        return st.lists(ROW, min_size=1, max_size=6)
    answer = st.one_of(SINGLE_LINE.filter(lambda s: "\\" not in s), st.integers())
    row = st.fixed_dictionaries(
        {"question": SINGLE_LINE, "answer": answer, "solution": st.one_of(st.none(), SINGLE_LINE)}
    )
    return st.lists(row, min_size=1, max_size=6)  # single-line fields: row i is line i + 2


@pytest.mark.parametrize("suffix", FORMATS)
@SMALL
@given(data=st.data())
def test_rows_come_back_as_written(tmp_path, suffix, data):
    check_round_trip(tmp_path, suffix, data.draw(st.lists(ROW, min_size=1, max_size=6)))


@pytest.mark.parametrize("suffix", FORMATS)
@SMALL
@given(data=st.data())
def test_a_bad_row_is_named_by_file_and_line(tmp_path, suffix, data):
    rows = data.draw(rows_for(suffix))
    index = data.draw(st.integers(0, len(rows)))
    check_bad_row_named(tmp_path, suffix, rows, index, data.draw(bad_rows(suffix)))


@SMALL
@given(st.lists(TEXT, min_size=1, max_size=4), ANSWER)
def test_content_parts_are_their_texts_joined(tmp_path, texts, answer):
    path = tmp_path / "train.jsonl"
    content = [{"type": "text", "text": t} for t in texts]
    write(path, [{"prompt": [{"role": "user", "content": content}], "answer": answer}])
    (problem,) = load_problems(str(path), size=0, seed=0)
    assert problem.question == "\n".join(texts) and problem.answer == str(answer)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", FORMATS)
@LARGE
@given(data=st.data())
def test_many_files_round_trip_and_name_their_bad_rows(tmp_path, suffix, data):
    check_round_trip(tmp_path, suffix, data.draw(st.lists(ROW, min_size=1, max_size=12)))
    rows = data.draw(rows_for(suffix))
    index = data.draw(st.integers(0, len(rows)))
    check_bad_row_named(tmp_path, suffix, rows, index, data.draw(bad_rows(suffix)))
