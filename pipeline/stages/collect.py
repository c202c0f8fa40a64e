"""The collect stage: examples -> Ray Data -> labelling actors -> one Parquet shard per example block.

Examples are sorted by id and cut into shards of `collect.shard_size`. One Ray Data row is one
shard, so the shards are deterministic by example id. A `TokenLabeler` actor loads the SLM, the
LLM and the current router once, then for each shard:
- labels every reference token;
- writes `part-NNNNN.parquet` under a temporary name and renames it into place;
- returns only the counts.

The driver skips shards already on disk, and writes `_DONE` with the counts last. A rerun after
an interruption therefore writes exactly the rows an uninterrupted run would have written.

Iteration 0 rolls out case-3 tokens with the SLM alone. Iteration k >= 1 copies iteration 0's
case 1-2 rows and redoes only the case-3 rollouts, under the router of iteration k-1 at
`collect.threshold`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import CiterError
from pipeline.atomic import atomic_write_json, atomic_write_text, atomic_writer
from pipeline.audit import AUDIT_COLUMNS, audit_examples, audit_jsonl, audit_summary
from pipeline.config import Config, from_dict
from pipeline.raysession import shards_on_actors
from pipeline.rundir import (
    AUDIT_JSONL,
    DONE,
    RUN_JSON,
    collect_dir,
    iteration_dir,
    read_collect_summary,
    router_dir,
    shard_path,
)
from pipeline.shards import labels_table, read_labels, read_shard, shard_reads
from pipeline.storage import StoragePath, arrow_paths, location_text, run_path
from pipeline.tasks import Example, load_examples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def plan_shards(examples: list[Example], shard_size: int) -> list[list[Example]]:
    """Examples sorted by id, cut into consecutive shards of `shard_size`."""
    ordered = sorted(examples, key=lambda ex: ex.id)
    return [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)]


# ---------------------------------------------------------------------------------------------
# Labelling one shard


def label_shard(pair, cfg: Config, examples: list[Example], policy, previous: pa.Table | None,
                on_examples: Callable[[int], Any] | None = None) -> tuple[pa.Table, dict[str, int]]:
    """Label one shard. Without `previous`, from scratch (teacher-forced pass + rollouts); with
    iteration 0's rows as `previous`, keep their case 1-2 rows and redo the case-3 rollouts.
    Returns the table and its counts (`case3_dropped`, `rollouts_unfinished`). `on_examples(n)`
    hears of the examples whose case-3 rollouts are done, as they finish."""
    from pipeline.decoding import settings
    from pipeline.labelling import label_examples, teacher_forced

    c = cfg.collect
    kw = dict(task_format=cfg.task.format, policy=policy, max_new_tokens=c.max_new_tokens, batch_size=c.batch_size,
              decoding=settings(cfg.decode))
    features = tuple(cfg.router.features)
    if previous is None:
        tf = teacher_forced(pair, examples, chat_template=cfg.models.chat_template,
                            system_prompt=cfg.task.system_prompt, batch_size=c.batch_size, features=features,
                            top_k=min(cfg.router.top_k, pair.n_ids or cfg.router.top_k))
        labels, counts = label_examples(pair, examples, tf, max_rollouts=c.max_rollouts_per_example,
                                        case3_labels=c.case3_labels, audit_rate=c.audit_rate, audit_seed=cfg.seed,
                                        on_examples=on_examples, **kw)
        return labels_table(labels, features, audit=c.audit_rate > 0), counts
    return relabel_shard(pair, cfg, examples, previous, kw, on_examples)


def relabel_shard(pair, cfg: Config, examples: list[Example], previous: pa.Table, rollout_kw: dict[str, Any],
                  on_examples: Callable[[int], Any] | None = None) -> tuple[pa.Table, dict[str, int]]:
    """Iteration k >= 1: iteration 0's rows with the case-3 rollouts and the audit's redone under
    this iteration's policy (`rollout_kw`)."""
    from pipeline.labelling import NEEDS_ROLLOUT, AuditToken, Rollout, audit_rollouts, encode_reference, run_rollouts

    c = cfg.collect
    rows = previous.to_pylist()
    counts = {"case3_dropped": int((previous.schema.metadata or {}).get(b"case3_dropped", 0)),
              "rollouts_unfinished": 0}
    redo = [k for k, r in enumerate(rows) if r["case"] == NEEDS_ROLLOUT] if c.case3_labels == "rollout" else []
    audited = [k for k, r in enumerate(rows) if r.get("audit_slm_correct") is not None]
    by_id = {ex.id: ex for ex in examples}
    encoded = {ex_id: encode_reference(pair.tokenizer, by_id[ex_id], chat_template=cfg.models.chat_template,
                                       end_id=pair.end_of_turn_id, system_prompt=cfg.task.system_prompt)
               for ex_id in {rows[k]["example_id"] for k in redo + audited}}
    gold = lambda k: (by_id[rows[k]["example_id"]].answer, by_id[rows[k]["example_id"]].labels)  # noqa: E731
    rollouts = [Rollout(*encoded[rows[k]["example_id"]], rows[k]["position"], rows[k]["slm_token"], *gold(k))
                for k in redo]
    outcomes, counts["rollouts_unfinished"] = run_rollouts(pair, rollouts, **rollout_kw, on_examples=on_examples)
    for k, correct in zip(redo, outcomes, strict=True):
        rows[k]["rollout_correct"], rows[k]["label"] = correct, int(correct)
    audits, counts["audit_rollouts_unfinished"] = audit_rollouts(pair, [AuditToken(
        *encoded[rows[k]["example_id"]], rows[k]["position"], rows[k]["slm_token"], rows[k]["llm_token"], *gold(k))
        for k in audited], **rollout_kw)
    for k, (slm_ok, llm_ok) in zip(audited, audits, strict=True):
        rows[k]["audit_slm_correct"], rows[k]["audit_llm_correct"] = slm_ok, llm_ok
    return pa.Table.from_pylist(rows, schema=previous.schema.remove_metadata()), counts


class TokenLabeler:
    """Ray Data actor: holds the SLM, the LLM and the current router; labels whole shards, telling
    the driver's progress (`tally`, a raysession.Tally) of each example as its rollouts finish."""

    def __init__(self, config: dict, run: str, iteration: int, threads: int = 1, tally: Any = None):
        import torch

        from pipeline.decoding import RouterPolicy, SLMOnly
        from pipeline.models import load_pair
        from pipeline.router import load_router

        torch.set_num_threads(max(1, threads))
        self.cfg = from_dict(Config, config, source=f"{run}/{RUN_JSON}")
        self.run, self.iteration = run_path(run), iteration
        self.pair = load_pair(self.cfg.models)
        if iteration == 0:
            self.policy = SLMOnly()
        else:
            router = load_router(router_dir(run, iteration - 1), expected_input_size=self.pair.hidden_size,
                                 device=self.pair.device)
            self.policy = RouterPolicy(router.router, self.cfg.collect.threshold)
        self.tally = tally

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"shard": [], "rows": [], "seconds": []}
        for shard, payload in zip(batch["shard"], batch["examples"], strict=True):
            t0 = time.perf_counter()
            examples = [Example(**e) for e in json.loads(payload)]
            previous = None
            if self.iteration > 0:
                previous = read_shard(shard_path(collect_dir(self.run, 0), int(shard)))
            table, counts = self.label(examples, previous)
            table = table.replace_schema_metadata({k: str(v) for k, v in counts.items()})
            target = shard_path(collect_dir(self.run, self.iteration), int(shard))
            with atomic_writer(target) as tmp:
                pq.write_table(table, tmp)
            for key, value in (("shard", int(shard)), ("rows", table.num_rows), ("seconds", time.perf_counter() - t0)):
                out[key].append(value)
        return out

    def label(self, examples: list[Example], previous: pa.Table | None) -> tuple[pa.Table, dict[str, int]]:
        """`label_shard`, telling the tally of each example as its rollouts finish, and of the
        examples without rollouts at the end."""
        if self.tally is None:
            return label_shard(self.pair, self.cfg, examples, self.policy, previous)
        told = 0

        def tell(n: int) -> None:
            nonlocal told
            told += n
            self.tally.add.remote(n)

        labelled = label_shard(self.pair, self.cfg, examples, self.policy, previous, on_examples=tell)
        self.tally.add.remote(len(examples) - told)
        return labelled


# ---------------------------------------------------------------------------------------------
# The stage


def label_counts(cfg: Config, run: StoragePath, iteration: int, references: dict[str, list[int]],
                 tok: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What the stage's shards hold: rows, cases, label share, the counts the shards' metadata
    carry, and the shortcut audit's figures (its disagreements written to audit.jsonl)."""
    files = sorted(collect_dir(run, iteration).glob("part-*.parquet"))
    wheres, fs = arrow_paths(files)
    counted = [pq.read_schema(w, filesystem=fs).metadata or {} for w in wheres]
    total = lambda key: sum(int(m.get(key.encode(), b"0")) for m in counted)  # noqa: E731
    audit_rate = cfg.collect.audit_rate
    table = read_labels(run, iteration, columns=["label", *(AUDIT_COLUMNS if audit_rate > 0 else ["case"])])
    cases = np.asarray(table.column("case"))
    audit = audit_summary(table) if audit_rate > 0 else None
    if audit is not None:
        atomic_write_text(iteration_dir(run, iteration) / AUDIT_JSONL,
                          audit_jsonl(audit_examples(table, references, tok)))
    return {
        "rows": table.num_rows,
        "cases": {str(c): int((cases == c).sum()) for c in (1, 2, 3)},
        "rollout_share": float((cases == 3).mean()) if len(cases) else 0.0,
        "label_1_share": float(np.asarray(table.column("label")).mean()) if len(cases) else 0.0,
        "case3_dropped_by_cap": total("case3_dropped"),
        "case3_labels": cfg.collect.case3_labels,
        "rollouts_unfinished": total("rollouts_unfinished"),
        "audit": audit,
        "audit_rollouts_unfinished": total("audit_rollouts_unfinished"),
    }


def encode_references(cfg: Config, examples: list[Example], tok: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """Each example's reference ids (`labelling.encode_reference`), refusing, before any actor
    starts, an example whose prompt + reference is empty or does not fit the models' context: the
    labelling core's own check, with the tokenizer and configs only. The shortcut audit's text
    reads the same ids."""
    from transformers import AutoConfig

    from pipeline.labelling import context_length, encode_reference
    from pipeline.models import end_of_turn_id

    end_id = end_of_turn_id(tok, cfg.models.chat_template)
    limit = context_length(*(AutoConfig.from_pretrained(name, trust_remote_code=cfg.models.trust_remote_code)
                             for name in (cfg.models.slm, cfg.models.llm)))
    references = {}
    for ex in examples:
        try:
            references[ex.id] = encode_reference(tok, ex, chat_template=cfg.models.chat_template, end_id=end_id,
                                                 max_length=limit, system_prompt=cfg.task.system_prompt)[1]
        except CiterError as e:
            raise CiterError(f"{cfg.task.train_path}: {e}; shorten or drop that row") from None
    return references


def run_collect(cfg: Config, run: str | StoragePath, iteration: int) -> dict[str, Any]:
    """Label the training examples for `iteration` into Parquet shards; return the summary in _DONE."""
    started = time.perf_counter()
    run = run_path(run)
    out_dir = collect_dir(run, iteration)
    done = out_dir / DONE
    if done.is_file():
        if all(shard_reads(f) for f in out_dir.glob("part-*.parquet")):
            log.info("collect stage of iteration %d is complete (%s); skipping", iteration, done)
            return read_collect_summary(done)
        done.unlink()  # a shard was damaged after the stage finished: label it again below
    if iteration > 0 and not (collect_dir(run, 0) / DONE).is_file():
        raise CiterError(f"iteration {iteration} reuses iteration 0's labels, but {collect_dir(run, 0)} "
                         "is not complete")
    if iteration > 0 and not router_dir(run, iteration - 1).is_dir():
        raise CiterError(f"iteration {iteration} rolls out under the router of iteration {iteration - 1}, but "
                         f"{router_dir(run, iteration - 1)} does not exist")
    run.mkdir(parents=True, exist_ok=True)
    from pipeline.models import check_pair

    examples = load_examples(cfg.task, "train", limit=cfg.collect.n_examples)
    tok = check_pair(cfg.models)
    references = encode_references(cfg, examples, tok)
    shards = plan_shards(examples, cfg.collect.shard_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".part-*.tmp"):  # left by a killed writer; never read
        stale.unlink()
    for damaged in [f for f in sorted(out_dir.glob("part-*.parquet")) if not shard_reads(f)]:
        log.warning("%s does not read as Parquet; labelling is deterministic, so it is labelled again", damaged)
        damaged.unlink()
    todo = [k for k in range(len(shards)) if not shard_path(out_dir, k).is_file()]
    log.info("collect iteration %d: %d examples in %d shards, %d to label", iteration, len(examples), len(shards),
             len(todo))
    t0 = time.perf_counter()
    labelled = 0
    if todo:
        items = [{"shard": k, "examples": json.dumps([ex.__dict__ for ex in shards[k]])} for k in todo]
        constructor = {"config": cfg.to_dict(), "run": location_text(run), "iteration": iteration}
        for row in shards_on_actors(TokenLabeler, items, constructor, cfg, f"collect iteration {iteration}",
                                    sizes=[len(shards[k]) for k in todo], unit="examples"):
            labelled += row["rows"]
    seconds = time.perf_counter() - t0
    summary = {"iteration": iteration, "examples": len(examples), "shards": len(shards),
               **label_counts(cfg, run, iteration, references, tok), "seconds": seconds, "rows_labelled_now": labelled,
               "rows_per_s": labelled / seconds if labelled else None,
               "wall_seconds": time.perf_counter() - started}  # the whole stage, in the call that completed it
    atomic_write_json(done, summary)
    return summary
