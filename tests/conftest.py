"""Shared fixtures. The demo world is built once per session (about 2 minutes on 2 cores) into
the same cache `make demo` uses, and reused when it is already there. Every test that needs the
SmolLM2 world is marked slow: building it takes about a minute, and its tests take longer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "jobs" / "configs" / "demo.yaml"
GSM8K_DIR = ROOT.parent / "shared" / "data" / "gsm8k"
BUCKET = "citer"  # the bucket of the `s3` fixture's server

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    # Started in the background of a non-interactive shell, which ignores SIGINT in everything it
    # starts: the processes the tests start get it back, as a terminal's foreground process has it.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "smol_world" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def in_repository_root() -> Iterator[None]:
    """Every test runs in the repository root (the configs' paths are relative to it), wherever
    pytest was started, and the starting directory is restored at the end."""
    old = Path.cwd()
    os.chdir(ROOT)
    yield
    os.chdir(old)


@pytest.fixture(autouse=True)
def working_directory_kept() -> Iterator[None]:
    """A test that leaves the working directory changed fails, naming where it left it."""
    yield
    assert Path.cwd() == ROOT, f"the test left the working directory at {Path.cwd()}, not {ROOT}"


@pytest.fixture(scope="session")
def demo_world() -> Path:
    """The demo world directory, built if absent (through the library, as `citer` would)."""
    from pipeline.config import load_config
    from pipeline.worlds.demo import ensure_demo_world

    cfg = load_config(DEMO_CONFIG)
    ensure_demo_world(cfg.demo)
    return ROOT / cfg.demo.out


def citer_env(**extra: str) -> dict[str, str]:
    """The environment a user's `citer` starts with: this one, less the W&B service address that an
    in-process W&B run of an earlier test left in it (a child would share that service otherwise)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, **extra}


def run_citer(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run the installed CLI as a user would, capturing its output."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=citer_env(),
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def local_ray():
    """A small real local Ray for the module's tests, shut down afterwards."""
    import ray

    from pipeline.raysession import RAY_TRAIN_ENV, RAY_WORKER_ENV

    os.environ.setdefault("CITER_OBJECT_STORE_BYTES", str(300 * 2**20))
    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**RAY_WORKER_ENV, **RAY_TRAIN_ENV}})
    yield ray
    ray.shutdown()


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free local ports: all held open while chosen, since a port just closed may be
    handed out again at once."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="session")
def s3(s3_server) -> dict[str, str]:
    """The environment an S3 client of `s3_server` needs (endpoint and credentials), also set in
    this process's environment while the server runs."""
    return s3_server[0]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS server (master, volume, filer, S3 gateway) on free local ports with bucket
    `citer`; yields (the environment a client needs, the server's process)."""
    import pyarrow.fs

    weed = Path(sys.executable).parent / "weed"
    data = tmp_path_factory.mktemp("seaweedfs")
    names = ("master", "volume", "filer", "s3")
    chosen = free_ports(2 * len(names))
    ports = dict(zip(names, chosen[: len(names)], strict=True))
    args = [str(weed), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
            "-master.volumeSizeLimitMB=64", "-volume.max=8", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    for (name, port), grpc in zip(ports.items(), chosen[len(names):], strict=True):
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={grpc}"]
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
        yield env, proc
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        kill_session(proc.pid)
        proc.wait()
        log.close()


def kill_session(pid: int) -> None:
    """SIGKILL every process a driver started: its session (the driver and the Ray it started)
    and the `wandb-core` it started in a session of its own (`--pid <driver>` on its command line)."""
    import signal

    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
                core = args[0].endswith(b"wandb-core") and args[args.index(b"--pid") + 1] == str(pid).encode()
                if core or os.getsid(int(entry.name)) == pid:
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass


def digest(directory: Path, pattern: str = "part-*.parquet", skip: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file under `directory` matching `pattern` (by default a collect stage's
    shards), by relative path, leaving out the names in `skip`."""
    import hashlib

    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob(pattern)) if p.is_file() and p.name not in skip}


@pytest.fixture(scope="session")
def smol_world() -> Path:
    """The smol world directory (SmolLM2-135M-Instruct and its cut SLM), built if absent into the
    same cache `citer build-smol` uses (30 s to 1.5 minutes on 2 cores); skipped, saying why, when
    it is absent and the optional `real` extra is not installed."""
    from pipeline import CiterError
    from pipeline.config import SmolConfig
    from pipeline.worlds.smol import ensure_smol_world, is_built, require_extra

    cfg = SmolConfig()
    if not is_built(cfg):
        try:
            require_extra()
        except CiterError as e:
            pytest.skip(str(e))
    ensure_smol_world(cfg)
    return ROOT / cfg.out
