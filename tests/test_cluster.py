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

from pipeline import CiterError
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
        found = images(spec)  # the containers and the init containers of the head and the GPU group
        assert len(found) == 4 and all(IMAGE_TAG.match(i)["ray"] == version for i in found)
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


def reachable_nodes(spec: dict) -> list[dict[str, float]]:
    """The GPU worker nodes a KubeRay cluster spec can have at once, as Ray sees them (CPUs and GPUs):
    with the in-tree autoscaler every group can grow to maxReplicas on demand; without it exactly
    `replicas` pods start (KubeRay clamps them to [minReplicas, maxReplicas]) and no more ever will."""
    nodes = []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group.get("rayStartParams", {})
        node = {"GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
                "CPU": float(params.get("num-cpus", limits["cpu"]))}
        count = group["maxReplicas"] if spec.get("enableInTreeAutoscaling") else \
            min(max(group["replicas"], group["minReplicas"]), group["maxReplicas"])
        nodes += [node] * count
    return nodes


def launcher_nodes() -> list[dict[str, float]]:
    """The launcher's worker nodes at most: its autoscaler starts each node type up to max_workers
    (and the cluster up to its own max_workers) when tasks ask for them."""
    config, nodes = launcher(), []
    for name, node_type in config["available_node_types"].items():
        if name != config["head_node_type"]:
            nodes += [{"GPU": float(node_type["resources"].get("GPU", 0)), "CPU": float(node_type["resources"]["CPU"])}
                      ] * node_type["max_workers"]
    return nodes[: config["max_workers"]]


def placeable(nodes: list[dict[str, float]], bundles: int, gpus: float, cpus: float) -> bool:
    """Whether `bundles` bundles of `gpus` GPUs and `cpus` CPUs each fit on `nodes`, a bundle never
    split across nodes (an actor's GPUs, or a train worker's, are on one node)."""
    per_node = [int(min(n["GPU"] // gpus if gpus else bundles, n["CPU"] // cpus if cpus else bundles)) for n in nodes]
    return sum(per_node) >= bundles


def cluster_files() -> dict[str, list[dict[str, float]]]:
    return {**{name: reachable_nodes(spec) for name, spec in cluster_specs().items()},
            "launcher-aws.yaml": launcher_nodes()}


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_fit_the_nodes_each_cluster_file_would_start(name):
    """Every stage's actors or workers, as the config asks for them, against the nodes the cluster can
    start (not what a manifest declares as its maximum): collect and evaluation actors of
    `collect.num_gpus_per_actor` GPUs each, all at once (an actor pool), then the training workers,
    all at once (Ray Train waits for every one). GPU memory is checked in the next test."""
    cfg = load_config(ROOT / "jobs" / "configs" / name)
    assert cfg.models.device == "cuda" and cfg.deepspeed.bf16 and cfg.storage.startswith("/mnt/shared")
    assert cfg.demo is None and not Path(cfg.task.train_path).exists()  # hub names, not local files
    c, t = cfg.collect, cfg.train
    for where, nodes in cluster_files().items():
        assert placeable(nodes, c.num_actors, c.num_gpus_per_actor, c.num_cpus_per_actor), where
        assert placeable(nodes, t.num_workers, t.gpus_per_worker, t.cpus_per_worker), where


def test_the_capacity_check_catches_a_cluster_that_starts_too_few_gpu_workers():
    """The manifests as they were: two 8-GPU workers and no autoscaler, for 4 actors of 5 GPUs."""
    spec = json.loads(json.dumps(cluster_specs()["raycluster.yaml"]))
    spec["enableInTreeAutoscaling"] = False
    spec["workerGroupSpecs"][0].update(replicas=2, minReplicas=0, maxReplicas=4)
    cfg = load_config(ROOT / "jobs" / "configs" / "gsm8k-qwen2.yaml")
    assert len(reachable_nodes(spec)) == 2
    assert not placeable(reachable_nodes(spec), cfg.collect.num_actors, cfg.collect.num_gpus_per_actor,
                         cfg.collect.num_cpus_per_actor)


# Parameters of the shipped configs' LLMs (their model cards) and GPU memory of the launcher's instance type
# (p4d.24xlarge: 8 A100 40 GB); a KubeRay node's GPUs are assumed to be no smaller.
LLM_PARAMETERS = {"Qwen/Qwen2-72B-Instruct": 72.7e9, "meta-llama/Meta-Llama-3-70B-Instruct": 70.6e9}
GPU_BYTES = 40e9


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_device_maps_match_the_gpus_an_actor_reserves(name):
    """The device map spreads the LLM over exactly the GPUs an actor reserves (config.check_llm_gpus
    refuses a map that names a GPU the actor does not have or leaves one it reserved empty) and
    those GPUs hold the LLM's bf16 weights; `balanced_low_0` keeps the first GPU for the SLM."""
    cfg = load_config(ROOT / "jobs" / "configs" / name)
    gpus = int(cfg.collect.num_gpus_per_actor)
    spread_over = gpus - 1 if cfg.models.llm_device_map == "balanced_low_0" else gpus
    assert cfg.models.dtype == "bfloat16" and LLM_PARAMETERS[cfg.models.llm] * 2 <= 0.8 * spread_over * GPU_BYTES
    for overrides, refused in (([f"models.llm_device_map={{model.layers.0: {gpus}}}"], f"on GPU {gpus}, but an actor "
                                f"reserves {gpus} GPUs"),
                               (["models.llm_device_map=null"], f"collect.num_gpus_per_actor={gpus}, but "
                                "models.llm_device_map is unset")):
        with pytest.raises(CiterError, match=refused):
            load_config(ROOT / "jobs" / "configs" / name, overrides)


# ---------------------------------------------------------------------------------------------
# The shared volume: writable by the containers' user; declared shared by path, not for all paths


def dockerfile_user() -> str:
    """The uid:gid the image's `ray` user must have (cluster/Dockerfile checks it at build time)."""
    return re.search(r'test "\$\(id -u ray\):\$\(id -g ray\)" = "(\d+:\d+)"',
                     (CLUSTER / "Dockerfile").read_text()).group(1)


def test_the_launcher_hands_the_mounted_volume_to_the_containers_user(tmp_path):
    mount = next(c for c in launcher()["initialization_commands"] if "mount -t nfs4" in c)
    placeholder = re.search(r"EFS_ID=(\S+)", mount).group(1)
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    for tool in ("sudo", "mount", "chown", "chmod", "mkdir"):
        fake_tool(bin_dir, tool, f'echo "{tool} $*" >> {calls}' + ('\nexec "$@"' if tool == "sudo" else ""))
    fake_tool(bin_dir, "mountpoint", "exit 1")  # not mounted yet
    done = run_bash(mount.replace(placeholder, "fs-0123456789abcdef0"), tmp_path, bin_dir)
    assert done.returncode == 0, done.stderr
    steps = [line for line in calls.read_text().splitlines() if not line.startswith("sudo")]
    assert steps[1].startswith("mount -t nfs4") and steps[1].endswith("/mnt/shared")
    assert steps[2:] == [f"chown {dockerfile_user()} /mnt/shared", "chmod 0775 /mnt/shared"]  # after the mount


def test_every_kuberay_pod_hands_the_shared_volume_to_the_containers_user_before_ray_starts(tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    for tool in ("chown", "chmod"):
        fake_tool(bin_dir, tool, f'echo "{tool} $*" >> {calls}')
    for name, spec in cluster_specs().items():
        for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
            pod = group["template"]["spec"]
            mounted = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == "shared"}
            (init,) = pod["initContainers"]
            assert init["securityContext"]["runAsUser"] == 0
            assert {m["mountPath"] for m in init["volumeMounts"] if m["name"] == "shared"} == mounted == {"/mnt/shared"}
            calls.unlink(missing_ok=True)
            assert init["command"][:2] == ["bash", "-c"]
            assert run_bash(init["command"][2], tmp_path, bin_dir).returncode == 0
            assert calls.read_text().splitlines() == [f"chown {dockerfile_user()} /mnt/shared",
                                                      "chmod 0775 /mnt/shared"], name


def test_shared_storage_is_declared_for_the_mount_point_only(monkeypatch):
    from pipeline.raysession import shared_mounts

    declared = [yaml.safe_load((CLUSTER / "runtime-env.yaml").read_text())["env_vars"]["CITER_SHARED_STORAGE"]]
    for spec in cluster_specs().values():
        for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
            env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
            declared.append(env["CITER_SHARED_STORAGE"])
    assert set(declared) == {"/mnt/shared"}
    monkeypatch.setenv("CITER_SHARED_STORAGE", "1")  # the old switch for every path is refused, saying why
    with pytest.raises(CiterError, match="CITER_SHARED_STORAGE=1: it names the mount points"):
        shared_mounts()


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
