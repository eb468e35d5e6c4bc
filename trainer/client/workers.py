"""Summary workers: the summary pass of a round made off the trainer's path, from a snapshot of the model.

With ``--summary-workers W`` the trainer puts its model's weights in Ray's object store and goes on training;
W actors, each holding a copy of the model and of the (un-augmented) training inputs, load that snapshot,
compute their share of the round's chunks and stream them straight to the selector. The trainer's cost per
round is the snapshot ``put``. Workers are spread over the cluster's nodes by a placement group (``SPREAD``,
best effort), each with its own CPU/GPU request.

Each round the pool describes the round's summaries (``protocol.routes.SummaryLayout``) and asks the selector
where they go (``routes``, not waited for by the trainer): the single selector takes whole chunks
(``WholeChunks``: ``add_chunk``); the sharded coordinator hands out the round's class map and its shards, and
each worker splits its chunks by class, sends the parts straight to the shards and only ids and labels to the
coordinator (``protocol.routes.send_routed``). Jobs and answers are ``protocol.jobs`` types.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import ray
import torch
from torch import nn

from protocol.jobs import BatchJob, SummaryJob, WorkerReport
from protocol.receipts import Rejection
from protocol.routes import SummaryLayout, WholeChunks, send_routed
from trainer.client.cluster import release
from trainer.client.summaries import SummarySource

WORKER_CPU = 0.01  # a placement-group bundle must reserve something; real CPU use is set by ``threads``
PLACE_TIMEOUT_S = 120.0
ROUTE_TIMEOUT_S = 60.0  # the selector's answer to ``routes`` (a cheap call on a threaded actor)


class SummaryWorkerService:
    """Holds a model copy and the summary view of the training set; computes chunks from weight snapshots."""

    def __init__(self, parts: list, layer_name: str, threads: int = 1, precision: str = "fp32"):
        model, inputs, labels = ray.get(parts, timeout=PLACE_TIMEOUT_S)  # (refs held by the pool: a restart reloads)
        torch.set_num_threads(threads)
        on_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        self.device = torch.device("cuda:0" if on_gpu else "cpu")
        self.model = model.to(self.device)
        layer = dict(self.model.named_modules())[layer_name]
        self.source = SummarySource(self.model, inputs, labels, self.device, layer=layer, precision=precision)
        self.source.example_chunk(0, min(2, len(labels)))  # first-call costs of the forward pass, paid here

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def summarise(self, round_id: int, state: dict, jobs: list[SummaryJob], selector,
                  route: list | None = None) -> WorkerReport:
        """Compute ``jobs`` from the weights ``state`` and send each chunk on; reports where and how long.

        ``route`` holds the ref of the selector's ``routes`` answer for the round (in a list, so it arrives
        unresolved): a class map sends each chunk's parts straight to the shards, ``WholeChunks`` (or no
        ``route``) whole chunks to ``selector.add_chunk``, a ``Rejection`` (the round takes no summaries) nothing.
        """
        began = time.perf_counter()
        plan = ray.get(route[0], timeout=ROUTE_TIMEOUT_S) if route else WholeChunks()
        if isinstance(plan, Rejection):  # failed or over: the selector tells the trainer why
            return WorkerReport(node=self.node(), n_chunks=0, seconds=time.perf_counter() - began)
        self.model.load_state_dict(state)
        for job in jobs:
            if isinstance(job, BatchJob):
                chunk = self.source.batch_chunk(job.batches, job.start)
            else:
                chunk = self.source.example_chunk(job.start, job.stop, job.ids)
            chunk = {"round_id": round_id, "chunk_index": job.index, **chunk}
            if isinstance(plan, WholeChunks):
                selector.add_chunk.remote(chunk)
            else:
                send_routed(plan, selector, chunk)
        return WorkerReport(node=self.node(), n_chunks=len(jobs), seconds=time.perf_counter() - began)


# no Ray restarts: a lost worker fails its round, and the pool places a new one before the next round
SummaryWorker = ray.remote(num_cpus=0, num_gpus=0, max_restarts=0)(SummaryWorkerService)


class SummaryPool:
    """``n`` summary workers placed by a ``SPREAD`` placement group; ``jobs`` are dealt round-robin."""

    def __init__(self, n: int, model: nn.Module, inputs, labels: torch.Tensor, layer: nn.Linear, threads: int = 1,
                 gpus: float = 0.0, precision: str = "fp32"):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": WORKER_CPU, **({"GPU": gpus} if gpus else {})}
        self.group = placement_group([bundle] * n, strategy="SPREAD")
        ray.get(self.group.ready(), timeout=PLACE_TIMEOUT_S)
        name = next(name for name, module in model.named_modules() if module is layer)
        copy_ = copy.deepcopy(model).cpu()
        owner = getattr(inputs, "__self__", None)  # a tensor's bound __getitem__: send the tensor from the CPU
        if isinstance(owner, torch.Tensor):
            inputs = owner.cpu().__getitem__
        elif isinstance(inputs, torch.Tensor):
            inputs = inputs.cpu()
        self.parts = [ray.put(copy_), ray.put(inputs), ray.put(labels.cpu())]
        self.options = lambda i: dict(num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.group, placement_group_bundle_index=i))
        self.layer_name, self.threads, self.precision = name, threads, precision
        self.n_classes, self.n_features = layer.out_features, layer.in_features
        self.labels = labels.cpu().numpy()
        self.workers = [self._place(i) for i in range(n)]
        # wait until every worker is built and warm, so that the first round does not wait for them
        self.nodes = ray.get([worker.node.remote() for worker in self.workers], timeout=PLACE_TIMEOUT_S)
        self.last: dict[int, ray.ObjectRef] = {}  # each worker's last call, to find the lost ones
        self.replaced = 0

    def _place(self, i: int):
        return SummaryWorker.options(**self.options(i)).remote(self.parts, self.layer_name, self.threads,
                                                               self.precision)

    def _replace_lost(self) -> None:
        """A worker whose last call died with it is placed anew in its bundle (its node, if that is still up)."""
        for i, ref in list(self.last.items()):
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                continue
            try:
                ray.get(ref, timeout=PLACE_TIMEOUT_S)
            except ray.exceptions.RayActorError:
                self.workers[i] = self._place(i)
                self.replaced += 1
            except ray.exceptions.RayError:
                pass  # the call failed, the worker lives
            del self.last[i]

    def start(self, round_id: int, model: nn.Module, jobs: list[SummaryJob], selector) -> tuple[list, float]:
        """Snapshot ``model``, ask ``selector`` where the round's summaries go (``routes``, not waited for here:
        each worker waits for the answer, bounded) and hand the jobs out; returns the workers' result refs and
        the seconds of the put."""
        self._replace_lost()
        began = time.perf_counter()
        state = ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})
        route = [selector.routes.remote(round_id, self.layout(jobs))] if jobs else None
        refs = []
        for i, worker in enumerate(self.workers):
            share = jobs[i::len(self.workers)]
            if share:
                self.last[i] = worker.summarise.remote(round_id, state, share, selector, route)
                refs.append(self.last[i])
        return refs, time.perf_counter() - began

    def layout(self, jobs: list[SummaryJob]) -> SummaryLayout:
        """What the chunks of ``jobs`` will be, for the selector to fix the round's class map up front
        (``service.routes.planned_routes``): per-example rounds carry the ground set's class counts."""
        if isinstance(jobs[0], BatchJob):
            return SummaryLayout("batch", self.n_classes, self.n_features, sum(len(job.batches) for job in jobs))
        n_ground = max(job.stop for job in jobs)
        labels = self.labels[:n_ground] if jobs[0].ids is None else self.labels[np.concatenate([job.ids for job in jobs])]
        return SummaryLayout("example", self.n_classes, self.n_features, n_ground,
                             np.bincount(labels, minlength=self.n_classes))

    def close(self) -> None:
        release(*self.workers, group=self.group)
