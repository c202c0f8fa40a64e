"""The train stage: fit the router on an iteration's labelled shards with Ray Train + DeepSpeed.

The driver checks the shards and the DeepSpeed config, splits the labelled tokens into train and
validation **by example id** (a seeded hash, so a problem's tokens never straddle the split),
and runs a `TorchTrainer`. Each worker:
- builds the router and a DeepSpeed engine from `deepspeed_config(cfg)`;
- reads its part of the training data with `ray.train.get_dataset_shard` (and the whole
  validation split, so every rank's validation metrics are exact and the same);
- per epoch trains with BCE on the router's logit, validates, all-reduces the training sums, and
  reports the metrics with a checkpoint: every rank saves its DeepSpeed shard, and rank 0 the
  router's weights as safetensors (`router.safetensors`), which is what the driver exports.

DeepSpeed's checkpoints are pickles. A worker resuming from one (files in shared storage) loads
them with `torch.load(weights_only=True)` and an allowlist of the few DeepSpeed types they hold
(`SafeCheckpointEngine`); the driver never unpickles them at all.

Early stopping on validation loss with `train.patience`. The Ray Train run lives in
`<run>/iter-NNN/train/` (its name is the stage, its storage the iteration), so running the stage
again continues from the last checkpoint, and `FailureConfig(max_failures)` restarts failed
workers from it. At the end the best epoch's weights are exported to `<run>/iter-NNN/router/`,
the format the decoder loads, and `train/_DONE` is written last.

Label 1 means "the SLM's token is good enough"; the router outputs P(label 1). "Prefer LLM" is
label 0, the minority class on any sensible task, and the one `train.class_weight` weights.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pipeline import CiterError
from pipeline.atomic import atomic_directory, atomic_write_json
from pipeline.config import Config, from_dict
from pipeline.raysession import ensure_ray, no_gpu_deepspeed, no_shm_op, one_line, user_error
from pipeline.rundir import (
    DONE,
    TRAIN_DIR,
    iteration_dir,
    read_train_summary,
    router_dir,
)
from pipeline.runlock import fence_for
from pipeline.shards import feature_columns, labelled_shards, split_counts, to_arrays
from pipeline.storage import StoragePath, arrow_paths, location_text, run_path

log = logging.getLogger(__name__)

TAG = "citer"  # DeepSpeed checkpoint tag inside every Ray checkpoint
PER_RUN = ("best_epoch", "stopped_early", "resumed_from")  # report keys about the run, not the epoch


# ---------------------------------------------------------------------------------------------
# Configuration and input checks (driver side, before any worker starts)


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed config for one worker: citer's settings with `deepspeed.extra` merged over them."""
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size_per_worker,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay,
                                                  "torch_adam": True}},
        "gradient_clipping": cfg.deepspeed.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(generated, cfg.deepspeed.extra)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def check_deepspeed_config(ds_config: dict[str, Any]) -> None:
    """Let DeepSpeed parse the config now, so a bad section fails here and not in every worker."""
    no_gpu_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = {k: v for k, v in ds_config.items() if k != "train_batch_size"}  # depends on the world size
    try:
        DeepSpeedConfig(probe)
    except Exception as e:  # pydantic's ValidationError, or DeepSpeed's own asserts
        if hasattr(e, "errors") and hasattr(e, "title"):
            detail = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            detail = f"{detail} (in DeepSpeed's {e.title})"
        else:
            detail = f"{type(e).__name__}: {e}"
        raise CiterError(f"DeepSpeed rejected the config built from 'deepspeed' and 'deepspeed.extra': {detail}") \
            from None


# ---------------------------------------------------------------------------------------------
# The per-worker loop


def safe_checkpoint_globals() -> list:
    """The non-tensor types DeepSpeed (0.19) pickles into its checkpoints; `torch.load` with
    `weights_only=True` rebuilds these and nothing else (no code runs on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@functools.cache
def safe_checkpoint_engine() -> type:
    """DeepSpeed's TorchCheckpointEngine, loading with `weights_only=True` (its own passes
    `weights_only=False`, which runs whatever code a tampered checkpoint holds)."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(safe_checkpoint_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeCheckpointEngine


def use_safe_checkpoint_engine(engine) -> None:
    """Make `engine` load its checkpoints through `safe_checkpoint_engine()`."""
    base = safe_checkpoint_engine().__mro__[1]
    if type(engine.checkpoint_engine) is not base:
        raise CiterError(f"DeepSpeed chose the {type(engine.checkpoint_engine).__name__} checkpoint engine; "
                         "citer loads checkpoints only through its safe version of TorchCheckpointEngine")
    engine.checkpoint_engine.__class__ = safe_checkpoint_engine()


def quiet_train_worker_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO from every rank; rank 0 prints one line
    per epoch instead. (Ray 2.60 names one of those loggers after its file, not its module.)"""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def start_engine(config: dict[str, Any], cfg: Config, rank: int) -> tuple[Any, dict[str, Any]]:
    """The worker's DeepSpeed engine around a fresh (or warm-started) router, and the training
    state: a new one, or the last checkpoint's when Ray Train restarts or resumes the stage."""
    import deepspeed
    import ray.train

    from pipeline.router import Router, read_weights, spec_from_dict

    no_shm_op()
    router = Router(spec_from_dict(config["spec"]))
    if config.get("warm_start"):
        router.load_state_dict(read_weights(config["warm_start"], "warm-start router"))
    engine, *_ = deepspeed.initialize(model=router, model_parameters=router.parameters(),
                                      config=config["deepspeed"], dist_init_required=False)
    use_safe_checkpoint_engine(engine)
    state: dict[str, Any] = {"epoch": 0, "best_epoch": None, "best_val_loss": math.inf, "bad_epochs": 0,
                             "stopped": False, "resumed_from": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            try:
                _, client_state = engine.load_checkpoint(d, tag=TAG)
            except Exception as e:  # torch's and DeepSpeed's errors for a cut-short or foreign file
                raise CiterError(f"{checkpoint.path}: damaged training checkpoint ({type(e).__name__}: {e}); delete "
                                 "that folder to resume from the checkpoint before it") from None
        state = client_state["citer"]
        state["resumed_from"].append(state["epoch"])
        if rank == 0:
            print(f"[citer] resuming router training after epoch {state['epoch']}", flush=True)
    return engine, state


class LossTerms:
    """The weighted BCE of a batch (sum over rows) and its logits; label 0 is "prefer the LLM",
    weighted by train.class_weight."""

    def __init__(self, engine, class_weight: float | None) -> None:
        self.engine = engine
        self.dtype = next(engine.module.parameters()).dtype
        self.weight0 = class_weight or 1.0

    def __call__(self, x, y):
        import torch

        logits = self.engine(x.to(self.engine.device, self.dtype)).float()
        w = torch.where(y > 0.5, 1.0, self.weight0)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=w, reduction="sum"), logits


def train_epoch(engine, loss_terms: LossTerms, shard, tc, seed: int, epoch: int) -> tuple[list[float], float, float]:
    """One pass over this worker's training shard: [loss sum, rows], its seconds and the seconds
    spent waiting for data."""
    import torch
    import torch.distributed as dist

    t0 = time.perf_counter()
    engine.train()
    sums = torch.zeros(2, dtype=torch.float64)  # loss, rows
    data_seconds, t_wait = 0.0, time.perf_counter()
    for batch in shard.iter_torch_batches(batch_size=tc.batch_size_per_worker, drop_last=True,
                                          local_shuffle_buffer_size=4 * tc.batch_size_per_worker,
                                          local_shuffle_seed=seed * 10_000 + epoch):
        data_seconds += time.perf_counter() - t_wait
        y = batch["y"].to(engine.device)
        loss_sum, _ = loss_terms(batch["x"], y)
        engine.backward(loss_sum / len(y))
        engine.step()
        sums += torch.tensor([loss_sum.item(), len(y)], dtype=torch.float64)
        t_wait = time.perf_counter()
    train_seconds = time.perf_counter() - t0
    sums = sums.to(engine.device)
    dist.all_reduce(sums)
    return sums.tolist(), train_seconds, data_seconds


def validate(engine, loss_terms: LossTerms, shard) -> list[float]:
    """[loss sum, rows, correct, tp, fp, fn] ("prefer LLM" is the positive class) over the whole
    validation split, which every rank validates, with rank 0's BatchNorm statistics (the ones it exports)."""
    import torch
    import torch.distributed as dist

    for buffer in engine.module.buffers():
        dist.broadcast(buffer, src=0)
    engine.eval()
    val = torch.zeros(6, dtype=torch.float64)
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=4096):
            y = batch["y"].to(engine.device)
            loss_sum, logits = loss_terms(batch["x"], y)
            llm_pred, llm_true = logits < 0, y < 0.5
            val += torch.tensor([loss_sum.item(), len(y), (llm_pred == llm_true).sum().item(),
                                 (llm_pred & llm_true).sum().item(), (llm_pred & ~llm_true).sum().item(),
                                 (~llm_pred & llm_true).sum().item()], dtype=torch.float64)
    return val.tolist()


def epoch_metrics(epoch: int, train: list[float], val: list[float], train_seconds: float, data_seconds: float,
                  started: tuple[float, float]) -> dict[str, Any]:
    """What an epoch reports to Ray Train (and the run's metrics), from the summed counts."""
    loss, rows = train
    vloss, vrows, correct, tp, fp, fn = val
    return {
        "epoch": epoch,
        "train_loss": loss / max(rows, 1),
        "val_loss": vloss / max(vrows, 1),
        "val_accuracy": correct / max(vrows, 1),
        "val_precision_llm": tp / (tp + fp) if tp + fp else 0.0,
        "val_recall_llm": tp / (tp + fn) if tp + fn else 0.0,
        "val_majority_rate": max(tp + fn, vrows - tp - fn) / max(vrows, 1),
        "train_rows": int(rows),
        "train_rows_per_s": rows / train_seconds if train_seconds > 0 else None,
        "train_data_wait_share": data_seconds / train_seconds if train_seconds > 0 else None,  # rank 0
        "epoch_seconds": time.perf_counter() - started[1],
        "started_at": started[0],
    }


def early_stopping(state: dict[str, Any], metrics: dict[str, Any], patience: int) -> None:
    """Record the epoch in the training state (best epoch, epochs without improvement, whether to
    stop) and the state's view in the epoch's metrics."""
    if metrics["val_loss"] < state["best_val_loss"] - 1e-7:
        state.update(best_val_loss=metrics["val_loss"], best_epoch=metrics["epoch"], bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    state["epoch"], state["stopped"] = metrics["epoch"], state["bad_epochs"] >= patience
    metrics.update(best_epoch=state["best_epoch"], stopped_early=state["stopped"],
                   resumed_from=list(state["resumed_from"]))


def report_epoch(engine, state: dict[str, Any], metrics: dict[str, Any], config: dict[str, Any], cfg: Config,
                 rank: int) -> None:
    """Print the epoch (rank 0), then checkpoint it (DeepSpeed's files and the router's whole
    weights) and report both to Ray Train."""
    import ray.train
    from safetensors.torch import save_file

    from pipeline.router import WEIGHTS

    if rank == 0:
        print(f"[citer] epoch {metrics['epoch']}/{cfg.train.epochs}: train loss {metrics['train_loss']:.4f}, val loss "
              f"{metrics['val_loss']:.4f}, val accuracy {metrics['val_accuracy']:.2%} (majority "
              f"{metrics['val_majority_rate']:.2%}), prefer-LLM precision {metrics['val_precision_llm']:.2f} "
              f"recall {metrics['val_recall_llm']:.2f}, {metrics['train_rows_per_s'] or 0:,.0f} rows/s"
              + (" - stopping early" if state["stopped"] else ""), flush=True)
    tmp = tempfile.mkdtemp(prefix="citer-ckpt-")
    try:
        engine.save_checkpoint(tmp, tag=TAG, client_state={"citer": state})
        weights = full_state_dict(engine, cfg.deepspeed.zero_stage)
        if rank == 0:
            save_file(weights, str(Path(tmp) / WEIGHTS))
        if config.get("fence"):  # this worker writes into the run only while its driver holds the lease
            config["fence"].check(run_path(config["checkpoints"]))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed engine, epochs, validation, checkpoint + report per epoch."""
    import ray.train
    import torch

    cfg = from_dict(Config, config["cfg"], source="train stage config")
    tc = cfg.train
    quiet_train_worker_logs()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    rank = ray.train.get_context().get_world_rank()
    engine, state = start_engine(config, cfg, rank)
    loss_terms = LossTerms(engine, tc.class_weight)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    while state["epoch"] < tc.epochs and not state["stopped"]:
        epoch = state["epoch"] + 1
        torch.manual_seed(cfg.seed * 10_000 + epoch * 100 + rank)  # dropout: a resumed epoch draws what it would have
        started = time.time(), time.perf_counter()
        train, train_seconds, data_seconds = train_epoch(engine, loss_terms, train_shard, tc, cfg.seed, epoch)
        val = validate(engine, loss_terms, val_shard)
        metrics = epoch_metrics(epoch, train, val, train_seconds, data_seconds, started)
        early_stopping(state, metrics, tc.patience)
        report_epoch(engine, state, metrics, config, cfg, rank)


# ---------------------------------------------------------------------------------------------
# The stage (driver)


def full_state_dict(engine, zero_stage: int) -> dict[str, Any]:
    """The router's whole state dict in fp32, as the module validated it (under ZeRO-3 gathered
    from every rank, so every rank must call this)."""

    def plain() -> dict[str, Any]:
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
                for k, v in engine.module.state_dict().items()}

    if zero_stage < 3:
        return plain()
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        return plain()


def read_splits(cfg: Config, files: list[StoragePath], features: tuple[str, ...]) -> dict[str, Any]:
    """The labelled shards as Ray datasets "train" and "val" (split by example), materialized."""
    import ray.data
    from ray.train import DataConfig

    paths, fs = arrow_paths(files)
    # Rows keep the shards' order and every worker gets the same rows each run, so on one cluster
    # shape (Ray Data sizes read blocks from its CPUs) training is a function of the labels and the
    # seed: two iterations whose labels agree train the same router (unless warm-started).
    ordered = DataConfig.default_ingest_options()
    ordered.preserve_order = True
    source = ray.data.read_parquet(paths, filesystem=fs).select_columns(
        ["example_id", *feature_columns(features), "label"])
    source.context.execution_options = copy.deepcopy(ordered)  # the splits below inherit it
    # Materialized before the workers take their CPUs, so no data task waits on a train worker's slot.
    return {name: source.map_batches(to_arrays, batch_format="pyarrow",
                                     fn_kwargs={"seed": cfg.seed, "fraction": cfg.train.val_fraction,
                                                "validation": name == "val", "features": features}).materialize()
            for name in ("train", "val")}


def make_trainer(cfg: Config, run: StoragePath, it_dir: StoragePath, spec, ds_config: dict[str, Any],
                 warm: StoragePath | None, splits: dict[str, Any]):
    """Ray Train's TorchTrainer for the stage: its workers, checkpoints under it_dir/train, retries."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.router import spec_dict

    tc = cfg.train
    (storage_path,), storage_fs = arrow_paths([it_dir])
    ordered = DataConfig.default_ingest_options()
    ordered.preserve_order = True
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": tc.gpus_per_worker} if tc.gpus_per_worker else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "spec": spec_dict(spec),
                           "deepspeed": ds_config,
                           "warm_start": location_text(warm) if tc.warm_start and warm is not None else None,
                           "fence": fence_for(run), "checkpoints": location_text(it_dir / TRAIN_DIR)},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=TRAIN_DIR, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(checkpoint_score_attribute="val_loss",
                                                                checkpoint_score_order="min")),
        datasets=splits,
        # Validation is not split: with ray's equal shards a few rows would be left out, and the
        # exported router's metrics would not be exactly those of its epoch.
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ordered),
    )


def run_trainer(trainer, iteration: int, it_dir: StoragePath) -> tuple[Any, list[dict[str, Any]]]:
    """Fit; Ray's result and the epochs' metrics in order. A worker's user error reaches the user
    as its own line; any other failure says where the checkpoints to continue from are."""
    on_sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; say which stage failed and where its state is
        if (found := user_error(e)) is not None:
            raise found from None
        raise CiterError(f"router training for iteration {iteration} failed ({one_line(e)}); "
                         f"its checkpoints are in {it_dir / TRAIN_DIR}, rerun to continue") from None
    finally:
        if on_sigint is not None:  # fit() leaves Ray's handler (abort this fit, else exit 0) in place
            signal.signal(signal.SIGINT, on_sigint)
    history = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])
    if not history:
        raise CiterError(f"router training for iteration {iteration} reported no epoch")
    return result, history


def best_router(result, spec, iteration: int):
    """The epoch with the lowest validation loss (the earliest of equals), its router and metrics."""
    from pipeline.router import WEIGHTS, Router, read_weights

    best_ckpt, best = min(result.best_checkpoints, key=lambda cm: (cm[1]["val_loss"], cm[1]["epoch"]))
    router = Router(spec)
    with best_ckpt.as_directory() as d:
        # The weights rank 0 saved beside the DeepSpeed shards: safetensors, so nothing is unpickled.
        router.load_state_dict(read_weights(Path(d) / WEIGHTS, f"router training of iteration {iteration}"))
    return router, best


def fit_router(cfg: Config, run: str | StoragePath, iteration: int) -> dict[str, Any]:
    """Train the router of `iteration` (resuming an interrupted run); export the best epoch; return
    the summary written to `train/_DONE`."""
    from pipeline.router import CONFIG, WEIGHTS, router_spec, save_router

    run = run_path(run).resolve()
    it_dir = iteration_dir(run, iteration)
    done = it_dir / TRAIN_DIR / DONE
    if done.is_file():
        log.info("train stage of iteration %d is complete (%s); skipping", iteration, done)
        return read_train_summary(done)
    ds_config = deepspeed_config(cfg)
    check_deepspeed_config(ds_config)  # before the stage writes anything (a start's open_run checked it too)
    started = time.perf_counter()
    files, widths = labelled_shards(run, iteration, cfg.router.features, cfg.models.slm, cfg.models.trust_remote_code)
    tc = cfg.train
    counts = split_counts(run, iteration, cfg.seed, tc.val_fraction)
    spec = router_spec(widths["hidden"], cfg.router, top_k=widths.get("topk", 0),
                       embedding_size=widths.get("token_embedding", 0))
    warm = router_dir(run, iteration - 1) / WEIGHTS if iteration > 0 else None
    if tc.warm_start and warm is not None and not warm.is_file():
        raise CiterError(f"train.warm_start is on, but {warm} does not exist")
    log.info("train iteration %d: %d train / %d validation tokens (%d / %d examples), %d workers, ZeRO %d",
             iteration, counts["train_rows"], counts["val_rows"], counts["train_examples"],
             counts["val_examples"], tc.num_workers, cfg.deepspeed.zero_stage)

    ensure_ray()
    t0 = time.perf_counter()
    splits = read_splits(cfg, files, spec.features)
    prepare_seconds = time.perf_counter() - t0
    trainer = make_trainer(cfg, run, it_dir, spec, ds_config, warm, splits)
    t1, fit_started_at = time.perf_counter(), time.time()
    result, history = run_trainer(trainer, iteration, it_dir)
    fit_seconds = time.perf_counter() - t1
    router, best = best_router(result, spec, iteration)
    summary = {
        "iteration": iteration,
        "best_epoch": best["epoch"],
        "epochs_run": history[-1]["epoch"],
        "stopped_early": bool(history[-1].get("stopped_early")),
        "resumed_from": history[-1].get("resumed_from", []),
        "best": {k: v for k, v in best.items() if k not in PER_RUN},
        "history": [{k: v for k, v in m.items() if k not in PER_RUN} for m in history],
        "split": counts,
        "num_workers": tc.num_workers,
        "zero_stage": cfg.deepspeed.zero_stage,
        "prepare_seconds": prepare_seconds,
        "fit_seconds": fit_seconds,
        "fit_started_at": fit_started_at,
        "rows_per_s": sum(m["train_rows"] for m in history) / fit_seconds,
        "router_parameters": sum(p.numel() for p in router.parameters()),
        "features": list(spec.features),
        "wall_seconds": time.perf_counter() - started,  # the whole stage, in the call that completed it
    }
    with atomic_directory(router_dir(run, iteration), last=(CONFIG,)) as tmp:
        save_router(router.eval(), tmp, meta={"iteration": iteration, "epoch": best["epoch"],
                                              "metrics": summary["best"], "slm": cfg.models.slm})
    atomic_write_json(done, summary)
    log.info("router of iteration %d: epoch %d of %d, val loss %.4f, val accuracy %.2f%% -> %s", iteration,
             best["epoch"], summary["epochs_run"], best["val_loss"], 100 * best["val_accuracy"],
             router_dir(run, iteration))
    return summary
