"""The driver: collect -> train -> evaluate, `loop.iterations` times, in one resumable run directory.

Every stage is skipped when its marker exists, so running the same command again resumes: a
collect stage skips its complete shards, a train stage continues from its last checkpoint, and an
evaluation decodes only the shards missing from its eval-parts/. Iteration 0's baselines (random,
confidence, query routing) are reused by later iterations: they do not depend on the router. The
run directory's layout is in pipeline.rundir.

A start opens its run once (`open_run`): the config is checked whole, then recorded in run.json or
compared with the record there. The stages work in an opened run and do not check it again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.atomic import atomic_write_json
from pipeline.config import Config
from pipeline.rundir import (
    CONVERGENCE_PNG,
    CURVE_PNG,
    DONE,
    EVAL_JSON,
    check_run_config,
    default_run_dir,
    iteration_dir,
    read_eval,
    router_dir,
    update_run_record,
)
from pipeline.stages.collect import run_collect
from pipeline.stages.convergence import iteration_metrics, plot_convergence
from pipeline.storage import StoragePath, run_path
from pipeline.tracking import Tracker, read_metrics_records, write_metrics_record

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The loop


def evaluate_iteration(cfg: Config, run: StoragePath, iteration: int) -> tuple[dict[str, Any], float]:
    """The iteration's eval.json (decoded now unless already there) and the seconds it took."""
    from pipeline.stages.evaluate import run_eval

    it = iteration_dir(run, iteration)
    if (it / EVAL_JSON).is_file():
        log.info("evaluation of iteration %d is complete (%s); skipping", iteration, it / EVAL_JSON)
        return read_eval(it / EVAL_JSON), 0.0
    baselines = None
    if iteration > 0 and (iteration_dir(run, 0) / EVAL_JSON).is_file():
        baselines = read_eval(iteration_dir(run, 0) / EVAL_JSON)
    t0 = time.perf_counter()
    result = run_eval(cfg, it, router_dir=router_dir(run, iteration), baselines=baselines)
    return result, time.perf_counter() - t0


def open_run(cfg: Config, run: str | StoragePath | None = None) -> StoragePath:
    """The run directory (`default_run_dir` when None), opened for `cfg`: DeepSpeed parses its
    section first, so that a config it rejects is never recorded (run.json would refuse the fixed
    one as a different config); then run.json records the config on first use, or refuses one that
    changed what the run already holds (`rundir.check_run_config`)."""
    from pipeline.stages.train import check_deepspeed_config, deepspeed_config

    run = run_path(run) if run is not None else default_run_dir(cfg)
    check_deepspeed_config(deepspeed_config(cfg))
    check_run_config(cfg, run)
    return run


def run_loop(cfg: Config, run: str | StoragePath | None = None) -> dict[str, Any]:
    """Run (or resume) every iteration; return the last iteration's eval result."""
    from pipeline.stages.train import fit_router

    run = open_run(cfg, run)
    tracker = Tracker(cfg, run)
    result: dict[str, Any] = {}
    try:
        for k in range(cfg.loop.iterations):
            it = iteration_dir(run, k)
            if (it / DONE).is_file():
                log.info("iteration %d is complete; skipping", k)
                result = read_eval(it / EVAL_JSON)
                continue
            log.info("iteration %d of %d: collect", k, cfg.loop.iterations)
            update_run_record(run, progress={"iteration": k, "stage": "collect"})
            collect = run_collect(cfg, run, k)
            log.info("iteration %d of %d: train", k, cfg.loop.iterations)
            update_run_record(run, progress={"iteration": k, "stage": "train"})
            train = fit_router(cfg, run, k)
            log.info("iteration %d of %d: evaluate", k, cfg.loop.iterations)
            update_run_record(run, progress={"iteration": k, "stage": "eval"})
            result, eval_seconds = evaluate_iteration(cfg, run, k)
            earlier = [r for r in read_metrics_records(run) if r["iteration"] < k]
            metrics = iteration_metrics(cfg, run, k, collect, train, result, eval_seconds, earlier)
            plot_convergence(write_metrics_record(run, metrics), run / CONVERGENCE_PNG)  # every finished iteration
            tracker.log_iteration(metrics, result, it / CURVE_PNG, run / CONVERGENCE_PNG)
            atomic_write_json(it / DONE, metrics)
            log.info("iteration %d done: router AUC %.3f", k, result["auc"].get("router", float("nan")))
        update_run_record(run, progress={"iteration": cfg.loop.iterations, "stage": "done"})
    finally:
        tracker.finish()
    return result
