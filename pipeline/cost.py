"""What a run's stages cost, and after how many generated tokens the router pays for it.

A stage holds devices for its wall-clock time: the collect and evaluate stages `collect.num_actors`
actors of `collect.num_cpus_per_actor` CPUs and `collect.num_gpus_per_actor` GPUs, the train stage
`train.num_workers` workers of `train.cpus_per_worker` CPUs and `train.gpus_per_worker` GPUs (as
configured: what the stage reserves, not what it kept busy). Its cost is devices x seconds.

Break-even: the evaluation measures the time per generated token of the LLM alone and of router
decoding at its headline point, at the same batch size, on one evaluation actor. Their difference
times that actor's devices is what each routed token saves, in device-seconds; the training cost
(every stage of every iteration so far) divided by it is the number of generated tokens after
which the router has paid for itself, or "never" when routing is slower. The unit is GPU-seconds
when the actors hold GPUs, else CPU-seconds.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config

STAGES = ("collect", "train", "evaluate")


def stage_devices(cfg: Config, stage: str) -> dict[str, float]:
    """CPUs and GPUs a stage holds while it runs."""
    if stage == "train":
        t = cfg.train
        return {"cpus": t.num_workers * t.cpus_per_worker, "gpus": t.num_workers * t.gpus_per_worker}
    c = cfg.collect
    return {"cpus": c.num_actors * c.num_cpus_per_actor, "gpus": c.num_actors * c.num_gpus_per_actor}


def stage_cost(cfg: Config, stage: str, wall_seconds: float) -> dict[str, float]:
    """Wall-clock seconds and device-seconds of one stage."""
    devices = stage_devices(cfg, stage)
    return {"wall_seconds": wall_seconds, "cpu_seconds": devices["cpus"] * wall_seconds,
            "gpu_seconds": devices["gpus"] * wall_seconds}


def cost_metrics(cfg: Config, walls: dict[str, float], earlier: list[dict[str, Any]]) -> dict[str, float]:
    """The metrics of an iteration's cost: per stage, for the iteration and for the run so far
    (`earlier`: the previous iterations' records)."""
    m: dict[str, float] = {}
    for stage in STAGES:
        for key, value in stage_cost(cfg, stage, walls[stage]).items():
            m[f"cost/{stage}/{key}"] = value
    for key in ("wall_seconds", "cpu_seconds", "gpu_seconds"):
        m[f"cost/iteration/{key}"] = sum(m[f"cost/{stage}/{key}"] for stage in STAGES)
        m[f"cost/total/{key}"] = m[f"cost/iteration/{key}"] + sum(r.get(f"cost/iteration/{key}", 0.0) for r in earlier)
    return m


def break_even(cfg: Config, total: dict[str, float], time_per_token: dict[str, Any]) -> dict[str, Any]:
    """Generated tokens after which routing has saved the training cost `total` ({"cpu_seconds",
    "gpu_seconds"}): None with `never` True where routing is not faster, None with `never` None
    where the router never reached the target accuracy (nothing to compare)."""
    c = cfg.collect
    unit = "gpu" if c.num_gpus_per_actor > 0 else "cpu"
    devices = c.num_gpus_per_actor if unit == "gpu" else c.num_cpus_per_actor
    llm, router = time_per_token.get("llm"), time_per_token.get("router")
    out = {"unit": f"{unit.upper()}-seconds", "training_cost": total[f"{unit}_seconds"],
           "llm_seconds_per_token": llm, "router_seconds_per_token": router, "tokens": None, "never": None,
           "saving_per_token": None}
    if llm is None or router is None:
        return out
    saving = (llm - router) * devices
    out.update(saving_per_token=saving, never=saving <= 0, tokens=out["training_cost"] / saving if saving > 0 else None)
    return out


def break_even_text(b: dict[str, Any]) -> str:
    """One line for the final summary and `citer status`."""
    cost = f"training cost {b['training_cost']:,.0f} {b['unit']}"
    if b["never"] is None:
        return f"break-even: {cost}; the router did not reach the target accuracy, so no routed decoding to compare"
    times = (f"{1000 * b['router_seconds_per_token']:.2f} ms per generated token routed vs "
             f"{1000 * b['llm_seconds_per_token']:.2f} ms with the LLM alone")
    if b["never"]:
        return f"break-even: never ({cost}; routing is slower here: {times})"
    return f"break-even after {b['tokens']:,.0f} generated tokens ({cost}; {times})"
