"""Ray plumbing on a real local Ray: an actor's or a training worker's CiterError reaches the user
as its own one line, not Ray's wrapped traceback; actors get the driver's lease, beside the
environment every Ray process gets."""

import json
import os

import pytest

from pipeline import CiterError
from pipeline.config import load_config
from pipeline.raysession import RAY_WORKER_ENV, shards_on_actors, user_error
from pipeline.runlock import FENCE_ENV, RunLock
from tests.conftest import DEMO_CONFIG

ITEMS = [{"shard": k} for k in range(2)]


def test_a_citer_error_raised_in_an_actor_comes_out_as_itself(local_ray):
    cfg = load_config(DEMO_CONFIG, ["collect.num_actors=1"])

    class DamagedInput:  # defined here, so Ray ships it by value
        def __init__(self, threads: int):
            pass

        def __call__(self, batch):
            raise CiterError(f"data/part-{int(batch['shard'][0]):05d}.json: damaged, not JSON")

    class MissingModel:
        def __init__(self, threads: int):
            raise CiterError("model 'nowhere/llm': no directory nowhere/llm")

        def __call__(self, batch):
            return batch

    for actor, message in ((DamagedInput, r"data/part-0000[01]\.json: damaged, not JSON"),
                           (MissingModel, r"model 'nowhere/llm': no directory nowhere/llm")):
        with pytest.raises(CiterError, match=rf"^{message}$") as caught:
            list(shards_on_actors(actor, ITEMS, {}, cfg, "test"))
        assert type(caught.value) is CiterError and "\n" not in str(caught.value)


@pytest.mark.slow
def test_a_citer_error_raised_in_a_training_worker_is_found_in_ray_trains_failure(local_ray, tmp_path):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        raise CiterError("s3://b/run/iter-000/train/checkpoint_1: damaged training checkpoint")

    trainer = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="t", storage_path=str(tmp_path),
                                                failure_config=FailureConfig(max_failures=0)))
    with pytest.raises(Exception) as caught:  # Ray Train's own failure type, with tracebacks in its text
        trainer.fit()
    assert "Traceback" in str(caught.value)
    found = user_error(caught.value)
    assert type(found) is CiterError and str(found) == "s3://b/run/iter-000/train/checkpoint_1: damaged training " \
                                                       "checkpoint"
    assert user_error(ValueError("a bug")) is None  # anything else keeps its traceback


def test_actors_get_the_drivers_lease_beside_the_environment_of_every_ray_process(local_ray, tmp_path):
    cfg = load_config(DEMO_CONFIG, ["collect.num_actors=1"])

    class ReportEnvironment:
        def __init__(self, threads: int):
            pass

        def __call__(self, batch):
            return {"fences": [os.environ.get(FENCE_ENV, "")], "threads": [os.environ.get("OMP_NUM_THREADS", "")]}

    assert {row["fences"] for row in shards_on_actors(ReportEnvironment, ITEMS[:1], {}, cfg, "test")} == {""}
    with RunLock(tmp_path / "run") as lock:
        rows = list(shards_on_actors(ReportEnvironment, ITEMS[:1], {}, cfg, "test"))
    assert json.loads(rows[0]["fences"]) == [{"location": str(tmp_path / "run"), "token": lock.token}]
    assert rows[0]["threads"] == RAY_WORKER_ENV["OMP_NUM_THREADS"]
