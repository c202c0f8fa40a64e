"""Evaluation: threshold sweep + baselines -> eval.json (points, AUC) and curve.png, via the CLI."""

import json

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.labelling import LLM_NEEDED, NEEDS_ROLLOUT, SLM_ENOUGH, teacher_forced
from pipeline.models import load_pair
from pipeline.router import Router, RouterSpec, load_router, save_router
from pipeline.stages.convergence import convergence_table, plot_convergence
from pipeline.stages.evaluate import accuracy_at_ratio, area_under_curve, calls_to_reach, headline
from pipeline.tasks import load_examples
from tests.conftest import DEMO_CONFIG, run_citer


def test_auc_and_interpolation():
    pts = [{"llm_call_ratio": 0.5, "accuracy": 1.0}]
    assert area_under_curve(pts, 0.0, 1.0) == pytest.approx(0.75)
    assert area_under_curve([], 0.2, 0.8) == pytest.approx(0.5)
    assert accuracy_at_ratio(pts, 0.25, 0.0, 1.0) == pytest.approx(0.5)
    assert accuracy_at_ratio(pts, 0.75, 0.0, 1.0) == pytest.approx(1.0)


def test_llm_calls_to_reach_the_target_and_the_reduction_at_equal_accuracy():
    point = lambda m, x, y: {"method": m, "llm_call_ratio": x, "accuracy": y}  # noqa: E731
    # The router crosses 0.89 between (0.05, 0.80) and (0.10, 0.95): 0.05 + 0.05 * 0.09 / 0.15 = 0.08.
    # Confidence crosses it between (0.2, 0.85) and (0.4, 0.93): 0.2 + 0.2 * 0.04 / 0.08 = 0.3.
    points = [point("router", 0.05, 0.80), point("router", 0.10, 0.95), point("router", 0.30, 0.99),
              point("confidence", 0.2, 0.85), point("confidence", 0.4, 0.93),
              point("random", 0.3, 0.6), point("random", 0.7, 0.85)]
    assert calls_to_reach([p for p in points if p["method"] == "router"], 0.89, 0.4) == pytest.approx(0.08)
    assert calls_to_reach([p for p in points if p["method"] == "random"], 0.89, 0.4) is None  # never measured there
    assert calls_to_reach([], 0.3, 0.4) == 0.0  # the SLM alone is already good enough
    h = headline(points, ["confidence", "random", "router"], slm_accuracy=0.4, llm_accuracy=0.90)
    assert h["target_accuracy"] == pytest.approx(0.89)
    assert h["llm_calls_to_target"]["confidence"] == pytest.approx(0.3)
    assert h["llm_call_reduction_at_target"]["confidence"] == pytest.approx(1 - 0.08 / 0.3)
    assert h["llm_call_reduction_at_target"]["random"] is None


def test_convergence_table_and_plot_from_metrics_records(tmp_path):
    records = [{"iteration": 0, "collect/case3_share": 0.04, "eval/auc/router": 0.9, "eval/auc/random": 0.6,
                "eval/llm_calls_to_target/router": 0.12, "eval/llm_calls_to_target/random": None,
                "eval/target_accuracy": 0.97},
               {"iteration": 1, "collect/case3_share": 0.04, "collect/case3_flip_share": 0.4,
                "router/agreement_with_previous": 0.95, "eval/auc/router": 0.93, "eval/auc/random": 0.6,
                "eval/llm_calls_to_target/router": 0.08, "eval/llm_calls_to_target/random": None,
                "eval/target_accuracy": 0.97}]
    table = convergence_table(records).splitlines()
    assert "AUC router" in table[0] and "calls random" in table[0]
    row = table[3].split()
    assert row[:4] == ["1", "4.0%", "40.0%", "95.0%"] and "8.0%" in row and "not" in row and "0.930" in row
    plot_convergence(records, tmp_path / "convergence.png")
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "convergence.png")
    assert image.shape[1] > 1000 and image.std() > 0.05


@pytest.fixture(scope="module")
def shortcut_router(demo_world, tmp_path_factory):
    """A router fitted quickly on shortcut labels (cases 1 and 2) of 300 training examples."""
    cfg = load_config(DEMO_CONFIG)
    pair = load_pair(cfg.models)
    # One thread: the same router whichever tests ran before (some leave torch on one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    labelled = teacher_forced(pair, load_examples(cfg.task, "train", limit=300), batch_size=50)
    cases = np.concatenate([t.cases for t in labelled])
    assert set(np.unique(cases)) <= {SLM_ENOUGH, LLM_NEEDED, NEEDS_ROLLOUT} and (cases == LLM_NEEDED).sum() > 20
    keep = cases != NEEDS_ROLLOUT
    x = torch.tensor(np.concatenate([t.slm_hidden for t in labelled])[keep], dtype=torch.float32)
    y = torch.tensor(cases[keep] == SLM_ENOUGH, dtype=torch.float32)
    torch.manual_seed(0)
    router = Router(RouterSpec(input_size=pair.hidden_size))
    opt = torch.optim.AdamW(router.parameters(), lr=1e-3)
    for _ in range(8):
        for batch in torch.randperm(len(x)).split(256):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(router(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    return save_router(router.eval(), tmp_path_factory.mktemp("router"))


@pytest.mark.slow
def test_citer_eval_with_a_router_writes_points_auc_and_curve(shortcut_router, tmp_path):
    proc = run_citer("eval", str(DEMO_CONFIG), "--router", str(shortcut_router), "--out", str(tmp_path),
                     "eval.n_examples=100", "eval.thresholds=[0.5,0.9,0.99]", "eval.random_ratios=[0.1,0.3,0.6]",
                     "eval.confidence_thresholds=[0.6,0.9]", "eval.query_fractions=[0.2,0.6]",
                     "eval.refine_steps=0")  # refinement is the actors test's
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    methods = [p["method"] for p in result["points"] if not p.get("refined")]
    assert methods.count("router") == 3 and methods.count("random") == 3 and methods.count("confidence") == 2
    assert methods.count("query") == 2 and methods.count("slm") == methods.count("llm") == 1
    for p in result["points"]:
        assert {"method", "threshold", "llm_call_ratio", "llm_passes", "llm_tokens_processed", "accuracy", "n",
                "tokens_per_s"} <= set(p)
        assert 0.0 <= p["llm_call_ratio"] <= 1.0 and p["n"] == 100
    by = {(p["method"], p["threshold"]): p for p in result["points"]}
    # What the LLM did: it wrote nothing alone-SLM; alone, it wrote every token and read each once.
    assert by["slm", None]["llm_passes"] == by["slm", None]["llm_tokens_processed"] == 0
    llm = by["llm", None]
    assert llm["llm_passes"] >= max(1, llm["generated_tokens"] // 100) and llm["slm_tokens_processed"] == 0
    for p in result["points"]:
        if p["method"] == "router" and p["llm_call_ratio"] > 0:
            assert 0 < p["llm_passes"] <= round(p["llm_call_ratio"] * p["generated_tokens"])
    router_ratios = [p["llm_call_ratio"] for p in result["points"] if p["method"] == "router"]
    assert router_ratios == sorted(router_ratios) and router_ratios[-1] > 0  # a higher threshold calls the LLM more
    assert set(result["auc"]) == {"router", "random", "confidence", "query"}
    assert result["auc"]["router"] > result["auc"]["random"]  # even a quick fit beats random routing
    png = tmp_path / "curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 400 and image.std() > 0.05  # a real picture, not blank
    assert "AUC" in proc.stdout and "router" in proc.stdout
    # The intervals and comparisons are printed with the curve.
    assert "95% intervals (paired percentile bootstrap over held-out problems, 100 problems" in proc.stdout
    assert "router vs confidence:" in proc.stdout and "accuracy / LLM share by prompt length" in proc.stdout


def test_router_for_another_slm_and_bad_thresholds_are_refused(tmp_path, demo_world):
    wrong = save_router(Router(RouterSpec(input_size=32)).eval(), tmp_path / "wrong")
    proc = run_citer("eval", str(DEMO_CONFIG), "--router", str(wrong), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "hidden states of size 32, but the SLM's hidden size is 48" in proc.stderr
    proc = run_citer("eval", str(DEMO_CONFIG), "eval.thresholds=[0.5,1.5]")
    assert proc.returncode == 2 and "'eval.thresholds[1]': 1.5 must be in [0, 1]" in proc.stderr
    assert not (tmp_path / "o" / "eval.json").exists()


@pytest.mark.slow
def test_evaluation_on_actors_keeps_finished_shards_and_the_driver_loads_no_model(shortcut_router, tmp_path,
                                                                                    monkeypatch, local_ray):
    """`run_eval` shards the held-out set over Ray actors: this process (the driver) loads no model,
    each shard's decodes are kept as they complete, and a rerun decodes only the missing or damaged
    ones. Its figures equal one in-process evaluation of the whole set (greedy tokens do not depend
    on batching; random draws are numbered by example, not by shard)."""
    from pipeline import models
    from pipeline.stages import evaluate

    # The router reaches the target (the LLM's 59 of 60 right) between 0.95 and 0.98 here, at 0.95
    # on some machines: either way two configured points bracket it across a wide gap.
    cfg = load_config(DEMO_CONFIG, ["eval.n_examples=60", "eval.shard_size=20", "eval.thresholds=[0.5,0.95,0.98]",
                                    "eval.random_ratios=[0.3]", "eval.confidence_thresholds=[0.9]",
                                    "eval.query_fractions=[0.5]", "collect.num_actors=2", "eval.refine_steps=6",
                                    "eval.refine_tolerance=0.02"])
    whole = evaluate.evaluate_methods(load_pair(cfg.models), load_router(shortcut_router).router,
                                      load_examples(cfg.task, "eval", limit=60), cfg)

    def no_model_here(*args, **kwargs):
        raise AssertionError("the driver loaded a model")

    monkeypatch.setattr(models, "load_model", no_model_here)
    result = evaluate.run_eval(cfg, tmp_path, router_dir=shortcut_router)
    fields = ("method", "threshold", "accuracy", "llm_call_ratio", "generated_tokens", "n", "no_answer")
    configured = [p for p in result["points"] if not p.get("refined")]
    assert [{k: p[k] for k in fields} for p in configured] == [{k: p[k] for k in fields} for p in whole["points"]]
    assert result["auc"] == pytest.approx(whole["auc"]) and result["n_examples"] == 60
    # The router's sweep refined itself: the two points around the target are now within the
    # tolerance, the headline lies between them, and the upper one is measured at the target.
    refined = [p for p in result["points"] if p.get("refined")]
    assert refined and {p["method"] for p in refined} <= {"router", "confidence"}
    (x0, y0, _), (x1, y1, _) = evaluate.target_bracket(result, "router")
    assert x1 - x0 <= 0.02 and y0 < result["target_accuracy"] <= y1
    assert x0 <= result["llm_calls_to_target"]["router"] <= x1
    (w0, _, _), (w1, _, _) = evaluate.target_bracket(whole, "router")
    assert w1 - w0 > 0.02  # the configured sweep alone brackets the target across a wider gap
    # Each step decodes both methods' next thresholds in one folder, three shards each.
    steps = sorted((tmp_path / "eval-parts").glob("refine-*"))
    assert all(len(list(step.glob("part-*.json"))) == 3 for step in steps)
    assert len(steps) == max(sum(p["method"] == m for p in refined) for m in ("router", "confidence"))
    assert sum("refine-router-" in step.name for step in steps) == sum(p["method"] == "router" for p in refined)
    for p in result["points"]:
        lo, hi = p["accuracy_interval"]
        assert lo <= p["accuracy"] <= hi
    assert set(result["intervals"]["llm_calls_to_target"]) == set(result["auc"])
    assert result["time_per_token"]["llm"] > 0 and set(result["by_length"]) == {"prompt", "generation"}

    parts = sorted((tmp_path / "eval-parts").glob("part-*.json"))
    assert [p.name for p in parts] == ["part-00000.json", "part-00001.json", "part-00002.json"]
    parts[0].unlink()  # an evaluation killed before this shard finished
    parts[1].write_text(parts[1].read_text()[:100])  # a part cut short
    kept = parts[2].stat().st_mtime_ns
    (tmp_path / "eval.json").unlink()
    refine_parts = {p: p.stat().st_mtime_ns for p in (tmp_path / "eval-parts").glob("refine-*/part-*.json")}
    again = evaluate.run_eval(cfg, tmp_path, router_dir=shortcut_router)
    assert parts[2].stat().st_mtime_ns == kept and parts[0].is_file() and json.loads(parts[1].read_text())
    assert [{k: p[k] for k in fields} for p in again["points"]] == [{k: p[k] for k in fields}
                                                                     for p in result["points"]]
    assert {p: p.stat().st_mtime_ns for p in refine_parts} == refine_parts  # the refinement's decodes were kept


def point(method, threshold, ratio, accuracy, **kw):
    return {"method": method, "threshold": threshold, "llm_call_ratio": ratio, "accuracy": accuracy, **kw}


def test_the_bisection_threshold_halves_the_bracket_until_it_is_within_the_tolerance():
    from pipeline.stages.evaluate import bisection_threshold, target_bracket

    result = {"slm_accuracy": 0.3, "target_accuracy": 0.99,
              "points": [point("router", 0.9, 0.10, 0.95), point("router", 0.98, 0.266, 0.988),
                         point("router", 0.99, 0.317, 0.996), point("confidence", 0.9, 0.5, 0.999)]}
    assert target_bracket(result, "router") == ((0.266, 0.988, 0.98), (0.317, 0.996, 0.99))
    assert bisection_threshold(result, "router", 0.01) == pytest.approx(0.985)
    assert bisection_threshold(result, "router", 0.06) is None  # within the tolerance already
    result["points"].append(point("router", 0.985, 0.29, 0.99, refined=True))
    assert target_bracket(result, "router")[1] == (0.29, 0.99, 0.985)
    assert bisection_threshold(result, "router", 0.01) == pytest.approx(0.9825)
    # the first point already reaches the target: bisect from the SLM alone (threshold 0)
    assert target_bracket(result, "confidence") == ((0.0, 0.3, 0.0), (0.5, 0.999, 0.9))
    assert bisection_threshold(result, "confidence", 0.01) == pytest.approx(0.45)
    assert target_bracket({**result, "target_accuracy": 1.0}, "router") is None  # nothing reaches it


def test_length_buckets_are_quantiles_at_observed_lengths_and_never_empty():
    from pipeline.stages.evidence import quantile_buckets

    lengths = np.array([10, 10, 10, 11, 12, 12, 13, 20, 21, 40, 40, 41])
    masks = quantile_buckets(lengths, 4)
    assert sum(m.sum() for m in masks) == len(lengths) and all(m.any() for m in masks)
    # Quartiles at observed lengths (smallest length whose share reaches q): 10, 10, 12, 21, 41; the
    # first two tie, so three buckets [10, 12), [12, 21), [21, 41] of 4 problems each.
    assert [sorted(set(lengths[m].tolist())) for m in masks] == [[10, 11], [12, 13, 20], [21, 40, 41]]
    assert len(quantile_buckets(np.full(9, 17), 4)) == 1  # every prompt of one length: one bucket
