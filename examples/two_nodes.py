"""A multi-node Ray cluster simulated on one machine, and a sharded run on it (python examples/two_nodes.py).

Starts a head and two worker nodes with ``ray.cluster_utils.Cluster`` (each a real raylet with its own CPUs),
then runs ``python -m trainer.run --shards 2 --summary-workers 2 --workers 2`` against it as a user would
against a real cluster (``RAY_ADDRESS``), and prints on which nodes the two Ray Train workers trained and the
summary workers made each round's chunks.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parents[1]

with tempfile.TemporaryDirectory(prefix="two-nodes-") as tmp:
    os.environ["RAY_TMPDIR"] = tmp  # this cluster's files (and its address file) stay out of /tmp/ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    # two CPUs per worker node: a Ray Train worker reserves a whole CPU, beside a shard's half and a summary worker's
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        out = Path(tmp) / "run"
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT)}
        flags = ["--dataset", "digits", "--model", "mlp", "--epochs", "12", "--select-every", "2",
                 "--shards", "2", "--summary-workers", "2", "--workers", "2", "--on-late", "wait", "--threads", "1"]
        done = subprocess.run([sys.executable, "-m", "trainer.run", *flags, "--out", str(out)], cwd=ROOT, env=env,
                              text=True, capture_output=True, timeout=600)
        print(done.stdout)
        if done.returncode != 0:
            sys.exit(f"the run failed: {done.stderr.strip().splitlines()[-1]}")
        names = {cluster.head_node.node_id: "head", **{n.node_id: f"node {i + 1}" for i, n in enumerate(nodes)}}
        summary = json.loads((out / "summary.json").read_text())
        print("Ray Train workers (by rank) on " + ", ".join(names.get(n, n[:8]) for n in summary["worker_nodes"]))
        for line in (out / "rounds.jsonl").read_text().splitlines():
            record = json.loads(line)
            where = ", ".join(names.get(n, n[:8]) for n in record["worker_nodes"] or [])
            print(f"round {record['round']}: {record['status']}, summaries made on {where}")
    finally:
        cluster.shutdown()
