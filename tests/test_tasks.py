"""Tasks: rows -> Example, answer extraction and scoring, and errors naming file, row and field."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import CiterError
from pipeline.config import TaskConfig
from pipeline.tasks import (
    DEFAULT_PROMPTS,
    AnswerMatch,
    Example,
    extract_answer,
    find_answer,
    is_correct,
    last_boxed,
    load_examples,
    normalize_number,
    score_rollout,
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


@pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason="the shared GSM8K files are not beside this checkout")
def test_strict_extraction_reads_every_gsm8k_reference_answer():
    for split in ("train", "test"):
        for line in (GSM8K_DIR / f"{split}.jsonl").read_text().splitlines():
            reference = json.loads(line)["answer"]
            after = reference.split("####", 1)[1].strip()
            expected = after.replace(",", "")  # every gold answer is an integer, some with thousands commas
            assert expected.lstrip("-").isdigit(), after
            m = find_answer("gsm8k", reference, flexible=False)
            assert m is not None and m.rule == "strict" and m.value == expected, (reference, m)
            assert reference[m.start : m.end] == after


def test_normalize_number():
    assert normalize_number("$1,234.00") == "1234"
    assert normalize_number("1,234.50") == "1234.5"
    assert normalize_number("$18.00.") == "18"
    assert normalize_number(" 18 ") == "18"
    assert normalize_number("-0.50") == "-0.5"
    assert normalize_number("007") == "7"
    assert normalize_number("12.") == "12"
    assert normalize_number("72.0") == "72"
    assert normalize_number("12 apples") is None and normalize_number("") is None


COT = "Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72"


def test_gsm8k_strict_answer_is_the_first_hashes():
    m = find_answer("gsm8k", COT)
    assert m == AnswerMatch("72", 80, 82, "strict") and COT[80:82] == "72"
    # A model that runs on into a new few-shot question: the first '####' decides.
    run_on = "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18\n\nQuestion: How many? ... #### 42"
    assert extract_answer("gsm8k", run_on) == "18"
    assert extract_answer("gsm8k", "She pays 3 * $6 = $18.\n#### $18.00") == "18"
    assert extract_answer("gsm8k", "The total is 1,080 + 170 = 1,250.\n#### 1,250") == "1250"
    assert extract_answer("gsm8k", "It drops 5 degrees below zero.\n#### -5") == "-5"
    # pipeline/demo.py's column-addition outputs
    assert is_correct("gsm8k", "2+5+0=7:7 7+8+0=15:57 4+3+1=8:857 #### 857", "857")
    # '####' before "The answer is": the strict rule comes first wherever it is.
    assert extract_answer("gsm8k", "The answer is 5 apples, no wait.\n3 + 4 = 7\n#### 7") == "7"


def test_gsm8k_answer_is_and_boxed():
    llama = "Natalia sold 48/2 = 24 clips in May.\nIn total 48 + 24 = 72.\n\nThe final answer is $\\boxed{72}$."
    assert find_answer("gsm8k", llama) == AnswerMatch("72", llama.index("72}"), llama.index("72}") + 2, "answer_is")
    qwen = "First, 1000 + 234 = 1234.\nSo the answer is 1,234."
    m = find_answer("gsm8k", qwen, flexible=False)
    assert (m.value, m.rule, qwen[m.start : m.end]) == ("1234", "answer_is", "1,234")
    assert extract_answer("gsm8k", "Betty needs 100 - 50 - 15 - 30 = 5 more.\nThe answer is: $5.") == "5"
    assert extract_answer("gsm8k", "THE ANSWER IS 12.50 dollars") == "12.5"
    assert extract_answer("gsm8k", "the answer is not clear yet; 4 + 4 = 8") == "8"  # no number after the cue
    assert find_answer("gsm8k", "the answer is not clear yet; 4 + 4 = 8", flexible=False) is None
    # "\boxed{}" when there is no cue: the first one holding a number, units and "\$" allowed
    boxed = "Weng earns 12/60 = $0.2 per minute, so 0.2 * 50 = \\boxed{\\$10.00}. Check: \\boxed{10}"
    assert find_answer("gsm8k", boxed) == AnswerMatch("10", boxed.index("\\$10"), boxed.index("}."), "boxed")
    assert extract_answer("gsm8k", "He has \\boxed{72 \\text{ clips}}.") == "72"
    assert extract_answer("gsm8k", "We get \\boxed{1,000}. Done") == "1000"


def test_gsm8k_flexible_last_number_only_for_final_evaluation():
    text = "Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips."
    assert find_answer("gsm8k", text) == AnswerMatch("72", text.index("72"), text.index("72") + 2, "flexible")
    assert find_answer("gsm8k", text, flexible=False) is None
    assert is_correct("gsm8k", text, "72") and not is_correct("gsm8k", text, "72", flexible=False)
    assert extract_answer("gsm8k", "first 3, then 12.50 dollars") == "12.5"
    assert extract_answer("gsm8k", "It costs 48-24 = 24") == "24"  # a hyphen between numbers is no minus sign
    assert extract_answer("gsm8k", "no digits here") is None
    assert not is_correct("gsm8k", "no digits here", "0")


def test_score_rollout_counts_only_an_answer_in_the_rollouts_own_text():
    prefix = "Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n"
    assert score_rollout("gsm8k", prefix, "#### 72", "72")  # the rollout finishes the '####' line
    assert score_rollout("gsm8k", prefix + "#### 7", "2", "72")  # its own token completes the number
    assert not score_rollout("gsm8k", prefix + "#### 7", "3", "72")
    assert not score_rollout("gsm8k", prefix + "#### 7", "20", "72")  # 720
    # The gold number only in the prefix: a rollout that adds nothing, or restates, is not correct.
    assert not score_rollout("gsm8k", prefix + "#### 72", "", "72")
    assert not score_rollout("gsm8k", prefix + "#### 72", "\n\nQuestion: ... #### 72", "72")
    # The gold number only as an intermediate result: no last-number fallback for rollouts.
    assert not score_rollout("gsm8k", "Natalia sold 48/2 = ", "24 clips in May, and 48 + 24 = 72 in all.", "72")
    assert not score_rollout("gsm8k", "Natalia sold 48/2 = ", "24 clips in May.\n#### 24", "72")
    assert score_rollout("gsm8k", "Natalia sold 48/2 = ", "24 clips in May.\nSo the answer is 72.", "72")
    # A wrong strict answer first decides, however the rollout goes on.
    assert not score_rollout("gsm8k", "", "#### 70\nOops, 48 + 24 = 72.\n#### 72", "72")
    # Multiple choice: the reference "The answer is (B)." cut before the label.
    assert score_rollout("mcq", "Fish need water. The answer is (", "B).", "B", labels=["A", "B", "C"])
    assert not score_rollout("mcq", "Fish need water. The answer is (B", ").", "B", labels=["A", "B", "C"])
    assert not score_rollout("mcq", "Fish need water, so", " I pick B", "B", labels=["A", "B", "C"])  # only "final"


MMLU = ("A", "B", "C", "D")
CSQA = ("A", "B", "C", "D", "E")


def test_multiple_choice_answer_cues():
    assert find_answer("mcq", "Answer: (B) because fish live in water.", labels=CSQA) == AnswerMatch("B", 9, 10,
                                                                                                    "answer_is")
    assert extract_answer("mcq", "Option (A) is the sky. The answer is also (C).", labels=CSQA) == "C"
    assert extract_answer("mcq", "I think the answer is (C) because", labels=CSQA) == "C"
    assert extract_answer("mcq", "The answer is: (b).", labels=CSQA) == "B"
    assert extract_answer("mcq", "Thus, the answer is B.", labels=CSQA) == "B"
    assert extract_answer("mcq", "**Answer: D**", labels=MMLU) == "D"
    assert extract_answer("mcq", "The correct answer is option A, the mitochondria.", labels=MMLU) == "A"
    assert extract_answer("mcq", "The answer is $\\boxed{C}$", labels=MMLU) == "C"
    # MMLU has A-D: an "E" after the cue is not an answer; the next cue is.
    text = "Enzymes (E) are not listed. The answer is E.\nRe-reading the options, the answer is (B)."
    assert extract_answer("mcq", text, labels=MMLU) == "B"
    assert extract_answer("mcq", "The answer is E.", labels=MMLU) is None
    assert extract_answer("mcq", "The answer is E.", labels=CSQA) == "E"
    # The first cue decides (a model running on into another question).
    assert extract_answer("mcq", "The answer is (A).\n\nQuestion: ...\nThe answer is (D).", labels=MMLU) == "A"


def test_multiple_choice_article_and_pronoun_are_no_answer():
    # "A" the article and "I" the pronoun: never an answer. The label ending the response is ("final").
    m = find_answer("mcq", "I think A good choice is D", labels=CSQA)
    assert m == AnswerMatch("D", 25, 26, "final")
    assert find_answer("mcq", "I think A good choice is D", labels=CSQA, flexible=False) is None
    assert extract_answer("mcq", "A good choice is the sea, I believe.", labels=CSQA) is None
    assert extract_answer("mcq", "Clearly A is wrong, so", labels=CSQA) is None
    assert extract_answer("mcq", "the answer is a bit unclear", labels=CSQA) is None
    assert extract_answer("mcq", "I am not sure.", labels=tuple("ABCDEFGHIJ")) is None  # "I" is a label here
    # flexible fallbacks: a label ending the response, else the last "(X)" anywhere
    assert extract_answer("mcq", "Fish breathe with gills in water.\n(B)", labels=CSQA) == "B"
    assert extract_answer("mcq", "(B) sea, since fish live in water", labels=CSQA) == "B"
    assert extract_answer("mcq", "Not (A) sky; (C) sand is dry; so (B) sea.", labels=CSQA) == "B"
    assert extract_answer("mcq", "nothing useful", labels="ABC") is None
    assert not is_correct("mcq", "nothing useful", "A", labels="ABC")


def test_example_labels_survive_a_json_round_trip():
    ex = Example(id="q", prompt="p", reference="r", answer="B", labels=["A", "B"])
    again = Example(**json.loads(json.dumps(ex.__dict__)))
    assert again == ex and again.labels == ("A", "B") and hash(again) == hash(ex)
    assert Example(id="q", prompt="p", reference="r", answer="7").labels is None


def test_default_prompts_end_in_a_newline_not_a_space():
    for template in DEFAULT_PROMPTS.values():
        assert template.endswith("\n") and not template.endswith(" \n")


def test_math_format_of_the_citer_code(tmp_path):
    path = jsonl(tmp_path / "math.jsonl", [
        {"problem": "What is 1/2 + 1/4?", "solution": "Sum is $\\boxed{\\frac{3}{4}}$."},
        {"problem": "Compute 6*7.", "solution": "6*7 = \\boxed{42}"},
    ])
    ex = load_examples(task(path, "math"), "eval")
    assert ex[0].answer == "\\frac{3}{4}" and ex[1].answer == "42"
    assert ex[0].prompt == "Problem: What is 1/2 + 1/4?\nSolution:\n" and ex[0].labels is None
    assert last_boxed("\\boxed{\\frac{1}{2}} and \\boxed{x^{2}}") == "x^{2}"
    assert is_correct("math", "so the answer is \\boxed{42}", ex[1].answer)
    assert is_correct("math", "\\boxed{\\dfrac{3}{4}}", ex[0].answer)
    assert not is_correct("math", "\\boxed{41}", ex[1].answer)
    assert is_correct("math", "first \\boxed{41}, then corrected: \\boxed{42}", ex[1].answer)  # the last one
    assert is_correct("math", "6*7 = 42. The answer is 42.", ex[1].answer, flexible=False)


def test_multiple_choice_commonsenseqa_arc_and_mmlu_styles(tmp_path):
    path = jsonl(tmp_path / "csqa.jsonl", [
        {"question": "Where do fish live?", "choices": {"label": ["A", "B", "C"], "text": ["sky", "sea", "sand"]},
         "answerKey": "B"},
    ])
    ex = load_examples(task(path, "mcq"), "eval")[0]
    assert ex.answer == "B" and "(A) sky\n(B) sea\n(C) sand" in ex.prompt and ex.prompt.endswith("Answer:\n")
    assert ex.reference == "The answer is (B)." and ex.labels == ("A", "B", "C")
    assert is_correct("mcq", ex.reference, ex.answer, labels=ex.labels, flexible=False)
    assert is_correct("mcq", "Thus, the answer is (B).", ex.answer)
    mmlu = jsonl(tmp_path / "mmlu.jsonl", [{"question": "2+2?", "choices": ["3", "4"], "answer": 1}])
    ex = load_examples(task(mmlu, "mcq", fields={"answerKey": "answer"}), "eval")[0]
    assert "(B) 4" in ex.prompt and ex.answer == "B"  # MMLU's answer index 1 is choice B
    assert ex.labels == ("A", "B")


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
