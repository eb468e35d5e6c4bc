"""The client in a data-parallel loop: this process's place in a ``torch.distributed`` group, and what a rank
other than 0 knows of the rounds.

Rank 0 is the only rank that talks to the selector (``trainer.client.api.AdaptiveSubset`` makes it the leader);
the other ranks hold a ``FollowerRounds`` and receive each new subset from rank 0 by broadcast. The built-in
trainer's Ray Train side is ``trainer.builtin.distributed``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from protocol.config import RunConfig
from trainer.client.rounds import RoundStats
from trainer.client.schedule import budget_size, ground_layout, plan_epochs


class Group:
    """This process's place in a ``torch.distributed`` group: ``rank`` of ``world``; rank 0 leads."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> "Group | None":
        """The initialised process group with more than one process, or None (one process trains alone)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    def share(self, value):
        """Rank 0's ``value`` on every rank (pickled, broadcast)."""
        box = [value if self.leader else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` (a scalar tensor) over the ranks."""
        total = value.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on some rank."""
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def part(self, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the batch ``ids`` and of its weights ``weights`` (mean 1 over the batch).

        Rank r takes ``ids[r::world]`` and scales its weights by ``world * len(share) / len(ids)``: DDP
        averages the ranks' gradients of ``mean(w * loss)`` over their shares, and with that factor the average
        is the gradient of ``mean(w * loss)`` over the whole batch, ``sum w l / sum w``. A rank left without
        examples (a batch smaller than the group) trains on the batch's first example with weight 0.
        """
        share = ids[self.rank::self.world]
        if share.numel() == 0:
            return ids[:1], torch.zeros(1, dtype=weights.dtype)
        return share, weights[self.rank::self.world] * (self.world * share.numel() / ids.numel())


class FollowerRounds:
    """What a rank other than 0 knows of the rounds: the plan (from rank 0) and nothing of the selector.

    The subset to train on comes from rank 0 at each epoch boundary (``AdaptiveSubset``); records, counts
    and checkpoints are rank 0's.
    """

    def __init__(self, plan, config: RunConfig, n_train: int):
        self.plan, self.config, self.n_train = plan, config, n_train
        self.k = budget_size(config.schedule.budget, n_train)
        self.epoch_plan = plan_epochs(config.train.epochs, config.schedule.kappa, config.schedule.budget, plan.rounds)
        self.ground = ground_layout(plan, n_train, self.k, config.train.batch_size, config.seed)
        self.stats = RoundStats()
        self.on_record = None
        self.subset = None

    def start_epoch(self, epoch: int, step: int):
        return None  # rank 0 shares the subset

    def finish(self, epochs_run: int | None = None) -> None:
        pass

    def shutdown(self, timeout_s: float = 5.0) -> None:
        pass

    def summary(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# --- checkpoints through Ray Train ------------------------------------------------------------------
