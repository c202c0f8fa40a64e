"""Datasets -> `Example(id, prompt, reference, answer)`, and answer extraction/scoring per task.

Formats:
- ``gsm8k``: columns `question`, `answer` (a worked solution ending in `#### <number>`).
- ``math``: the public CITER code's math format, `problem`, `solution` with a final `\\boxed{}`.
- ``mcq``: `question`, `choices` (`{label: [...], text: [...]}`), `answerKey`.

`TaskConfig.fields` maps these canonical names to other column names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import CiterError
from pipeline.config import TaskConfig

CANONICAL_FIELDS = {
    "gsm8k": ("question", "answer"),
    "math": ("problem", "solution"),
    "mcq": ("question", "choices", "answerKey"),
}
DEFAULT_PROMPTS = {
    "gsm8k": "Question: {question}\nAnswer: ",
    "math": "Problem: {question}\nSolution: ",
    "mcq": "Question: {question}\n{choices}\nAnswer: ",
}


@dataclass(frozen=True)
class Example:
    """One task instance. `reference` is the teacher-forced target; `answer` is what scoring compares."""

    id: str
    prompt: str
    reference: str
    answer: str


# ---------------------------------------------------------------------------------------------
# Answer normalisation and extraction


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """'$1,234.00' -> '1234'; '-0.50' -> '-0.5'; None when `text` holds no single number."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    s = s.removesuffix("%")
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
        return None
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    neg = s.startswith("-")
    s = s.lstrip("-").lstrip("0") or "0"
    if s.startswith("."):
        s = "0" + s
    return "-" + s if neg and s != "0" else s


def last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` (nested braces allowed), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def extract_number_answer(text: str) -> str | None:
    """A math answer from generated text: after the last `####`, else the last `\\boxed{}`,
    else the last number in the text; normalised, or None."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        m = _NUMBER.search(tail)
        return normalize_number(m.group(0)) if m else None
    boxed = last_boxed(text)
    if boxed is not None:
        return normalize_number(boxed) or _normalize_expr(boxed)
    nums = _NUMBER.findall(text)
    return normalize_number(nums[-1]) if nums else None


def _normalize_expr(text: str) -> str:
    s = text.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("$", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    return re.sub(r"\s+", "", s)


_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-Za-z0-9])\)?", re.IGNORECASE)


def extract_choice(text: str, labels: Iterable[str] = "ABCDE") -> str | None:
    """A choice label from "the answer is (X)", else the first standalone label in the text."""
    labels = [str(lab) for lab in labels]
    m = _ANSWER_IS.search(text)
    if m and m.group(1).upper() in labels:
        return m.group(1).upper()
    for tok in re.findall(r"\b([A-Za-z0-9])\b", text):
        if tok in labels:
            return tok
    return None


def extract_answer(task_format: str, text: str) -> str | None:
    """The answer a generation gives, in the form `Example.answer` uses."""
    if task_format == "mcq":
        return extract_choice(text, _ALL_LABELS)
    return extract_number_answer(text)


_ALL_LABELS = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [str(d) for d in range(1, 10)]


def is_correct(task_format: str, generated: str, gold: str) -> bool:
    """Score only the newly generated text against the gold answer."""
    pred = extract_answer(task_format, generated)
    return pred is not None and pred == gold


# ---------------------------------------------------------------------------------------------
# Loading


def load_examples(cfg: TaskConfig, split: str, limit: int | None = None) -> list[Example]:
    """Examples of `split` ("train" or "eval") as the task config describes them."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    path = cfg.train_path if split == "train" else cfg.eval_path
    hub_split = cfg.train_split if split == "train" else cfg.eval_split
    rows, source = read_rows(path, subset=cfg.subset, split=hub_split)
    if not rows:
        raise CiterError(f"{source}: the dataset is empty (task.{split}_path)")
    if limit is not None:
        rows = rows[:limit]
    return [row_to_example(cfg, row, i, source, split) for i, row in enumerate(rows)]


def read_rows(path: str, subset: str | None = None, split: str = "train") -> tuple[list[dict], str]:
    """Rows of a local .json/.jsonl/.parquet file, or of a `datasets` dataset (hub id or folder)."""
    p = Path(path).expanduser()
    if p.is_file():
        return _read_file(p), str(p)
    source = f"{path} (split {split!r})"
    try:
        import datasets

        ds = datasets.load_dataset(path, subset, split=split)
    except Exception as e:  # datasets raises many types; the message is what matters
        raise CiterError(f"could not load dataset {source}: {type(e).__name__}: {e}") from None
    return [dict(r) for r in ds], source


def _read_file(p: Path) -> list[dict]:
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CiterError(f"{p}: line {n} is not valid JSON: {e.msg}") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CiterError(f"{p}: not valid JSON: {e}") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise CiterError(f"{p}: expected a JSON list of rows (or {{'data': [...]}})")
        return data
    raise CiterError(f"{p}: unsupported file type {suffix!r}; expected .json, .jsonl or .parquet")


def row_to_example(cfg: TaskConfig, row: dict, index: int, source: str, split: str) -> Example:
    """One dataset row -> `Example`, with errors naming the source, row and field."""
    where = f"{source}: row {index}"
    if not isinstance(row, dict):
        raise CiterError(f"{where}: expected a mapping of fields, got {type(row).__name__}")

    def get(name: str) -> Any:
        column = cfg.fields.get(name, name)
        if column not in row:
            mapped = f" (mapped from '{name}' by task.fields)" if column != name else ""
            raise CiterError(
                f"{where}: missing field '{column}'{mapped}; the row has: {', '.join(map(str, row))}. "
                f"Map other column names with task.fields.{name}=COLUMN"
            )
        return row[column]

    ex_id = str(row[cfg.fields["id"]]) if "id" in cfg.fields else f"{split}-{index:06d}"
    template = cfg.prompt_template or DEFAULT_PROMPTS[cfg.format]
    if cfg.format == "gsm8k":
        question, reference = _text(get("question"), where, "question"), _text(get("answer"), where, "answer")
        if cfg.strip_calculator:
            reference = re.sub(r"<<[^<>]*>>", "", reference)
        column = cfg.fields.get("answer", "answer")
        if "####" not in reference:
            raise CiterError(f"{where}: field '{column}' has no '#### <number>' final answer")
        gold = normalize_number(reference.rsplit("####", 1)[1])
        if gold is None:
            raise CiterError(f"{where}: field '{column}': cannot read a number after '####' "
                             f"in {reference.rsplit('####', 1)[1].strip()!r}")
        prompt = template.format(question=question)
    elif cfg.format == "math":
        question, reference = _text(get("problem"), where, "problem"), _text(get("solution"), where, "solution")
        boxed = last_boxed(reference)
        if boxed is None:
            raise CiterError(f"{where}: field '{cfg.fields.get('solution', 'solution')}' has no \\boxed{{...}} answer")
        gold = normalize_number(boxed) or _normalize_expr(boxed)
        prompt = template.format(question=question)
    else:
        question = _text(get("question"), where, "question")
        labels, texts = _choices(get("choices"), where)
        gold = str(get("answerKey")).strip().upper()
        if gold.isdigit() and gold not in labels and int(gold) < len(labels):  # MMLU: the answer is an index
            gold = labels[int(gold)]
        if gold not in labels:
            raise CiterError(f"{where}: field 'answerKey' is {gold!r}, not one of the choice labels {labels}")
        listing = "\n".join(f"({lab}) {txt}" for lab, txt in zip(labels, texts, strict=True))
        prompt = template.format(question=question, choices=listing)
        reference = f"The answer is ({gold})."
        if "reference" in cfg.fields:
            reference = _text(row.get(cfg.fields["reference"]), where, cfg.fields["reference"])
    if not reference.strip():
        raise CiterError(f"{where}: the reference answer is empty")
    return Example(id=ex_id, prompt=prompt, reference=reference, answer=gold)


def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise CiterError(f"{where}: field '{name}' must be text, got {type(value).__name__} {value!r}")
    return value


def _choices(value: Any, where: str) -> tuple[list[str], list[str]]:
    if isinstance(value, dict) and "label" in value and "text" in value:
        labels, texts = [str(x).strip().upper() for x in value["label"]], [str(x) for x in value["text"]]
    elif isinstance(value, list) and value:  # MMLU-style: a plain list of option texts
        labels, texts = [chr(ord("A") + i) for i in range(len(value))], [str(x) for x in value]
    else:
        raise CiterError(f"{where}: field 'choices' must be {{label: [...], text: [...]}} or a list of texts")
    if len(labels) != len(texts) or not labels:
        raise CiterError(f"{where}: field 'choices' has {len(labels)} labels but {len(texts)} texts")
    return labels, texts
