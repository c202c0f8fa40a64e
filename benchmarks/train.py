"""Train-stage benchmark: the Ray Train + DeepSpeed stage against a plain torch loop, in one run.

All three read the same labelled Parquet shards (synthetic hidden states of a realistic router
width, labels from a noisy linear rule, in the collect stage's schema) and train the same router
for the same epochs on this whole machine:

  - plain torch: one process, all cores, the shards read with pyarrow into one tensor;
  - `citer fit-router` with 1 worker (all cores) and with 2 workers (one core each), gloo.

It prints steady-state training rows/s side by side, as a ratio to the plain loop, and where the
stage's extra wall time goes: data preparation (Ray Data read + split), start-up until the first
epoch begins (worker group, process group, DeepSpeed engine, checkpoint restore), and the time
between epochs (DeepSpeed checkpoint + `ray.train.report`).

Run: python benchmarks/train.py [--rows 120000 --hidden 384 --epochs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.atomic import atomic_write_json
from pipeline.config import Config, ModelsConfig, TaskConfig, TrainConfig
from pipeline.router import Router, router_spec
from pipeline.rundir import DONE, RUN_JSON, collect_dir, shard_path
from pipeline.shards import SCHEMA, read_labels, to_arrays
from pipeline.stages.train import fit_router


def write_shards(run: Path, rows: int, hidden: int, tokens_per_example: int = 50, shard_rows: int = 20_000) -> None:
    """Labelled shards in the collect schema; label 0 ("prefer LLM") on ~5% of rows, learnable."""
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(hidden).astype(np.float32) / np.sqrt(hidden)
    out = collect_dir(run, 0)
    out.mkdir(parents=True)
    for k, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        x = rng.standard_normal((n, hidden)).astype(np.float16)
        score = x.astype(np.float32) @ direction + 0.3 * rng.standard_normal(n)
        label = (score < 1.65).astype(np.int8)
        idx = np.arange(start, start + n)
        table = pa.table({
            "example_id": pa.array([f"train-{i // tokens_per_example:06d}" for i in idx]),
            "position": pa.array(idx % tokens_per_example, type=pa.int32()),
            "token_id": pa.array(np.zeros(n, dtype=np.int32)),
            "slm_token": pa.array(np.zeros(n, dtype=np.int32)),
            "llm_token": pa.array(np.zeros(n, dtype=np.int32)),
            "slm_hidden": pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * hidden, hidden, dtype=np.int32)),
                                                   pa.array(x.reshape(-1))),
            "label": pa.array(label),
            "case": pa.array(np.where(label == 1, 1, 2).astype(np.int8)),
            "rollout_correct": pa.array([None] * n, type=pa.bool_()),
        }, schema=SCHEMA)
        pq.write_table(table, shard_path(out, k))
    atomic_write_json(out / DONE, {"rows": rows})


def plain_torch(run: Path, cfg: Config, hidden: int) -> dict:
    """The baseline: the same router, loss and optimizer in one process, no Ray, no DeepSpeed."""
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    train = to_arrays(read_labels(run, 0, columns=["slm_hidden", "label"]), cfg.seed, cfg.train.val_fraction,
                      validation=False)
    x, y = torch.from_numpy(train["x"].astype(np.float32)), torch.from_numpy(train["y"])
    prepare = time.perf_counter() - t0
    torch.manual_seed(0)
    router = Router(router_spec(hidden, cfg.router))
    opt = torch.optim.AdamW(router.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    rates = []
    for _ in range(cfg.train.epochs):
        t1, n = time.perf_counter(), 0
        router.train()
        for batch in torch.randperm(len(x)).split(cfg.train.batch_size_per_worker):
            if len(batch) < cfg.train.batch_size_per_worker:
                continue
            loss = torch.nn.functional.binary_cross_entropy_with_logits(router(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(router.parameters(), cfg.deepspeed.grad_clip)
            opt.step()
            n += len(batch)
        rates.append(n / (time.perf_counter() - t1))
    return {"prepare_s": prepare, "rows_per_s": statistics.median(rates), "total_s": time.perf_counter() - t0}


def ray_stage(run: Path, cfg: Config) -> dict:
    t0 = time.perf_counter()
    summary = fit_router(cfg, run, 0)
    history = summary["history"]
    gaps = [b["started_at"] - a["started_at"] - a["epoch_seconds"]
            for a, b in zip(history, history[1:], strict=False)]
    return {
        "rows_per_s": statistics.median(m["train_rows_per_s"] for m in history),
        "prepare_s": summary["prepare_seconds"],
        "startup_s": history[0]["started_at"] - summary["fit_started_at"],
        "between_epochs_s": statistics.mean(gaps) if gaps else None,  # one epoch: no gap
        "data_wait": statistics.median(m["train_data_wait_share"] for m in history),
        "total_s": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=120_000)
    parser.add_argument("--hidden", type=int, default=384, help="router input width (the SLM's hidden size)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    os.environ.setdefault("CITER_OBJECT_STORE_BYTES", str(1024 * 2**20))

    with tempfile.TemporaryDirectory(prefix="citer-bench-train-") as tmp:
        tmp = Path(tmp)
        slm = tmp / "slm"  # only its config.json is read: the hidden size the shards must match
        slm.mkdir()
        (slm / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": args.hidden}))
        base = Config(models=ModelsConfig(slm=str(slm), llm=str(slm)),
                      task=TaskConfig(train_path="unused", eval_path="unused"),
                      train=TrainConfig(epochs=args.epochs, batch_size_per_worker=args.batch_size, patience=100))
        template = tmp / "template"
        write_shards(template, args.rows, args.hidden)
        print(f"{args.rows:,} labelled rows, hidden {args.hidden}, {args.epochs} epochs, batch {args.batch_size} "
              f"per worker, {cores} cores")

        results = {"plain torch, 1 process": plain_torch(template, base, args.hidden)}
        import shutil

        for workers in (1, 2):
            run = tmp / f"run-{workers}"
            shutil.copytree(template, run)
            (run / RUN_JSON).unlink(missing_ok=True)
            cfg = Config(**{**base.__dict__, "train": TrainConfig(**{
                **base.train.__dict__, "num_workers": workers, "cpus_per_worker": cores / workers})})
            results[f"Ray Train + DeepSpeed, {workers} worker{'s' if workers > 1 else ''}"] = ray_stage(run, cfg)

    import ray

    ray.shutdown()
    ref = results["plain torch, 1 process"]["rows_per_s"]
    print(f"\n{'':34} {'rows/s':>8} {'vs plain':>9} {'data wait':>10} {'prepare':>8} {'start-up':>9} "
          f"{'epoch gap':>10} {'total':>7}")
    for name, r in results.items():
        wait = f"{r['data_wait']:.0%}" if "data_wait" in r else "-"
        gap = r.get("between_epochs_s", 0)
        print(f"{name:34} {r['rows_per_s']:8,.0f} {r['rows_per_s'] / ref:8.2f}x {wait:>10} {r['prepare_s']:7.1f}s "
              f"{r.get('startup_s', 0):8.1f}s {'-' if gap is None else f'{gap:.2f}s':>10} {r['total_s']:6.1f}s")
    print("\nrows/s: training rows per second in steady state (median epoch). data wait: share of a training "
          "epoch\nspent waiting on Ray Data batches. prepare: Ray Data read + split (the plain loop: pyarrow "
          "read).\nstart-up: trainer start to the first epoch. epoch gap: DeepSpeed checkpoint + report between "
          "epochs.")
    if args.json:
        figures = {name: {**r, "vs_plain_torch": r["rows_per_s"] / ref} for name, r in results.items()}
        atomic_write_json(args.json, {"rows": args.rows, "hidden": args.hidden, "epochs": args.epochs,
                                      "batch_size_per_worker": args.batch_size, "cores": cores, "results": figures})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
