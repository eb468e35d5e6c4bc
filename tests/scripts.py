"""Running a script the way a user would, in a subprocess: the examples against the session's shared Ray, and
the cluster scenarios on a private simulated cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, ray_address: str, timeout_s: float = 600) -> str:
    """``python examples/<name>`` joined to the Ray at ``ray_address``; its stdout (asserts it exits 0)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_address}
    done = subprocess.run([sys.executable, f"examples/{name}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def run_cluster_script(script: str, timeout_s: float, prefix: str) -> dict:
    """``python <script> <out.json>`` with its own ``RAY_TMPDIR``, so the cluster it starts (and that cluster's
    address file) stays apart from the session's shared Ray and from every other program; returns what it
    wrote to ``out.json``."""
    ray_tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths have a length limit
    out = Path(ray_tmp) / "result.json"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, script, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
        assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        return json.loads(out.read_text())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
