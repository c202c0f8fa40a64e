"""Held-out evaluation: accuracy against the share of tokens the LLM produced, per method.

Each method gives points (llm_call_ratio, accuracy): the router at a sweep of thresholds, and the
baselines (SLM alone, LLM alone, random, confidence and query-level routing). A method's AUC is
the area under its accuracy-vs-ratio curve on [0, 1]. The curve is anchored at (0, SLM accuracy)
and (1, LLM accuracy), where every token-level method ends up at its extreme thresholds.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline import CiterError, statistics
from pipeline.atomic import atomic_write_json, atomic_writer
from pipeline.config import EVAL_METHODS, Config, from_dict
from pipeline.decoding import (
    ConfidencePolicy,
    Generation,
    LLMOnly,
    RandomPolicy,
    RouterPolicy,
    SLMOnly,
    Speculative,
    decode,
    llm_call_ratio,
    settings,
)
from pipeline.models import ModelPair, check_pair, encode_prompts, flops_per_token, load_pair
from pipeline.raysession import shards_on_actors
from pipeline.router import WEIGHTS, Router, load_router
from pipeline.rundir import EVAL_PARTS
from pipeline.stages.evidence import (
    TARGET_GAP,
    add_intervals,
    evidence_lines,
    length_breakdown,
    resamples,
    time_per_token,
)
from pipeline.storage import StoragePath, location_text, run_path
from pipeline.tasks import Example, extract_answer, load_examples

log = logging.getLogger(__name__)

REFINE = "refine"  # the part folders and run keys of a sweep's refinement


def score(pair: ModelPair, task_format: str, gens: list[Generation], examples: list[Example]) -> list[bool | None]:
    """Per row: whether the generated text (special tokens dropped) gives the gold answer, or None
    when no answer can be read from it (scored wrong, and counted as `no_answer`)."""
    tok = pair.tokenizer
    answers = [extract_answer(task_format, tok.decode(g.tokens, skip_special_tokens=True), labels=ex.labels)
               for g, ex in zip(gens, examples, strict=True)]
    return [None if a is None else a == ex.answer for a, ex in zip(answers, examples, strict=True)]


def make_point(method: str, threshold: float | None, gens: list[Generation], scored: list[bool | None],
               seconds: float, counts: dict[str, int | None] | None = None) -> dict[str, Any]:
    """One eval point. `counts` are what the models really did (`Decoding.counts()`): passes and
    tokens each model read, and the FLOPs those tokens cost."""
    n_tokens = sum(len(g.tokens) for g in gens)
    return {
        "method": method,
        "threshold": threshold,
        "llm_call_ratio": llm_call_ratio(gens),
        **(counts or {}),
        "accuracy": sum(x is True for x in scored) / len(scored),
        "no_answer": sum(x is None for x in scored),
        "n": len(scored),
        "generated_tokens": n_tokens,
        "seconds": seconds,
        "tokens_per_s": n_tokens / seconds if seconds > 0 else None,
    }


def planned_runs(cfg: Config, with_router: bool, baselines: dict[str, Any] | None = None) -> list[list]:
    """[method, threshold] of every decode an evaluation does: the SLM and the LLM alone (they
    anchor every curve), the router's sweep, the random and confidence sweeps, speculative decoding.
    With `baselines` (an earlier eval.json of the run), everything but the router is reused."""
    e, methods = cfg.eval, set(cfg.eval.methods)
    runs: list[list] = []
    if baselines is None:
        runs += [["slm", None], ["llm", None]]
        runs += [["random", r] for r in e.random_ratios] if "random" in methods else []
        runs += [["confidence", t] for t in e.confidence_thresholds] if "confidence" in methods else []
        runs += [["speculative", None]] if "speculative" in methods else []
    if with_router and "router" in methods:
        runs += [["router", t] for t in e.thresholds]
    return runs


def decode_runs(pair: ModelPair, router: Router | None, examples: list[Example], cfg: Config, runs: list[list],
                first_row: int = 0, on_decoded: Callable[[int], Any] | None = None) -> dict[str, dict[str, Any]]:
    """Decode `examples` once per planned run and score them: per run, each row's tokens, who wrote
    them (and, for the SLM alone, its confidence), whether it was right, what the models did and
    the seconds it took. `first_row` is the examples' place in the whole held-out set;
    `on_decoded(n)` hears of each run's examples as they are decoded."""
    prompts = encode_prompts(pair.tokenizer, [ex.prompt for ex in examples], cfg.models.chat_template,
                             cfg.task.system_prompt)
    policies = {"slm": lambda t: SLMOnly(), "llm": lambda t: LLMOnly(), "router": lambda t: RouterPolicy(router, t),
                "random": lambda t: RandomPolicy(t, cfg.eval.seed, first_row), "confidence": ConfidencePolicy,
                "speculative": lambda t: Speculative()}
    out = {}
    for i, (method, threshold) in enumerate(runs):
        label = method if threshold is None else f"{method} @ {threshold:g}"
        t0 = time.perf_counter()
        done = decode(pair.slm, pair.llm, prompts, policies[method](threshold), **pair.decode_kwargs,
                      max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, desc=label,
                      **settings(cfg.decode))
        gens = done.generations
        if on_decoded is not None:
            on_decoded(len(gens))
        out[f"{i}:{label}"] = {
            "method": method, "threshold": threshold, "seconds": time.perf_counter() - t0,
            "prompt_tokens": [len(p) for p in prompts],
            "counts": {**done.counts(), "flops": flops_per_token(pair.slm) * done.slm_tokens_processed
                       + flops_per_token(pair.llm) * done.llm_tokens_processed},
            "scored": score(pair, cfg.task.format, gens, examples),
            "rows": [{"tokens": g.tokens, "from_llm": g.from_llm, "llm_tokens_processed": g.llm_tokens_processed,
                      "slm_tokens_processed": g.slm_tokens_processed,
                      "slm_confidence": g.slm_confidence if method == "slm" else []} for g in gens],
        }
    return out


def merge_parts(parts: list[dict[str, dict[str, Any]]]) -> dict[str, tuple[dict, list[Generation], list]]:
    """The shards' decodes of each run joined in example order: (point, generations, scored). A
    run decoded by the refinement of a sweep (its key starts with "refine") is marked `refined`."""
    merged = {}
    for label, first in parts[0].items():
        runs = [part[label] for part in parts]
        gens = [Generation(**row) for run in runs for row in run["rows"]]
        scored = [x for run in runs for x in run["scored"]]
        counts = {k: sum(run["counts"][k] for run in runs) for k in first["counts"]}
        point = make_point(first["method"], first["threshold"], gens, scored, sum(r["seconds"] for r in runs), counts)
        prompts = [n for run in runs for n in run.get("prompt_tokens", [])]
        if label.startswith(REFINE):
            point["refined"] = True
        point["per_problem"] = per_problem(gens, scored, prompts)
        merged[label] = (point, gens, scored)
    return merged


def per_problem(gens: list[Generation], scored: list[bool | None], prompt_tokens: list[int]) -> dict[str, list]:
    """What the bootstrap and the length breakdown need of each held-out problem."""
    return {"correct": [int(x is True) for x in scored], "tokens": [len(g.tokens) for g in gens],
            "llm_tokens": [g.llm_tokens for g in gens], "prompt_tokens": prompt_tokens}


def query_points(slm_run: tuple[dict, list[Generation], list[bool]], llm_run: tuple[dict, list[Generation], list[bool]],
                 fractions: list[float]) -> list[dict[str, Any]]:
    """Query-level routing from the two single-model runs: score each query by the SLM's mean
    top-1 probability over its own answer (the first pass), and give the `fraction` of queries
    with the lowest scores wholly to the LLM. Time = the SLM pass + those rows' share of the LLM's.
    Tokens each model read are the rows' own; passes are not measured (they depend on how the
    chosen rows would be batched) and left None."""
    (slm_point, slm_gens, slm_ok), (llm_point, llm_gens, llm_ok) = slm_run, llm_run
    scores = [sum(g.slm_confidence) / len(g.slm_confidence) for g in slm_gens]
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    llm_tokens_total = max(1, sum(len(g.tokens) for g in llm_gens))
    points = []
    for fraction in fractions:
        to_llm = set(order[: math.ceil(fraction * len(order))])
        gens, ok = [], []
        for i in range(len(scores)):
            g = llm_gens[i] if i in to_llm else slm_gens[i]
            gens.append(Generation(tokens=g.tokens, from_llm=g.from_llm,
                                   llm_tokens_processed=g.llm_tokens_processed if i in to_llm else 0,
                                   slm_tokens_processed=slm_gens[i].slm_tokens_processed))
            ok.append(llm_ok[i] if i in to_llm else slm_ok[i])
        llm_share = sum(len(llm_gens[i].tokens) for i in to_llm) / llm_tokens_total
        seconds = slm_point["seconds"] + llm_share * llm_point["seconds"]
        counts = {"llm_passes": None, "slm_passes": None,
                  "llm_tokens_processed": sum(g.llm_tokens_processed for g in gens),
                  "slm_tokens_processed": sum(g.slm_tokens_processed for g in gens)}
        point = make_point("query", fraction, gens, ok, seconds, counts)
        point["per_problem"] = per_problem(gens, ok, slm_point["per_problem"]["prompt_tokens"])
        points.append(point)
    return points


def _curve(points: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """A method's points as one resample's (1, P) arrays of LLM-call ratio and accuracy."""
    return (np.array([[p["llm_call_ratio"] for p in points]], dtype=float).reshape(1, -1),
            np.array([[p["accuracy"] for p in points]], dtype=float).reshape(1, -1))


def area_under_curve(points: list[dict[str, Any]], slm_accuracy: float, llm_accuracy: float) -> float:
    """Trapezoid area under accuracy vs llm_call_ratio on [0, 1], anchored at both single models."""
    return float(statistics.curve_area(*_curve(points), np.array([slm_accuracy]), np.array([llm_accuracy]))[0])


def accuracy_at_ratio(points: list[dict[str, Any]], ratio: float, slm_accuracy: float, llm_accuracy: float) -> float:
    """Accuracy of a method at a given LLM-call ratio, interpolated linearly along its curve."""
    xy = sorted([(0.0, slm_accuracy), (1.0, llm_accuracy)] + [(p["llm_call_ratio"], p["accuracy"]) for p in points])
    for (x0, y0), (x1, y1) in zip(xy, xy[1:], strict=False):
        if x0 <= ratio <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (ratio - x0) / (x1 - x0)
    return xy[-1][1]


def calls_to_reach(points: list[dict[str, Any]], target: float, slm_accuracy: float) -> float | None:
    """The smallest LLM-call ratio at which a method's measured curve (from the SLM alone at 0)
    reaches `target` accuracy, interpolated linearly between measured points; None when no
    measured point reaches it (the curve is never extended past its last point)."""
    calls = float(statistics.calls_to_reach(*_curve(points), np.array([slm_accuracy]), np.array([target]))[0])
    return None if math.isinf(calls) else calls


def headline(points: list[dict[str, Any]], methods: list[str], slm_accuracy: float,
             llm_accuracy: float) -> dict[str, Any]:
    """The paper's headline at equal accuracy: per method, the LLM-call ratio needed to reach the
    LLM's accuracy minus 1 point, and how many fewer LLM calls the router needs than each baseline
    there (1 - router's ratio / baseline's; None where either does not reach it)."""
    target = llm_accuracy - TARGET_GAP
    calls = {m: calls_to_reach([p for p in points if p["method"] == m], target, slm_accuracy) for m in methods}
    router = calls.get("router")
    reduction = {m: (1.0 - router / calls[m] if router is not None and calls[m] else None)
                 for m in methods if m != "router"} if "router" in calls else {}
    return {"target_accuracy": target, "llm_calls_to_target": calls, "llm_call_reduction_at_target": reduction}


class EvalDecoder:
    """Ray Data actor of the evaluate stage: holds the pair and the router; decodes whole shards of
    the held-out set under every planned run and writes each shard's part file."""

    def __init__(self, config: dict, router: str | None, parts: str, runs: list[list], signature: str,
                 threads: int = 1, tally: Any = None):
        import torch

        torch.set_num_threads(max(1, threads))
        self.cfg = from_dict(Config, config, source="the evaluation's config")
        self.pair = load_pair(self.cfg.models)
        self.router = load_router(router, expected_input_size=self.pair.hidden_size,
                                  device=self.pair.device).router if router else None
        self.parts, self.runs, self.signature = run_path(parts), runs, signature
        self.tally = tally  # the driver's progress: examples decoded (raysession.Tally)
        self.warm_up()

    def warm_up(self) -> None:
        """A short untimed decode with each model (and the router): an actor's first decode pays
        one-off costs (first kernels, allocations) that would otherwise weigh on the timings of
        whichever run comes first, such as a refinement step's only one."""
        prompt = encode_prompts(self.pair.tokenizer, ["warm up"], self.cfg.models.chat_template,
                                self.cfg.task.system_prompt)
        policies = [SLMOnly(), LLMOnly()] + ([RouterPolicy(self.router, 0.5)] if self.router is not None else [])
        for policy in policies:
            decode(self.pair.slm, self.pair.llm, prompt * 8, policy, **self.pair.decode_kwargs, max_new_tokens=8,
                   batch_size=8, **settings(self.cfg.decode))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {"shard": []}
        for shard, first_row, payload in zip(batch["shard"], batch["first_row"], batch["examples"], strict=True):
            examples = [Example(**e) for e in json.loads(payload)]
            runs = decode_runs(self.pair, self.router, examples, self.cfg, self.runs, int(first_row),
                               on_decoded=None if self.tally is None else self.tally.add.remote)
            atomic_write_json(part_path(self.parts, int(shard)), {"signature": self.signature, "runs": runs})
            out["shard"].append(int(shard))
        return out


def part_path(parts: StoragePath, shard: int) -> StoragePath:
    return parts / f"part-{shard:05d}.json"


def read_part(parts: StoragePath, shard: int, signature: str) -> dict[str, dict[str, Any]] | None:
    """A shard's decodes, or None when it is missing, damaged or from another evaluation (another
    config, router or plan): then it is decoded again."""
    try:
        part = json.loads(part_path(parts, shard).read_text())
        return part["runs"] if isinstance(part, dict) and part.get("signature") == signature else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_eval(cfg: Config, out_dir: str | StoragePath, router_dir: str | StoragePath | None = None,
             baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the configured methods on the held-out split over an actor pool of the collect
    stage's size and resources (`collect.num_actors`, CPUs and GPUs per actor), `eval.shard_size`
    examples a task; this process loads no model. Each shard's decodes are written to
    OUT/eval-parts/ as it completes, so a rerun decodes only the rest; then the sweeps are refined
    around the target (`refine_sweeps`, each step's decodes in a folder of their own), then
    curve.png, then eval.json. With `baselines` (an earlier eval.json of the run) only the router
    is decoded."""
    started = time.perf_counter()
    examples = load_examples(cfg.task, "eval", limit=cfg.eval.n_examples)  # bad data fails before any actor
    check_pair(cfg.models)
    if router_dir:
        check_router_fits(cfg, router_dir)
    runs = planned_runs(cfg, router_dir is not None, baselines)
    out = run_path(out_dir)
    decoded = decode_on_actors(cfg, examples, runs, out / EVAL_PARTS, router_dir)
    refined = [m for m in ("router", "confidence") if m in cfg.eval.methods
               and (m != "router" or router_dir is not None) and (m == "router" or baselines is None)]
    decoded = refine_sweeps(cfg, examples, decoded, out / EVAL_PARTS, router_dir, baselines, refined)
    result = assemble(cfg, len(examples), decoded, baselines)
    result["wall_seconds"] = time.perf_counter() - started  # the whole stage, in the call that completed it
    plot_curve(result, out / "curve.png")
    atomic_write_json(out / "eval.json", result)  # last: its presence marks the stage complete
    log.info("wrote %s and %s", out / "eval.json", out / "curve.png")
    return result


def decode_on_actors(cfg: Config, examples: list[Example], runs: list[list], parts: StoragePath,
                     router_dir: str | StoragePath | None) -> list[dict[str, dict[str, Any]]]:
    """Each shard's decodes of `runs` (`decode_runs`), from its part file in `parts` when one of
    this evaluation is there, else decoded on the actor pool and written there as it completes."""
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(".part-*.tmp"):  # a killed writer's
        stale.unlink()
    signature = eval_signature(cfg, router_dir, runs)
    size = cfg.eval.shard_size
    shards = [examples[i:i + size] for i in range(0, len(examples), size)]
    decoded = {k: read_part(parts, k, signature) if runs else {} for k in range(len(shards))}
    todo = [k for k, part in decoded.items() if part is None]
    log.info("evaluating on %d held-out examples from %s: %d decodes each, %d shards of %d, %d to decode",
             len(examples), cfg.task.eval_path, len(runs), len(shards), size, len(todo))
    if todo:
        items = [{"shard": k, "first_row": k * size, "examples": json.dumps([ex.__dict__ for ex in shards[k]])}
                 for k in todo]
        constructor = {"config": cfg.to_dict(), "router": location_text(run_path(router_dir)) if router_dir else None,
                       "parts": location_text(parts), "runs": runs, "signature": signature}
        sizes = [len(shards[k]) * len(runs) for k in todo]
        for row in shards_on_actors(EvalDecoder, items, constructor, cfg, "evaluate", sizes=sizes,
                                    unit="example decodes"):
            decoded[int(row["shard"])] = read_part(parts, int(row["shard"]), signature)
    if any(d is None for d in decoded.values()):
        raise CiterError(f"{parts}: a shard's decodes are missing after the evaluation ran; run it again")
    return list(decoded.values())


def refine_sweeps(cfg: Config, examples: list[Example], decoded: list[dict[str, dict[str, Any]]], parts: StoragePath,
                  router_dir: str | StoragePath | None, baselines: dict[str, Any] | None,
                  methods: list[str]) -> list[dict[str, dict[str, Any]]]:
    """Refine each of `methods`' sweeps around the target accuracy: while the two points that
    bracket it are more than `eval.refine_tolerance` apart in LLM-call ratio, decode the threshold
    halfway between theirs (at most `eval.refine_steps` times a method). The methods refine side
    by side: each step decodes every unfinished method's next threshold in one pass over the actor
    pool, in a part folder of its own, so a rerun finds every step's decodes. Returns every
    shard's decodes, refined ones added; a step reads only the curve (`sweep_points`), and the
    intervals are computed once, over them all (`assemble`)."""
    curve = sweep_points(cfg, decoded, baselines)
    active = list(methods)
    for _ in range(cfg.eval.refine_steps):
        step = {m: t for m in active if (t := bisection_threshold(curve, m, cfg.eval.refine_tolerance)) is not None}
        if not step:
            break
        active = list(step)
        keys = {m: f"{REFINE}-{m}-{t:.12g}" for m, t in step.items()}
        more = decode_on_actors(cfg, examples, [[m, t] for m, t in step.items()], parts / "+".join(keys.values()),
                                router_dir)
        decoded = [{**d, **{f"{keys[run['method']]}:{label}": run for label, run in shard.items()}}
                   for d, shard in zip(decoded, more, strict=True)]
        curve = sweep_points(cfg, decoded, baselines)
        for method, threshold in step.items():
            point = next(p for p in curve["points"] if p["method"] == method and p["threshold"] == threshold)
            log.info("refined the %s sweep at threshold %.6g: %.1f%% LLM tokens, %.1f%% accuracy", method,
                     threshold, 100 * point["llm_call_ratio"], 100 * point["accuracy"])
    return decoded


def target_bracket(result: dict[str, Any], method: str) -> tuple[tuple, tuple] | None:
    """The method's two points, in order of LLM-call ratio, between which its curve first reaches
    the target accuracy: (ratio, accuracy, threshold) each, the lower one possibly the SLM alone
    (0, its accuracy, threshold 0). None where no point reaches the target or the SLM does."""
    points = sorted([(0.0, result["slm_accuracy"], 0.0)]
                    + [(p["llm_call_ratio"], p["accuracy"], p["threshold"]) for p in result["points"]
                       if p["method"] == method])
    first = next((j for j, (_, y, _) in enumerate(points) if y >= result["target_accuracy"]), None)
    return None if not first else (points[first - 1], points[first])


def bisection_threshold(result: dict[str, Any], method: str, tolerance: float) -> float | None:
    """The threshold halfway between those of the points that bracket the target, or None when
    they are within `tolerance` in LLM-call ratio (or nothing brackets it, or the halfway
    threshold is measured already)."""
    bracket = target_bracket(result, method)
    if bracket is None or bracket[1][0] - bracket[0][0] <= tolerance:
        return None
    threshold = (bracket[0][2] + bracket[1][2]) / 2
    measured = {p["threshold"] for p in result["points"] if p["method"] == method}
    return None if threshold in measured or threshold in (bracket[0][2], bracket[1][2]) else threshold


def check_router_fits(cfg: Config, router_dir: str | StoragePath) -> None:
    """Refuse, before any actor starts, a router built for another SLM (its config names the input
    size; the SLM's config.json its hidden size: neither model is loaded here)."""
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(cfg.models.slm, trust_remote_code=cfg.models.trust_remote_code).hidden_size
    load_router(router_dir, expected_input_size=hidden)


def eval_signature(cfg: Config, router_dir: str | StoragePath | None, runs: list[list]) -> str:
    """What a part file's decodes depend on: the models, task, evaluation and decode settings,
    the router's weights and the planned runs (tokens depend on fewer of them; passes and times on
    these too, so that one eval.json does not mix two settings)."""
    import hashlib

    weights = run_path(router_dir) / WEIGHTS if router_dir else None
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights and weights.is_file() else None
    c = cfg.to_dict()
    key = {"models": {k: v for k, v in c["models"].items() if not k.startswith("llm_")}, "task": c["task"],
           "eval": c["eval"], "decode": c["decode"], "router": digest, "runs": runs}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


BASELINES = ("slm", "llm", "random", "confidence", "query", "speculative")  # the router's points aside


def sweep_points(cfg: Config, parts: list[dict[str, dict[str, Any]]],
                 baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """The curve of the decoded shards (`decode_runs`), and of `baselines` for every method but
    the router when given: the single models' accuracies, the target accuracy (the LLM's minus 1
    point) and every point in curve order, refined ones too."""
    methods = set(cfg.eval.methods) | {"slm", "llm"}  # the single models anchor every curve and the bootstrap
    merged = merge_parts(parts)
    if baselines is None:
        single = {run[0]["method"]: run for run in merged.values() if run[0]["method"] in ("slm", "llm")}
        slm_acc, llm_acc = single["slm"][0]["accuracy"], single["llm"][0]["accuracy"]
        points = [run[0] for run in merged.values() if run[0]["method"] in methods]
        if "query" in methods:
            points += query_points(single["slm"], single["llm"], cfg.eval.query_fractions)
    else:
        slm_acc, llm_acc = baselines["slm_accuracy"], baselines["llm_accuracy"]
        points = [p for p in baselines["points"] if p["method"] in BASELINES and p["method"] in methods]
        points += [run[0] for run in merged.values()]
    points.sort(key=lambda p: (EVAL_METHODS.index(p["method"]), p["threshold"] or 0.0))
    return {"slm_accuracy": slm_acc, "llm_accuracy": llm_acc, "target_accuracy": llm_acc - TARGET_GAP,
            "points": points}


def assemble(cfg: Config, n_examples: int, parts: list[dict[str, dict[str, Any]]],
             baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """eval.json's content from the decoded shards' curve (`sweep_points`): its points, AUCs and
    accuracy at 10/20/30% LLM tokens (over the configured points), the LLM calls each method needs
    to reach the target accuracy (over every point, refined ones too), bootstrap intervals and
    comparisons (`evidence`), the length breakdown and the time per generated token."""
    curve = sweep_points(cfg, parts, baselines)
    slm_acc, llm_acc, points = curve["slm_accuracy"], curve["llm_accuracy"], curve["points"]
    swept = sorted({p["method"] for p in points} - {"slm", "llm", "speculative"})
    configured = {m: [p for p in points if p["method"] == m and not p.get("refined")] for m in swept}
    auc = {m: area_under_curve(configured[m], slm_acc, llm_acc) for m in swept}
    at_ratio = {m: {f"{r:.1f}": accuracy_at_ratio(configured[m], r, slm_acc, llm_acc) for r in (0.1, 0.2, 0.3)}
                for m in swept}
    result = {"n_examples": n_examples, "slm_accuracy": slm_acc, "llm_accuracy": llm_acc, "points": points,
              "auc": auc, "accuracy_at_llm_ratio": at_ratio, **headline(points, swept, slm_acc, llm_acc)}
    add_intervals(result, resamples(result, cfg.eval.bootstrap_resamples, cfg.eval.seed))
    result["by_length"] = length_breakdown(result, cfg.eval.length_buckets)
    result["time_per_token"] = time_per_token(result, cfg.eval.batch_size)
    return result


def evaluate_methods(pair: ModelPair, router: Router | None, examples: list[Example], cfg: Config,
                     baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every configured method in this process, on loaded models: what one evaluation actor does
    for its shard, over all `examples` at once."""
    runs = planned_runs(cfg, router is not None, baselines)
    return assemble(cfg, len(examples), [decode_runs(pair, router, examples, cfg, runs)], baselines)


def plot_curve(result: dict[str, Any], path: str | StoragePath) -> None:
    """Accuracy vs LLM-call ratio, one line per method, the single models marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    slm_acc, llm_acc = result["slm_accuracy"], result["llm_accuracy"]
    styles = {"router": ("C0", "o", 2.5), "random": ("C7", "s", 1.2), "confidence": ("C2", "^", 1.2),
              "query": ("C4", "D", 1.2)}
    for method, (color, marker, width) in styles.items():
        pts = sorted((p["llm_call_ratio"], p["accuracy"]) for p in result["points"] if p["method"] == method)
        if not pts:
            continue
        xs, ys = zip(*([(0.0, slm_acc)] + pts + [(1.0, llm_acc)]), strict=True)
        auc = result["auc"].get(method)
        ax.plot(xs, ys, color=color, marker=marker, lw=width, ms=5, label=f"{method} (AUC {auc:.3f})")
    ax.scatter([0.0], [slm_acc], s=120, color="C3", zorder=5, label=f"SLM alone ({slm_acc:.1%})")
    ax.scatter([1.0], [llm_acc], s=120, color="C1", zorder=5, label=f"LLM alone ({llm_acc:.1%})")
    ax.set_xlabel("LLM call ratio (share of generated tokens produced by the LLM)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"Accuracy vs LLM calls ({result['n_examples']} held-out examples)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_writer(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def format_table(result: dict[str, Any]) -> str:
    """The eval points as an aligned text table (refined points marked *), then each method's AUC,
    the headline, intervals and comparisons, the length breakdown and the time per token."""
    header = (f"{'method':<12}{'threshold':>10}{'LLM tokens':>12}{'LLM passes':>12}{'LLM read':>10}"
              f"{'accuracy':>10}{'95% interval':>15}{'no answer':>11}{'n':>6}{'tok/s':>9}")
    lines = [header, "-" * len(header)]
    dash = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for p in result["points"]:
        ci = p.get("accuracy_interval")
        ci = f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "-"
        threshold = dash(p["threshold"], ".6g") + ("*" if p.get("refined") else "")
        lines.append(f"{p['method']:<12}{threshold:>10}{100 * p['llm_call_ratio']:>11.1f}%"
                     f"{dash(p.get('llm_passes'), ',d'):>12}{dash(p.get('llm_tokens_processed'), ',d'):>10}"
                     f"{100 * p['accuracy']:>9.1f}%{ci:>15}{p.get('no_answer', 0):>11}{p['n']:>6}"
                     f"{dash(p.get('tokens_per_s'), '.0f'):>9}")
    if any(p.get("refined") for p in result["points"]):
        lines.append("* decoded to refine the sweep around the target accuracy (not in AUC or accuracy at 10/20/30%)")
    if result.get("auc"):
        order = sorted(result["auc"], key=lambda m: -result["auc"][m])
        lines.append("")
        lines.append("AUC of accuracy vs LLM call ratio: " + ", ".join(f"{m} {result['auc'][m]:.3f}" for m in order))
        at = result.get("accuracy_at_llm_ratio", {})
        if at:
            cells = {m: " / ".join(f"{100 * at[m][r]:.1f}%" for r in ("0.1", "0.2", "0.3")) for m in order if m in at}
            lines.append("accuracy at 10% / 20% / 30% LLM tokens: " + "; ".join(f"{m} {c}" for m, c in cells.items()))
    if result.get("llm_calls_to_target"):
        lines.append(headline_text(result))
    if result.get("intervals"):
        lines += ["", *evidence_lines(result)]
    return "\n".join(lines)


def headline_text(result: dict[str, Any]) -> str:
    """One line: LLM calls each method needs for the LLM's accuracy minus 1 point, and the router's
    reduction against each baseline there."""
    fmt = lambda x: "not reached" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    calls = result["llm_calls_to_target"]
    text = (f"LLM tokens needed for {100 * result['target_accuracy']:.1f}% accuracy (LLM alone - 1 point): "
            + ", ".join(f"{m} {fmt(calls[m])}" for m in sorted(calls, key=lambda m: (calls[m] is None, calls[m]))))
    reduction = {m: r for m, r in result.get("llm_call_reduction_at_target", {}).items() if r is not None}
    if reduction:
        text += "; the router needs " + ", ".join(f"{abs(100 * r):.0f}% {'fewer' if r >= 0 else 'more'} than {m}"
                                              for m, r in reduction.items())
    return text
