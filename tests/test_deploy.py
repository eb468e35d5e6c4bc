"""Structural checks of deploy/: the Ray cluster launcher config, the KubeRay
RayJob and the container image, against the Ray installed here."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<flavor>gpu|cu\d+)$")


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
    installs = [c for c in cluster["setup_commands"] if re.search(r"\bpip install \.(\s|$)", c)]
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
    assert re.search(r"^RUN\s+pip install\b.*\s\.(\s|$)", text, re.M)


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
