"""Held-out evaluation: accuracy against the share of tokens the LLM produced, per method."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.decoding import greedy_generate
from pipeline.io import atomic_write_json
from pipeline.models import ModelPair, encode_prompts, load_pair
from pipeline.tasks import Example, is_correct, load_examples

log = logging.getLogger(__name__)


def evaluate_single_model(pair: ModelPair, which: str, examples: list[Example], cfg: Config) -> dict[str, Any]:
    """Greedy accuracy of the SLM alone (`which="slm"`) or the LLM alone (`"llm"`)."""
    tok = pair.tokenizer
    prompts = encode_prompts(tok, [ex.prompt for ex in examples], cfg.models.chat_template)
    model = pair.slm if which == "slm" else pair.llm
    t0 = time.perf_counter()
    outs = greedy_generate(model, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                           max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                           desc=f"decoding ({which} only)")
    seconds = time.perf_counter() - t0
    correct = sum(is_correct(cfg.task.format, tok.decode(o, skip_special_tokens=True), ex.answer)
                  for o, ex in zip(outs, examples, strict=True))
    n_tokens = sum(len(o) for o in outs)
    return {
        "method": which,
        "threshold": None,
        "llm_call_ratio": 1.0 if which == "llm" else 0.0,
        "accuracy": correct / len(examples),
        "n": len(examples),
        "generated_tokens": n_tokens,
        "tokens_per_s": n_tokens / seconds if seconds > 0 else None,
    }


def run_eval(cfg: Config, out_dir: str | Path) -> dict[str, Any]:
    """Evaluate the baselines on the held-out split; write `eval.json` under `out_dir`."""
    examples = load_examples(cfg.task, "eval", limit=cfg.eval.n_examples)  # bad data fails before loading models
    pair = load_pair(cfg.models)
    log.info("evaluating on %d held-out examples from %s", len(examples), cfg.task.eval_path)
    points = [evaluate_single_model(pair, which, examples, cfg) for which in ("slm", "llm")]
    result = {"config": cfg.name, "n_examples": len(examples), "points": points}
    out = Path(out_dir) / "eval.json"
    atomic_write_json(out, result)
    log.info("wrote %s", out)
    return result


def format_table(points: list[dict[str, Any]]) -> str:
    """The eval points as an aligned text table."""
    header = f"{'method':<12}{'threshold':>10}{'LLM tokens':>12}{'accuracy':>10}{'n':>6}{'tok/s':>9}"
    lines = [header, "-" * len(header)]
    for p in points:
        thr = "-" if p["threshold"] is None else f"{p['threshold']:.2f}"
        tps = "-" if p.get("tokens_per_s") is None else f"{p['tokens_per_s']:.0f}"
        lines.append(f"{p['method']:<12}{thr:>10}{100 * p['llm_call_ratio']:>11.1f}%{100 * p['accuracy']:>9.1f}%"
                     f"{p['n']:>6}{tps:>9}")
    return "\n".join(lines)
