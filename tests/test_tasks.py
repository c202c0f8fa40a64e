"""Tasks: rows -> Example, answer extraction and scoring, and errors naming file, row and field."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import CiterError
from pipeline.config import TaskConfig
from pipeline.tasks import (
    extract_choice,
    extract_number_answer,
    is_correct,
    last_boxed,
    load_examples,
    normalize_number,
)
from tests.conftest import GSM8K_DIR


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task(path: Path, fmt: str = "gsm8k", **kw) -> TaskConfig:
    return TaskConfig(format=fmt, train_path=str(path), eval_path=str(path), **kw)


@pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason="the shared GSM8K files are not beside this checkout")
def test_every_gsm8k_row_loads_with_its_gold_number():
    rows, examples = [], []
    for split in ("train", "test"):
        path = GSM8K_DIR / f"{split}.jsonl"
        rows += [json.loads(line) for line in path.read_text().splitlines()]
        examples += load_examples(task(path), "train")
    assert len(examples) == len(rows) == 8792
    for row, ex in zip(rows, examples, strict=True):
        raw = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert float(ex.answer) == float(raw), (row, ex.answer)
        assert "<<" not in ex.reference and ex.prompt.startswith("Question: ")
        # The reference itself scores as correct through the generation-side extractor.
        assert is_correct("gsm8k", ex.reference, ex.answer)
    assert examples[0].answer == "72" and examples[0].id == "train-000000"


def test_normalize_number():
    assert normalize_number("$1,234.00") == "1234"
    assert normalize_number(" 18 ") == "18"
    assert normalize_number("-0.50") == "-0.5"
    assert normalize_number("007") == "7"
    assert normalize_number("12.") == "12"
    assert normalize_number("12 apples") is None and normalize_number("") is None


def test_number_extraction_prefers_hashes_then_boxed_then_last_number():
    assert extract_number_answer("so 3+4=7 #### 7\n") == "7"
    assert extract_number_answer("We get \\boxed{1,000}. Done") == "1000"
    assert extract_number_answer("first 3, then 12.50 dollars") == "12.5"
    assert extract_number_answer("no digits here") is None
    assert last_boxed("\\boxed{\\frac{1}{2}} and \\boxed{x^{2}}") == "x^{2}"


def test_math_format_of_the_citer_code(tmp_path):
    path = jsonl(tmp_path / "math.jsonl", [
        {"problem": "What is 1/2 + 1/4?", "solution": "Sum is $\\boxed{\\frac{3}{4}}$."},
        {"problem": "Compute 6*7.", "solution": "6*7 = \\boxed{42}"},
    ])
    ex = load_examples(task(path, "math"), "eval")
    assert ex[0].answer == "\\frac{3}{4}" and ex[1].answer == "42"
    assert ex[0].prompt == "Problem: What is 1/2 + 1/4?\nSolution: "
    assert is_correct("math", "so the answer is \\boxed{42}", ex[1].answer)
    assert is_correct("math", "\\boxed{\\dfrac{3}{4}}", ex[0].answer)
    assert not is_correct("math", "\\boxed{41}", ex[1].answer)


def test_multiple_choice_commonsenseqa_arc_and_mmlu_styles(tmp_path):
    path = jsonl(tmp_path / "csqa.jsonl", [
        {"question": "Where do fish live?", "choices": {"label": ["A", "B", "C"], "text": ["sky", "sea", "sand"]},
         "answerKey": "B"},
    ])
    ex = load_examples(task(path, "mcq"), "eval")[0]
    assert ex.answer == "B" and "(A) sky\n(B) sea\n(C) sand" in ex.prompt
    assert ex.reference == "The answer is (B)."
    assert extract_choice("I think the answer is (C) because", "ABC") == "C"
    assert extract_choice("The answer is: b.", "ABC") == "B"
    assert extract_choice("Clearly A is wrong, so", "ABC") == "A"  # first standalone label
    assert extract_choice("nothing useful", "ABC") is None
    assert is_correct("mcq", "Thus, the answer is (B).", ex.answer)
    mmlu = jsonl(tmp_path / "mmlu.jsonl", [{"question": "2+2?", "choices": ["3", "4"], "answer": 1}])
    ex = load_examples(task(mmlu, "mcq", fields={"answerKey": "answer"}), "eval")[0]
    assert "(B) 4" in ex.prompt and ex.answer == "B"  # MMLU's answer index 1 is choice B


def test_field_mapping_for_other_column_names(tmp_path):
    path = jsonl(tmp_path / "renamed.jsonl", [{"uid": "q-17", "q": "1+1?", "sol": "1+1=2 #### 2"}])
    ex = load_examples(task(path, fields={"question": "q", "answer": "sol", "id": "uid"}), "train")[0]
    assert (ex.id, ex.answer, ex.reference) == ("q-17", "2", "1+1=2 #### 2")


def test_parquet_and_datasets_folder_sources(tmp_path):
    rows = [{"question": f"{i}+1?", "answer": f"#### {i + 1}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert [e.answer for e in load_examples(task(tmp_path / "d.parquet"), "train")] == ["1", "2", "3"]
    folder = tmp_path / "hub_like"
    folder.mkdir()
    jsonl(folder / "train.jsonl", rows)
    cfg = TaskConfig(format="gsm8k", train_path=str(folder), eval_path=str(folder))
    assert [e.answer for e in load_examples(cfg, "train", limit=2)] == ["1", "2"]


def test_errors_name_file_row_and_field(tmp_path):
    path = jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "answer": "#### 1"}, {"question": "no answer here"}])
    with pytest.raises(CiterError) as e:
        load_examples(task(path), "train")
    assert f"{path}: row 1: missing field 'answer'" in str(e.value) and "task.fields.answer" in str(e.value)

    empty = jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(CiterError, match=r"empty\.jsonl: the dataset is empty"):
        load_examples(task(empty), "train")

    unparseable = jsonl(tmp_path / "gold.jsonl", [{"question": "q", "answer": "#### about ten"}])
    with pytest.raises(CiterError, match=r"gold\.jsonl: row 0: field 'answer': cannot read a number"):
        load_examples(task(unparseable), "train")

    no_hashes = jsonl(tmp_path / "nohash.jsonl", [{"question": "q", "answer": "it is 4"}])
    with pytest.raises(CiterError, match=r"row 0: field 'answer' has no '#### <number>'"):
        load_examples(task(no_hashes), "train")

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "a", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(CiterError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        load_examples(task(broken), "train")

    row = {"question": "q", "choices": {"label": ["A"], "text": ["x"]}, "answerKey": "Z"}
    mcq = jsonl(tmp_path / "mcq.jsonl", [row])
    with pytest.raises(CiterError, match="answerKey' is 'Z', not one of the choice labels"):
        load_examples(task(mcq, "mcq"), "train")

    with pytest.raises(CiterError, match="could not load dataset"):
        load_examples(task(tmp_path / "missing-dir"), "train")
