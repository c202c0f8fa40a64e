"""Cluster files: the launcher passes Ray's own config checks, the KubeRay manifests KubeRay v1.7.0's CRD schemas, the
shell commands run the VMs do what they say, and the shipped GPU configs fit the GPUs the cluster files provide.
Nothing here calls AWS, Kubernetes or the network."""

from __future__ import annotations

import functools
import gzip
import json
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config import Config, load_config
from pipeline.submit import EXCLUDES, describe, runtime_env
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
IMAGE_TAG = re.compile(r"^REGISTRY/citer:[\w.]+-ray(?P<ray>[\d.]+)$")
# The RayCluster, RayJob and RayService CRDs' OpenAPI schemas of the KubeRay release the manifests target
# (tests/data/README.md).
KUBERAY_SCHEMA = ROOT / "tests" / "data" / "kuberay-v1.7.0-crd-schemas.json.gz"
GPU_CONFIGS = ("gsm8k-qwen2.yaml", "csqa-llama3.yaml")
SECRET_KEYS = {"WANDB_API_KEY": "wandb-api-key", "HF_TOKEN": "hf-token"}  # env name -> key in citer-secrets
BASH = shutil.which("bash")


def pinned_ray() -> str:
    pyproject = (ROOT / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)


def images(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for v in node.values() for i in images(v)]
    if isinstance(node, list):
        return [i for v in node for i in images(v)]
    return []


def check_entrypoint(command: str) -> Config:
    """`python [/app/]jobs/entrypoint.py CONFIG ...`: the script and config exist, the config loads."""
    argv = shlex.split(command)
    assert argv[0] == "python" and argv[1].removeprefix("/app/") == "jobs/entrypoint.py"
    config = ROOT / argv[2].removeprefix("/app/")
    assert config.is_file()
    return load_config(config)


def kuberay_docs() -> dict[str, list[dict]]:
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))}


def cluster_specs() -> dict[str, dict]:
    docs = kuberay_docs()
    return {"raycluster.yaml": docs["raycluster.yaml"][0]["spec"],
            "rayjob.yaml": docs["rayjob.yaml"][0]["spec"]["rayClusterSpec"],
            "rayservice.yaml": docs["rayservice.yaml"][0]["spec"]["rayClusterConfig"]}


def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text())


@functools.cache
def crd_schemas() -> dict[str, dict]:
    return json.loads(gzip.decompress(KUBERAY_SCHEMA.read_bytes()))


def unknown_fields(node: Any, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not declare: the API server prunes them silently, and `kubectl apply
    --validate=strict` refuses them; a misspelt or misplaced key is one."""
    if isinstance(node, list) and "items" in schema:
        return [e for i, item in enumerate(node) for e in unknown_fields(item, schema["items"], f"{path}/{i}")]
    if not isinstance(node, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    errors = []
    for key, value in node.items():
        if props is not None and key in props:
            errors += unknown_fields(value, props[key], f"{path}/{key}")
        elif isinstance(extra, dict):
            errors += unknown_fields(value, extra, f"{path}/{key}")
        elif props is not None and key not in ("apiVersion", "kind", "metadata"):
            errors.append(f"{path}/{key}: unknown field")
    return errors


def schema_errors(doc: dict) -> list[str]:
    """Errors of a manifest against its kind's CRD schema: types, enums, required fields (JSON
    Schema, which ignores the `x-kubernetes-*` extensions), plus unknown fields."""
    schema = crd_schemas()[doc["kind"]]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)] + \
        unknown_fields(doc, schema)


def run_bash(command: str, tmp_path: Path, path: Path, **env: str) -> subprocess.CompletedProcess:
    """`command` as Ray runs it on a VM (bash, in a subshell), with PATH = `path` only, so that no real
    sudo, mount or aws can run."""
    return subprocess.run([BASH, "-c", f"({command})"], env={"PATH": str(path), "HOME": str(tmp_path), **env},
                          capture_output=True, text=True, timeout=10)


def fake_tool(directory: Path, name: str, script: str) -> None:
    directory.mkdir(exist_ok=True)
    tool = directory / name
    tool.write_text(f"#!{shutil.which('sh')}\n{script}\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)


# ---------------------------------------------------------------------------------------------
# Versions and entrypoints


def test_the_installed_ray_is_the_pinned_one():
    assert ray.__version__ == pinned_ray()


def test_kuberay_manifests_name_the_pinned_ray_and_a_real_entrypoint():
    version = pinned_ray()
    docs = kuberay_docs()
    assert set(docs) == {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "storage.yaml"}
    claim = docs["storage.yaml"][0]["metadata"]["name"]
    for spec in cluster_specs().values():
        assert spec["rayVersion"] == version
        found = images(spec)
        assert len(found) == 2 and all(IMAGE_TAG.match(i)["ray"] == version for i in found)
        for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
            volumes = group["template"]["spec"]["volumes"]
            assert {"name": "shared", "persistentVolumeClaim": {"claimName": claim}} in volumes
    job = docs["rayjob.yaml"][0]["spec"]
    check_entrypoint(job["entrypoint"])
    yaml.safe_load(job["runtimeEnvYAML"])


def test_launcher_dockerfile_and_runtime_env():
    version = pinned_ray()
    config = launcher()
    assert IMAGE_TAG.match(config["docker"]["image"])["ray"] == version
    assert any(c.startswith("ray start --head") for c in config["head_start_ray_commands"])
    base = re.search(r"^FROM rayproject/ray:(\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    assert base.startswith(version + "-")
    env = runtime_env(ROOT, str(CLUSTER / "runtime-env.yaml"))
    assert env["working_dir"] == str(ROOT) and set(EXCLUDES) <= set(env["excludes"])
    assert not any(re.search(r"API_KEY|_TOKEN$|SECRET|PASSWORD", k) for k in yaml.safe_load(
        (CLUSTER / "runtime-env.yaml").read_text())["env_vars"])


def test_dockerignore_keeps_what_a_job_leaves_out_out_of_the_image():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for pattern in EXCLUDES:
        assert pattern in ignored or f"**/{pattern}" in ignored, pattern
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    copied = {w for line in dockerfile.splitlines() if line.startswith("COPY") for w in line.split()[2:-1]}
    assert copied and not copied & ignored  # what the Dockerfile copies by name is in the build context


# ---------------------------------------------------------------------------------------------
# The launcher: Ray's own checks, no silent defaults, no shell variable Ray would not substitute


def test_launcher_passes_rays_own_config_checks_without_merged_defaults():
    raw = launcher()
    prepared = prepare_config(raw)  # Ray's defaults for AWS merged in; no AWS call (that is bootstrap_config)
    validate_config(prepared)  # ray-schema.json of the installed Ray, then Ray's own cross-field checks
    # Ray's AWS defaults would pip-install a Ray nightly and boto3 on the nodes: every setup list is explicit.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        assert key in raw, key
    assert not any("pip install" in c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                   for c in prepared[key])
    assert raw["provider"]["cache_stopped_nodes"] is False


def test_launcher_node_types_are_explicit():
    """Resources match the instance types (no EC2 autodetection), and each node type names its AMI and instance
    profile (Ray's default AMI is an Ubuntu 18.04 / CUDA 11 image)."""
    nodes = launcher()["available_node_types"]
    expected = {"m6i.4xlarge": {"CPU": 16, "GPU": 0}, "p4d.24xlarge": {"CPU": 96, "GPU": 8}}  # AWS's spec sheets
    for node in nodes.values():
        assert node["resources"] == expected[node["node_config"]["InstanceType"]]
        assert node["node_config"]["ImageId"].startswith("ami-")
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    assert len({n["node_config"]["ImageId"] for n in nodes.values()}) == 1


def test_launcher_commands_use_no_variable_of_the_operators_shell():
    """Ray runs the commands as written: a variable is either set in the command itself or by Ray (RAY_HEAD_IP)."""
    config = launcher()
    lists = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands")
    for command in [c for key in lists for c in config.get(key, [])]:
        assert subprocess.run([BASH, "-n", "-c", command], capture_output=True).returncode == 0, command
        defined = set(re.findall(r"(?:^|[\s;&(])([A-Za-z_]\w*)=", command)) | {"RAY_HEAD_IP", "BASH_REMATCH"}
        used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", command))
        assert used <= defined, f"{sorted(used - defined)} in {command!r}"


def test_launcher_refuses_the_efs_placeholder(tmp_path):
    mount = next(c for c in launcher()["initialization_commands"] if "mount -t nfs4" in c)
    empty = tmp_path / "bin"
    empty.mkdir()
    refused = run_bash(mount, tmp_path, empty)
    assert refused.returncode == 1 and "set EFS_ID" in refused.stderr
    placeholder = re.search(r"EFS_ID=(\S+)", mount).group(1)
    accepted = run_bash(mount.replace(placeholder, "fs-0123456789abcdef0"), tmp_path, empty)
    assert accepted.returncode == 127 and "sudo" in accepted.stderr  # past the check, at the first command


def test_launcher_secrets_come_from_ssm_into_the_containers_env_file(tmp_path):
    config = launcher()
    options = " ".join(config["docker"]["run_options"])
    assert not re.search(r"(-e|--env)\s+[A-Z_]+(\s|$)", options)  # no pass-through from the SSH shell
    env_file = re.search(r"--env-file\s+(\S+)", options).group(1)
    home = f"/home/{config['auth']['ssh_user']}/"
    fetch = next(c for c in config["initialization_commands"] if "aws ssm" in c)
    assert all(f"/citer/{k}" in fetch for k in SECRET_KEYS)  # S3 access comes from the instance role
    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "aws", r'printf "/citer/HF_TOKEN\thf_x\n/citer/WANDB_API_KEY\tw_y\n"')
    fake_tool(bin_dir, "sed", f'exec {shutil.which("sed")} "$@"')
    fake_tool(bin_dir, "mkdir", f'exec {shutil.which("mkdir")} "$@"')
    ok = run_bash(fetch, tmp_path, bin_dir)
    assert ok.returncode == 0, ok.stderr
    written = tmp_path / env_file.removeprefix(home)
    assert written.read_text().splitlines() == ["HF_TOKEN=hf_x", "WANDB_API_KEY=w_y"]  # docker's --env-file format
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    fake_tool(bin_dir, "aws", "echo AccessDenied >&2; exit 254")
    assert run_bash(fetch, tmp_path, bin_dir).returncode != 0  # a denied read fails `ray up`, not the job later


@pytest.mark.parametrize(("answer", "code"), [("580.65.06", 0), ("570.172.08", 1), (None, 0)])
def test_launcher_checks_the_gpu_driver_for_torchs_cuda(tmp_path, answer, code):
    check = next(c for c in launcher()["initialization_commands"] if "nvidia-smi" in c)
    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "head", f'exec {shutil.which("head")} "$@"')
    fake_tool(bin_dir, "nvidia-smi", f"echo {answer}" if answer else "echo 'NVIDIA-SMI has failed'; exit 9")
    assert run_bash(check, tmp_path, bin_dir).returncode == code  # no GPU answering (the head): skipped


# ---------------------------------------------------------------------------------------------
# KubeRay


def test_kuberay_manifests_match_the_crd_schemas_of_kuberay_v1_7_0():
    kinds = {d["kind"] for ds in kuberay_docs().values() for d in ds}
    assert set(crd_schemas()) == {"RayCluster", "RayJob", "RayService"}
    assert kinds == {"RayCluster", "RayJob", "RayService", "PersistentVolumeClaim"}
    for name, docs in kuberay_docs().items():
        for doc in docs:
            if doc["kind"] in crd_schemas():  # the claim is core Kubernetes, not KubeRay's
                assert not schema_errors(doc), (name, schema_errors(doc))
    for spec in cluster_specs().values():
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_the_crd_schemas_catch_typical_mistakes():
    doc = kuberay_docs()["raycluster.yaml"][0]
    broken = json.loads(json.dumps(doc))
    broken["spec"]["workerGroupSpec"] = broken["spec"].pop("workerGroupSpecs")
    assert schema_errors(broken)
    broken = json.loads(json.dumps(doc))
    broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append({"name": "X", "value": 0.2})
    assert schema_errors(broken)  # Kubernetes wants strings
    broken = json.loads(json.dumps(doc))
    broken["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    assert schema_errors(broken)


def test_every_kuberay_container_gets_the_keys_from_the_secret():
    """The driver and the collect actors run on the GPU workers: HF_TOKEN (gated Llama-3) and the W&B key must
    reach every pod, from the Secret, never as a value in a manifest."""
    for name, spec in cluster_specs().items():
        for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
            for container in group["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in container["env"]}
                for var, key in SECRET_KEYS.items():
                    assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "citer-secrets", "key": key,
                                                                     "optional": True}, (name, var)
                assert env["HF_HOME"]["value"].startswith("/mnt/shared/")


# ---------------------------------------------------------------------------------------------
# The shipped GPU configs against what the cluster files provide


def provided_nodes() -> dict[str, dict[str, float]]:
    """GPU/CPU per GPU worker pod or node, and the most GPUs a cluster reaches, per cluster file."""
    out = {}
    for name, spec in cluster_specs().items():
        group = spec["workerGroupSpecs"][0]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        out[name] = {"gpus": int(limits["nvidia.com/gpu"]), "cpus": int(limits["cpu"]),
                     "max_gpus": int(limits["nvidia.com/gpu"]) * group["maxReplicas"]}
    node = launcher()["available_node_types"]["gpu"]
    out["launcher-aws.yaml"] = {"gpus": node["resources"]["GPU"], "cpus": node["resources"]["CPU"],
                                "max_gpus": node["resources"]["GPU"] * node["max_workers"]}
    return out


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_fit_the_gpus_the_cluster_files_provide(name):
    """Per actor / worker on one node, every actor's GPUs as whole bundles on the nodes, and all train workers
    at once (Ray Train waits for every one). GPU memory is not checked here: see cluster/README.md, "GPU
    memory"."""
    cfg = load_config(ROOT / "jobs" / "configs" / name)
    assert cfg.models.device == "cuda" and cfg.deepspeed.bf16 and cfg.storage.startswith("/mnt/shared")
    assert cfg.demo is None and not Path(cfg.task.train_path).exists()  # hub names, not local files
    c, t = cfg.collect, cfg.train
    assert 1 <= c.num_gpus_per_actor and 1 <= t.gpus_per_worker and cfg.models.llm_device_map is not None
    for where, node in provided_nodes().items():
        assert c.num_gpus_per_actor <= node["gpus"] and c.num_cpus_per_actor <= node["cpus"], where
        assert t.gpus_per_worker <= node["gpus"] and t.cpus_per_worker <= node["cpus"], where
        assert t.num_workers * t.gpus_per_worker <= node["max_gpus"], where
        # a bundle of an actor's GPUs sits on one node: count whole bundles per node
        nodes = node["max_gpus"] // node["gpus"]
        bundles = nodes * (node["gpus"] // c.num_gpus_per_actor)
        assert c.num_actors <= bundles, where  # collect and evaluation actors alike


def test_the_rayservice_serves_a_trained_run_of_a_shipped_config_on_the_gpus_a_worker_has():
    """serveConfigV2 passes Serve's own schema; its app builder imports; its config loads and its run is that
    config's run directory; a replica's GPUs (the collect actors') fit one worker pod, whose port 8000 is open."""
    from ray.serve.schema import ServeDeploySchema

    from pipeline.serving.app import build_app, replica_options

    doc = kuberay_docs()["rayservice.yaml"][0]
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    module, _, name = app.import_path.partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is build_app
    assert set(app.args) <= {"config", "run", "iteration", "threshold", "overrides"}
    cfg = load_config(ROOT / app.args["config"].removeprefix("/app/"))
    assert app.args["run"] == f"{cfg.storage}/{cfg.name}"
    gpus = replica_options(cfg)["ray_actor_options"]["num_gpus"]
    assert gpus == cfg.collect.num_gpus_per_actor and cfg.models.llm_device_map is not None
    worker = cluster_specs()["rayservice.yaml"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert 1 <= gpus <= int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert {"containerPort": 8000, "name": "serve"} in worker["ports"]
    assert serve_config.http_options.port == 8000


def test_the_rayjob_driver_reserves_no_gpu():
    job = kuberay_docs()["rayjob.yaml"][0]["spec"]
    check_entrypoint(job["entrypoint"])
    assert job.get("entrypointNumGpus", 0) == 0  # the driver loads no model: evaluation runs on actors


# ---------------------------------------------------------------------------------------------
# Keys


def test_api_keys_reach_a_job_only_when_asked_and_are_never_described(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_PROJECT", "citer-test")
    plain = runtime_env(ROOT)
    assert plain["env_vars"]["WANDB_PROJECT"] == "citer-test" and "WANDB_API_KEY" not in plain["env_vars"]
    forwarded = runtime_env(ROOT, secrets=True)
    assert forwarded["env_vars"]["WANDB_API_KEY"] == "k" * 40
    assert "k" * 40 not in describe(forwarded) and "WANDB_API_KEY" in describe(forwarded)
