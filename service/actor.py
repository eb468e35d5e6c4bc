"""The Ray shell around ``SelectorService``.

A threaded actor (``max_concurrency``) so ``status`` and ``stop`` answer while a ``result`` call
waits on a running selection. Resources, restarts and placement come from the caller's
``.options(...)``; the defaults hold no CPU for life, which matters on 2-core machines. A killed
selector is restarted and calls caught by its death are retried on the new one; a retried ``result``
for a round the new one never saw fails fast (``SelectorService.result``).
"""

from __future__ import annotations

import ray
import torch

from service.selector import SelectorService


class _PlacedSelector(SelectorService):
    """Computes on the GPU Ray assigned to the actor, if any (``num_gpus=0`` actors see every GPU)."""

    def __init__(self, config):
        on_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        super().__init__(config, device="cuda:0" if on_gpu else "cpu")


SelectorActor = ray.remote(
    num_cpus=0, num_gpus=0, max_concurrency=8, max_restarts=3, max_task_retries=3
)(_PlacedSelector)
