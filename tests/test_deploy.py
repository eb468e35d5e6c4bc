"""Structural checks of deploy/: the Ray cluster launcher config, the KubeRay
RayJob and the container image, against the Ray installed here."""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<flavor>gpu|cu\d+)$")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
RAY_CLIENT_PORT = 10001


def _rayjob_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "rayjob.yaml").read_text()) if d]


@pytest.fixture(scope="module")
def rayjob() -> dict:
    jobs = [d for d in _rayjob_docs() if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0]


@pytest.fixture(scope="module")
def head(rayjob) -> dict:
    return rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((DEPLOY / "cluster.yaml").read_text())


def _from_image(dockerfile: str) -> str:
    lines = [ln.split() for ln in dockerfile.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [words[1] for words in lines if words[0].upper() == "FROM"]
    assert len(froms) == 1, froms
    return froms[0]


# ------------------------------------------------------------------ RayJob

def test_rayjob_kind_and_api(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["metadata"]["name"]


def test_rayjob_entrypoint_runs_trainer(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "trainer.run"]
    out = argv[argv.index("--out") + 1]
    assert out.startswith("/tmp/runs/")


def test_rayjob_shuts_cluster_down(rayjob):
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_head_has_one_gpu(head):
    (container,) = head["template"]["spec"]["containers"]
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources.get("requests", resources["limits"])["nvidia.com/gpu"]) == 1


def test_rayjob_image_and_ray_version_match_installed_ray(rayjob, head):
    (container,) = head["template"]["spec"]["containers"]
    assert container["image"].split("/")[-1] == f"gradmatch:{ray.__version__}"
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


def test_rayjob_start_params_are_strings(head):
    # KubeRay's CRD types rayStartParams as map[string]string.
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())


def test_rayjob_output_dir_is_a_mounted_claim_defined_alongside(head, rayjob):
    pod = head["template"]["spec"]
    (container,) = pod["containers"]
    out = shlex.split(rayjob["spec"]["entrypoint"])[-1]
    mount = next(m for m in container["volumeMounts"] if out.startswith(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claims = {d["metadata"]["name"] for d in _rayjob_docs() if d["kind"] == "PersistentVolumeClaim"}
    assert volume["persistentVolumeClaim"]["claimName"] in claims


# ------------------------------------------------------- cluster launcher

def test_cluster_head_node_type_with_one_gpu(cluster):
    head_type = cluster["head_node_type"]
    assert head_type in cluster["available_node_types"]
    assert cluster["available_node_types"][head_type]["resources"]["GPU"] == 1


def test_cluster_has_max_workers(cluster):
    assert isinstance(cluster["max_workers"], int) and cluster["max_workers"] >= 0


def test_cluster_setup_installs_the_synced_repo(cluster):
    repo_mounts = [remote for remote, local in cluster["file_mounts"].items() if local in (".", "./")]
    assert len(repo_mounts) == 1
    installs = [c for c in cluster["setup_commands"] if re.search(r"\bpip install '\.\[energy\]'(\s|$)", c)]
    assert any(f"cd {repo_mounts[0]}" in c for c in installs), cluster["setup_commands"]


def test_cluster_image_matches_installed_ray(cluster):
    match = RAY_IMAGE.match(cluster["docker"]["image"])
    assert match and match["version"] == ray.__version__


def test_cluster_documents_the_job_command():
    text = (DEPLOY / "cluster.yaml").read_text()
    comments = "\n".join(ln for ln in text.splitlines() if ln.lstrip().startswith("#"))
    assert "python -m trainer.run" in comments and "ray up" in comments


def test_cluster_passes_ray_up_offline_validation(cluster):
    """Run the config through the steps `ray up` takes before contacting the cloud."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(copy.deepcopy(cluster))
    util.validate_config(prepared)
    assert prepared["available_node_types"][cluster["head_node_type"]]["max_workers"] == 0


# ---------------------------------------------------------------- image

def test_dockerfile_base_is_installed_ray_gpu_image():
    match = RAY_IMAGE.match(_from_image((DEPLOY / "Dockerfile").read_text()))
    assert match, "FROM must be a rayproject/ray GPU image"
    assert match["version"] == ray.__version__


def test_dockerfile_installs_the_repo():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^COPY\s+(--\S+\s+)*\.\s+\.\s*$", text, re.M)
    assert re.search(r"^RUN\s+pip install\b.*\s'\.\[energy\]'(\s|$)", text, re.M), "the image installs the repo with its energy meter"


def test_docker_context_leaves_out_local_state():
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignored)


def test_pyproject_names_the_package():
    path = REPO / "pyproject.toml"
    assert tomllib.loads(path.read_text())["project"]["name"] == "gradmatch"


def test_readme_covers_every_deploy_file():
    readme = (DEPLOY / "README.md").read_text()
    for name in ("cluster.yaml", "rayjob.yaml", "Dockerfile", "tests/test_deploy.py"):
        assert name in readme


# ------------------------------------------------------- safe by default

def _docker_env(run_options: list[str]) -> dict[str, str]:
    """Environment variables set by `docker run` options (`-e K=V`, `--env K=V`, `--env=K=V`)."""
    words = [w for option in run_options for w in shlex.split(option)]
    pairs = [value for flag, value in zip(words, words[1:]) if flag in ("-e", "--env")]
    pairs += [w.split("=", 1)[1] for w in words if w.startswith("--env=")]
    return dict(pair.split("=", 1) for pair in pairs)


def _ray_start_option(command: str, name: str) -> str | None:
    """Value of `ray start --name` in a shell command line, None when it is not given."""
    for part in command.split(";"):
        words = shlex.split(part)
        if words[:2] != ["ray", "start"]:
            continue
        for i, word in enumerate(words):
            if word == f"--{name}":
                return words[i + 1]
            if word.startswith(f"--{name}="):
                return word.split("=", 1)[1]
    return None


def _start_commands(cluster: dict) -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cluster[key]]


def test_cluster_turns_on_token_auth_in_every_ray_process(cluster):
    env = _docker_env(cluster["docker"]["run_options"])
    assert env.get("RAY_AUTH_MODE") == "token", env
    # The token file is copied to every node from the machine that runs `ray up`.
    token_path = env["RAY_AUTH_TOKEN_PATH"]
    assert token_path in cluster["file_mounts"], cluster["file_mounts"]
    assert not any("RAY_AUTH_MODE" in c for key, cs in cluster.items() if key.endswith("_commands") for c in cs)


def test_cluster_dashboard_listens_on_loopback_only(cluster):
    (head_start,) = [c for c in cluster["head_start_ray_commands"] if "--head" in c]
    # Ray's own default is localhost too; an explicit value must be a loopback address.
    assert _ray_start_option(head_start, "dashboard-host") in LOOPBACK | {None}
    assert not any("0.0.0.0" in c or "::/0" in c for c in _start_commands(cluster))


def test_cluster_opens_no_port_but_ssh_to_the_world(cluster):
    rules = cluster["provider"].get("security_group", {}).get("IpPermissions", [])
    public = [r for r in rules if any(ip.get("CidrIp") == "0.0.0.0/0" for ip in r.get("IpRanges", []))]
    assert all(r.get("FromPort") == r.get("ToPort") == 22 for r in public), public


def test_rayjob_turns_on_token_auth(rayjob):
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    containers = [c for doc in _rayjob_docs() for c in _containers(doc)]
    assert containers
    for container in containers:
        modes = [e.get("value") for e in container.get("env", []) if e["name"] == "RAY_AUTH_MODE"]
        assert modes in ([], ["token"]), (container["name"], modes)


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    cluster = spec.get("rayClusterSpec", {})
    groups = [cluster.get("headGroupSpec", {}), *cluster.get("workerGroupSpecs", [])]
    pods = [g.get("template", {}).get("spec", {}) for g in groups]
    pods.append(spec.get("submitterPodTemplate", {}).get("spec", {}))
    return [c for pod in pods for c in pod.get("containers", [])]


def test_rayjob_head_is_not_exposed_outside_the_kubernetes_cluster(rayjob, head):
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False) and not cluster_spec.get("enableIngress", False)
    groups = [head, *cluster_spec.get("workerGroupSpecs", [])]
    for pod in (g["template"]["spec"] for g in groups):
        assert not pod.get("hostNetwork", False)
        ports = [p for c in pod["containers"] for p in c.get("ports", [])]
        assert not any("hostPort" in p for p in ports), ports
    (container,) = head["template"]["spec"]["containers"]
    # KubeRay builds the head Service from these ports: the Ray Client port stays out of it.
    ports = container.get("ports", [])
    assert not any(p["containerPort"] == RAY_CLIENT_PORT or p.get("name") == "client" for p in ports), ports


def test_dockerfile_turns_on_token_auth():
    text = (DEPLOY / "Dockerfile").read_text()
    envs = re.findall(r"^ENV\s+RAY_AUTH_MODE[=\s]+(\S+)\s*$", text, re.M)
    assert envs == ["token"], envs


def test_installed_ray_reads_the_auth_settings_deploy_uses(tmp_path):
    """The variable names above are the ones Ray reads; in token mode without a token `ray start` fails closed."""
    token = tmp_path / "auth_token"
    token.write_text("deploy-test-token")
    probe = (
        "from ray._raylet import AuthenticationTokenLoader, get_authentication_mode, AuthenticationMode\n"
        "from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled\n"
        "from ray.exceptions import AuthenticationError\n"
        "assert get_authentication_mode() == AuthenticationMode.TOKEN\n"
        "loader = AuthenticationTokenLoader.instance()\n"
        "found = loader.get_raw_token(ignore_auth_mode=True) if loader.has_token(ignore_auth_mode=True) else None\n"
        "try:\n"
        "    ensure_token_if_auth_enabled(None, create_token_if_missing=False)  # what `ray start` calls\n"
        "    refused = False\n"
        "except AuthenticationError:\n"
        "    refused = True\n"
        "print(found, refused)\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base.update(HOME=str(tmp_path / "home"), RAY_AUTH_MODE="token")

    def run(**env: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", probe], env={**base, **env}, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    assert run(RAY_AUTH_TOKEN_PATH=str(token)) == ["deploy-test-token", "False"]
    assert run() == ["None", "True"]


def _gpus(group: dict) -> int:
    (container,) = group["template"]["spec"]["containers"]
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def test_rayjob_has_a_worker_group_for_shards_and_summary_workers(rayjob):
    spec = rayjob["spec"]
    groups = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if _gpus(g) == 0]
    replicas = sum(group["replicas"] for group in groups)
    entry = spec["entrypoint"].split()
    shards = int(entry[entry.index("--shards") + 1])
    workers = int(entry[entry.index("--summary-workers") + 1])
    assert replicas >= max(shards, workers) >= 2  # SPREAD placement has a node for each
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert not container.get("ports")


def test_rayjob_has_a_gpu_group_for_the_ray_train_workers_on_shared_storage(rayjob):
    spec = rayjob["spec"]
    entry = shlex.split(spec["entrypoint"])
    workers = int(entry[entry.index("--workers") + 1])
    train = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if _gpus(g) > 0]
    assert sum(g["replicas"] * _gpus(g) for g in train) >= workers >= 2
    out = entry[-1]
    claims = {d["metadata"]["name"]: d for d in _rayjob_docs() if d["kind"] == "PersistentVolumeClaim"}
    for group in train:  # Ray Train's checkpoints go to the run directory: every training pod mounts it
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        mount = next(m for m in container["volumeMounts"] if out.startswith(m["mountPath"]))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        claim = claims[volume["persistentVolumeClaim"]["claimName"]]
        assert "ReadWriteMany" in claim["spec"]["accessModes"]


def test_cluster_has_cpu_workers_for_shards_and_summary_workers(cluster):
    workers = {name: node for name, node in cluster["available_node_types"].items() if name != cluster["head_node_type"]}
    cpu = [node for node in workers.values() if node["resources"].get("GPU", 0) == 0]
    assert sum(node["max_workers"] for node in cpu) >= 2 and cluster["max_workers"] >= 2


def test_cluster_has_gpu_workers_for_ray_train(cluster):
    workers = {name: node for name, node in cluster["available_node_types"].items() if name != cluster["head_node_type"]}
    gpu = [node for node in workers.values() if node["resources"].get("GPU", 0) > 0]
    assert sum(node["max_workers"] * node["resources"]["GPU"] for node in gpu) >= 2
    assert cluster["max_workers"] >= sum(node["max_workers"] for node in workers.values())


def test_rayjob_ships_a_network_policy_that_admits_only_the_jobs_own_pods():
    policies = [d for d in _rayjob_docs() if d.get("kind") == "NetworkPolicy"]
    assert len(policies) == 1
    spec = policies[0]["spec"]
    own = {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": "gradmatch"}
    assert spec["podSelector"]["matchLabels"] == own and spec["policyTypes"] == ["Ingress"]
    sources = [peer for rule in spec["ingress"] for peer in rule["from"]]
    assert all("ipBlock" not in peer for peer in sources)  # no address range outside the cluster
    assert {"podSelector": {"matchLabels": own}} in sources
    assert {"podSelector": {"matchLabels": {"job-name": "gradmatch"}}} in sources  # the submitter
    operator = [p for p in sources if "namespaceSelector" in p]
    assert operator == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "kuberay-operator"}}}]
