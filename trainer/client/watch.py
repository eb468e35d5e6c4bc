"""Watching a run while it trains: TensorBoard event files and Ray metrics, both fed the records a run already
writes (``protocol.records``: one ``EpochRecord`` per epoch, one ``RoundRecord`` per round), not a second
bookkeeping. ``python -m trainer.run`` feeds them on the driver as the records arrive (``trainer.launch.job``);
``AdaptiveSubset`` feeds them from its own round records and the losses a loop reports.

TensorBoard (``--tensorboard DIR``, ``tensorboard=``): ``epoch/loss``, ``epoch/lr`` and ``epoch/accuracy`` (when the
epoch was evaluated) at step = epoch; ``round/stall_s``, ``round/selector_s``, ``round/grad_error`` and
``round/subset_size`` at step = round, each when the round's record holds it. Needs the ``tensorboard`` package
(``pip install 'gradmatch[tensorboard]'``).

Ray metrics (``ray.util.metrics``, always on while Ray is connected), tagged with the round's ``strategy``: the
counters ``gradmatch_rounds_adopted_total``, ``gradmatch_rounds_rejected_total`` (rejected, failed or timed
out) and ``gradmatch_rounds_harmful_total`` (undone by the divergence guard), and the gauges
``gradmatch_round_stall_seconds``, ``gradmatch_round_selector_seconds``, ``gradmatch_round_grad_error`` and
``gradmatch_round_subset_size`` (the latest round's). Prometheus names carry Ray's ``ray_`` prefix.
"""

from __future__ import annotations

from trainer.cli import ConfigError
from trainer.client.extras import require

EPOCH_SCALARS = {"loss": "epoch/loss", "lr": "epoch/lr", "val_acc": "epoch/accuracy"}  # record field -> tag
ROUND_SCALARS = {"stall_s": "round/stall_s", "selector_s": "round/selector_s", "grad_error": "round/grad_error",
                 "subset_size": "round/subset_size"}
COUNTED = {"adopted": "adopted", "rejected": "rejected", "failed": "rejected", "timeout": "rejected"}
GAUGES = {"stall_s": ("gradmatch_round_stall_seconds", "seconds training stalled waiting for the round"),
          "selector_s": ("gradmatch_round_selector_seconds", "seconds the selector worked on the round"),
          "grad_error": ("gradmatch_round_grad_error", "gradient error of the round's subset (paper Eq. 1, absolute)"),
          "subset_size": ("gradmatch_round_subset_size", "examples in the round's adopted subset")}
COUNTERS = {"adopted": "rounds adopted", "rejected": "rounds rejected, failed or timed out",
            "harmful": "adopted rounds the divergence guard undid"}


def tensorboard_module(what: str = "--tensorboard"):
    """``torch.utils.tensorboard``, or one line naming the ``[tensorboard]`` extra when the package is missing."""
    return require("torch.utils.tensorboard", what, "tensorboard", package="tensorboard")


class TensorBoard:
    """Event files in ``logdir`` from run records. ``rewrite=True`` (a resumed run, whose records come back whole)
    hides every event an earlier writer left there, so each step shows once."""

    def __init__(self, logdir: str, rewrite: bool = False, what: str = "--tensorboard"):
        module = tensorboard_module(what)
        try:
            self.writer = module.SummaryWriter(str(logdir), purge_step=0 if rewrite else None)
        except OSError as exc:  # a directory the system refuses: one line naming it, not a traceback
            raise ConfigError(f"{what} {logdir!r}: cannot create it ({exc.strerror or exc}); must be a writable "
                              "directory") from None

    def epochs(self, records: list[dict]) -> None:
        self._write(records, "epoch", EPOCH_SCALARS)

    def rounds(self, records: list[dict]) -> None:
        self._write(records, "round", ROUND_SCALARS)

    def _write(self, records: list[dict], step_key: str, scalars: dict[str, str]) -> None:
        for record in records:
            for key, tag in scalars.items():
                if record.get(key) is not None:
                    self.writer.add_scalar(tag, float(record[key]), int(record[step_key]))
        if records:
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RayMetrics:
    """The rounds as ``ray.util.metrics`` counters and gauges (module docstring), tagged with their strategy."""

    def __init__(self):
        from ray.util.metrics import Counter, Gauge

        tags = ("strategy",)
        self.counters = {kind: Counter(f"gradmatch_rounds_{kind}_total", description=text, tag_keys=tags)
                         for kind, text in COUNTERS.items()}
        self.gauges = {key: Gauge(name, description=text, tag_keys=tags) for key, (name, text) in GAUGES.items()}
        self.strategy_of: dict[int, str] = {}  # round -> strategy, for the harmful events (which name the round)

    def rounds(self, records: list[dict]) -> None:
        for record in records:
            tags = {"strategy": str(record["strategy"])}
            self.strategy_of[int(record["round"])] = tags["strategy"]
            kind = COUNTED.get(record["status"])
            if kind is not None:
                self.counters[kind].inc(1.0, tags=tags)
            for key, gauge in self.gauges.items():
                if record.get(key) is not None:
                    gauge.set(float(record[key]), tags=tags)

    def harmful(self, events: list[dict], strategy: str) -> None:
        """Rounds the divergence guard undid (``RunSummary.harmful`` entries); ``strategy`` for a round not seen."""
        for event in events:
            tags = {"strategy": self.strategy_of.get(int(event["round"]), strategy)}
            self.counters["harmful"].inc(1.0, tags=tags)


class Watch:
    """TensorBoard (when ``tensorboard`` names a directory) and Ray metrics (when Ray is connected), fed together."""

    def __init__(self, tensorboard: str | None, strategy: str, rewrite: bool = False, metrics: bool = True,
                 what: str = "--tensorboard"):
        import ray

        self.strategy = strategy
        self.board = TensorBoard(tensorboard, rewrite, what) if tensorboard else None
        self.metrics = RayMetrics() if metrics and ray.is_initialized() else None

    def epochs(self, records: list[dict]) -> None:
        if self.board is not None:
            self.board.epochs(records)

    def rounds(self, records: list[dict]) -> None:
        if self.board is not None:
            self.board.rounds(records)
        if self.metrics is not None:
            self.metrics.rounds(records)

    def harmful(self, events: list[dict]) -> None:
        if self.metrics is not None:
            self.metrics.harmful(events, self.strategy)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None
