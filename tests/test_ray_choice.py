"""Which Ray a run uses (``--ray``, ``ray=``), and a real ``ray start --head`` cluster with token authentication.

The cluster test starts its own head (own temp dir, own port) and stops it by killing the PIDs of its own
processes, never with the CLI's stop command (that would stop every Ray on the machine).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.client import cluster
from trainer.client.cluster import RayUnavailable, choose_ray

ROOT = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).with_name("ray")
TIMEOUT_S = 240
SMALL = ["--dataset", "digits", "--model", "mlp", "--threads", "1", "--epochs", "4", "--select-every", "2",
         "--on-late", "wait"]


def test_choose_ray_follows_the_flag_and_the_default_rule(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "recorded_address", lambda: None)
    assert choose_ray("local") == (None, "--ray local")
    assert choose_ray("10.0.0.1:6379") == ("10.0.0.1:6379", "--ray ADDRESS")
    address, why = choose_ray("auto")
    assert address is None and "no cluster started with `ray start`" in why
    with pytest.raises(RayUnavailable, match="--ray cluster: no cluster was started with `ray start`"):
        choose_ray("cluster")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert choose_ray("cluster") == ("10.0.0.2:6379", "RAY_ADDRESS")
    assert choose_ray("auto") == ("10.0.0.2:6379", "RAY_ADDRESS")
    assert choose_ray("local") == (None, "--ray local")  # local wins over RAY_ADDRESS
    monkeypatch.delenv("RAY_ADDRESS")
    with socket.socket() as listener:  # a recorded cluster is joined while something listens there
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        recorded = f"127.0.0.1:{listener.getsockname()[1]}"
        monkeypatch.setattr(cluster, "recorded_address", lambda: recorded)
        assert choose_ray("auto")[0] == recorded and "recorded by `ray start`" in choose_ray("auto")[1]
    address, why = choose_ray("auto")  # stopped: passed over
    assert address is None and "not running" in why
    with pytest.raises(RayUnavailable, match="nothing answers there"):
        cluster.probe_cluster(recorded, "test")


def test_a_cluster_nobody_runs_is_refused_fast_and_leaves_no_run_directory(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    out = tmp_path / "run"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "trainer.run", *SMALL, "--ray", f"127.0.0.1:{port}", "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "--ray local" in errors[0], done.stderr
    assert not out.exists()
    assert time.monotonic() - start < 60  # imports and data loading; the refusal itself takes under 2 s


# --- a real `ray start --head` ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_of(mark: str) -> set[int]:
    """The processes whose command line names ``mark`` (the cluster's temp dir), and their descendants."""
    table = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in table.splitlines() if line.strip()]
    pids = {int(r[0]) for r in rows if len(r) == 3 and mark in r[2]}
    children = {}
    for r in rows:
        children.setdefault(int(r[1]), []).append(int(r[0]))
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in pids:
                pids.add(child)
                todo.append(child)
    pids.discard(os.getpid())
    return pids


def _kill(pids: set[int]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait_s
        while time.monotonic() < end and any(_alive(pid) for pid in pids):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def ray_start_head(tmp_path_factory):
    """``ray start --head`` in its own temp dir (short enough for Ray's socket paths), with Ray 2.60's default
    token authentication; yields ``(address, env)`` where ``env`` finds it as the recorded cluster."""
    base = tmp_path_factory.mktemp("rs")
    temp_dir = base / "ray"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(RAY_TMPDIR=str(base), PYTHONPATH=str(ROOT))
    port = _free_port()
    started = subprocess.run([str(RAY_BIN), "start", "--head", "--port", str(port), "--temp-dir", str(temp_dir),
                              "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        address = (temp_dir / "ray_current_cluster").read_text().strip()
        assert address.endswith(f":{port}")
        yield address, env
    finally:
        _kill(_pids_of(str(temp_dir)))


@pytest.mark.e2e
def test_runs_join_a_ray_start_cluster_with_token_auth(ray_start_head, tmp_path):
    address, env = ray_start_head
    assert "RAY_AUTH_MODE" not in env  # the runs must turn token authentication on themselves
    cli = [sys.executable, "-m", "trainer.run", *SMALL]
    own_loop = (
        "import torch, torch.nn.functional as F\n"
        "from torch import nn\n"
        "from trainer.client import cluster\n"
        "from trainer.api import AdaptiveSubset\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(200, 8); y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()\n"
        "model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.05)\n"
        "with AdaptiveSubset(model, torch.utils.data.TensorDataset(x, y), strategy='gradmatch-pb', budget=0.2,\n"
        "                    epochs=6, select_every=2, batch_size=16, on_late='wait', ray='cluster') as subset:\n"
        "    for epoch, batches in subset:\n"
        "        for bx, by, w in batches:\n"
        "            loss = (w * F.cross_entropy(model(bx), by, reduction='none')).mean()\n"
        "            opt.zero_grad(); loss.backward(); opt.step()\n"
        "    print(cluster.connection.describe()); print(subset.summary()['rounds'])\n"
    )
    def spawn(args, extra=None):
        return subprocess.Popen(args, cwd=ROOT, env={**env, **(extra or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    runs = {  # side by side: each pays its imports while the others train
        "cluster": spawn([*cli, "--ray", "cluster", "--out", str(tmp_path / "cluster")]),
        "env": spawn([*cli, "--out", str(tmp_path / "env")], {"RAY_ADDRESS": address}),
        "api": spawn([sys.executable, "-c", own_loop]),
        "wrong": spawn([*cli, "--ray", address, "--out", str(tmp_path / "wrong")], {"RAY_AUTH_TOKEN": "not-the-token"}),
    }
    results = {name: p.communicate(timeout=TIMEOUT_S) for name, p in runs.items()}
    codes = {name: p.returncode for name, p in runs.items()}
    assert codes == {"cluster": 0, "env": 0, "api": 0, "wrong": 2}, {n: r[1][-1500:] for n, r in results.items()}
    for name, why in (("cluster", "recorded by `ray start`"), ("env", "RAY_ADDRESS")):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["ray_address"] == address and summary["status"] == "completed"
        assert summary["ray"].startswith(f"cluster at {address} ({why}")
        assert f"cluster at {address}" in results[name][0]  # the printed table says which Ray and why
    stdout = results["api"][0].splitlines()
    assert stdout[0].startswith(f"cluster at {address} (recorded by `ray start`") and int(stdout[1]) >= 1
    errors = [line for line in results["wrong"][1].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and address in errors[0] and "refused this program's token" in errors[0], results["wrong"][1]
    assert not (tmp_path / "wrong").exists()
