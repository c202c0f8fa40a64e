"""The shortcut audit's figures: how often CITER's shortcut labels (cases 1 and 2) agree with what
rollouts say, from the labelled shards' audit columns (`collect.audit_rate`).

For an audited token both continuations are finished under the iteration's policy: from the
SLM's token and from the LLM's. The rollouts decide the token when at least one reaches the gold
answer: the SLM suffices (label 1) when its continuation does, else the LLM was needed (label 0).
Where neither reaches it, the token did not decide the answer and the rollouts say nothing about
it: such tokens are counted (`neither`) but left out of the agreement. Case 1 (shortcut label 1)
is wrong where only the LLM's continuation is right; case 2 (label 0) where the SLM's is right.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.statistics import wilson

AUDIT_COLUMNS = ["case", "token_id", "slm_token", "llm_token", "audit_slm_correct", "audit_llm_correct"]
SHORTCUT_LABEL = {1: 1, 2: 0}


def _audited(table: pa.Table) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """The audited rows, and their audit columns as arrays (with `disagree`)."""
    seen = table.filter(table.column("audit_slm_correct").is_valid())
    cols = {name: np.asarray(seen.column(name).to_pylist()) for name in AUDIT_COLUMNS}
    cols["disagree"] = disagreements(cols)
    return seen, cols


def disagreements(cols: dict[str, np.ndarray]) -> np.ndarray:
    """Per audited token, whether the rollouts decide it against its shortcut label."""
    s, llm_ok = cols["audit_slm_correct"].astype(bool), cols["audit_llm_correct"].astype(bool)
    return np.where(cols["case"] == 1, ~s & llm_ok, s)


def audit_summary(table: pa.Table) -> dict[str, dict[str, Any]]:
    """Per case ("1", "2") and both together ("all"): tokens audited, how many the rollouts
    decided, how many of those agree with the shortcut, the agreement with its 95% Wilson
    interval, tokens neither continuation got right, and tokens where the two models' tokens
    differ (elsewhere both continuations are one and the same)."""
    _, cols = _audited(table)
    s, llm_ok = cols["audit_slm_correct"].astype(bool), cols["audit_llm_correct"].astype(bool)
    decided = s | llm_ok
    out = {}
    for key, where in (("1", cols["case"] == 1), ("2", cols["case"] == 2), ("all", np.ones(len(s), dtype=bool))):
        n_decided = int((decided & where).sum())
        agree = int((decided & where & ~cols["disagree"]).sum())
        out[key] = {"audited": int(where.sum()), "decided": n_decided, "agree": agree,
                    "agreement": agree / n_decided if n_decided else None, "interval": wilson(agree, n_decided),
                    "neither": int((where & ~decided).sum()),
                    "models_differ": int((where & (cols["slm_token"] != cols["llm_token"])).sum())}
    return out


def audit_examples(table: pa.Table, references: dict[str, list[int]], tokenizer, limit: int = 20) -> list[dict]:
    """Up to `limit` audited tokens the rollouts decided against the shortcut, with their text:
    the reference before the token (its last 80 characters), the reference token and both
    models' tokens. `references`: each example's reference ids."""
    seen, cols = _audited(table)
    rows = [r for r, bad in zip(seen.select(["example_id", "position", *AUDIT_COLUMNS]).to_pylist(),
                                cols["disagree"], strict=True) if bad][:limit]
    text = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    return [{"example_id": r["example_id"], "position": r["position"], "case": r["case"],
             "shortcut_label": SHORTCUT_LABEL[r["case"]], "rollout_label": int(r["audit_slm_correct"]),
             "slm_continuation_correct": r["audit_slm_correct"], "llm_continuation_correct": r["audit_llm_correct"],
             "prefix": text(references[r["example_id"]][: r["position"]])[-80:],
             "reference_token": text([r["token_id"]]), "slm_token": text([r["slm_token"]]),
             "llm_token": text([r["llm_token"]])} for r in rows]


def audit_jsonl(examples: list[dict]) -> str:
    return "".join(json.dumps(e) + "\n" for e in examples)


def audit_text(summary: dict[str, dict[str, Any]]) -> str:
    """One line: each case's agreement, its interval and counts."""
    parts = []
    for key, name in (("1", "case 1 (SLM suffices)"), ("2", "case 2 (LLM needed)"), ("all", "both")):
        a = summary.get(key)
        if not a or not a["audited"]:
            continue
        if a["agreement"] is None:
            parts.append(f"{name}: {a['audited']} audited, none decided")
            continue
        lo, hi = a["interval"]
        parts.append(f"{name} {100 * a['agreement']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] of {a['decided']} "
                     f"decided ({a['audited']} audited, {a['neither']} with neither continuation right, "
                     f"{a['models_differ']} where the models' tokens differ)")
    return "shortcut audit, agreement with rollouts: " + ("; ".join(parts) if parts else "no token audited")
