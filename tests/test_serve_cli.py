"""`citer serve` as a user runs it: refusals before anything starts, a real server on 127.0.0.1 that
answers the openai client and goes away on Ctrl-C (port closed, its Ray stopped), and the Serve
config file for `serve run` / `serve deploy`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import torch
import yaml

from pipeline import CiterError
from pipeline.router import Router, RouterSpec, save_router
from pipeline.rundir import router_dir
from tests.conftest import DEMO_CONFIG, ROOT, citer_env, free_port, kill_session

pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")  # Ray Serve's own
SERVE_CONFIG = ROOT / "jobs" / "serve" / "demo.yaml"
SMOL_CONFIG = ROOT / "jobs" / "configs" / "smol-gsm8k.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_world) -> Path:
    """A run directory with an untrained router for the demo pair at iterations 0 and 1."""
    directory = tmp_path_factory.mktemp("serve-run")
    torch.manual_seed(0)
    for iteration in (0, 1):
        save_router(Router(RouterSpec(input_size=48)).eval(), router_dir(directory, iteration))
    return directory


def session_processes(sid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def refused(capsys, *argv: str) -> str:
    """The one-line error `citer serve ARGV` exits with (code 2), run in this process; Ray never started."""
    import ray

    from pipeline.cli import main

    assert main(["serve", *argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("citer: error:")]
    assert len(lines) == 1 and not ray.is_initialized()
    return lines[0]


def test_a_run_without_a_router_is_refused(tmp_path, capsys):
    assert "no trained router" in refused(capsys, str(DEMO_CONFIG), "--run", str(tmp_path))
    assert "iter-003" in refused(capsys, str(DEMO_CONFIG), "--run", str(tmp_path), "--iteration", "3")


def test_a_bad_threshold_a_busy_port_and_what_a_replica_would_refuse_are_refused(run, smol_world, capsys):
    demo = [str(DEMO_CONFIG), "--run", str(run)]
    assert "--threshold must be in [0, 1]" in refused(capsys, *demo, "--threshold", "1.5")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in refused(capsys, *demo, "--port", str(port))
    assert "serve.max_model_len is 300 but the SLM takes at most 256 positions" in refused(
        capsys, *demo, "serve.max_model_len=300")
    assert "trained for another SLM" in refused(capsys, str(SMOL_CONFIG), "--run", str(run))  # SmolLM2's pair


@pytest.mark.slow
def test_citer_serve_answers_and_ctrl_c_stops_it_and_its_ray(run, demo_world):
    port = free_port()
    env = citer_env(CITER_OBJECT_STORE_BYTES=str(300 * 2**20), RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(DEMO_CONFIG), "--run", str(run),
                             "--iteration", "0", "--port", str(port), "serve.num_cpus_per_replica=1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:  # blocks until the server says it is ready, or exits
            lines.append(line)
            if line.startswith("serving "):
                break
        assert lines and lines[-1].startswith("serving 'demo'"), "".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in lines[-1] and "iter-000" in lines[-1]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "What is 2+3?"}],
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
        tail, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, tail
        assert not listening(port)
        deadline = time.time() + 20
        while session_processes(proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not session_processes(proc.pid), "Ray processes outlived citer serve"
        # Nothing alarming at shutdown (taking Serve down before Ray printed a raylet "Task
        # ServeController.graceful_shutdown failed" line).
        assert "Traceback" not in tail and "failed" not in tail, tail
    finally:
        kill_session(proc.pid)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_the_serve_config_file_names_a_builder_that_builds_the_app(run):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from pipeline.serving.app import build_app

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    module, _, name = app.import_path.partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is build_app
    assert (ROOT / app.args["config"]).is_file() and app.args["run"] == "runs/demo"
    built = build_app({**app.args, "run": str(run), "overrides": "serve.max_batch=4"})
    assert isinstance(built, Application)
    with pytest.raises(CiterError, match="build_app takes"):
        build_app({"config": app.args["config"]})
    with pytest.raises(CiterError, match="iter-007"):
        build_app({**app.args, "run": str(run), "iteration": "7"})
