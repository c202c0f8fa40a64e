"""Datasets -> `Example(id, prompt, reference, answer, labels)`, and answer extraction/scoring per task.

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
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline import CiterError
from pipeline.config import TaskConfig

CANONICAL_FIELDS = {
    "gsm8k": ("question", "answer"),
    "math": ("problem", "solution"),
    "mcq": ("question", "choices", "answerKey"),
}
DEFAULT_PROMPTS = {  # no trailing space: a BPE tokenizer would merge it into the answer's first token
    "gsm8k": "Question: {question}\nAnswer:\n",
    "math": "Problem: {question}\nSolution:\n",
    "mcq": "Question: {question}\n{choices}\nAnswer:\n",
}


@dataclass(frozen=True)
class Example:
    """One task instance. `reference` is the teacher-forced target; `answer` is what scoring compares;
    `labels` are a multiple-choice example's choice labels (None for other formats)."""

    id: str
    prompt: str
    reference: str
    answer: str
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.labels is not None:  # a JSON round trip gives a list; keep the Example hashable
            object.__setattr__(self, "labels", tuple(self.labels))


# ---------------------------------------------------------------------------------------------
# Answer normalisation and extraction (lm-evaluation-harness style: a strict match, then a
# flexible one for final evaluation only)


@dataclass(frozen=True)
class AnswerMatch:
    """An answer found in a response: its normalised `value`, its span `text[start:end]`, and the rule that found it."""

    value: str
    start: int
    end: int
    rule: str


# A number: thousands groups or plain digits, optional decimals; a '-' sign only when not glued to a word ("48-24").
_NUM = r"(?:(?<!\w)-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_STRICT = re.compile(rf"####\s*\\?\$?\s*({_NUM})")
_ANSWER_IS_NUMBER = re.compile(rf"(?i:\banswer\s+is\b)[\s:*]*\\?\$?\s*(?:\\boxed\{{\s*)?\\?\$?\s*({_NUM})")
_ANY_NUMBER = re.compile(rf"({_NUM})")
# Words allowed between "answer is" and a choice label: "The answer is also (C)", "answer is option B".
_FILLER = r"also|option|choice|therefore|thus|clearly|probably|likely|definitely"
_ALL_LABELS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + tuple("123456789")  # when an example's labels are unknown


def normalize_number(text: str) -> str | None:
    """'$1,234.00' -> '1234'; '1,234.50' -> '1234.5'; '-0.50' -> '-0.5'; None when `text` holds no single number."""
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


def _boxed_spans(text: str) -> list[tuple[int, int]]:
    """Spans of the contents of every `\\boxed{...}` (nested braces allowed), in order."""
    spans, start = [], text.find("\\boxed{")
    while start >= 0:
        i = start + len("\\boxed{")
        depth = 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                spans.append((i, j))
                break
        start = text.find("\\boxed{", i)
    return spans


def last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` (nested braces allowed), or None."""
    spans = _boxed_spans(text)
    return text[spans[-1][0] : spans[-1][1]].strip() if spans else None


def _normalize_expr(text: str) -> str:
    s = text.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("$", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    return re.sub(r"\s+", "", s)


def _boxed_number(content: str) -> str | None:
    """A number in `\\boxed{}`, allowing units and TeX spacing: '\\$18.00', '72 \\text{ clips}'."""
    return normalize_number(re.sub(r"\\(?:text|mbox)\{[^{}]*\}|\\[,!;]|\\(?=[$%])", "", content))


def _regex_match(pattern: re.Pattern, text: str, rule: str, *, last: bool = False) -> AnswerMatch | None:
    """The first (or last) match of `pattern`, its group 1 as the answer."""
    m = next(reversed(list(pattern.finditer(text))), None) if last else pattern.search(text)
    if m is None:
        return None
    return AnswerMatch(normalize_number(m.group(1)) or m.group(1), m.start(1), m.end(1), rule)


def _first_boxed_number(text: str) -> AnswerMatch | None:
    for s, e in _boxed_spans(text):
        if (value := _boxed_number(text[s:e])) is not None:
            return AnswerMatch(value, s, e, "boxed")
    return None


def _last_boxed_expr(text: str) -> AnswerMatch | None:
    if not (spans := _boxed_spans(text)):
        return None
    s, e = spans[-1]
    content = text[s:e].strip()
    return AnswerMatch(normalize_number(content) or _normalize_expr(content), s, e, "boxed")


def _find_number(task_format: str, text: str, flexible: bool) -> AnswerMatch | None:
    if task_format == "math":
        found = _last_boxed_expr(text) or _regex_match(_ANSWER_IS_NUMBER, text, "answer_is")
    else:
        found = (_regex_match(_STRICT, text, "strict") or _regex_match(_ANSWER_IS_NUMBER, text, "answer_is")
                 or _first_boxed_number(text))
    if found is None and flexible:
        found = _regex_match(_ANY_NUMBER, text, "flexible", last=True)
    return found


@lru_cache(maxsize=64)
def _choice_patterns(labels: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    """Patterns for "answer is (X)" / "Answer: X", a label ending the response, and any "(X)", for these labels.

    A bare label is matched case-sensitively and as a whole word, so the article "a" or "A good" after no cue
    and the pronoun "I" are not answers; a parenthesised one in any case."""
    alt = "|".join(re.escape(lab) for lab in sorted(labels, key=len, reverse=True))
    label = rf"(?:\((?i:(?P<p>{alt}))\)|(?P<b>{alt})\b)"
    answer_is = re.compile(rf"(?i:\banswer\s*(?:is\b|:))(?:\s*(?i:{_FILLER})\b)*[\s*:$]*(?:\\boxed\{{)?{label}")
    final = re.compile(rf"(?:^|(?<=[\s(*]))(?P<b>{alt})\)?[.*]*\s*\Z")
    paren = re.compile(rf"\((?i:(?P<p>{alt}))\)")
    return answer_is, final, paren


def _find_choice(text: str, labels: tuple[str, ...], flexible: bool) -> AnswerMatch | None:
    answer_is, final, paren = _choice_patterns(labels)
    m, rule = answer_is.search(text), "answer_is"
    if m is None and flexible:
        m, rule = final.search(text), "final"
        if m is None:
            m, rule = next(reversed(list(paren.finditer(text))), None), "paren"  # the last "(X)"
    if m is None:
        return None
    group = "p" if m.groupdict().get("p") else "b"
    return AnswerMatch(m.group(group).upper(), m.start(group), m.end(group), rule)


def find_answer(task_format: str, text: str, *, labels: Iterable[str] | None = None,
                flexible: bool = True) -> AnswerMatch | None:
    """The decisive answer in a response, with its span and rule; None when it gives none. Rules, in order:

    - gsm8k: "strict" the first `#### N`; "answer_is" the first "answer is N" (also "The final answer is
      $\\boxed{N}$."); "boxed" the first `\\boxed{}` holding a number; "flexible" the last number anywhere.
    - math: "boxed" the last `\\boxed{}` (an expression, normalised); "answer_is"; "flexible".
    - mcq: "answer_is" the first "answer is (X)", "answer is X" or "Answer: X" with X one of `labels`
      (a few words such as "also" or "option" may come between); "final" a label ending the response
      ("... is D."); "paren" the last "(X)" anywhere. A bare label counts only after the cue or at the very
      end, in upper case, as a whole word: the article "A" and the pronoun "I" in running text are no answer.

    `flexible=False` leaves out "flexible", "final" and "paren": what scoring a rollout uses.
    `labels` are a multiple-choice example's labels (`Example.labels`; default any of A-Z, 1-9)."""
    if task_format == "mcq":
        return _find_choice(text, tuple(str(lab).upper() for lab in labels or _ALL_LABELS), flexible)
    return _find_number(task_format, text, flexible)


def extract_answer(task_format: str, text: str, *, labels: Iterable[str] | None = None,
                   flexible: bool = True) -> str | None:
    """The answer a response gives, in the form `Example.answer` uses, or None."""
    m = find_answer(task_format, text, labels=labels, flexible=flexible)
    return m.value if m else None


def is_correct(task_format: str, generated: str, gold: str, *, labels: Iterable[str] | None = None,
               flexible: bool = True) -> bool:
    """Whether the generated response's answer equals the gold answer (no answer: wrong)."""
    pred = extract_answer(task_format, generated, labels=labels, flexible=flexible)
    return pred is not None and pred == gold


def score_rollout(task_format: str, prefix: str, continuation: str, gold: str, *,
                  labels: Iterable[str] | None = None) -> bool:
    """A rollout's outcome. Its response is the reference `prefix` followed by its own `continuation`; it is
    correct only when a strict rule finds the decisive answer, that answer ends inside the rollout's own
    text, and it equals `gold`. An answer wholly in the prefix, or a last-number guess, is never correct."""
    m = find_answer(task_format, prefix + continuation, labels=labels, flexible=False)
    return m is not None and m.end > len(prefix) and m.value == gold


# ---------------------------------------------------------------------------------------------
# Loading


def load_examples(cfg: TaskConfig, split: str, limit: int | None = None) -> list[Example]:
    """Examples of `split` ("train" or "eval") as the task config describes them."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    path = cfg.train_path if split == "train" else cfg.eval_path
    hub_split = cfg.train_split if split == "train" else cfg.eval_split
    rows, source = read_dataset_rows(path, subset=cfg.subset, split=hub_split)
    if not rows:
        raise CiterError(f"{source}: the dataset is empty (task.{split}_path)")
    if limit is not None:
        rows = rows[:limit]
    return [row_to_example(cfg, row, i, source, split) for i, row in enumerate(rows)]


def read_dataset_rows(path: str, subset: str | None = None, split: str = "train") -> tuple[list[dict], str]:
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


def strip_calculator(text: str) -> str:
    """GSM8K's answer without its calculator annotations (`<<48/2=24>>`)."""
    return re.sub(r"<<[^<>]*>>", "", text)


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
    labels: list[str] | None = None  # the choice labels, for multiple choice
    if cfg.format == "gsm8k":
        question, reference = _text(get("question"), where, "question"), _text(get("answer"), where, "answer")
        if cfg.strip_calculator:
            reference = strip_calculator(reference)
        column = cfg.fields.get("answer", "answer")
        if "####" not in reference:
            raise CiterError(f"{where}: field '{column}' has no '#### <number>' final answer")
        tail = reference.split("####", 1)[1]  # the first '####' decides, as in scoring
        gold = normalize_number(tail)
        if gold is None:
            raise CiterError(f"{where}: field '{column}': cannot read a number after '####' in {tail.strip()!r}")
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
    return Example(id=ex_id, prompt=prompt, reference=reference, answer=gold,
                   labels=labels)


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
