"""Cluster files: every manifest parses, names the pinned Ray, and runs an entrypoint that exists."""

import re
import shlex
from pathlib import Path

import ray
import yaml

from pipeline.config import load_config
from pipeline.submit import EXCLUDES, describe, runtime_env
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
IMAGE_TAG = re.compile(r"^REGISTRY/citer:[\w.]+-ray(?P<ray>[\d.]+)$")


def pinned_ray() -> str:
    pyproject = (ROOT / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)


def images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for v in node.values() for i in images(v)]
    if isinstance(node, list):
        return [i for v in node for i in images(v)]
    return []


def check_entrypoint(command: str) -> None:
    """`python [/app/]jobs/entrypoint.py CONFIG ...`: the script and config exist, the config loads."""
    argv = shlex.split(command)
    assert argv[0] == "python" and argv[1].removeprefix("/app/") == "jobs/entrypoint.py"
    config = ROOT / argv[2].removeprefix("/app/")
    assert config.is_file()
    load_config(config)


def test_the_installed_ray_is_the_pinned_one():
    assert ray.__version__ == pinned_ray()


def test_kuberay_manifests_name_the_pinned_ray_and_a_real_entrypoint():
    version = pinned_ray()
    docs = {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))}
    assert set(docs) == {"raycluster.yaml", "rayjob.yaml", "storage.yaml"}
    cluster, job = docs["raycluster.yaml"][0], docs["rayjob.yaml"][0]
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    claim = docs["storage.yaml"][0]["metadata"]["name"]
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == version
        found = images(spec)
        assert len(found) == 2 and all(IMAGE_TAG.match(i)["ray"] == version for i in found)
        gpu = spec["workerGroupSpecs"][0]["template"]["spec"]
        assert int(gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        for group in (spec["headGroupSpec"]["template"]["spec"], gpu):
            assert {"name": "shared", "persistentVolumeClaim": {"claimName": claim}} in group["volumes"]
            env = {e["name"]: e for e in group["containers"][0]["env"]}
            assert "secretKeyRef" in env["WANDB_API_KEY"]["valueFrom"]  # the key comes from a Secret
    check_entrypoint(job["spec"]["entrypoint"])
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def test_launcher_dockerfile_and_runtime_env():
    version = pinned_ray()
    launcher = yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text())
    assert IMAGE_TAG.match(launcher["docker"]["image"])["ray"] == version
    assert any(c.startswith("ray start --head") for c in launcher["head_start_ray_commands"])
    assert launcher["head_node_type"] in launcher["available_node_types"]
    base = re.search(r"^FROM rayproject/ray:(\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    assert base.startswith(version + "-")
    env = runtime_env(ROOT, str(CLUSTER / "runtime-env.yaml"))
    assert env["working_dir"] == str(ROOT) and set(EXCLUDES) <= set(env["excludes"])
    assert not any(re.search(r"API_KEY|_TOKEN$|SECRET|PASSWORD", k) for k in yaml.safe_load(
        (CLUSTER / "runtime-env.yaml").read_text())["env_vars"])


def test_cluster_configs_load_and_use_gpus():
    for name in ("gsm8k-qwen2.yaml", "csqa-llama3.yaml"):
        cfg = load_config(ROOT / "jobs" / "configs" / name)
        assert cfg.models.device == "cuda" and cfg.deepspeed.bf16 and cfg.train.gpus_per_worker >= 1
        assert cfg.collect.num_gpus_per_actor >= 1 and cfg.storage.startswith("/mnt/shared")
        assert cfg.demo is None and not Path(cfg.task.train_path).exists()  # hub names, not local files


def test_api_keys_reach_a_job_only_when_asked_and_are_never_described(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_PROJECT", "citer-test")
    plain = runtime_env(ROOT)
    assert plain["env_vars"]["WANDB_PROJECT"] == "citer-test" and "WANDB_API_KEY" not in plain["env_vars"]
    forwarded = runtime_env(ROOT, secrets=True)
    assert forwarded["env_vars"]["WANDB_API_KEY"] == "k" * 40
    assert "k" * 40 not in describe(forwarded) and "WANDB_API_KEY" in describe(forwarded)
