"""The train stage: Ray Train + DeepSpeed (gloo, CPU) on collected shards, resume, export, bad input.

The driver stopped mid-training and restarted is tested with `citer train` in test_loop.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline import CiterError
from pipeline.config import load_config
from pipeline.models import load_pair
from pipeline.router import WEIGHTS, load_router
from pipeline.rundir import TRAIN_DIR, collect_dir, iteration_dir
from pipeline.shards import is_validation, read_labels
from pipeline.stages.collect import run_collect
from pipeline.stages.evaluate import evaluate_methods
from pipeline.stages.loop import open_run, run_loop
from pipeline.stages.train import fit_router
from pipeline.tasks import load_examples
from tests.conftest import DEMO_CONFIG, ROOT, run_citer

LABELS = ["collect.shard_size=100"]  # all 2,000 training problems of the demo world
# Epochs slow enough (small batches) for a kill to land part-way, never stopped early.
TRAIN = ["train.batch_size_per_worker=128", "train.epochs=6", "train.patience=10", "deepspeed.zero_stage=2"]


def config(*overrides: str):
    return load_config(DEMO_CONFIG, [*LABELS, *overrides])


@pytest.fixture(scope="module")
def labelled(local_ray, demo_world, tmp_path_factory) -> Path:
    """A run directory whose iteration 0 is collected from the demo world's 2,000 training problems."""
    run = tmp_path_factory.mktemp("labelled") / "run"
    run_collect(config(), open_run(config(), run), 0)
    return run


def copy_labels(labelled: Path, to: Path, shards: int | None = None) -> Path:
    """A new run starting from the labelled shards, or from the first `shards` of them (run.json
    goes: its train keys may differ)."""
    shutil.copytree(labelled, to)
    (to / "run.json").unlink()
    for extra in sorted(collect_dir(to, 0).glob("part-*.parquet"))[shards:] if shards else []:
        extra.unlink()
    return to


def val_accuracy(run: Path, router_dir: Path, seed: int = 0, fraction: float = 0.1) -> float:
    """The exported router's accuracy on the validation examples, recomputed from the shards."""
    table = read_labels(run, 0, columns=["slm_hidden", "label"])
    val = np.array([is_validation(i, seed, fraction) for i in table.column("example_id").to_pylist()])
    x = torch.tensor(np.stack(table.column("slm_hidden").to_numpy(zero_copy_only=False)[val]).astype(np.float32))
    y = np.asarray(table.column("label"))[val]
    keep = load_router(router_dir).router.prob(x).numpy() >= 0.5
    return float((keep == (y == 1)).mean())


@pytest.fixture(scope="module")
def trained(labelled, tmp_path_factory) -> tuple[Path, dict]:
    """The labelled run trained without interruption, and its summary (with SIGINT's handlers
    before and after, under "sigint")."""
    run = copy_labels(labelled, tmp_path_factory.mktemp("trained") / "run")
    before = signal.getsignal(signal.SIGINT)
    summary = fit_router(config(*TRAIN), run, 0)
    return run, {**summary, "sigint": (before, signal.getsignal(signal.SIGINT))}


@pytest.mark.slow
def test_router_beats_the_majority_rate_and_random_routing(trained):
    run, summary = trained
    before, after = summary["sigint"]
    assert after is before  # Ray Train's fit() installs its own handler (abort this fit) and leaves it
    best = summary["best"]
    history = summary["history"]
    assert [m["epoch"] for m in history] == list(range(1, summary["epochs_run"] + 1))
    assert best["val_loss"] == min(m["val_loss"] for m in history)
    # Label 1 ("SLM is enough") is the majority; beat it clearly: a fifth of its errors gone, or more.
    # (Case-3 labels are rollout outcomes, noisy by nature: 30% of the errors went in one measured run.)
    majority = best["val_majority_rate"]
    assert majority > 0.85 and 1 - best["val_accuracy"] < 0.8 * (1 - majority)
    assert best["val_precision_llm"] > 0.5 and best["val_recall_llm"] > 0.3

    router_dir = iteration_dir(run, 0) / "router"
    saved = load_router(router_dir, expected_input_size=48)
    assert saved.meta["epoch"] == summary["best_epoch"] and saved.meta["metrics"]["val_loss"] == best["val_loss"]
    # What was exported is the best epoch itself: it reproduces that epoch's validation accuracy.
    assert val_accuracy(run, router_dir) == pytest.approx(best["val_accuracy"], abs=1e-9)
    assert json.loads((iteration_dir(run, 0) / TRAIN_DIR / "_DONE").read_text())["best_epoch"] == best["epoch"]

    ecfg = config("eval.n_examples=100", "eval.methods=[router,random]", "eval.thresholds=[0.5,0.8,0.95]",
                  "eval.random_ratios=[0.1,0.3,0.6]")
    pair = load_pair(ecfg.models)
    examples = load_examples(ecfg.task, "eval", limit=100)
    result = evaluate_methods(pair, saved.router, examples, ecfg)
    assert result["auc"]["router"] > result["auc"]["random"] + 0.1


@pytest.mark.slow
def test_killed_worker_resumes_to_the_same_router(labelled, trained, tmp_path):
    """A worker killed mid-training is restarted from the last checkpoint, and the run ends with
    the very router an uninterrupted run trains: rows reach each worker in a fixed order and every
    epoch seeds its own dropout draws."""
    run = copy_labels(labelled, tmp_path / "run")
    cfg = config(*TRAIN, "train.max_failures=2")
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("summary", fit_router(cfg, run, 0)))
    thread.start()
    train_dir = iteration_dir(run, 0) / TRAIN_DIR
    deadline = time.time() + 300
    while len(list(train_dir.glob("checkpoint_*"))) < 2 and time.time() < deadline and thread.is_alive():
        time.sleep(0.1)
    workers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and b"RayTrainWorker" in _cmdline(p)]
    assert workers, "no Ray Train worker process found to kill"
    os.kill(int(workers[-1].name), signal.SIGKILL)
    killed_after = len(list(train_dir.glob("checkpoint_*")))
    thread.join(timeout=600)
    summary = out["summary"]
    assert 2 <= killed_after < 6, "the kill must land part-way"
    assert summary["epochs_run"] == 6 and [m["epoch"] for m in summary["history"]] == [1, 2, 3, 4, 5, 6]
    # A checkpoint's folder appears just before Ray records it, so the last one seen may not count yet.
    assert len(summary["resumed_from"]) == 1 and 1 <= killed_after - 1 <= summary["resumed_from"][0] <= killed_after
    uninterrupted_run, uninterrupted = trained
    assert [m["val_loss"] for m in summary["history"]] == [m["val_loss"] for m in uninterrupted["history"]]
    ours, theirs = (load_file(str(iteration_dir(r, 0) / "router" / WEIGHTS)) for r in (run, uninterrupted_run))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow
def test_bad_deepspeed_config_shards_and_collect_dir_are_refused(labelled, tmp_path):
    proc = run_citer("fit-router", str(DEMO_CONFIG), "--run", str(tmp_path / "r"),
                     "deepspeed.extra.zero_optimisation={stage: 1}")
    assert proc.returncode == 2
    assert "key 'deepspeed.extra.zero_optimisation': not a DeepSpeed config key (did you mean " \
           "'deepspeed.extra.zero_optimization'?)" in proc.stderr and "demo.yaml" in proc.stderr

    # Refused when a start opens the run, before any stage (so never recorded: the fixed config would
    # then be refused as a different one), and by the train stage itself.
    run = copy_labels(labelled, tmp_path / "run")
    bad = config("deepspeed.extra.zero_optimization={offload_everything: true}")
    for step in (lambda: run_loop(bad, tmp_path / "loop"), lambda: open_run(bad, run), lambda: fit_router(bad, run, 0)):
        with pytest.raises(CiterError, match="DeepSpeed rejected the config .*: offload_everything: Extra inputs are "
                                             r"not permitted \(in DeepSpeed's DeepSpeedZeroConfig\)"):
            step()
    assert not (run / "run.json").exists() and not (tmp_path / "loop").exists()  # the loop collected nothing
    open_run(config(), run)
    assert json.loads((run / "run.json").read_text())["config"]["deepspeed"]["extra"] == {}

    shard = sorted(collect_dir(run, 0).glob("part-*.parquet"))[1]
    table = pq.read_table(shard)
    before = shard.read_bytes()
    short = pa.array([h[:40] for h in table.column("slm_hidden").to_pylist()],
                     type=table.schema.field("slm_hidden").type)
    pq.write_table(table.set_column(table.schema.get_field_index("slm_hidden"), "slm_hidden", short), shard)
    with pytest.raises(CiterError, match=f"{shard.name}: field 'slm_hidden' has 40 values per token, but the SLM "
                                         ".* has hidden size 48"):
        fit_router(config(), run, 0)
    assert not (iteration_dir(run, 0) / TRAIN_DIR).exists()
    shard.write_bytes(before)

    empty = tmp_path / "empty"
    collect_dir(empty, 0).mkdir(parents=True)
    with pytest.raises(CiterError, match="no labelled shards to train on"):
        fit_router(config(), empty, 0)


class _Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_deepspeed_checkpoints_load_without_running_pickled_code(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from pipeline.stages.train import safe_checkpoint_engine

    engine = safe_checkpoint_engine()()
    # What DeepSpeed pickles: tensors, plain values and a few of its own types.
    good = {"module": {"w": torch.arange(6.0).reshape(2, 3)}, "zero_stage": ZeroStageEnum.gradients,
            "loss_scaler": LossScaler(1.0), "client_state": {"citer": {"epoch": 2, "best_val_loss": float("inf")}}}
    torch.save(good, tmp_path / "good.pt")
    loaded = engine.load(str(tmp_path / "good.pt"))
    assert torch.equal(loaded["module"]["w"], good["module"]["w"]) and loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["loss_scaler"].cur_scale == 1.0 and loaded["client_state"] == good["client_state"]

    marker = tmp_path / "code-ran"
    torch.save({"module": _Payload(marker)}, tmp_path / "tampered.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        engine.load(str(tmp_path / "tampered.pt"))
    assert not marker.exists()
    # The check above means something: DeepSpeed's own engine runs the payload.
    TorchCheckpointEngine().load(str(tmp_path / "tampered.pt"))
    assert marker.exists()


def _round_trip_every_stage(port: int) -> None:
    """In a process of its own (one-rank gloo group): for ZeRO 0-3, with and without bf16, a step
    of a DeepSpeed engine built from citer's config, saved, then loaded into a fresh engine through
    the safe checkpoint engine. Prints one line per case, then what torch's extension loader built
    (nothing: DeepSpeed's CPU op is skipped, as in a training worker)."""
    import tempfile

    extensions = tempfile.mkdtemp()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=extensions)

    import deepspeed

    from pipeline.raysession import no_shm_op
    from pipeline.router import Router, RouterSpec
    from pipeline.stages.train import deepspeed_config, full_state_dict, use_safe_checkpoint_engine

    no_shm_op()  # as a training worker does
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in (0, 1, 2, 3):
        for bf16 in (False, True):
            ds = deepspeed_config(config(f"deepspeed.zero_stage={stage}", f"deepspeed.bf16={bf16}",
                                         "train.batch_size_per_worker=8"))
            engines = []
            for seed in (0, 1):
                torch.manual_seed(seed)
                router = Router(RouterSpec(input_size=16))
                engine, *_ = deepspeed.initialize(model=router, model_parameters=router.parameters(), config=ds)
                use_safe_checkpoint_engine(engine)
                engines.append(engine)
            first, fresh = engines
            dtypes = {n: p.dtype for n, p in first.module.named_parameters()}
            x = torch.randn(8, 16).to(dtypes["net.0.weight"])
            first.backward(first(x).float().mean())
            first.step()
            directory = tempfile.mkdtemp()
            first.save_checkpoint(directory, tag="citer", client_state={"citer": {"epoch": 1}})
            _, client = fresh.load_checkpoint(directory, tag="citer")
            a, b = full_state_dict(first, stage), full_state_dict(fresh, stage)
            batchnorm = {str(t.dtype) for n, t in first.module.state_dict().items() if n.startswith("net.1.")}
            print(f"stage {stage} bf16 {bf16} epoch {client['citer']['epoch']} equal "
                  f"{all(torch.equal(a[k], b[k]) for k in a)} linear {dtypes['net.0.weight']} batchnorm "
                  f"{sorted(batchnorm)}", flush=True)
    print("built", sorted(p.name for p in Path(extensions).rglob("*")), flush=True)


@pytest.mark.slow
def test_every_zero_stage_with_and_without_bf16_resumes_through_the_safe_engine():
    from tests.conftest import free_port

    code = f"from tests.test_train import _round_trip_every_stage; _round_trip_every_stage({free_port()})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("stage ")]
    # Under bf16 DeepSpeed casts the BatchNorm's weights and keeps its statistics in fp32 (the router
    # computes that layer in fp32, which CPU batch_norm needs with such a mix).
    low = {False: "['torch.float32', 'torch.int64']", True: "['torch.bfloat16', 'torch.float32', 'torch.int64']"}
    assert lines == [f"stage {s} bf16 {b} epoch 1 equal True linear {'torch.bfloat16' if b else 'torch.float32'} "
                     f"batchnorm {low[b]}" for s in range(4) for b in (False, True)]
    assert "built []" in proc.stdout.splitlines()  # no op compiled: a fresh venv's first training start waited 30 s
